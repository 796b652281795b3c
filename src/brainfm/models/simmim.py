"""Pieces of SimMIM (Xie et al., CVPR 2022, "SimMIM: a simple framework for masked image
modeling") for 4-D fMRI, as SwiFT v2 pretrains Swin4D: patch-level masks and light decoders."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


def patch_mask(batch: int, grid: Sequence[int], ratio: float, kind: str = "random", device=None) -> torch.Tensor:
    """Boolean ``(B, d, h, w, t)`` mask over the token grid, True = masked.

    ``random``: exactly ``round(ratio * d*h*w*t)`` tokens per sample; ``tube``: ``round(ratio * d*h*w)``
    spatial positions, masked at every time step (so a voxel cannot be copied from the TR before).

    Raises:
        ValueError: ratio outside (0, 1) or unknown kind.
    """
    if not 0.0 < ratio < 1.0:
        raise ValueError(f"mask ratio {ratio} must lie in (0, 1)")
    d, h, w, t = grid
    if kind == "random":
        n = d * h * w * t
    elif kind == "tube":
        n = d * h * w
    else:
        raise ValueError(f"mask kind {kind!r} must be 'random' or 'tube'")
    k = max(1, min(n - 1, int(round(ratio * n))))
    ranks = torch.rand(batch, n, device=device).argsort(dim=1).argsort(dim=1)
    mask = ranks < k
    if kind == "tube":
        return mask.view(batch, d, h, w, 1).expand(batch, d, h, w, t)
    return mask.view(batch, d, h, w, t)


class SimMIMDecoder(nn.Module):
    """Last-stage features -> voxels.

    ``features`` ``(B, C, d', h', w', t')`` -> reconstruction ``(B, out_chans, d'*sH, h'*sW, w'*sD, t'*sT)``
    where ``stride = (sH, sW, sD, sT)`` is the backbone's total stride (patch size x 2**merges in
    space, the temporal patch in time).

    ``kind="linear"``: one Linear(C -> sH*sW*sD*sT*out) per token and a 4-D pixel shuffle (SimMIM's
    decoder). ``kind="pixel_shuffle"``: temporal then spatial: Linear(C -> sT*hidden), shuffle over
    time, Linear(hidden -> sH*sW*sD*out), shuffle over space (SwiFT v2's d-SwiFT decoder), fewer
    parameters for large strides.
    """

    def __init__(self, in_dim: int, stride: Sequence[int], out_chans: int = 1, kind: str = "linear", hidden: int = 64) -> None:
        super().__init__()
        self.stride = tuple(int(s) for s in stride)
        self.out_chans = int(out_chans)
        self.kind = kind
        sh, sw, sd, st = self.stride
        if kind == "linear":
            self.proj = nn.Linear(in_dim, sh * sw * sd * st * out_chans)
        elif kind == "pixel_shuffle":
            self.temporal = nn.Linear(in_dim, st * hidden)
            self.act = nn.GELU()
            self.spatial = nn.Linear(hidden, sh * sw * sd * out_chans)
        else:
            raise ValueError(f"decoder kind {kind!r} must be 'linear' or 'pixel_shuffle'")

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        b, _, d, h, w, t = features.shape
        sh, sw, sd, st = self.stride
        x = features.permute(0, 2, 3, 4, 5, 1)
        if self.kind == "linear":
            x = self.proj(x).view(b, d, h, w, t, sh, sw, sd, st, self.out_chans)
        else:
            x = self.act(self.temporal(x)).view(b, d, h, w, t, st, -1).reshape(b, d, h, w, t * st, -1)
            x = self.spatial(x).view(b, d, h, w, t, st, sh, sw, sd, self.out_chans).permute(0, 1, 2, 3, 4, 6, 7, 8, 5, 9)
        x = x.permute(0, 9, 1, 5, 2, 6, 3, 7, 4, 8)
        return x.reshape(b, self.out_chans, d * sh, h * sw, w * sd, t * st)
