"""Run directories and checkpoints: finding them, resuming, loading a task from one, and
consolidating sharded checkpoints into one file.

A brainfm checkpoint is a Lightning checkpoint whose ``hyper_parameters`` are plain containers
and whose ``brainfm`` entry records the task class, the data facts (TR, ROI names, normalisation
mode) and the normalisation statistics; it loads with ``torch.load(weights_only=True)``.

It comes in three forms (:func:`checkpoint_format`):

- ``file``: one ``torch.save`` file (1 process, DDP, FSDP2 with
  ``trainer.strategy.save_distributed_checkpoint=false``);
- ``dcp``: a directory written by torch.distributed.checkpoint (DCP) through Lightning's
  ``ModelParallelStrategy(save_distributed_checkpoint=True)``, the default of ``trainer=fsdp``:
  one shard per rank (``__<rank>_0.distcp``), DCP's ``.metadata`` index, and Lightning's
  ``meta.pt`` (everything except weights and optimizer state: step, loops, hyper-parameters,
  brainfm's entry). No rank ever holds the full state;
- ``deepspeed``: a DeepSpeed ZeRO directory (a ``latest`` file and one folder per tag).

Training resumes from any of them (``ckpt_path=last|auto|<path>``, :func:`resolve_resume`), on the
strategy that wrote it. Everything that needs one file (``brainfm-evaluate``, ``brainfm-extract``,
``brainfm-predict``, :func:`load_checkpoint`) refuses a directory with the command that makes one::

    python -m brainfm.runs consolidate <checkpoint file, directory or run dir> <out.ckpt> [--weights-only]

(:func:`consolidate`): a normal Lightning checkpoint dict with the ``state_dict`` keys of a DDP run
and brainfm's metadata, without optimizer state.
"""

from __future__ import annotations

import importlib
import logging
import os
import shutil
from pathlib import Path

import torch

from brainfm.checkpoints import (  # noqa: F401  (checkpoint_format, read_sharded_state_dict: public here too)
    DCP_INDEX,
    DCP_META,
    checkpoint_format,
    read_checkpoint,
    read_sharded_state_dict,
)
from brainfm.errors import CheckpointError
from brainfm.tasks.base import CHECKPOINT_KEY, BrainfmTask

log = logging.getLogger(__name__)

_log = logging.getLogger("brainfm")
#: the top-level keys :func:`consolidate` keeps with ``weights_only=True``
WEIGHTS_ONLY_KEYS = ("state_dict", "hyper_parameters", "hparams_name", CHECKPOINT_KEY, "epoch", "global_step",
                     "pytorch-lightning_version")


def last_checkpoint(run_dir: str | Path) -> Path:
    """``<run_dir>/checkpoints/last.ckpt`` (a file or a sharded checkpoint directory)."""
    return Path(run_dir) / "checkpoints" / "last.ckpt"


def temporary_checkpoint(target: Path, step: int) -> Path:
    """Where a checkpoint bound for ``target`` is written before the rename: ``.<name>.tmp-<step>``."""
    return target.with_name(f".{target.name}.tmp-{step}")


def previous_checkpoint(target: Path, step: int) -> Path:
    """Where the replaced ``target`` directory waits while the new one is renamed into place
    (``.<name>.old-<step>``); it is deleted right after, and resumed from only when a job died
    between the two renames."""
    return target.with_name(f".{target.name}.old-{step}")


def _resumable(path: Path) -> bool:
    return checkpoint_format(path) is not None


def _last_or_previous(run_dir: str | Path) -> Path | None:
    """``last.ckpt`` if it is complete; else the newest complete ``.last.ckpt.old-<step>`` (the
    job died between moving the old directory aside and renaming the new one into place)."""
    last = last_checkpoint(run_dir)
    if _resumable(last):
        return last
    previous = [p for p in last.parent.glob(f".{last.name}.old-*") if _resumable(p)] if last.parent.is_dir() else []
    if not previous:
        return None
    chosen = max(previous, key=lambda p: int(p.name.rpartition("-")[2]) if p.name.rpartition("-")[2].isdigit() else -1)
    _log.warning(f"{last} is missing (the job died while replacing it); resuming from the previous checkpoint {chosen}")
    return chosen


