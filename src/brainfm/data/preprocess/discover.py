"""From NIfTI (a folder, a BIDS data set, or fMRIPrep derivatives) to brainfm's stores.

- :func:`preprocess_volumes`: every 4-D BOLD run -> one run of the volume store
  (:mod:`brainfm.data.stores.volume`): TR, brain mask, crop/pad to the model's grid, global
  z-normalization and background fill as SwiFT, float16. Runs in parallel and in shards
  (``--shard I/N`` or a SLURM job array), resumable (finished runs are skipped; each run is written
  to a temporary folder and renamed), with the store's run index kept up to date
  (:mod:`brainfm.data.preprocess.volumes`).
- :func:`parcellate`: every run -> ROI time series of an atlas (nilearn's
  ``NiftiLabelsMasker``/``NiftiMapsMasker``) -> one part file per run, merged by the last shard
  into the HDF5 ROI store (:class:`brainfm.data.stores.roi.ROIStoreWriter`) that the sequence
  models read (:mod:`brainfm.data.preprocess.parcellate`).

The discovered runs are sorted by (subject, run) before sharding (:mod:`brainfm.data.preprocess.runner`).

Inputs:

- **fMRIPrep derivatives** (a ``dataset_description.json`` naming fMRIPrep, or any
  ``*_desc-preproc_bold.nii*``): ``*_space-MNI152NLin2009cAsym*_desc-preproc_bold.nii.gz``
  with their ``*_desc-brain_mask.nii.gz`` (used as the brain mask when present) and JSON sidecars.
- **BIDS** (``dataset_description.json``): ``sub-*/[ses-*/]func/*_bold.nii[.gz]``; the TR is
  ``RepetitionTime`` of the sidecars, with BIDS inheritance (a ``task-rest_bold.json`` at the root
  applies to every matching run; the nearest file wins).
- **a folder of NIfTI files** (``*_bold.nii*`` if there are any, else ``*.nii*``, searched
  recursively; ``--pattern`` chooses others). Subject and run ids come from BIDS entities in the
  file name (``sub-01_ses-1_task-rest_run-2_bold.nii.gz`` -> subject ``sub-01``, run
  ``ses-1_task-rest_run-2``), else subject = the file name without extension (as SwiFT's
  ``preprocessing.py``) and run ``run-1``.

The TR comes from ``--tr``, else the JSON sidecar's ``RepetitionTime`` (seconds), else the NIfTI
header: ``pixdim[4]`` in the header's time unit (``xyzt_units``: s, ms or us, converted to seconds),
used only when that unit is set and the value is plausible (:data:`TR_RANGE_S`). A header without a
time unit (nibabel and many converters write ``pixdim[4]`` = 1 and no unit by default), with
``pixdim[4]`` = 0, or with an implausible value is refused with the fix ``--tr <seconds>``: a header
written without a TR is the commonest cause of silently wrong time axes. A usable header TR that
disagrees with ``--tr`` or the sidecar is reported (the given TR is used).
"""

from __future__ import annotations

import json
import math
import os
import re
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from brainfm.data.stores.rundir import safe_name
from brainfm.errors import DataError

#: plausible fMRI repetition times in seconds: the fastest whole-brain sequences (MREG, inverse imaging) reach
#: ~0.1 s; sparse-sampling designs go up to ~16-20 s. A value outside is a unit error (720 = ms read as s, 0.00072 =
#: s read as ms) or not an fMRI time axis.
TR_RANGE_S = (0.1, 30.0)
#: NIfTI ``xyzt_units`` time codes (as nibabel names them) and their factor to seconds
HEADER_TIME_UNITS = {"sec": 1.0, "msec": 1e-3, "usec": 1e-6}
DEFAULT_SPACE = "MNI152NLin2009cAsym"
_NIFTI = re.compile(r"\.nii(\.gz)?$")
#: what reading a damaged or truncated NIfTI raises (nibabel, gzip, numpy), caught to name the file
UNREADABLE_ERRORS = (OSError, EOFError, ValueError, zlib.error, MemoryError)


# -- file names, entities, sidecars -------------------------------------------------------------------
def strip_nifti(name: str) -> str:
    return _NIFTI.sub("", name)


def bids_entities(name: str) -> tuple[dict[str, str], str | None]:
    """``("sub-01_task-rest_bold.nii.gz")`` -> ``({"sub": "01", "task": "rest"}, "bold")``."""
    parts = strip_nifti(Path(name).name).removesuffix(".json").split("_")
    suffix = parts[-1] if "-" not in parts[-1] else None
    ents = {}
    for p in parts[:-1] if suffix else parts:
        if "-" in p:
            k, v = p.split("-", 1)
            ents[k] = v
    return ents, suffix


