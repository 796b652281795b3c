"""Memory of a training step, predicted without allocating it.

Two parts, as the ZeRO paper splits them (Rajbhandari et al. 2020):

- **Model states** (parameters, gradients, optimizer states) per GPU for each strategy:
  DeepSpeed's own estimators for ZeRO-2 and ZeRO-3 (``estimate_zero2_model_states_mem_needs``,
  ``estimate_zero3_model_states_mem_needs``, the functions behind DeepSpeed's
  ``*_all_cold`` printers; brainfm passes its own parameter counts because DeepSpeed's
  ``model_to_params`` de-duplicates by ``data_ptr()``, which is 0 for every meta tensor), and for
  one GPU / DDP the bytes Lightning's ``bf16-mixed`` keeps: fp32 weights (4 B), fp32 gradients
  (4 B), AdamW's two fp32 moments (8 B), plus for DDP its gradient buckets (4 B per parameter:
  ``gradient_as_bucket_view=False``, PyTorch's default).
- **Working memory** of a step (activations saved for backward, gradients of activations,
  temporaries): a simulation. The backbone is materialised as fake tensors
  (``torch._subclasses.FakeTensorMode``: shapes, dtypes and devices, no storage) and one
  training step runs as Lightning's automatic optimisation runs it (forward under autocast,
  ``zero_grad(set_to_none=True)``, backward, gradient clipping, ``AdamW.step``) while
  :class:`LiveTensorMemory` adds up the storages alive after every ATen operation. Fake CPU
  tensors take the kernels real CPU tensors take (e.g. the fused flash attention of
  ``F.scaled_dot_product_attention``, which keeps no attention matrix); the meta device would
  take the unfused math path and count attention matrices no fused kernel allocates.

The simulation is validated against the allocator's measured peak on this CPU
(:mod:`brainfm.scaling.measure`, ``tests/test_scale.py``). For a GPU in ``bf16-mixed`` the same
simulation runs under CPU bf16 autocast (the same lower-precision op list for the operations
these backbones use: linear layers and attention in bf16, LayerNorm on the fp32 residual stream)
with the AdamW brainfm builds (:func:`brainfm.tasks.optim.build_optimizer`: the fused kernel, on
CUDA as on the CPU, which allocates no parameter-sized temporaries).

Activation checkpointing (``model.use_checkpoint=true``) is simulated by running it: the backbone
built from the config checkpoints its blocks (``torch.utils.checkpoint``, non-reentrant) on the fake
tensors as on real ones, so a block's intermediates are freed after its forward and recomputed,
one block at a time, during backward; the prediction (``forward``: the activations kept,
``backward``/``working``: the peak) follows without a model of its own.

Why brainfm tracks live storages itself: PyTorch's ``torch.distributed._tools.MemTracker`` does
the same with module-level attribution, but it fails on frozen parameters (it registers a
gradient hook on every parameter) and adds ~15 s of hooks per step; this tracker is the part
brainfm needs.
"""

from __future__ import annotations

import contextlib
import weakref
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.weak import WeakIdKeyDictionary

from brainfm.errors import ConfigError
from brainfm.models import build_model
from brainfm.scaling.families import Family, family_of, no_model_caches
from brainfm.tasks.optim import build_optimizer, param_groups

GiB = 2**30
PRECISIONS = ("32-true", "bf16-mixed", "16-mixed", "bf16-true")


class LiveTensorMemory(TorchDispatchMode):
    """Bytes of tensor storages alive, and their peak, while ATen operations run in its context.

    Every output of every operation is registered once per storage (views share it) and counted
    until the storage is freed (a ``weakref.finalize`` on the storage). Tensors made outside the
    context (parameters, inputs) are added with :meth:`track`. Works on real, meta and fake
    tensors; sizes are storage bytes (allocator rounding is not modelled).
    """

    def __init__(self) -> None:
        super().__init__()
        self.current = 0
        self.peak = 0
        self._seen: WeakIdKeyDictionary = WeakIdKeyDictionary()

    def track(self, *tensors: Any) -> None:
        for t in tree_flatten(tensors)[0]:
            if isinstance(t, torch.Tensor):
                self._add(t)

    def _add(self, t: torch.Tensor) -> None:
        storage = t.untyped_storage()
        if storage in self._seen:
            return
        n = storage.nbytes()
        self._seen[storage] = n
        self.current += n
        self.peak = max(self.peak, self.current)
        weakref.finalize(storage, self._free, n)

    def _free(self, n: int) -> None:
        self.current -= n

    def reset_peak(self) -> None:
        self.peak = self.current

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.track(out)
        return out


