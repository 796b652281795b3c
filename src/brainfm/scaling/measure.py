"""Measure training steps of a backbone: step time, peak memory, throughput and (on a GPU) MFU.

The step is a real Lightning step with the strategy of ``trainer=`` (one CPU process here; DDP or
DeepSpeed over every GPU of a SLURM allocation on Perlmutter): :class:`ScaleProbe` is a
:class:`~brainfm.tasks.base.BrainfmTask` (AdamW with brainfm's parameter groups, FSDP2 sharding
under ``trainer=fsdp``) whose loss is the family's loss on a synthetic batch made once on the
device, so the data pipeline is not measured.

Memory of the measured step:

- CUDA: ``torch.cuda.max_memory_allocated`` over the step (reset at its start), minus what was
  allocated when it started;
- CPU: PyTorch's profiler with ``profile_memory=True`` records every allocation and free of
  PyTorch's CPU allocator during the step; the running sum's maximum is the step's peak above its
  start. Memory that libraries allocate outside PyTorch's allocator (oneDNN scratch pads, the
  Python heap) is not in it; the process's resident set size is not used because the C
  allocator keeps freed pages mapped, so it does not fall back between steps.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import torch
from lightning.pytorch.callbacks import Callback
from torch.utils.data import DataLoader, Dataset

from brainfm.models import build_model
from brainfm.scaling.families import family_of
from brainfm.scaling.memory import make_optimizer, optimizer_state_bytes, storage_bytes, training_step
from brainfm.tasks.base import BrainfmTask


def peak_flops(device: torch.device, override_tflops: float | None = None) -> float | None:
    """Dense bf16 peak of ``device`` in FLOP/s from Lightning's table of GPUs (A100: 312 TFLOP/s),
    or ``override_tflops``; ``None`` on a CPU or a GPU the table does not know."""
    if override_tflops:
        return float(override_tflops) * 1e12
    if device.type != "cuda":
        return None
    from lightning.fabric.utilities.throughput import get_available_flops

    flops = get_available_flops(device, torch.bfloat16)
    return float(flops) if flops else None


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({torch.get_num_threads()} threads)"


class _Indices(Dataset):
    """Sample indices only: the probe makes its batch on the device."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict:
        return {"index": torch.tensor(i)}


class ScaleProbe(BrainfmTask):
    """A backbone trained on one synthetic batch (the family's loss, no head).

    Args:
        model: model config with ``_target_``.
        inputs: the family's input settings (sequence length, TR).
        **kwargs: :class:`BrainfmTask` arguments (optimizer, scheduler, seed).

    Batches are ``{"index": (B,)}``; the batch of ``B`` samples is made on the first step on the
    module's device and reused.
    """

    def __init__(self, model: dict, inputs: dict | None = None, **kwargs) -> None:
        super().__init__(model, **kwargs)
        self.family = family_of(self.model)
        self.inputs_cfg = dict(inputs or {})
        self._batch: tuple | None = None

    def synthetic_batch(self, batch_size: int) -> tuple:
        if self._batch is None or self._batch[0].shape[0] != batch_size or self._batch[0].device != self.device:
            self._batch = self.family.make_inputs(self.model, batch_size, self.device, self.inputs_cfg)
        return self._batch

    def compute_losses(self, batch: dict) -> dict[str, torch.Tensor]:
        inputs = self.synthetic_batch(int(batch["index"].shape[0]))
        return {"loss": self.family.loss(self.model, inputs, self.family.forward(self.model, *inputs))}


