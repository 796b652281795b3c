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

Validation does not depend on the number of ranks: the projections of every validation window are
gathered at the end of the epoch, ordered by the window's index in the validation set, and NT-Xent
(and ``same_run_top1``) is computed over consecutive groups of ``val_group_size`` windows of that order
(the negatives of an anchor are the other windows of its group). On one rank with
``data.eval_batch_size`` as the group size (the configured default) these groups are its validation
batches, so the numbers are those of one process; N ranks print the same ``val/loss``.
"""

from __future__ import annotations

import torch
from torch import nn

from brainfm.errors import ConfigError
from brainfm.models.heads import ProjectionHead, ReconstructionHead
from brainfm.tasks.augment import gaussian_noise, roi_dropout, tr_jitter, tube_mask
from brainfm.tasks.base import BrainfmTask
from brainfm.tasks.distributed import GlobalBatchNorm1d, world
from brainfm.tasks.losses import nt_xent
from brainfm.tasks.metrics import WindowRows


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
        val_group_size: validation windows per NT-Xent group (the candidates of each validation anchor),
            taken in the order of the validation set after gathering every rank's windows, so the
            validation loss is the same on any number of ranks (config default: ``data.eval_batch_size``,
            one rank's validation batches). A last group of one window joins the one before.

    Batches need ``bold2``/``t2`` (set ``data.pairs=true``). ``embed`` returns the backbone's pooled
    embedding ``(B, out_dim)`` (before the projection head).

    Raises:
        ConfigError: a backbone that does not read ROI windows, an unknown ``projection``, an auxiliary
            target the backbone cannot serve (named with the fix), or batches without pairs.
    """

    def __init__(self, model: dict, temperature: float = 0.1, proj_dim: int = 128, noise_std: float = 0.0,
                 projection: str = "mlp", proj_hidden: int = 1024, roi_dropout: float = 0.0, tr_jitter: float = 0.0,
                 fc_target_weight: float = 0.0, mask_ratio: float = 0.75, mask_weight: float = 0.0,
                 val_group_size: int = 64, **kwargs) -> None:
        self._objective = {"temperature": float(temperature), "proj_dim": int(proj_dim), "noise_std": float(noise_std),
                           "projection": projection, "proj_hidden": int(proj_hidden), "roi_dropout": float(roi_dropout),
                           "tr_jitter": float(tr_jitter), "fc_target_weight": float(fc_target_weight),
                           "mask_ratio": float(mask_ratio), "mask_weight": float(mask_weight),
                           "val_group_size": int(val_group_size)}
        super().__init__(model, **kwargs)
        m = self.model
        if m.input_keys not in (("bold", "t"), ("bold",)):
            raise ConfigError(f"task=contrastive needs a backbone of ROI windows; {type(m).__name__} reads "
                              f"{list(m.input_keys)}. Fix: model=bert, gpt, lstm_ae, temporal_mlp, fc or mean_mlp")
        if projection not in ("mlp", "none"):
            raise ConfigError(f"task.projection={projection!r} must be mlp or none")
        if not 0.0 <= float(roi_dropout) < 1.0 or not 0.0 <= float(tr_jitter) < 1.0:
            raise ConfigError(f"task.roi_dropout={roi_dropout} and task.tr_jitter={tr_jitter} must lie in [0, 1)")
        if int(val_group_size) < 2:
            raise ConfigError(f"task.val_group_size={val_group_size} must be >= 2 (an anchor needs a negative); "
                              "default: data.eval_batch_size")
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
        self.val_group_size = int(val_group_size)
        self._val_views = WindowRows()
        self._val_seen = 0
        d = m.out_dim
        # SimCLR's head; its BatchNorm's training statistics are those of the global batch
        self.projection = ProjectionHead(d, int(proj_dim), min(d, int(proj_hidden)), norm=GlobalBatchNorm1d) \
            if projection == "mlp" else nn.Identity()
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

    def forward(self, batch: dict, projections: bool = False) -> dict[str, torch.Tensor]:
        """:meth:`compute_losses` (through ``forward``, for FSDP2's hooks)."""
        return self.compute_losses(batch, projections)

    def compute_losses(self, batch: dict, projections: bool = False) -> dict[str, torch.Tensor]:
        """``loss`` (NT-Xent over the batch, global in training, plus the auxiliary targets) and its parts.
        With ``projections`` (validation): the two views' projections ``z1``, ``z2`` ``(B, proj_dim)`` and
        the auxiliary targets, no NT-Xent (computed over the gathered epoch, :meth:`on_validation_epoch_end`)."""
        if "bold2" not in batch:
            raise ConfigError("task=contrastive needs window pairs: set data.pairs=true")
        views = [(batch["bold"], batch.get("t")), (batch["bold2"], batch.get("t2"))]
        if self.training:
            views = [self._augment(*v) for v in views]
        e1 = self._pooled(*views[0])
        z1, z2 = self.projection(e1), self.projection(self._pooled(*views[1]))
        losses = {}
        if not projections:  # global negatives in training (every rank takes part)
            losses["nt_xent"] = nt_xent(z1, z2, self.temperature, groups=batch["run"], global_negatives=self.training)
        if self.fc_target_weight > 0:
            target = self.model.pooling_readout.fc_edges(views[0][0]).detach()
            losses["fc_target"] = ((e1 - target).square().sum(1) / target.square().sum(1).clamp_min(1e-6)).mean()
        if self.mask_weight > 0:
            losses["masked_l1"] = self._masked_reconstruction(batch["bold"], batch.get("t"))
        if projections:
            return {"z1": z1, "z2": z2, **losses}
        with torch.no_grad():
            losses["same_run_top1"] = _same_run_top1(z1, z2, batch["run"])
        return {"loss": self._total(losses), **losses}

    def _total(self, losses: dict) -> torch.Tensor:
        loss = losses["nt_xent"]
        if self.fc_target_weight > 0:
            loss = loss + self.fc_target_weight * losses["fc_target"]
        if self.mask_weight > 0:
            loss = loss + self.mask_weight * losses["masked_l1"]
        return loss

    # -- validation: NT-Xent over fixed groups of the gathered windows ---------------------------------------------
    def validation_step(self, batch: dict, batch_idx: int) -> None:
        out = self(batch, projections=True)
        n = self.batch_size(batch)
        keys = batch.get("window")
        if keys is None:  # the evaluation sampler's layout: rank r holds windows r, r + W, ... in order
            rank, size = world()
            keys = (torch.arange(n, device=out["z1"].device) + self._val_seen) * size + rank
        self._val_seen += n
        self._val_views.add(keys, z1=out.pop("z1").float(), z2=out.pop("z2").float(), run=batch["run"])
        for name, value in out.items():
            self._val_means.add(name, value, n)

    def on_validation_epoch_end(self) -> None:
        """``val/nt_xent``, ``val/same_run_top1`` over the groups of :func:`grouped_nt_xent` of every
        rank's windows, the auxiliary targets' means over every window, and ``val/loss``: the same
        numbers on every rank, whatever the number of ranks."""
        rows = self._val_views.gathered(self.device)
        means = {k: torch.tensor(v) for k, v in self._val_means.compute(self.device).items()}
        self._val_views.clear()
        self._val_means.clear()
        self._val_seen = 0
        if rows is None:
            return
        _, r = rows
        means["nt_xent"], means["same_run_top1"] = grouped_nt_xent(r["z1"], r["z2"], r["run"], self.val_group_size,
                                                                   self.temperature)
        means["loss"] = self._total(means)
        for name, value in sorted(means.items()):
            self.log(f"val/{name}", float(value), prog_bar=name == "loss", sync_dist=True)

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


