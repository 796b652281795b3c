"""From NIfTI (a folder, a BIDS data set, or fMRIPrep derivatives) to brainfm's stores.

- :func:`preprocess_volumes`: every 4-D BOLD run -> one run of the volume store
  (:mod:`brainfm.data.volume_store`): TR, brain mask, crop/pad to the model's grid, global
  z-normalisation and background fill as SwiFT, float16. Runs in parallel, resumable (finished
  runs are skipped; each run is written to a temporary folder and renamed).
- :func:`parcellate`: every run -> ROI time series of an atlas (nilearn's
  ``NiftiLabelsMasker``/``NiftiMapsMasker``) -> the HDF5 ROI store
  (:func:`brainfm.data.roi_store.write_roi_h5`) that the sequence models read.

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
header (``pixdim[4]`` in the header's time unit: s, ms or us; an unknown unit is read as seconds,
or as milliseconds for values >= 100). A TR outside [0.1, 20] s is an error: a header written
without a TR (``pixdim[4]`` = 0 or 1 by default) is the commonest cause of silently wrong time axes.
"""

from __future__ import annotations

import json
import math
import multiprocessing as mp
import os
import re
import warnings
import zlib
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from brainfm.data.volume_store import (
    FILLS,
    MASK_RULES,
    NORMALISATIONS,
    CropPad,
    run_dir,
    run_is_finished,
    safe_name,
    write_volume_run,
)
from brainfm.errors import ConfigError, DataError

TR_RANGE_S = (0.1, 20.0)
DEFAULT_SPACE = "MNI152NLin2009cAsym"
#: SwiFT's crop/pad of each data set (``datasets.py``), converted to axis order.
CROP_PAD_PRESETS: dict[str, CropPad] = {
    # HCP 75x93x81 (after SwiFT's own crop) -> 96^3: torch pad (8, 7, 2, 1, 11, 10)
    "swift_hcp": CropPad.from_torch_pad((8, 7, 2, 1, 11, 10)),
    # ABCD rest 79x97x85 -> 96^3: torch pad (6, 5, 0, 0, 9, 8), then Y cropped to 96
    "swift_abcd_rest": CropPad((9, 8), (0, -1), (6, 5)),
    # UKB 91x109x91 -> 96^3: torch pad (3, 2, -7, -6, 3, 2)
    "swift_ukb": CropPad.from_torch_pad((3, 2, -7, -6, 3, 2)),
}
_NIFTI = re.compile(r"\.nii(\.gz)?$")
_UNREADABLE = (OSError, EOFError, ValueError, zlib.error, MemoryError)


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


def repetition_time(path: Path, img, sidecar: dict | None = None, override: float | None = None) -> tuple[float, str]:
    """TR in seconds and where it came from (``--tr``, sidecar or header; module docstring).

    Raises:
        DataError: no TR anywhere, 0, or outside [0.1, 20] s, naming the file and the fix.
    """
    lo, hi = TR_RANGE_S
    fix = f"Fix: pass --tr <seconds> (or add \"RepetitionTime\" to {strip_nifti(path.name)}.json)"
    if override is not None:
        tr, source = float(override), "--tr"
    elif sidecar and sidecar.get("RepetitionTime") is not None:
        try:
            tr = float(sidecar["RepetitionTime"])
        except (TypeError, ValueError):
            raise DataError(f"{path}: sidecar RepetitionTime {sidecar['RepetitionTime']!r} is not a number. {fix}")
        source = "sidecar RepetitionTime"
    else:
        value = float(img.header["pixdim"][4])
        unit = img.header.get_xyzt_units()[1]
        factor = {"sec": 1.0, "msec": 1e-3, "usec": 1e-6}.get(unit)
        if factor is None:  # unknown unit
            factor = 1e-3 if value >= 100 else 1.0
        tr = round(value * factor, 6)  # headers store float32: 1.35 reads as 1.350000023841858
        source = f"header pixdim[4]={value:g} ({unit})"
        if not value > 0:
            raise DataError(f"{path}: no repetition time: no JSON sidecar with RepetitionTime and the NIfTI "
                            f"header's pixdim[4] is {value:g}. {fix}")
    if not math.isfinite(tr) or not lo <= tr <= hi:
        raise DataError(f"{path}: implausible repetition time {tr:g} s (from {source}); expected {lo:g}-{hi:g} s. {fix}")
    return tr, source