def resolve_resume(ckpt_path: str | None, run_dir: str | Path) -> str | None:
    """``None`` | ``"last"`` | ``"auto"`` | a path -> the checkpoint Lightning should resume from.

    ``last.ckpt`` may be a file or a sharded checkpoint directory (FSDP2/DCP, DeepSpeed); a sharded
    directory is resumed by the strategy that wrote it.

    Raises:
        CheckpointError: ``last`` without a ``last.ckpt``, or a path that is no checkpoint.
    """
    if ckpt_path in (None, "", "null"):
        return None
    if ckpt_path in ("auto", "last"):
        found = _last_or_previous(run_dir)
        if found is None and ckpt_path == "last":
            raise CheckpointError(
                f"ckpt_path=last but {last_checkpoint(run_dir)} does not exist: this run directory has nothing to "
                "resume. Fix: give the run_name=<name> (and experiment) of the run to resume, "
                "use ckpt_path=auto to resume only when a checkpoint exists, or start without "
                "ckpt_path."
            )
        return None if found is None else str(found)
    path = Path(ckpt_path)
    if not _resumable(path):
        what = "an incomplete checkpoint directory (no DCP .metadata + meta.pt, no DeepSpeed 'latest')" if path.is_dir() else "no such file"
        raise CheckpointError(
            f"ckpt_path={ckpt_path}: {what}. Fix: give a checkpoint file, a sharded checkpoint directory "
            "(FSDP2/DCP or DeepSpeed), last or auto."
        )
    return str(path)


def checkpoint_step(path: str | Path) -> int | None:
    """The ``global_step`` a checkpoint file or DCP directory (its ``meta.pt``) was saved at, read
    memory-mapped; ``None`` for a DeepSpeed directory or a file that does not read."""
    form = checkpoint_format(path)
    if form not in ("file", "dcp"):
        return None
    try:
        state = read_checkpoint(Path(path) / DCP_META if form == "dcp" else path, mmap=form == "file")
    except CheckpointError:
        return None
    step = state.get("global_step") if isinstance(state, dict) else None
    return int(step) if step is not None else None


def run_checkpoints(run_dir: str | Path) -> list[Path]:
    """The checkpoints an earlier run left in ``<run_dir>/checkpoints``: every ``*.ckpt`` file or sharded
    directory (``last.ckpt``, the best-k ``best-step<N>.ckpt``) and a complete ``.last.ckpt.old-<step>``
    left by a job killed while replacing ``last.ckpt``; not the temporaries of an unfinished save."""
    folder = Path(run_dir) / "checkpoints"
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir()
                  if (p.name.endswith(".ckpt") and not p.name.startswith(".")) or (".ckpt.old-" in p.name and _resumable(p)))


#: what brainfm-train and the commands that read a run write into its run directory; ``overwrite=true``
#: removes them (Hydra's own ``.hydra/`` and ``train.log`` of the new run stay)
RUN_OUTPUTS = ("checkpoints", "summary.json", "config.yaml", "csv", "tensorboard", "mlflow_run_id", "eval", "export",
               "predict", "interpret")


def refuse_fresh_start(run_dir: str | Path) -> None:
    """Refuse to train from scratch in a run directory that holds checkpoints of an earlier run (its
    ``last.ckpt`` and best-k files would be replaced, its curves mixed).

    Raises:
        CheckpointError: ``<run_dir>/checkpoints`` holds a checkpoint; the message names the fixes as
            typed: ``ckpt_path=auto`` (resume), ``run_name=<new name>`` or ``overwrite=true`` (replace).
    """
    found = run_checkpoints(run_dir)
    if not found:
        return
    last = _last_or_previous(run_dir)
    step = checkpoint_step(last) if last is not None else None
    at = f"; last.ckpt at step {step}" if step is not None else ""
    raise CheckpointError(
        f"{run_dir} holds the checkpoints of an earlier run ({', '.join(p.name for p in found)}{at}) and this run "
        "would train from scratch over them. Fix: add ckpt_path=auto to resume that run (a finished run ends at once), "
        "or add run_name=<new name> to start a new run beside it, or overwrite=true to replace it (its checkpoints, "
        "summary and metrics are deleted)."
    )


