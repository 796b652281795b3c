"""Rest <-> task pairs of the same subject, for R2T-Net (rest2task/R2T-Net).

R2T-Net trains on pairs ``(rest window, task window)`` of one subject: a window of a resting-state
run and a window of a task run (HCP: ``REST1_LR``, 1200 TRs, with ``WM_LR``, 405 TRs; TR 0.72 s),
drawn at random in every epoch (the reference's ``PairedFMRIWindowDataset`` picks a rest scan and
a task scan of the subject uniformly, then a start uniformly in each). Subjects of other pairs in
a batch are the negatives of its NT-Xent loss. The three input kinds of the reference are
supported, each from a brainfm store:

- ``volume``: frames ``[1, X, Y, Z]`` (raw 4-D NIfTI in the reference) from a
  :class:`~brainfm.data.stores.volume.VolumeStore` (or SwiFT/R2T ``img/<subject>/frame_<t>.pt``
  folders); batch view ``volume`` ``(B, 1, X, Y, Z, L)`` float16, for Swin4D.
- ``grayordinate``: frames ``[91282]`` (CIFTI ``.dtseries.nii``) from a :class:`GrayordinateStore`
  (this module); batch view ``bold`` ``(B, L, 91282)`` float32.
- ``roi``: frames ``[V]`` (parcellated) from a :class:`~brainfm.data.stores.roi.ROIStore`; batch
  view ``bold`` ``(B, L, V)`` float32 (z-scored per ROI and run by default).

Rest and task runs are told apart by their run ids (``rest_runs``/``task_runs``: shell patterns,
case-insensitive, e.g. ``*REST*`` and ``*WM*``); they may sit in one store or in two
(``task_path``: e.g. the embedded resting-state ROI file plus a task file of the same atlas).

A paired batch carries the rest view under the usual keys (``bold``/``volume``, ``t``, ``onset``,
``run``) and the task view under ``task_``-prefixed keys (``task_bold``/``task_volume``,
``task_t``, ``task_onset``, ``task_run``), plus ``subject`` (index into
:attr:`R2TDataModule.subjects`). A rest-only batch (rest-only inference, R2T-Net's ``predict``)
is an ordinary window batch: ``bold``/``volume``, ``t``, ``subject``.

Grayordinate store layout (one directory per subject run)::

    <root>/<subject>/<run>/
        bold.npy    float16 (T, N) C order (np.load(mmap_mode="r")): N grayordinates per TR
                    (91282 in HCP's 32k_fs_LR space), normalised as meta.normalisation says
        meta.json   layout "brainfm-grayordinate-run", subject, run, tr (s), n_frames,
                    n_grayordinates, normalisation, global_mean/global_std (input units),
                    constant_grayordinates, structures ([name, kind, offset, count] of the CIFTI
                    brain models), source, brainfm_version

written by :func:`write_grayordinate_run` from a ``(T, N)`` array or a ``.dtseries.nii`` (read with
nibabel) into a hidden temporary directory that is renamed when complete. A window of consecutive
TRs is one contiguous byte range.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

import numpy as np

from brainfm.data.stores.volume import (
    _brainfm_version,
    _fsync,
    check_name,
    publish_run_dir,
)
from brainfm.errors import ConfigError, DataError

KINDS = ("volume", "grayordinate", "roi")
ROLES = ("rest", "task")
#: grayordinates of HCP's CIFTI space (32k_fs_LR surfaces + 2 mm subcortical voxels)
N_GRAYORDINATES_HCP = 91282
GRAYORDINATE_LAYOUT = "brainfm-grayordinate-run"
GRAYORDINATE_LAYOUT_VERSION = 1
GRAYORDINATE_NORMALISATIONS = ("global", "grayordinate", "none")
_FP16_MAX = 65504.0
_BOLD, _META = "bold.npy", "meta.json"


# -- grayordinate store ----------------------------------------------------------------------------------
def read_dtseries(path: str | os.PathLike) -> tuple[np.ndarray, float | None, list[dict]]:
    """Read a CIFTI-2 dense time series (``.dtseries.nii``) with nibabel.

    Returns:
        ``(data, tr, structures)``: ``data`` float32 ``(T, N)`` (TRs x grayordinates), the
        repetition time in seconds from the series axis (None when its unit is not seconds), and
        the brain models as ``{"name", "kind": "surface"|"volume", "offset", "count"}``.

    Raises:
        DataError: unreadable file, or not a dense time series (axes series x brain models).
    """
    import nibabel as nib
    from nibabel.cifti2 import BrainModelAxis, SeriesAxis

    path = Path(path)
    try:
        img = nib.load(str(path))
    except Exception as exc:  # nibabel raises many types for corrupt/unknown files
        raise DataError(f"{path} cannot be read as CIFTI ({type(exc).__name__}: {exc})") from exc
    if not isinstance(img, nib.Cifti2Image):
        raise DataError(f"{path} is a {type(img).__name__}, not a CIFTI-2 image; expected a .dtseries.nii")
    series, models = img.header.get_axis(0), img.header.get_axis(1)
    if not isinstance(series, SeriesAxis) or not isinstance(models, BrainModelAxis):
        raise DataError(
            f"{path} has axes ({type(series).__name__}, {type(models).__name__}); a dense time series "
            "(.dtseries.nii) has (SeriesAxis, BrainModelAxis). Parcellated (.ptseries) files go to the ROI store."
        )
    tr = float(series.step) if str(series.unit).upper() == "SECOND" else None
    structures = []
    for name, slc, bm in models.iter_structures():
        count = int(len(bm))
        structures.append({"name": str(name), "kind": "surface" if bool(bm.surface_mask.all()) else "volume",
                           "offset": int(slc.start or 0), "count": count})
    data = np.asarray(img.get_fdata(dtype=np.float32))
    return data, tr, structures


def write_grayordinate_run(
    root: str | os.PathLike,
    subject: str,
    run: str,
    data: np.ndarray | str | os.PathLike,
    *,
    tr: float | None = None,
    normalisation: str = "global",
    source: str | None = None,
    structures: list[dict] | None = None,
    extra_meta: dict[str, Any] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write one run of grayordinate BOLD to ``<root>/<subject>/<run>/`` atomically.

    Args:
        root: store root. subject, run: ids (folder names: letters, digits, ``._-``).
        data: ``(T, N)`` array (TRs x grayordinates) or the path of a ``.dtseries.nii``.
        tr: repetition time in seconds; None takes it from the CIFTI series axis. Given both, they
            must agree.
        normalisation: ``global`` (one mean and standard deviation over all grayordinates x TRs:
            R2T-Net's ``prepare_data.py --normalise zscore``), ``grayordinate`` (each grayordinate
            z-scored over time; constant ones become 0 and are counted in ``meta.json``) or
            ``none`` (values must fit float16).
        source, structures, extra_meta: provenance for ``meta.json`` (``structures`` is read from the
            CIFTI file when ``data`` is a path).
        overwrite: replace an existing run (else it is kept and its path returned).

    Returns:
        The run directory.

    Raises:
        DataError: non-finite values (the TRs are named), a missing or mismatched TR, a constant
            run, values that do not fit float16, a non-2-D array.
        ConfigError: unknown normalisation.
    """
    if normalisation not in GRAYORDINATE_NORMALISATIONS:
        raise ConfigError(f"normalisation={normalisation!r} is not one of {GRAYORDINATE_NORMALISATIONS}")
    root = Path(root)
    final = root / check_name(subject, "subject id") / check_name(run, "run id")
    if (final / _META).is_file() and not overwrite:
        return final
    if isinstance(data, (str, os.PathLike)):
        source = source or str(data)
        data, file_tr, file_structures = read_dtseries(data)
        structures = structures or file_structures
        if tr is None:
            tr = file_tr
        elif file_tr is not None and not math.isclose(float(tr), file_tr, abs_tol=1e-3):
            raise DataError(f"{source}: the CIFTI series step is {file_tr:g} s but tr={float(tr):g} s was given; "
                            "fix the TR (or the file's header)")
    where = f"{source or '<array>'} (subject {subject}, run {run})"
    if tr is None or not math.isfinite(float(tr)) or float(tr) <= 0:
        raise DataError(f"{where}: the repetition time must be a positive number of seconds (got {tr!r}); pass tr=")
    x = np.asarray(data)
    if x.ndim != 2 or min(x.shape) < 1:
        raise DataError(f"{where}: expected a (T, N) array of TRs x grayordinates, got shape {x.shape}")
    n_frames, n_values = (int(v) for v in x.shape)
    chunk = max(1, (64 << 20) // (8 * n_values))  # ~64 MB of float64 per chunk: an HCP run never sits in float64
    # statistics per grayordinate, shifted by the first TR (stable sums of squares)
    shift = x[0].astype(np.float64)
    s1, s2 = np.zeros(n_values), np.zeros(n_values)
    vmax = 0.0
    for t0 in range(0, n_frames, chunk):
        block = x[t0:t0 + chunk].astype(np.float64)
        bad = ~np.isfinite(block)
        if bad.any():
            frames = np.flatnonzero(~np.isfinite(x).all(axis=1))
            shown = ", ".join(str(int(t)) for t in frames[:10]) + (" ..." if len(frames) > 10 else "")
            raise DataError(f"{where}: NaN/inf at TR(s) {shown} (0-based). Fix: interpolate or censor these frames "
                            "before writing the store")
        vmax = max(vmax, float(np.abs(block).max()))
        d = block - shift
        s1 += d.sum(axis=0)
        s2 += (d * d).sum(axis=0)
    col_mean = shift + s1 / n_frames
    col_var = np.maximum(s2 / n_frames - (s1 / n_frames) ** 2, 0.0)
    g_mean = float(col_mean.mean())
    g_std = float(np.sqrt(max(float(col_var.mean() + ((col_mean - g_mean) ** 2).mean()), 0.0)))  # total variance
    constant = 0
    if normalisation == "global":
        if not g_std > 0:
            raise DataError(f"{where}: the run is constant; it cannot be z-scored")
        offset, scale = np.float64(g_mean), np.full(n_values, 1.0 / g_std)
    elif normalisation == "grayordinate":
        col_std = np.sqrt(col_var)
        ok = col_std > 1e-8 * max(1.0, float(np.abs(col_mean).max()))
        constant = int((~ok).sum())
        if constant == n_values:
            raise DataError(f"{where}: every grayordinate is constant; it cannot be z-scored")
        offset, scale = col_mean, np.where(ok, 1.0 / np.where(ok, col_std, 1.0), 0.0)  # constant ones become 0
    else:
        if vmax > _FP16_MAX:
            raise DataError(f"{where}: values up to {vmax:.6g} do not fit float16 with normalisation none. "
                            "Fix: normalisation='global'")
        offset, scale = np.float64(0.0), np.ones(n_values)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".{run}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        out = np.lib.format.open_memmap(tmp / _BOLD, mode="w+", dtype=np.float16, shape=(n_frames, n_values))
        for t0 in range(0, n_frames, chunk):
            out[t0:t0 + chunk] = ((x[t0:t0 + chunk].astype(np.float64) - offset) * scale).astype(np.float16)
        out.flush()
        del out
        _fsync(tmp / _BOLD)
        meta = {
            "layout": GRAYORDINATE_LAYOUT,
            "layout_version": GRAYORDINATE_LAYOUT_VERSION,
            "subject": str(subject),
            "run": str(run),
            "tr": float(tr),
            "n_frames": n_frames,
            "n_grayordinates": n_values,
            "dtype": "float16",
            "axes": "T G",
            "normalisation": normalisation,
            "global_mean": g_mean,
            "global_std": g_std,
            "constant_grayordinates": constant,
            "structures": structures or [],
            "source": source,
            "brainfm_version": _brainfm_version(),
            **(extra_meta or {}),
        }
        publish_run_dir(tmp, final, meta, _META)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final


class GrayordinateStore:
    """Index and reader of a grayordinate store (layout in the module docstring).

    Runs are ordered by (subject, run). Reading follows :class:`~brainfm.data.stores.roi.ROIStore`
    (``read(run, start, stop)`` -> ``(N, stop - start)`` float32), so the ROI window dataset reads
    grayordinates as is. Every run's ``meta.json`` and ``.npy`` header are checked at construction.

    Attributes:
        path: the store root. subject_ids, run_ids: per run. lengths: TRs per run.
        trs: seconds per run; tr: the common TR or None. n_rois: grayordinates per TR (the
            same for every run). roi_names: None (grayordinates are identified by their index).

    Raises:
        DataError: missing root, no runs, unreadable ``meta.json``, runs with different
            grayordinate counts, or a ``bold.npy`` that disagrees with ``meta.json`` or is truncated.
    """

    def __init__(self, root: str | os.PathLike) -> None:
        self.path = self.root = Path(root)
        if not self.root.is_dir():
            raise DataError(f"grayordinate store {self.root} does not exist. Fix: write it with "
                            "brainfm.data.stores.grayordinate.write_grayordinate_run (from .dtseries.nii files), or set data.path")
        metas = []
        for meta_path in sorted(self.root.glob(f"*/*/{_META}")):
            if meta_path.parent.name.startswith(".") or meta_path.parent.parent.name.startswith("."):
                continue
            metas.append(self._check_run(meta_path))
        if not metas:
            raise DataError(f"{self.root} holds no grayordinate runs (<subject>/<run>/meta.json); set data.path "
                            "to the store root")
        self.metas = metas
        self.subject_ids = [m["subject"] for m in metas]
        self.run_ids = [m["run"] for m in metas]
        self.lengths = np.array([m["n_frames"] for m in metas], dtype=np.int64)
        self.trs = np.array([m["tr"] for m in metas], dtype=np.float64)
        self.tr: float | None = float(self.trs[0]) if np.allclose(self.trs, self.trs[0], atol=1e-6) else None
        counts = sorted({int(m["n_grayordinates"]) for m in metas})
        if len(counts) != 1:
            first = next(m for m in metas if m["n_grayordinates"] != metas[0]["n_grayordinates"])
            raise DataError(f"{self.root}: runs have different grayordinate counts {counts} (e.g. subject "
                            f"{first['subject']} run {first['run']}); write every run in one CIFTI space")
        self.n_rois = counts[0]
        self.roi_names = None
        self.n_runs = len(metas)
        self._maps: dict[int, np.ndarray] = {}
        self._pid = os.getpid()

    @staticmethod
    def _check_run(meta_path: Path) -> dict:
        fix = "Fix: write the run again (delete its folder first)."
        try:
            meta = json.loads(meta_path.read_text())
        except (OSError, ValueError) as exc:
            raise DataError(f"{meta_path} is unreadable ({exc}). {fix}") from exc
        if not isinstance(meta, dict) or meta.get("layout") != GRAYORDINATE_LAYOUT:
            raise DataError(f"{meta_path} is not a brainfm grayordinate run. {fix}")
        bold = meta_path.parent / _BOLD
        try:
            with open(bold, "rb") as f:
                version = np.lib.format.read_magic(f)
                read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                               else np.lib.format.read_array_header_2_0)
                header = read_header(f)
                offset = f.tell()
        except (OSError, ValueError) as exc:
            raise DataError(f"{bold} is missing or not a .npy file ({exc}). {fix}") from exc
        shape, fortran, dtype = header
        want = (int(meta["n_frames"]), int(meta["n_grayordinates"]))
        if tuple(shape) != want or np.dtype(dtype) != np.float16 or fortran:
            raise DataError(f"{bold} holds {np.dtype(dtype)} {tuple(shape)} but meta.json says float16 {want}. {fix}")
        size = offset + want[0] * want[1] * 2
        if bold.stat().st_size < size:
            raise DataError(f"{bold} is truncated: {bold.stat().st_size} bytes of {size}. {fix}")
        return meta

    def __len__(self) -> int:
        return self.n_runs

    def describe_run(self, run: int) -> str:
        folder = self.root / self.subject_ids[run] / self.run_ids[run]
        return f"subject {self.subject_ids[run]} ({self.run_ids[run]}, {folder})"

    def meta(self, run: int) -> dict:
        return self.metas[run]

    def memmap(self, run: int) -> np.ndarray:
        """Read-only memory map ``(T, N)`` float16 of run ``run`` (cached per process)."""
        if self._pid != os.getpid():
            self._maps, self._pid = {}, os.getpid()
        mm = self._maps.get(run)
        if mm is None:
            mm = np.load(self.root / self.subject_ids[run] / self.run_ids[run] / _BOLD, mmap_mode="r")
            self._maps[run] = mm
        return mm

    def read(self, run: int, start: int = 0, stop: int | None = None) -> np.ndarray:
        """TRs ``[start, stop)`` of run ``run`` as ``(N, stop - start)`` float32 (a transposed view
        of a contiguous ``(stop - start, N)`` array).

        Raises:
            IndexError: a range outside the run.
        """
        stop = int(self.lengths[run]) if stop is None else int(stop)
        if not 0 <= start < stop <= self.lengths[run]:
            raise IndexError(f"TRs [{start}, {stop}) outside {self.describe_run(run)} ({self.lengths[run]} TRs)")
        return self.memmap(run)[start:stop].astype(np.float32).T

    def __getstate__(self):  # memory maps are reopened in each worker
        state = dict(self.__dict__)
        state["_maps"], state["_pid"] = {}, None
        return state

    def __repr__(self) -> str:
        return (f"GrayordinateStore({self.root}, runs={self.n_runs}, subjects={len(set(self.subject_ids))}, "
                f"grayordinates={self.n_rois}, tr={self.tr}s)")


