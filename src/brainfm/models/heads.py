"""Small heads shared by the objectives."""

from __future__ import annotations

from torch import nn


class ReconstructionHead(nn.Linear):
    """Token state ``(..., d)`` -> BOLD of every ROI ``(..., n_rois)``."""

    def __init__(self, d_model: int, n_rois: int) -> None:
        super().__init__(d_model, n_rois)


class BinaryHead(nn.Sequential):
    """Pooled state ``(B, d)`` -> one logit ``(B, 1)``: ``Linear -> tanh -> Linear`` (BERT's
    pooler followed by the next-sentence classifier)."""

    def __init__(self, d_model: int) -> None:
        super().__init__(nn.Linear(d_model, d_model), nn.Tanh(), nn.Linear(d_model, 1))
