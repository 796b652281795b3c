"""Sequence-modelling objectives on parcellated BOLD (Thomas, Ré & Poldrack 2022):

- :class:`CausalSequenceModeling` (CSM, the GPT model): one TR per window is replaced by the MASK
  token and predicted from the TRs before it (causal attention); L1 loss.
- :class:`SequenceAutoencoding` (the LSTM autoencoder): reconstruct the whole window from one
  pooled code; L1 loss.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from brainfm.models.backbone import require
from brainfm.models.heads import ReconstructionHead
from brainfm.tasks.base import BrainfmTask


class CausalSequenceModeling(BrainfmTask):
    """CSM: for each window ``(B, T, R)`` draw one position ``p`` in ``[1, T)``, mask it, and
    predict its BOLD ``(B, R)`` from the causal hidden state at ``p``.

    ``embed`` returns the mean of the hidden states over the window's TRs, ``(B, d)``.

    Raises:
        ConfigError: the model is not a causal sequence transformer (``model=gpt``).
    """

    def __init__(self, model: dict, **kwargs) -> None:
        super().__init__(model, **kwargs)
        require(self.model, "task=csm", "a causal sequence transformer", "model=gpt", "embed_trs", "encode", causal=True)
        self.head = ReconstructionHead(self.model.d_model, self.model.n_rois)
        self.model.use_special_tokens("mask")

    def compute_losses(self, batch: dict) -> dict[str, torch.Tensor]:
        bold, t = batch["bold"], batch["t"]
        b, n, _ = bold.shape
        rows = torch.arange(b, device=bold.device)
        pos = torch.randint(1, n, (b,), device=bold.device)
        mask = torch.zeros(b, n, dtype=torch.bool, device=bold.device)
        mask[rows, pos] = True
        hidden = self.model.encode(self.model.embed_trs(bold, t, mask))
        pred = self.head(hidden[rows, pos])
        l1 = F.l1_loss(pred, bold[rows, pos])
        return {"loss": l1, "l1": l1}

    @torch.no_grad()
    def embed(self, batch: dict) -> torch.Tensor:
        return self.model.pooled_batch(batch)


class SequenceAutoencoding(BrainfmTask):
    """LSTM autoencoder: reconstruct ``(B, T, R)`` from the pooled code; ``embed`` returns the
    pooled code ``(B, d)``.

    Raises:
        ConfigError: the model is not an autoencoder (``model=lstm_ae``).
    """

    def __init__(self, model: dict, **kwargs) -> None:
        super().__init__(model, **kwargs)
        require(self.model, "task=autoencoder", "an autoencoder of ROI windows", "model=lstm_ae", "encode", reconstructs=True)

    def compute_losses(self, batch: dict) -> dict[str, torch.Tensor]:
        recon, _ = self.model(batch["bold"], batch["t"])
        l1 = F.l1_loss(recon, batch["bold"])
        return {"loss": l1, "l1": l1}

    @torch.no_grad()
    def embed(self, batch: dict) -> torch.Tensor:
        return self.model.pooled_batch(batch)
