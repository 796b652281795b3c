"""What must be global under data parallelism: tensors gathered from every rank (with gradients
where a loss needs them) and batch statistics over all ranks, on any backend (NCCL or gloo).

With ``N`` ranks of batch ``b`` each, a loss that compares samples with each other (NT-Xent's
negatives, SimDINO's coding rate) or normalizes them by batch statistics (BatchNorm in a projection
head) must see the global batch of ``N * b`` to equal one rank with batch ``N * b``:

- :func:`gather` concatenates a tensor from every rank in rank order; with ``grad=True`` the gradient
  of every rank's loss flows back to the rank that produced each row (the backward of
  ``torch.distributed.nn.functional.all_gather``), so after DDP averages the gradients they equal
  those of the single-process loss on the whole batch (each rank's loss being the mean over its own
  anchors);
- :class:`GlobalBatchNorm1d` is ``BatchNorm1d`` whose training statistics are summed over all ranks
  with a differentiable ``all_reduce``. Torch's ``SyncBatchNorm`` refuses CPU tensors, so CPU DDP
  (gloo: the tests, a laptop) uses this; on GPUs it computes the same as ``SyncBatchNorm``.

Without a process group (one process) both are the identity / plain ``BatchNorm1d``.
"""

from __future__ import annotations

import warnings

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


def world() -> tuple[int, int]:
    """``(rank, world size)`` of the default process group, ``(0, 1)`` without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _autograd_collectives():
    # torch 2.13 marks torch.distributed.nn.functional deprecated in favour of the private
    # torch.distributed._functional_collectives; Lightning's all_gather(sync_grads=True) calls the same
    # functions. The warning is about a future API move, not about this use: it is not shown to users.
    import torch.distributed.nn.functional as dfn

    return dfn


def gather(x: torch.Tensor, grad: bool = True) -> torch.Tensor:
    """``x`` of every rank, concatenated along dim 0 in rank order (ranks may hold different numbers of
    rows: they are padded for the collective and trimmed after).

    Args:
        x: ``(n_rank, ...)``, the same trailing shape and dtype on every rank.
        grad: keep the graph: gradients reach the rank each row came from.

    Returns:
        ``(sum of n_rank, ...)``; ``x`` itself without a process group.
    """
    return gather_rows(x, grad)[0]


def gather_rows(x: torch.Tensor, grad: bool = True) -> tuple[torch.Tensor, int]:
    """:func:`gather`, and the index of this rank's first row in the result."""
    rank, size = world()
    if size == 1:
        return x, 0
    n = torch.tensor([x.shape[0]], device=x.device, dtype=torch.long)
    sizes = [torch.zeros_like(n) for _ in range(size)]
    dist.all_gather(sizes, n)
    sizes = [int(s) for s in sizes]
    longest = max(sizes)
    padded = x if x.shape[0] == longest else F.pad(x, (0, 0) * (x.ndim - 1) + (0, longest - x.shape[0]))
    if grad:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            parts = _autograd_collectives().all_gather(padded.contiguous())
    else:
        parts = [torch.empty_like(padded) for _ in range(size)]
        dist.all_gather(parts, padded.detach().contiguous())
    return torch.cat([p[:s] for p, s in zip(parts, sizes)]), int(sum(sizes[:rank]))


def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    """``x`` summed over the ranks, differentiable (the gradient of the sum reaches every rank)."""
    if world()[1] == 1:
        return x
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return _autograd_collectives().all_reduce(x, op=dist.ReduceOp.SUM)


class GlobalBatchNorm1d(nn.BatchNorm1d):
    """``BatchNorm1d`` with training statistics over the global batch (all ranks), on any backend.

    Input ``(B, C)`` or ``(B, C, L)``. In training with a process group, the mean and (biased)
    variance of every channel come from sums over every rank's batch (a differentiable
    ``all_reduce``), and the running estimates are updated with the unbiased variance, as
    ``SyncBatchNorm``; in evaluation, or in one process, it is ``BatchNorm1d``. State dicts are those
    of ``BatchNorm1d``.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or world()[1] == 1:
            return super().forward(x)
        self._check_input_dim(x)
        dims = [0] + list(range(2, x.ndim))
        xf = x.float()
        local = torch.cat([xf.sum(dims), (xf * xf).sum(dims),
                           torch.tensor([xf.numel() / x.shape[1]], device=x.device, dtype=xf.dtype)])
        total = all_reduce_sum(local)
        c = x.shape[1]
        count = total[-1]
        mean = total[:c] / count
        var = (total[c:2 * c] / count - mean * mean).clamp_min(0.0)
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                momentum = (1.0 / float(self.num_batches_tracked)) if self.momentum is None else self.momentum
                unbiased = var * count / (count - 1).clamp_min(1.0)
                self.running_mean.mul_(1 - momentum).add_(momentum * mean.to(self.running_mean.dtype))
                self.running_var.mul_(1 - momentum).add_(momentum * unbiased.to(self.running_var.dtype))
        shape = [1, c] + [1] * (x.ndim - 2)
        y = (xf - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y.to(x.dtype)
