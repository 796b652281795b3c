"""What every brainfm LightningModule shares: building the model from its config, AdamW with
warm-up + cosine, logging, deterministic per-step randomness, and the data facts a checkpoint
must carry (TR, ROI order, normalisation).

Hyper-parameters are saved as plain containers, so checkpoints load with
``torch.load(path, weights_only=True)`` and the task is rebuilt from the checkpoint alone.
"""

from __future__ import annotations

from typing import Any

import lightning as L
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from brainfm.models import build_model
from brainfm.tasks.metrics import MeanOfBatches
from brainfm.tasks.optim import build_optimizer, build_scheduler

CHECKPOINT_KEY = "brainfm"


def plain(value: Any) -> Any:
    """OmegaConf containers -> Python dicts/lists (resolved)."""
    if isinstance(value, DictConfig) or OmegaConf.is_list(value):
        return OmegaConf.to_container(value, resolve=True)
    return value


class BrainfmTask(L.LightningModule):
    """Base LightningModule. Subclasses implement :meth:`compute_losses` and :meth:`embed`.

    Args:
        model: model config with ``_target_`` (plain dict).
        optimizer: ``{lr, weight_decay, betas, eps}`` for AdamW.
        scheduler: ``{warmup_fraction | warmup_steps, min_lr_ratio}``.
        data_meta: facts about the training data (TR, ROI names, normalisation, ...), saved in
            the checkpoint and checked against any data the model is later applied to.
        seed: base seed of the per-step random streams.

    Randomness: before every training batch the global torch generator is re-seeded from
    ``(seed, batch index, rank)`` (and before every validation batch from ``(seed, val batch)``),
    so masks, dropout and teacher forcing are a function of the step: a run resumed from a
    checkpoint repeats the uninterrupted run exactly.
    """

    def __init__(
        self,
        model: dict,
        optimizer: dict | None = None,
        scheduler: dict | None = None,
        data_meta: dict | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        model, optimizer, scheduler, data_meta = (plain(v) for v in (model, optimizer, scheduler, data_meta))
        self.save_hyperparameters(
            {"model": model, "optimizer": optimizer or {}, "scheduler": scheduler or {},
             "data_meta": data_meta or {}, "seed": int(seed), **self.objective_hparams()}
        )
        self.model = build_model(model)
        self.data_meta = data_meta or {}
        # recorded now: FSDP2's fully_shard later swaps the instance's class for a generated one
        self._task_class = f"{type(self).__module__}.{type(self).__qualname__}"
        self._val_means = MeanOfBatches()

    def objective_hparams(self) -> dict:
        """Objective-specific hyper-parameters to save (overridden by subclasses)."""
        return {}

    # -- objective --------------------------------------------------------------------------------
    def compute_losses(self, batch: dict) -> dict[str, torch.Tensor]:
        """Return a dict with the total ``loss`` and its components."""
        raise NotImplementedError

    @torch.no_grad()
    def embed(self, batch: dict) -> torch.Tensor:
        """One embedding per window, ``(B, D)``."""
        raise NotImplementedError

    # -- Lightning hooks ----------------------------------------------------------------------------
    def _seed(self, *keys: int) -> int:
        return int(np.random.SeedSequence([int(self.hparams.seed), *keys]).generate_state(1)[0])

    def on_train_start(self) -> None:
        # a resumed run: drop what loggers recorded after the checkpoint it resumes from
        for logger in self.loggers:
            if hasattr(logger, "truncate"):
                logger.truncate(self.global_step)

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        torch.manual_seed(self._seed(0, self.trainer.fit_loop.total_batch_idx, self.global_rank))

    def on_validation_batch_start(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        torch.manual_seed(self._seed(1, batch_idx, dataloader_idx))

    @staticmethod
    def batch_size(batch: dict) -> int:
        """Samples in a batch (ROI windows ``bold`` or volume clips ``volume``)."""
        for key in ("bold", "volume"):
            if key in batch:
                return int(batch[key].shape[0])
        return int(next(v for v in batch.values() if torch.is_tensor(v)).shape[0])

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        """The objective on a batch (training and validation go through ``forward`` so that FSDP2's
        hooks on the root module gather its parameters)."""
        return self.compute_losses(batch)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        losses = self(batch)
        bs = self.batch_size(batch)
        # the mean over ranks: with equal per-rank batches the loss of the global batch (other train/* are rank 0's)
        self.log("train/loss", losses["loss"], prog_bar=True, batch_size=bs, sync_dist=True)
        for name, value in losses.items():
            if name != "loss":
                self.log(f"train/{name}", value, batch_size=bs)
        return losses["loss"]

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        losses = self(batch)
        bs = self.batch_size(batch)
        for name, value in losses.items():
            self._val_means.add(name, value, bs)

    def on_validation_epoch_end(self) -> None:
        """``val/<loss>``: the mean over every validation window of every rank (the windows are
        partitioned over the ranks), weighted by batch size; the same value on every rank."""
        for name, value in self._val_means.compute(self.device).items():
            self.log(f"val/{name}", value, prog_bar=name == "loss", sync_dist=True)
        self._val_means.clear()

    def configure_optimizers(self):
        opt_cfg = {"lr": 1e-3, "weight_decay": 0.1, "betas": (0.9, 0.999), "eps": 1e-8, **self.hparams.optimizer}
        optimizer = build_optimizer(self, **opt_cfg)
        sched_cfg = {"warmup_fraction": 0.01, "min_lr_ratio": 0.0, **self.hparams.scheduler}
        scheduler = build_scheduler(optimizer, self.trainer.estimated_stepping_batches, **sched_cfg)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def configure_model(self) -> None:
        """Under ``trainer=fsdp`` (Lightning's ModelParallelStrategy), shard the transformer blocks and
        then the whole task with FSDP2; a no-op for every other strategy."""
        mesh = self.device_mesh
        if mesh is None or getattr(self, "_fully_sharded", False):
            return
        from brainfm.models.swin4d import FactorizedSwinBlock4D, SwinBlock4D
        from brainfm.models.transformer import TransformerBlock
        from brainfm.strategies import apply_fully_shard

        apply_fully_shard(self, mesh, (TransformerBlock, SwinBlock4D, FactorizedSwinBlock4D))
        self._fully_sharded = True

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        extra: dict[str, Any] = {
            "task_class": self._task_class,
            "data_meta": self.data_meta,
        }
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if dm is not None and getattr(dm, "normalizer", None) is not None:
            extra["normalization"] = dm.normalizer.state()
        checkpoint[CHECKPOINT_KEY] = extra
