"""Run directories and checkpoints: finding them, resuming, and loading a task from one.

A brainfm checkpoint is a Lightning checkpoint whose ``hyper_parameters`` are plain containers
and whose ``brainfm`` entry records the task class, the data facts (TR, ROI names, normalisation
mode) and the normalisation statistics; it loads with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import importlib
from pathlib import Path

import torch

from brainfm.errors import CheckpointError
from brainfm.tasks.base import CHECKPOINT_KEY, BrainfmTask


def last_checkpoint(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints" / "last.ckpt"


def resolve_resume(ckpt_path: str | None, run_dir: str | Path) -> str | None:
    """``None`` | ``"last"`` | ``"auto"`` | a path -> the checkpoint Lightning should resume from.

    Raises:
        CheckpointError: ``last`` without a ``last.ckpt``, or a path that does not exist.
    """
    if ckpt_path in (None, "", "null"):
        return None
    last = last_checkpoint(run_dir)
    if ckpt_path == "auto":
        return str(last) if _resumable(last) else None
    if ckpt_path == "last":
        if not _resumable(last):
            raise CheckpointError(
                f"ckpt_path=last but {last} does not exist: this run directory has nothing to "
                "resume. Fix: give the run_name=<name> (and experiment) of the run to resume, "
                "use ckpt_path=auto to resume only when a checkpoint exists, or start without "
                "ckpt_path."
            )
        return str(last)
    path = Path(ckpt_path)
    if not _resumable(path):
        raise CheckpointError(f"ckpt_path={ckpt_path}: no such checkpoint file (or DeepSpeed checkpoint directory)")
    return str(path)


def _resumable(path: Path) -> bool:
    """A checkpoint file, or a DeepSpeed checkpoint directory (it has a ``latest`` file)."""
    return path.is_file() or (path.is_dir() and (path / "latest").is_file())


def find_checkpoint(path: str | Path) -> Path:
    """A checkpoint file, or a run directory (its ``checkpoints/last.ckpt``).

    Raises:
        CheckpointError: nothing loadable there; the message lists the checkpoints nearby.
    """
    path = Path(path)
    if path.is_dir() and (path / "latest").is_file():
        raise CheckpointError(
            f"{path} is a DeepSpeed (sharded) checkpoint directory. Fix: consolidate it into one file with "
            f"`python -m brainfm.runs consolidate {path} {path.with_suffix('')}-consolidated.ckpt`"
        )
    if path.is_dir():
        for candidate in (path / "checkpoints" / "last.ckpt", path / "last.ckpt"):
            if candidate.is_file():
                return candidate
        found = sorted(str(p) for p in path.rglob("*.ckpt"))[:10]
        raise CheckpointError(f"{path} is a directory without checkpoints/last.ckpt; checkpoints in it: {found or 'none'}")
    if not path.is_file():
        near = sorted(str(p) for p in path.parent.glob("*.ckpt"))[:10] if path.parent.is_dir() else []
        raise CheckpointError(f"checkpoint {path} does not exist. Checkpoints in {path.parent}: {near or 'none'}")
    return path


def load_checkpoint(path: str | Path) -> dict:
    """``torch.load(weights_only=True)`` with a clear error for files that are not brainfm's."""
    path = find_checkpoint(path)
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated file, pickle with code, not a checkpoint
        raise CheckpointError(f"{path} cannot be loaded as a checkpoint ({type(exc).__name__}: {exc})") from exc
    if CHECKPOINT_KEY not in ckpt or "hyper_parameters" not in ckpt:
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


def check_data_compatible(meta: dict, store, where: str = "the checkpoint") -> None:
    """Raise CheckpointError unless ``store`` has the TR, ROI count and ROI order the model was
    trained with (``meta`` = the checkpoint's ``data_meta``)."""
    from brainfm.data.datamodules.base import check_tr
    from brainfm.errors import ConfigError

    try:
        tr = check_tr(store.tr, meta.get("tr"), str(store.location), key=f"the TR of {where}")
    except ConfigError as exc:
        raise CheckpointError(str(exc)) from exc
    if store.kind == "roi":  # a file that records no TR takes the checkpoint's
        store.tr = tr
    n = meta.get("n_rois")
    if n is not None and int(n) != store.n_rois:
        raise CheckpointError(
            f"{where} was trained on {n} ROIs ({meta.get('atlas')}) but {store.location} has "
            f"{store.n_rois}; parcellate the data with the same atlas"
        )
    names, found = meta.get("roi_names"), store.roi_names
    if names and found and list(names) != list(found):
        i = next(i for i, (a, b) in enumerate(zip(names, found)) if a != b)
        raise CheckpointError(
            f"ROI order of {store.location} differs from {where} at index {i}: data {found[i]!r}, "
            f"model {names[i]!r}. Fix: reorder the data's ROIs to the model's order "
            "(roi_names in the checkpoint's data_meta)."
        )


def consolidate(checkpoint_dir: str | Path, output_file: str | Path) -> Path:
    """Write a DeepSpeed ZeRO-2/3 checkpoint directory as one fp32 Lightning checkpoint file (its
    hyper-parameters and brainfm metadata kept), loadable without DeepSpeed.

    Raises:
        CheckpointError: not a DeepSpeed checkpoint directory.
    """
    checkpoint_dir, output_file = Path(checkpoint_dir), Path(output_file)
    if not (checkpoint_dir / "latest").is_file():
        raise CheckpointError(f"{checkpoint_dir} is not a DeepSpeed checkpoint directory (no 'latest' file)")
    from lightning.pytorch.utilities.deepspeed import (
        convert_zero_checkpoint_to_fp32_state_dict,
    )

    output_file.parent.mkdir(parents=True, exist_ok=True)
    tmp = output_file.with_name(f".{output_file.name}.tmp")
    convert_zero_checkpoint_to_fp32_state_dict(str(checkpoint_dir), str(tmp))
    tmp.replace(output_file)
    return output_file


def main(argv: list[str] | None = None) -> None:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m brainfm.runs", description="checkpoint utilities")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("consolidate", help="DeepSpeed checkpoint directory -> one fp32 checkpoint file")
    p.add_argument("checkpoint_dir")
    p.add_argument("output_file")
    args = parser.parse_args(argv)
    from brainfm.cli.common import exit_on_brainfm_error

    with exit_on_brainfm_error("brainfm.runs"):
        print(f"wrote {consolidate(args.checkpoint_dir, args.output_file)}")


if __name__ == "__main__":
    main()
