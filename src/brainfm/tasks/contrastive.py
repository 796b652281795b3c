"""Contrastive objectives: two views of one scan are pulled together, views of other scans pushed
apart (NT-Xent).

:class:`ContrastiveSequenceModeling`: the two views are non-overlapping windows of the same run
(``data.pairs=true``), encoded by an ROI backbone, pooled by its ``model.pooling`` and projected by
a SimCLR head (Linear -> BatchNorm -> ReLU -> Linear; Chen et al. 2020) or, with
``projection=none``, compared as they are. The second-order readouts (``model.pooling=correlation``,
:mod:`brainfm.models.pooling`) want ``projection=none``: their embedding starts at the window's FC,
and NT-Xent on it moves the embedding itself; a projection head on a few thousand edges learns the
training subjects in a few steps (loss ~1e-4) while the embedding stays where it started (measured:
README, "Does it beat FC?"). Windows of one run other than the
positive are removed from the denominator (they are not negatives). This is run-level instance
discrimination: no labels are used, and what the embedding learns is what stays the same within a
scan and differs between scans, i.e. the subject's functional signature (the quantity
re-identification measures; cf. R2T-Net's rest/task pairs and NeuroSTORM's re-identification).
"""

from __future__ import annotations

import torch
from torch import nn

from brainfm.errors import ConfigError
from brainfm.models.heads import ReconstructionHead
from brainfm.tasks.augment import gaussian_noise, roi_dropout, tr_jitter, tube_mask
from brainfm.tasks.base import BrainfmTask
from brainfm.tasks.distributed import GlobalBatchNorm1d
from brainfm.tasks.losses import nt_xent


class ProjectionHead(nn.Sequential):
    """``(B, d) -> (B, out_dim)``: Linear(d, hidden) -> BatchNorm1d -> ReLU -> Linear (SimCLR; ``hidden``
    defaults to ``d``); the BatchNorm's training statistics are those of the global batch
    (:class:`~brainfm.tasks.distributed.GlobalBatchNorm1d`)."""

    def __init__(self, d_model: int, out_dim: int = 128, hidden: int | None = None) -> None:
        h = int(hidden or d_model)
        super().__init__(nn.Linear(d_model, h), GlobalBatchNorm1d(h), nn.ReLU(), nn.Linear(h, out_dim))


