"""HDF5 store of parcellated BOLD time series (ROI x TR), in the Brain-Semantoks layout.

Layout (one row per subject run)::

    /timeseries/<atlas>   float32 (n_runs, n_rois, n_timepoints), NaN-padded after each run's end
                          attrs: roi_names (ROI order), tr (s, optional if on the file root)
    /long_subject_id      bytes (n_runs,)     subject identifier of each row
    /run_id               bytes (n_runs,)     run/session label of each row (brainfm; optional)
    /ts_len               int32 (n_runs,)     valid TRs of each row (optional: else found from NaNs)
    /labels/<name>        (n_runs,)           optional phenotype labels
    /trial_labels/<name>  int64 (n_runs, T_max) optional per-TR labels (mental state / trial type) of each
                          TR, -1 = no label (and after the run's end); attrs: classes (class names, in
                          class-index order), shift_s (haemodynamic shift in seconds already applied;
                          brainfm.data.trial_labels writes them from BIDS events.tsv tables)
    /censored_trs/tr, /offsets
                          int32 (n_censored,), int64 (n_runs + 1,): the censored TRs of every run (row ``r``:
                          ``tr[offsets[r]:offsets[r + 1]]``, sorted TR indices), optional; windows holding one
                          are skipped when read (brainfm.data.windows.skip_censored). attrs: fd_threshold_mm
                          (NaN: none), n_above_fd_threshold, n_removed_by_pipeline, source. Written by
                          ``brainfm-data import`` (motion censoring, brainfm.data.preprocess.bids_timeseries)
    /run_stats/<atlas>/mean, /std
                          float64 (n_runs, n_rois) per-run mean and standard deviation of every ROI
                          over the run's TRs (brainfm; optional: ``brainfm-data index`` adds them)
    root attrs: tr (repetition time, seconds), plus free provenance (source, version, sha256)

This is the layout of SamGijsen/Brain-Semantoks (``data/dataset.py``: ``timeseries/<atlas>``,
``long_subject_id``, ``ts_len``, NaN padding). brainfm adds the TR and the ROI order as
attributes, because a TR or ROI-order mismatch between pretraining and downstream data is the most
common silent error in the reference projects, and the per-run statistics, so that per-run
z-scoring and pooled (global) statistics need no pass over the data: the file is its own run index.
Opening reads the ids and lengths only; a run's statistics are read (or, in a file without them,
computed from the run) the first time a process needs them, in a bounded cache.

Several atlases of one file (Brain-Semantoks: ``timeseries/schaefer400``, ``tian3``, ``buckner7``)
are read as one ROI axis with ``atlas=[...]`` (``data.atlas=[schaefer400,tian3,buckner7]``: 457 ROIs
in the network map's order), each window one chunked read per atlas, each atlas with its own
statistics; an atlas the file lacks is read as zeros and flagged by :attr:`ROIStore.roi_mask` (the
datasets put it in the batch as ``roi_mask``; SemantoksEncoder masks those networks' tokens).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from brainfm.data.stores.base import LRUCache, StoreBase, cache_sizes, ensure_out
from brainfm.data.stores.kinds import wrong_kind_message
from brainfm.errors import DataError
from brainfm.io import PendingFile

log = logging.getLogger(__name__)

LAYOUT_VERSION = 1
STATS_GROUP = "run_stats"
#: ROI counts of the atlases a multi-atlas read (``data.atlas=[...]``) may find missing from a file
#: (read as zeros, masked): Schaefer 2018 (100-1000 parcels), Tian 2020 subcortex S1-S4 (16, 32, 50, 54),
#: Buckner 2011 cerebellum (7, 17 networks). Others: ``<name>:<n_rois>`` in the list.
KNOWN_ATLAS_ROIS = {**{f"schaefer{n}": n for n in range(100, 1001, 100)},
                    "tian1": 16, "tian2": 32, "tian3": 50, "tian4": 54, "buckner7": 7, "buckner17": 17}
#: the group of per-TR labels, ``/trial_labels/<name>`` (n_runs, T_max) int64, -1 = no label
TRIAL_LABELS_GROUP = "trial_labels"
#: the group of censored TRs (module docstring): ``tr`` and ``offsets``, one sorted list of TR indices per run
CENSORED_GROUP = "censored_trs"


def _decode(values) -> list[str]:
    return [v.decode("utf-8") if isinstance(v, bytes) else str(v) for v in values]


def run_moments(data: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-ROI mean and standard deviation (float64) of one run ``(n_rois, T)``."""
    x = np.asarray(data, dtype=np.float64)
    return x.mean(axis=1), x.std(axis=1)


def _label_array(values) -> np.ndarray:
    """Per-run labels as an array h5py can write: strings as variable-length UTF-8."""
    arr = np.asarray(values)
    return arr.astype(h5py.string_dtype()) if arr.dtype.kind in "UO" else arr


