"""Contrastive objectives: two views of one scan are pulled together, views of other scans pushed
apart (NT-Xent).

:class:`ContrastiveSequenceModeling`: the two views are non-overlapping windows of the same run
(``data.pairs=true``), encoded by a sequence backbone, mean-pooled and projected by a SimCLR head
(Linear -> BatchNorm -> ReLU -> Linear; Chen et al. 2020). Windows of one run other than the
positive are removed from the denominator (they are not negatives). This is run-level instance
discrimination: no labels are used, and what the embedding learns is what stays the same within a
scan and differs between scans, i.e. the subject's functional signature (the quantity
re-identification measures; cf. R2T-Net's rest/task pairs and NeuroSTORM's re-identification).
"""

from __future__ import annotations

import torch
from torch import nn

from brainfm.errors import ConfigError
from brainfm.models.backbone import require
from brainfm.tasks.base import BrainfmTask
from brainfm.tasks.distributed import GlobalBatchNorm1d
from brainfm.tasks.losses import nt_xent


class ProjectionHead(nn.Sequential):
    """``(B, d) -> (B, out_dim)``: Linear -> BatchNorm1d -> ReLU -> Linear (SimCLR); the BatchNorm's
    training statistics are those of the global batch (:class:`~brainfm.tasks.distributed.GlobalBatchNorm1d`)."""

    def __init__(self, d_model: int, out_dim: int = 128) -> None:
        super().__init__(nn.Linear(d_model, d_model), GlobalBatchNorm1d(d_model), nn.ReLU(), nn.Linear(d_model, out_dim))


class ContrastiveSequenceModeling(BrainfmTask):
    """NT-Xent between two windows of the same run.

    Args:
        temperature: NT-Xent temperature (0.1 as SwiFT's contrastive pretraining).
        proj_dim: projection width.
        noise_std: Gaussian noise added to each view's z-scored BOLD in training (augmentation).

    Batches need ``bold2``/``t2`` (set ``data.pairs=true``). ``embed`` returns the mean-pooled
    backbone states ``(B, d)`` (before the projection head).

    Raises:
        ConfigError: a backbone that does not read ROI windows with their times, or batches
            without pairs.
    """

    def __init__(self, model: dict, temperature: float = 0.1, proj_dim: int = 128, noise_std: float = 0.0, **kwargs) -> None:
        self._objective = {"temperature": float(temperature), "proj_dim": int(proj_dim), "noise_std": float(noise_std)}
        super().__init__(model, **kwargs)
        require(self.model, "task=contrastive", "a sequence backbone of ROI windows and their times",
                "model=gpt, bert or lstm_ae", input_keys=("bold", "t"))
        self.temperature, self.noise_std = float(temperature), float(noise_std)
        self.projection = ProjectionHead(self.model.d_model, int(proj_dim))
        self.model.use_special_tokens()  # plain windows: no MASK/CLS/SEP/segment

    def objective_hparams(self) -> dict:
        return dict(self._objective)

    def _pooled(self, bold: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.model.pooled(bold, t)

    def compute_losses(self, batch: dict) -> dict[str, torch.Tensor]:
        if "bold2" not in batch:
            raise ConfigError("task=contrastive needs window pairs: set data.pairs=true")
        views = [batch["bold"], batch["bold2"]]
        if self.training and self.noise_std > 0:
            views = [v + self.noise_std * torch.randn_like(v) for v in views]
        z1 = self.projection(self._pooled(views[0], batch["t"]))
        z2 = self.projection(self._pooled(views[1], batch["t2"]))
        # global negatives in training (every rank takes part); validation batches may differ in number per rank
        loss = nt_xent(z1, z2, self.temperature, groups=batch["run"], global_negatives=self.training)
        with torch.no_grad():
            sim = nn.functional.normalize(z1, dim=1) @ nn.functional.normalize(z2, dim=1).T
            run = batch["run"]
            same_run_top1 = (run[sim.argmax(dim=1)] == run).float().mean()
        return {"loss": loss, "nt_xent": loss, "same_run_top1": same_run_top1}

    @torch.no_grad()
    def embed(self, batch: dict) -> torch.Tensor:
        return self._pooled(batch["bold"], batch["t"])
