"""Checkpoints of a run: where they are, what form they take, reading one and consolidating a sharded one.

A brainfm checkpoint is a Lightning checkpoint whose ``hyper_parameters`` are plain containers
and whose ``brainfm`` entry records the task class, the data facts (TR, ROI names, normalization
mode) and the normalization statistics; it loads with ``torch.load(weights_only=True)``
(:func:`brainfm.checkpoints.read_checkpoint`, the one reader of weights).

It comes in three forms (:func:`checkpoint_format`):

- ``file``: one ``torch.save`` file (1 process, DDP, FSDP2 with
  ``trainer.strategy.save_distributed_checkpoint=false``);
- ``dcp``: a directory written by torch.distributed.checkpoint (DCP) through Lightning's
  ``ModelParallelStrategy(save_distributed_checkpoint=True)``, the default of ``trainer=fsdp``:
  one shard per rank (``__<rank>_0.distcp``), DCP's ``.metadata`` index, and Lightning's
  ``meta.pt`` (everything except weights and optimizer state: step, loops, hyper-parameters,
  brainfm's entry). No rank ever holds the full state;
- ``deepspeed``: a DeepSpeed ZeRO directory (a ``latest`` file and one folder per tag).

Everything that needs one file (``brainfm-evaluate``, ``brainfm-extract``, ``brainfm-predict``,
:func:`load_checkpoint`) refuses a directory with the command that makes one::

    python -m brainfm.runs consolidate <checkpoint file, directory or run dir> <out.ckpt> [--weights-only]

(:func:`consolidate`): a normal Lightning checkpoint dict with the ``state_dict`` keys of a DDP run
and brainfm's metadata, without optimizer state.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from lightning.pytorch.utilities.deepspeed import convert_zero_checkpoint_to_fp32_state_dict

from brainfm.checkpoints import DCP_INDEX, DCP_META, checkpoint_format, read_checkpoint, read_sharded_state_dict  # noqa: F401  (checkpoint_format, read_sharded_state_dict: public here too)
from brainfm.errors import CheckpointError
from brainfm.io import atomic_path
from brainfm.tasks.base import CHECKPOINT_KEY

#: the top-level keys :func:`consolidate` keeps with ``weights_only=True``
WEIGHTS_ONLY_KEYS = ("state_dict", "hyper_parameters", "hparams_name", CHECKPOINT_KEY, "epoch", "global_step",
                     "pytorch-lightning_version")


def last_checkpoint(run_dir: str | Path) -> Path:
    """``<run_dir>/checkpoints/last.ckpt`` (a file or a sharded checkpoint directory)."""
    return Path(run_dir) / "checkpoints" / "last.ckpt"


def run_dir_of(ckpt_path: str | Path) -> Path:
    """The run directory of a checkpoint file (``<run>/checkpoints/x.ckpt`` -> ``<run>``; a file elsewhere ->
    its folder)."""
    parent = Path(ckpt_path).parent
    return parent.parent if parent.name == "checkpoints" else parent


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


def _save_atomic(checkpoint: dict, output_file: Path) -> None:
    with atomic_path(output_file) as tmp:
        torch.save(checkpoint, tmp)


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
        with atomic_path(output_file) as tmp:
            state = convert_zero_checkpoint_to_fp32_state_dict(str(checkpoint), str(tmp))
            if weights_only or "optimizer_states" in state:
                torch.save(_strip(state, weights_only), tmp)
    else:
        state = read_checkpoint(checkpoint, mmap=True)
        if weights_only or "optimizer_states" in state:
            _save_atomic(_strip(state, weights_only), output_file)
        else:
            with atomic_path(output_file) as tmp:
                shutil.copyfile(checkpoint, tmp)
    return output_file
