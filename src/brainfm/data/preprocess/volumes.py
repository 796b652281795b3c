"""NIfTI runs -> the volume store (normalized float16, one array per run), sharded and resumable.

:func:`preprocess_volumes` does the runs of one shard (``runs[I::N]`` of the runs sorted by
(subject, run); :mod:`brainfm.data.preprocess.runner`), skips finished runs, writes each run atomically
(:func:`~brainfm.data.stores.volume.write_volume_run`) and keeps the store's run index
(``<output>/index.parquet``) up to date through an :class:`~brainfm.data.stores.index.IndexWriter`:
every run it writes, and every finished run it finds that the index lacks, is merged into the index
in batches under the index lock, so shards running at the same time share one index and, after any
combination of shards and resumes, the index lists every finished run.

NaN/inf values inside the brain at some TRs: ``nan="error"`` (default: the run fails, naming the file
and the TRs), ``"fill"`` (replaced by each voxel's temporal mean) or ``"drop-run"`` (the run is skipped
with a warning and reported as ``skipped-nan``; nothing is written).

Orientation: every run is reoriented to one declared voxel orientation (``orientation="LAS"``, the default,
what SwiFT's and NeuroSTORM's weights expect; or ``"RAS"``, fMRIPrep's) before crop/pad, and records it
(:mod:`brainfm.data.orientation`).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from brainfm.data.orientation import DEFAULT_ORIENTATION, Reorientation, check_orientation_name, orientation_of_meta
from brainfm.data.preprocess.discover import (
    DEFAULT_SPACE,
    NiftiFrames,
    RunSource,
    discover_runs,
    load_mask_file,
    load_nifti,
    repetition_time,
)
from brainfm.data.preprocess.runner import parse_shard, run_all
from brainfm.data.stores.index import IndexWriter, read_index
from brainfm.data.stores.rundir import run_dir
from brainfm.data.stores.volume import (
    FILLS,
    MASK_RULES,
    NORMALIZATIONS,
    CropPad,
    NonFiniteError,
    VolumeStore,
    read_meta,
    run_is_finished,
    write_volume_run,
)
from brainfm.errors import ConfigError, DataError

#: What to do with NaN/inf brain values at some TRs of a run (``--nan``; module docstring).
NAN_POLICIES = ("error", "fill", "drop-run")

#: SwiFT's crop/pad of each data set (``datasets.py``), converted to axis order.
CROP_PAD_PRESETS: dict[str, CropPad] = {
    # HCP 75x93x81 (after SwiFT's own crop) -> 96^3: torch pad (8, 7, 2, 1, 11, 10)
    "swift_hcp": CropPad.from_torch_pad((8, 7, 2, 1, 11, 10)),
    # ABCD rest 79x97x85 -> 96^3: torch pad (6, 5, 0, 0, 9, 8), then Y cropped to 96
    "swift_abcd_rest": CropPad((9, 8), (0, -1), (6, 5)),
    # UKB 91x109x91 -> 96^3: torch pad (3, 2, -7, -6, 3, 2)
    "swift_ukb": CropPad.from_torch_pad((3, 2, -7, -6, 3, 2)),
}


# -- volumes ----------------------------------------------------------------------------------------------------
@dataclass
class RunResult:
    """What happened to one run: ``written``, ``skipped`` (finished before), ``skipped-nan``
    (NaN/inf in the brain with ``nan="drop-run"``: nothing written) or ``failed``."""

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
    dropped: list[str] = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            img = load_nifti(src.path)
            frames = NiftiFrames(src.path, img)
            tr, tr_source = repetition_time(src.path, img, src.sidecar, options["tr"], notes=dropped)
            mask: Any = options["mask"]
            mask_source = None
            if mask not in MASK_RULES:
                mask_source = str(mask)
                mask = load_mask_file(Path(mask), frames.spatial_shape, frames.affine, src.path)
            elif mask == "auto" and src.mask_path is not None:
                mask_source = str(src.mask_path)
                mask = load_mask_file(src.mask_path, frames.spatial_shape, frames.affine, src.path)
            # crop/pad applies to the grid in the declared orientation (the writer reorients frames, mask, affine)
            grid = Reorientation(frames.affine, frames.spatial_shape, options["orientation"]).shape
            cp = resolve_crop_pad(options["crop_pad"], options["target_shape"], grid)
            path = write_volume_run(
                root, src.subject, src.run, frames, tr=tr, affine=frames.affine, mask=mask, crop_pad=cp,
                normalization=options["normalization"], fill=options["fill"], source=str(src.path),
                overwrite=options["overwrite"], nan="fill" if options["nan"] == "fill" else "error",
                orientation=options["orientation"],
                extra_meta={"tr_source": tr_source, "mask_file": mask_source, "input_kind": src.kind,
                            "sidecars": [str(p) for p in src.sidecar_paths],
                            "source_dtype": str(img.get_data_dtype())},
            )
            result.status, result.path = "written", str(path)
        except NonFiniteError as exc:
            if options["nan"] != "drop-run":
                result.error = str(exc)
            else:
                result.status = "skipped-nan"
                dropped.append(f"run dropped (--nan drop-run), nothing written: {exc}")
        except (DataError, ConfigError) as exc:
            result.error = str(exc)
            result.config_error = isinstance(exc, ConfigError)
        except Exception as exc:  # keep the other runs going; report this one with its file
            result.error = f"{src.path}: {type(exc).__name__}: {exc}"
    result.warnings = [str(w.message) for w in caught if not issubclass(w.category, DeprecationWarning)] + dropped
    return result


def preprocess_volumes(
    input: str | os.PathLike,
    output: str | os.PathLike,
    *,
    pattern: str | None = None,
    space: str = DEFAULT_SPACE,
    tr: float | None = None,
    crop_pad: CropPad | Sequence[int] | str | None = None,
    target_shape: Sequence[int] | None = None,
    normalization: str = "global",
    fill: str = "min",
    mask: str = "auto",
    workers: int = 1,
    overwrite: bool = False,
    progress: bool = True,
    fail_fast: bool = False,
    nan: str = "error",
    shard: tuple[int, int] | str | None = None,
    index_every: int = 256,
    orientation: str = DEFAULT_ORIENTATION,
) -> list[RunResult]:
    """Preprocess the BOLD runs under ``input`` (those of ``shard``) into the volume store at ``output``.

    Args:
        input: NIfTI folder, BIDS root, fMRIPrep derivatives root, or one file.
        output: store root (``<output>/<subject>/<run>/``).
        pattern: glob of the runs relative to ``input`` (default by input kind: module docstring).
        space: fMRIPrep output space.
        tr: repetition time in seconds for every run (overrides sidecars and headers).
        crop_pad: 6 ints in axis order (x_before x_after y_before y_after z_before z_after;
            negative crops), a preset of :data:`CROP_PAD_PRESETS`, or a :class:`CropPad`.
        target_shape: (X, Y, Z) of the output grid (centred crop/pad unless ``crop_pad``).
        normalization: ``global`` or ``none``. fill: ``min`` or ``zero``.
        mask: ``auto`` (fMRIPrep's brain mask when present, else a rule from the data), a rule of
            :data:`~brainfm.data.stores.volume.MASK_RULES`, or a NIfTI mask file for every run.
        workers: parallel processes (one run each).
        overwrite: rewrite finished runs and replace their index rows (default: skip them, so a
            stopped job resumes).
        progress: tqdm progress bar.
        fail_fast: stop at the first failed run (default: process the others, then raise).
        nan: ``error``, ``fill`` or ``drop-run`` (:data:`NAN_POLICIES`, module docstring).
        shard: ``(I, N)`` or ``"I/N"``: do ``runs[I::N]`` of the runs sorted by (subject, run)
            (None: every run; the CLI reads SLURM array variables, :func:`~brainfm.data.preprocess.runner.resolve_shard`).
        index_every: merge the rows of finished runs into ``<output>/index.parquet`` after this
            many runs (and every 60 s, and at the end).
        orientation: the voxel orientation every run is stored in, ``LAS`` (default: FSL's, the one SwiFT's
            and NeuroSTORM's released weights expect; Kim et al., NeurIPS 2023, Transconnectome/SwiFT) or ``RAS``
            (fMRIPrep's). Each run is reoriented from its affine's axis codes before crop/pad (nibabel's
            orientations module); ``meta.json`` and the index record ``orientation`` and ``source_orientation``
            (:mod:`brainfm.data.orientation`). A finished run in another orientation is not rewritten unless
            ``overwrite``.

    Returns:
        One :class:`RunResult` per run of the shard, in (subject, run) order.

    Raises:
        DataError: nothing to read, or any run failed (all failures listed; the finished runs stay,
            indexed); an unreadable run index.
        ConfigError: an invalid option or shard.
    """
    if normalization not in NORMALIZATIONS:
        raise ConfigError(f"--normalization {normalization!r} is not one of {NORMALIZATIONS}")
    if fill not in FILLS:
        raise ConfigError(f"--fill {fill!r} is not one of {FILLS}")
    if mask not in MASK_RULES and not Path(mask).is_file():
        raise ConfigError(f"--mask {mask!r} is neither a rule ({', '.join(MASK_RULES)}) nor an existing mask file")
    if isinstance(crop_pad, str) and crop_pad not in CROP_PAD_PRESETS:
        raise ConfigError(f"unknown crop/pad preset {crop_pad!r}; presets: {sorted(CROP_PAD_PRESETS)}")
    if nan not in NAN_POLICIES:
        raise ConfigError(f"--nan {nan!r} is not one of {NAN_POLICIES}")
    orientation = check_orientation_name(orientation)
    i_shard, n_shards = parse_shard(shard)
    runs = sorted(discover_runs(input, pattern, space), key=lambda r: (r.subject, r.run))[i_shard::n_shards]
    options = {"tr": tr, "crop_pad": crop_pad, "target_shape": target_shape, "normalization": normalization,
               "fill": fill, "mask": mask, "overwrite": overwrite, "nan": nan, "orientation": orientation}
    Path(output).mkdir(parents=True, exist_ok=True)
    desc = "brainfm-preprocess volumes" + (f" (shard {i_shard}/{n_shards})" if n_shards > 1 else "")
    with IndexWriter(output, VolumeStore.kind, every_rows=index_every) as index:
        results = finished_runs(runs, output, overwrite, index,
                                 lambda src: (src.subject, src.run, str(src.path)), orientation=orientation)
        todo = [i for i, r in enumerate(results) if r is None]

        def indexed(k: int, r: RunResult) -> None:
            if r.status == "written":
                try:
                    index.add(VolumeStore.index_row(Path(r.path)))
                except DataError as exc:  # not expected for a run just written; report it with the run
                    r.status, r.error = "failed", str(exc)

        done = run_all(_preprocess_one, [(runs[i], str(output), options) for i in todo], workers, progress,
                        desc, fail_fast, on_result=indexed)
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


def finished_runs(items: Sequence, output: str | os.PathLike, overwrite: bool, index: IndexWriter,
                   ids, orientation: str | None = None) -> list[RunResult | None]:
    """``skipped`` results for the items whose run folder is finished (None for the others, to do),
    adding the finished runs that ``<output>/index.parquet`` lacks to ``index``. ``ids(item)`` ->
    ``(subject, run, source)``. A finished run whose files do not check out fails, named.

    Raises:
        DataError: an unreadable index (from :func:`~brainfm.data.stores.index.read_index`).
        ConfigError: a finished run stored in another voxel orientation than ``orientation`` (skipping it would
            leave a store of mixed orientations): the fix is ``--overwrite`` or another ``--output``.
    """
    out: list[RunResult | None] = []
    if overwrite:
        return [None] * len(items)
    have = read_index(output, VolumeStore.kind)
    listed = set(zip(map(str, have["subject"]), map(str, have["run"]))) if have else set()
    for item in items:
        subject, run, source = ids(item)
        rdir = run_dir(output, subject, run)
        if not run_is_finished(rdir):
            out.append(None)
            continue
        result = RunResult(subject, run, source, "skipped", str(rdir))
        found = orientation_of_meta(read_meta(rdir) or {})[0] if orientation is not None else None
        if found is not None and found != orientation:
            raise ConfigError(
                f"{rdir} was stored in orientation {found}, not the --orientation {orientation} asked for; finished "
                f"runs are skipped, so the store would mix orientations. Fix: add --overwrite to rewrite every run "
                f"as {orientation}, or write the {orientation} store to another --output")
        if (subject, run) not in listed:
            try:
                index.add(VolumeStore.index_row(rdir))
            except DataError as exc:
                result.status, result.error = "failed", str(exc)
        out.append(result)
    return out