class ROIStoreWriter:
    """Write an ROI store run by run, in bounded memory, atomically.

    Runs are appended to resizable data sets of a temporary file beside ``path`` (``.<name>.tmp-...``),
    which is renamed to ``path`` by :meth:`close` (or the ``with`` block) only when everything is
    written; an exception (or a kill) leaves no file at ``path``. Only the ids, lengths and labels
    (one scalar per run) are kept in memory. Time is padded with NaN up to the longest run.

    Args:
        path: destination ``.h5`` file. tr: repetition time in seconds.
        roi_names: atlas name -> ROI names in the order of the rows of each run's array.
        attrs: extra root attributes (provenance).

    Raises:
        DataError: a non-positive TR; from :meth:`append`: a run of another ROI count, a run whose atlases
            disagree on its length, or non-finite values inside a run (named).
    """

    def __init__(self, path: str | os.PathLike, tr: float, roi_names: Mapping[str, Sequence[str]],
                 attrs: Mapping[str, object] | None = None, time_chunk: int = 512) -> None:
        self.path = Path(path)
        if tr is None or not np.isfinite(tr) or tr <= 0:
            raise DataError(f"{self.path}: the repetition time must be a positive number of seconds, got {tr!r}")
        if not roi_names:
            raise DataError(f"{self.path}: give the ROI names of at least one atlas")
        self.tr = float(tr)
        self.roi_names = {a: [str(n) for n in names] for a, names in roi_names.items()}
        self._pending = PendingFile(self.path)  # makes the parent folder
        self.tmp = self._pending.tmp
        self._file = h5py.File(self.tmp, "w")
        f = self._file
        f.attrs["tr"] = self.tr
        f.attrs["brainfm_layout_version"] = LAYOUT_VERSION
        for key, value in (attrs or {}).items():
            f.attrs[key] = value
        self._ts, self._mean, self._std = {}, {}, {}
        for atlas, names in self.roi_names.items():
            n = len(names)
            ds = f.create_dataset(f"timeseries/{atlas}", shape=(0, n, 0), maxshape=(None, n, None), dtype=np.float32,
                                  chunks=(1, n, int(time_chunk)), fillvalue=np.nan)
            ds.attrs["roi_names"] = np.array(names, dtype=h5py.string_dtype())
            ds.attrs["tr"] = self.tr
            self._ts[atlas] = ds
            for key, store in (("mean", self._mean), ("std", self._std)):
                store[atlas] = f.create_dataset(f"{STATS_GROUP}/{atlas}/{key}", shape=(0, n), maxshape=(None, n),
                                                dtype=np.float64, chunks=(64, n))
        self.subject_ids: list[str] = []
        self.run_ids: list[str] = []
        self.lengths: list[int] = []
        self.labels: dict[str, list] = {}
        self._closed = False

    def __len__(self) -> int:
        return len(self.lengths)

    def append(self, subject: str, run: str, series: Mapping[str, np.ndarray],
               labels: Mapping[str, Any] | None = None) -> None:
        """Add one run: ``series`` maps every atlas to its ``(n_rois, n_timepoints)`` array.

        Raises:
            DataError: a missing atlas, a wrong ROI count, atlases of different lengths, non-finite values.
        """
        where = f"{self.path}: run {len(self)} (subject {subject}, {run})"
        if set(series) != set(self._ts):
            raise DataError(f"{where} has atlases {sorted(series)}, the file {sorted(self._ts)}")
        lengths = set()
        for atlas, arr in series.items():
            arr = np.asarray(arr)
            n = len(self.roi_names[atlas])
            if arr.ndim != 2 or arr.shape[0] != n:
                raise DataError(f"{where} of atlas {atlas!r} has shape {arr.shape}, expected ({n} ROIs, n_timepoints)")
            if not np.isfinite(arr).all():
                raise DataError(f"{where} of atlas {atlas!r} has non-finite values; interpolate or censor them "
                                "before writing the store")
            lengths.add(int(arr.shape[1]))
        if len(lengths) != 1:
            raise DataError(f"{where}: atlases disagree on run lengths ({sorted(lengths)})")
        t = lengths.pop()
        i = len(self)
        for atlas, arr in series.items():
            ds = self._ts[atlas]
            if t > ds.shape[2]:
                ds.resize(t, axis=2)
            ds.resize(i + 1, axis=0)
            ds[i, :, :t] = np.asarray(arr, dtype=np.float32)
            mean, std = run_moments(arr)
            for store, value in ((self._mean, mean), (self._std, std)):
                store[atlas].resize(i + 1, axis=0)
                store[atlas][i] = value
        self.subject_ids.append(str(subject))
        self.run_ids.append(str(run))
        self.lengths.append(t)
        for name, value in (labels or {}).items():
            self.labels.setdefault(name, [None] * i).append(value)
        for name, values in self.labels.items():
            if len(values) < i + 1:
                values.append(None)

    def close(self) -> Path:
        """Write the ids, lengths and labels, then rename the file into place.

        Raises:
            DataError: no run was appended, or a label missing for some runs.
        """
        if self._closed:
            return self.path
        f = self._file
        try:
            if not len(self):
                raise DataError(f"{self.path}: no run was written")
            f.create_dataset("long_subject_id", data=np.array([s.encode() for s in self.subject_ids]))
            f.create_dataset("run_id", data=np.array([s.encode() for s in self.run_ids]))
            f.create_dataset("ts_len", data=np.asarray(self.lengths, dtype=np.int32))
            for name, values in self.labels.items():
                if any(v is None for v in values):
                    raise DataError(f"{self.path}: label {name!r} is missing for some runs")
                f.create_dataset(f"labels/{name}", data=_label_array(values))
            f.close()
            self._pending.commit()
        finally:
            self._closed = True
            if f.id.valid:
                f.close()
            self._pending.discard()
        return self.path

    def abort(self) -> None:
        """Drop the temporary file (nothing is written at ``path``)."""
        self._closed = True
        if self._file.id.valid:
            self._file.close()
        self._pending.discard()

    def __enter__(self) -> "ROIStoreWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def write_roi_h5(
    path: str | os.PathLike,
    series: Mapping[str, Sequence[np.ndarray]],
    subject_ids: Sequence[str],
    tr: float,
    roi_names: Mapping[str, Sequence[str]],
    run_ids: Sequence[str] | None = None,
    labels: Mapping[str, Sequence] | None = None,
    attrs: Mapping[str, object] | None = None,
) -> Path:
    """Write ROI time series held in memory to ``path`` atomically (through :class:`ROIStoreWriter`).

    Args:
        path: destination ``.h5`` file.
        series: atlas name -> one array per run, each ``(n_rois, n_timepoints_run)``; runs of
            different lengths are NaN-padded to the longest.
        subject_ids: subject id of each run (``len == n_runs``).
        tr: repetition time in seconds.
        roi_names: atlas name -> ROI names in the order of the rows of each array.
        run_ids: optional run label of each row (e.g. ``"REST1_LR"``; default ``run<i>``).
        labels: optional label name -> one value per run.
        attrs: extra root attributes (provenance).

    Raises:
        DataError: inconsistent lengths, ROI counts, or non-finite values inside a run.
    """
    path = Path(path)
    n_runs = len(subject_ids)
    for atlas, runs in series.items():
        if len(runs) != n_runs:
            raise DataError(f"{path}: atlas {atlas!r} has {len(runs)} runs but {n_runs} subject ids")
    run_ids = list(run_ids) if run_ids is not None else [f"run{i}" for i in range(n_runs)]
    with ROIStoreWriter(path, tr, {a: roi_names[a] for a in series}, attrs) as writer:
        for i in range(n_runs):
            writer.append(subject_ids[i], run_ids[i], {a: runs[i] for a, runs in series.items()},
                          {k: v[i] for k, v in (labels or {}).items()})
    return path


