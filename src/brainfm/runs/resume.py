"""A run directory across jobs: what a requeued or repeated ``brainfm-train`` resumes from, refusing to train
from scratch over an earlier run, ``overwrite=true``, and where a checkpoint waits before its rename.

Training resumes from any checkpoint form (``ckpt_path=last|auto|<path>``, :func:`resolve_resume`), on the
strategy that wrote it (:func:`check_resume_strategy`).
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy

from brainfm.errors import CheckpointError
from brainfm.runs.checkpoint import checkpoint_format, checkpoint_step, last_checkpoint

_log = logging.getLogger("brainfm")


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
RUN_OUTPUTS = ("checkpoints", "summary.json", "config.yaml", "csv", "tensorboard", "mlflow_run_id", "wandb",
               "wandb_run_id", "eval", "export", "predict", "interpret")


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
        os.replace(path, aside / path.name)  # a move of finished outputs, not a write: no brainfm.io temporary
    return aside


def restore_outputs(aside: Path | None) -> None:
    """Undo :func:`set_aside_outputs` (the new run failed before training)."""
    if aside is None or not aside.is_dir():
        return
    for path in aside.iterdir():
        if not (aside.parent / path.name).exists():
            os.replace(path, aside.parent / path.name)  # moved back, as set_aside_outputs moved it
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
