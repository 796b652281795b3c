"""Global negatives, global batch statistics and the global coding rate: 2 gloo ranks with half a
batch each give the loss and the (DDP-averaged) gradients of one process with the whole batch."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from brainfm.tasks.distributed import GlobalBatchNorm1d, gather
from brainfm.tasks.losses import nt_xent
from brainfm.tasks.self_distillation import simdino_loss

pytestmark = pytest.mark.skipif(os.name != "posix", reason="multi-process tests need POSIX")
B, D = 12, 6


def _data():
    g = torch.Generator().manual_seed(0)
    x1, x2 = torch.randn(B, D, generator=g), torch.randn(B, D, generator=g)
    groups = torch.tensor([0, 0, 1, 2, 3, 3, 4, 5, 6, 7, 7, 8])
    return x1, x2, groups


def _head():
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(D, D), GlobalBatchNorm1d(D), nn.ReLU(), nn.Linear(D, 4))


def _losses(head, x1, x2, groups):
    z1, z2 = head(x1), head(x2)
    con = nt_xent(z1, z2, 0.2, groups=groups)
    s, t = torch.nn.functional.normalize(z1, dim=1), torch.nn.functional.normalize(z2, dim=1)
    dino, _ = simdino_loss([s, t], [t.detach(), s.detach()], rate_rows=None, global_batch=True)
    return con, dino


def _rank(rank: int, size: int, init: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=size)
    x1, x2, groups = _data()
    part = slice(rank * B // size, (rank + 1) * B // size)
    head = _head()
    con, dino = _losses(head, x1[part], x2[part], groups[part])
    (con + dino).backward()
    grads = torch.cat([p.grad.flatten() for p in head.parameters()])
    dist.all_reduce(grads)
    losses = torch.stack([con.detach(), dino.detach()])
    dist.all_reduce(losses)
    gathered = gather(torch.arange(rank * 10, rank * 10 + 2 + rank), grad=False)  # ranks of different sizes
    if rank == 0:
        torch.save({"grads": grads / size, "losses": losses / size, "gathered": gathered,
                    "running_mean": head[1].running_mean.clone()}, out)
    dist.destroy_process_group()


def test_two_ranks_equal_one_process_with_the_whole_batch(tmp_path):
    x1, x2, groups = _data()
    head = _head()
    con, dino = _losses(head, x1, x2, groups)
    (con + dino).backward()
    one = torch.cat([p.grad.flatten() for p in head.parameters()])
    out = tmp_path / "two.pt"
    mp.start_processes(_rank, args=(2, f"file://{tmp_path / 'rdzv'}", str(out)), nprocs=2, start_method="spawn")
    two = torch.load(out, weights_only=True)
    assert two["losses"][0] == pytest.approx(con.item(), rel=1e-5)  # mean of the ranks' NT-Xent = the whole batch's
    assert two["losses"][1] == pytest.approx(dino.item(), rel=1e-5)
    assert one.abs().max() > 0.05  # gradients of a size that the tolerance below resolves
    # the first Linear's bias gets ~0 gradient (BatchNorm removes the mean): float32 noise, hence atol
    torch.testing.assert_close(two["grads"], one, rtol=1e-4, atol=2e-5)
    torch.testing.assert_close(two["running_mean"], head[1].running_mean, rtol=1e-5, atol=1e-7)
    assert two["gathered"].tolist() == [0, 1, 10, 11, 12]


def test_local_negatives_differ(tmp_path):
    """The check above is not vacuous: with each rank's own negatives the loss is another number."""
    x1, x2, groups = _data()
    head = _head()
    full = nt_xent(head(x1), head(x2), 0.2, groups=groups)
    halves = [nt_xent(head(x1[s]), head(x2[s]), 0.2, groups=groups[s], global_negatives=False)
              for s in (slice(0, B // 2), slice(B // 2, B))]
    assert abs(float(sum(halves) / 2) - float(full)) > 1e-2