def add_run_stats(path: str | os.PathLike, atlas: str | None = None, chunk_runs: int = 256) -> int:
    """Compute and add the per-run statistics (``/run_stats/<atlas>/mean|std``) to an ROI store that
    lacks them (``brainfm-data index rois.h5``), reading the runs in chunks; each data set is written
    under a temporary name and moved into place when complete.

    Returns:
        The number of atlases whose statistics were added.

    Raises:
        DataError: non-finite values inside a run (named), an unreadable file.
    """
    added = 0
    with h5py.File(path, "a") as f:
        atlases = [atlas] if atlas else sorted(f["timeseries"].keys())
        for name in atlases:
            if f"{STATS_GROUP}/{name}/mean" in f and f"{STATS_GROUP}/{name}/std" in f:
                continue
            ds = f[f"timeseries/{name}"]
            lengths = _lengths(f, ds, path)
            n_runs, n_rois = ds.shape[0], ds.shape[1]
            tmp_mean = f.create_dataset(f"{STATS_GROUP}/{name}/.mean.tmp", shape=(n_runs, n_rois), dtype=np.float64)
            tmp_std = f.create_dataset(f"{STATS_GROUP}/{name}/.std.tmp", shape=(n_runs, n_rois), dtype=np.float64)
            ids = _decode(f["long_subject_id"][:])
            for r0 in range(0, n_runs, chunk_runs):
                block = ds[r0:r0 + chunk_runs]
                for k, data in enumerate(block):
                    run = r0 + k
                    valid = data[:, : lengths[run]]
                    if not np.isfinite(valid).all():
                        trs = np.unique(np.nonzero(~np.isfinite(valid))[1])
                        raise DataError(f"{path}: NaN/inf inside subject {ids[run]} (row {run}) of atlas {name!r} at "
                                        f"TR(s) {', '.join(map(str, trs[:8]))}. Fix: interpolate or censor these frames")
                    tmp_mean[run], tmp_std[run] = run_moments(valid)
            f.move(f"{STATS_GROUP}/{name}/.mean.tmp", f"{STATS_GROUP}/{name}/mean")
            f.move(f"{STATS_GROUP}/{name}/.std.tmp", f"{STATS_GROUP}/{name}/std")
            added += 1
    return added


