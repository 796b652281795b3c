"""Store of 4-D fMRI volumes: one contiguous, memory-mappable float16 array per subject run.

Layout (one directory per subject run)::

    <root>/<subject>/<run>/
        bold.npy        float16 (T, X, Y, Z), C order, numpy .npy format (np.load(mmap_mode="r")):
                        already normalized (``meta.normalization``) with the background filled
                        (``meta.fill``), on the output grid (after crop/pad): ready for a model
        mask.npy        bool (X, Y, Z) brain mask on the output grid
        voxel_mean.npy  float32 (X, Y, Z) per-voxel mean over time of bold.npy (fill outside the brain)
        voxel_std.npy   float32 (X, Y, Z) per-voxel standard deviation over time (0 outside the brain)
        meta.json       subject, run, tr (s), n_frames, shape, affine (4x4 of the output grid),
                        orientation (axis codes of the stored grid: LAS/RAS) and source_orientation
                        (the input's), original_shape (the grid crop/pad applies to, after
                        reorientation), crop_pad, normalization, source_offset/source_scale (stored =
                        (source - offset) * scale), global_mean/global_std (source units), min/max (brain,
                        as stored), fill, fill_value, mask rule, nan_policy and
                        nan_filled_voxels/nan_filled_values, source, version

A run is written into a hidden temporary directory beside its final place (``.<run>.tmp-...``) and
renamed when complete, ``meta.json`` last: a run directory that exists with a readable
``meta.json`` is finished, and preprocessing skips it when resumed.

Normalization follows SwiFT (Kim et al., NeurIPS 2023; Transconnectome/SwiFT
``preprocessing.py``): ``global`` z-scores with one mean and standard deviation over all brain
voxels x all TRs of the run, and the background is filled with the brain minimum after
normalization (``fill="min"``) or 0 (``fill="zero"``). The per-voxel statistics allow the
per-voxel z-normalization of TFF (Malkiel et al. 2022) and a min-max scaling at load time.
Unlike SwiFT (which takes every voxel equal to 0 at a given TR as background), the brain mask is one
3-D mask per run, so a brain voxel that happens to be 0 at one TR is not filled.

Other frames-per-file layouts cost one file open per TR (20-40 per sample); here a clip of
consecutive TRs is one contiguous byte range of one file.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from brainfm.data.orientation import (
    Reorientation,
    ReorientedFrames,
    axcodes,
    check_orientation_name,
    orientation_of_meta,
)
from brainfm.data.stores.base import LRUCache, cache_sizes
from brainfm.data.stores.kinds import META, VOLUME_LAYOUT
from brainfm.data.stores.rundir import (
    RunDirStore,
    brainfm_version,
    fsync_path,
    npy_layout,
    publish_run_dir,
    run_dir,
    save_npy,
    staged_run_dir,
)
from brainfm.deprecations import current_keys
from brainfm.errors import ConfigError, DataError

LAYOUT = VOLUME_LAYOUT
LAYOUT_VERSION = 1
BOLD, MASK, VOXEL_MEAN, VOXEL_STD = "bold.npy", "mask.npy", "voxel_mean.npy", "voxel_std.npy"
NORMALIZATIONS = ("global", "none")
FILLS = ("min", "zero")
MASK_RULES = ("auto", "nonzero", "threshold", "epi", "all")
FP16_MAX = 65504.0
#: ``write_volume_run(nan=...)``: brain voxels NaN/inf at some TRs raise, or are filled (drop-run is the caller's).
NAN_HANDLING = ("error", "fill")
_FIX = "Fix: re-run brainfm-preprocess for it (delete the folder first)."


class NonFiniteError(DataError):
    """NaN/inf values inside the brain at some TRs of a run (voxels NaN at every TR are background).

    Attributes:
        frames: the 0-based TRs with non-finite brain values. counts: brain voxels at each of them.
        n_voxels: brain voxels that are non-finite at some (not all) TRs.
    """

    def __init__(self, message: str, frames: Sequence[int] = (), counts: Sequence[int] = (), n_voxels: int = 0) -> None:
        super().__init__(message)
        self.frames, self.counts, self.n_voxels = [int(t) for t in frames], [int(c) for c in counts], int(n_voxels)


def nonfinite_error(where: str, frames: Sequence[int], counts: Sequence[int], n_voxels: int,
                    n_frames: int) -> NonFiniteError:
    """The :class:`NonFiniteError` of a run: ``where`` (file, subject, run), the 0-based TRs with
    non-finite brain values and how many voxels at each, and the fixes (``--nan fill|drop-run``)."""
    shown = ", ".join(str(int(t)) for t in frames[:10]) + (" ..." if len(frames) > 10 else "")
    per = ", ".join(f"TR {int(t)}: {int(c)}" for t, c in zip(frames[:10], counts[:10]))
    return NonFiniteError(
        f"{where}: NaN/inf values in {int(n_voxels)} brain voxel(s) at TR(s) {shown} (of {n_frames}; 0-based; "
        f"non-finite brain voxels per TR: {per}{' ...' if len(frames) > 10 else ''}). Fix: censor/interpolate "
        "these frames before preprocessing, or pass --nan fill (replace them by each voxel's temporal mean) or "
        "--nan drop-run (skip the run); voxels that are NaN at every TR are treated as background.",
        frames, counts, n_voxels)


def nonfinite_frames(src: "FrameSource", voxels: np.ndarray, chunk: int) -> tuple[np.ndarray, np.ndarray]:
    """``(frames, counts)``: the TRs at which some of ``voxels`` (bool ``(X, Y, Z)``) are NaN/inf
    in ``src``, and how many of them at each (one more pass over the frames, on the error path)."""
    T = int(src.n_frames)
    counts = np.zeros(T, dtype=np.int64)
    for t0 in range(0, T, chunk):
        t1 = min(T, t0 + chunk)
        x = np.asarray(src.read(t0, t1))
        counts[t0:t1] = (~np.isfinite(x[:, voxels])).sum(axis=1)
    frames = np.flatnonzero(counts)
    return frames, counts[frames]


# -- crop / pad --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class CropPad:
    """Voxels added (positive) or removed (negative) before and after each spatial axis.

    ``((x_before, x_after), (y_before, y_after), (z_before, z_after))`` in **axis order**
    (X, Y, Z of the NIfTI array). SwiFT writes the same as a ``torch.nn.functional.pad`` tuple,
    which lists the *last* axis first: HCP ``(8, 7, 2, 1, 11, 10)`` means Z (8, 7), Y (2, 1),
    X (11, 10) and takes 75x93x81 to 96^3; use :meth:`from_torch_pad` for those.
    """

    x: tuple[int, int] = (0, 0)
    y: tuple[int, int] = (0, 0)
    z: tuple[int, int] = (0, 0)

    @classmethod
    def from_axis_order(cls, values: Sequence[int]) -> "CropPad":
        """From six integers ``x_before x_after y_before y_after z_before z_after``."""
        v = [int(a) for a in values]
        if len(v) != 6:
            raise ConfigError(f"crop/pad needs 6 integers (x_before x_after y_before y_after z_before z_after), got {v}")
        return cls((v[0], v[1]), (v[2], v[3]), (v[4], v[5]))

    @classmethod
    def from_torch_pad(cls, values: Sequence[int]) -> "CropPad":
        """From a ``torch.nn.functional.pad`` tuple over (X, Y, Z): ``z_b z_a y_b y_a x_b x_a``."""
        v = [int(a) for a in values]
        if len(v) != 6:
            raise ConfigError(f"a torch pad tuple over (X, Y, Z) has 6 integers, got {v}")
        return cls((v[4], v[5]), (v[2], v[3]), (v[0], v[1]))

    @classmethod
    def centred(cls, shape: Sequence[int], target: Sequence[int]) -> "CropPad":
        """Centred crop/pad of ``shape`` (X, Y, Z) to ``target``; an odd difference puts the extra
        voxel after (pad) or removes it after (crop)."""
        if len(shape) != 3 or len(target) != 3:
            raise ConfigError(f"shape {tuple(shape)} and target {tuple(target)} must have 3 axes")
        if min(target) < 1:
            raise ConfigError(f"target shape {tuple(target)} must be positive")
        out = []
        for n, t in zip(shape, target):
            d = int(t) - int(n)
            before = d // 2 if d >= 0 else -((-d) // 2)
            out.append((before, d - before))
        return cls(*out)

    @property
    def pairs(self) -> tuple[tuple[int, int], ...]:
        return (tuple(self.x), tuple(self.y), tuple(self.z))

    def output_shape(self, shape: Sequence[int]) -> tuple[int, int, int]:
        out = tuple(int(n) + b + a for n, (b, a) in zip(shape, self.pairs))
        if min(out) < 1:
            raise ConfigError(f"crop/pad {self.as_list()} leaves nothing of a {tuple(shape)} grid")
        return out

    def slices(self, shape: Sequence[int]) -> tuple[tuple[slice, ...], tuple[slice, ...]]:
        """``(input_region, output_region)``: ``out[output_region] = in[input_region]``."""
        src, dst = [], []
        for n, (b, a) in zip(shape, self.pairs):
            i0, i1 = max(0, -b), int(n) - max(0, -a)
            o0 = max(0, b)
            src.append(slice(i0, i1))
            dst.append(slice(o0, o0 + max(0, i1 - i0)))
        return tuple(src), tuple(dst)

    def affine(self, affine: np.ndarray) -> np.ndarray:
        """The output grid's affine: output voxel ``i`` is input voxel ``i - before``."""
        shift = np.eye(4)
        shift[:3, 3] = [-b for b, _ in self.pairs]
        return np.asarray(affine, dtype=np.float64) @ shift

    def as_list(self) -> list[list[int]]:
        return [list(p) for p in self.pairs]

    @property
    def is_identity(self) -> bool:
        return all(b == 0 and a == 0 for b, a in self.pairs)


