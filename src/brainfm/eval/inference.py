"""Inference over evaluation windows on the configured trainer: Lightning's predict loop, the windows
partitioned over the ranks and devices, outputs streamed to per-rank shards and read back merged.

``brainfm-evaluate``, ``brainfm-extract`` and ``brainfm-predict`` run a function of a batch (an
embedding, a signature, logits or predictions) over one or more *groups* of windows (a split of a data
set). :func:`run_inference` builds the trainer from the CLI's ``trainer`` config (``trainer=cpu``,
``gpu``, ``ddp``, ``ddp_cpu``; one process or one per device, started by Lightning or by ``srun``), so
the model sits on the trainer's device; each rank evaluates its share of every group's windows
(:class:`~brainfm.data.windows.WindowBatchSampler` without padding: every window once) and appends
``(window index, values)`` rows to its own HDF5 shard as batches finish (:class:`ShardWriter`), so no
rank holds all outputs. :class:`Shards` reads them back in window order, chunk by chunk, on the
global rank 0 (the other ranks return None from :func:`run_inference`).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from brainfm.data.windows import PartitionSampler, collate_windows
from brainfm.errors import ConfigError, DataError


@dataclass
class Group:
    """One set of windows to run: a name (e.g. ``"hcp:val"``), the dataset, its batch size, and
    ``rows(indices) -> {column: values}``, the provenance of windows (or pairs) by index."""

    name: str
    dataset: Any
    batch_size: int
    rows: Callable[[np.ndarray], dict] | None = None


def _predictor(task, fn: Callable[[Any, dict], torch.Tensor]):
    """The LightningModule that wraps a task for ``trainer.predict``."""
    import lightning as L

    class Predictor(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.task = task

        def predict_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> dict:
            with torch.inference_mode():
                values = fn(self.task, batch)
            key = "pair" if "pair" in batch else "window"
            return {"index": batch[key].detach().cpu(), "values": values.detach().float().cpu()}

    return Predictor()


def _writer(root: Path):
    from lightning.pytorch.callbacks import BasePredictionWriter

    class ShardWriter(BasePredictionWriter):
        """Appends each batch's rows to ``<root>/rank<r>.h5`` (one dataset pair per group)."""

        def __init__(self) -> None:
            super().__init__(write_interval="batch")
            self._file = None

        def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx,
                               dataloader_idx=0) -> None:
            import h5py

            if self._file is None:
                self._file = h5py.File(root / f"rank{trainer.global_rank}.h5", "w")
            index = prediction["index"].numpy().astype(np.int64)
            values = prediction["values"].numpy().astype(np.float32).reshape(len(index), -1)
            if not np.isfinite(values).all():
                raise DataError(f"{int((~np.isfinite(values)).any(axis=1).sum())} non-finite outputs in a batch of "
                                f"group {dataloader_idx}: the checkpoint has diverged")
            g = self._file.require_group(f"g{dataloader_idx}")
            if "values" not in g:
                g.create_dataset("values", shape=(0, values.shape[1]), maxshape=(None, values.shape[1]),
                                 dtype=np.float32, chunks=(min(4096, max(1, len(index))), values.shape[1]))
                g.create_dataset("index", shape=(0,), maxshape=(None,), dtype=np.int64, chunks=(4096,))
            n = g["index"].shape[0]
            g["index"].resize(n + len(index), axis=0)
            g["values"].resize(n + len(index), axis=0)
            g["index"][n:] = index
            g["values"][n:] = values

        def on_predict_end(self, trainer, pl_module) -> None:
            if self._file is not None:
                self._file.close()
                self._file = None
            trainer.strategy.barrier("brainfm_inference_shards")

    return ShardWriter()