def write_trial_labels(path: str | os.PathLike, name: str, labels: Sequence[np.ndarray] | np.ndarray,
                       classes: Sequence[str], shift_s: float = 0.0) -> Path:
    """Add (or replace) per-TR labels ``/trial_labels/<name>`` to an ROI store.

    Args:
        path: the ``.h5`` store. name: label name (``task``: the tar converter's and ``task=decoding``'s).
        labels: one int array per run (store row order; any sequence with ``len`` and indexing, read one
            run at a time), ``(T_run,)`` class indices, -1 = no label; a run's array may be shorter than the
            file's time axis (the rest is -1), or a ``(n_runs, T)`` array.
        classes: class names, in class-index order. shift_s: the haemodynamic shift (seconds) the labels
            already include (recorded, so that ``data.trial_labels.shift_s`` adds only the rest).

    The data set is written under a temporary name in the file and moved into place when complete.

    Raises:
        DataError: not one label array per run, a run with labels beyond its last TR, class indices
            outside ``[-1, len(classes))``.
    """
    path = Path(path)
    with h5py.File(path, "a") as f:
        ds = f[f"timeseries/{min(f['timeseries'].keys())}"]
        n_runs, n_t = int(ds.shape[0]), int(ds.shape[2])
        lengths = _lengths(f, ds, path)
        if len(labels) != n_runs:
            raise DataError(f"{path}: {len(labels)} runs of trial labels {name!r} for {n_runs} runs in the file; "
                            "give one label array per row, in row order")
        tmp = f"{TRIAL_LABELS_GROUP}/.{name}.tmp"
        if tmp in f:
            del f[tmp]
        # row by row into a chunked data set: memory of one run, whatever the number of runs
        d = f.create_dataset(tmp, shape=(n_runs, n_t), dtype=np.int64, chunks=(1, max(1, n_t)), fillvalue=-1)
        for run in range(n_runs):
            values = np.asarray(labels[run], dtype=np.int64).reshape(-1)
            if len(values) > n_t or (values[int(lengths[run]):] >= 0).any():
                del f[tmp]
                raise DataError(f"{path}: trial labels {name!r} of row {run} label TRs after its last TR "
                                f"({int(lengths[run])}); cut them to the run's length")
            if len(values) and (values.min() < -1 or values.max() >= len(classes)):
                del f[tmp]
                raise DataError(f"{path}: trial labels {name!r} of row {run} hold class indices outside "
                                f"[-1, {len(classes)}) (classes {list(classes)})")
            if len(values):
                d[run, : len(values)] = values
        d.attrs["classes"] = np.array([str(c) for c in classes], dtype=h5py.string_dtype())
        d.attrs["shift_s"] = float(shift_s)
        if f"{TRIAL_LABELS_GROUP}/{name}" in f:
            del f[f"{TRIAL_LABELS_GROUP}/{name}"]
        f.move(tmp, f"{TRIAL_LABELS_GROUP}/{name}")
    return path


def write_censored_trs(path: str | os.PathLike, censored: Sequence[np.ndarray],
                       attrs: Mapping[str, object] | None = None) -> Path:
    """Add (or replace) the censored TRs ``/censored_trs`` of an ROI store (module docstring).

    Args:
        path: the ``.h5`` store. censored: one array of TR indices per row (store row order; any order,
            repeats allowed), e.g. the TRs whose framewise displacement exceeds a threshold.
        attrs: recorded with them (``fd_threshold_mm``, counts, ``source``).

    The group is written under a temporary name in the file and moved into place when complete.

    Raises:
        DataError: not one array per row, TR indices outside a row's run.
    """
    path = Path(path)
    with h5py.File(path, "a") as f:
        ds = f[f"timeseries/{min(f['timeseries'].keys())}"]
        lengths = _lengths(f, ds, path)
        if len(censored) != len(lengths):
            raise DataError(f"{path}: censored TRs of {len(censored)} runs for {len(lengths)} runs in the file; "
                            "give one array per row, in row order")
        runs = [np.unique(np.asarray(c, dtype=np.int64).reshape(-1)) for c in censored]
        for row, trs in enumerate(runs):
            if len(trs) and (trs[0] < 0 or trs[-1] >= lengths[row]):
                raise DataError(f"{path}: censored TRs of row {row} lie outside its {int(lengths[row])} TRs")
        tmp = f".{CENSORED_GROUP}.tmp"
        if tmp in f:
            del f[tmp]
        g = f.create_group(tmp)
        g.create_dataset("tr", data=np.concatenate([np.empty(0, np.int64), *runs]).astype(np.int32))
        g.create_dataset("offsets", data=np.concatenate([[0], np.cumsum([len(r) for r in runs])]).astype(np.int64))
        for key, value in (attrs or {}).items():
            g.attrs[key] = value
        if CENSORED_GROUP in f:
            del f[CENSORED_GROUP]
        f.move(tmp, CENSORED_GROUP)
    return path


def _lengths(f: h5py.File, ds: h5py.Dataset, path) -> np.ndarray:
    n_t = int(ds.shape[2])
    if "ts_len" in f:
        lengths = np.asarray(f["ts_len"][:], dtype=np.int64)
    else:  # as Brain-Semantoks: a run ends at the first NaN of its first ROI
        nan = np.isnan(ds[:, 0, :])
        lengths = np.where(nan.any(axis=1), nan.argmax(axis=1), n_t).astype(np.int64)
    if (lengths < 1).any() or (lengths > n_t).any():
        raise DataError(f"{path}: /ts_len has values outside [1, {n_t}]")
    return lengths