def set_aside_outputs(run_dir: str | Path) -> Path | None:
    """``overwrite=true``: move what an earlier run wrote (:data:`RUN_OUTPUTS`) into
    ``<run_dir>/.replaced-<pid>`` (one rename each, nothing half-deleted); :func:`discard_outputs`
    deletes them once the new run is built, :func:`restore_outputs` puts them back if it is not.
    Returns that folder, or ``None`` when there was nothing to move."""
    run_dir = Path(run_dir)
    present = [run_dir / name for name in RUN_OUTPUTS if (run_dir / name).exists() or (run_dir / name).is_symlink()]
    if not present:
        return None
    aside = run_dir / f".replaced-{os.getpid()}"
    aside.mkdir(exist_ok=True)
    for path in present:
        os.replace(path, aside / path.name)
    return aside


def restore_outputs(aside: Path | None) -> None:
    """Undo :func:`set_aside_outputs` (the new run failed before training)."""
    if aside is None or not aside.is_dir():
        return
    for path in aside.iterdir():
        if not (aside.parent / path.name).exists():
            os.replace(path, aside.parent / path.name)
    shutil.rmtree(aside, ignore_errors=True)


def discard_outputs(aside: Path | None) -> None:
    """Delete what :func:`set_aside_outputs` moved away."""
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)


def _deepspeed_trainer(path: Path) -> str:
    """The ``trainer=`` choice that wrote a DeepSpeed directory: ZeRO-3 keeps per-rank model states
    (``zero_pp_rank_*_model_states.pt``), ZeRO-2 one ``mp_rank_00_model_states.pt``."""
    tag = (path / "latest").read_text().strip() if (path / "latest").is_file() else ""
    folder = path / tag if tag and (path / tag).is_dir() else path
    if any(folder.glob("zero_pp_rank_*_model_states.pt")):
        return "deepspeed_stage_3 (or deepspeed_stage_3_offload, the one it was trained with)"
    return "deepspeed_stage_2"


def check_resume_strategy(path: str | Path, strategy) -> None:
    """Refuse, before training, to resume a sharded checkpoint directory with a strategy that cannot
    read it: an FSDP2/DCP directory needs ``trainer=fsdp``, a DeepSpeed one DeepSpeed (Lightning's DDP
    or single-device strategies would fail deep inside ``torch.load``).

    Args:
        path: the checkpoint :func:`resolve_resume` returned.
        strategy: the trainer's Lightning strategy (``trainer.strategy``).

    Raises:
        CheckpointError: the strategy cannot read the directory; the message names the strategy that
            wrote it and the way to go on with this one (a new run from its weights, ``task.init_from``).
    """
    from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy

    path = Path(path)
    form = checkpoint_format(path)
    if form == "dcp" and not isinstance(strategy, (ModelParallelStrategy, FSDPStrategy)):
        wrote, trainer = "an FSDP2 sharded (torch.distributed.checkpoint)", "trainer=fsdp (any number of ranks: DCP reshards)"
        weights = f"task.init_from={path}"
    elif form == "deepspeed" and not isinstance(strategy, DeepSpeedStrategy):
        wrote, trainer = "a DeepSpeed ZeRO", f"trainer={_deepspeed_trainer(path)}"
        weights = f"task.init_from=<out.ckpt> after `python -m brainfm.runs consolidate {path} <out.ckpt>`"
    else:
        return
    raise CheckpointError(
        f"{path} is {wrote} checkpoint directory, one shard per rank, and this run's strategy "
        f"({type(strategy).__name__}) cannot resume from it. Fix: resume it with the strategy that wrote it, {trainer}; "
        f"or, to go on with this trainer, start a new run from its weights (step and optimizer state start afresh): "
        f"{weights} run_name=<new name>, where the task takes task.init_from (or consolidate it into one file: "
        f"`python -m brainfm.runs consolidate {path} <out.ckpt>`)."
    )


