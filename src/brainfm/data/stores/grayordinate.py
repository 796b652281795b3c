"""The grayordinate store: CIFTI dense time series (HCP ``.dtseries.nii``, 91282 grayordinates per TR),
one contiguous float16 array per subject run, for R2T-Net's grayordinate input (rest2task/R2T-Net).

Grayordinate store layout (one directory per subject run)::

    <root>/<subject>/<run>/
        bold.npy    float16 (T, N) C order (np.load(mmap_mode="r")): N grayordinates per TR
                    (91282 in HCP's 32k_fs_LR space), normalized as meta.normalization says
        meta.json   layout "brainfm-grayordinate-run", subject, run, tr (s), n_frames,
                    n_grayordinates, normalization, global_mean/global_std (input units),
                    constant_grayordinates, structures ([name, kind, offset, count] of the CIFTI
                    brain models), source, brainfm_version

written by :func:`write_grayordinate_run` from a ``(T, N)`` array or a ``.dtseries.nii`` (read with
nibabel) into a hidden temporary directory that is renamed when complete. A window of consecutive
TRs is one contiguous byte range.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import numpy as np

from brainfm.data.stores.kinds import GRAYORDINATE_LAYOUT, META
from brainfm.data.stores.rundir import (
    RunDirStore,
    brainfm_version,
    fsync_path,
    publish_run_dir,
    run_dir,
    staged_run_dir,
)
from brainfm.errors import ConfigError, DataError

#: grayordinates of HCP's CIFTI space (32k_fs_LR surfaces + 2 mm subcortical voxels)
N_GRAYORDINATES_HCP = 91282
GRAYORDINATE_LAYOUT_VERSION = 1
GRAYORDINATE_NORMALIZATIONS = ("global", "grayordinate", "none")
_FP16_MAX = 65504.0
_BOLD = "bold.npy"


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
    normalization: str = "global",
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
        normalization: ``global`` (one mean and standard deviation over all grayordinates x TRs:
            R2T-Net's ``prepare_data.py --normalize zscore``), ``grayordinate`` (each grayordinate
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
        ConfigError: unknown normalization.
    """
    if normalization not in GRAYORDINATE_NORMALIZATIONS:
        raise ConfigError(f"normalization={normalization!r} is not one of {GRAYORDINATE_NORMALIZATIONS}")
    root = Path(root)
    final = run_dir(root, subject, run)
    if (final / META).is_file() and not overwrite:
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
    if normalization == "global":
        if not g_std > 0:
            raise DataError(f"{where}: the run is constant; it cannot be z-scored")
        offset, scale = np.float64(g_mean), np.full(n_values, 1.0 / g_std)
    elif normalization == "grayordinate":
        col_std = np.sqrt(col_var)
        ok = col_std > 1e-8 * max(1.0, float(np.abs(col_mean).max()))
        constant = int((~ok).sum())
        if constant == n_values:
            raise DataError(f"{where}: every grayordinate is constant; it cannot be z-scored")
        offset, scale = col_mean, np.where(ok, 1.0 / np.where(ok, col_std, 1.0), 0.0)  # constant ones become 0
    else:
        if vmax > _FP16_MAX:
            raise DataError(f"{where}: values up to {vmax:.6g} do not fit float16 with normalization none. "
                            "Fix: normalization='global'")
        offset, scale = np.float64(0.0), np.ones(n_values)
    with staged_run_dir(root, subject, run) as tmp:
        out = np.lib.format.open_memmap(tmp / _BOLD, mode="w+", dtype=np.float16, shape=(n_frames, n_values))
        for t0 in range(0, n_frames, chunk):
            out[t0:t0 + chunk] = ((x[t0:t0 + chunk].astype(np.float64) - offset) * scale).astype(np.float16)
        out.flush()
        del out
        fsync_path(tmp / _BOLD)
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
            "normalization": normalization,
            "global_mean": g_mean,
            "global_std": g_std,
            "constant_grayordinates": constant,
            "structures": structures or [],
            "source": source,
            "brainfm_version": brainfm_version(),
            **(extra_meta or {}),
        }
        publish_run_dir(tmp, final, meta, META)
    return final


class GrayordinateStore(RunDirStore):
    """Reader of a grayordinate store (layout in the module docstring), opened from its run index.

    Runs are ordered by (subject, run). ``read(run, start, stop)`` returns ``(stop - start, N)`` float16
    (time-first, as every store); the ROI window dataset reads grayordinates as ROI series.

    Args:
        root: the store folder. cache: ``data.cache`` sizes. validate: check every run's array now.

    Attributes:
        subject_ids, run_ids, lengths (TRs), trs (s): the run table. n_rois: grayordinates per TR (the
        same for every run). roi_names: None (grayordinates are identified by their index).

    ``run_stats(run)``: ``n`` (TRs), ``normalization``, ``global_mean``/``global_std`` (input units),
    ``constant_grayordinates``.

    Raises:
        DataError: missing root, no runs, unreadable ``meta.json`` or index, runs with different
            grayordinate counts, or a ``bold.npy`` that disagrees with ``meta.json`` or is truncated.
    """

    kind = "grayordinate"
    LAYOUT = GRAYORDINATE_LAYOUT
    LAYOUT_VERSION = GRAYORDINATE_LAYOUT_VERSION
    ARRAY = _BOLD
    DTYPE = np.dtype(np.float16)
    STATS = ("normalization", "global_mean", "global_std", "constant_grayordinates")

    def __init__(self, root: str | os.PathLike, cache: dict | None = None, validate: bool = False) -> None:
        super().__init__(root, cache=cache, validate=validate)
        counts = sorted({int(s[0]) for s in self.shapes.tolist()})
        if len(counts) != 1:
            i = next(i for i, s in enumerate(self.shapes.tolist()) if s[0] != self.shapes[0][0])
            raise DataError(f"{self.root}: runs have different grayordinate counts {counts} (e.g. subject "
                            f"{self.subject_ids[i]} run {self.run_ids[i]}); write every run in one CIFTI space")
        self.n_rois = counts[0]
        self.roi_names = None
        self.n_runs = len(self)

    def missing_message(self) -> str:
        return (f"grayordinate store {self.root} does not exist. Fix: write it with "
                "brainfm.data.stores.grayordinate.write_grayordinate_run (from .dtseries.nii files), or set data.path")

    @classmethod
    def frame_shape_of(cls, meta: dict) -> tuple[int, ...]:
        return (int(meta["n_grayordinates"]),)

    @classmethod
    def extra_row(cls, meta: dict) -> dict[str, Any]:
        return {"normalization": str(meta.get("normalization")), "global_mean": float(meta.get("global_mean", "nan")),
                "global_std": float(meta.get("global_std", "nan")),
                "constant_grayordinates": int(meta.get("constant_grayordinates", 0))}

    def __repr__(self) -> str:
        return (f"GrayordinateStore({self.root}, runs={len(self)}, subjects={len(set(self.subject_ids))}, "
                f"grayordinates={self.n_rois}, tr={self.tr}s)")