class Shards:
    """The per-rank shards of one inference, read back in window order (the order of one process).

    Args:
        root: the shard folder. groups: the groups in the order they were run.
    """

    def __init__(self, root: Path, groups: Sequence[Group]) -> None:
        import h5py

        self.root, self.groups = Path(root), list(groups)
        self.files = [h5py.File(p, "r") for p in sorted(self.root.glob("rank*.h5"))]

    def dim(self) -> int:
        for f in self.files:
            for g in f.values():
                return int(g["values"].shape[1])
        raise DataError(f"no outputs in {self.root}: every group was empty")

    def rows(self, k: int) -> int:
        return int(sum(f[f"g{k}/index"].shape[0] for f in self.files if f"g{k}" in f))

    def chunks(self, k: int, chunk: int = 8192) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """``(window indices (n,), values (n, D))`` of group ``k`` in increasing window order, ``chunk`` rows
        at a time (memory: the indices of the group plus one chunk)."""
        parts = [(f, f[f"g{k}"]) for f in self.files if f"g{k}" in f]
        if not parts:
            return
        index = np.concatenate([g["index"][:] for _, g in parts])
        source = np.concatenate([np.full(g["index"].shape[0], j) for j, (_, g) in enumerate(parts)])
        local = np.concatenate([np.arange(g["index"].shape[0]) for _, g in parts])
        order = np.argsort(index, kind="stable")
        if len(np.unique(index)) != len(index):
            raise DataError(f"group {self.groups[k].name}: a window was evaluated twice ({self.root})")
        for lo in range(0, len(order), chunk):
            sel = order[lo:lo + chunk]
            out = np.empty((len(sel), parts[0][1]["values"].shape[1]), dtype=np.float32)
            for j, (_, g) in enumerate(parts):
                mine = source[sel] == j
                if mine.any():
                    rows = local[sel][mine]
                    back = np.argsort(rows)
                    got = g["values"][np.sort(rows)]
                    out[np.flatnonzero(mine)[back]] = got
            yield index[sel], out

    def close(self) -> None:
        for f in self.files:
            f.close()
        shutil.rmtree(self.root, ignore_errors=True)


def build_trainer(trainer_cfg, root: Path, callbacks: list):
    """A Lightning ``Trainer`` from a ``trainer`` config group, for inference (no logger, no checkpoints)."""
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    cfg = OmegaConf.to_container(trainer_cfg, resolve=False) if trainer_cfg is not None else {
        "_target_": "lightning.pytorch.Trainer", "accelerator": "cpu", "devices": 1}
    cfg = OmegaConf.create(cfg)
    OmegaConf.set_struct(cfg, False)
    for key in ("max_steps", "max_epochs", "val_check_interval", "check_val_every_n_epoch", "gradient_clip_val",
                "accumulate_grad_batches", "limit_val_batches", "num_sanity_val_steps", "log_every_n_steps",
                "sync_batchnorm", "deterministic"):
        cfg.pop(key, None)
    cfg.default_root_dir = str(root)
    cfg.use_distributed_sampler = False  # brainfm's sampler partitions the windows itself
    import logging

    quiet = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    level = quiet.level
    quiet.setLevel(logging.WARNING)  # "GPU available: ..." of every Trainer: training information, not inference's
    try:
        return instantiate(cfg, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                           enable_model_summary=False, callbacks=callbacks, _convert_="all")
    finally:
        quiet.setLevel(level)


def run_inference(task, fn: Callable[[Any, dict], torch.Tensor], groups: Sequence[Group], shard_dir: str | os.PathLike,
                  trainer_cfg=None, num_workers: int = 0) -> Shards | None:
    """Run ``fn(task, batch) -> (B, D)`` over every window of ``groups`` on the configured trainer.

    Args:
        task: a :class:`~brainfm.tasks.base.BrainfmTask` (eval mode is set here).
        fn: the output of a batch, e.g. ``lambda t, b: t.embed(b)``.
        groups: the window sets (every dataset yields ``window`` or ``pair`` indices).
        shard_dir: a folder the ranks share for their shards (created; removed by ``Shards.close``).
        trainer_cfg: the ``trainer`` config (None: one CPU process).
        num_workers: DataLoader workers.

    Returns:
        :class:`Shards` on the global rank 0, None on the other ranks.

    Raises:
        ConfigError: no window in any group. DataError: non-finite outputs.
    """
    from torch.utils.data import DataLoader

    groups = [g for g in groups if len(g.dataset)]
    if not groups:
        raise ConfigError("no evaluation window in any requested split")
    root = Path(shard_dir)
    writer = _writer(root)
    trainer = build_trainer(trainer_cfg, root, [writer])
    if trainer.is_global_zero:
        shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True, exist_ok=True)
    loaders = []
    for g in groups:
        loaders.append(DataLoader(g.dataset, sampler=PartitionSampler(len(g.dataset)), batch_size=g.batch_size,
                                  collate_fn=collate_windows, num_workers=num_workers))
    task.eval()
    trainer.predict(_predictor(task, fn), dataloaders=loaders, return_predictions=False)
    if not trainer.is_global_zero:
        return None
    return Shards(root, groups)