# -- frame sources ---------------------------------------------------------------------------------------
class FrameSource(Protocol):
    """What the writer reads: ``n_frames`` TRs of a ``spatial_shape`` (X, Y, Z) grid."""

    name: str
    n_frames: int
    spatial_shape: tuple[int, int, int]

    def read(self, t0: int, t1: int) -> np.ndarray:
        """TRs ``[t0, t1)`` as ``(t1 - t0, X, Y, Z)`` (any real dtype); DataError if unreadable."""
        ...


class ArrayFrames:
    """A ``(T, X, Y, Z)`` array as a :class:`FrameSource`."""

    def __init__(self, data: np.ndarray, name: str = "<array>") -> None:
        if data.ndim != 4:
            raise DataError(f"{name}: expected a (T, X, Y, Z) array, got shape {data.shape}")
        self.data, self.name = data, name
        self.n_frames = int(data.shape[0])
        self.spatial_shape = tuple(int(s) for s in data.shape[1:])

    def read(self, t0: int, t1: int) -> np.ndarray:
        return self.data[t0:t1]


# -- helpers ----------------------------------------------------------------------------------------------
def source_map(normalization: str, global_mean: float | None, global_std: float | None,
               upstream: bool = False) -> tuple[float, float]:
    """``(offset, scale)`` with which :func:`write_volume_run` stored a run (stored = (source - offset) * scale):
    its global mean and 1 / standard deviation for ``normalization="global"`` applied by brainfm, else ``(0, 1)``
    (``none``, or normalized ``upstream``: SwiFT frames are stored as they are)."""
    if normalization == "global" and not upstream and global_std and float(global_std) > 0:
        return float(global_mean or 0.0), 1.0 / float(global_std)
    return 0.0, 1.0


