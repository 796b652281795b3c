"""Self-distillation with a coding-rate regulariser: SimDINO (Wu et al. 2025, "Simplifying DINO via
Coding Rate Regularization", ICML; RobinWu218/SimDINO) as Brain-Semantoks trains its network
tokenizer + transformer (Gijsen, Schulz & Ritter, ICLR 2026; SamGijsen/Brain-Semantoks:
``simdino.py``, ``model/simdino_loss.py``, ``data/dataset.py``, ``config/example_config.yaml``).

A student and an EMA teacher (same architecture) encode two views of one scan; here the views are
two non-overlapping windows of the same run (``data.pairs=true``; the reference takes two random
100-TR crops of the same scan). Projections are L2-normalized by a 2-layer head without DINO's
prototype layer. Instead of DINO's centring, sharpening and softmax, the loss is

    L(views) = -coeff * mean_{i != j} mean_b <t_i[b], s_j[b]>  -  mean_v gamma * R((s_v + t_v) / 2)

(cross-view alignment of student ``s`` and teacher ``t`` features, plus the coding rate ``R`` of the
features, which keeps them from collapsing; :func:`simdino_loss`, :func:`coding_rate`). Brain-Semantoks
applies it three times: to the CLS tokens (weight 1), to each network's tokens averaged over time
(weight 0.5, decayed to 0 by a cosine over the first 5 % of training) and, on masked batches, to the
masked tokens (weight 0.5: cosine between the student's masked token and the teacher's unmasked
token at the same network and patch, no coding rate).

Masking: with probability ``masking.frequency`` (0.5) a batch is masked; each view of each sample
then gets a *slice* mask (:func:`slice_masks`): with equal probability a random set of whole
networks (all patches) or one contiguous block of patches (all networks), covering a fraction
``r ~ U(masking.ratio)`` = U(0.65, 0.85) of that axis. Augmentation (reference ``augment_level``
1, applied to each view before both networks see it): zero a random ``U(0, 0.1)`` of the ROIs
(at least one) and a contiguous ``U(0, 0.3)`` of the TRs (at least one), scale by ``U(0.8, 1.2)``,
add Gaussian noise of std 0.1 (the data are z-scored per ROI).

Teacher: EMA of the student's encoder and head after every optimiser step, momentum
``m(s) = 1 - (1 - m0) (cos(pi s / S) + 1) / 2`` from ``m0 = 0.99`` to 1 over the ``S`` steps
(:func:`teacher_momentum`). Weight decay follows a cosine from 0.05 to 0.3 (``weight_decay_end``).
Features for evaluation/probing: the teacher's CLS and mean token (``cls_avg``), as the
reference's linear probe.

Differences from the reference, on purpose: views are windows of one run from brainfm's window
sampler (random crop length per batch), so a batch may hold several windows of one subject; the
coding rate is then taken over one sample per subject (its earliest window; ``coding_rate_over``),
which is what the reference's batches (one sample per subject) amount to; weight decay spares biases,
norms and embeddings (brainfm's AdamW groups); the learning rate is absolute (reference:
``0.0007 * batch / 256``); in training the coding rate is taken over the global batch (the rows of
every rank, gathered with gradients), so N ranks of batch b equal one rank of batch N b (the
reference, without a covariance all-reduce, computes it per process and scales by the world size).
SimDINO has no teacher centring (DINO's centring is what its coding-rate term replaces).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence

import torch

from brainfm.errors import ConfigError
from brainfm.models.backbone import require
from brainfm.models.heads import ProjectionHead
from brainfm.models.network_maps import load_network_map
from brainfm.tasks.base import BrainfmTask, plain
from brainfm.tasks.distributed import gather


def coding_rate(z: torch.Tensor, eps: float = 0.05) -> torch.Tensor:
    """Coding rate of ``n`` features of dimension ``d``:

        R(Z) = 1/2 logdet(I_d + d / (n * eps) Z^T Z),

    the rate-distortion of Gaussian features up to precision ``eps`` (Ma et al. 2007; Yu et al.
    2020, MCR^2). SimDINO's paper writes ``d / (n eps^2)``; its code and Brain-Semantoks'
    (``MCRLoss.calc_expansion``, ``eps=0.05``) put ``eps`` where the paper has ``eps^2``, and so
    does this function: ``eps=0.05`` here is the reference's value (``eps ~ 0.224`` in the paper's
    notation). Computed on the smaller of the ``d x d`` and ``n x n`` Gram matrices (equal by
    Sylvester's determinant identity), by Cholesky, in float32.

    Args:
        z: ``(n, d)`` features.
        eps: precision (squared), > 0.

    Returns:
        scalar ``R`` (nats).

    Raises:
        ValueError: ``z`` not 2-D or ``eps <= 0``.
    """
    if z.ndim != 2 or eps <= 0:
        raise ValueError(f"coding_rate needs (n, d) features and eps > 0, got {tuple(z.shape)} and {eps}")
    n, d = z.shape
    z = z.float()
    gram = z.T @ z if d <= n else z @ z.T
    eye = torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
    chol = torch.linalg.cholesky(eye + (d / (n * eps)) * gram)
    return chol.diagonal().log().sum()  # 1/2 logdet = sum log diag(L)


def simdino_loss(
    student: Sequence[torch.Tensor], teacher: Sequence[torch.Tensor], eps: float = 0.05, coeff: float = 1.0,
    rate_rows: torch.Tensor | None = None, global_batch: bool = False, keep: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """SimDINO's loss between ``V`` student and ``V`` teacher views (Brain-Semantoks' ``MCRLoss``
    with ``no_diag=True, expa_type=1``).

    ``alignment = mean_{i != j} mean_b <t_i[b], s_j[b]>`` (teacher view ``i`` against the student's
    *other* views; features L2-normalized), ``expansion = mean_v gamma * R((s_v + t_v) / 2)`` with
    ``gamma = (d + n) / (d n)`` and :func:`coding_rate` ``R``; ``loss = -coeff * alignment -
    expansion``. (With unit vectors, ``-<t, s> = ||t - s||^2 / 2 - 1``: SimDINO's squared distance.)

    Args:
        student, teacher: ``V >= 2`` tensors ``(n, d)`` each, L2-normalized; teacher detached.
        eps: coding-rate precision (:func:`coding_rate`; reference 0.05).
        coeff: weight of the alignment term (reference 1).
        rate_rows: indices of the rows the coding rate is computed on (``None``: all ``n``; then
            ``n`` in ``gamma`` and ``R`` is the number of these rows); rows of the global batch with
            ``global_batch``.
        global_batch: the coding rate is taken over the rows of every rank (gathered with gradients,
            :func:`brainfm.tasks.distributed.gather`), as one process with the whole batch; the
            alignment is this rank's mean (DDP averages it).
        keep: ``(n,)`` bool, this rank's rows that take part (None: all): rows left out (the tokens
            of networks whose atlas the data lacks) count neither in the alignment nor in the coding
            rate.

    Returns:
        ``(loss, {"alignment", "coding_rate"})``, scalars (the parts detached).

    Raises:
        ValueError: fewer than two views, or views of different shapes.
    """
    if len(student) != len(teacher) or len(student) < 2:
        raise ValueError(f"simdino_loss needs the same number (>= 2) of student and teacher views, got {len(student)} and {len(teacher)}")
    s, t = torch.stack(list(student)), torch.stack(list(teacher))
    if s.shape != t.shape:
        raise ValueError(f"student views {tuple(s.shape)} and teacher views {tuple(t.shape)} differ")
    v, n, d = s.shape
    if keep is None:
        sim = torch.einsum("ibd,jbd->ij", t.float(), s.float()) / n  # teacher view i x student view j
    else:
        sim = torch.einsum("ibd,jbd->ij", t[:, keep].float(), s[:, keep].float()) / keep.sum().clamp_min(1)
    off_diagonal = ~torch.eye(v, dtype=torch.bool, device=sim.device)
    alignment = sim[off_diagonal].mean()
    z = (s + t) / 2
    if global_batch:
        z = gather(z.transpose(0, 1)).transpose(0, 1)  # (v, N, d): every rank's rows
    if keep is not None:
        kept = (gather(keep.to(torch.uint8)[:, None], grad=False)[:, 0] if global_batch else keep).bool()
        if rate_rows is not None:
            rate_rows = rate_rows[kept[rate_rows]]
        else:
            rate_rows = kept.nonzero()[:, 0]
    if rate_rows is not None:
        z = z[:, rate_rows]
    m = z.shape[1]
    gamma = (d + m) / (d * m)
    expansion = gamma * torch.stack([coding_rate(z[k], eps) for k in range(v)]).mean()
    loss = -coeff * alignment - expansion
    return loss, {"alignment": alignment.detach(), "coding_rate": expansion.detach()}


def teacher_momentum(step: int, total_steps: int, base: float = 0.99) -> float:
    """EMA momentum at optimiser step ``step`` of ``total_steps``: cosine from ``base`` (step 0) to
    1 (the last step), as Brain-Semantoks' ``_get_teacher_momentum`` (``base_teacher_momentum``
    0.99)."""
    if total_steps <= 1:
        return float(base)
    return 1.0 - (1.0 - base) * (math.cos(math.pi * step / total_steps) + 1.0) / 2.0


def slice_masks(batch: int, n_networks: int, n_patches: int, ratio: Sequence[float] = (0.65, 0.85),
                generator: torch.Generator | None = None) -> torch.Tensor:
    """Brain-Semantoks' slice masks, one per sample: with probability 1/2 a random set of
    ``floor(r N)`` whole networks, else one contiguous block of ``floor(r P)`` patches across all
    networks, with ``r ~ U(ratio)``; at least one and at most ``N - 1`` (``P - 1``) slices, so
    something stays visible. A single network (patch) forces the other kind; ``N = P = 1``:
    nothing is masked.

    Returns:
        ``(batch, N, P)`` bool, True = masked.
    """
    lo, hi = float(ratio[0]), float(ratio[1])
    if not 0.0 <= lo <= hi <= 1.0:
        raise ConfigError(f"task.masking.ratio={list(ratio)} must satisfy 0 <= low <= high <= 1")
    masks = torch.zeros(batch, n_networks, n_patches, dtype=torch.bool)
    u = torch.rand(batch, 3, generator=generator)
    for b in range(batch):
        r = lo + (hi - lo) * float(u[b, 1])
        by_network = bool(u[b, 0] < 0.5)
        if n_networks < 2:
            by_network = False
        if n_patches < 2:
            by_network = True
        if by_network and n_networks >= 2:
            k = min(max(int(r * n_networks), 1), n_networks - 1)
            masks[b, torch.randperm(n_networks, generator=generator)[:k], :] = True
        elif not by_network and n_patches >= 2:
            k = min(max(int(r * n_patches), 1), n_patches - 1)
            start = int(float(u[b, 2]) * (n_patches - k + 1))
            masks[b, :, start : start + k] = True
    return masks


def augment_views(bold: torch.Tensor, roi_dropout: Sequence[float] | None = (0.0, 0.1),
                  time_dropout: Sequence[float] | None = (0.0, 0.3), scale: Sequence[float] | None = (0.8, 1.2),
                  noise_std: float = 0.1) -> torch.Tensor:
    """Brain-Semantoks' light augmentation (``augment_level`` 1) of z-scored windows ``(B, T, V)``,
    per sample: zero ``max(1, floor(r V))`` random ROIs with ``r ~ U(roi_dropout)``, zero a
    contiguous block of ``max(1, floor(r T))`` TRs with ``r ~ U(time_dropout)``, multiply by
    ``U(scale)``, add N(0, ``noise_std``^2). ``None`` (or 0) switches a step off."""
    b, t, v = bold.shape
    x = bold.clone()
    for i in range(b):
        if roi_dropout is not None:
            r = float(torch.empty(()).uniform_(*roi_dropout))
            x[i, :, torch.randperm(v)[: max(1, int(v * r))]] = 0.0
        if time_dropout is not None:
            r = float(torch.empty(()).uniform_(*time_dropout))
            k = min(max(1, int(t * r)), t)
            start = int(torch.randint(0, t - k + 1, ()))
            x[i, start : start + k] = 0.0
    if scale is not None:
        x = x * torch.empty(b, 1, 1, device=x.device).uniform_(*scale)
    if noise_std:
        x = x + noise_std * torch.randn_like(x)
    return x


def simdino_head(in_dim: int, hidden_dim: int = 1024, bottleneck_dim: int = 128, n_layers: int = 2) -> ProjectionHead:
    """SimDINO's head (DINOHead without the prototype layer): :class:`~brainfm.models.heads.ProjectionHead`
    with ``n_layers`` Linear layers (GELU between) ``d -> hidden_dim -> ... -> bottleneck_dim``,
    truncated-normal weights (std 0.02), then L2 normalization. Brain-Semantoks: 2 layers, hidden 1024,
    bottleneck 128. ``(..., d) -> (..., bottleneck_dim)``.

    Raises:
        ConfigError: ``n_layers < 1``.
    """
    return ProjectionHead(int(in_dim), int(bottleneck_dim), int(hidden_dim), int(n_layers), activation="gelu",
                          init_std=0.02, l2_normalize=True)


def resolve_network_map(model: dict, data_meta: dict | None) -> dict:
    """Replace ``model["network_map"]`` by the explicit ``network_assignment`` / ``network_names``
    matched to the data's ROI names (``data_meta["roi_names"]``; by count when the data has none),
    so that the checkpoint carries the token layout it was trained with.

    Raises:
        ConfigError: from :func:`brainfm.models.network_maps.load_network_map` (ROI-count mismatch,
            unknown ROI, ROI order).
    """
    model = dict(model)
    if model.get("network_assignment") is not None or model.get("network_map") is None:
        return model

    nmap = load_network_map(model["network_map"], roi_names=(data_meta or {}).get("roi_names"), n_rois=model.get("n_rois"))
    model["network_assignment"] = list(nmap.assignment)
    model["network_names"] = list(nmap.network_names)
    return model


class SimDINO(BrainfmTask):
    """SimDINO self-distillation of a :class:`~brainfm.models.semantoks.SemantoksEncoder`
    (Brain-Semantoks). Defaults (``conf/task/simdino.yaml``) are the reference's.

    Args:
        model: backbone config (``model=semantoks``); its ``network_map`` is resolved against
            ``data_meta["roi_names"]`` (:func:`resolve_network_map`).
        head: ``{hidden_dim, bottleneck_dim, n_layers}`` of :func:`simdino_head` (1024, 128, 2).
        teacher_momentum: EMA momentum at step 0, cosine to 1 (0.99).
        coding_rate_eps: coding-rate precision ``eps`` (:func:`coding_rate`; 0.05).
        alignment_coeff: weight of the alignment term inside each SimDINO loss (``coeff``, 1).
        coding_rate_over: ``subjects``: the coding rate of a batch is taken over one sample per
            subject (its first), as in the reference, whose batches hold one sample per subject;
            ``samples``: over every sample. With few subjects (the embedded data: 7) a batch holds
            several windows of one subject, and a coding rate over all of them pushes apart what
            the alignment term pulls together.
        cls_loss_weight, network_loss_weight, mask_loss_weight: weights of the CLS, network and
            masked-token losses (1, 0.5, 0.5).
        network_loss_decay: fraction of training over which the network-loss weight decays to 0 by
            a cosine (0.05 = the reference's 5 of 100 epochs; ``None``: constant).
        masking: ``{frequency, ratio, kind}``: probability that a batch is masked (0.5), the
            masked fraction range (0.65, 0.85), ``slice`` (networks or a time block), ``network``
            or ``time``.
        augment: ``{roi_dropout, time_dropout, scale, noise_std}`` (see :func:`augment_views`);
            ``None``: none. Training only.
        weight_decay_end: weight decay at the last step, cosine from ``optimizer.weight_decay``
            (0.3; ``None``: constant).
        embed_features: ``cls_avg`` (mean token ∥ CLS, ``2 d``), ``cls`` or ``avg`` (``d``).
        embed_encoder: ``teacher`` (the reference's probe features) or ``student``.

    Batches need ``bold`` and ``bold2`` ``(B, T, V)`` (``data.pairs=true``); an optional ``roi_mask``
    ``(B, V)`` bool (multi-atlas data, :mod:`brainfm.data.stores.roi`) marks ROIs of atlases the
    file lacks: their networks' tokens are masked in both encoders
    (:meth:`~brainfm.models.semantoks.SemantoksEncoder.missing_networks`) and left out of the
    network and masked-token losses and of the mean token. :meth:`embed` returns ``(B, 2 d)``
    (``cls_avg``: mean token ∥ CLS, the reference's order) or ``(B, d)``.

    Raises:
        ConfigError: a backbone other than SemantoksEncoder; batches without pairs; bad options.
    """

    def __init__(
        self,
        model: dict,
        head: dict | None = None,
        teacher_momentum: float = 0.99,
        coding_rate_eps: float = 0.05,
        alignment_coeff: float = 1.0,
        coding_rate_over: str = "subjects",
        cls_loss_weight: float = 1.0,
        network_loss_weight: float = 0.5,
        network_loss_decay: float | None = 0.05,
        mask_loss_weight: float = 0.5,
        masking: dict | None = None,
        augment: dict | None = None,
        weight_decay_end: float | None = 0.3,
        embed_features: str = "cls_avg",
        embed_encoder: str = "teacher",
        **kwargs,
    ) -> None:
        head = {"hidden_dim": 1024, "bottleneck_dim": 128, "n_layers": 2, **(plain(head) or {})}
        masking = {"frequency": 0.5, "ratio": [0.65, 0.85], "kind": "slice", **(plain(masking) or {})}
        augment = plain(augment)
        if masking["kind"] not in ("slice", "network", "time"):
            raise ConfigError(f"task.masking.kind={masking['kind']!r} must be 'slice', 'network' or 'time'")
        if coding_rate_over not in ("subjects", "samples"):
            raise ConfigError(f"task.coding_rate_over={coding_rate_over!r} must be 'subjects' or 'samples'")
        if embed_features not in ("cls_avg", "cls", "avg"):
            raise ConfigError(f"task.embed_features={embed_features!r} must be 'cls_avg', 'cls' or 'avg'")
        if embed_encoder not in ("teacher", "student"):
            raise ConfigError(f"task.embed_encoder={embed_encoder!r} must be 'teacher' or 'student'")
        if not 0.0 <= float(teacher_momentum) <= 1.0:
            raise ConfigError(f"task.teacher_momentum={teacher_momentum} must lie in [0, 1]")
        self._objective = {
            "head": head, "teacher_momentum": float(teacher_momentum), "coding_rate_eps": float(coding_rate_eps),
            "alignment_coeff": float(alignment_coeff), "coding_rate_over": coding_rate_over,
            "cls_loss_weight": float(cls_loss_weight),
            "network_loss_weight": float(network_loss_weight),
            "network_loss_decay": None if network_loss_decay is None else float(network_loss_decay),
            "mask_loss_weight": float(mask_loss_weight), "masking": masking, "augment": augment,
            "weight_decay_end": None if weight_decay_end is None else float(weight_decay_end),
            "embed_features": embed_features, "embed_encoder": embed_encoder,
        }
        model = resolve_network_map(plain(model), plain(kwargs.get("data_meta")))
        super().__init__(model, **kwargs)

        require(self.model, "task=simdino", "a network-token encoder (Brain-Semantoks)", "model=semantoks", "tokenize",
                "encode", input_keys=("bold",))
        self.head = simdino_head(self.model.d_model, **head)
        self.teacher = copy.deepcopy(self.model)
        self.teacher_head = copy.deepcopy(self.head)
        for p in [*self.teacher.parameters(), *self.teacher_head.parameters()]:
            p.requires_grad_(False)
        self._ema_step: int | None = None

    def objective_hparams(self) -> dict:
        return copy.deepcopy(self._objective)

    # -- schedules --------------------------------------------------------------------------------
    def _total_steps(self) -> int:
        trainer = self._trainer
        if trainer is None:
            return 1
        return max(1, int(trainer.estimated_stepping_batches))

    def network_weight_at(self, step: int, total_steps: int) -> float:
        """The network-loss weight at ``step``: cosine from its value to 0 over the first
        ``network_loss_decay`` of training (then 0)."""
        w, frac = self.hparams.network_loss_weight, self.hparams.network_loss_decay
        if not frac:
            return float(w)
        decay_steps = frac * total_steps
        if step >= decay_steps:
            return 0.0
        return float(w) * 0.5 * (1.0 + math.cos(math.pi * step / decay_steps))

    @torch.no_grad()
    def update_teacher(self, step: int, total_steps: int) -> float:
        """EMA update after optimiser step ``step``: ``theta_t <- m theta_t + (1 - m) theta_s`` for
        the encoder and the head, ``m = teacher_momentum(step, total_steps, m0)``. Returns ``m``."""
        m = teacher_momentum(step, total_steps, self.hparams.teacher_momentum)
        for student, teacher in ((self.model, self.teacher), (self.head, self.teacher_head)):
            for ps, pt in zip(student.parameters(), teacher.parameters()):
                pt.mul_(m).add_(ps.detach(), alpha=1.0 - m)
        return m

    def on_train_start(self) -> None:
        super().on_train_start()
        self._ema_step = self.global_step

    def on_train_batch_start(self, batch, batch_idx: int) -> None:
        super().on_train_batch_start(batch, batch_idx)
        wd_end = self.hparams.weight_decay_end
        if wd_end is None:
            return
        wd0 = float(self.hparams.optimizer.get("weight_decay", 0.1))
        progress = min(1.0, self.global_step / self._total_steps())
        wd = wd_end + (wd0 - wd_end) * 0.5 * (1.0 + math.cos(math.pi * progress))
        for opt in self.trainer.optimizers:
            for group in opt.param_groups:
                if group["weight_decay"] > 0:
                    group["weight_decay"] = wd

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        # once per optimiser step (gradient accumulation: not after every batch)
        if self._ema_step is None:
            self._ema_step = self.global_step - 1
        if self.global_step > self._ema_step:
            self.update_teacher(self.global_step - 1, self._total_steps())
            self._ema_step = self.global_step

    # -- objective --------------------------------------------------------------------------------
    def _masks(self, batch: int, n_patches: int, device: torch.device) -> torch.Tensor:
        cfg = self.hparams.masking
        n_networks = self.model.n_networks
        if float(torch.rand(())) >= float(cfg["frequency"]):
            return torch.zeros(batch, n_networks, n_patches, dtype=torch.bool, device=device)
        kind = cfg["kind"]
        if kind == "slice":
            masks = slice_masks(batch, n_networks, n_patches, cfg["ratio"])
        else:  # one axis only
            masks = slice_masks(batch, n_networks if kind == "network" else 1, n_patches if kind == "time" else 1, cfg["ratio"])
            masks = masks.expand(batch, n_networks, n_patches).clone()
        return masks.to(device)

    def _rate_rows(self, batch: dict, device: torch.device, global_batch: bool) -> torch.Tensor | None:
        """Rows of the (global) batch the coding rate is taken over: one sample per subject, its
        earliest window (smallest run, then onset), so the rows do not depend on how the batch is laid
        out over ranks."""
        if self.hparams.coding_rate_over == "samples" or "subject" not in batch:
            return None
        keys = [batch[k].to(device) for k in ("subject", "run", "onset") if k in batch]
        if global_batch:
            keys = [gather(k, grad=False) for k in keys]
        subject = keys[0]
        order = torch.arange(len(subject), device=device)
        for k in reversed(keys):  # lexicographic: subject, run, onset
            order = order[torch.sort(k[order], stable=True).indices]
        first = torch.ones(len(order), dtype=torch.bool, device=device)
        first[1:] = subject[order][1:] != subject[order][:-1]
        return torch.sort(order[first]).values

    def compute_losses(self, batch: dict) -> dict[str, torch.Tensor]:
        if "bold2" not in batch:
            raise ConfigError("task=simdino needs two views per sample: set data.pairs=true")
        views = [batch["bold"], batch["bold2"]]
        if self.training and self.hparams.augment:
            views = [augment_views(v, **self.hparams.augment) for v in views]
        b = views[0].shape[0]
        x = torch.cat(views)  # (2B, T, V): both views in one pass
        n_net, n_patch = self.model.n_networks, self.model.n_patches(x.shape[1])
        mask = self._masks(2 * b, n_patch, x.device)
        roi_mask = batch.get("roi_mask")  # multi-atlas data: False for the ROIs of an atlas the file lacks
        if roi_mask is not None and roi_mask.ndim == 2:
            roi_mask = torch.cat([roi_mask, roi_mask])  # the two views are windows of one run
        missing = self.model.missing_networks(roi_mask, 2 * b)  # (2B, N) or None: tokens left out of every loss
        with torch.no_grad():
            t_tokens = self.teacher(x, roi_mask=roi_mask)
        s_tokens = self.model(x, mask, roi_mask=roi_mask)  # the MASK token is in the graph even when nothing is masked
        proj_t, proj_s = self.teacher_head, self.head
        eps, coeff = self.hparams.coding_rate_eps, self.hparams.alignment_coeff
        glob = self.training  # every rank takes part in training; validation batches may differ per rank
        rows = self._rate_rows(batch, x.device, glob)
        t_cls, s_cls = proj_t(t_tokens[:, 0]), proj_s(s_tokens[:, 0])
        cls_loss, parts = simdino_loss(s_cls.split(b), t_cls.split(b), eps, coeff, rows, glob)
        loss = self.hparams.cls_loss_weight * cls_loss
        out = {"cls_loss": cls_loss.detach(), **parts}

        w_net = self.network_weight_at(self.global_step, self._total_steps())
        if w_net > 0:
            t_net = proj_t(t_tokens[:, 1:].reshape(2 * b, n_net, n_patch, -1).mean(2)).reshape(2, b * n_net, -1)
            s_net = proj_s(s_tokens[:, 1:].reshape(2 * b, n_net, n_patch, -1).mean(2)).reshape(2, b * n_net, -1)
            net_rows = None if rows is None else (rows[:, None] * n_net + torch.arange(n_net, device=x.device)).flatten()
            keep = None if missing is None else ~missing[:b].reshape(-1)
            network_loss, _ = simdino_loss(list(s_net), list(t_net), eps, coeff, net_rows, glob, keep)
            loss = loss + w_net * network_loss
            out["network_loss"] = network_loss.detach()
        out["network_loss_weight"] = torch.tensor(w_net)

        if self.hparams.mask_loss_weight > 0 and bool(mask.any()) and bool(
                (mask if missing is None else mask & ~missing[:, :, None]).any()):
            flat = mask.reshape(2 * b, n_net * n_patch)
            if missing is not None:  # a missing network's tokens have no target
                flat = flat & ~missing[:, :, None].expand(2 * b, n_net, n_patch).reshape(2 * b, -1)
            cos = (proj_s(s_tokens[:, 1:][flat]) * proj_t(t_tokens[:, 1:][flat])).sum(-1)
            per_sample = torch.zeros(2 * b, dtype=cos.dtype, device=cos.device).index_add(0, flat.nonzero()[:, 0], cos)
            counts = flat.sum(1)
            mask_loss = -(per_sample[counts > 0] / counts[counts > 0]).mean()
            loss = loss + self.hparams.mask_loss_weight * mask_loss
            out["mask_loss"] = mask_loss.detach()
        out["teacher_std"] = t_cls.float().std(0).mean().detach()  # collapse monitor (-> 0 when collapsed)
        return {"loss": loss, **out}

    @torch.no_grad()
    def tokens(self, batch: dict) -> torch.Tensor:
        """The network x patch tokens ``(B, N * P, d)`` (CLS left out) of the encoder :meth:`embed` reads
        (``embed_encoder``: teacher or student)."""
        encoder = self.teacher if self.hparams.embed_encoder == "teacher" else self.model
        return encoder.features(batch["bold"], roi_mask=batch.get("roi_mask"))

    @torch.no_grad()
    def embed(self, batch: dict) -> torch.Tensor:
        encoder = self.teacher if self.hparams.embed_encoder == "teacher" else self.model
        bold, roi_mask = batch["bold"], batch.get("roi_mask")
        tokens = encoder(bold, roi_mask=roi_mask)
        kind = self.hparams.embed_features
        if kind == "cls":
            return tokens[:, 0]
        pad = encoder.token_padding(roi_mask, bold.shape[0], encoder.n_patches(bold.shape[1]))
        if pad is None:
            avg = tokens[:, 1:].mean(1)
        else:  # the mean over the tokens of the networks that were read
            w = (~pad).to(tokens.dtype)[..., None]
            avg = (tokens[:, 1:] * w).sum(1) / w.sum(1).clamp_min(1)
        if kind == "avg":
            return avg
        return torch.cat([avg, tokens[:, 0]], dim=1)
