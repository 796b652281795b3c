"""AdamW with decoupled weight decay on weight matrices only, and linear warm-up + cosine decay."""

from __future__ import annotations

import math
from functools import partial

import torch
from torch import nn

_NO_DECAY = (nn.LayerNorm, nn.Embedding, nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.GroupNorm)


def param_groups(module: nn.Module, weight_decay: float) -> list[dict]:
    """Two AdamW groups: weight matrices of linear/conv/recurrent layers decay; biases, norms,
    embeddings and learned tokens do not."""
    no_decay_ids = set()
    for m in module.modules():
        if isinstance(m, _NO_DECAY):
            no_decay_ids.update(id(p) for p in m.parameters(recurse=False))
    decay, no_decay = [], []
    for p in module.parameters():
        if not p.requires_grad:
            continue
        (decay if p.ndim >= 2 and id(p) not in no_decay_ids else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def warmup_cosine(step: int, warmup_steps: int, total_steps: int, min_lr_ratio: float) -> float:
    """LR multiplier: linear from ~0 to 1 over ``warmup_steps``, then cosine to ``min_lr_ratio``."""
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_optimizer(module: nn.Module, lr: float, weight_decay: float, betas=(0.9, 0.999), eps: float = 1e-8) -> torch.optim.Optimizer:
    return torch.optim.AdamW(param_groups(module, weight_decay), lr=lr, betas=tuple(betas), eps=eps)


def build_scheduler(
    optimizer: torch.optim.Optimizer, total_steps: int, warmup_fraction: float = 0.01,
    warmup_steps: int | None = None, min_lr_ratio: float = 0.0,
) -> torch.optim.lr_scheduler.LambdaLR:
    warm = int(warmup_steps) if warmup_steps is not None else int(round(warmup_fraction * total_steps))
    fn = partial(warmup_cosine, warmup_steps=warm, total_steps=int(total_steps), min_lr_ratio=float(min_lr_ratio))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, fn)
