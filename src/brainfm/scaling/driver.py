"""The scale test (``brainfm-scale``): one row per size of a model family.

For every size: build on the meta device (parameters, FLOPs per sample), simulate a training
step at the plan's micro-batch and precision (activation and working memory), add the model
states of every strategy (DeepSpeed's estimators) for ``cluster.nodes`` nodes, search the
smallest Perlmutter configuration that fits each GPU type, recommend a strategy, and, for the
sizes that fit this machine (or every size, ``measure.enabled=true``), measure a few training
steps with ``trainer=``. Rows are written one file per size and merged into the table and the plot
(:mod:`brainfm.scaling.table`).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from brainfm.config import compose, config_dir
from brainfm.errors import ConfigError
from brainfm.io import atomic_write_text
from brainfm.scaling.accounting import build_on_meta, count_flops, count_parameters
from brainfm.scaling.families import family_of
from brainfm.scaling.measure import measure_training
from brainfm.scaling.memory import (
    STRATEGIES,
    GiB,
    StepMemory,
    model_state_memory,
    per_gpu_need,
    place,
    simulate_step_memory,
)
from brainfm.scaling.table import merge, write_row, write_table

log = logging.getLogger("brainfm.scale")


# -- configuration ---------------------------------------------------------------------------------
def group_choice(group: str, overrides: list[str], choices: dict | None = None, default: str | None = None) -> str | None:
    """The option chosen for a config group: ``choices`` (Hydra's record, inside brainfm-scale),
    else the last ``group=option`` of ``overrides``, else ``default``."""
    if choices and choices.get(group):
        return str(choices[group])
    for o in reversed(overrides):
        key, _, value = o.lstrip("+~").partition("=")
        if key == group and value:
            return value
    return default


def _compose(overrides: list[str]) -> DictConfig:
    return compose("scale", overrides)


def size_group(cfg: DictConfig) -> str:
    """The preset group of ``cfg.model``'s family (``cfg.size_groups``).

    Raises:
        ConfigError: the family has no preset group.
    """
    from hydra.utils import get_class

    cls = get_class(cfg.model._target_)
    name = family_of(cls).name
    if name not in cfg.size_groups:
        raise ConfigError(f"size_groups has no preset group for the {name!r} family ({cls.__qualname__}); "
                          f"add size_groups.{name}=model/<group>, or run with sizes=[]")
    return str(cfg.size_groups[name])


def model_configs(cfg: DictConfig, overrides: list[str], compose_fn=None) -> list[tuple[str, dict]]:
    """``(size, plain model config)`` for every entry of ``cfg.sizes`` (the model as configured,
    named ``base``, when ``sizes`` is empty), composed as Hydra composes ``<group>=<size>`` with
    ``compose_fn(overrides)`` (``conf/scale.yaml``; inside a Hydra app pass ``hydra.compose``).

    Raises:
        ConfigError: a size with no preset file (the message lists the presets).
    """
    sizes = list(cfg.sizes or [])
    if not sizes:
        return [("base", OmegaConf.to_container(cfg.model, resolve=True))]
    group = size_group(cfg)
    available = sorted(p.stem for p in (config_dir() / group).glob("*.yaml"))
    groups = tuple(str(g) for g in cfg.size_groups.values())
    kept = [o for o in overrides if not o.lstrip("+~").split("=", 1)[0] in groups and not o.startswith("sizes=")]
    out = []
    for size in sizes:
        size = str(size)
        if size not in available:
            raise ConfigError(f"sizes: no preset {group}/{size}.yaml; the {group} presets are {', '.join(available)}")
        composed = (compose_fn or _compose)(kept + [f"{group}={size}"])
        out.append((size, OmegaConf.to_container(composed.model, resolve=True)))
    return out


def out_dir_of(cfg: DictConfig, model_name: str) -> Path:
    return Path(cfg.out_dir) if cfg.get("out_dir") else Path(cfg.paths.output_dir) / "scale" / model_name


# -- one size --------------------------------------------------------------------------------------
def _gib(n: float | None) -> float | None:
    return None if n is None else float(n) / GiB


def account(model_cfg: dict, cfg: DictConfig) -> tuple[dict[str, Any], StepMemory]:
    """Parameters, FLOPs, the plan's step memory, model states and placements of one size."""
    model, build_s = build_on_meta(model_cfg)
    family = family_of(model)
    inputs_cfg = OmegaConf.to_container(cfg.inputs, resolve=True)
    counts = count_parameters(model, family)
    flops = count_flops(model, inputs_cfg, family)
    del model
    cl = cfg.cluster
    clip = cfg.trainer.get("gradient_clip_val")
    step = simulate_step_memory(model_cfg, int(cfg.batch_size), str(cl.precision), inputs_cfg,
                                gradient_clip_val=clip)
    row: dict[str, Any] = {
        "family": family.name, "params_total": counts.total, "params_trainable": counts.trainable,
        "params_largest_layer": counts.largest_layer,
        "params_per_stage": "; ".join(f"{k}={v}" for k, v in counts.per_stage.items()),
        "build_meta_s": round(build_s, 3),
        "fwd_gflops": flops.forward / 1e9, "train_gflops": flops.train / 1e9,
        # activation checkpointing: the step memory below is simulated with it; its recomputed forward
        # is not in train_gflops (MFU's model FLOPs)
        "use_checkpoint": bool(model_cfg.get("use_checkpoint", False)), "recompute_gflops": flops.recompute / 1e9,
        "batch_size": int(cfg.batch_size), "precision": str(cl.precision),
        "inputs_gib": _gib(step.inputs), "act_gib": _gib(step.forward), "step_gib": _gib(step.working),
        "one_gpu_gib": _gib(per_gpu_need("gpu", counts.total, counts.largest_layer, step, 1, 1)[0]),
        "nodes": int(cl.nodes), "gpus_per_node": int(cl.gpus_per_node), "usable_fraction": float(cl.usable_fraction),
    }
    for strategy in STRATEGIES:
        nodes = 1 if strategy == "gpu" else int(cl.nodes)
        gpn = 1 if strategy == "gpu" else int(cl.gpus_per_node)
        states = model_state_memory(strategy, counts.total, counts.largest_layer, nodes, gpn, cl.additional_buffer_factor)
        row[f"states_{strategy}_gib"] = _gib(states.gpu)
    host = float(cl.host_memory_gib) * float(cl.host_usable_fraction) * GiB
    strategies = [str(s) for s in cl.strategies]
    for gpu_name, gpu in cl.gpus.items():
        capacity = float(gpu.memory_gib) * float(cl.usable_fraction) * GiB
        smallest = place(counts.total, counts.largest_layer, step, capacity, host, strategies, None,
                         int(cl.gpus_per_node), int(cl.max_nodes), cl.additional_buffer_factor)
        row[f"fit_{gpu_name}"] = f"{smallest} ({smallest.gpu_bytes / GiB:.1f} GiB/GPU)" if smallest else None
    target = cl.gpus[cl.target_gpu]
    capacity = float(target.memory_gib) * float(cl.usable_fraction) * GiB
    rec = place(counts.total, counts.largest_layer, step, capacity, host, strategies, int(cl.nodes),
                int(cl.gpus_per_node), int(cl.max_nodes), cl.additional_buffer_factor)
    if rec is None:  # nothing fits at the requested node count: the smallest configuration that does
        rec = place(counts.total, counts.largest_layer, step, capacity, host, strategies, None,
                    int(cl.gpus_per_node), int(cl.max_nodes), cl.additional_buffer_factor)
        if rec is not None and rec.nodes * rec.gpus_per_node < int(cl.nodes) * int(cl.gpus_per_node):
            rec = None
    row["recommended"] = f"{rec} ({cl.target_gpu}, {rec.gpu_bytes / GiB:.1f} GiB/GPU)" if rec else None
    row["recommended_trainer"] = rec.strategy if rec else None
    row["recommended_nodes"] = rec.nodes if rec else None
    row["recommended_gpus_per_node"] = rec.gpus_per_node if rec else None
    row["recommended_constraint"] = str(target.constraint)
    return row, step


def _world_size(trainer_cfg: DictConfig) -> int:
    devices = trainer_cfg.get("devices", 1)
    devices = 1 if devices in (None, "auto") else int(devices)
    return devices * int(trainer_cfg.get("num_nodes", 1) or 1)


def _available_bytes(accelerator: str) -> float:
    if accelerator in ("gpu", "cuda") and torch.cuda.is_available():
        return float(torch.cuda.get_device_properties(0).total_memory)
    import psutil

    return float(psutil.virtual_memory().available)


def maybe_measure(model_cfg: dict, cfg: DictConfig, row: dict, trainer_name: str, out_dir: Path) -> dict[str, Any]:
    """Measure the size when ``measure.enabled`` says so; the measured and predicted columns, or
    ``not_measured`` with the reason."""
    m = cfg.measure
    enabled = m.enabled
    if enabled is False or str(enabled).lower() == "false":
        return {"not_measured": "measure.enabled=false"}
    trainer_cfg = cfg.trainer
    precision = str(trainer_cfg.get("precision", "32-true"))
    accelerator = str(trainer_cfg.get("accelerator", "cpu"))
    on_gpu = accelerator in ("gpu", "cuda")
    if on_gpu and not torch.cuda.is_available():
        return {"not_measured": f"trainer={trainer_name} needs a GPU"}
    if not on_gpu and precision != "32-true":
        precision = "32-true"
    world = _world_size(trainer_cfg)
    inputs_cfg = OmegaConf.to_container(cfg.inputs, resolve=True)
    batch = int(m.batch_size)
    sim = simulate_step_memory(model_cfg, batch, precision, inputs_cfg,
                               gradient_clip_val=trainer_cfg.get("gradient_clip_val"))
    if world == 1:  # CPU: the measured start is counted from tensors, without the cached masks
        predicted_peak = sim.peak if on_gpu else sim.start + sim.working
        predicted_working = sim.working
    else:
        strategy = trainer_name if trainer_name in STRATEGIES else "ddp"
        nodes = int(trainer_cfg.get("num_nodes", 1) or 1)
        predicted_peak, _ = per_gpu_need(strategy, row["params_total"], row["params_largest_layer"], sim, nodes,
                                         world // nodes, cfg.cluster.additional_buffer_factor)
        predicted_working = sim.working
    if str(enabled).lower() == "auto":
        if world > 1:
            return {"not_measured": "measure.enabled=auto measures single-process runs only"}
        budget = float(m.memory_fraction) * _available_bytes(accelerator)
        if predicted_peak > budget:
            return {"not_measured": f"predicted peak {predicted_peak / GiB:.1f} GiB > {m.memory_fraction:g} x available "
                                    f"{budget / float(m.memory_fraction) / GiB:.1f} GiB here"}

    trainer_cfg = OmegaConf.merge(trainer_cfg, {"precision": precision}) if not on_gpu else trainer_cfg
    result = measure_training(model_cfg, trainer_cfg, batch, inputs_cfg, int(m.warmup_steps), int(m.steps),
                              root_dir=str(out_dir), train_flops_per_sample=int(row["train_gflops"] * 1e9),
                              peak_tflops=m.get("peak_tflops"))
    return {
        "measured_device": result["device"], "measured_trainer": trainer_name, "world_size": result["world_size"],
        "measured_batch_size": result["batch_size"], "measured_precision": result["precision"],
        "step_s": result["step_s"], "samples_per_s": result["samples_per_s"],
        "measured_peak_gib": _gib(result["peak_bytes"]), "measured_step_gib": _gib(result["working_bytes"]),
        "predicted_peak_gib": _gib(predicted_peak), "predicted_step_gib": _gib(predicted_working),
        "peak_error_pct": 100.0 * (predicted_peak - result["peak_bytes"]) / result["peak_bytes"],
        "step_error_pct": 100.0 * (predicted_working - result["working_bytes"]) / max(result["working_bytes"], 1),
        "mfu": result["mfu"], "not_measured": None,
    }


# -- the whole test ---------------------------------------------------------------------------------
def is_rank_zero() -> bool:
    from lightning.fabric.utilities.rank_zero import rank_zero_only

    return getattr(rank_zero_only, "rank", 0) == 0


def write_plan(rows: list[dict], out_dir: Path) -> Path:
    """``plan.csv``: one line per size with the recommended trainer, nodes, GPUs per node, node
    constraint and micro-batch per GPU (what scale.sbatch submits; empty fields: nothing fits)."""
    lines = ["index,model,size,trainer,nodes,gpus_per_node,constraint,batch_size"]
    for i, r in enumerate(rows):
        lines.append(f"{i},{r['model']},{r['size']},{r.get('recommended_trainer') or ''},"
                     f"{r.get('recommended_nodes') or ''},{r.get('recommended_gpus_per_node') or ''},"
                     f"{r.get('recommended_constraint') or ''},{r['batch_size']}")
    path = Path(out_dir) / "plan.csv"
    atomic_write_text(path, "\n".join(lines) + "\n")
    return path


def run(cfg: DictConfig, overrides: list[str] | None = None, choices: dict | None = None,
        compose_fn=None) -> tuple[list[dict], Path]:
    """Run the scale test of ``cfg`` (``mode``: ``run``, ``plan`` or ``merge``); returns the rows of
    this call and the output folder.

    Args:
        cfg: the composed ``conf/scale.yaml``.
        overrides: the command-line overrides that composed ``cfg``; each size is composed from
            them plus its preset.
        choices: Hydra's group choices (``HydraConfig.get().runtime.choices``) inside
            brainfm-scale; otherwise read from ``overrides`` (the model's name, the trainer).
        compose_fn: ``overrides -> DictConfig`` composing ``scale.yaml`` (default:
            :func:`brainfm.config.compose`; inside a Hydra app ``hydra.compose``).

    Raises:
        ConfigError: unknown mode, size or family.
    """
    overrides = list(overrides or [])
    mode = str(cfg.mode)
    if mode not in ("run", "plan", "merge"):
        raise ConfigError(f"mode={mode!r} must be run, plan or merge")
    model_name = group_choice("model", overrides, choices) or str(cfg.model._target_).rsplit(".", 1)[-1]
    out_dir = out_dir_of(cfg, model_name)
    if mode == "merge":
        merge(out_dir)
        return [], out_dir
    trainer_name = group_choice("trainer", overrides, choices, "cpu")
    rows = []
    rank_zero = is_rank_zero()
    for size, model_cfg in model_configs(cfg, overrides, compose_fn):
        row: dict[str, Any] = {"model": model_name, "size": size}
        acc, _ = account(model_cfg, cfg)
        row.update(acc)
        if mode == "run":
            row.update(maybe_measure(model_cfg, cfg, row, trainer_name, out_dir))
        else:
            row["not_measured"] = "mode=plan"
        rows.append(row)
        if rank_zero:
            write_row(out_dir, row)
            log.info("%s %s: %s parameters, %.3g GFLOP/sample (train), step working memory %.2f GiB, recommended %s%s",
                     model_name, size, f"{row['params_total']:,}", row["train_gflops"], row["step_gib"], row["recommended"],
                     f"; measured {row['step_s']:.3g} s/step, {row['samples_per_s']:.3g} samples/s"
                     if row.get("step_s") else f"; not measured: {row.get('not_measured')}")
    if rank_zero:
        if mode == "plan":
            write_plan(rows, out_dir)
        merge(out_dir)
    return rows, out_dir


__all__ = ["account", "maybe_measure", "model_configs", "run", "write_plan", "write_table"]
