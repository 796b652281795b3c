"""LSTM autoencoder of Thomas, Ré & Poldrack (2022) (athms/learning-from-brains,
``src/decoder/autoencoder.py``): a bidirectional LSTM encoder pools a window into one vector,
and a unidirectional LSTM decoder reconstructs the window from it, with teacher forcing.

As in the reference, encoder layers are stacked with residual connections and LayerNorm, the two
directions are averaged, the pooled code is ``tanh(Linear(mean final hidden state))``, and
teacher forcing is drawn once per batch (probability ``teacher_forcing``, 0.5). Each decoder
layer starts from the final hidden state of the matching encoder layer (directions averaged).
"""

from __future__ import annotations

import torch
from torch import nn

from brainfm.models.embedding import TREmbedding


class LSTMAutoencoder(nn.Module):
    """Args:
        n_rois: ROIs per TR.
        d_model: LSTM width (paper 768).
        depth: LSTM layers in the encoder and in the decoder (paper 4).
        dropout: dropout between layers.
        teacher_forcing: probability that a training batch is decoded with teacher forcing.
        t_max_s, t_resolution_s: time embedding range and bin width, seconds.

    Shapes: ``bold`` ``(B, T, n_rois)``, ``t`` ``(B, T)`` s; :meth:`encode` -> pooled ``(B, d)``;
    :meth:`forward` -> reconstruction ``(B, T, n_rois)`` and pooled ``(B, d)``.
    """

    def __init__(
        self,
        n_rois: int,
        d_model: int = 128,
        depth: int = 2,
        dropout: float = 0.1,
        teacher_forcing: float = 0.5,
        t_max_s: float = 300.0,
        t_resolution_s: float = 0.2,
    ) -> None:
        super().__init__()
        self.n_rois = int(n_rois)
        self.d_model = int(d_model)
        self.teacher_forcing = float(teacher_forcing)
        self.embedding = TREmbedding(n_rois, d_model, t_max_s, t_resolution_s)
        self.encoder = nn.ModuleList(nn.LSTM(d_model, d_model, batch_first=True, bidirectional=True) for _ in range(depth))
        self.encoder_norms = nn.ModuleList(nn.LayerNorm(d_model) for _ in range(depth - 1))
        self.pooler = nn.Sequential(nn.Linear(d_model, d_model), nn.Tanh())
        self.decoder = nn.ModuleList(nn.LSTM(d_model, d_model, batch_first=True) for _ in range(depth))
        self.decoder_norms = nn.ModuleList(nn.LayerNorm(d_model) for _ in range(depth - 1))
        self.decoder_out = nn.Linear(d_model, d_model)
        self.head = nn.Linear(d_model, self.n_rois)
        self.drop = nn.Dropout(dropout)

    @property
    def out_dim(self) -> int:
        return self.d_model

    def encode(self, bold: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Pooled code ``(B, d)`` and each layer's final hidden state ``(1, B, d)``."""
        x = self.drop(self.embedding(bold, t))
        finals = []
        prev = None
        for i, lstm in enumerate(self.encoder):
            if i > 0:
                x = self.drop(self.encoder_norms[i - 1](x + prev))
            out, (h, _) = lstm(x)
            prev, x = x, 0.5 * (out[..., : self.d_model] + out[..., self.d_model :])
            finals.append(h.mean(dim=0, keepdim=True))
        return self.pooler(self.drop(finals[-1][0])), finals

    def _decoder_step(self, x: torch.Tensor, state: list) -> tuple[torch.Tensor, list]:
        prev, new_state = None, []
        for i, lstm in enumerate(self.decoder):
            if i > 0:
                x = self.drop(self.decoder_norms[i - 1](x + prev))
            out, s = lstm(x, state[i])
            new_state.append(s)
            prev, x = x, out
        return self.decoder_out(self.drop(x)), new_state

    def forward(self, bold: torch.Tensor, t: torch.Tensor, teacher_forcing: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        b, n, _ = bold.shape
        pooled, finals = self.encode(bold, t)
        state = [(h, torch.zeros_like(h)) for h in finals]
        if teacher_forcing is None:
            teacher_forcing = self.training and bool(torch.rand(()) < self.teacher_forcing)
        if teacher_forcing:  # one call: inputs are the code, then the true TRs 0..T-2
            targets = self.embedding(bold, t)
            inputs = torch.cat([pooled[:, None], targets[:, :-1]], dim=1)
            out, _ = self._decoder_step(inputs, state)
        else:  # free running: each step's output is the next step's input
            step, outs = pooled[:, None], []
            for _ in range(n):
                step, state = self._decoder_step(step, state)
                outs.append(step)
            out = torch.cat(outs, dim=1)
        return self.head(out), pooled