def sharded_checkpoint_error(path: Path) -> CheckpointError:
    """The error for a sharded checkpoint directory given where one file is needed."""
    kind = {"dcp": "an FSDP2 sharded (torch.distributed.checkpoint)", "deepspeed": "a DeepSpeed (sharded)"}[checkpoint_format(path)]
    return CheckpointError(
        f"{path} is {kind} checkpoint directory, one shard per rank; this needs one checkpoint file. Fix: "
        f"consolidate it into one file with `python -m brainfm.runs consolidate {path} "
        f"{path.with_suffix('')}-consolidated.ckpt` and pass that file."
    )


def find_checkpoint(path: str | Path) -> Path:
    """A checkpoint file, or a run directory (its ``checkpoints/last.ckpt``).

    Raises:
        CheckpointError: nothing loadable there (the message lists the checkpoints nearby), or a
            sharded checkpoint directory (the message names the consolidate command).
    """
    path = Path(path)
    if checkpoint_format(path) in ("dcp", "deepspeed"):
        raise sharded_checkpoint_error(path)
    if path.is_dir():
        for candidate in (path / "checkpoints" / "last.ckpt", path / "last.ckpt"):
            form = checkpoint_format(candidate)
            if form == "file":
                return candidate
            if form is not None:
                raise sharded_checkpoint_error(candidate)
        found = sorted(str(p) for p in path.rglob("*.ckpt"))[:10]
        raise CheckpointError(f"{path} is a directory without checkpoints/last.ckpt; checkpoints in it: {found or 'none'}")
    if not path.is_file():
        near = sorted(str(p) for p in path.parent.glob("*.ckpt"))[:10] if path.parent.is_dir() else []
        raise CheckpointError(f"checkpoint {path} does not exist. Checkpoints in {path.parent}: {near or 'none'}")
    return path


def load_checkpoint(path: str | Path) -> dict:
    """A brainfm checkpoint, read with :func:`brainfm.checkpoints.read_checkpoint`
    (``weights_only=True``), with a clear error for files that are not brainfm's.

    Raises:
        CheckpointError: see :func:`find_checkpoint`; a file that does not load or has no brainfm entry.
    """
    path = find_checkpoint(path)
    ckpt = read_checkpoint(path)  # truncated file, pickle with code: a CheckpointError naming it
    if not isinstance(ckpt, dict) or CHECKPOINT_KEY not in ckpt or "hyper_parameters" not in ckpt:
        raise CheckpointError(f"{path} is not a brainfm checkpoint (no '{CHECKPOINT_KEY}' entry)")
    ckpt["_path"] = str(path)
    return ckpt


def task_class(ckpt: dict) -> type[BrainfmTask]:
    qualname = ckpt[CHECKPOINT_KEY]["task_class"]
    module, _, name = qualname.rpartition(".")
    return getattr(importlib.import_module(module), name)


def build_task_from_checkpoint(ckpt: dict, weights: bool = True) -> BrainfmTask:
    """Rebuild the task from the checkpoint's hyper-parameters; load its weights if ``weights``
    (else it keeps a fresh, seeded initialisation: the random-init baseline)."""
    cls = task_class(ckpt)
    task = cls(**ckpt["hyper_parameters"])
    if weights:
        task.load_state_dict(ckpt["state_dict"])
    return task.eval()


