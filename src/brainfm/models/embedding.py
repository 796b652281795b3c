"""Per-TR embedding of parcellated BOLD, after Thomas, Ré & Poldrack (2022), "Self-supervised
learning of brain dynamics from broad neuroimaging data" (NeurIPS; athms/learning-from-brains).

Each TR's ROI vector is projected by ``Linear(n_rois -> d)`` and ``LayerNorm``; a learned
embedding of the TR's time in seconds from the window onset (bins of ``t_resolution_s``, 0.2 s,
up to ``t_max_s``, 300 s) is added. One extra time index is reserved for special tokens
(CLS, SEP), which have no time.
"""

from __future__ import annotations

import torch
from torch import nn


class TREmbedding(nn.Module):
    """Embed BOLD frames and their times.

    Args:
        n_rois: ROIs per TR (input features).
        d_model: embedding width.
        t_max_s: longest window the time embedding covers, seconds.
        t_resolution_s: width of one time bin, seconds.

    Shapes: ``bold`` ``(B, T, n_rois)``, ``t`` ``(B, T)`` seconds -> ``(B, T, d_model)``.
    """

    def __init__(self, n_rois: int, d_model: int, t_max_s: float = 300.0, t_resolution_s: float = 0.2) -> None:
        super().__init__()
        self.n_rois = int(n_rois)
        self.proj = nn.Linear(self.n_rois, d_model)
        self.norm = nn.LayerNorm(d_model)
        self.t_max_s = float(t_max_s)
        self.t_resolution_s = float(t_resolution_s)
        self.n_time_bins = int(round(self.t_max_s / self.t_resolution_s))
        self.time = nn.Embedding(self.n_time_bins + 1, d_model)  # last index: special tokens

    def embed_values(self, bold: torch.Tensor) -> torch.Tensor:
        """``(B, T, n_rois)`` -> ``(B, T, d)``: Linear + LayerNorm of each TR's ROI vector."""
        if bold.shape[-1] != self.n_rois:
            raise ValueError(
                f"input has {bold.shape[-1]} ROIs per TR but the model was built for {self.n_rois}; "
                "the parcellation (and ROI order) must match the one the model was trained on"
            )
        return self.norm(self.proj(bold))

    @torch.compiler.disable
    def check_range(self, t: torch.Tensor) -> None:
        """Raise ValueError for times at or beyond ``t_max_s``. It reads ``t.max()`` on the host: under
        ``torch.compile`` a deliberate graph break (eager, not traced: no Dynamo warning)."""
        if t.numel() and float(t.max()) >= self.t_max_s:
            raise ValueError(
                f"a window spans {float(t.max()):.1f} s, beyond the time embedding's t_max_s="
                f"{self.t_max_s:g} s; use shorter windows or a model with a larger model.t_max_s"
            )

    def time_index(self, t: torch.Tensor) -> torch.Tensor:
        """Seconds ``(B, T)`` -> time-bin indices; negative times map to the special index.

        Raises:
            ValueError: a time at or beyond ``t_max_s`` (:meth:`check_range`).
        """
        self.check_range(t)
        idx = torch.round(t / self.t_resolution_s).long()
        return torch.where(t < 0, torch.full_like(idx, self.n_time_bins), idx)

    def embed_time(self, t: torch.Tensor) -> torch.Tensor:
        return self.time(self.time_index(t))

    def special_time(self, batch: int, device: torch.device) -> torch.Tensor:
        """Time embedding of a special token, ``(batch, 1, d)``."""
        idx = torch.full((batch, 1), self.n_time_bins, dtype=torch.long, device=device)
        return self.time(idx)

    def forward(self, bold: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.embed_values(bold) + self.embed_time(t)
