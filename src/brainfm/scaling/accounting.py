"""Parameter and FLOP accounting of a backbone on the meta device (no memory is allocated, so a
3.2B-parameter model is counted in seconds on a laptop).

FLOPs come from ``torch.utils.flop_counter.FlopCounterMode`` (matrix multiplications,
convolutions and attention; element-wise operations are not counted, as in the usual MFU
convention of Chowdhery et al. 2022, PaLM appendix B, which also leaves out rematerialisation: with
``model.use_checkpoint=true`` the count runs with checkpointing off, and the recomputed forward is
reported on its own, :attr:`FlopCount.recompute`). On the meta device attention runs as its
two matrix products, which count the same FLOPs as a fused kernel; the attention masks of window
attention do not reduce the count (the kernels compute masked entries too).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from brainfm.models import build_model
from brainfm.scaling.families import Family, family_of


@dataclass
class ParameterCount:
    """Parameters of a model.

    Attributes:
        total: all parameters (shared ones once).
        trainable: those with ``requires_grad``.
        largest_layer: the most parameters held directly by one module (DeepSpeed's ZeRO-3
            estimator gathers one such layer at a time).
        per_stage: parameters per stage of the family (``other``: outside every stage).
    """

    total: int
    trainable: int
    largest_layer: int
    per_stage: dict[str, int]


def build_on_meta(model_cfg: dict[str, Any]) -> tuple[nn.Module, float]:
    """Instantiate ``model_cfg`` (a plain dict with ``_target_``) on the meta device.

    Returns the model and the seconds it took.
    """
    start = time.perf_counter()
    with torch.device("meta"):
        model = build_model(model_cfg)
    return model, time.perf_counter() - start


def _unique(params) -> list[nn.Parameter]:
    seen: dict[int, nn.Parameter] = {}
    for p in params:
        seen.setdefault(id(p), p)  # by identity: on meta every data_ptr() is 0
    return list(seen.values())


def count_parameters(model: nn.Module, family: Family | None = None) -> ParameterCount:
    """Count the parameters of ``model`` (meta or real); see :class:`ParameterCount`."""
    family = family or family_of(model)
    params = _unique(model.parameters())
    total = sum(p.numel() for p in params)
    trainable = sum(p.numel() for p in params if p.requires_grad)
    largest = max((sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules()), default=0)
    per_stage: dict[str, int] = {}
    counted: set[int] = set()
    for name, modules in family.stages(model).items():
        ps = [p for p in _unique(p for m in modules for p in m.parameters()) if id(p) not in counted]
        counted.update(id(p) for p in ps)
        per_stage[name] = sum(p.numel() for p in ps)
    other = sum(p.numel() for p in params if id(p) not in counted)
    if other:
        per_stage["other"] = other
    return ParameterCount(total, trainable, largest, per_stage)


@dataclass
class FlopCount:
    """FLOPs per sample: ``forward`` and ``train`` (forward + backward, the model FLOPs of MFU; the
    optimizer step's O(parameters) element-wise work is not counted), and ``recompute``: what
    activation checkpointing adds to a training step (the blocks' forward run again in backward;
    0 without ``use_checkpoint``). Hardware FLOPs of a step: ``train + recompute``."""

    forward: int
    train: int
    recompute: int = 0


def checkpointing_modules(model: nn.Module) -> list[nn.Module]:
    """The modules of ``model`` with activation checkpointing switched on: brainfm's backbones keep
    the switch in a ``use_checkpoint`` attribute (``model.use_checkpoint``)."""
    return [m for m in model.modules() if getattr(m, "use_checkpoint", False) is True]


def _train_flops(model: nn.Module, family: Family, inputs_cfg: dict, batch_size: int) -> tuple[int, int]:
    from torch.utils.flop_counter import FlopCounterMode

    inputs = family.make_inputs(model, batch_size, "meta", inputs_cfg)
    with FlopCounterMode(display=False) as fwd:
        out = family.forward(model, *inputs)
        loss = family.loss(model, inputs, out)
    forward = fwd.get_total_flops()
    with FlopCounterMode(display=False) as bwd:
        loss.backward()
    model.zero_grad(set_to_none=True)
    return forward, bwd.get_total_flops()


def count_flops(model: nn.Module, inputs_cfg: dict | None = None, family: Family | None = None,
                batch_size: int = 1) -> FlopCount:
    """FLOPs per sample of ``model`` on the meta device (the model must live there).

    A batch of ``batch_size`` synthetic samples (:mod:`brainfm.scaling.families`) runs forward,
    then backward from the family's loss, under ``FlopCounterMode``; the totals are divided by
    ``batch_size``. With activation checkpointing on (:func:`checkpointing_modules`) the model
    FLOPs are counted with it off, and once more with it on for :attr:`FlopCount.recompute`.
    """
    family = family or family_of(model)
    was_training = model.training
    model.train()
    ckpt = checkpointing_modules(model)
    try:
        with family.meta_safe():
            for m in ckpt:
                m.use_checkpoint = False
            forward, backward = _train_flops(model, family, inputs_cfg or {}, batch_size)
            for m in ckpt:
                m.use_checkpoint = True
            recompute = sum(_train_flops(model, family, inputs_cfg or {}, batch_size)) - forward - backward if ckpt else 0
    finally:
        for m in ckpt:
            m.use_checkpoint = True
        model.zero_grad(set_to_none=True)
        model.train(was_training)
    return FlopCount(forward // batch_size, (forward + backward) // batch_size, recompute // batch_size)