def check_data_compatible(meta: dict, store, where: str = "the checkpoint", any_tr: bool = False) -> None:
    """Raise CheckpointError unless ``store`` has the TR, ROI count and ROI order the model was
    trained with (``meta`` = the checkpoint's ``data_meta``).

    ``any_tr``: the model takes any TR (:attr:`brainfm.models.backbone.Backbone.any_tr`: it embeds time
    in seconds, or has no time order), so data at another TR are accepted; the TR of the data and of the training are logged. Otherwise
    a TR mismatch is refused with the fix (``data.resample_tr``).
    """
    from brainfm.data.datamodules.base import check_tr
    from brainfm.errors import ConfigError

    trained = meta.get("tr") if isinstance(meta.get("tr"), (int, float)) else None
    if any_tr and store.tr is not None and trained is not None and abs(float(store.tr) - float(trained)) > 1e-3:
        log.info("data %s at TR %g s, %s trained at TR %g s: the model takes any TR (time in seconds or no "
                 "time order), so it takes the data's TR", store.location, float(store.tr), where, float(trained))
        return _check_rois(meta, store, where)
    try:
        tr = check_tr(store.tr, meta.get("tr"), str(store.location), key=f"the TR of {where}")
    except ConfigError as exc:
        want = f"{trained:g}" if trained is not None else "<s>"
        raise CheckpointError(f"{exc} This model needs its training TR: resample the data when they are read, "
                              f"data.resample_tr={want} (brainfm-evaluate/extract/predict: +data.resample_tr={want}), "
                              f"or once: brainfm-data resample <in.h5> <out.h5> --tr {want}") from exc
    if store.kind == "roi":  # a file that records no TR takes the checkpoint's
        store.tr = tr
    _check_rois(meta, store, where)


def _check_rois(meta: dict, store, where: str) -> None:
    """Raise CheckpointError unless ``store`` has the checkpoint's ROI count and order."""
    n = meta.get("n_rois")
    if n is not None and int(n) != store.n_rois:
        atlas = meta.get("atlas")
        theirs = getattr(store, "atlas", None)
        fix = (f"a store of atlas {atlas!r}: parcellate the fMRI runs with it (brainfm-preprocess parcellate --input "
               f"<NIfTI/BIDS/fMRIPrep> --atlas {atlas} --output <rois.h5>), or an ROI file that holds "
               f"/timeseries/{atlas}" if atlas else
               f"a store with the {n} ROIs the model was trained on (its atlas, parcellated the same way)")
        raise CheckpointError(
            f"{where} was trained on {n} ROIs{f' of atlas {atlas!r}' if atlas else ''} but {store.location} has "
            f"{store.n_rois}{f' (atlas {theirs!r})' if theirs else ''}. A trained model's input layer is fixed, so "
            f"the data must have its ROIs in its order (data.n_rois cannot change that). Fix: {fix}"
        )
    names, found = meta.get("roi_names"), store.roi_names
    read = getattr(store, "roi_mask", None)  # ROIs of an atlas the file lacks (stores.roi) have no name to check
    wrong = [i for i, (a, b) in enumerate(zip(names or [], found or [])) if a != b and (read is None or read[i])]
    if names and found and wrong:
        i = wrong[0]
        raise CheckpointError(
            f"ROI order of {store.location} differs from {where} at index {i}: data {found[i]!r}, "
            f"model {names[i]!r}. Fix: reorder the data's ROIs to the model's order "
            "(roi_names in the checkpoint's data_meta)."
        )


def _save_atomic(checkpoint: dict, output_file: Path) -> None:
    tmp = output_file.with_name(f".{output_file.name}.tmp-{os.getpid()}")
    try:
        torch.save(checkpoint, tmp)
        os.replace(tmp, output_file)
    finally:
        tmp.unlink(missing_ok=True)


def _strip(checkpoint: dict, weights_only: bool) -> dict:
    """Drop optimizer state; with ``weights_only`` keep only :data:`WEIGHTS_ONLY_KEYS`."""
    checkpoint.pop("optimizer_states", None)
    if weights_only:
        checkpoint = {k: v for k, v in checkpoint.items() if k in WEIGHTS_ONLY_KEYS}
    return checkpoint