def _same_run_top1(z1: torch.Tensor, z2: torch.Tensor, run: torch.Tensor) -> torch.Tensor:
    """Fraction of first views whose most similar second view (cosine) is of the same run."""
    sim = nn.functional.normalize(z1, dim=1) @ nn.functional.normalize(z2, dim=1).T
    return (run[sim.argmax(dim=1)] == run).float().mean()


@torch.no_grad()
def grouped_nt_xent(z1: torch.Tensor, z2: torch.Tensor, run: torch.Tensor, group_size: int,
                    temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """NT-Xent and same-run top-1 over consecutive groups of ``group_size`` pairs (the last group of one pair
    joins the one before), each group's value weighted by its size: the mean over every anchor.

    Args:
        z1, z2: ``(N, D)`` projections of the two views of ``N`` windows, in a fixed order.
        run: ``(N,)`` run of each window (other windows of a run are not negatives).
        group_size: pairs per group (>= 2).
        temperature: NT-Xent temperature.

    Returns:
        ``(nt_xent, same_run_top1)``, scalars.

    Raises:
        ValueError: fewer than two windows.
    """
    n = z1.shape[0]
    if n < 2:
        raise ValueError(f"contrastive validation needs at least two windows, got {n}")
    starts = list(range(0, n, group_size))
    if n - starts[-1] < 2:
        starts.pop()
    bounds = list(zip(starts, starts[1:] + [n]))
    loss = sum(nt_xent(z1[a:b], z2[a:b], temperature, groups=run[a:b], global_negatives=False).double() * (b - a)
               for a, b in bounds)
    top1 = sum(_same_run_top1(z1[a:b], z2[a:b], run[a:b]).double() * (b - a) for a, b in bounds)
    return (loss / n).float(), (top1 / n).float()
