"""Masked modelling of parcellated BOLD with a bidirectional transformer (Thomas, Ré & Poldrack
2022): Sequence-BERT and Network-BERT.

Token layout: ``[CLS] A [SEP]`` for one window, or ``[CLS] A [SEP] B [SEP]`` with next-sequence
prediction, where a window of ``T`` TRs is cut into halves ``A`` and ``B`` separated by a gap of
``gap_range`` TRs and, for half of the windows, ``B`` is replaced by the ``B`` of another window
of the batch (label "not next"). Each half's times start at 0 s, as in the reference, so the
time embedding cannot give the answer away.

- ``masking="tr"`` (Sequence-BERT): ``mask_ratio`` of the TRs (at least one per window) are
  replaced by the MASK token and their BOLD is predicted; L1 on masked TRs (+ next-sequence BCE).
- ``masking="roi"`` (Network-BERT): ``mask_ratio`` of the ROIs (at least one) are hidden for the
  whole window (replaced by a learned value per ROI) and predicted; L1 on the masked ROI values.
  The reference masks DiFuMo networks; with an anatomical atlas each ROI is one "network".
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from brainfm.errors import ConfigError
from brainfm.models.backbone import require
from brainfm.models.heads import BinaryHead, ReconstructionHead
from brainfm.tasks.base import BrainfmTask
from brainfm.tasks.sequence_modeling import load_task_weights


def random_mask(shape: tuple[int, int], ratio: float, device: torch.device) -> torch.Tensor:
    """Boolean ``(B, N)`` mask with ``round(ratio * N)`` (at least one) True entries per row."""
    b, n = shape
    k = max(1, int(round(ratio * n)))
    ranks = torch.rand(b, n, device=device).argsort(dim=1).argsort(dim=1)
    return ranks < k


class MaskedSequenceModeling(BrainfmTask):
    """Sequence-BERT / Network-BERT.

    Args:
        masking: ``"tr"`` or ``"roi"``.
        mask_ratio: fraction of TRs (paper 0.2) or ROIs (paper 0.1) masked.
        next_sequence: add the ``[SEP] B [SEP]`` next-sequence objective (BCE on CLS).
        gap_range: ``[min, max)`` TRs between the halves (paper 1-5).
        nsp_weight: weight of the next-sequence loss.
        pooling: ``"mean"`` (of the window's TR states) or ``"cls"`` for :meth:`embed`.
        init_from: weights to start from (backbone, ``head``, ``nsp_head``; e.g. Thomas et al.'s
            Sequence-BERT converted by ``brainfm-convert lfb``; not saved).

    Raises:
        ConfigError: a causal model or one without segment embeddings when needed, bad ratios,
            ``init_from`` weights that do not fit.
    """

    def __init__(
        self,
        model: dict,
        masking: str = "tr",
        mask_ratio: float = 0.2,
        next_sequence: bool = True,
        gap_range: tuple[int, int] = (1, 5),
        nsp_weight: float = 1.0,
        pooling: str = "mean",
        init_from: str | None = None,
        **kwargs,
    ) -> None:
        self._objective = {
            "masking": masking, "mask_ratio": float(mask_ratio), "next_sequence": bool(next_sequence),
            "gap_range": [int(g) for g in gap_range], "nsp_weight": float(nsp_weight), "pooling": pooling,
        }
        super().__init__(model, **kwargs)
        if masking not in ("tr", "roi"):
            raise ConfigError(f"task.masking={masking!r} must be 'tr' (Sequence-BERT) or 'roi' (Network-BERT)")
        if not 0.0 < mask_ratio < 1.0:
            raise ConfigError(f"task.mask_ratio={mask_ratio} must lie in (0, 1)")
        if pooling not in ("mean", "cls"):
            raise ConfigError(f"task.pooling={pooling!r} must be 'mean' or 'cls'")
        require(self.model, "masked modelling (task=seq_bert / net_bert)", "a bidirectional sequence transformer",
                "model=bert", "embed_trs", "encode", "special",
                causal=False)
        if self.model.segment is None:
            raise ConfigError("masked modelling needs segment embeddings: set model.n_segments=2")
        g0, g1 = self._objective["gap_range"]
        if not 0 <= g0 < g1:
            raise ConfigError(f"task.gap_range={list(gap_range)} must be [min, max) with 0 <= min < max")
        self.masking, self.mask_ratio, self.next_sequence = masking, float(mask_ratio), bool(next_sequence)
        self.gap_range, self.nsp_weight, self.pooling = (g0, g1), float(nsp_weight), pooling
        d, r = self.model.d_model, self.model.n_rois
        self.head = ReconstructionHead(d, r)
        self.nsp_head = BinaryHead(d) if next_sequence else None
        self.roi_mask_value = nn.Parameter(torch.zeros(r)) if masking == "roi" else None
        self.model.use_special_tokens("cls", "sep", "segment", *(("mask",) if masking == "tr" else ()))
        if init_from:
            load_task_weights(self, init_from, ("head.", "nsp_head."))

    def objective_hparams(self) -> dict:
        return dict(self._objective)

    # -- token layout --------------------------------------------------------------------------------
    def _tokens(self, parts: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]):
        """``[CLS] part0 [SEP] part1 [SEP] ...``; returns tokens, segment ids and, per part, the
        slice of its TR tokens."""
        b = parts[0][0].shape[0]
        tokens, segments, slices = [self.model.special("cls", b)], [0], []
        pos = 1
        for seg, (bold, t, tr_mask) in enumerate(parts):
            tokens += [self.model.embed_trs(bold, t, tr_mask), self.model.special("sep", b)]
            n = bold.shape[1]
            segments += [seg] * (n + 1)
            slices.append(slice(pos, pos + n))
            pos += n + 1
        seg_ids = torch.tensor(segments, device=tokens[0].device).expand(b, -1)
        return torch.cat(tokens, dim=1), seg_ids, slices

    def _mask_inputs(self, bold: torch.Tensor):
        """Apply the masking; returns model input, TR mask ``(B, T)`` or None, and the loss mask
        ``(B, T, R)``."""
        b, n, r = bold.shape
        if self.masking == "tr":
            tr_mask = random_mask((b, n), self.mask_ratio, bold.device)
            return bold, tr_mask, tr_mask[..., None].expand(b, n, r)
        roi_mask = random_mask((b, r), self.mask_ratio, bold.device)
        inputs = torch.where(roi_mask[:, None, :], self.roi_mask_value.to(bold.dtype), bold)
        return inputs, None, roi_mask[:, None, :].expand(b, n, r)

    def compute_losses(self, batch: dict) -> dict[str, torch.Tensor]:
        bold, t = batch["bold"], batch["t"]
        b, n, _ = bold.shape
        losses: dict[str, torch.Tensor] = {}
        if self.next_sequence:
            gap = int(torch.randint(self.gap_range[0], self.gap_range[1], ()))
            gap = min(gap, max(0, n - 4))
            n_a = (n - gap) // 2
            a, b_half = bold[:, :n_a], bold[:, n_a + gap :]
            is_next = (torch.rand(b, device=bold.device) < 0.5) if b > 1 else torch.ones(1, dtype=torch.bool, device=bold.device)
            donor = torch.where(is_next, torch.arange(b, device=bold.device), (torch.arange(b, device=bold.device) + 1) % b)
            b_half = b_half[donor]
            targets = [a, b_half]
            t_parts = [t[:, :n_a] - t[:, :1], t[:, : b_half.shape[1]] - t[:, :1]]
        else:
            targets, t_parts = [bold], [t - t[:, :1]]
        parts, loss_masks = [], []
        for x, tt in zip(targets, t_parts):
            inputs, tr_mask, loss_mask = self._mask_inputs(x)
            parts.append((inputs, tt, tr_mask))
            loss_masks.append(loss_mask)
        tokens, seg_ids, slices = self._tokens(parts)
        hidden = self.model.encode(tokens, seg_ids)
        pred = torch.cat([self.head(hidden[:, s]) for s in slices], dim=1)
        target = torch.cat(targets, dim=1)
        loss_mask = torch.cat(loss_masks, dim=1)
        l1 = (pred - target).abs()[loss_mask].mean()
        losses["l1"] = l1
        total = l1
        if self.next_sequence:
            logit = self.nsp_head(hidden[:, 0]).squeeze(-1)
            nsp = F.binary_cross_entropy_with_logits(logit, is_next.float())
            losses["nsp_bce"] = nsp
            losses["nsp_acc"] = ((logit > 0) == is_next).float().mean()
            total = total + self.nsp_weight * nsp
        losses["loss"] = total
        return losses

    def _encode_window(self, batch: dict) -> tuple[torch.Tensor, slice]:
        """Hidden states of ``[CLS] window [SEP]`` ``(B, T + 2, d)`` and the slice of the window's TRs."""
        t = batch["t"] - batch["t"][:, :1]
        tokens, seg_ids, slices = self._tokens([(batch["bold"], t, None)])
        return self.model.encode(tokens, seg_ids), slices[0]

    @torch.no_grad()
    def embed(self, batch: dict) -> torch.Tensor:
        hidden, trs = self._encode_window(batch)
        return hidden[:, 0] if self.pooling == "cls" else hidden[:, trs].mean(dim=1)

    @torch.no_grad()
    def tokens(self, batch: dict) -> torch.Tensor:
        """The window's TR states ``(B, T, d)`` in the ``[CLS] window [SEP]`` context :meth:`embed` reads."""
        hidden, trs = self._encode_window(batch)
        return hidden[:, trs]