def find_sidecars(path: Path, root: Path) -> list[Path]:
    """JSON sidecars that apply to ``path`` by BIDS inheritance, least specific first."""
    ents, suffix = bids_entities(path.name)
    own = path.with_name(strip_nifti(path.name) + ".json")
    found: list[Path] = []
    dirs = []
    d = path.parent
    root = root.resolve()
    while True:
        dirs.append(d)
        if d.resolve() == root or d.parent == d:
            break
        d = d.parent
    for d in reversed(dirs):
        for j in sorted(d.glob("*.json")):
            if j == own or j.name == "dataset_description.json":
                continue
            je, js = bids_entities(j.name)
            if js == suffix and je and all(ents.get(k) == v for k, v in je.items()):
                found.append(j)
    if own.is_file():
        found.append(own)
    return found


def read_sidecars(paths: Sequence[Path]) -> dict:
    out: dict = {}
    for p in paths:
        try:
            data = json.loads(p.read_text())
        except (OSError, ValueError) as exc:
            raise DataError(f"{p}: unreadable JSON sidecar ({exc}); fix or delete it") from exc
        if isinstance(data, dict):
            out.update(data)
    return out


@dataclass
class RunSource:
    """One BOLD run found in the input: file, ids, sidecar metadata, brain mask if given."""

    path: Path
    subject: str
    run: str
    kind: str  # "fmriprep" | "bids" | "folder"
    sidecar: dict = field(default_factory=dict)
    sidecar_paths: list[Path] = field(default_factory=list)
    mask_path: Path | None = None


def detect_kind(root: Path) -> str:
    """``fmriprep``, ``bids`` or ``folder`` (see the module docstring)."""
    desc = root / "dataset_description.json"
    if desc.is_file():
        try:
            d = json.loads(desc.read_text())
        except (OSError, ValueError):
            d = {}
        names = [str(g.get("Name", "")) for g in d.get("GeneratedBy", []) if isinstance(g, dict)]
        names.append(str(d.get("PipelineDescription", {}).get("Name", "")))
        if any("fmriprep" in n.lower() for n in names):
            return "fmriprep"
    if next(root.glob("**/*_desc-preproc_bold.nii*"), None) is not None:
        return "fmriprep"
    return "bids" if desc.is_file() else "folder"


def discover_runs(input: str | os.PathLike, pattern: str | None = None, space: str = DEFAULT_SPACE) -> list[RunSource]:
    """The BOLD runs under ``input`` (a folder, BIDS root, fMRIPrep derivatives root, or a file).

    Raises:
        DataError: missing input, no run found, or two files giving the same (subject, run).
    """
    root = Path(input)
    if not root.exists():
        raise DataError(f"input {root} does not exist")
    if root.is_file():
        files, kind, root = [root], "folder", root.parent
    else:
        kind = detect_kind(root)
        if pattern is None:
            if kind == "fmriprep":
                pattern = f"**/*_space-{space}*_desc-preproc_bold.nii*"
            elif kind == "bids":
                pattern = "sub-*/**/*_bold.nii*"
            else:
                pattern = "**/*_bold.nii*" if next(root.glob("**/*_bold.nii*"), None) else "**/*.nii*"
        files = sorted(p for p in root.glob(pattern) if p.is_file() and _NIFTI.search(p.name)
                       and not any(part.startswith(".") for part in p.relative_to(root).parts))
    if not files:
        raise DataError(
            f"no NIfTI run found under {root} (looked for {pattern!r}, input read as {kind}). "
            "Fix: --pattern '<glob>' relative to the input (e.g. '**/*_bold.nii.gz')"
        )
    runs, seen = [], {}
    for f in files:
        ents, _ = bids_entities(f.name)
        if "sub" in ents:
            subject = safe_name(f"sub-{ents['sub']}")
            rest = [f"{k}-{v}" for k, v in ents.items() if k not in ("sub", "space", "desc", "res", "den", "cohort")]
            run = safe_name("_".join(rest)) if rest else "run-1"
        else:
            subject, run = safe_name(strip_nifti(f.name)), "run-1"
        key = (subject, run)
        if key in seen:
            raise DataError(
                f"{seen[key]} and {f} both map to subject {subject!r} run {run!r}. Fix: a narrower "
                "--pattern, or rename one file (BIDS entities sub-/ses-/task-/run- name the runs)"
            )
        seen[key] = f
        side = find_sidecars(f, root)
        mask_path = None
        if kind == "fmriprep":
            stem = strip_nifti(f.name).replace("_desc-preproc_bold", "_desc-brain_mask")
            for ext in (".nii.gz", ".nii"):
                if (f.parent / (stem + ext)).is_file():
                    mask_path = f.parent / (stem + ext)
                    break
        runs.append(RunSource(f, subject, run, kind, read_sidecars(side), side, mask_path))
    return runs


