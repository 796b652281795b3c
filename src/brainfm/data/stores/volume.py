"""Store of 4-D fMRI volumes: one contiguous, memory-mappable float16 array per subject run.

Layout (one directory per subject run)::

    <root>/<subject>/<run>/
        bold.npy        float16 (T, X, Y, Z), C order, numpy .npy format (np.load(mmap_mode="r")):
                        already normalised (``meta.normalisation``) with the background filled
                        (``meta.fill``), on the output grid (after crop/pad): ready for a model
        mask.npy        bool (X, Y, Z) brain mask on the output grid
        voxel_mean.npy  float32 (X, Y, Z) per-voxel mean over time of bold.npy (fill outside the brain)
        voxel_std.npy   float32 (X, Y, Z) per-voxel standard deviation over time (0 outside the brain)
        meta.json       subject, run, tr (s), n_frames, shape, affine (4x4 of the output grid),
                        original_shape, crop_pad, normalisation, global_mean/global_std (raw units),
                        min/max (brain, as stored), fill, fill_value, mask rule, source, version

A run is written into a hidden temporary directory beside its final place (``.<run>.tmp-...``) and
renamed when complete, ``meta.json`` last: a run directory that exists with a readable
``meta.json`` is finished, and preprocessing skips it when resumed.

Normalisation follows SwiFT (Kim et al., NeurIPS 2023; Transconnectome/SwiFT
``preprocessing.py``): ``global`` z-scores with one mean and standard deviation over all brain
voxels x all TRs of the run, and the background is filled with the brain minimum after
normalisation (``fill="min"``) or 0 (``fill="zero"``). The per-voxel statistics allow the
per-voxel z-normalisation of TFF (Malkiel et al. 2022) and a min-max scaling at load time.
Unlike SwiFT (which takes every voxel equal to 0 at a given TR as background), the brain mask is one
3-D mask per run, so a brain voxel that happens to be 0 at one TR is not filled.

Other frames-per-file layouts cost one file open per TR (20-40 per sample); here a clip of
consecutive TRs is one contiguous byte range of one file.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import socket
import uuid
import warnings
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from brainfm.errors import ConfigError, DataError

LAYOUT = "brainfm-volume-run"
LAYOUT_VERSION = 1
BOLD, MASK, VOXEL_MEAN, VOXEL_STD, META = "bold.npy", "mask.npy", "voxel_mean.npy", "voxel_std.npy", "meta.json"
NORMALISATIONS = ("global", "none")
FILLS = ("min", "zero")
MASK_RULES = ("auto", "nonzero", "threshold", "epi", "all")
FP16_MAX = 65504.0
_SAFE = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-")
_FIX = "Fix: re-run brainfm-preprocess for it (delete the folder first)."


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
def check_name(value: str, what: str) -> str:
    """A subject or run id usable as a folder name (letters, digits, ``._-``)."""
    value = str(value)
    if not value or value.startswith(".") or not set(value) <= _SAFE:
        raise DataError(
            f"{what} {value!r} cannot be a store folder name; use letters, digits, '.', '_' and '-' "
            "(not starting with '.')"
        )
    return value


def safe_name(value: str) -> str:
    """``value`` with characters outside ``[A-Za-z0-9._-]`` replaced by ``_``."""
    out = "".join(c if c in _SAFE else "_" for c in str(value)).lstrip(".")
    return out or "_"


def run_dir(root: str | os.PathLike, subject: str, run: str) -> Path:
    return Path(root) / check_name(subject, "subject id") / check_name(run, "run id")


def read_meta(path: Path) -> dict | None:
    """``meta.json`` of a run directory, or None when missing/unreadable/not a brainfm run."""
    try:
        meta = json.loads((path / META).read_text())
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) and meta.get("layout") == LAYOUT else None


def run_is_finished(path: str | os.PathLike) -> bool:
    """A run directory with a complete ``meta.json`` and a ``bold.npy`` of the recorded size."""
    path = Path(path)
    meta = read_meta(path)
    if meta is None:
        return False
    try:
        return _npy_layout(path / BOLD)[2] <= (path / BOLD).stat().st_size
    except (OSError, ValueError, DataError):
        return False


def _npy_layout(path: Path) -> tuple[tuple[int, ...], np.dtype, int, int]:
    """``(shape, dtype, expected file size, data offset)`` from a .npy header."""
    with open(path, "rb") as f:
        try:
            version = np.lib.format.read_magic(f)
            if version == (1, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
            else:
                shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
        except ValueError as exc:
            raise DataError(f"{path}: not a readable .npy file ({exc})") from exc
        offset = f.tell()
    if fortran:
        raise DataError(f"{path}: Fortran-ordered array; brainfm writes C order")
    return tuple(int(s) for s in shape), np.dtype(dtype), offset + int(np.prod(shape)) * np.dtype(dtype).itemsize, offset


def _fsync(path: Path) -> None:
    """Flush a file or a directory entry to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def publish_run_dir(tmp: Path, final: Path, meta: dict, meta_name: str) -> None:
    """Finish a run folder written under the temporary name ``tmp``: write its ``meta_name`` (the
    file whose presence marks a complete run) durably, then move it to ``final`` in one rename,
    replacing an existing folder (an overwrite, or a folder left without a complete meta file)."""
    with open(tmp / meta_name, "w") as f:
        json.dump(meta, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    if final.exists():
        trash = final.parent / f".{final.name}.old-{uuid.uuid4().hex[:8]}"
        os.replace(final, trash)
        os.replace(tmp, final)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(tmp, final)
    _fsync(final.parent)


def _save_npy(path: Path, array: np.ndarray) -> None:
    with open(path, "wb") as f:
        np.save(f, array)
        f.flush()
        os.fsync(f.fileno())


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_stale_temp(root: str | os.PathLike, subject: str, run: str) -> list[Path]:
    """Remove temporary directories of ``run`` left by killed writers on this host."""
    parent = Path(root) / subject
    removed = []
    if not parent.is_dir():
        return removed
    host = socket.gethostname()
    for p in parent.glob(f".{run}.tmp-*"):
        parts = p.name[len(f".{run}.tmp-"):].rsplit("-", 2)
        if len(parts) == 3 and parts[0] == host and parts[1].isdigit() and not _pid_alive(int(parts[1])):
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    return removed


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
    normalisation: str = "global",
    fill: str = "min",
    source: str | None = None,
    applied_upstream: str | None = None,
    extra_meta: dict[str, Any] | None = None,
    overwrite: bool = False,
    chunk_frames: int | None = None,
) -> Path:
    """Normalise one run and write it to ``<root>/<subject>/<run>/`` atomically.

    Two passes over the frames: statistics (per-voxel sums, min/max, non-finite values), then
    normalisation, crop/pad and the float16 write into a temporary directory that is renamed
    when complete. Memory stays bounded (chunks of frames), so HCP-size runs (91x109x91x1200)
    do not need to fit in memory.

    Args:
        root: store root. subject, run: ids (folder names: letters, digits, ``._-``).
        frames: ``(T, X, Y, Z)`` array or a :class:`FrameSource` on the input grid.
        tr: repetition time in seconds.
        affine: 4x4 voxel-to-world affine of the input grid (None: unknown, recorded as null).
        mask: bool ``(X, Y, Z)`` on the input grid, or a rule computed from the data: ``nonzero``
            (voxels not 0 at every TR: registered, skull-stripped data such as SwiFT's inputs),
            ``threshold`` (temporal mean above the 2nd percentile + 10 % of the 2nd-98th
            percentile range, as FSL FEAT's brain/background threshold: raw EPI with a noisy
            background), ``epi`` (``nilearn.masking.compute_epi_mask``; unreliable on small
            fields of view), ``all``, or ``auto`` (``nonzero`` when >= 5 % of the voxels are 0 at
            every TR, else ``threshold``), or a callable ``(mean, min, max, valid) -> (mask,
            description)`` of per-voxel statistics. Voxels that are NaN/inf at every TR are
            background.
        crop_pad: crop/pad to the output grid (None: none); padding takes the fill value.
        normalisation: ``global`` (z-score over brain voxels x TRs, as SwiFT) or ``none``
            (values as given; they must fit float16).
        fill: background value: ``min`` (brain minimum after normalisation, SwiFT's default) or
            ``zero``.
        source: provenance (input file) recorded in meta.json.
        applied_upstream: normalisation already applied to ``frames`` (e.g. ``global`` for SwiFT
            frames); recorded as the run's normalisation. Requires ``normalisation="none"``.
        extra_meta: more provenance fields for meta.json.
        overwrite: replace a finished run (else it is kept and its path returned).
        chunk_frames: TRs per chunk (default: ~256 MB of float64).

    Returns:
        The run directory.

    Raises:
        DataError: NaN/inf at some TRs of a voxel (the frames are named), an empty mask, a
            constant brain, values that overflow float16, a mask of the wrong shape, or an
            unreadable source.
        ConfigError: unknown normalisation, fill or mask rule; a bad crop/pad.
    """
    if normalisation not in NORMALISATIONS:
        raise ConfigError(f"normalisation={normalisation!r} is not one of {NORMALISATIONS}")
    if fill not in FILLS:
        raise ConfigError(f"fill={fill!r} is not one of {FILLS}")
    if applied_upstream is not None and normalisation != "none":
        raise ConfigError("applied_upstream needs normalisation='none' (data normalised twice otherwise)")
    if tr is None or not math.isfinite(float(tr)) or float(tr) <= 0:
        raise DataError(f"{source or subject}: repetition time must be a positive number of seconds, got {tr!r}")
    final = run_dir(root, subject, run)
    if run_is_finished(final) and not overwrite:
        return final
    src: FrameSource = ArrayFrames(frames, source or f"{subject}/{run}") if isinstance(frames, np.ndarray) else frames
    name = source or src.name
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
    bad_per_frame = np.zeros(T, dtype=np.int64)
    for t0 in range(0, T, chunk):
        t1 = min(T, t0 + chunk)
        x = np.asarray(src.read(t0, t1), dtype=np.float64)
        if x.shape != (t1 - t0, *in_shape):
            raise DataError(f"{where}: frames {t0}-{t1 - 1} have shape {x.shape[1:]}, expected {in_shape}")
        finite = np.isfinite(x)
        if not finite.all():
            bad = ~finite
            bad_count += bad.sum(axis=0)
            bad_per_frame[t0:t1] = bad.reshape(t1 - t0, -1).sum(axis=1)
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
    if partial.any():
        frames_bad = np.flatnonzero(bad_per_frame > int(all_bad.sum()))
        shown = ", ".join(str(int(t)) for t in frames_bad[:10]) + (" ..." if len(frames_bad) > 10 else "")
        raise DataError(
            f"{where}: NaN/inf values in {int(partial.sum())} voxel(s) at TR(s) {shown} (of {T}; 0-based). "
            "Fix: censor/interpolate these frames (or drop them) before preprocessing; voxels that are "
            "NaN at every TR are treated as background."
        )
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

    # global statistics over brain voxels x TRs (law of total variance: stable in float64)
    bm, bv = vmean[brain], vvar[brain]
    g_mean = float(bm.mean())
    g_std = float(math.sqrt(max(float(bv.mean() + ((bm - g_mean) ** 2).mean()), 0.0)))
    raw_min, raw_max = float(vmin[brain].min()), float(vmax[brain].max())
    if normalisation == "global":
        if not g_std > 0:
            raise DataError(f"{where}: the brain is constant over voxels and TRs; it cannot be z-scored")
        scale, offset = 1.0 / g_std, g_mean
    else:
        if max(abs(raw_min), abs(raw_max)) > FP16_MAX:
            raise DataError(
                f"{where}: values up to {max(abs(raw_min), abs(raw_max)):.6g} do not fit float16 "
                f"(max {FP16_MAX:g}) with normalisation none. Fix: --normalisation global"
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
    final.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_temp(root, subject, run)
    tmp = final.parent / f".{run}.tmp-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        bold = np.lib.format.open_memmap(tmp / BOLD, mode="w+", dtype=np.float16, shape=(T, *out_shape))
        in_mask = brain[src_region]
        chunk2 = int(chunk_frames or _chunk_frames(int(np.prod(out_shape)), itemsize=6))
        for t0 in range(0, T, chunk2):
            t1 = min(T, t0 + chunk2)
            x = np.asarray(src.read(t0, t1))[(slice(None), *src_region)].astype(np.float32)
            z = np.where(in_mask, (x - np.float32(offset)) * np.float32(scale), np.float32(fill_value))
            block = np.full((t1 - t0, *out_shape), fill_value, dtype=np.float16)
            block[(slice(None), *dst_region)] = z
            bold[t0:t1] = block
        bold.flush()
        del bold
        _fsync(tmp / BOLD)
        _save_npy(tmp / MASK, brain_out)
        _save_npy(tmp / VOXEL_MEAN, mean_out)
        _save_npy(tmp / VOXEL_STD, std_out)
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
            "normalisation": applied_upstream or normalisation,
            "global_mean": g_mean,
            "global_std": g_std,
            "min": float(np.float16(lo)),
            "max": float(np.float16(hi)),
            "fill": fill,
            "fill_value": fill_value,
            "mask": {"rule": mask_rule, "brain_voxels": int(brain_out.sum()), "brain_voxels_cropped": cut},
            "source": source,
            "brainfm_version": _brainfm_version(),
            **(extra_meta or {}),
        }
        publish_run_dir(tmp, final, meta, META)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def _brainfm_version() -> str:
    try:
        from importlib.metadata import version

        return version("brainfm")
    except Exception:  # not installed (source checkout on the path)
        return "unknown"