class NiftiFrames:
    """A 4-D NIfTI as a :class:`~brainfm.data.volume_store.FrameSource` ``(T, X, Y, Z)``.

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
        except _UNREADABLE as exc:
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
    except _UNREADABLE as exc:
        raise DataError(f"{path}: the mask cannot be read ({exc}); copy it again") from exc
    m = m.reshape(m.shape[:3]) if m.ndim == 4 and m.shape[3] == 1 else m
    if m.shape != tuple(shape):
        raise DataError(f"mask {path} has shape {m.shape} but {data_path} has a {tuple(shape)} grid; "
                        "resample the mask to the BOLD grid")
    if not np.allclose(img.affine, affine, atol=1e-3):
        raise DataError(f"mask {path} and {data_path} have different affines (grids); resample the mask")
    return m > 0


# -- volumes ----------------------------------------------------------------------------------------------------
@dataclass
class RunResult:
    """What happened to one run: ``written``, ``skipped`` (finished before) or ``failed``."""

    subject: str
    run: str
    source: str
    status: str
    path: str | None = None
    error: str | None = None
    warnings: list[str] = field(default_factory=list)
    config_error: bool = False


def resolve_crop_pad(crop_pad: CropPad | Sequence[int] | str | None, target_shape: Sequence[int] | None,
                     in_shape: Sequence[int]) -> CropPad | None:
    """The crop/pad of a run: explicit (6 ints in axis order, or a SwiFT preset name), or the
    centred crop/pad to ``target_shape``; with both, the explicit one must reach the target.

    Raises:
        ConfigError: unknown preset, or an explicit crop/pad that does not reach the target.
    """
    cp: CropPad | None
    if isinstance(crop_pad, str):
        if crop_pad not in CROP_PAD_PRESETS:
            raise ConfigError(f"unknown crop/pad preset {crop_pad!r}; presets: {sorted(CROP_PAD_PRESETS)}")
        cp = CROP_PAD_PRESETS[crop_pad]
    elif crop_pad is None or isinstance(crop_pad, CropPad):
        cp = crop_pad
    else:
        cp = CropPad.from_axis_order(crop_pad)
    if target_shape is None:
        return cp
    target = tuple(int(s) for s in target_shape)
    if cp is None:
        return CropPad.centred(in_shape, target)
    got = cp.output_shape(in_shape)
    if got != target:
        raise ConfigError(f"crop/pad {cp.as_list()} takes a {tuple(in_shape)} grid to {got}, not the target {target}")
    return cp


def _preprocess_one(src: RunSource, root: str, options: dict) -> RunResult:
    result = RunResult(src.subject, src.run, str(src.path), "failed")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            img = load_nifti(src.path)
            frames = NiftiFrames(src.path, img)
            tr, tr_source = repetition_time(src.path, img, src.sidecar, options["tr"])
            mask: Any = options["mask"]
            mask_source = None
            if mask not in MASK_RULES:
                mask_source = str(mask)
                mask = load_mask_file(Path(mask), frames.spatial_shape, frames.affine, src.path)
            elif mask == "auto" and src.mask_path is not None:
                mask_source = str(src.mask_path)
                mask = load_mask_file(src.mask_path, frames.spatial_shape, frames.affine, src.path)
            cp = resolve_crop_pad(options["crop_pad"], options["target_shape"], frames.spatial_shape)
            path = write_volume_run(
                root, src.subject, src.run, frames, tr=tr, affine=frames.affine, mask=mask, crop_pad=cp,
                normalisation=options["normalisation"], fill=options["fill"], source=str(src.path),
                overwrite=options["overwrite"],
                extra_meta={"tr_source": tr_source, "mask_file": mask_source, "input_kind": src.kind,
                            "sidecars": [str(p) for p in src.sidecar_paths],
                            "source_dtype": str(img.get_data_dtype())},
            )
            result.status, result.path = "written", str(path)
        except (DataError, ConfigError) as exc:
            result.error = str(exc)
            result.config_error = isinstance(exc, ConfigError)
        except Exception as exc:  # keep the other runs going; report this one with its file
            result.error = f"{src.path}: {type(exc).__name__}: {exc}"
    result.warnings = [str(w.message) for w in caught if not issubclass(w.category, DeprecationWarning)]
    return result


def _pool(workers: int) -> ProcessPoolExecutor:
    method = "fork" if "fork" in mp.get_all_start_methods() else None
    return ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context(method))


def _run_all(fn, items: list, workers: int, progress: bool, desc: str, fail_fast: bool) -> list:
    from tqdm.auto import tqdm

    results: list = [None] * len(items)
    import sys

    tty = sys.stderr.isatty()  # off a terminal (SLURM logs): one line every 30 s, not a live bar
    bar = tqdm(total=len(items), desc=desc, unit="run", disable=not progress or not items,
               mininterval=0.1 if tty else 30.0)
    try:
        if workers <= 1 or len(items) <= 1:
            for i, args in enumerate(items):
                results[i] = fn(*args)
                bar.update(1)
                if fail_fast and getattr(results[i], "status", None) == "failed":
                    break
        else:
            with _pool(min(workers, len(items))) as pool:
                futures = {pool.submit(fn, *args): i for i, args in enumerate(items)}
                for fut in as_completed(futures):
                    results[futures[fut]] = fut.result()
                    bar.update(1)
                    if fail_fast and getattr(results[futures[fut]], "status", None) == "failed":
                        for f in futures:
                            f.cancel()
                        break
    finally:
        bar.close()
    return results


def preprocess_volumes(
    input: str | os.PathLike,
    output: str | os.PathLike,
    *,
    pattern: str | None = None,
    space: str = DEFAULT_SPACE,
    tr: float | None = None,
    crop_pad: CropPad | Sequence[int] | str | None = None,
    target_shape: Sequence[int] | None = None,
    normalisation: str = "global",
    fill: str = "min",
    mask: str = "auto",
    workers: int = 1,
    overwrite: bool = False,
    progress: bool = True,
    fail_fast: bool = False,
) -> list[RunResult]:
    """Preprocess every BOLD run under ``input`` into the volume store at ``output``.

    Args:
        input: NIfTI folder, BIDS root, fMRIPrep derivatives root, or one file.
        output: store root (``<output>/<subject>/<run>/``).
        pattern: glob of the runs relative to ``input`` (default by input kind: module docstring).
        space: fMRIPrep output space.
        tr: repetition time in seconds for every run (overrides sidecars and headers).
        crop_pad: 6 ints in axis order (x_before x_after y_before y_after z_before z_after;
            negative crops), a preset of :data:`CROP_PAD_PRESETS`, or a :class:`CropPad`.
        target_shape: (X, Y, Z) of the output grid (centred crop/pad unless ``crop_pad``).
        normalisation: ``global`` or ``none``. fill: ``min`` or ``zero``.
        mask: ``auto`` (fMRIPrep's brain mask when present, else a rule from the data), a rule of
            :data:`~brainfm.data.volume_store.MASK_RULES`, or a NIfTI mask file for every run.
        workers: parallel processes (one run each).
        overwrite: rewrite finished runs (default: skip them, so a stopped job resumes).
        progress: tqdm progress bar.
        fail_fast: stop at the first failed run (default: process the others, then raise).

    Returns:
        One :class:`RunResult` per run, in discovery order.

    Raises:
        DataError: nothing to read, or any run failed (all failures listed; the finished runs stay).
        ConfigError: an invalid option.
    """
    if normalisation not in NORMALISATIONS:
        raise ConfigError(f"--normalisation {normalisation!r} is not one of {NORMALISATIONS}")
    if fill not in FILLS:
        raise ConfigError(f"--fill {fill!r} is not one of {FILLS}")
    if mask not in MASK_RULES and not Path(mask).is_file():
        raise ConfigError(f"--mask {mask!r} is neither a rule ({', '.join(MASK_RULES)}) nor an existing mask file")
    if isinstance(crop_pad, str) and crop_pad not in CROP_PAD_PRESETS:
        raise ConfigError(f"unknown crop/pad preset {crop_pad!r}; presets: {sorted(CROP_PAD_PRESETS)}")
    runs = discover_runs(input, pattern, space)
    results: list[RunResult | None] = [None] * len(runs)
    todo = []
    for i, src in enumerate(runs):
        if not overwrite and run_is_finished(run_dir(output, src.subject, src.run)):
            results[i] = RunResult(src.subject, src.run, str(src.path), "skipped",
                                   str(run_dir(output, src.subject, src.run)))
        else:
            todo.append(i)
    options = {"tr": tr, "crop_pad": crop_pad, "target_shape": target_shape, "normalisation": normalisation,
               "fill": fill, "mask": mask, "overwrite": overwrite}
    Path(output).mkdir(parents=True, exist_ok=True)
    done = _run_all(_preprocess_one, [(runs[i], str(output), options) for i in todo], workers, progress,
                    "brainfm-preprocess volumes", fail_fast)
    for i, r in zip(todo, done):
        results[i] = r if r is not None else RunResult(runs[i].subject, runs[i].run, str(runs[i].path),
                                                       "failed", error="not run (--fail-fast)")
    failed = [r for r in results if r.status == "failed"]
    config = [r for r in failed if r.config_error]
    if config:  # the options, not a file, are wrong
        raise ConfigError(f"{config[0].source}: {config[0].error}")
    if failed:
        ok = sum(r.status != "failed" for r in results)
        lines = "\n".join(f"  - {r.error}" for r in failed[:20]) + ("\n  ..." if len(failed) > 20 else "")
        raise DataError(
            f"{len(failed)} of {len(results)} run(s) failed ({ok} finished and kept in {output}):\n{lines}\n"
            "Fix these and run the same command again: finished runs are skipped."
        )
    return results  # type: ignore[return-value]


# -- parcellation ------------------------------------------------------------------------------------------------
@dataclass
class Atlas:
    """A parcellation: a 3-D labels image (``kind="labels"``) or 4-D probabilistic maps (``"maps"``)."""

    img: Any
    kind: str
    name: str
    roi_names: list[str] | None
    source: str


def _read_names(path: Path) -> dict[int, str] | list[str]:
    """ROI names: ``.tsv``/``.csv`` with ``index``/``name`` columns (BIDS ``dseg.tsv``; else the
    first two columns) -> {label: name}; ``.txt``: one name per line -> list."""
    if path.suffix in (".tsv", ".csv"):
        import pandas as pd

        df = pd.read_csv(path, sep="\t" if path.suffix == ".tsv" else ",")
        cols = list(df.columns)
        idx = "index" if "index" in cols else cols[0]
        name = "name" if "name" in cols else cols[1]
        return {int(i): str(n) for i, n in zip(df[idx], df[name])}
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


_NILEARN_ATLASES = {
    "schaefer": ("fetch_atlas_schaefer_2018", "n_rois", "Schaefer 2018 (7 networks, 2 mm)"),
    "difumo": ("fetch_atlas_difumo", "dimension", "DiFuMo (2 mm)"),
}


def load_atlas(atlas: str | os.PathLike, roi_names: str | os.PathLike | None = None, name: str | None = None) -> Atlas:
    """A labels/maps NIfTI file, or a nilearn atlas name (``schaefer<N>``, ``difumo<N>``).

    nilearn's fetchers download on first use (and cache in ``~/nilearn_data``); offline, pass
    the atlas file instead.

    Raises:
        DataError: unreadable file, a labels image with non-integer values, names that do not
            match the regions, or a fetch that fails.
    """
    import nibabel as nib

    spec = str(atlas)
    path = Path(spec)
    names: dict[int, str] | list[str] | None = None
    if path.is_file():
        img = load_nifti(path)
        try:
            data = np.asanyarray(img.dataobj)
        except _UNREADABLE as exc:
            raise DataError(f"atlas {path} cannot be read ({exc})") from exc
        if data.ndim == 4 and data.shape[3] > 1:
            img = nib.Nifti1Image(data, img.affine, img.header)
            kind = "maps"
        else:
            data = data.reshape(data.shape[:3])
            if not np.allclose(data, np.round(data)):
                raise DataError(f"atlas {path} is 3-D with non-integer values; a labels image holds integer labels "
                                "(a probabilistic atlas is 4-D: one map per region)")
            img = nib.Nifti1Image(np.round(data).astype(np.int32), img.affine)
            kind = "labels"
        stem = strip_nifti(path.name)
        for ext in (".tsv", ".csv", ".txt"):
            side = path.with_name(stem + ext)
            if roi_names is None and side.is_file():
                roi_names = side
        atlas_name = name or safe_name(stem)
        source = str(path)
    else:
        m = re.fullmatch(r"(schaefer|difumo)(\d+)", spec.lower())
        if not m:
            raise DataError(f"atlas {spec!r} is neither a file nor a known nilearn atlas (schaefer<N>, difumo<N>)")
        fetcher, arg, desc = _NILEARN_ATLASES[m.group(1)]
        from nilearn import datasets

        try:
            kw = {arg: int(m.group(2)), "resolution_mm": 2}
            bunch = getattr(datasets, fetcher)(**kw)
        except Exception as exc:
            raise DataError(f"nilearn could not fetch {spec} ({exc}). Offline: download the atlas elsewhere and "
                            "pass --atlas <labels or maps NIfTI> (--roi-names <tsv|txt>)") from exc
        img = nib.load(bunch.maps) if isinstance(bunch.maps, (str, os.PathLike)) else bunch.maps
        kind = "maps" if len(img.shape) == 4 else "labels"
        labels = bunch.labels
        if hasattr(labels, "columns"):  # DiFuMo: a table
            col = "difumo_names" if "difumo_names" in labels.columns else labels.columns[1]
            labels = list(labels[col])
        labels = [lab.decode() if isinstance(lab, bytes) else str(lab) for lab in labels]
        if labels and labels[0].lower() == "background":
            labels = labels[1:]
        names = labels
        atlas_name = name or spec.lower()
        source = f"nilearn.datasets.{fetcher}({kw})"
    if roi_names is not None:
        names = _read_names(Path(roi_names))
    return Atlas(img, kind, atlas_name, names, source)  # type: ignore[arg-type]


def _parcellate_one(src: RunSource, atlas: Atlas, tr_override: float | None, use_mask: bool) -> dict:
    from nilearn.maskers import NiftiLabelsMasker, NiftiMapsMasker

    try:
        img = load_nifti(src.path)
        frames = NiftiFrames(src.path, img)
        tr, _ = repetition_time(src.path, img, src.sidecar, tr_override)
        data = frames._raw if frames._raw is not None else None
        if data is not None and not np.isfinite(data).all():
            t = np.flatnonzero(~np.isfinite(data).reshape(-1, frames.n_frames).all(axis=0))
            raise DataError(f"{src.path}: NaN/inf at TR(s) {', '.join(map(str, t[:10]))}; fix the run first")
        mask_img = in_memory(load_nifti(src.mask_path)) if (use_mask and src.mask_path is not None) else None
        kw = dict(standardize=False, resampling_target="data", mask_img=mask_img, t_r=tr)
        masker = (NiftiLabelsMasker(atlas.img, strategy="mean", **kw) if atlas.kind == "labels"
                  else NiftiMapsMasker(atlas.img, **kw))
        import nibabel as nib

        raw = frames._raw if frames._raw is not None else np.asanyarray(img.dataobj)
        raw = raw.reshape(*frames.spatial_shape, frames.n_frames)
        if frames.slope != 1.0 or frames.inter != 0.0:
            raw = raw * frames.slope + frames.inter
        img4 = nib.Nifti1Image(raw, img.affine)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            series = np.asarray(masker.fit_transform(img4), dtype=np.float32).T  # (n_rois, T)
        ids = list(getattr(masker, "region_ids_", {}).values()) if atlas.kind == "labels" else None
        ids = [int(i) for i in ids if str(i) != "background"] if ids else None
        return {"ok": True, "tr": tr, "series": series, "ids": ids}
    except (DataError, ConfigError) as exc:
        return {"ok": False, "error": str(exc)}
    except Exception as exc:
        return {"ok": False, "error": f"{src.path}: {type(exc).__name__}: {exc}"}


def parcellate(
    input: str | os.PathLike,
    atlas: str | os.PathLike,
    output: str | os.PathLike,
    *,
    pattern: str | None = None,
    space: str = DEFAULT_SPACE,
    tr: float | None = None,
    roi_names: str | os.PathLike | None = None,
    atlas_name: str | None = None,
    use_brain_mask: bool = True,
    workers: int = 1,
    progress: bool = True,
) -> Path:
    """ROI time series of every run -> the HDF5 ROI store (``/timeseries/<atlas>``, TR, ROI names).

    Labels atlases use ``NiftiLabelsMasker(strategy="mean")``, 4-D probabilistic atlases (e.g.
    DiFuMo, Thomas et al. 2022's parcellation) ``NiftiMapsMasker``; the atlas is resampled to
    each run's grid (nearest neighbour for labels). The BOLD is not standardised (the ROI data
    module z-scores per run). fMRIPrep brain masks restrict the voxels when present.

    Args:
        input, pattern, space, tr: as :func:`preprocess_volumes`.
        atlas: labels (3-D integer) or maps (4-D) NIfTI, or ``schaefer<N>``/``difumo<N>``.
        output: the ``.h5`` file (written atomically).
        roi_names: ``.tsv``/``.csv`` (``index``, ``name``) or ``.txt`` (one per region, in label
            order); default: a file beside the atlas with the same stem, else ``roi_<label>``.
        atlas_name: name under ``/timeseries`` (default: the atlas file's stem).
        use_brain_mask: restrict to fMRIPrep's brain mask when present.
        workers: parallel processes.

    Raises:
        DataError: unreadable runs (all listed), runs with different TRs, regions missing from a
            run's field of view, or names that do not match the regions.
    """
    from brainfm.data.roi_store import write_roi_h5

    runs = discover_runs(input, pattern, space)
    at = load_atlas(atlas, roi_names, atlas_name)
    results = _run_all(_parcellate_one, [(r, at, tr, use_brain_mask) for r in runs], workers, progress,
                       "brainfm-preprocess parcellate", False)
    failed = [r["error"] for r in results if not r["ok"]]
    if failed:
        raise DataError(f"{len(failed)} of {len(runs)} run(s) failed; nothing written:\n"
                        + "\n".join(f"  - {e}" for e in failed[:20]))
    trs = sorted({round(r["tr"], 6) for r in results})
    if len(trs) > 1:
        by_tr = {t: [f"{s.subject}/{s.run}" for s, r in zip(runs, results) if round(r["tr"], 6) == t][:3] for t in trs}
        raise DataError(f"runs under {input} have different TRs {by_tr}; an ROI store holds one TR. Fix: "
                        "parcellate each TR into its own file (--pattern), or resample the runs")
    ids = results[0]["ids"]
    n = results[0]["series"].shape[0]
    for s, r in zip(runs, results):
        if r["series"].shape[0] != n or r["ids"] != ids:
            missing = sorted(set(ids or []) - set(r["ids"] or [])) if ids else "?"
            raise DataError(f"{s.path}: {r['series'].shape[0]} regions of the atlas are in its field of view, "
                            f"{n} in {runs[0].path} (missing labels: {missing}); every run must cover every region")
    names = at.roi_names
    if isinstance(names, dict):
        if ids is None:
            raise DataError("ROI names given as an index table need a labels atlas")
        missing = [i for i in ids if i not in names]
        if missing:
            raise DataError(f"ROI names table lacks labels {missing[:10]}")
        names = [names[i] for i in ids]
    elif names is None:
        names = [f"roi_{i}" for i in ids] if ids else [f"roi_{i}" for i in range(n)]
    elif len(names) != n:
        raise DataError(f"{len(names)} ROI names for {n} regions of atlas {at.source}")
    return write_roi_h5(
        output,
        series={at.name: [r["series"] for r in results]},
        subject_ids=[r.subject for r in runs],
        run_ids=[r.run for r in runs],
        tr=float(results[0]["tr"]),
        roi_names={at.name: names},
        attrs={"source": str(input), "atlas": at.source,
               "extraction": "nilearn NiftiLabelsMasker(strategy='mean')" if at.kind == "labels"
               else "nilearn NiftiMapsMasker",
               "units": "BOLD as in the input files (not standardised)",
               "roi_labels": np.asarray(ids if ids else list(range(1, n + 1)), dtype=np.int64)},
    )
