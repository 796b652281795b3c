"""Rebuild a trained run: the task from its checkpoint and its data from the run's ``config.yaml``.

:func:`build_task_from_checkpoint` rebuilds the task (weights loaded, or a fresh seeded initialisation: the
random-init baseline); :func:`load_run` rebuilds the task and its datamodule, checked against the checkpoint's
data contract (:mod:`brainfm.runs.contract`) and normalized as the training data were.
"""

from __future__ import annotations

import importlib
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.utils import instantiate
from omegaconf import OmegaConf

from brainfm.errors import CheckpointError, ConfigError, brainfm_cause
from brainfm.runs.checkpoint import find_checkpoint, load_checkpoint, run_dir_of
from brainfm.runs.contract import check_compatible, use_checkpoint_normalization
from brainfm.tasks.base import CHECKPOINT_KEY, BrainfmTask


def task_class(ckpt: dict) -> type[BrainfmTask]:
    """The task class a checkpoint was trained with (its ``brainfm`` entry's ``task_class`` import path)."""
    qualname = ckpt[CHECKPOINT_KEY]["task_class"]
    module, _, name = qualname.rpartition(".")
    # the class is named by the checkpoint: imported by its path, as Lightning's load_from_checkpoint does
    return getattr(importlib.import_module(module), name)


def build_task_from_checkpoint(ckpt: dict, weights: bool = True) -> BrainfmTask:
    """Rebuild the task from the checkpoint's hyper-parameters; load its weights if ``weights``
    (else it keeps a fresh, seeded initialisation: the random-init baseline). Returned in eval mode."""
    cls = task_class(ckpt)
    task = cls(**ckpt["hyper_parameters"])
    if weights:
        task.load_state_dict(ckpt["state_dict"])
    return task.eval()


@dataclass
class LoadedRun:
    """A checkpoint with the task rebuilt from it and its data rebuilt from the run's config.

    Attributes:
        ckpt: the loaded checkpoint dict (``_path`` = its file).
        task: the task in eval mode with the checkpoint's weights.
        config: the run's composed config (``config.yaml``) with the data overrides applied.
        datamodule: the data, set up and checked against the checkpoint.
        run_dir: the run directory (where ``config.yaml`` and ``checkpoints/`` are).
    """

    ckpt: dict
    task: Any
    config: Any
    datamodule: Any
    run_dir: Path = field(default_factory=Path)

    def label_categories(self, target: str) -> list[str] | None:
        """The category names of label ``target`` in the run's data config (``data.labels.categories``), in
        class order; None where the config names none."""
        labels = (self.config.data.get("labels") or {}) if "data" in self.config else {}
        cats = (labels.get("categories") or {}).get(target) if labels else None
        return [str(c) for c in cats] if cats else None


def datamodules_of(datamodule) -> list[tuple[str, Any]]:
    """``(data set name, datamodule)`` pairs: the children of a MultiDataModule, else the module itself."""
    children = getattr(datamodule, "datasets", None)
    if isinstance(children, Mapping) and children:
        return [(str(k), v) for k, v in children.items()]
    return [(str(getattr(datamodule, "name", "data")), datamodule)]


def _dotlist(overrides: Mapping[str, Any] | Sequence[str] | None) -> list[str]:
    if not overrides:
        return []
    if isinstance(overrides, Mapping):
        flat = OmegaConf.to_container(OmegaConf.create(dict(overrides)), resolve=True)
        out: list[str] = []

        def walk(prefix: str, value: Any) -> None:
            if isinstance(value, dict) and value:
                for k, v in value.items():
                    walk(f"{prefix}.{k}" if prefix else str(k), v)
            else:
                out.append(f"{prefix}={json.dumps(value) if not isinstance(value, str) else value}")

        walk("", flat)
        return out
    return [str(o) for o in overrides]


def load_run(ckpt: str | os.PathLike, data_overrides: Mapping[str, Any] | Sequence[str] | None = None) -> LoadedRun:
    """Load a checkpoint (file or run directory), rebuild its task and its datamodule.

    Args:
        ckpt: a ``.ckpt`` file or a run directory (its ``checkpoints/last.ckpt``).
        data_overrides: changes to the run's ``data`` config, as a nested mapping
            (``{"path": "/other.h5"}``) or dot-list strings (``["path=/other.h5", "eval_batch_size=8"]``).

    Raises:
        CheckpointError: no checkpoint, no ``config.yaml`` beside ``checkpoints/``, or data whose
            TR, ROI count/order or grid differ from the checkpoint's.
        ConfigError / DataError: from setting the data up.
    """
    path = find_checkpoint(ckpt)
    run_dir = run_dir_of(path)
    config_file = run_dir / "config.yaml"
    if not config_file.is_file():
        raise CheckpointError(
            f"{config_file} does not exist: the data of checkpoint {path} are rebuilt from its run's config.yaml "
            "(written by brainfm-train beside checkpoints/). Fix: pass ckpt=<run directory>, or copy the run's "
            "config.yaml next to the checkpoints/ folder"
        )
    checkpoint = load_checkpoint(path)
    task = build_task_from_checkpoint(checkpoint)
    any_tr = bool(task.model.any_tr)
    cfg = OmegaConf.load(config_file)
    if "data" not in cfg:
        raise CheckpointError(f"{config_file} has no 'data' section; it is not a brainfm-train run config")
    dots = _dotlist(data_overrides)
    keys = {d.split("=", 1)[0] for d in dots}
    if "path" in keys and "tr" not in keys and isinstance(cfg.data.get("tr"), (int, float)):
        # other data: their own TR, not the training recipe's; check_compatible then accepts it (a model
        # that embeds time in seconds) or refuses it with the fix (data.resample_tr)
        dots.append("tr=null")
    if "path" in keys and "n_rois" not in keys and cfg.data.get("n_rois") is not None:
        # other data: their own ROI count; check_compatible compares it with the checkpoint's (a trained model's
        # input layer is fixed, so the recipe's "set data.n_rois" fix cannot apply here)
        dots.append("n_rois=null")
    if dots:
        OmegaConf.set_struct(cfg, False)
        try:
            cfg.data = OmegaConf.merge(cfg.data, OmegaConf.from_dotlist(dots))
        except Exception as exc:
            raise ConfigError(f"data overrides {dots} do not apply to {config_file}: {exc}") from exc
    try:
        datamodule = instantiate(cfg.data, _convert_="all")
        datamodule.setup("predict")
    except Exception as exc:  # Hydra wraps errors raised while instantiating
        cause = brainfm_cause(exc)
        if cause is not None and cause is not exc:
            raise cause from None
        raise
    meta = checkpoint["hyper_parameters"].get("data_meta") or {}
    for _, dm in datamodules_of(datamodule):
        check_compatible(meta, dm, where=f"checkpoint {path}", any_tr=any_tr)
        use_checkpoint_normalization(checkpoint, dm)
    return LoadedRun(checkpoint, task, cfg, datamodule, run_dir)