def consolidate(checkpoint: str | Path, output_file: str | Path, weights_only: bool = False) -> Path:
    """Write any brainfm checkpoint as one Lightning checkpoint file: weights (fp32 for DeepSpeed,
    as saved for DCP) under ``state_dict`` with the keys of a DDP run, ``hyper_parameters``, brainfm's
    metadata and the training progress; no optimizer state. It loads with
    ``torch.load(weights_only=True)``, :func:`load_checkpoint` and ``brainfm-evaluate ckpt=<file>``.

    Args:
        checkpoint: a DCP directory (FSDP2), a DeepSpeed ZeRO-2/3 directory, a checkpoint file, or
            a run directory (its ``checkpoints/last.ckpt``).
        output_file: the file to write (atomically: a temporary name, then a rename).
        weights_only: keep only what rebuilding the model needs (:data:`WEIGHTS_ONLY_KEYS`): no loop,
            callback, scheduler or datamodule state.

    A file without optimizer state is copied byte for byte unless ``weights_only``; one with
    optimizer state is re-saved without it. The single-file export is for evaluation, extraction
    and fine-tuning; resume the same run from the sharded directory itself.

    Raises:
        CheckpointError: no checkpoint at ``checkpoint``, an incomplete directory, or an
            ``output_file`` that is a directory or the input itself.
    """
    checkpoint, output_file = Path(checkpoint), Path(output_file)
    form = checkpoint_format(checkpoint)
    if form is None and checkpoint.is_dir() and checkpoint_format(last_checkpoint(checkpoint)):
        checkpoint = last_checkpoint(checkpoint)  # a run directory
        form = checkpoint_format(checkpoint)
    if form is None:
        what = ("a directory that is neither a complete DCP checkpoint (.metadata + meta.pt), a DeepSpeed checkpoint "
                "('latest') nor a run directory with checkpoints/last.ckpt") if checkpoint.is_dir() else "no such file"
        raise CheckpointError(f"cannot consolidate {checkpoint}: {what}")
    if output_file.is_dir():
        raise CheckpointError(f"output {output_file} is a directory; give the path of the file to write (e.g. {output_file}/model.ckpt)")
    if output_file.resolve() == checkpoint.resolve() or checkpoint.resolve() in output_file.resolve().parents:
        raise CheckpointError(f"output {output_file} would overwrite the checkpoint {checkpoint}; write it elsewhere")
    output_file.parent.mkdir(parents=True, exist_ok=True)

    if form == "dcp":
        state = read_checkpoint(checkpoint / DCP_META)
        state["state_dict"] = read_sharded_state_dict(checkpoint)
        _save_atomic(_strip(state, weights_only), output_file)
    elif form == "deepspeed":
        from lightning.pytorch.utilities.deepspeed import (
            convert_zero_checkpoint_to_fp32_state_dict,
        )

        tmp = output_file.with_name(f".{output_file.name}.tmp-{os.getpid()}")
        try:
            state = convert_zero_checkpoint_to_fp32_state_dict(str(checkpoint), str(tmp))
            if weights_only or "optimizer_states" in state:
                _save_atomic(_strip(state, weights_only), tmp)
            os.replace(tmp, output_file)
        finally:
            tmp.unlink(missing_ok=True)
    else:
        state = read_checkpoint(checkpoint, mmap=True)
        if weights_only or "optimizer_states" in state:
            _save_atomic(_strip(state, weights_only), output_file)
        else:
            tmp = output_file.with_name(f".{output_file.name}.tmp-{os.getpid()}")
            try:
                shutil.copyfile(checkpoint, tmp)
                os.replace(tmp, output_file)
            finally:
                tmp.unlink(missing_ok=True)
    return output_file


def main(argv: list[str] | None = None) -> None:
    """``python -m brainfm.runs consolidate <checkpoint> <out.ckpt> [--weights-only]``."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m brainfm.runs", description="checkpoint utilities")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("consolidate", help="any checkpoint (FSDP2/DCP or DeepSpeed directory, file, run dir) -> "
                                           "one Lightning checkpoint file without optimizer state")
    p.add_argument("checkpoint", help="DCP or DeepSpeed checkpoint directory, checkpoint file, or run directory")
    p.add_argument("output_file")
    p.add_argument("--weights-only", action="store_true",
                   help="keep only weights, hyper-parameters and brainfm's metadata (no loop/callback/scheduler state)")
    args = parser.parse_args(argv)
    from brainfm.cli.common import exit_on_brainfm_error

    with exit_on_brainfm_error("brainfm.runs"):
        print(f"wrote {consolidate(args.checkpoint, args.output_file, weights_only=args.weights_only)}")


if __name__ == "__main__":
    main()