@dataclass
class StepMemory:
    """Memory of one training step of one process, bytes.

    Attributes:
        batch_size: samples in the step; precision: Lightning precision string.
        params, buffers, grads, optimizer: model states alive when a step starts (gradients of
            the previous step are still alive during the forward: Lightning zeroes them just
            before backward).
        inputs: the batch.
        start: ``params + buffers + grads + optimizer + inputs``.
        cached: other tensors alive across steps (e.g. Swin4D's cached window masks).
        forward: alive at the end of the forward above what was alive at the start (activations
            saved for backward and the output): the *activation memory* of the batch.
        backward: the peak above the start until the optimizer step (forward, backward,
            gradient clipping).
        working: the step's peak above what was alive at its start (the above and the
            optimizer's temporaries, e.g. the multi-tensor AdamW's square roots of the second
            moments: 4 B per parameter).
    """

    batch_size: int
    precision: str
    params: int
    buffers: int
    grads: int
    optimizer: int
    inputs: int
    cached: int
    forward: int
    backward: int
    working: int

    @property
    def start(self) -> int:
        return self.params + self.buffers + self.grads + self.optimizer + self.inputs

    @property
    def peak(self) -> int:
        """Peak bytes of tensors in one process during the step (``start + cached + working``)."""
        return self.start + self.cached + self.working

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "start": self.start, "peak": self.peak}


def _autocast(precision: str, device_type: str = "cpu") -> contextlib.AbstractContextManager:
    if precision == "bf16-mixed":
        return torch.autocast(device_type, dtype=torch.bfloat16)
    if precision == "16-mixed":
        return torch.autocast(device_type, dtype=torch.float16)
    return contextlib.nullcontext()


def storage_bytes(tensors) -> int:
    seen: dict[int, int] = {}
    for t in tensors:
        if isinstance(t, torch.Tensor):
            st = t.untyped_storage()
            seen[id(st)] = st.nbytes()
    return sum(seen.values())


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    return storage_bytes(v for state in optimizer.state.values() for v in state.values())


def training_step(model: nn.Module, family: Family, inputs: tuple, optimizer: torch.optim.Optimizer,
                  precision: str = "32-true", gradient_clip_val: float | None = None,
                  device_type: str = "cpu", after_forward=None, before_optimizer_step=None) -> torch.Tensor:
    """One step in the order of Lightning's automatic optimisation: forward and loss (under
    autocast for ``*-mixed``), ``zero_grad(set_to_none=True)``, backward, gradient-norm
    clipping, optimizer step. ``after_forward()`` is called once the loss exists,
    ``before_optimizer_step()`` just before the optimizer steps. Returns the loss (detached)."""
    with _autocast(precision, device_type):
        loss = family.loss(model, inputs, family.forward(model, *inputs))
    if after_forward is not None:
        after_forward()
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if gradient_clip_val:
        nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], gradient_clip_val)
    if before_optimizer_step is not None:
        before_optimizer_step()
    optimizer.step()
    return loss.detach()


def make_optimizer(model: nn.Module, foreach: bool | None = None, weight_decay: float = 0.05) -> torch.optim.AdamW:
    """AdamW with brainfm's two parameter groups (:func:`brainfm.tasks.optim.param_groups`): the one
    brainfm trains with (:func:`brainfm.tasks.optim.build_optimizer`, fused where supported), or with
    ``foreach`` given, torch's multi-tensor (``True``) or per-parameter (``False``) implementation."""
    if foreach is None:
        return build_optimizer(model, lr=1e-4, weight_decay=weight_decay)
    return torch.optim.AdamW(param_groups(model, weight_decay), lr=1e-4, foreach=foreach)