# -- NIfTI reading -----------------------------------------------------------------------------------------
def load_nifti(path: Path):
    """``nibabel`` image of ``path``; DataError naming the file if it is not readable NIfTI."""
    import nibabel as nib

    try:
        return nib.load(str(path), keep_file_open=True)
    except Exception as exc:  # nibabel raises ImageFileError, OSError, EOFError, zlib.error ...
        raise DataError(f"{path} cannot be read as NIfTI ({type(exc).__name__}: {exc}). The file is "
                        "truncated or corrupt: copy or download it again") from exc


def header_tr(img) -> tuple[float | None, str]:
    """The TR in seconds the NIfTI header of ``img`` records (``pixdim[4]`` converted from its ``xyzt_units``
    time unit), or None, and where it came from or why there is none (no time unit, ``pixdim[4]`` 0).
    The value is not checked against :data:`TR_RANGE_S` here."""
    try:
        value = float(img.header["pixdim"][4])
        unit = img.header.get_xyzt_units()[1]
    except Exception:  # not a NIfTI-1/2 header
        return None, "the header has no pixdim/xyzt_units"
    factor = HEADER_TIME_UNITS.get(unit)
    if not math.isfinite(value) or value <= 0:
        return None, f"the NIfTI header's pixdim[4] is {value:g}"
    if factor is None:
        return None, (f"the NIfTI header's pixdim[4] is {value:g} but its time unit (xyzt_units) is {unit!r}, "
                      "not s, ms or us, so it is not a TR (nibabel and many converters write pixdim[4] = 1 and no "
                      "unit when they know no TR)")
    return round(value * factor, 6), f"header pixdim[4]={value:g} ({unit})"  # float32: 1.35 reads as 1.3500000238


def repetition_time(path: Path, img, sidecar: dict | None = None, override: float | None = None,
                    notes: list[str] | None = None) -> tuple[float, str]:
    """TR in seconds and where it came from (``--tr``, sidecar or header; module docstring).

    Args:
        path: the NIfTI (for messages). img: its nibabel image. sidecar: its JSON sidecar (BIDS).
        override: ``--tr`` in seconds. notes: a list the disagreement of a usable header TR with ``--tr`` or
            the sidecar is appended to (None: it is issued as a ``UserWarning``).

    Returns:
        ``(TR in seconds, source)``: source ``--tr``, ``sidecar RepetitionTime`` or ``header pixdim[4]=<v> (<unit>)``.

    Raises:
        DataError: no TR anywhere (no ``--tr``, no sidecar, and a header without a time unit, with ``pixdim[4]``
            0, or an implausible one), or a TR that is not finite or outside :data:`TR_RANGE_S`, naming the file
            and the fix (``--tr <seconds>``).
    """
    lo, hi = TR_RANGE_S
    fix = f"Fix: pass --tr <seconds> (or add \"RepetitionTime\" to {strip_nifti(path.name)}.json)"
    from_header, header_note = header_tr(img)
    if override is not None:
        tr, source = float(override), "--tr"
    elif sidecar and sidecar.get("RepetitionTime") is not None:
        try:
            tr = float(sidecar["RepetitionTime"])
        except (TypeError, ValueError):
            raise DataError(f"{path}: sidecar RepetitionTime {sidecar['RepetitionTime']!r} is not a number. {fix}")
        source = "sidecar RepetitionTime"
    else:
        if from_header is None:
            raise DataError(f"{path}: no repetition time: no --tr, no JSON sidecar with RepetitionTime, and "
                            f"{header_note}. {fix}")
        tr, source = from_header, header_note
    if not math.isfinite(tr) or not lo <= tr <= hi:
        raise DataError(f"{path}: implausible repetition time {tr:g} s (from {source}); expected {lo:g}-{hi:g} s. "
                        f"{fix}")
    disagrees = from_header is not None and not math.isclose(tr, from_header, rel_tol=1e-3, abs_tol=1e-4)
    if source != header_note and disagrees and lo <= from_header <= hi:
        note = (f"{path}: the NIfTI header says TR {from_header:g} s ({header_note}) but {source} gives {tr:g} s; "
                f"using {tr:g} s from {source}")
        if notes is None:
            import warnings

            warnings.warn(note, UserWarning, stacklevel=2)
        else:
            notes.append(note)
    return tr, source