class StepStats(Callback):
    """Times ``steps`` steps after ``warmup`` steps, then measures the memory of one more step.

    After fitting: ``times`` (seconds per timed step, rank 0's), ``start_bytes`` (allocated when
    the memory step began; on CPU the parameters, buffers, gradients, optimizer states and the
    batch, counted from the tensors), ``working_bytes`` (the step's peak above that), both the
    maximum over ranks.

    On CPU the profiler records from the start of the step before the memory step: it only sees
    the frees of blocks allocated while it records, and a step frees the previous step's
    gradients (``zero_grad``), so those must have been allocated under it.
    """

    def __init__(self, warmup: int = 1, steps: int = 3) -> None:
        if warmup < 1 or steps < 1:
            raise ValueError(f"warmup ({warmup}) and steps ({steps}) must be at least 1")
        self.warmup, self.steps = int(warmup), int(steps)
        self.times: list[float] = []
        self.start_bytes = 0
        self.working_bytes = 0
        self._t0 = 0.0
        self._prof = None
        self._marker = None

    @property
    def lead_in_step(self) -> int:
        return self.warmup + self.steps

    @property
    def memory_step(self) -> int:
        return self.warmup + self.steps + 1

    @property
    def total_steps(self) -> int:
        return self.memory_step + 1

    @staticmethod
    def _sync(device: torch.device) -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        device = pl_module.device
        self._sync(device)
        if device.type == "cuda" and batch_idx == self.memory_step:
            self.start_bytes = torch.cuda.memory_allocated(device)
            torch.cuda.reset_peak_memory_stats(device)
        elif device.type != "cuda" and batch_idx == self.lead_in_step:
            from torch.profiler import ProfilerActivity, profile

            self._prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
            self._prof.__enter__()
        elif device.type != "cuda" and batch_idx == self.memory_step:
            states = [*pl_module.parameters(), *pl_module.buffers(),
                      *(p.grad for p in pl_module.parameters() if p.grad is not None),
                      *(pl_module.synthetic_batch(int(batch["index"].shape[0])))]
            self.start_bytes = storage_bytes(states) + sum(optimizer_state_bytes(o) for o in trainer.optimizers)
            self._marker = torch.profiler.record_function(MEMORY_STEP)
            self._marker.__enter__()
        self._t0 = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        device = pl_module.device
        self._sync(device)
        elapsed = time.perf_counter() - self._t0
        if self.warmup <= batch_idx < self.warmup + self.steps:
            self.times.append(elapsed)
        elif batch_idx == self.memory_step:
            if device.type == "cuda":
                self.working_bytes = torch.cuda.max_memory_allocated(device) - self.start_bytes
            else:
                self._marker.__exit__(None, None, None)
                self._prof.__exit__(None, None, None)
                self.working_bytes = allocator_peak(self._prof, MEMORY_STEP)
                self._prof = self._marker = None

    def on_train_end(self, trainer, pl_module) -> None:
        t = torch.tensor([float(self.start_bytes), float(self.working_bytes)], dtype=torch.float64, device=pl_module.device)
        t = trainer.strategy.reduce(t, reduce_op="max") if trainer.world_size > 1 else t
        self.start_bytes, self.working_bytes = int(t[0].item()), int(t[1].item())


MEMORY_STEP = "brainfm::scale_memory_step"


def allocator_peak(prof, marker: str | None = None) -> int:
    """Peak of the running sum of the CPU allocator's allocations and frees (bytes) recorded by a
    ``torch.profiler.profile(profile_memory=True)`` run: inside the ``record_function(marker)``
    range, above the sum where that range starts (the whole run without ``marker``).

    Raises:
        ValueError: ``marker`` was not recorded.
    """
    events = prof.profiler.kineto_results.events()
    lo, hi = -1, float("inf")
    if marker is not None:
        ranges = [(e.start_ns(), e.start_ns() + e.duration_ns()) for e in events if e.name() == marker]
        if not ranges:
            raise ValueError(f"the profile has no {marker!r} range")
        lo, hi = ranges[0]
    memory = sorted((e.start_ns(), e.nbytes()) for e in events if e.name() == "[memory]")
    running, base = 0, None
    peak = 0
    for t, nbytes in memory:
        if t >= lo and base is None:
            base = peak = running
        running += nbytes
        if lo <= t <= hi:
            peak = max(peak, running)
    return 0 if base is None else peak - base


