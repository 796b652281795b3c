"""Parcellated time series as the BIDS ecosystem writes them (XCP-D, nilearn-based pipelines) -> an ROI store
(``brainfm-data import``).

Input: a BIDS derivatives folder with one TSV per run and atlas::

    sub-<label>/[ses-<label>/]func/
        sub-<label>[_ses-<label>]_task-<label>[_acq-<label>][_run-<index>]_space-<label>_seg-<atlas>_stat-mean_timeseries.tsv

one column per ROI (the header holds the ROI names), one row per TR, ``n/a`` where a value is missing. The atlas
entity is ``seg-`` (XCP-D 0.7 to 25.x) or ``atlas-`` (XCP-D before 0.7 and from 26.0, after BIDS settled on
``atlas-``); ``--atlas`` matches either. A ``stat-`` entity, where present, must be ``mean``. Entities are parsed
with pybids (:func:`bids.layout.parse_file_entities`, its ``bids`` and ``derivatives`` entities plus ``stat-``),
so every BIDS entity of the raw run (``ses``, ``task``, ``acq``, ``ce``, ``rec``, ``dir``, ``run``, ``echo``,
``part``) names the run and finds its other files.

Per run (:func:`import_bids_timeseries`):

- **ids**: subject ``sub-<label>``, run id the raw entities in BIDS order (``ses-1_task-rest_run-2``).
- **TR** (seconds), the first of: (1) the time series' own sidecar (``<name>.json``: ``RepetitionTime``, or
  ``SamplingFrequency`` in Hz; XCP-D writes ``"SamplingFrequency": "TR"``, a placeholder, so its TR comes
  from (2)); (2) BOLD sidecars of the same run beside it (XCP-D's ``*_desc-denoised_bold.json``, fMRIPrep's
  ``*_desc-preproc_bold.json``); (3) the raw BIDS data set (``events_dir``): the run's ``*_bold`` sidecars
  with BIDS inheritance (a root ``task-rest_bold.json`` applies to every rest run;
  :func:`brainfm.data.preprocess.discover.find_sidecars`); (4) ``tr``. A sidecar TR that disagrees with
  ``tr``, or runs of different TRs (an ROI store holds one), are refused with the file named.
- **ROI names**: the TSV header, the same in every run (the first file that differs is named). XCP-D's
  configuration-hash suffix (``<name>_hash-<hash>``, XCP-D >= 26) is dropped from the names.
- **labels**: every column of ``participants.tsv`` (or ``labels``) as ``/labels/<column>``, one value per run
  from its subject's row (numbers as float64 with NaN for ``n/a``, text as strings with ``""``).
- **trial labels**: the run's ``*_events.tsv`` (``onset``, ``duration``, ``trial_type``; BIDS inheritance),
  beside the derivatives or in the raw data set (``events_dir``), through the haemodynamic-shift machinery of
  :mod:`brainfm.data.trial_labels` into ``/trial_labels/task`` (stimulus-locked unless ``shift_s``; the
  shift is applied when read, ``data.trial_labels.shift_s``). TR ``i`` is at ``i * TR`` seconds from the
  first row of the time series, so a pipeline that dropped leading volumes shifts the labels by as many TRs.
- **censoring** (``/censored_trs``, :func:`brainfm.data.stores.roi.write_censored_trs`; windows that hold a
  censored TR are skipped when read, :func:`brainfm.data.windows.skip_censored`):

  - with ``fd_threshold`` (mm): TRs whose ``framewise_displacement`` exceeds it, from the run's XCP-D
    ``*_motion.tsv`` (or ``*_desc-filtered_motion.tsv``) or fMRIPrep ``*_desc-confounds_timeseries.tsv``
    (``*_desc-confounds_regressors.tsv`` in older fMRIPrep releases), beside the derivatives or in ``confounds_dir``
    (``n/a``, fMRIPrep's first row, counts as 0 mm);
  - always: TRs the pipeline removed. XCP-D in ``linc`` mode drops its high-motion volumes from the time series
    and lists them in ``*_outliers.tsv`` (1 = outlier); such a run is put back on its acquisition grid (the
    removed TRs interpolated linearly between their neighbours, so the run stays finite and its statistics
    close) with those TRs censored, so time, events and windows stay right.

Errors (:class:`~brainfm.errors.DataError`) name the file and the fix: an empty tree, no time series for the
atlas (the ``seg-``/``atlas-`` values found are listed), several spaces without ``space``, two files of one
run, ROI names that differ, no TR, non-numeric or missing values, a motion file of another length.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from bids.layout import parse_file_entities
from bids.layout.models import Config

from brainfm.data.phenotypes import read_phenotype_tables
from brainfm.data.preprocess.discover import find_sidecars, read_sidecars
from brainfm.data.stores.roi import ROIStoreWriter, write_censored_trs
from brainfm.data.trial_labels import add_trial_labels_from_events
from brainfm.errors import DataError
from brainfm.io import atomic_path

log = logging.getLogger(__name__)

#: pybids' names of the atlas entity: ``seg-`` (XCP-D 0.7-25.x) and ``atlas-`` (XCP-D < 0.7 and >= 26)
ATLAS_ENTITIES = ("segmentation", "atlas")
#: the raw entities that name a BOLD run, in BIDS's order: (pybids name, BIDS key)
RUN_ENTITIES = (("session", "ses"), ("task", "task"), ("acquisition", "acq"), ("ceagent", "ce"),
                ("reconstruction", "rec"), ("direction", "dir"), ("run", "run"), ("echo", "echo"), ("part", "part"))
#: the entities compared to match a run's files (events, motion, sidecars) to its time series
KEY_ENTITIES = ("subject", *(name for name, _ in RUN_ENTITIES))
#: pybids knows ``stat-`` from no config of its own (BEP017/BEP038 entity used by XCP-D): added here
_STAT = Config("brainfm_bids_timeseries", entities=[{"name": "statistic", "pattern": r"[_/\\]+stat-([a-zA-Z0-9]+)"}])
CONFIG = ["bids", "derivatives", _STAT]
#: XCP-D >= 26 appends its configuration hash to column names (``AddHashToTSV``): ``<ROI>_hash-<hash>``
_HASH_SUFFIX = re.compile(r"_hash-[A-Za-z0-9]+$")
#: confound files that carry ``framewise_displacement``, most preferred first: (suffix, desc)
CONFOUND_FILES = (("motion", None), ("motion", "filtered"), ("timeseries", "confounds"), ("regressors", "confounds"))
FD_COLUMN = "framewise_displacement"
DERIVED_BOLD_SIDECARS = "*_bold.json"
TR_TOLERANCE_S = 1e-6


def entities(path: str | os.PathLike) -> dict:
    """The BIDS entities of a file's name (pybids names: ``subject``, ``session``, ``task``, ``run``, ``space``,
    ``segmentation``, ``atlas``, ``statistic``, ``desc``, ``suffix``, ``extension``, ...). The name alone is parsed:
    pybids matches ``sub-`` anywhere in a path, and a folder above the data set may hold one."""
    return parse_file_entities("/" + Path(path).name, config=CONFIG)


def run_key(ents: dict) -> dict:
    """The entities of ``ents`` that name a raw run (subject and :data:`RUN_ENTITIES`)."""
    return {k: ents[k] for k in KEY_ENTITIES if k in ents}


@dataclass
class SeriesRun:
    """One time series file and what was found for it."""

    path: Path
    ents: dict
    subject: str
    run_id: str
    tr: float | None = None
    tr_source: str = ""
    roi_names: list[str] = field(default_factory=list)
    events: Path | None = None

    @property
    def key(self) -> dict:
        return run_key(self.ents)


@dataclass
class ImportReport:
    """What :func:`import_bids_timeseries` wrote."""

    path: Path
    atlas: str
    space: str | None
    n_runs: int
    subjects: list[str]
    tr: float
    tr_source: str
    n_rois: int
    labels: list[str]
    trial_classes: list[str]
    runs_with_events: int
    fd_threshold_mm: float | None
    n_above_fd_threshold: int
    n_removed_by_pipeline: int
    runs_with_censored: int

    def summary(self) -> str:
        """A few lines for the console."""
        lines = [f"imported {self.n_runs} run(s) of {len(self.subjects)} subject(s), atlas {self.atlas}"
                 f"{f' in space {self.space}' if self.space else ''}: {self.n_rois} ROIs, TR {self.tr:g} s "
                 f"({self.tr_source}) -> {self.path}",
                 f"  per-run labels from participants.tsv: {', '.join(self.labels) if self.labels else 'none'}",
                 f"  trial labels (/trial_labels/task, stimulus-locked) from events.tsv of {self.runs_with_events} "
                 f"run(s): {', '.join(self.trial_classes) if self.trial_classes else 'none'}"]
        censored = self.n_above_fd_threshold + self.n_removed_by_pipeline
        if self.fd_threshold_mm is not None or censored:
            fd = f"FD > {self.fd_threshold_mm:g} mm: {self.n_above_fd_threshold}" if self.fd_threshold_mm is not None \
                else "no FD threshold"
            lines.append(f"  censored TRs: {censored} in {self.runs_with_censored} run(s) ({fd}; removed by the "
                         f"pipeline: {self.n_removed_by_pipeline}); windows holding one are skipped when read")
        return "\n".join(lines)


# -- finding the files -----------------------------------------------------------------------------------
def _atlas_of(ents: dict) -> str | None:
    return next((str(ents[k]) for k in ATLAS_ENTITIES if k in ents), None)


def _run_id(ents: dict) -> str:
    return "_".join(f"{key}-{ents[name]}" for name, key in RUN_ENTITIES if name in ents)


def find_series(root: Path, atlas: str, space: str | None = None, tasks: Sequence[str] | None = None) -> list[SeriesRun]:
    """The parcellated time series of ``atlas`` under ``root``, one per run, sorted by subject and run.

    Raises:
        DataError: no such folder, no time series at all (an empty tree), none of this atlas (the atlases
            found are listed), none of these tasks or this space, several spaces and no ``space``, two files of
            one run.
    """
    if not root.is_dir():
        raise DataError(f"derivatives folder {root} does not exist (or is not a folder). Fix: give the folder "
                        "XCP-D or your pipeline wrote (the one holding sub-*/)")
    found = []
    for path in sorted(root.rglob("sub-*_timeseries.tsv")):
        ents = entities(path)
        if "subject" in ents and _atlas_of(ents) is not None and ents.get("statistic", "mean") == "mean":
            found.append((path, ents))
    if not found:
        raise DataError(
            f"{root} holds no parcellated time series (sub-<label>/[ses-<label>/]func/sub-<label>_..._seg-<atlas>"
            "_stat-mean_timeseries.tsv, or atlas-<atlas> instead of seg-<atlas>) in any folder below it. Fix: point at "
            "the derivatives folder of XCP-D (or of a pipeline that writes BIDS time series), not the raw BIDS data set")
    atlases = sorted({_atlas_of(e) for _, e in found})
    mine = [(p, e) for p, e in found if _atlas_of(e) == atlas]
    if not mine:
        close = [a for a in atlases if a.lower() == atlas.lower()]
        raise DataError(f"{root} has no time series of atlas {atlas!r} (its seg-/atlas- entity); atlases found: "
                        f"{atlases}. Fix: --atlas {close[0] if close else atlases[0]}")
    if tasks:
        have = sorted({str(e.get("task")) for _, e in mine})
        mine = [(p, e) for p, e in mine if str(e.get("task")) in set(tasks)]
        if not mine:
            raise DataError(f"{root}: no time series of atlas {atlas!r} for task(s) {list(tasks)}; tasks found: {have}")
    spaces = sorted({str(e.get("space")) for _, e in mine})
    if space is not None:
        mine = [(p, e) for p, e in mine if str(e.get("space")) == space]
        if not mine:
            raise DataError(f"{root}: no time series of atlas {atlas!r} in space {space!r}; spaces found: {spaces}. "
                            f"Fix: --space {spaces[0]}")
    elif len(spaces) > 1:
        raise DataError(f"{root}: the time series of atlas {atlas!r} come in several spaces {spaces} (e.g. volume and "
                        f"CIFTI outputs of one run); an ROI store holds one. Fix: --space {spaces[0]}")
    runs, seen = [], {}
    for path, ents in mine:
        subject = f"sub-{ents['subject']}"
        run = SeriesRun(path, ents, subject, _run_id(ents))
        ident = (subject, run.run_id)
        if ident in seen:
            raise DataError(f"two time series of atlas {atlas!r} for {subject} {run.run_id}: {seen[ident]} and {path} "
                            "(another desc-, den-, res- or XCP-D configuration hash). Fix: keep one of them (move the "
                            "other out of the folder)")
        seen[ident] = path
        runs.append(run)
    runs.sort(key=lambda r: (r.subject, _sort_key(r.ents)))
    return runs


def _sort_key(ents: dict) -> tuple:
    """Runs in BIDS order, run and echo numerically (pybids parses them as integers)."""
    return tuple((name in ents, ents.get(name, 0) if name in ("run", "echo") else str(ents.get(name, "")))
                 for name, _ in RUN_ENTITIES)


def _index(root: Path | None, pattern: str, suffix: str | None = None) -> list[tuple[dict, Path]]:
    """``(entities, path)`` of the files ``pattern`` finds under ``root`` (recursively)."""
    if root is None or not root.is_dir():
        return []
    out = []
    for path in sorted(root.rglob(pattern)):
        ents = entities(path)
        if suffix is None or ents.get("suffix") == suffix:
            out.append((ents, path))
    return out


def _exact(index: list[tuple[dict, Path]], key: dict) -> list[tuple[dict, Path]]:
    return [(e, p) for e, p in index if run_key(e) == key]


def _inherited(index: list[tuple[dict, Path]], key: dict, what: str) -> Path | None:
    """The file of ``index`` that applies to the run ``key`` by BIDS inheritance: its run entities are a subset
    of the run's, and the most specific wins.

    Raises:
        DataError: two equally specific files apply.
    """
    applies = [(len(run_key(e)), p) for e, p in index if all(key.get(k) == v for k, v in run_key(e).items())]
    if not applies:
        return None
    best = max(n for n, _ in applies)
    top = [p for n, p in applies if n == best]
    if len(top) > 1:
        raise DataError(f"{len(top)} {what} files apply equally to {_describe(key)}: {top[0]} and {top[1]}; BIDS "
                        "inheritance needs one per level. Fix: remove one")
    return top[0]


def _describe(key: dict) -> str:
    return f"sub-{key.get('subject')} {_run_id(key)}"


# -- TR --------------------------------------------------------------------------------------------------
def _sidecar_tr(meta: dict, where: str) -> float | None:
    """``RepetitionTime`` (s), else a numeric ``SamplingFrequency`` (Hz) as its inverse, else None."""
    for key, invert in (("RepetitionTime", False), ("SamplingFrequency", True)):
        value = meta.get(key)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            continue  # XCP-D: "SamplingFrequency": "TR" (a placeholder, not a number)
        if not value > 0:
            raise DataError(f"{where}: {key} {value!r} is not positive; fix the sidecar")
        return 1.0 / float(value) if invert else float(value)
    return None


def run_tr(run: SeriesRun, raw_root: Path | None) -> tuple[float | None, str]:
    """The TR of one run from its sidecars (module docstring, steps 1-3): ``(seconds or None, the file)``.

    Raises:
        DataError: an unreadable sidecar, a non-positive TR, BOLD sidecars of the run that disagree.
    """
    own = run.path.with_suffix(".json")
    if own.is_file():
        tr = _sidecar_tr(read_sidecars([own]), str(own))
        if tr is not None:
            return tr, str(own)
    found = {}
    for ents, path in _exact(_index_folder(run.path.parent), run.key):
        tr = _sidecar_tr(read_sidecars([path]), str(path))
        if tr is not None:
            found[path] = tr
    if found:
        values = sorted(set(found.values()))
        if values[-1] - values[0] > TR_TOLERANCE_S:
            a, b = list(found)[:2]
            raise DataError(f"BOLD sidecars of {run.subject} {run.run_id} disagree on RepetitionTime: {a} has "
                            f"{found[a]:g} s, {b} {found[b]:g} s. Fix the wrong one")
        path = next(iter(found))
        return found[path], str(path)
    if raw_root is not None:
        # the run's raw BOLD (the file itself need not be there: its sidecars are found by name, BIDS inheritance)
        folder = raw_root / run.subject / (f"ses-{run.ents['session']}" if "session" in run.ents else "") / "func"
        bold = folder / f"{run.subject}_{run.run_id}_bold.nii.gz"
        sidecars = find_sidecars(bold, raw_root)
        tr = _sidecar_tr(read_sidecars(sidecars), str(sidecars[-1])) if sidecars else None
        if tr is not None:
            return tr, str(sidecars[-1])
    return None, ""


def _index_folder(folder: Path) -> list[tuple[dict, Path]]:
    return [(entities(p), p) for p in sorted(folder.glob(DERIVED_BOLD_SIDECARS))]


# -- reading ---------------------------------------------------------------------------------------------
def read_header(path: Path) -> list[str]:
    """The ROI names of a time series TSV (its first line; XCP-D's ``_hash-`` suffix dropped).

    Raises:
        DataError: an unreadable or empty file, an unnamed column, a name used twice.
    """
    try:
        with open(path, encoding="utf-8") as f:
            line = f.readline().rstrip("\r\n")
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: cannot read it ({exc})") from exc
    columns = line.split("\t") if line.strip() else []
    if not columns:
        raise DataError(f"{path} has no header; a time series TSV has one column per ROI, named in its first line")
    unnamed = [i for i, c in enumerate(columns) if not c.strip()]
    if unnamed:
        raise DataError(f"{path}: column {unnamed[0]} has no name (an index column written by pandas?). Fix: write "
                        "the table with one named column per ROI and no index (DataFrame.to_csv(sep='\\t', index=False))")
    names = [_HASH_SUFFIX.sub("", c.strip().strip('"')) for c in columns]
    if len(set(names)) != len(names):
        dup = sorted({n for n in names if names.count(n) > 1})
        raise DataError(f"{path}: ROI name(s) {dup[:5]} appear more than once in the header")
    return names


def read_series(path: Path, names: Sequence[str]) -> np.ndarray:
    """The time series of one run, ``(n_rois, n_trs)`` float64 (the file is TR-first; ``names``: its ROIs).

    Raises:
        DataError: a non-numeric value, fewer than 2 rows, an ROI or TR that is ``n/a`` (named).
    """
    try:
        df = pd.read_csv(path, sep="\t", dtype=np.float64, na_values=["n/a"])
    except ValueError as exc:
        raise DataError(f"{path} holds a value that is not a number ({exc}); a time series TSV holds numbers "
                        "(n/a where missing)") from exc
    x = df.to_numpy(dtype=np.float64).T
    if x.shape[0] != len(names) or x.shape[1] < 2:
        raise DataError(f"{path}: {x.shape[1]} TR(s) of {x.shape[0]} ROIs; expected at least 2 TRs of {len(names)} ROIs")
    bad = ~np.isfinite(x)
    if bad.any():
        roi, trs = int(np.flatnonzero(bad.any(axis=1))[0]), np.flatnonzero(bad.any(axis=0))
        every = bad[roi].all()
        raise DataError(
            f"{path}: ROI {names[roi]!r} (column {roi}) is n/a {'at every TR' if every else f'at TR(s) {trs[:8].tolist()}'}"
            f" ({int(bad.any(axis=1).sum())} ROI(s) in all). "
            + ("XCP-D writes n/a for parcels below its --min-coverage. Fix: run the pipeline with a lower coverage "
               "threshold, or import an atlas whose parcels the runs cover" if every else
               "Fix: interpolate or censor these TRs in the pipeline; brainfm stores finite runs"))
    return x


def _read_table(path: Path) -> pd.DataFrame:
    try:
        return pd.read_csv(path, sep="\t", na_values=["n/a"])
    except (OSError, ValueError, pd.errors.ParserError, pd.errors.EmptyDataError) as exc:
        raise DataError(f"{path}: cannot read it as a tab-separated table ({exc})") from exc


def read_fd(path: Path) -> np.ndarray:
    """``framewise_displacement`` (mm) of a confounds/motion file, ``(n_trs,)`` float64, ``n/a`` -> 0.

    Raises:
        DataError: no such column, non-numeric values.
    """
    df = _read_table(path)
    if FD_COLUMN not in df.columns:
        raise DataError(f"{path} has no {FD_COLUMN!r} column (columns: {list(df.columns)[:12]}); XCP-D's *_motion.tsv "
                        "and fMRIPrep's *_desc-confounds_timeseries.tsv have one")
    fd = pd.to_numeric(df[FD_COLUMN], errors="coerce")
    if (fd.isna() & df[FD_COLUMN].notna()).any():
        raise DataError(f"{path}: column {FD_COLUMN!r} holds values that are not numbers (mm)")
    return fd.fillna(0.0).to_numpy(dtype=np.float64)


def read_outliers(path: Path) -> np.ndarray:
    """XCP-D's ``*_outliers.tsv``: ``(n_trs,)`` bool, True where a column flags the TR (1).

    Raises:
        DataError: an empty or non-numeric table.
    """
    df = _read_table(path)
    values = df.apply(pd.to_numeric, errors="coerce")
    if df.shape[1] == 0 or values.isna().to_numpy().any():
        raise DataError(f"{path}: expected XCP-D's outliers table (columns of 0/1, one row per TR)")
    return (values.to_numpy() != 0).any(axis=1)


def restore_removed(x: np.ndarray, removed: np.ndarray) -> np.ndarray:
    """Put a run whose ``removed`` TRs were dropped (XCP-D ``linc`` mode) back on its full grid: ``x``
    ``(n_rois, n_kept)`` -> ``(n_rois, len(removed))``, the removed TRs interpolated linearly in time between
    their kept neighbours (the first/last kept value before/after them)."""
    t = np.arange(len(removed))
    kept = t[~removed]
    return np.stack([np.interp(t, kept, row) for row in x])


def participant_labels(path: Path, subjects: Sequence[str], columns: Sequence[str] | None) -> dict[str, np.ndarray]:
    """Per-subject labels from a BIDS ``participants.tsv``: ``{column: values in subjects' order}``, numbers as
    float64 (NaN where ``n/a``), other columns as strings (``""`` where ``n/a``). Subjects the table lacks get
    missing values (logged).

    Raises:
        DataError: no ``participant_id`` column, a requested column it lacks, an id listed twice.
    """
    header = list(_read_table(path).columns)
    if "participant_id" not in header:
        raise DataError(f"{path} has no 'participant_id' column (columns: {header[:12]}); a BIDS participants.tsv "
                        "names each subject sub-<label> there")
    available = [c for c in header if c != "participant_id"]
    wanted = list(available if columns is None else columns)
    missing = [c for c in wanted if c not in available]
    if missing:
        raise DataError(f"{path} has no column(s) {missing}; columns: {available}. Fix: --labels {' '.join(available[:3])}")
    if not wanted:
        return {}
    table = {"participants": {"file": str(path), "id_column": "participant_id", "columns": {c: c for c in wanted}}}
    frame, _, _ = read_phenotype_tables(table, wanted)
    absent = [s for s in dict.fromkeys(subjects) if s not in frame.index]
    if absent:
        log.warning("%s lists no row for %d subject(s) of the time series (e.g. %s); their labels are missing",
                    path, len(absent), absent[:5])
    rows = frame.reindex(list(subjects))
    out = {}
    for column in wanted:
        raw = rows[column]
        numbers = pd.to_numeric(raw, errors="coerce")
        if (numbers.isna() == raw.isna()).all() and raw.notna().any():
            out[column] = numbers.to_numpy(dtype=np.float64)
        else:
            out[column] = np.array(["" if pd.isna(v) else str(v) for v in raw], dtype=object)
    return out


def _pipeline(root: Path) -> str:
    """``Name version`` of the pipeline from ``dataset_description.json`` (``GeneratedBy``), or ``""``."""
    desc = root / "dataset_description.json"
    try:
        data = json.loads(desc.read_text()) if desc.is_file() else {}
    except (OSError, ValueError):
        return ""
    generated = [g for g in data.get("GeneratedBy", []) if isinstance(g, dict)] if isinstance(data, dict) else []
    return " ".join(str(generated[0].get(k, "")) for k in ("Name", "Version")).strip() if generated else ""


# -- the import ------------------------------------------------------------------------------------------
def import_bids_timeseries(derivatives: str | os.PathLike, atlas: str, out: str | os.PathLike, *,
                           space: str | None = None, tasks: Sequence[str] | None = None, tr: float | None = None,
                           events_dir: str | os.PathLike | None = None, confounds_dir: str | os.PathLike | None = None,
                           participants: str | os.PathLike | None = None, labels: Sequence[str] | None = None,
                           fd_threshold: float | None = None, shift_s: float = 0.0) -> ImportReport:
    """Write the parcellated time series of ``atlas`` under ``derivatives`` as one ROI store ``out`` (module
    docstring), atomically: ``/timeseries/<atlas>`` ``(n_runs, n_rois, T_max)``, ids, TR, ROI names, per-run
    statistics, ``/labels/<participants.tsv column>``, ``/trial_labels/task`` from events, ``/censored_trs``.

    Args:
        derivatives: the derivatives folder (XCP-D's output). atlas: its ``seg-``/``atlas-`` value.
        out: the ``.h5`` file to create (an existing file is not overwritten).
        space: the ``space-`` to import when the atlas comes in several. tasks: import these tasks only.
        tr: seconds, for runs whose sidecars record none (a sidecar that disagrees is refused).
        events_dir: the raw BIDS data set (events.tsv, participants.tsv, BOLD sidecars); default: ``derivatives``.
        confounds_dir: where the motion/confounds files are (e.g. fMRIPrep's derivatives); default: ``derivatives``.
        participants: a ``participants.tsv`` (default: the one of ``events_dir``, else of ``derivatives``).
        labels: its columns to store (default: every column).
        fd_threshold: mm; TRs with a larger framewise displacement are censored. None: no FD censoring.
        shift_s: haemodynamic shift (s) applied to the trial labels now (default 0: stimulus-locked, shifted
            when read by ``data.trial_labels.shift_s``; HCP 2.88, MDTB 3).

    Returns:
        :class:`ImportReport`.

    Raises:
        DataError: ``out`` exists; the problems of the module docstring (file and fix named); a negative
            ``fd_threshold`` or non-positive ``tr``.
    """
    root, out = Path(derivatives), Path(out)
    raw = Path(events_dir) if events_dir is not None else None
    confound_root = Path(confounds_dir) if confounds_dir is not None else root
    for name, folder in (("--events-dir", raw), ("--confounds-dir", Path(confounds_dir) if confounds_dir else None)):
        if folder is not None and not folder.is_dir():
            raise DataError(f"{name} {folder} does not exist (or is not a folder)")
    if out.exists():
        raise DataError(f"{out} already exists; brainfm does not overwrite a store. Fix: remove it or choose another --out")
    if fd_threshold is not None and not fd_threshold >= 0:
        raise DataError(f"--fd-threshold {fd_threshold} must be >= 0 mm (e.g. 0.5)")
    if tr is not None and not tr > 0:
        raise DataError(f"--tr {tr} must be a positive number of seconds")

    runs = find_series(root, atlas, space, tasks)
    # pass 1: headers and sidecars (cheap), so that a disagreement stops the import before any data is read
    first = runs[0]
    for run in runs:
        run.roi_names = read_header(run.path)
        if run.roi_names != first.roi_names:
            diff = next((i for i, (a, b) in enumerate(zip(run.roi_names, first.roi_names)) if a != b),
                        min(len(run.roi_names), len(first.roi_names)))
            raise DataError(
                f"{run.path} has other ROIs than {first.path}: {len(run.roi_names)} vs {len(first.roi_names)} columns, "
                f"first difference at column {diff} ({_at(run.roi_names, diff)!r} vs {_at(first.roi_names, diff)!r}). "
                "An ROI store holds one ROI order; Fix: re-run the pipeline for these runs with the same atlas, or "
                "import them separately")
        found, source = run_tr(run, raw)
        if found is not None and tr is not None and not math.isclose(found, tr, abs_tol=1e-3):
            raise DataError(f"TR mismatch: {source} records {found:g} s for {run.subject} {run.run_id} but --tr {tr:g}. "
                            "Fix: leave --tr out (the sidecar's TR is used), or correct the sidecar")
        if found is None and tr is None:
            raise DataError(
                f"no repetition time for {run.path}: neither its sidecar ({run.path.with_suffix('.json').name}: "
                "RepetitionTime or a numeric SamplingFrequency), nor a *_bold.json of the run beside it"
                + (f", nor the run's *_bold.json in {raw} (BIDS inheritance)" if raw else "")
                + " records one. Fix: --tr <seconds>" + ("" if raw else ", or --events-dir <raw BIDS data set>"))
        run.tr, run.tr_source = (found, source) if found is not None else (float(tr), "--tr")
        if abs(run.tr - first.tr) > TR_TOLERANCE_S:
            raise DataError(f"{run.path} has TR {run.tr:g} s ({run.tr_source}) but {first.path} {first.tr:g} s "
                            f"({first.tr_source}); an ROI store holds one TR. Fix: import each TR separately "
                            "(--task, --space), or resample one store later (brainfm-data resample)")

    event_index = _index(raw or root, "*_events.tsv", "events")
    for run in runs:
        run.events = _inherited(event_index, run.key, "events.tsv")
    outlier_index = _index(root, "*_outliers.tsv", "outliers")
    confound_index = [] if fd_threshold is None else [
        (e, p) for pattern in ("*_motion.tsv", "*_desc-confounds_*.tsv") for e, p in _index(confound_root, pattern)
        if (e.get("suffix"), e.get("desc")) in CONFOUND_FILES]
    participants_file = Path(participants) if participants is not None else next(
        (d / "participants.tsv" for d in (raw, root) if d is not None and (d / "participants.tsv").is_file()), None)
    if participants_file is not None and not participants_file.is_file():
        raise DataError(f"--participants {participants_file} does not exist")
    if participants_file is None and labels:
        raise DataError(f"--labels {' '.join(labels)}: no participants.tsv in {raw or root}. Fix: --participants <file>")
    per_run_labels = {} if participants_file is None else participant_labels(
        participants_file, [r.subject for r in runs], labels)

    names = first.roi_names
    censored, n_fd, n_removed = [], 0, 0
    attrs = {"source": "BIDS derivatives (brainfm-data import)", "derivatives": str(root.resolve()),
             "pipeline": _pipeline(root), "space": str(first.ents.get("space", "")), "tr_source": _tr_sources(runs),
             "fd_threshold_mm": np.nan if fd_threshold is None else float(fd_threshold)}
    with atomic_path(out) as tmp:
        with ROIStoreWriter(tmp, first.tr, {atlas: names}, attrs=attrs) as writer:
            for i, run in enumerate(runs):
                x = read_series(run.path, names)
                removed = _removed_trs(run, x.shape[1], outlier_index)
                if removed is not None:
                    x = restore_removed(x, removed)
                cut = np.zeros(x.shape[1], dtype=bool) if removed is None else removed.copy()
                n_removed += int(cut.sum())
                if fd_threshold is not None:
                    above = _fd(run, x.shape[1], confound_index, confound_root) > float(fd_threshold)
                    n_fd += int((above & ~cut).sum())
                    cut |= above
                censored.append(np.flatnonzero(cut))
                writer.append(run.subject, run.run_id, {atlas: x}, {k: v[i] for k, v in per_run_labels.items()})
        classes: list[str] = []
        events = {i: run.events for i, run in enumerate(runs) if run.events is not None}
        if events:
            classes = add_trial_labels_from_events(tmp, events, name="task", shift_s=float(shift_s))
        else:
            log.info("no *_events.tsv for any run under %s: no trial labels written", raw or root)
        if any(len(c) for c in censored) or fd_threshold is not None:
            write_censored_trs(tmp, censored, attrs={
                "fd_threshold_mm": np.nan if fd_threshold is None else float(fd_threshold),
                "n_above_fd_threshold": n_fd, "n_removed_by_pipeline": n_removed,
                "source": "framewise_displacement of the runs' motion/confounds files; TRs the pipeline removed "
                          "(XCP-D outliers.tsv)"})
    return ImportReport(out, atlas, first.ents.get("space"), len(runs), sorted({r.subject for r in runs}), first.tr,
                        _tr_sources(runs), len(names), list(per_run_labels), list(classes), len(events),
                        None if fd_threshold is None else float(fd_threshold), n_fd, n_removed,
                        sum(1 for c in censored if len(c)))


def _tr_sources(runs: Sequence[SeriesRun]) -> str:
    """Where the runs' TR came from, in words: ``sidecars of 5 run(s), e.g. <file>; --tr for 2 run(s)``."""
    sidecar = [r for r in runs if r.tr_source != "--tr"]
    parts = [f"sidecars of {len(sidecar)} run(s), e.g. {sidecar[0].tr_source}"] if sidecar else []
    if len(sidecar) < len(runs):
        parts.append(f"--tr for {len(runs) - len(sidecar)} run(s)")
    return "; ".join(parts)


def _at(names: list[str], i: int) -> str:
    return names[i] if i < len(names) else "<none>"


def _removed_trs(run: SeriesRun, n_rows: int, outlier_index: list[tuple[dict, Path]]) -> np.ndarray | None:
    """The TRs the pipeline removed from this run (XCP-D ``linc``: the outliers of ``*_outliers.tsv`` when the
    series is that much shorter), ``(n_acquired,)`` bool, or None when the series is complete.

    Raises:
        DataError: a series whose length matches neither its outliers table nor the outliers kept.
    """
    match = _exact(outlier_index, run.key)
    if not match:
        return None
    path = match[0][1]
    outliers = read_outliers(path)
    if n_rows == len(outliers):
        return None  # every TR is there (XCP-D abcd/hbcd modes interpolate the outliers instead)
    if n_rows == int((~outliers).sum()):
        return outliers
    raise DataError(f"{run.path} has {n_rows} TRs but {path} lists {len(outliers)} ({int((~outliers).sum())} kept); "
                    "they are not one run. Fix: import the outputs of one pipeline run")


def _fd(run: SeriesRun, n_trs: int, confound_index: list[tuple[dict, Path]], where: Path) -> np.ndarray:
    """Framewise displacement (mm) of one run, ``(n_trs,)``.

    Raises:
        DataError: no confounds/motion file of the run, or one of another length.
    """
    match = _exact(confound_index, run.key)
    if not match:
        raise DataError(
            f"--fd-threshold: no motion file of {run.subject} {run.run_id} under {where} (XCP-D *_motion.tsv or "
            "fMRIPrep *_desc-confounds_timeseries.tsv with the run's entities). Fix: --confounds-dir <the folder with "
            "them> (e.g. fMRIPrep's derivatives), or leave --fd-threshold out")
    match.sort(key=lambda ep: CONFOUND_FILES.index((ep[0].get("suffix"), ep[0].get("desc"))))
    path = match[0][1]
    fd = read_fd(path)
    if len(fd) != n_trs:
        raise DataError(f"{path} has {len(fd)} rows but {run.path} {n_trs} TRs; framewise displacement must be given for "
                        "every TR of the run (a pipeline that dropped leading volumes? drop the same rows from the "
                        "motion file)")
    return fd