class NiftiFrames:
    """A 4-D NIfTI as a :class:`~brainfm.data.stores.volume.FrameSource` ``(T, X, Y, Z)``.

    Files whose uncompressed data fit ``in_memory_mb`` are decompressed once and kept (both
    passes of the writer read them); larger ones are read in slabs of TRs with the file kept open
    (sequential gzip reads). Scaling (``scl_slope``/``scl_inter``) is applied per slab.

    Raises:
        DataError: a 3-D image (or 4-D with one TR), a truncated or corrupt file.
    """

    def __init__(self, path: Path, img=None, in_memory_mb: float = 2048.0) -> None:
        self.path = Path(path)
        self.name = str(path)
        self.img = img if img is not None else load_nifti(self.path)
        shape = tuple(int(s) for s in self.img.shape)
        if len(shape) == 5 and shape[3] == 1:  # (X, Y, Z, 1, T) from some converters
            shape = shape[:3] + shape[4:]
        if len(shape) != 4 or shape[3] < 2:
            raise DataError(
                f"{self.path} has shape {shape}: a {len(shape)}-D image"
                + (" with one volume" if len(shape) == 4 else "")
                + ". brainfm-preprocess volumes expects 4-D BOLD (X, Y, Z, T); pass the functional "
                "run, not a mask, anatomical or single-volume reference (or narrow --pattern)"
            )
        self.spatial_shape = shape[:3]
        self.n_frames = shape[3]
        self.affine = np.asarray(self.img.affine, dtype=np.float64)
        proxy = self.img.dataobj
        self.slope = float(getattr(proxy, "slope", 1.0) or 1.0)
        self.inter = float(getattr(proxy, "inter", 0.0) or 0.0)
        dtype = self.img.get_data_dtype()
        self._raw = None
        if np.prod(self.img.shape) * dtype.itemsize <= in_memory_mb * 2**20:
            self._raw = self._guard(lambda: np.asanyarray(proxy.get_unscaled() if hasattr(proxy, "get_unscaled") else proxy))
            self._raw = self._raw.reshape(*self.spatial_shape, self.n_frames)
            if not hasattr(proxy, "get_unscaled"):
                self.slope, self.inter = 1.0, 0.0

    def _guard(self, fn):
        try:
            return fn()
        except UNREADABLE_ERRORS as exc:
            raise DataError(
                f"{self.path}: reading the image data failed ({type(exc).__name__}: {exc}). The file is "
                "truncated or corrupt: copy or download it again"
            ) from exc

    def read(self, t0: int, t1: int) -> np.ndarray:
        if self._raw is not None:
            x = self._raw[..., t0:t1]
            if self.slope != 1.0 or self.inter != 0.0:
                x = x * self.slope + self.inter
        else:
            x = self._guard(lambda: np.asanyarray(self.img.dataobj[..., t0:t1]))
            x = x.reshape(*self.spatial_shape, t1 - t0)
        return np.moveaxis(x, -1, 0)


def in_memory(img):
    """A copy of a nibabel image with its data in memory (no open file: picklable, copyable)."""
    import nibabel as nib

    return nib.Nifti1Image(np.asanyarray(img.dataobj), img.affine, img.header)


def load_mask_file(path: Path, shape: tuple[int, ...], affine: np.ndarray, data_path: Path) -> np.ndarray:
    """A brain mask NIfTI on the data's grid as bool ``(X, Y, Z)``.

    Raises:
        DataError: unreadable file, or a grid (shape/affine) that differs from the data's.
    """
    img = load_nifti(Path(path))
    try:
        m = np.asanyarray(img.dataobj)
    except UNREADABLE_ERRORS as exc:
        raise DataError(f"{path}: the mask cannot be read ({exc}); copy it again") from exc
    m = m.reshape(m.shape[:3]) if m.ndim == 4 and m.shape[3] == 1 else m
    if m.shape != tuple(shape):
        raise DataError(f"mask {path} has shape {m.shape} but {data_path} has a {tuple(shape)} grid; "
                        "resample the mask to the BOLD grid")
    if not np.allclose(img.affine, affine, atol=1e-3):
        raise DataError(f"mask {path} and {data_path} have different affines (grids); resample the mask")
    return m > 0