def measure_training(model_cfg: dict[str, Any], trainer_cfg, batch_size: int, inputs_cfg: dict | None = None,
                     warmup: int = 1, steps: int = 3, root_dir: str | None = None,
                     train_flops_per_sample: int | None = None, peak_tflops: float | None = None,
                     optimizer: dict | None = None) -> dict[str, Any]:
    """Train ``warmup + steps + 1`` steps with the Lightning trainer of ``trainer_cfg`` and return
    the measurement (the same on every rank).

    Returns a dict: ``device``, ``world_size``, ``precision``, ``batch_size`` (per rank),
    ``step_s`` (median of the timed steps), ``samples_per_s`` (all ranks), ``start_bytes``,
    ``working_bytes``, ``peak_bytes`` (per rank, maximum over ranks) and ``mfu`` (``None`` off GPU).
    """
    import warnings

    from hydra.utils import instantiate
    from lightning.pytorch.plugins.environments import SLURMEnvironment

    stats = StepStats(warmup, steps)
    task = ScaleProbe(model_cfg, inputs=inputs_cfg, optimizer=optimizer or {})
    extra: dict[str, Any] = {}
    with warnings.catch_warnings():
        # the probe has no validation data and one synthetic batch; the notes about it are noise
        warnings.filterwarnings("ignore", message=r".*(does not have many workers|smaller than the logging interval"
                                                  r"|defined a `validation_step`|`srun` command is available).*")
        if SLURMEnvironment.detect():
            extra["plugins"] = [SLURMEnvironment(auto_requeue=False)]
        trainer = instantiate(
            trainer_cfg, max_steps=stats.total_steps, callbacks=[stats], logger=False, enable_checkpointing=False,
            enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0,
            val_check_interval=None, check_val_every_n_epoch=1, default_root_dir=root_dir, _convert_="all", **extra)
        loader = DataLoader(_Indices(batch_size * stats.total_steps), batch_size=batch_size)
        trainer.fit(task, train_dataloaders=loader)
    device = trainer.strategy.root_device
    step_s = statistics.median(stats.times)
    samples_per_s = batch_size * trainer.world_size / step_s
    peak = peak_flops(device, peak_tflops)
    mfu = None
    if peak and train_flops_per_sample:
        mfu = train_flops_per_sample * samples_per_s / (peak * trainer.world_size)
    return {
        "device": device_name(device), "world_size": int(trainer.world_size), "precision": str(trainer.precision),
        "batch_size": int(batch_size), "step_s": step_s, "samples_per_s": samples_per_s,
        "start_bytes": stats.start_bytes, "working_bytes": stats.working_bytes,
        "peak_bytes": stats.start_bytes + stats.working_bytes, "mfu": mfu,
        "is_global_zero": bool(trainer.is_global_zero),
    }


def _first_step_rss_child(model_cfg: dict, batch_size: int, inputs_cfg: dict | None, gradient_clip_val: float | None,
                          threads: int) -> tuple[int, int, int]:
    import gc
    import resource

    import psutil


    torch.set_num_threads(threads)
    model = build_model(model_cfg)
    family = family_of(model)
    optimizer = make_optimizer(model)
    inputs = family.make_inputs(model, batch_size, "cpu", inputs_cfg or {})
    gc.collect()
    before_max = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    rss = psutil.Process().memory_info().rss
    training_step(model, family, inputs, optimizer, "32-true", gradient_clip_val)
    after_max = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return rss, before_max, after_max


def first_step_rss(model_cfg: dict[str, Any], batch_size: int = 1, inputs_cfg: dict | None = None,
                   gradient_clip_val: float | None = None) -> int | None:
    """The first fp32 training step's peak resident set size above the RSS just before it, in a
    fresh process (bytes; ``None`` when the process had been larger before, e.g. while building
    the model, so that the step's peak is hidden). Everything the process maps counts: PyTorch's
    allocator, MKL / oneDNN buffers, the Python heap, page granularity. A cross-check of
    :func:`~brainfm.scaling.memory.simulate_step_memory` with ``first_step=True``
    (``scripts/bench_scale.py``)."""
    import multiprocessing

    with multiprocessing.get_context("spawn").Pool(1) as pool:
        rss, before_max, after_max = pool.apply(
            _first_step_rss_child, (model_cfg, batch_size, inputs_cfg, gradient_clip_val, torch.get_num_threads()))
    return after_max - rss if after_max > before_max else None
