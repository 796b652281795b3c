"""HDF5 store of parcellated BOLD time series (ROI x TR), in the Brain-Semantoks layout.

Layout (one row per subject run)::

    /timeseries/<atlas>   float32 (n_runs, n_rois, n_timepoints), NaN-padded after each run's end
                          attrs: roi_names (ROI order), tr (s, optional if on the file root)
    /long_subject_id      bytes (n_runs,)     subject identifier of each row
    /run_id               bytes (n_runs,)     run/session label of each row (brainfm; optional)
    /ts_len               int32 (n_runs,)     valid TRs of each row (optional: else found from NaNs)
    /labels/<name>        (n_runs,)           optional phenotype labels
    root attrs: tr (repetition time, seconds), plus free provenance (source, version, sha256)

This is the layout of SamGijsen/Brain-Semantoks (``data/dataset.py``: ``timeseries/<atlas>``,
``long_subject_id``, ``ts_len``, NaN padding). brainfm adds the TR and the ROI order as
attributes, because a TR or ROI-order mismatch between pretraining and downstream data is the most
common silent error in the reference projects.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import h5py
import numpy as np

from brainfm.errors import DataError

LAYOUT_VERSION = 1


def _decode(values) -> list[str]:
    return [v.decode("utf-8") if isinstance(v, bytes) else str(v) for v in values]


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
    """Write ROI time series to ``path`` atomically (temporary file, then rename).

    Args:
        path: destination ``.h5`` file.
        series: atlas name -> one array per run, each ``(n_rois, n_timepoints_run)``; runs of
            different lengths are NaN-padded to the longest.
        subject_ids: subject id of each run (``len == n_runs``).
        tr: repetition time in seconds.
        roi_names: atlas name -> ROI names in the order of the rows of each array.
        run_ids: optional run label of each row (e.g. ``"REST1_LR"``).
        labels: optional label name -> one value per run.
        attrs: extra root attributes (provenance).

    Raises:
        DataError: inconsistent lengths, ROI counts, or non-finite values inside a run.
    """
    path = Path(path)
    n_runs = len(subject_ids)
    if tr is None or not np.isfinite(tr) or tr <= 0:
        raise DataError(f"{path}: the repetition time must be a positive number of seconds, got {tr!r}")
    for atlas, runs in series.items():
        if len(runs) != n_runs:
            raise DataError(f"{path}: atlas {atlas!r} has {len(runs)} runs but {n_runs} subject ids")
        names = list(roi_names[atlas])
        for i, arr in enumerate(runs):
            if arr.ndim != 2 or arr.shape[0] != len(names):
                raise DataError(
                    f"{path}: run {i} (subject {subject_ids[i]}) of atlas {atlas!r} has shape "
                    f"{arr.shape}, expected ({len(names)} ROIs, n_timepoints)"
                )
            if not np.isfinite(arr).all():
                raise DataError(
                    f"{path}: run {i} (subject {subject_ids[i]}) of atlas {atlas!r} has non-finite "
                    "values; interpolate or censor them before writing the store"
                )
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with h5py.File(tmp, "w") as f:
            f.attrs["tr"] = float(tr)
            f.attrs["brainfm_layout_version"] = LAYOUT_VERSION
            for key, value in (attrs or {}).items():
                f.attrs[key] = value
            lengths = None
            for atlas, runs in series.items():
                t_max = max(a.shape[1] for a in runs)
                n_rois = runs[0].shape[0]
                data = np.full((n_runs, n_rois, t_max), np.nan, dtype=np.float32)
                for i, arr in enumerate(runs):
                    data[i, :, : arr.shape[1]] = arr
                ds = f.create_dataset(
                    f"timeseries/{atlas}", data=data, chunks=(1, n_rois, t_max), compression=None
                )
                ds.attrs["roi_names"] = np.array(list(roi_names[atlas]), dtype=h5py.string_dtype())
                ds.attrs["tr"] = float(tr)
                run_lengths = np.array([a.shape[1] for a in runs], dtype=np.int32)
                if lengths is not None and not np.array_equal(lengths, run_lengths):
                    raise DataError(f"{path}: atlases disagree on run lengths")
                lengths = run_lengths
            f.create_dataset("long_subject_id", data=np.array([s.encode() for s in subject_ids]))
            if run_ids is not None:
                f.create_dataset("run_id", data=np.array([s.encode() for s in run_ids]))
            f.create_dataset("ts_len", data=lengths)
            for name, values in (labels or {}).items():
                f.create_dataset(f"labels/{name}", data=np.asarray(values))
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


class ROIStore:
    """Lazy reader of the HDF5 ROI store (see the module docstring for the layout).

    Metadata is read once at construction; the data set is opened on first read in each process
    (safe with forked DataLoader workers). With ``preload=True`` (or ``"auto"`` and a file under
    ``preload_limit_mb``) the whole atlas array is read into memory once.

    Args:
        path: the ``.h5`` file.
        atlas: name under ``/timeseries``; may be omitted when the file holds exactly one.
        preload: ``True``, ``False`` or ``"auto"``.
        preload_limit_mb: size limit for ``preload="auto"``.

    Raises:
        DataError: missing or unreadable file (e.g. truncated), missing atlas, inconsistent ids.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        atlas: str | None = None,
        preload: bool | str = "auto",
        preload_limit_mb: float = 512.0,
    ) -> None:
        self.path = Path(path)
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
            if atlas is None:
                if len(atlases) != 1:
                    raise DataError(f"{self.path} holds atlases {atlases}; choose one with data.atlas=<name>")
                atlas = atlases[0]
            if atlas not in atlases:
                raise DataError(
                    f"{self.path} has no atlas {atlas!r} under /timeseries (available: {atlases}); "
                    "fix data.atlas"
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
            self.tr: float | None = float(tr) if tr is not None else None
            names = ds.attrs.get("roi_names")
            self.roi_names: list[str] | None = _decode(names) if names is not None else None
            if self.roi_names is not None and len(self.roi_names) != self.n_rois:
                raise DataError(
                    f"{self.path}: roi_names lists {len(self.roi_names)} names but the data has "
                    f"{self.n_rois} ROIs"
                )
            if "long_subject_id" not in f:
                raise DataError(f"{self.path} has no /long_subject_id data set (one subject id per row)")
            self.subject_ids = _decode(f["long_subject_id"][:])
            if len(self.subject_ids) != self.n_runs:
                raise DataError(
                    f"{self.path}: {len(self.subject_ids)} subject ids for {self.n_runs} rows of "
                    f"/timeseries/{atlas}"
                )
            self.run_ids = _decode(f["run_id"][:]) if "run_id" in f else [f"run{i}" for i in range(self.n_runs)]
            if "ts_len" in f:
                self.lengths = np.asarray(f["ts_len"][:], dtype=np.int64)
            else:  # as Brain-Semantoks: a run ends at the first NaN of its first ROI
                first_roi = ds[:, 0, :]
                nan = np.isnan(first_roi)
                self.lengths = np.where(nan.any(axis=1), nan.argmax(axis=1), self.n_timepoints)
            if (self.lengths < 1).any() or (self.lengths > self.n_timepoints).any():
                raise DataError(f"{self.path}: /ts_len has values outside [1, {self.n_timepoints}]")
            self.attrs = {k: (v.item() if hasattr(v, "item") and np.ndim(v) == 0 else v) for k, v in f.attrs.items()}
            size_mb = self.n_runs * self.n_rois * self.n_timepoints * 4 / 2**20
        if preload == "auto":
            preload = size_mb <= preload_limit_mb
        self._memory: np.ndarray | None = None
        self._file: h5py.File | None = None
        self._pid: int | None = None
        if preload:
            with h5py.File(self.path, "r") as f:
                self._memory = np.asarray(f[f"timeseries/{self.atlas}"][:], dtype=np.float32)

    # -- reading ---------------------------------------------------------------------------------
    def _dataset(self) -> h5py.Dataset:
        if self._file is None or self._pid != os.getpid():
            self._file = h5py.File(self.path, "r")
            self._pid = os.getpid()
        return self._file[f"timeseries/{self.atlas}"]

    def read(self, run: int, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Raw BOLD of one run, ``(n_rois, stop - start)`` float32; TRs ``[start, stop)``."""
        stop = int(self.lengths[run]) if stop is None else stop
        if not 0 <= start < stop <= self.lengths[run]:
            raise IndexError(
                f"TRs [{start}, {stop}) outside run {run} of {self.path} ({self.lengths[run]} TRs)"
            )
        if self._memory is not None:
            return self._memory[run, :, start:stop]
        return np.asarray(self._dataset()[run, :, start:stop], dtype=np.float32)

    def describe_run(self, run: int) -> str:
        return f"subject {self.subject_ids[run]} ({self.run_ids[run]}, row {run})"

    def check_finite(self, run: int, data: np.ndarray | None = None) -> None:
        """Raise a DataError naming the subject, ROI and TRs if a run has NaN/inf inside it."""
        data = self.read(run) if data is None else data
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
            f"ROIStore({self.path}, atlas={self.atlas!r}, runs={self.n_runs}, rois={self.n_rois}, "
            f"tr={self.tr}s, subjects={len(set(self.subject_ids))})"
        )