def read_meta(path: Path) -> dict | None:
    """``meta.json`` of a run directory, or None when missing/unreadable/not a brainfm volume run."""
    try:
        meta = json.loads((path / META).read_text())
    except (OSError, ValueError):
        return None
    return current_keys(meta) if isinstance(meta, dict) and meta.get("layout") == LAYOUT else None


def run_is_finished(path: str | os.PathLike) -> bool:
    """A run directory with a complete ``meta.json`` and a ``bold.npy`` of the recorded size."""
    path = Path(path)
    if read_meta(path) is None:
        return False
    try:
        return npy_layout(path / BOLD)[2] <= (path / BOLD).stat().st_size
    except (OSError, ValueError, DataError):
        return False


# -- writer -----------------------------------------------------------------------------------------------
def _chunk_frames(n_voxels: int, itemsize: int = 8, budget: int = 256 << 20) -> int:
    return max(1, budget // max(1, n_voxels * itemsize))


def _mask_from_stats(rule: str, mean: np.ndarray, vmin: np.ndarray, vmax: np.ndarray, valid: np.ndarray,
                     affine: np.ndarray | None, name: str) -> tuple[np.ndarray, str]:
    """Brain mask from per-voxel statistics of the input grid (see :func:`write_volume_run`)."""
    nonzero = valid & ((vmin != 0) | (vmax != 0))
    if rule == "auto":
        rule = "nonzero" if (~nonzero).mean() >= 0.05 else "threshold"
    if rule == "all":
        return valid.copy(), "all"
    if rule == "nonzero":
        return nonzero, "nonzero"
    if rule == "threshold":
        m = mean[valid]
        p2, p98 = np.percentile(m, [2, 98]) if m.size else (0.0, 0.0)
        thr = p2 + 0.1 * (p98 - p2)
        return valid & (mean > thr), f"threshold (temporal mean > p2 + 10% of (p98 - p2) = {thr:.6g})"
    if rule == "epi":
        import nibabel as nib
        from nilearn.masking import compute_epi_mask

        img = nib.Nifti1Image(np.where(valid, mean, 0).astype(np.float32), np.eye(4) if affine is None else affine)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            epi = np.asarray(compute_epi_mask(img).dataobj).astype(bool)
        return valid & epi, "epi (nilearn.masking.compute_epi_mask of the temporal mean)"
    raise ConfigError(f"mask rule {rule!r} is not one of {MASK_RULES} (or a mask array/file)")


def write_volume_run(
    root: str | os.PathLike,
    subject: str,
    run: str,
    frames: FrameSource | np.ndarray,
    *,
    tr: float,
    affine: np.ndarray | None = None,
    mask: np.ndarray | str | Callable = "auto",
    crop_pad: CropPad | None = None,
    normalization: str = "global",
    fill: str = "min",
    source: str | None = None,
    applied_upstream: str | None = None,
    extra_meta: dict[str, Any] | None = None,
    overwrite: bool = False,
    chunk_frames: int | None = None,
    nan: str = "error",
    orientation: str | None = None,
) -> Path:
    """Normalize one run and write it to ``<root>/<subject>/<run>/`` atomically.

    Two passes over the frames: statistics (per-voxel sums, min/max, non-finite values), then
    normalization, crop/pad and the float16 write into a temporary directory that is renamed
    when complete. Memory stays bounded (chunks of frames), so HCP-size runs (91x109x91x1200)
    do not need to fit in memory.

    Args:
        root: store root. subject, run: ids (folder names: letters, digits, ``._-``).
        frames: ``(T, X, Y, Z)`` array or a :class:`FrameSource` on the input grid.
        tr: repetition time in seconds.
        affine: 4x4 voxel-to-world affine of the input grid (None: unknown, recorded as null).
        orientation: the voxel orientation to store the run in (``LAS`` or ``RAS``,
            :mod:`brainfm.data.orientation`). With an ``affine`` the frames (and an array ``mask``) are
            reoriented from the affine's axis codes to it before anything else (the stored affine follows, and
            ``crop_pad`` applies to the reoriented grid); without one it is declared (SwiFT frames: ``LAS``).
            None: the run is stored as it lies (recorded as the affine's axis codes, or unknown).
            ``meta.json`` records ``orientation`` and ``source_orientation``.
        mask: bool ``(X, Y, Z)`` on the input grid, or a rule computed from the data: ``nonzero``
            (voxels not 0 at every TR: registered, skull-stripped data such as SwiFT's inputs),
            ``threshold`` (temporal mean above the 2nd percentile + 10 % of the 2nd-98th
            percentile range, as FSL FEAT's brain/background threshold: raw EPI with a noisy
            background), ``epi`` (``nilearn.masking.compute_epi_mask``; unreliable on small
            fields of view), ``all``, or ``auto`` (``nonzero`` when >= 5 % of the voxels are 0 at
            every TR, else ``threshold``), or a callable ``(mean, min, max, valid) -> (mask,
            description)`` of per-voxel statistics. Voxels that are NaN/inf at every TR are
            background (as are voxels outside the mask, whatever their values).
        crop_pad: crop/pad to the output grid (None: none); padding takes the fill value. On the grid after
            reorientation (``orientation``).
        normalization: ``global`` (z-score over brain voxels x TRs, as SwiFT) or ``none``
            (values as given; they must fit float16).
        fill: background value: ``min`` (brain minimum after normalization, SwiFT's default) or
            ``zero``.
        source: provenance (input file) recorded in meta.json.
        applied_upstream: normalization already applied to ``frames`` (e.g. ``global`` for SwiFT
            frames); recorded as the run's normalization. Requires ``normalization="none"``.
        extra_meta: more provenance fields for meta.json.
        overwrite: replace a finished run (else it is kept and its path returned).
        chunk_frames: TRs per chunk (default: ~256 MB of float64).
        nan: brain voxels that are NaN/inf at some (not all) TRs: ``error`` (raise
            :class:`NonFiniteError`, nothing written) or ``fill`` (each non-finite value is replaced
            by its voxel's temporal mean over the finite TRs before normalization; the statistics
            are those of the filled data). Recorded in meta.json as ``nan_policy`` with
            ``nan_filled_voxels`` and ``nan_filled_values`` (voxel x TR values replaced).

    Returns:
        The run directory.

    Raises:
        NonFiniteError: (a DataError) NaN/inf at some TRs of brain voxels with ``nan="error"``:
            the file, the 0-based TRs and the voxel count of each are named.
        DataError: an empty mask, a constant brain, values that overflow float16, a mask of the
            wrong shape, or an unreadable source.
        ConfigError: unknown normalization, fill, mask rule or orientation; a bad crop/pad.
    """
    if normalization not in NORMALIZATIONS:
        raise ConfigError(f"normalization={normalization!r} is not one of {NORMALIZATIONS}")
    if fill not in FILLS:
        raise ConfigError(f"fill={fill!r} is not one of {FILLS}")
    if nan not in NAN_HANDLING:
        raise ConfigError(f"nan={nan!r} is not one of {NAN_HANDLING}")
    if applied_upstream is not None and normalization != "none":
        raise ConfigError("applied_upstream needs normalization='none' (data normalized twice otherwise)")
    if tr is None or not math.isfinite(float(tr)) or float(tr) <= 0:
        raise DataError(f"{source or subject}: repetition time must be a positive number of seconds, got {tr!r}")
    final = run_dir(root, subject, run)
    if run_is_finished(final) and not overwrite:
        return final
    src: FrameSource = ArrayFrames(frames, source or f"{subject}/{run}") if isinstance(frames, np.ndarray) else frames
    name = source or src.name
    source_orientation = axcodes(affine)
    stored_orientation = source_orientation
    if orientation is not None:
        stored_orientation = check_orientation_name(orientation, "orientation")
        if affine is not None:  # reorient the frames, an array mask and the affine (crop/pad follows)
            reorientation = Reorientation(affine, src.spatial_shape, stored_orientation)
            if not reorientation.identity:
                src = ReorientedFrames(src, reorientation)
                if not isinstance(mask, str) and not callable(mask) and np.ndim(mask) == 3:
                    mask = reorientation.volume(np.asarray(mask))
            affine = reorientation.affine
        else:  # nothing to reorient by: declared (e.g. SwiFT frames, LAS)
            source_orientation = stored_orientation
    where = f"{name} (subject {subject}, run {run})"
    T, in_shape = int(src.n_frames), tuple(int(s) for s in src.spatial_shape)
    if T < 1:
        raise DataError(f"{where} has no frames")
    crop_pad = crop_pad or CropPad()
    out_shape = crop_pad.output_shape(in_shape)
    n_vox = int(np.prod(in_shape))
    chunk = int(chunk_frames or _chunk_frames(n_vox))

    # pass 1: per-voxel statistics over the input grid
    shift = None
    s1 = np.zeros(in_shape)
    s2 = np.zeros(in_shape)
    vmin = np.full(in_shape, np.inf)
    vmax = np.full(in_shape, -np.inf)
    bad_count = np.zeros(in_shape, dtype=np.int64)
    for t0 in range(0, T, chunk):
        t1 = min(T, t0 + chunk)
        x = np.asarray(src.read(t0, t1), dtype=np.float64)
        if x.shape != (t1 - t0, *in_shape):
            raise DataError(f"{where}: frames {t0}-{t1 - 1} have shape {x.shape[1:]}, expected {in_shape}")
        finite = np.isfinite(x)
        if not finite.all():
            bad = ~finite
            bad_count += bad.sum(axis=0)
            x = np.where(finite, x, 0.0)
            vmin = np.minimum(vmin, np.where(finite, x, np.inf).min(axis=0))
            vmax = np.maximum(vmax, np.where(finite, x, -np.inf).max(axis=0))
        else:
            vmin = np.minimum(vmin, x.min(axis=0))
            vmax = np.maximum(vmax, x.max(axis=0))
        if shift is None:
            shift = x[0].copy()
        d = x - shift
        if not finite.all():
            d = np.where(finite, d, 0.0)
        s1 += d.sum(axis=0)
        s2 += np.einsum("t...,t...->...", d, d)
    all_bad = bad_count == T
    partial = (bad_count > 0) & ~all_bad
    valid = ~all_bad
    n_valid = np.maximum(T - bad_count, 1)
    vmean = shift + s1 / n_valid
    vvar = np.maximum(s2 / n_valid - (s1 / n_valid) ** 2, 0.0)

    # mask on the input grid
    mask_rule = "array"
    if callable(mask):
        brain, mask_rule = mask(vmean, vmin, vmax, valid)
        brain = np.asarray(brain, dtype=bool) & valid
    elif isinstance(mask, str):
        brain, mask_rule = _mask_from_stats(mask, vmean, vmin, vmax, valid, affine, name)
    else:
        brain = np.asarray(mask).astype(bool)
        if brain.shape != in_shape:
            raise DataError(f"{where}: brain mask has shape {brain.shape}, the data {in_shape}")
        brain = brain & valid
    if not brain.any():
        raise DataError(
            f"{where}: the brain mask ({mask_rule}) is empty. Fix: pass --mask <file> or another rule "
            f"({', '.join(MASK_RULES)})"
        )

    # brain voxels that are NaN/inf at some TRs: an error, or filled with the voxel's temporal mean
    bad_brain = partial & brain
    n_fill_voxels = int(bad_brain.sum())
    n_fill_values = int(bad_count[bad_brain].sum())
    if n_fill_voxels and nan == "error":
        frames_bad, counts = nonfinite_frames(src, bad_brain, chunk)
        raise nonfinite_error(where, frames_bad, counts, n_fill_voxels, T)
    if n_fill_voxels:  # the filled voxel keeps its mean; its variance shrinks by (finite TRs) / T
        vvar[bad_brain] *= (T - bad_count[bad_brain]) / T

    # global statistics over brain voxels x TRs (law of total variance: stable in float64)
    bm, bv = vmean[brain], vvar[brain]
    g_mean = float(bm.mean())
    g_std = float(math.sqrt(max(float(bv.mean() + ((bm - g_mean) ** 2).mean()), 0.0)))
    raw_min, raw_max = float(vmin[brain].min()), float(vmax[brain].max())
    if normalization == "global":
        if not g_std > 0:
            raise DataError(f"{where}: the brain is constant over voxels and TRs; it cannot be z-scored")
        scale, offset = 1.0 / g_std, g_mean
    else:
        if max(abs(raw_min), abs(raw_max)) > FP16_MAX:
            raise DataError(
                f"{where}: values up to {max(abs(raw_min), abs(raw_max)):.6g} do not fit float16 "
                f"(max {FP16_MAX:g}) with normalization none. Fix: --normalization global"
            )
        scale, offset = 1.0, 0.0
    lo, hi = (raw_min - offset) * scale, (raw_max - offset) * scale
    fill_value = float(np.float16(lo)) if fill == "min" else 0.0

    # crop/pad the mask and the statistics to the output grid
    src_region, dst_region = crop_pad.slices(in_shape)
    brain_out = np.zeros(out_shape, dtype=bool)
    brain_out[dst_region] = brain[src_region]
    cut = int(brain.sum() - brain_out.sum())
    if cut:
        warnings.warn(f"{where}: crop/pad {crop_pad.as_list()} removes {cut} brain voxel(s) of {int(brain.sum())}",
                      stacklevel=2)
    if not brain_out.any():
        raise DataError(f"{where}: crop/pad {crop_pad.as_list()} removes the whole brain")
    mean_out = np.full(out_shape, fill_value, dtype=np.float32)
    std_out = np.zeros(out_shape, dtype=np.float32)
    mean_out[dst_region] = np.where(brain[src_region], (vmean[src_region] - offset) * scale, fill_value)
    std_out[dst_region] = np.where(brain[src_region], np.sqrt(vvar[src_region]) * scale, 0.0)

    # pass 2: write into a temporary directory, rename when complete
    with staged_run_dir(root, subject, run) as tmp:
        bold = np.lib.format.open_memmap(tmp / BOLD, mode="w+", dtype=np.float16, shape=(T, *out_shape))
        in_mask = brain[src_region]
        if n_fill_voxels:
            fill_in, fill_with = bad_brain[src_region], vmean[src_region].astype(np.float32)
        chunk2 = int(chunk_frames or _chunk_frames(int(np.prod(out_shape)), itemsize=6))
        for t0 in range(0, T, chunk2):
            t1 = min(T, t0 + chunk2)
            x = np.asarray(src.read(t0, t1))[(slice(None), *src_region)].astype(np.float32)
            if n_fill_voxels:
                x = np.where(np.isfinite(x) | ~fill_in, x, fill_with)
            z = np.where(in_mask, (x - np.float32(offset)) * np.float32(scale), np.float32(fill_value))
            block = np.full((t1 - t0, *out_shape), fill_value, dtype=np.float16)
            block[(slice(None), *dst_region)] = z
            bold[t0:t1] = block
        bold.flush()
        del bold
        fsync_path(tmp / BOLD)
        save_npy(tmp / MASK, brain_out)
        save_npy(tmp / VOXEL_MEAN, mean_out)
        save_npy(tmp / VOXEL_STD, std_out)
        meta = {
            "layout": LAYOUT,
            "layout_version": LAYOUT_VERSION,
            "subject": subject,
            "run": run,
            "tr": float(tr),
            "n_frames": T,
            "shape": list(out_shape),
            "dtype": "float16",
            "axes": "T X Y Z",
            "affine": None if affine is None else crop_pad.affine(affine).round(6).tolist(),
            "original_shape": [*in_shape, T],
            "crop_pad": crop_pad.as_list(),
            "orientation": stored_orientation,
            "source_orientation": source_orientation,
            "normalization": applied_upstream or normalization,
            "source_offset": float(offset),
            "source_scale": float(scale),
            "global_mean": g_mean,
            "global_std": g_std,
            "min": float(np.float16(lo)),
            "max": float(np.float16(hi)),
            "fill": fill,
            "fill_value": fill_value,
            "mask": {"rule": mask_rule, "brain_voxels": int(brain_out.sum()), "brain_voxels_cropped": cut},
            "nan_policy": nan,
            "nan_filled_voxels": n_fill_voxels,
            "nan_filled_values": n_fill_values,
            "source": source,
            "brainfm_version": brainfm_version(),
            **(extra_meta or {}),
        }
        publish_run_dir(tmp, final, meta, META)
    return final


# -- reader ------------------------------------------------------------------------------------------------
class VolumeStore(RunDirStore):
    """Reader of a volume store (layout in the module docstring), opened from its run index.

    Runs are ordered by (subject, run); ``run`` everywhere is the position in that order. With an
    index (``index.parquet``, written by ``brainfm-preprocess`` or ``brainfm-data index``) opening
    reads one file; each run's arrays are checked the first time a process reads it. Without one,
    every run's ``meta.json`` and array headers are read and checked at open (older stores).

    Args:
        root: the store folder. cache: ``data.cache`` sizes (``open_runs`` file descriptors, ``masks``).
        validate: check every run's files now (``brainfm-data validate``).

    Attributes:
        subject_ids, run_ids, lengths (TRs), trs (s), shapes ``(n_runs, 3)``: the run table.
        shape / frame_shape: the common grid (X, Y, Z), or None when runs differ. tr: the common TR or None.

    ``run_stats(run)``: ``n`` (TRs), ``normalization``, ``fill``, ``fill_value``, ``min``/``max`` (brain,
    as stored), ``global_mean``/``global_std`` (raw units, before normalization), ``brain_voxels``,
    ``source_offset``/``source_scale`` (stored = (source - offset) * scale). ``column("orientation")`` and
    ``column("source_orientation")``: each run's axis codes (None: indexed before they were recorded).

    Raises:
        DataError: missing root, no runs, unreadable ``meta.json`` or index, a ``.npy`` whose header
            disagrees with ``meta.json``, or a truncated ``.npy`` ("re-run brainfm-preprocess").
    """

    kind = "volume"
    LAYOUT = LAYOUT
    LAYOUT_VERSION = LAYOUT_VERSION
    ARRAY = BOLD
    DTYPE = np.dtype(np.float16)
    FIX = _FIX
    STATS = ("normalization", "fill", "fill_value", "min", "max", "global_mean", "global_std", "brain_voxels",
             "source_offset", "source_scale")

    def __init__(self, root: str | os.PathLike, cache: dict | None = None, validate: bool = False) -> None:
        super().__init__(root, cache=cache, validate=validate)
        self.shape: tuple[int, int, int] | None = self.frame_shape  # type: ignore[assignment]
        self._masks = LRUCache(cache_sizes(cache)["masks"])

    def missing_message(self) -> str:
        return (f"volume store {self.root} does not exist. Fix: build it with `brainfm-preprocess volumes "
                f"--input <NIfTI folder | BIDS | fMRIPrep> --output {self.root}` (or `brainfm-preprocess "
                "frames` for SwiFT/TFF frame folders); for the embedded toy data `brainfm-data fetch nifti_toy`.")

    @classmethod
    def frame_shape_of(cls, meta: dict) -> tuple[int, ...]:
        return tuple(int(s) for s in meta["shape"])

    @classmethod
    def extra_row(cls, meta: dict) -> dict[str, Any]:
        mask = meta.get("mask") or {}
        orientation, source_orientation = orientation_of_meta(meta)
        if "source_scale" in meta:
            offset, scale = float(meta["source_offset"]), float(meta["source_scale"])
        else:  # written before they were recorded: what the writer applied (none for frames, normalized upstream)
            offset, scale = source_map(str(meta.get("normalization")), meta.get("global_mean"), meta.get("global_std"),
                                       meta.get("input_kind") == "frames")
        return {"normalization": str(meta.get("normalization")), "fill": str(meta.get("fill")),
                "fill_value": float(meta.get("fill_value") or 0.0), "min": float(meta.get("min", 0.0)),
                "max": float(meta.get("max", 0.0)), "global_mean": float(meta.get("global_mean", float("nan"))),
                "global_std": float(meta.get("global_std", float("nan"))),
                "brain_voxels": int(mask.get("brain_voxels", -1)),
                "crop_pad": json.dumps(meta.get("crop_pad")),
                "orientation": orientation, "source_orientation": source_orientation,
                "source_offset": offset, "source_scale": scale}

    @classmethod
    def complete_columns(cls, columns: dict[str, Any], n_rows: int) -> None:
        """Index columns an older index lacks: ``orientation`` / ``source_orientation`` unknown (None; ``brainfm-data
        index <store>`` records them from each run's affine), ``source_offset`` / ``source_scale`` from the
        ``normalization``, ``global_mean`` and ``global_std`` columns (:func:`source_map`; frames converted by an
        older ``brainfm-preprocess frames`` cannot be told apart there and are taken to be brainfm-normalized)."""
        import pyarrow as pa

        for name in ("orientation", "source_orientation"):
            if name not in columns:
                columns[name] = pa.array([None] * n_rows, type=pa.string())
        have = columns.get("source_scale")
        if have is None or have.null_count:  # a whole older index, or its rows merged with newer ones
            offsets = columns["source_offset"].to_pylist() if have is not None else [None] * n_rows
            scales = have.to_pylist() if have is not None else [None] * n_rows
            for i, (n, m, sd) in enumerate(zip(columns["normalization"].to_pylist(), columns["global_mean"].to_pylist(),
                                               columns["global_std"].to_pylist())):
                if scales[i] is None:
                    offsets[i], scales[i] = source_map(str(n), m, sd)
            columns["source_offset"] = pa.array(offsets, type=pa.float64())
            columns["source_scale"] = pa.array(scales, type=pa.float64())

    @classmethod
    def check_files(cls, rdir: Path, meta: dict) -> None:
        shape = tuple(int(s) for s in meta["shape"])
        where = f"(subject {meta['subject']}, run {meta['run']})"
        for fname, dtype in ((MASK, np.bool_), (VOXEL_MEAN, np.float32), (VOXEL_STD, np.float32)):
            path = rdir / fname
            if not path.is_file():
                raise DataError(f"{path} is missing {where}. {_FIX}")
            got_shape, got_dtype, size, _ = npy_layout(path)
            if got_shape != shape or got_dtype != np.dtype(dtype):
                raise DataError(f"{path} holds {got_dtype} {got_shape} but meta.json says {np.dtype(dtype)} {shape} "
                                f"{where}. {_FIX}")
            if path.stat().st_size < size:
                raise DataError(f"{path} is truncated: {path.stat().st_size} bytes of {size} {where}. {_FIX}")

    def crop_pads(self) -> list:
        """The crop/pad of each run (``[[x_before, x_after], ...]`` or None), from the index."""
        return [json.loads(v) if isinstance(v, str) else v for v in self.column("crop_pad")]

    def mask(self, run: int) -> np.ndarray:
        """Brain mask ``(X, Y, Z)`` bool of run ``run`` (an LRU of ``data.cache.masks`` per process).

        Raises:
            DataError: a missing or unreadable ``mask.npy``.
        """
        def load() -> np.ndarray:
            path = self.path(run) / MASK
            try:
                m = np.load(path)
            except (OSError, ValueError) as exc:
                raise DataError(f"{path} is missing or unreadable ({exc}; {self.describe_run(run)}). {_FIX}") from exc
            if m.shape != tuple(self.shapes[run]) or m.dtype != np.bool_:
                raise DataError(f"{path} holds {m.dtype} {m.shape}, expected bool {tuple(self.shapes[run])}. {_FIX}")
            return m

        return self._masks.get(run, load)

    def voxel_stats(self, run: int) -> tuple[np.ndarray, np.ndarray]:
        """Per-voxel mean and standard deviation over time ``(X, Y, Z)`` float32 of the stored run
        (read-only memory maps; not cached here)."""
        p = self.path(run)
        try:
            return np.load(p / VOXEL_MEAN, mmap_mode="r"), np.load(p / VOXEL_STD, mmap_mode="r")
        except (OSError, ValueError) as exc:
            raise DataError(f"{p}: per-voxel statistics are missing or unreadable ({exc}). {_FIX}") from exc

    def __repr__(self) -> str:
        tr = f"{self.tr:g}s" if self.tr is not None else "mixed " + "/".join(f"{t:g}" for t in sorted(set(self.trs)))
        orientations = sorted({str(v) if v is not None else "unknown" for v in self.column("orientation")})
        return (f"VolumeStore({self.root}, runs={len(self)}, subjects={len(set(self.subject_ids))}, "
                f"shape={self.shape}, tr={tr}, TRs={int(self.lengths.sum())}, orientation={'/'.join(orientations)}, "
                f"index={'yes' if self.indexed else 'no'})")