class ContrastiveSequenceModeling(BrainfmTask):
    """NT-Xent between two windows of the same run, with optional augmentations and auxiliary targets.

    Args:
        temperature: NT-Xent temperature (0.1 as SwiFT's contrastive pretraining).
        proj_dim: projection width.
        noise_std: Gaussian noise added to each view's z-scored BOLD in training (augmentation).
        projection: ``mlp`` (the SimCLR head, width ``min(out_dim, proj_hidden)`` before ``proj_dim``)
            or ``none`` (NT-Xent on the backbone's pooled embedding).
        proj_hidden: the head's hidden width cap (a 4,371-edge FC embedding would otherwise get a
            4,371 x 4,371 layer).
        roi_dropout: probability of zeroing each ROI of a training view (:func:`~brainfm.tasks.augment.roi_dropout`).
        tr_jitter: relative change of the sampling interval of each training view, drawn per batch in
            ``[1 - tr_jitter, 1 + tr_jitter]`` (:func:`~brainfm.tasks.augment.tr_jitter`; needs a
            backbone that takes any TR).
        fc_target_weight: weight of an auxiliary target: the first view's embedding should stay the
            window's functional connectivity, ``||e - FC||^2 / ||FC||^2`` per window (needs a
            ``pooling=correlation`` readout of the input, whose identity initialisation makes the loss
            start at 0; centred or Fisher-z as the readout is). A brake on drifting from FC.
        mask_ratio: with ``mask_weight > 0``, the fraction of ROIs hidden for the whole first view (tube
            masking, :func:`~brainfm.tasks.augment.tube_mask`; CortexMAE/BrainLM-style high ratios), whose
            BOLD a linear head predicts from the backbone's per-TR features (L1 on the hidden values, as
            Thomas et al.'s Network-BERT). The masked copy is a separate forward pass: the contrastive
            views stay whole.
        mask_weight: weight of that reconstruction loss (0: off).

    Batches need ``bold2``/``t2`` (set ``data.pairs=true``). ``embed`` returns the backbone's pooled
    embedding ``(B, out_dim)`` (before the projection head).

    Raises:
        ConfigError: a backbone that does not read ROI windows, an unknown ``projection``, an auxiliary
            target the backbone cannot serve (named with the fix), or batches without pairs.
    """

    def __init__(self, model: dict, temperature: float = 0.1, proj_dim: int = 128, noise_std: float = 0.0,
                 projection: str = "mlp", proj_hidden: int = 1024, roi_dropout: float = 0.0, tr_jitter: float = 0.0,
                 fc_target_weight: float = 0.0, mask_ratio: float = 0.75, mask_weight: float = 0.0, **kwargs) -> None:
        self._objective = {"temperature": float(temperature), "proj_dim": int(proj_dim), "noise_std": float(noise_std),
                           "projection": projection, "proj_hidden": int(proj_hidden), "roi_dropout": float(roi_dropout),
                           "tr_jitter": float(tr_jitter), "fc_target_weight": float(fc_target_weight),
                           "mask_ratio": float(mask_ratio), "mask_weight": float(mask_weight)}
        super().__init__(model, **kwargs)
        m = self.model
        if m.input_keys not in (("bold", "t"), ("bold",)):
            raise ConfigError(f"task=contrastive needs a backbone of ROI windows; {type(m).__name__} reads "
                              f"{list(m.input_keys)}. Fix: model=bert, gpt, lstm_ae, temporal_mlp, fc or mean_mlp")
        if projection not in ("mlp", "none"):
            raise ConfigError(f"task.projection={projection!r} must be mlp or none")
        if not 0.0 <= float(roi_dropout) < 1.0 or not 0.0 <= float(tr_jitter) < 1.0:
            raise ConfigError(f"task.roi_dropout={roi_dropout} and task.tr_jitter={tr_jitter} must lie in [0, 1)")
        if float(tr_jitter) > 0 and not m.any_tr:
            raise ConfigError(f"task.tr_jitter={tr_jitter} changes the TR of the views, but {type(m).__name__} "
                              "assumes one TR: set task.tr_jitter=0")
        readout = m.pooling_readout
        if float(fc_target_weight) > 0 and (readout is None or readout.statistic != "correlation"
                                            or not readout.include_input or readout.rank != readout.n_rois
                                            or getattr(m, "hidden_dims", None)):  # model=fc: an MLP on the edges
            raise ConfigError("task.fc_target_weight > 0 compares the embedding with the window's FC: it needs "
                              "model.pooling=correlation with model.readout.include_input=true and rank=null "
                              "(one channel per ROI), and the readout's edges as the embedding (model=fc: "
                              "model.hidden_dims=[])")
        self.temperature, self.noise_std = float(temperature), float(noise_std)
        self.roi_dropout, self.tr_jitter = float(roi_dropout), float(tr_jitter)
        self.fc_target_weight = float(fc_target_weight)
        self.mask_ratio, self.mask_weight = float(mask_ratio), float(mask_weight)
        d = m.out_dim
        self.projection = ProjectionHead(d, int(proj_dim), min(d, int(proj_hidden))) if projection == "mlp" \
            else nn.Identity()
        if self.mask_weight > 0:
            if not m.frame_dim:
                raise ConfigError(f"task.mask_weight > 0 reconstructs hidden ROIs from per-TR features, which "
                                  f"{type(m).__name__} has not: use model=bert, gpt, temporal_mlp, mean_mlp or lstm_ae")
            if not 0.0 < self.mask_ratio < 1.0:
                raise ConfigError(f"task.mask_ratio={mask_ratio} must lie in (0, 1)")
            self.mask_head = ReconstructionHead(int(m.frame_dim), int(m.n_rois))
        m.use_special_tokens()  # plain windows: no MASK/CLS/SEP/segment

    def objective_hparams(self) -> dict:
        return dict(self._objective)

    def _pooled(self, bold: torch.Tensor, t: torch.Tensor | None) -> torch.Tensor:
        return self.model.pooled_batch({"bold": bold, "t": t})

    def _augment(self, bold: torch.Tensor, t: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        bold, t = tr_jitter(bold, t, self.tr_jitter)
        return gaussian_noise(roi_dropout(bold, self.roi_dropout), self.noise_std), t

    def compute_losses(self, batch: dict) -> dict[str, torch.Tensor]:
        if "bold2" not in batch:
            raise ConfigError("task=contrastive needs window pairs: set data.pairs=true")
        views = [(batch["bold"], batch.get("t")), (batch["bold2"], batch.get("t2"))]
        if self.training:
            views = [self._augment(*v) for v in views]
        e1 = self._pooled(*views[0])
        z1, z2 = self.projection(e1), self.projection(self._pooled(*views[1]))
        # global negatives in training (every rank takes part); validation batches may differ in number per rank
        nt = nt_xent(z1, z2, self.temperature, groups=batch["run"], global_negatives=self.training)
        losses = {"nt_xent": nt}
        loss = nt
        if self.fc_target_weight > 0:
            target = self.model.pooling_readout.fc_edges(views[0][0]).detach()
            fc = ((e1 - target).square().sum(1) / target.square().sum(1).clamp_min(1e-6)).mean()
            losses["fc_target"] = fc
            loss = loss + self.fc_target_weight * fc
        if self.mask_weight > 0:
            rec = self._masked_reconstruction(batch["bold"], batch.get("t"))
            losses["masked_l1"] = rec
            loss = loss + self.mask_weight * rec
        with torch.no_grad():
            sim = nn.functional.normalize(z1, dim=1) @ nn.functional.normalize(z2, dim=1).T
            run = batch["run"]
            losses["same_run_top1"] = (run[sim.argmax(dim=1)] == run).float().mean()
        return {"loss": loss, **losses}

    def _masked_reconstruction(self, bold: torch.Tensor, t: torch.Tensor | None) -> torch.Tensor:
        """L1 between the hidden ROIs' BOLD and its prediction from the per-TR features of the window with
        those ROIs set to 0 for every TR (tube masking)."""
        hidden = tube_mask((bold.shape[0], bold.shape[2]), self.mask_ratio, bold.device)[:, None, :]
        masked = bold.masked_fill(hidden, 0.0)
        feats = self.model.frame_features(*self.model.inputs({"bold": masked, "t": t}))
        pred = self.mask_head(feats)
        where = hidden.expand_as(bold)
        return (pred.float() - bold.float()).abs()[where].mean()

    @torch.no_grad()
    def embed(self, batch: dict) -> torch.Tensor:
        return self._pooled(batch["bold"], batch.get("t"))
