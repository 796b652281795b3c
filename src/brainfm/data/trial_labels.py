"""Per-TR labels for mental-state (trial) decoding: BIDS events -> the label of every TR, the
haemodynamic shift, and the labelled blocks that decoding windows are cut from.

Time convention (Thomas, Ré & Poldrack 2022, athms/learning-from-brains): TR ``i`` of a run is
acquired at ``t_i = i * TR`` seconds from the run's start, and its label is the ``trial_type`` of the
event that covers ``t_i - shift_s``, i.e. ``onset <= t_i - shift_s < onset + duration`` (seconds, as
in a BIDS ``events.tsv``). ``shift_s`` is the haemodynamic delay between a stimulus and the BOLD
response it evokes: Thomas et al. shift the labels by 4 TRs on HCP (4 x 0.72 s = 2.88 s) and by 3 TRs
on MDTB (3 x 1 s = 3 s). Where events overlap, the one with the later onset wins; events of duration 0
and trial types outside ``classes`` (e.g. fixation) label no TR (-1).

The store keeps the labels in ``/trial_labels/<name>`` ((n_runs, T_max) int64, -1 = none;
:data:`brainfm.data.stores.roi.TRIAL_LABELS_GROUP`) with the shift they already include
(``attrs["shift_s"]``). ``data.trial_labels.shift_s`` is the shift a run wants; the difference to the
stored one is applied when the labels are read, in whole TRs (:func:`shift_trs`): so a store written
stimulus-locked (``shift_s=0``) serves any delay, and one written with the delay is used as it is
(``data.trial_labels.shift_s: null``).

Decoding windows lie wholly inside one *block*: a maximal stretch of TRs with the same label
(:func:`labelled_blocks`). Windows that straddle two labels or unlabelled TRs are skipped, not given
a majority label: the label of every TR a model sees is the window's label (as Thomas et al.'s
downstream samples, which are cut inside one trial block). Blocks shorter than a window give none.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from brainfm.data.stores.roi import ROIStore, write_trial_labels
from brainfm.errors import ConfigError, DataError

log = logging.getLogger(__name__)

EVENT_COLUMNS = ("onset", "duration", "trial_type")
#: seconds: two times closer than this are equal (onsets written with a few decimals)
TIME_EPS = 1e-6


def read_events(path: str | os.PathLike):
    """A BIDS ``events.tsv`` (tab-separated; ``onset``, ``duration`` in seconds, ``trial_type``) as a
    ``pandas.DataFrame`` of those three columns (``n/a`` durations: 0).

    Raises:
        DataError: a missing file, a missing column, non-numeric onsets or durations (the file named).
    """
    import pandas as pd

    path = Path(path)
    if not path.is_file():
        raise DataError(f"events table {path} does not exist")
    sep = "\t" if path.suffix.lower() in (".tsv", ".tab") else ","
    df = pd.read_csv(path, sep=sep, dtype=str, keep_default_na=False)
    return check_events(df, str(path))


def check_events(events, where: str = "events table"):
    """``events`` (a DataFrame or a mapping of columns) with numeric ``onset``/``duration`` and string
    ``trial_type``. Raises DataError naming ``where`` and the bad column."""
    import pandas as pd

    df = events if isinstance(events, pd.DataFrame) else pd.DataFrame(dict(events))
    missing = [c for c in EVENT_COLUMNS if c not in df.columns]
    if missing:
        raise DataError(f"{where} has no column(s) {missing} (columns: {list(df.columns)}); a BIDS events.tsv has "
                        "onset and duration in seconds and trial_type")
    out = pd.DataFrame({"trial_type": df["trial_type"].astype(str).str.strip()})
    for col in ("onset", "duration"):
        raw = df[col].astype(str).str.strip().replace({"n/a": "0", "": "0"}) if col == "duration" else df[col]
        values = pd.to_numeric(raw, errors="coerce")
        if values.isna().any():
            bad = df[col][values.isna()].iloc[0]
            raise DataError(f"{where}: column {col!r} has a non-numeric value {bad!r}; onsets and durations are seconds")
        out[col] = values.astype(float)
    if (out["duration"] < 0).any():
        raise DataError(f"{where}: negative durations")
    return out[list(EVENT_COLUMNS)]


def events_to_trial_labels(events, n_trs: int, tr: float, shift_s: float = 0.0,
                           classes: Sequence[str] | None = None) -> tuple[np.ndarray, list[str]]:
    """Labels of the ``n_trs`` TRs of one run from its events (module docstring for the convention).

    Args:
        events: a DataFrame or mapping with ``onset``, ``duration`` (seconds) and ``trial_type``.
        n_trs: TRs of the run. tr: repetition time in seconds.
        shift_s: haemodynamic shift in seconds (HCP 2.88 = 4 TRs x 0.72 s; MDTB 3.0 = 3 TRs x 1 s).
        classes: class names in index order (other trial types label nothing); None: the sorted
            trial types of this table that have events of positive duration (give them explicitly when several runs must share indices).

    Returns:
        ``(labels (n_trs,) int64 with -1 = no label, classes)``.

    Raises:
        DataError: a bad table (:func:`check_events`), a non-positive TR.
    """
    if not tr or tr <= 0:
        raise DataError(f"the repetition time must be positive seconds, got {tr!r}")
    df = check_events(events)
    classes = _trial_types([df]) if classes is None else [str(c) for c in classes]
    index = {c: k for k, c in enumerate(classes)}
    t = np.arange(int(n_trs), dtype=np.float64) * float(tr) - float(shift_s)
    labels = np.full(int(n_trs), -1, dtype=np.int64)
    for row in df.sort_values("onset", kind="stable").itertuples(index=False):
        if row.trial_type not in index or row.duration <= 0:
            continue
        covered = (t >= row.onset - TIME_EPS) & (t < row.onset + row.duration - TIME_EPS)
        labels[covered] = index[row.trial_type]
    return labels, classes


def add_trial_labels_from_events(path: str | os.PathLike, events: Mapping, name: str = "task", shift_s: float = 0.0,
                                 classes: Sequence[str] | None = None) -> list[str]:
    """Write ``/trial_labels/<name>`` of an ROI store from one events table per run.

    Args:
        path: the ROI ``.h5`` store (its TR and run lengths are used).
        events: run -> events table (an ``events.tsv`` path or a DataFrame); a run is its row index
            (int) or ``(subject_id, run_id)``. Runs without a table get no labels (-1).
        name: label name. shift_s: haemodynamic shift in seconds, applied now and recorded
            (``0``: stimulus-locked labels, shifted later by ``data.trial_labels.shift_s``).
        classes: class names (default: the sorted trial types of all tables with events of positive
            duration, so every run shares them).

    Returns:
        The class names, in class-index order.

    Raises:
        DataError: a run key that is not in the store, a bad table, a store without a TR.
    """
    store = ROIStore(path, preload=False)
    if store.tr is None:
        raise DataError(f"{path} records no TR; trial labels from events need it (write the store with its TR)")
    rows = {(s, r): i for i, (s, r) in enumerate(zip(store.subject_ids, store.run_ids))}
    tables = {}
    for key, table in events.items():
        row = key if isinstance(key, (int, np.integer)) else rows.get(tuple(key))
        if row is None or not 0 <= int(row) < store.n_runs:
            raise DataError(f"{path}: no run {key!r} for events (runs are row indices or (subject_id, run_id), "
                            f"e.g. {next(iter(rows))})")
        where = str(table) if isinstance(table, (str, os.PathLike)) else f"events of run {key!r}"
        tables[int(row)] = read_events(table) if isinstance(table, (str, os.PathLike)) else check_events(table, where)
    if classes is None:
        classes = _trial_types(tables.values())
    labels = [events_to_trial_labels(tables[r], int(store.lengths[r]), store.tr, shift_s, classes)[0] if r in tables
              else np.full(int(store.lengths[r]), -1, dtype=np.int64) for r in range(store.n_runs)]
    store.close()
    write_trial_labels(path, name, labels, list(classes), shift_s=float(shift_s))
    return list(classes)


def _trial_types(tables) -> list[str]:
    """The sorted trial types with at least one event of positive duration (impulse-only types label no TR)."""
    return sorted({c for df in tables for c in df.loc[df["duration"] > 0, "trial_type"].unique()})


def shift_trs(wanted_s: float | None, stored_s: float, tr: float) -> int:
    """TRs to delay stored labels by so that they include ``wanted_s`` seconds of haemodynamic shift
    (``None``: as stored, 0). Rounded to the nearest TR (logged when not a whole number of TRs)."""
    if wanted_s is None:
        return 0
    residual = float(wanted_s) - float(stored_s)
    k = int(round(residual / float(tr)))
    if not math.isclose(k * float(tr), residual, abs_tol=1e-3):
        log.warning("haemodynamic shift %g s (%g s already in the labels) is not a whole number of TRs at TR %g s; "
                    "delaying the labels by %d TRs (%g s)", wanted_s, stored_s, tr, k, k * tr)
    return k


def shift_labels(labels: np.ndarray, k: int) -> np.ndarray:
    """``out[i] = labels[i - k]`` (labels delayed by ``k`` TRs; -1 where ``i - k`` falls outside the run)."""
    labels = np.asarray(labels, dtype=np.int64)
    out, n, k = np.full_like(labels, -1), len(labels), int(k)
    if 0 <= k < n:
        out[k:] = labels[: n - k]
    elif -n < k < 0:
        out[: n + k] = labels[-k:]
    return out


def blocks(labels: np.ndarray) -> list[tuple[int, int, int]]:
    """Maximal stretches of equal labels ``>= 0``: ``(first TR, stop TR, label)``."""
    labels = np.asarray(labels)
    if not len(labels):
        return []
    change = np.flatnonzero(np.diff(labels) != 0) + 1
    starts = np.concatenate([[0], change])
    stops = np.concatenate([change, [len(labels)]])
    return [(int(a), int(b), int(labels[a])) for a, b in zip(starts, stops) if labels[a] >= 0]


def labelled_blocks(store, name: str, segments: Sequence[tuple[int, int, int]], span: int, shift: int = 0
                    ) -> tuple[list[tuple[int, int, int]], list[int]]:
    """The labelled blocks of ``segments`` that hold one window of ``span`` TRs, and their labels.

    Args:
        store: an ROI store with ``/trial_labels/<name>``. segments: ``(run, first TR, stop TR)`` (a split).
        span: TRs of one window. shift: TRs to delay the stored labels by (:func:`shift_trs`).

    Returns:
        ``(segments, labels)``: one ``(run, first TR, stop TR)`` per block inside a segment (in order)
        and its class index.

    Raises:
        DataError: the store has no such labels.
    """
    out, labels, cache = [], [], {}
    for run, lo, hi in segments:
        run = int(run)
        if run not in cache:
            cache = {run: shift_labels(store.trial_labels(run, name), shift)}
        for a, b, label in blocks(cache[run][int(lo):int(hi)]):
            if b - a >= span:
                out.append((run, int(lo) + a, int(lo) + b))
                labels.append(label)
    return out, labels


def trial_labels_config(value: Mapping | None) -> dict | None:
    """``data.trial_labels`` with its defaults (``{"name": "task", "shift_s": None}``), or None.

    Raises:
        ConfigError: unknown keys or a non-numeric shift.
    """
    if not value:
        return None
    cfg = {"name": "task", "shift_s": None, **dict(value)}
    unknown = set(cfg) - {"name", "shift_s"}
    if unknown:
        raise ConfigError(f"data.trial_labels has unknown key(s) {sorted(unknown)}; allowed: name, shift_s")
    if cfg["shift_s"] is not None and not isinstance(cfg["shift_s"], (int, float)):
        raise ConfigError(f"data.trial_labels.shift_s={cfg['shift_s']!r} must be seconds (HCP 2.88, MDTB 3) or null")
    return cfg