def simulate_step_memory(model_cfg: dict[str, Any], batch_size: int, precision: str = "32-true",
                         inputs_cfg: dict | None = None, foreach: bool | None = None,
                         gradient_clip_val: float | None = None, first_step: bool = False) -> StepMemory:
    """Predict the memory of one steady-state training step without allocating it.

    The model of ``model_cfg`` is built on the meta device and materialised as fake CPU tensors;
    a first step at batch 1 creates the optimizer states and the models' cached masks, then the
    step at ``batch_size`` is tracked with :class:`LiveTensorMemory` (``first_step``: no
    warm-up step).

    Args:
        model_cfg: plain model config with ``_target_``.
        batch_size: samples per step (per GPU).
        precision: ``32-true``, ``bf16-mixed``, ``16-mixed`` or ``bf16-true`` (Lightning's names).
        inputs_cfg: the family's input settings (sequence length, TR).
        foreach: ``None``: the AdamW brainfm trains with (fused, on CUDA and CPU); ``True``/``False``:
            torch's multi-tensor / per-parameter AdamW instead (:func:`make_optimizer`).
        gradient_clip_val: clip the gradient norm (as ``trainer.gradient_clip_val``).
        first_step: track the first step of a fresh process instead (no gradients, optimizer
            states or cached masks before it; they are part of its working memory).

    Raises:
        ConfigError: unknown precision.
    """
    from torch._subclasses.fake_tensor import FakeTensorMode

    if precision not in PRECISIONS:
        raise ConfigError(f"precision {precision!r} is not one of {', '.join(PRECISIONS)}")
    with torch.device("meta"):
        model = build_model(model_cfg)
    family = family_of(model)
    model.train()
    with no_model_caches(), family.meta_safe(), FakeTensorMode(allow_non_fake_inputs=True):
        model.to_empty(device="cpu")
        if precision == "bf16-true":
            model.to(torch.bfloat16)
        tracker = LiveTensorMemory()
        tracker.track(list(model.parameters()), list(model.buffers()))
        optimizer = make_optimizer(model, foreach)
        with tracker:
            if not first_step:
                warm = family.make_inputs(model, 1, "cpu", inputs_cfg or {})
                training_step(model, family, warm, optimizer, precision, gradient_clip_val)
                del warm
            inputs = family.make_inputs(model, batch_size, "cpu", inputs_cfg or {})
            params = storage_bytes(model.parameters())
            buffers = storage_bytes(model.buffers())
            grads = storage_bytes(p.grad for p in model.parameters() if p.grad is not None)
            opt = optimizer_state_bytes(optimizer)
            inp = storage_bytes(inputs)
            live = tracker.current
            tracker.reset_peak()
            at_forward: list[int] = []
            at_step: list[int] = []
            training_step(model, family, inputs, optimizer, precision, gradient_clip_val,
                          after_forward=lambda: at_forward.append(tracker.current),
                          before_optimizer_step=lambda: at_step.append(tracker.peak))
            forward, backward, working = at_forward[0] - live, at_step[0] - live, tracker.peak - live
        cached = live - (params + buffers + grads + opt + inp)
    return StepMemory(batch_size, precision, params, buffers, grads, opt, inp, cached, forward, backward, working)


# -- model states per GPU ------------------------------------------------------------------------
STRATEGIES = ("gpu", "ddp", "deepspeed_stage_2", "deepspeed_stage_2_offload", "deepspeed_stage_3",
              "deepspeed_stage_3_offload")


@dataclass
class ModelStates:
    """Model-state bytes of one strategy: per GPU, and host memory per node."""

    strategy: str
    gpu: int
    host_per_node: int


