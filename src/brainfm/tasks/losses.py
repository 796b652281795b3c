"""Losses shared by objectives."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from brainfm.tasks.distributed import gather, gather_rows


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.1, groups: torch.Tensor | None = None,
            global_negatives: bool = True) -> torch.Tensor:
    """Normalized temperature-scaled cross-entropy (NT-Xent; Chen et al. 2020, SimCLR).

    Row ``i`` of ``z1`` and row ``i`` of ``z2`` are two views of one item (a positive pair); the
    other ``2N - 2`` views of the batch are negatives. Each of the ``2N`` views contributes
    ``-log(exp(s_ip / t) / sum_{k != i} exp(s_ik / t))`` with cosine similarities ``s``; the loss
    is their mean.

    Under data parallelism the batch is the global one: the views of every rank are gathered (with
    gradients, :func:`brainfm.tasks.distributed.gather`) and are the candidates of this rank's anchors;
    each rank returns the mean over its own ``2 n`` anchors, so after DDP averages the gradients they
    are those of one process with the whole batch (SimCLR's global negatives; SwiFT and R2T-Net take
    negatives from each GPU's own batch only).

    Args:
        z1, z2: ``(n, D)`` projections of this rank (L2-normalized here).
        temperature: ``t`` (SwiFT 0.1, R2T-Net 0.07).
        groups: optional ``(n,)`` labels; views of the same group other than the positive are
            removed from the denominator (they are not negatives: e.g. two windows of one run).
        global_negatives: gather the other ranks' views (False: this rank's batch only).

    Returns:
        scalar loss (this rank's anchors).

    Raises:
        ValueError: mismatched shapes or fewer than two items in the (global) batch.
    """
    if z1.shape != z2.shape or z1.ndim != 2:
        raise ValueError(f"nt_xent needs two (N, D) views of equal shape, got {tuple(z1.shape)} and {tuple(z2.shape)}")
    n = z1.shape[0]
    a = F.normalize(torch.cat([z1, z2]), dim=1)  # this rank's 2n anchors
    if global_negatives:
        g1, start = gather_rows(F.normalize(z1, dim=1))
        g2 = gather(F.normalize(z2, dim=1))
        g = None if groups is None else gather(groups, grad=False)
    else:
        g1, g2, start, g = F.normalize(z1, dim=1), F.normalize(z2, dim=1), 0, groups
    total = g1.shape[0]
    if total < 2:
        raise ValueError(f"nt_xent needs at least two items in the batch, got {total}")
    candidates = torch.cat([g1, g2])  # (2N, D): every view of the global batch
    sim = a @ candidates.T / temperature
    own = torch.arange(n, device=a.device) + start
    self_index = torch.cat([own, own + total])
    positive = torch.cat([own + total, own])
    rows = torch.arange(2 * n, device=a.device)
    exclude = torch.zeros(2 * n, 2 * total, dtype=torch.bool, device=a.device)
    exclude[rows, self_index] = True
    if groups is not None:
        mine = torch.cat([groups, groups])
        every = torch.cat([g, g])
        exclude = exclude | (mine[:, None] == every[None, :])
        exclude[rows, positive] = False
    sim = sim.masked_fill(exclude, float("-inf"))
    return F.cross_entropy(sim, positive)
