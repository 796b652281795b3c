"""Distributed strategies selected by ``trainer=`` (``conf/trainer/*.yaml``).

- DDP: Lightning's ``DDPStrategy`` (NCCL on GPU, gloo on CPU for tests).
- DeepSpeed ZeRO-2/3 (+ CPU offload): :class:`DeepSpeedStrategy`, Lightning's strategy unchanged on
  GPUs. Lightning refuses DeepSpeed on a CPU accelerator; so that tests can exercise ZeRO sharding,
  checkpointing and consolidation without a GPU, this subclass skips the CUDA check on CPU (the
  environment is set up as DDP's, the root device is ``cpu:0``). On CPU it is a test vehicle,
  not a way to train fast.
- FSDP: FSDP2 (``torch.distributed.fsdp.fully_shard``) through Lightning's
  ``ModelParallelStrategy``; brainfm's tasks shard their transformer blocks and then the root in
  ``configure_model`` (:func:`apply_fully_shard`). Lightning's FSDP1 strategy needs an accelerator;
  FSDP2 runs on CPU with gloo, so the same code path is tested here and used on Perlmutter.
  Checkpoints are sharded by default (``save_distributed_checkpoint=True``): every rank writes its own
  shard of the weights and optimizer state through torch.distributed.checkpoint (DCP) into a
  checkpoint *directory*, and nothing is gathered on rank 0 (at 3.2B parameters the gathered state
  with AdamW moments is ~51 GB per save). Lightning resumes from such a directory on any number of
  FSDP2 ranks (DCP reshards on load); ``python -m brainfm.runs consolidate <dir> <file>`` writes one
  file for evaluation and export (:func:`brainfm.runs.consolidate`).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from lightning.pytorch.accelerators import CUDAAccelerator
from lightning.pytorch.strategies import DDPStrategy, ModelParallelStrategy
from lightning.pytorch.strategies import DeepSpeedStrategy as _LightningDeepSpeed
from torch import nn


class DeepSpeedStrategy(_LightningDeepSpeed):
    """Lightning's ``DeepSpeedStrategy``; on a CPU accelerator it runs (for tests) instead of refusing."""

    def _on_cpu(self) -> bool:
        return not isinstance(self.accelerator, CUDAAccelerator)

    def setup_environment(self) -> None:
        if self._on_cpu():
            DDPStrategy.setup_environment(self)
        else:
            super().setup_environment()

    def setup_distributed(self) -> None:
        if not self._on_cpu():
            return super().setup_distributed()
        from lightning.fabric.utilities.seed import reset_seed

        reset_seed()
        self.set_world_ranks()
        self._init_deepspeed_distributed()

    @property
    def root_device(self) -> torch.device:
        if self._on_cpu():
            return torch.device("cpu", 0)
        return super().root_device


def apply_fully_shard(module: nn.Module, mesh, units: Iterable[nn.Module], reshard_after_forward: bool = True) -> None:
    """FSDP2: shard every submodule of ``units`` (the blocks the backbones declare,
    :meth:`brainfm.tasks.base.BrainfmTask.fsdp_units`), then ``module`` itself, over the
    data-parallel dimension of ``mesh`` (a DeviceMesh from ``ModelParallelStrategy``)."""
    from torch.distributed.fsdp import fully_shard

    dp_mesh = mesh["data_parallel"] if "data_parallel" in (mesh.mesh_dim_names or ()) else mesh
    for sub in units:
        fully_shard(sub, mesh=dp_mesh, reshard_after_forward=reshard_after_forward)
    fully_shard(module, mesh=dp_mesh, reshard_after_forward=reshard_after_forward)


class FSDPStrategy(ModelParallelStrategy):
    """Lightning's ``ModelParallelStrategy`` used for pure data parallelism with FSDP2: the device mesh
    is ``data_parallel = world size`` x ``tensor_parallel = 1`` (Lightning's "auto" would make the
    intra-node dimension tensor-parallel).

    Args:
        save_distributed_checkpoint: ``True`` (default): checkpoints are DCP directories of per-rank
            shards (``__<rank>_0.distcp``, DCP's ``.metadata``, Lightning's ``meta.pt`` with the
            non-tensor state); ``False``: the full state is gathered on rank 0 into one file.
        process_group_backend: ``nccl``/``gloo``; ``None`` picks the device's default.
    """

    def __init__(self, save_distributed_checkpoint: bool = True, process_group_backend: str | None = None, **kwargs) -> None:
        super().__init__(data_parallel_size="auto", tensor_parallel_size=1, save_distributed_checkpoint=save_distributed_checkpoint,
                         process_group_backend=process_group_backend, **kwargs)

    def setup_environment(self) -> None:
        self._data_parallel_size = self.num_nodes * self.num_processes
        super().setup_environment()