# -- reader ------------------------------------------------------------------------------------------------
_MADV_POPULATE_READ = 22  # Linux >= 5.14: map the pages of a range in one call


@dataclass
class VolumeRun:
    """One indexed run: where it is and what its meta.json says."""

    subject: str
    run: str
    path: Path
    n_frames: int
    tr: float
    shape: tuple[int, int, int]
    meta: dict


class VolumeStore:
    """Index and reader of a volume store (layout in the module docstring).

    Runs are ordered by (subject, run); ``run_index`` everywhere is the position in that order.
    At construction every run's ``meta.json`` and the headers and sizes of its arrays are
    checked, so a truncated or mismatched file fails here, naming the file, not in a worker
    in the middle of training.

    Attributes:
        runs: :class:`VolumeRun` per run. subject_ids, run_ids: per run.
        lengths: ``(n_runs,)`` int64 TRs. trs: ``(n_runs,)`` float64 seconds.
        tr: the common TR in seconds, or None when runs differ. shape: common (X, Y, Z) or None.

    Raises:
        DataError: missing root, no runs, unreadable meta.json, a .npy whose header disagrees with
            meta.json, or a truncated .npy ("re-run brainfm-preprocess").
    """

    def __init__(self, root: str | os.PathLike, validate: bool = True, max_open: int = 32) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise DataError(
                f"volume store {self.root} does not exist. Fix: build it with `brainfm-preprocess volumes "
                f"--input <NIfTI folder | BIDS | fMRIPrep> --output {self.root}` (or `brainfm-preprocess "
                "frames` for SwiFT/TFF frame folders); for the embedded toy data `brainfm-data fetch nifti_toy`."
            )
        runs = []
        for meta_path in sorted(self.root.glob("*/*/" + META)):
            rdir = meta_path.parent
            if rdir.name.startswith(".") or rdir.parent.name.startswith("."):
                continue
            runs.append(self._index_run(rdir, validate))
        if not runs:
            raise DataError(
                f"{self.root} holds no runs (<subject>/<run>/meta.json). Fix: run brainfm-preprocess "
                "into it, or point data.path at the store root"
            )
        self.runs: list[VolumeRun] = runs
        self.subject_ids = [r.subject for r in runs]
        self.run_ids = [r.run for r in runs]
        self.lengths = np.array([r.n_frames for r in runs], dtype=np.int64)
        self.trs = np.array([r.tr for r in runs], dtype=np.float64)
        self.tr: float | None = float(self.trs[0]) if np.allclose(self.trs, self.trs[0], atol=1e-6) else None
        shapes = {r.shape for r in runs}
        self.shape: tuple[int, int, int] | None = next(iter(shapes)) if len(shapes) == 1 else None
        self.max_open = int(max_open)
        self._maps: OrderedDict[int, np.memmap] = OrderedDict()
        self._masks: dict[int, np.ndarray] = {}
        self._pid = os.getpid()
        self._advise = True

    def _index_run(self, rdir: Path, validate: bool) -> VolumeRun:
        meta_path = rdir / META
        try:
            meta = json.loads(meta_path.read_text())
        except (OSError, ValueError) as exc:
            raise DataError(f"{meta_path} is unreadable ({exc}). {_FIX}") from exc
        if not isinstance(meta, dict) or meta.get("layout") != LAYOUT:
            raise DataError(f"{meta_path} is not a brainfm volume run (layout {meta.get('layout') if isinstance(meta, dict) else None!r}). {_FIX}")
        if int(meta.get("layout_version", 0)) > LAYOUT_VERSION:
            raise DataError(f"{meta_path}: layout version {meta['layout_version']} is newer than this brainfm "
                            f"({LAYOUT_VERSION}); upgrade brainfm")
        try:
            subject, run = str(meta["subject"]), str(meta["run"])
            n, shape, tr = int(meta["n_frames"]), tuple(int(s) for s in meta["shape"]), float(meta["tr"])
        except (KeyError, TypeError, ValueError) as exc:
            raise DataError(f"{meta_path} lacks a field ({exc}). {_FIX}") from exc
        if (subject, run) != (rdir.parent.name, rdir.name):
            raise DataError(f"{meta_path} says subject {subject!r} run {run!r} but lies in {rdir.parent.name}/{rdir.name}")
        if validate:
            expected = {BOLD: ((n, *shape), np.float16), MASK: (shape, np.bool_),
                        VOXEL_MEAN: (shape, np.float32), VOXEL_STD: (shape, np.float32)}
            for fname, (want_shape, want_dtype) in expected.items():
                path = rdir / fname
                if not path.is_file():
                    raise DataError(f"{path} is missing (subject {subject}, run {run}). {_FIX}")
                got_shape, got_dtype, size, _ = _npy_layout(path)
                if got_shape != tuple(want_shape) or got_dtype != np.dtype(want_dtype):
                    raise DataError(
                        f"{path} holds {got_dtype} {got_shape} but meta.json says {np.dtype(want_dtype)} "
                        f"{tuple(want_shape)} (subject {subject}, run {run}). {_FIX}"
                    )
                actual = path.stat().st_size
                if actual < size:
                    raise DataError(
                        f"{path} is truncated: {actual} bytes of {size} (subject {subject}, run {run}). {_FIX}"
                    )
        return VolumeRun(subject, run, rdir, n, tr, shape, meta)

    # -- reading ------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.runs)

    def describe_run(self, i: int) -> str:
        r = self.runs[i]
        return f"subject {r.subject} ({r.run}, {r.path})"

    def meta(self, i: int) -> dict:
        return self.runs[i].meta

    def memmap(self, i: int) -> np.memmap:
        """Read-only memory map of run ``i``'s ``bold.npy``: ``(T, X, Y, Z)`` float16 (cached per
        process, at most ``max_open`` open)."""
        if self._pid != os.getpid():  # a forked worker: keep the parent's maps out of its LRU
            self._maps, self._pid = OrderedDict(), os.getpid()
        mm = self._maps.get(i)
        if mm is None:
            mm = np.load(self.runs[i].path / BOLD, mmap_mode="r")
            self._maps[i] = mm
            while len(self._maps) > self.max_open:
                self._maps.popitem(last=False)
        else:
            self._maps.move_to_end(i)
        return mm

    def read_clip(self, i: int, start: int, length: int, stride: int = 1, out: np.ndarray | None = None) -> np.ndarray:
        """TRs ``start, start + stride, ...`` (``length`` of them) of run ``i``.

        Args:
            i: run index. start: first TR (0-based). length: TRs in the clip. stride: TRs between
                the clip's frames.
            out: optional C-contiguous float16 ``(length, X, Y, Z)`` destination (e.g. a
                shared-memory tensor's ``.numpy()``): the bytes are copied straight into it.

        Returns:
            ``(length, X, Y, Z)`` float16: a read-only slice of the memory map (no copy) when
            ``out`` is None, else ``out``.

        Raises:
            IndexError: a clip outside the run.
        """
        n = int(self.lengths[i])
        last = start + (length - 1) * stride
        if length < 1 or stride < 1 or start < 0 or last >= n:
            raise IndexError(
                f"clip of {length} TRs from TR {start} every {stride} is outside run {i} "
                f"({self.describe_run(i)}, {n} TRs)"
            )
        mm = self.memmap(i)
        view = mm[start : last + 1 : stride]
        if out is None:
            return view
        if self._advise:  # map the clip's pages in one call (and start their read-ahead when cold)
            try:
                frame = int(np.prod(mm.shape[1:])) * 2
                begin = mm.offset + start * frame
                page = 4096 if not hasattr(os, "sysconf") else os.sysconf("SC_PAGE_SIZE")
                a = begin // page * page
                size = begin + (last - start + 1) * frame - a
                raw = mm._mmap
                raw.madvise(3, a, size)  # MADV_WILLNEED
                raw.madvise(_MADV_POPULATE_READ, a, size)
            except (AttributeError, OSError, ValueError):
                self._advise = False  # older kernel or platform: plain page faults
        np.copyto(out, view)
        return out

    def mask(self, i: int) -> np.ndarray:
        """Brain mask ``(X, Y, Z)`` bool of run ``i`` (cached)."""
        m = self._masks.get(i)
        if m is None:
            m = np.load(self.runs[i].path / MASK)
            self._masks[i] = m
        return m

    def voxel_stats(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """Per-voxel mean and standard deviation over time ``(X, Y, Z)`` float32 of the stored run."""
        p = self.runs[i].path
        return np.load(p / VOXEL_MEAN, mmap_mode="r"), np.load(p / VOXEL_STD, mmap_mode="r")

    def close(self) -> None:
        self._maps.clear()

    def __getstate__(self):  # memory maps do not pickle (they would be copied); reopened lazily
        state = dict(self.__dict__)
        state["_maps"] = OrderedDict()
        state["_pid"] = None
        return state

    def __repr__(self) -> str:
        tr = f"{self.tr:g}s" if self.tr is not None else "mixed " + "/".join(f"{t:g}" for t in sorted(set(self.trs)))
        return (f"VolumeStore({self.root}, runs={len(self.runs)}, subjects={len(set(self.subject_ids))}, "
                f"shape={self.shape}, tr={tr}, TRs={int(self.lengths.sum())})")