class ROIStore(StoreBase):
    """Lazy reader of the HDF5 ROI store (see the module docstring for the layout).

    Metadata (ids, lengths, TR, ROI names) is read once at construction; the data set is opened on
    first read in each process (safe with forked DataLoader workers). With ``preload=True`` (or
    ``"auto"`` and a file under ``preload_limit_mb``) the whole atlas array is read into memory once.

    Args:
        path: the ``.h5`` file.
        atlas: name under ``/timeseries``; may be omitted when the file holds exactly one. A list of
            names (``data.atlas=[schaefer400, tian3, buckner7]``, Brain-Semantoks' files) reads these
            data sets of the file side by side as one ROI axis, in the list's order (the network
            map's): ROI ``offset_a + i`` is ROI ``i`` of atlas ``a``; ``"a+b+c"`` (:attr:`atlas` of
            such a store, saved with checkpoints) is the same list. Each atlas keeps its own
            statistics (``/run_stats/<atlas>``, or its own run's moments), so z-scoring is per ROI as
            for one atlas. An atlas the file lacks is read as zeros, with ``roi_mask`` False for its
            ROIs (and mean 0 / std 1 statistics, so z-scoring keeps the zeros); its ROI count comes
            from :data:`KNOWN_ATLAS_ROIS` or is given as ``name:n_rois`` (``tian3:50``). At least one
            atlas must be in the file.
        preload: ``True``, ``False`` or ``"auto"``.
        preload_limit_mb: size limit for ``preload="auto"``.
        cache: ``data.cache`` sizes (``run_stats``: runs whose statistics a process keeps).
        atlas_key: how the caller's user sets ``atlas``, for the fixes of messages: ``data.atlas`` (a recipe),
            ``--atlas`` (a command-line tool).

    Raises:
        DataError: ``path`` is a folder (a store of another kind: named, with the recipe that reads it) or
            does not exist, is not HDF5, or lacks the layout (module docstring); atlas problems as named.

    Attributes (multi-atlas): ``atlases`` (the names, in ROI order), ``atlas`` (``"a+b+c"``),
    ``roi_mask`` ``(n_rois,)`` bool, True where the ROI's atlas is in the file (None for one atlas:
    every ROI is read), ``atlas_offsets`` (first ROI of each atlas).

    ``read(run, start, stop, stride)`` returns ``(n, n_rois)`` float32 (time-first). ``run_stats(run)``
    returns ``n`` (TRs), ``mean`` and ``std`` ``(n_rois,)`` float64 over the run's TRs: from
    ``/run_stats`` when the file has them, else computed from the run (which is then checked to be
    finite). ``censored_trs(run)``: the run's censored TRs (``/censored_trs``; ``has_censoring``,
    ``censoring``: its attributes and counts), whose windows the datasets skip.

    Raises:
        DataError: missing or unreadable file (e.g. truncated), missing atlas (for a list: an atlas of
            unknown ROI count, or none of them in the file), inconsistent ids; atlases of a list with
            different run counts, time axes or TRs.
    """

    kind = "roi"

    def __init__(
        self,
        path: str | os.PathLike,
        atlas: str | Sequence[str] | None = None,
        preload: bool | str = "auto",
        preload_limit_mb: float = 512.0,
        cache: Mapping[str, int] | None = None,
        atlas_key: str = "data.atlas",
    ) -> None:
        self.path = self.location = Path(path)
        self.atlas_key = atlas_key
        if self.path.is_dir():
            raise DataError(wrong_kind_message(self.path, "roi")
                            or f"{self.path} is a folder, not an ROI HDF5 file. Fix: data.path=<file.h5>")
        if not self.path.is_file():
            raise DataError(
                f"ROI data file {self.path} does not exist. Fix: for the embedded data set run "
                "`brainfm-data fetch hcp_rest_roi`; for your own data set data.path=<file.h5> "
                "(HDF5 layout in the README, 'Bring your own ROI data')."
            )
        try:
            f = h5py.File(self.path, "r")
        except OSError as exc:
            raise DataError(
                f"{self.path} cannot be opened as HDF5 ({exc}). The file is truncated or not HDF5; "
                "write it again (brainfm writes to a temporary name and renames when done)."
            ) from exc
        with f:
            if "timeseries" not in f or len(f["timeseries"]) == 0:
                raise DataError(
                    f"{self.path} has no /timeseries/<atlas> data set; see 'Bring your own ROI "
                    "data' in the README for the layout"
                )
            atlases = sorted(f["timeseries"].keys())
            if isinstance(atlas, str) and "+" in atlas and atlas not in atlases:  # ``store.atlas`` of a multi-atlas read
                atlas = atlas.split("+")
            if atlas is not None and not isinstance(atlas, str):
                ds = self._select_atlases(f, [str(a) for a in atlas], atlases)
            else:
                ds = self._select_atlas(f, atlas, atlases)
            if "long_subject_id" not in f:
                raise DataError(f"{self.path} has no /long_subject_id data set (one subject id per row)")
            self.subject_ids = _decode(f["long_subject_id"][:])
            if len(self.subject_ids) != self.n_runs:
                raise DataError(
                    f"{self.path}: {len(self.subject_ids)} subject ids for {self.n_runs} rows of "
                    f"/timeseries/{self.atlases[0]}"
                )
            self.run_ids = _decode(f["run_id"][:]) if "run_id" in f else [f"run{i}" for i in range(self.n_runs)]
            self.lengths = _lengths(f, ds, self.path)
            self.has_run_stats = all(f"{STATS_GROUP}/{name}/mean" in f and f"{STATS_GROUP}/{name}/std" in f
                                     for name, _, _, here in self._parts if here)
            self._part_stats = {name: f"{STATS_GROUP}/{name}/mean" in f and f"{STATS_GROUP}/{name}/std" in f
                                for name, _, _, here in self._parts if here}
            self.trial_label_names = sorted(f[TRIAL_LABELS_GROUP].keys()) if TRIAL_LABELS_GROUP in f else []
            self.run_label_names = sorted(f["labels"].keys()) if "labels" in f else []
            self._read_censoring(f)
            self.attrs = {k: (v.item() if hasattr(v, "item") and np.ndim(v) == 0 else v) for k, v in f.attrs.items()}
            size_mb = self.n_runs * self.n_rois * self.n_timepoints * 4 / 2**20
        self.frame_shape = (self.n_rois,)
        if preload == "auto":
            preload = size_mb <= preload_limit_mb
        self._memory: dict[str, np.ndarray] | None = None
        self._file: h5py.File | None = None
        self._pid: int | None = None
        self._stats = LRUCache(cache_sizes(cache)["run_stats"])
        if preload:
            with h5py.File(self.path, "r") as f:
                self._memory = {name: np.asarray(f[f"timeseries/{name}"][:], dtype=np.float32)
                                for name, _, _, here in self._parts if here}

    def _set(self, value: str) -> str:
        """The setting of the atlas to ``value`` as the user types it (``data.atlas=x`` or ``--atlas x``)."""
        return f"{self.atlas_key} {value}" if self.atlas_key.startswith("-") else f"{self.atlas_key}={value}"

    def _select_atlas(self, f: h5py.File, atlas: str | None, available: list[str]) -> h5py.Dataset:
        """One atlas (``data.atlas=<name>``, or the file's only one); returns its data set."""
        if atlas is None:
            if len(available) != 1:
                raise DataError(f"{self.path} holds atlases {available}; choose one with {self._set('<name>')} "
                                f"(or several, read as one ROI axis: {self._set('[a,b,c]')})")
            atlas = available[0]
        if atlas not in available:
            raise DataError(
                f"{self.path} has no atlas {atlas!r} under /timeseries (available: {available}); "
                f"Fix: {self._set(available[0] if len(available) == 1 else '<name>')}"
            )
        self.atlas = atlas
        ds = f[f"timeseries/{atlas}"]
        if ds.ndim != 3:
            raise DataError(
                f"{self.path}:/timeseries/{atlas} has shape {ds.shape}; expected "
                "(n_runs, n_rois, n_timepoints)"
            )
        self.n_runs, self.n_rois, self.n_timepoints = (int(s) for s in ds.shape)
        tr = ds.attrs.get("tr", f.attrs.get("tr"))
        self._tr: float | None = float(tr) if tr is not None else None
        names = ds.attrs.get("roi_names")
        self.roi_names: list[str] | None = _decode(names) if names is not None else None
        if self.roi_names is not None and len(self.roi_names) != self.n_rois:
            raise DataError(
                f"{self.path}: roi_names lists {len(self.roi_names)} names but the data has "
                f"{self.n_rois} ROIs"
            )
        self.atlases, self.atlas_offsets, self.roi_mask = (atlas,), (0,), None
        self._parts: list[tuple[str, int, int, bool]] = [(atlas, self.n_rois, 0, True)]
        return ds

    def _select_atlases(self, f: h5py.File, requested: list[str], available: list[str]) -> h5py.Dataset:
        """Several atlases as one ROI axis (class docstring); returns the first present atlas' data set."""
        if not requested:
            raise DataError(f"{self.path}: {self.atlas_key} is an empty list; name the atlases (e.g. "
                            f"{self._set('[schaefer400,tian3,buckner7]')})")
        parts, offset, first = [], 0, None
        shapes, trs, names, named = {}, {}, [], True
        for entry in requested:
            name, _, count = entry.partition(":")
            if name in [p[0] for p in parts]:
                raise DataError(f"{self.path}: atlas {name!r} is listed twice in {self.atlas_key} {requested}")
            if count and not count.isdigit():
                raise DataError(f"{self.atlas_key} entry {entry!r}: write a missing atlas as <name>:<n_rois> (e.g. tian3:50)")
            if name in available:
                ds = f[f"timeseries/{name}"]
                if ds.ndim != 3:
                    raise DataError(f"{self.path}:/timeseries/{name} has shape {ds.shape}; expected "
                                    "(n_runs, n_rois, n_timepoints)")
                n = int(ds.shape[1])
                if count and int(count) != n:
                    raise DataError(f"{self.path}:/timeseries/{name} has {n} ROIs, {self.atlas_key} says {entry!r}")
                shapes[name] = (int(ds.shape[0]), int(ds.shape[2]))
                tr = ds.attrs.get("tr", f.attrs.get("tr"))
                if tr is not None:
                    trs[name] = float(tr)
                roi = ds.attrs.get("roi_names")
                if roi is None:
                    named = False
                else:
                    roi = _decode(roi)
                    if len(roi) != n:
                        raise DataError(f"{self.path}:/timeseries/{name}: roi_names lists {len(roi)} names for {n} ROIs")
                    names += roi
                first = ds if first is None else first
                parts.append((name, n, offset, True))
            else:
                n = int(count) if count else KNOWN_ATLAS_ROIS.get(name)
                if n is None:
                    raise DataError(
                        f"{self.path} has no atlas {name!r} under /timeseries (available: {available}) and its ROI count "
                        f"is unknown. Fix: correct the name, or give its ROI count to read it as missing (zeros, "
                        f"tokens masked): {self._set(f'[..., {name}:<n_rois>]')}")
                names += [f"{name}:{i}" for i in range(n)]
                parts.append((name, n, offset, False))
            offset += n
        present = [p[0] for p in parts if p[3]]
        if not present:
            raise DataError(f"{self.path} holds none of the atlases {requested} (available: {available}). Fix: "
                            f"{self._set('[' + ','.join(available) + ']')} or the atlases of another file")
        if len(set(shapes.values())) > 1:
            raise DataError(f"{self.path}: atlases {present} differ in (runs, time points) {shapes}; a file holds one "
                            "row per run and one NaN-padded time axis for every atlas")
        if len(set(trs.values())) > 1:
            raise DataError(f"{self.path}: atlases {present} record different TRs {trs}")
        missing = [p[0] for p in parts if not p[3]]
        if missing:
            log.warning("%s has no %s: read as zeros with roi_mask False (their network tokens are masked)",
                        self.path, ", ".join(missing))
        self.n_runs, self.n_timepoints = shapes[present[0]]
        self.n_rois = offset
        self._tr = next(iter(trs.values()), None)
        self.roi_names = names if named else None
        self.atlas = "+".join(p[0] if p[3] or p[0] in KNOWN_ATLAS_ROIS else f"{p[0]}:{p[1]}" for p in parts)
        self.atlases = tuple(p[0] for p in parts)
        self.atlas_offsets = tuple(p[2] for p in parts)
        mask = np.zeros(offset, dtype=bool)
        for _, n, off, here in parts:
            mask[off:off + n] = here
        self.roi_mask = mask
        self._parts = parts
        return first

    # -- the run table -----------------------------------------------------------------------------------
    @property
    def tr(self) -> float | None:
        """The file's repetition time in seconds (one TR per file), or None when it records none."""
        return self._tr

    @tr.setter
    def tr(self, value: float | None) -> None:
        self._tr = None if value is None else float(value)

    @property
    def trs(self) -> np.ndarray:
        """``(n_runs,)`` seconds (the file's one TR; NaN when it records none)."""
        return np.full(self.n_runs, np.nan if self._tr is None else self._tr)

    # -- reading ---------------------------------------------------------------------------------------
    def _open(self) -> h5py.File:
        if self._file is None or self._pid != os.getpid():
            self._file = h5py.File(self.path, "r")
            self._pid = os.getpid()
        return self._file

    def _dataset(self, atlas: str | None = None) -> h5py.Dataset:
        return self._open()[f"timeseries/{atlas or self.atlases[0]}"]

    def _read_part(self, name: str, run: int, sl: slice) -> np.ndarray:
        """``(n_rois_of_atlas, n)`` float32 of one present atlas (memory or one chunked HDF5 read)."""
        if self._memory is not None:
            return self._memory[name][run, :, sl]
        return np.asarray(self._dataset(name)[run, :, sl], dtype=np.float32)

    def read(self, run: int, start: int = 0, stop: int | None = None, stride: int = 1,
             out: np.ndarray | None = None) -> np.ndarray:
        """Raw BOLD of TRs ``start, start + stride, ... < stop`` of one run: ``(n, n_rois)`` float32.

        Raises:
            IndexError: TRs outside the run. ValueError: an ``out`` of the wrong shape.
        """
        frames = self._frames(run, start, stop, stride)
        sl = slice(frames.start, frames.stop, frames.step)
        if len(self._parts) == 1:
            x = self._read_part(self.atlases[0], run, sl)
            if out is None:
                return x.T
            ensure_out(out, (len(frames), self.n_rois), np.float32, self.describe_run(run))[...] = x.T
            return out
        # several atlases side by side: each read on its own (chunked as one), a missing one stays zero
        out = ensure_out(out, (len(frames), self.n_rois), np.float32, self.describe_run(run))
        for name, n, offset, here in self._parts:
            if here:
                out[:, offset:offset + n] = self._read_part(name, run, sl).T
            else:
                out[:, offset:offset + n] = 0.0
        return out

    def run_stats(self, run: int) -> dict[str, Any]:
        """``n`` (TRs), ``mean`` and ``std`` ``(n_rois,)`` float64 of every ROI over the run (class docstring).

        Raises:
            DataError: computed from a run with NaN/inf inside it (subject, ROI and TRs named).
        """
        def load() -> dict[str, Any]:
            n = int(self.lengths[run])
            if len(self._parts) == 1 and not self.has_run_stats:
                data = self.read(run).T
                self.check_finite(run, data)
                mean, std = run_moments(data)
                return {"n": n, "mean": mean, "std": std}
            mean, std = np.zeros(self.n_rois), np.ones(self.n_rois)  # a missing atlas: mean 0, std 1
            for name, k, offset, here in self._parts:
                if not here:
                    continue
                if self._part_stats[name]:
                    f = self._open()
                    mean[offset:offset + k] = f[f"{STATS_GROUP}/{name}/mean"][run]
                    std[offset:offset + k] = f[f"{STATS_GROUP}/{name}/std"][run]
                else:
                    data = self._read_part(name, run, slice(0, n))
                    if not np.isfinite(data).all():
                        self.check_finite(run)
                    mean[offset:offset + k], std[offset:offset + k] = run_moments(data)
            return {"n": n, "mean": mean, "std": std}

        return self._stats.get(run, load)

    def describe_run(self, run: int) -> str:
        return f"subject {self.subject_ids[run]} ({self.run_ids[run]}, row {run})"

    # -- labels (per TR: /trial_labels, per run: /labels) ----------------------------------------------
    def _trial_dataset(self, name: str) -> h5py.Dataset:
        if name not in self.trial_label_names:
            raise DataError(f"{self.path} has no /{TRIAL_LABELS_GROUP}/{name} (per-TR labels: "
                            f"{self.trial_label_names or 'none'}). Fix: set data.trial_labels.name, or add them "
                            "from BIDS events.tsv tables (brainfm.data.trial_labels.add_trial_labels_from_events)")
        return self._open()[f"{TRIAL_LABELS_GROUP}/{name}"]

    def trial_label_info(self, name: str) -> dict[str, Any]:
        """``{"classes": [names], "shift_s": seconds already applied}`` of ``/trial_labels/<name>``.

        Raises:
            DataError: the file has no such labels (the fix named).
        """
        ds = self._trial_dataset(name)
        return {"classes": _decode(ds.attrs.get("classes", [])), "shift_s": float(ds.attrs.get("shift_s", 0.0))}

    def trial_labels(self, run: int, name: str) -> np.ndarray:
        """Per-TR labels of one run, ``(T_run,)`` int64 class indices, -1 = no label.

        Raises:
            DataError: the file has no such labels.
        """
        return np.asarray(self._trial_dataset(name)[run, : int(self.lengths[run])], dtype=np.int64)

    # -- censored TRs (/censored_trs) -----------------------------------------------------------------
    def _read_censoring(self, f: h5py.File) -> None:
        """Load ``/censored_trs`` (small: one int per censored TR) at open."""
        self.has_censoring = CENSORED_GROUP in f
        self.censoring: dict[str, Any] = {}
        self._censored: tuple[np.ndarray, np.ndarray] | None = None
        if not self.has_censoring:
            return
        g = f[CENSORED_GROUP]
        trs, offsets = np.asarray(g["tr"][:], dtype=np.int64), np.asarray(g["offsets"][:], dtype=np.int64)
        if len(offsets) != self.n_runs + 1 or offsets[-1] != len(trs):
            raise DataError(f"{self.path}:/{CENSORED_GROUP} has offsets for {len(offsets) - 1} runs and {len(trs)} TRs; "
                            f"the file has {self.n_runs} runs. Write it again (brainfm-data import)")
        self._censored = (trs, offsets)
        self.censoring = {k: (v.item() if hasattr(v, "item") and np.ndim(v) == 0 else v) for k, v in g.attrs.items()}
        self.censoring["n_censored"] = int(len(trs))
        self.censoring["runs_with_censored"] = int((np.diff(offsets) > 0).sum())

    def censored_trs(self, run: int) -> np.ndarray:
        """Sorted indices ``(n,)`` int64 of the censored TRs of one run (empty in a store without censoring)."""
        if self._censored is None:
            return np.empty(0, dtype=np.int64)
        trs, offsets = self._censored
        return trs[offsets[run]:offsets[run + 1]]

    def run_labels(self, name: str) -> np.ndarray:
        """``/labels/<name>``: one value per run ``(n_runs,)`` (strings decoded).

        Raises:
            DataError: the file has no such labels.
        """
        if name not in self.run_label_names:
            raise DataError(f"{self.path} has no /labels/{name} (per-run labels: {self.run_label_names or 'none'}); "
                            "fix the label name")
        values = self._open()[f"labels/{name}"][:]
        return np.array(_decode(values)) if values.dtype.kind in "SO" else np.asarray(values)

    def check_finite(self, run: int, data: np.ndarray | None = None) -> None:
        """Raise a DataError naming the subject, ROI and TRs if a run has NaN/inf inside it.

        ``data``: the run as ``(n_rois, T)`` (read when None).
        """
        data = self.read(run).T if data is None else data
        bad = ~np.isfinite(data)
        if bad.any():
            rois, trs = np.nonzero(bad)
            roi = int(rois[0])
            roi_name = self.roi_names[roi] if self.roi_names else f"#{roi}"
            frames = np.unique(trs)
            shown = ", ".join(str(t) for t in frames[:8]) + (" ..." if len(frames) > 8 else "")
            raise DataError(
                f"{self.path}: NaN/inf inside {self.describe_run(run)}: ROI {roi_name!r} (index {roi}) "
                f"and {len(np.unique(rois))} ROI(s) in all, at TR(s) {shown} of {self.lengths[run]}. "
                "Fix: interpolate or censor these frames before writing the store; NaN is allowed "
                "only as padding after a run's last TR (set /ts_len)."
            )

    def validate(self, eps: float = 1e-6) -> list[str]:
        """Every problem of the store, for ``brainfm-data validate``: NaN/inf inside a run, an ROI that is
        constant over a run, and stored per-run statistics that no longer match the data (reads every run)."""
        problems = []
        for run in range(self.n_runs):
            data = self.read(run).T
            try:
                self.check_finite(run, data)
            except DataError as exc:
                problems.append(str(exc))
                continue
            mean, std = run_moments(data)
            read = np.ones(self.n_rois, dtype=bool) if self.roi_mask is None else self.roi_mask  # missing atlases: zeros
            if (read & (std < eps)).any():
                roi = int(np.flatnonzero(read & (std < eps))[0])
                name = self.roi_names[roi] if self.roi_names else f"#{roi}"
                problems.append(f"{self.path}: ROI {name!r} is constant in {self.describe_run(run)} "
                                "(z-scoring per run will refuse it)")
            if self.has_run_stats:
                stored = self.run_stats(run)
                if not (np.allclose(stored["mean"][read], mean[read], rtol=1e-5, atol=1e-6)
                        and np.allclose(stored["std"][read], std[read], rtol=1e-4, atol=1e-6)):
                    problems.append(f"{self.path}: /{STATS_GROUP}/{self.atlas} of {self.describe_run(run)} no longer "
                                    "matches its data (the file was changed after it was written); rewrite the store")
        return problems

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def __getstate__(self):  # h5py handles do not pickle; workers reopen lazily
        state = dict(self.__dict__)
        state["_file"] = None
        state["_pid"] = None
        return state

    def __repr__(self) -> str:
        return (
            f"ROIStore({self.path}, atlas={self.atlas!r}, runs={self.n_runs}, rois={self.n_rois}"
            f"{'' if self.roi_mask is None or self.roi_mask.all() else f' ({int(self.roi_mask.sum())} read)'}, "
            f"tr={self.tr}s, subjects={len(set(self.subject_ids))})"
        )
