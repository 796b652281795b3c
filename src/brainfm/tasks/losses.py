"""Losses shared by objectives."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.1, groups: torch.Tensor | None = None) -> torch.Tensor:
    """Normalised temperature-scaled cross-entropy (NT-Xent; Chen et al. 2020, SimCLR).

    Row ``i`` of ``z1`` and row ``i`` of ``z2`` are two views of one item (a positive pair); the
    other ``2N - 2`` views of the batch are negatives. Each of the ``2N`` views contributes
    ``-log(exp(s_ip / t) / sum_{k != i} exp(s_ik / t))`` with cosine similarities ``s``; the loss
    is their mean.

    Args:
        z1, z2: ``(N, D)`` projections (L2-normalised here).
        temperature: ``t`` (SwiFT 0.1, R2T-Net 0.07).
        groups: optional ``(N,)`` labels; views of the same group other than the positive are
            removed from the denominator (they are not negatives: e.g. two windows of one run).

    Returns:
        scalar loss.

    Raises:
        ValueError: mismatched shapes or fewer than two items.
    """
    if z1.shape != z2.shape or z1.ndim != 2 or z1.shape[0] < 2:
        raise ValueError(f"nt_xent needs two (N>=2, D) views of equal shape, got {tuple(z1.shape)} and {tuple(z2.shape)}")
    n = z1.shape[0]
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    sim = z @ z.T / temperature
    idx = torch.arange(2 * n, device=z.device)
    positive = (idx + n) % (2 * n)
    exclude = torch.eye(2 * n, dtype=torch.bool, device=z.device)
    if groups is not None:
        g = torch.cat([groups, groups])
        exclude = exclude | (g[:, None] == g[None, :])
        exclude[idx, positive] = False
    sim = sim.masked_fill(exclude, float("-inf"))
    return F.cross_entropy(sim, positive)