def model_state_memory(strategy: str, n_params: int, largest_layer: int, nodes: int = 1, gpus_per_node: int = 4,
                       additional_buffer_factor: float = 1.5) -> ModelStates:
    """Model states (parameters, gradients, AdamW states) per GPU for a strategy.

    ``gpu`` / ``ddp``: Lightning ``bf16-mixed`` keeps fp32 weights and gradients and AdamW's fp32
    moments: 16 B per parameter, 20 B with DDP's gradient buckets; each rank builds the fp32
    model in host memory first (4 B x ranks per node x ``additional_buffer_factor``, as
    DeepSpeed's estimator assumes). ``deepspeed_stage_2[_offload]`` and
    ``deepspeed_stage_3[_offload]``: DeepSpeed's estimators (ZeRO-3 with ``zero_init``; the
    offload variant offloads parameters and optimizer states, as ``trainer=deepspeed_stage_3_offload``).

    Raises:
        ConfigError: an unknown strategy.
    """
    if strategy not in STRATEGIES:
        raise ConfigError(f"strategy {strategy!r} is not one of {', '.join(STRATEGIES)}")
    if strategy in ("gpu", "ddp"):
        per_param = 16 if strategy == "gpu" else 20
        ranks = 1 if strategy == "gpu" else gpus_per_node
        return ModelStates(strategy, per_param * n_params, int(4 * n_params * ranks * additional_buffer_factor))
    import io
    from contextlib import redirect_stdout

    with redirect_stdout(io.StringIO()):  # DeepSpeed logs its accelerator choice on import
        from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
        from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs
    if strategy.startswith("deepspeed_stage_2"):
        cpu, gpu = estimate_zero2_model_states_mem_needs(
            n_params, gpus_per_node, nodes, cpu_offload=strategy.endswith("offload"),
            additional_buffer_factor=additional_buffer_factor)
    else:
        offload = strategy.endswith("offload")
        cpu, gpu, _ = estimate_zero3_model_states_mem_needs(
            n_params, largest_layer, gpus_per_node, nodes, cpu_offload=offload, cpu_offload_params=offload,
            zero_init=True, additional_buffer_factor=additional_buffer_factor)
    return ModelStates(strategy, int(gpu), int(cpu))


@dataclass
class Placement:
    """A Perlmutter configuration that fits: ``nodes`` x ``gpus_per_node`` with ``strategy``
    (a ``trainer=`` config name) and the bytes it needs per GPU."""

    nodes: int
    gpus_per_node: int
    strategy: str
    gpu_bytes: int
    host_bytes_per_node: int

    def __str__(self) -> str:
        return f"{self.nodes}x{self.gpus_per_node} {self.strategy}"


def per_gpu_need(strategy: str, n_params: int, largest_layer: int, step: StepMemory, nodes: int,
                 gpus_per_node: int, additional_buffer_factor: float = 1.5) -> tuple[int, int]:
    """Bytes per GPU (model states + buffers + the batch + cached masks + the step's working
    memory) and host bytes per node. Under DeepSpeed the optimizer steps on its partition (its
    memory is in DeepSpeed's estimate), so the working memory is the forward/backward part."""
    states = model_state_memory(strategy, n_params, largest_layer, nodes, gpus_per_node, additional_buffer_factor)
    working = step.backward if strategy.startswith("deepspeed") else step.working
    return states.gpu + step.buffers + step.inputs + step.cached + working, states.host_per_node


def place(n_params: int, largest_layer: int, step: StepMemory, gpu_memory_bytes: float, host_memory_bytes: float,
          strategies: list[str], nodes: int | None = None, gpus_per_node: int = 4, max_nodes: int = 64,
          additional_buffer_factor: float = 1.5) -> Placement | None:
    """The first configuration that fits, trying the strategies in the given order (fastest first).

    With ``nodes`` the configuration is ``nodes x gpus_per_node``; without, the smallest of
    1x1, 1x2, 1x4, 2x4, 3x4, ... up to ``max_nodes`` nodes. On one GPU ``ddp`` means ``gpu``.
    Returns ``None`` when nothing fits.
    """
    if nodes is not None:
        layouts = [(nodes, gpus_per_node)]
    else:
        layouts = [(1, g) for g in sorted({1, 2, gpus_per_node}) if g <= gpus_per_node]
        layouts += [(n, gpus_per_node) for n in range(2, max_nodes + 1)]
    for n, g in layouts:
        for strategy in strategies:
            if n * g == 1 and strategy == "ddp":
                strategy = "gpu"
            elif n * g > 1 and strategy == "gpu":
                continue
            need, host = per_gpu_need(strategy, n_params, largest_layer, step, n, g, additional_buffer_factor)
            if need <= gpu_memory_bytes and host <= host_memory_bytes:
                return Placement(n, g, strategy, need, host)
    return None
