"""``make bench-gpu`` (``scripts/bench_gpu.py``): training-step speed of brainfm's backbones on the
device it finds, as Markdown tables.

1. Swin4D v7 / v9 / v11 at the scale presets 5m / 51m / 202m on SwiFT's 96^3 x 20 clips, and the
   sequence GPT at 202m (``model/seq_size=202m``: 1024 ROIs, 50 TRs), each with
   ``model.attention_backend=sdpa`` (eager), ``flex`` (FlexAttention, compiled by the model itself
   on accelerators) and ``sdpa`` compiled (``trainer.compile``'s :func:`~brainfm.tasks.base.compile_backbone`):
   batch, samples/s, step time, peak memory and MFU. The batch is the largest power of two whose
   eager ``sdpa`` step fits the GPU (doubling from 1 until the allocator runs out), the same for the
   three variants of a case.
2. With ``SWIFT_REPO`` pointing at a checkout of Transconnectome/SwiFT: its ``swin4d_transformer_ver7``
   beside brainfm's v7 on SwiFT's released configuration (imported from the checkout only).
3. Eager vs compiled for every family (GPT, BERT, LSTM autoencoder, TFF, Semantoks, R2T's temporal
   MLP, Swin4D), small sizes: where ``trainer.compile=true`` pays and where it does not.

A training step is brainfm's (:func:`brainfm.scaling.memory.training_step`): forward under bf16
autocast on a GPU (fp32 on a CPU), the scale test's loss of the family, backward, gradient clipping
at 1.0, brainfm's AdamW (fused). Step time: the median of ``--steps`` steps after warm-up
(compilation is in the warm-up, and reported as "compile s": the warm-up's time beyond its steps).
MFU = model FLOPs per sample (the scale tool's counter, :func:`brainfm.scaling.accounting.count_flops`:
matrix products, convolutions and attention, forward + backward, no recompute) x samples/s / the
device's dense bf16 peak (:data:`PEAK_BF16_TFLOPS`).

On a machine without a GPU the same cases run at a small size (Swin4D on a 48^3 x 4 grid with
embed 12, one block per stage; GPT d 64 x 2 blocks on 94 ROIs; batch 2, fp32, peak memory from
the CPU allocator's profile), so the code path is exercised in a few minutes; speeds there say
nothing about a GPU.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import shlex
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf

from brainfm.bench.swin4d import SWIFT_V7_RELEASED, load_swift_class
from brainfm.config import compose
from brainfm.io import atomic_write_text
from brainfm.models import build_model
from brainfm.models.swin4d import SwinTransformer4D
from brainfm.scaling.accounting import build_on_meta, count_flops
from brainfm.scaling.families import family_of
from brainfm.scaling.measure import allocator_peak
from brainfm.scaling.memory import make_optimizer, optimizer_state_bytes, storage_bytes, training_step
from brainfm.tasks.base import compile_backbone

#: dense bf16 tensor-core peak (TFLOP/s, no sparsity) by device name: NVIDIA's data sheets
PEAK_BF16_TFLOPS = (
    ("H200", 989.0),
    ("H100 PCIe", 756.0),
    ("H100", 989.0),  # SXM (and HBM3 names without a form factor)
    ("A100", 312.0),  # 40 GB and 80 GB, SXM and PCIe
)
SWIN_VERSIONS = ("swin4d_v7", "swin4d_v9", "swin4d_v11")
SWIN_SIZES = ("5m", "51m", "202m")
VARIANTS = ("sdpa", "flex", "compiled")
#: the small sizes of a CPU run
CPU_SWIN = ["model.img_size=[48,48,48,4]", "model.embed_dim=12", "model.depths=[1,1,1,1]", "model.num_heads=[1,2,4,8]"]
CPU_SEQ = ["data.n_rois=94", "model.d_model=64", "model.depth=2", "model.n_heads=4"]


def peak_bf16_flops(name: str) -> float | None:
    """Dense bf16 peak FLOP/s of the GPU called ``name`` (``torch.cuda.get_device_name``), or None
    for a device not in :data:`PEAK_BF16_TFLOPS`."""
    for key, tflops in PEAK_BF16_TFLOPS:
        if key.lower() in name.lower():
            return tflops * 1e12
    return None


@dataclass
class Case:
    """One benchmarked backbone: a name, a size label and the ``scale`` config overrides that build it."""

    name: str
    size: str
    overrides: list[str]
    variants: tuple[str, ...] = VARIANTS
    extra: dict[str, Any] = field(default_factory=dict)


def _model_and_inputs(overrides: list[str]) -> tuple[dict, dict]:
    cfg = compose("scale", ["sizes=[]", *overrides])
    return OmegaConf.to_container(cfg.model, resolve=True), OmegaConf.to_container(cfg.inputs, resolve=True)


class Unsupported(Exception):
    """A variant this model or device does not have (printed as n/a with the reason)."""


def build_variant(model_cfg: dict, variant: str, device: torch.device):
    """The backbone of ``model_cfg`` for a variant: ``sdpa`` / ``compiled`` (``attention_backend=sdpa``
    where the model has the key) or ``flex``.

    Raises:
        Unsupported: ``flex`` on a model without ``attention_backend``.
    """
    cfg = dict(model_cfg)
    if variant == "flex":
        if "attention_backend" not in cfg:
            raise Unsupported("no model.attention_backend")
        cfg["attention_backend"] = "flex"
    elif "attention_backend" in cfg:
        cfg["attention_backend"] = "sdpa"
    try:
        with torch.device(device):
            model = build_model(cfg)
    except Exception as exc:  # Hydra wraps the model's own refusal of an unknown option
        raise Unsupported(f"{type(exc).__name__}: {str(exc).splitlines()[0][:80]}") from exc
    if variant == "compiled":
        compile_backbone(model)
    return model.train()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class TrainingStep:
    """One brainfm training step of ``model`` on a synthetic batch of ``batch`` samples (bf16 autocast
    on a GPU, fp32 on a CPU), callable; ``state_bytes()``: the tensors alive between steps (parameters,
    gradients, AdamW's states, the batch)."""

    def __init__(self, model, inputs_cfg: dict, batch: int, device: torch.device) -> None:

        self.model, self.device = model, device
        self.family = family_of(model)
        self.optimizer = make_optimizer(model)
        self.inputs = self.family.make_inputs(model, batch, device, inputs_cfg)
        self.precision = "bf16-mixed" if device.type == "cuda" else "32-true"

    def __call__(self) -> None:
        training_step(self.model, self.family, self.inputs, self.optimizer, self.precision, 1.0, self.device.type)
        _sync(self.device)

    def state_bytes(self) -> int:
        params = list(self.model.parameters())
        return (storage_bytes([*params, *(p.grad for p in params if p.grad is not None), *self.inputs])
                + optimizer_state_bytes(self.optimizer))


def _is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc).lower()


def largest_batch(model_cfg: dict, inputs_cfg: dict, device: torch.device, max_batch: int) -> int | None:
    """The largest power of two (<= ``max_batch``) whose eager sdpa step fits ``device``; None when
    batch 1 does not."""
    best = None
    batch = 1
    while batch <= max_batch:
        model = None
        try:
            model = build_variant(model_cfg, "sdpa", device)
            TrainingStep(model, inputs_cfg, batch, device)()
            best = batch
        except Exception as exc:
            if not _is_oom(exc):
                raise
            break
        finally:
            del model
            torch.cuda.empty_cache()
        batch *= 2
    return best


def _cpu_peak(step: TrainingStep) -> int:
    """Peak bytes above the start of one step from the CPU allocator's profile."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    return allocator_peak(prof)


def measure(model, inputs_cfg: dict, batch: int, device: torch.device, steps: int, warmup: int) -> dict[str, Any]:
    """Step time (median), samples/s, peak memory (bytes allocated at the peak of a step, everything
    included; GPU: the allocator's maximum; CPU: the profile's peak above the step's start plus the
    tensors alive at it) and the warm-up's time beyond ``warmup`` steady steps (compilation)."""
    step = TrainingStep(model, inputs_cfg, batch, device)
    start = time.perf_counter()
    for _ in range(warmup):
        step()
    warm_s = time.perf_counter() - start
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    step_s = statistics.median(times)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        step()
        peak = torch.cuda.max_memory_allocated(device)
    else:
        peak = step.state_bytes() + _cpu_peak(step)
    return {"batch": batch, "step_s": step_s, "samples_per_s": batch / step_s, "peak_bytes": peak,
            "compile_s": max(0.0, warm_s - warmup * step_s)}


def train_flops(model_cfg: dict, inputs_cfg: dict) -> int:
    """Model FLOPs per training sample (forward + backward) from the scale tool's counter."""
    model, _ = build_on_meta(model_cfg)
    return count_flops(model, inputs_cfg).train


def _variant_row(case: Case, variant: str, model_cfg: dict, inputs_cfg: dict, batch: int | None,
                 device: torch.device, peak: float | None, args) -> dict[str, Any]:
    row: dict[str, Any] = {"model": case.name, "size": case.size, "variant": variant, "batch": batch}
    if batch is None:
        return {**row, "note": "batch 1 does not fit"}
    model = None
    try:
        model = build_variant(model_cfg, variant, device)
        warmup = args.warmup + (2 if variant in ("compiled", "flex") else 0)
        result = measure(model, inputs_cfg, batch, device, args.steps, warmup)
    except Unsupported as exc:
        return {**row, "note": f"n/a ({exc})"}
    except Exception as exc:
        if _is_oom(exc):
            return {**row, "note": "OOM"}
        if variant == "flex" and device.type == "cpu":
            return {**row, "note": f"n/a ({str(exc).splitlines()[0][:70]})"}
        raise
    finally:
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    flops = case.extra.get("flops")
    if flops is None:
        flops = case.extra["flops"] = train_flops(model_cfg, inputs_cfg)
    mfu = flops * result["samples_per_s"] / peak if peak else None
    return {**row, **result, "mfu": mfu, "note": ""}


def main_cases(cpu: bool, sizes: tuple[str, ...]) -> list[Case]:
    """Table 1's cases (small sizes on a CPU)."""
    cases = []
    for version in SWIN_VERSIONS:
        if cpu:
            cases.append(Case(version, "tiny 48^3x4", [f"model={version}", *CPU_SWIN]))
        else:
            cases += [Case(version, size, [f"model={version}", f"model/size={size}"]) for size in sizes]
    gpt = [*CPU_SEQ] if cpu else ["model/seq_size=202m"]
    cases.append(Case("gpt", "d64x2, 94 ROIs" if cpu else "202m", ["model=gpt", *gpt]))
    return cases


def family_cases(cpu: bool) -> list[Case]:
    """Table 3: eager vs compiled for every family (small sizes; Swin4D and GPT are in table 1 on a CPU)."""
    tiny_tff = ["model=tff", "model.img_size=[16,16,16]", "model.hidden_size=64", "model.num_heads=4",
                "model.intermediate_size=128", "model.encoder_blocks=[1,1,1,1]", "model.max_positions=21",
                "inputs.seq_len=20"]
    cases = [
        Case("seq_bert", "d128x2", ["model=bert", "data.n_rois=94"], ("sdpa", "compiled")),
        Case("lstm_ae", "d128x2", ["model=lstm_ae", "data.n_rois=94"], ("sdpa", "compiled")),
        Case("semantoks", "d128x2", ["model=semantoks", "data.n_rois=94", "inputs.seq_len=60"], ("sdpa", "compiled")),
        Case("r2t_temporal_mlp", "d256x2", ["model=temporal_mlp", "data.n_rois=94"], ("sdpa", "compiled")),
        Case("tff", "16^3x20, hidden 64", tiny_tff, ("sdpa", "compiled")),
    ]
    if not cpu:
        cases += [Case("gpt", "d128x2", ["model=gpt", "data.n_rois=94"], ("sdpa", "compiled")),
                  *[Case(v, "tiny 48^3x4", [f"model={v}", *CPU_SWIN], ("sdpa", "compiled")) for v in SWIN_VERSIONS]]
    return cases


def swift_rows(repo: Path, device: torch.device, batch: int, args) -> list[dict[str, Any]]:
    """Table 2: SwiFT's ver7 code beside brainfm's v7 on SwiFT's released configuration, eager and
    compiled (the whole model: SwiFT's forward is its only entry)."""
    ref_cls = load_swift_class(repo)
    cfg = {"_target_": "brainfm.models.swin4d.SwinTransformer4D", **SWIFT_V7_RELEASED}
    inputs_cfg = {}
    rows = []
    for name, make in (("brainfm v7", lambda: SwinTransformer4D(**SWIFT_V7_RELEASED)),
                       ("SwiFT ver7", lambda: ref_cls(**SWIFT_V7_RELEASED, to_float=True))):
        for compiled in (False, True):
            with torch.device(device):
                model = make().train()
            if compiled:
                model.compile()
            try:
                result = measure(model, inputs_cfg, batch, device, args.steps, args.warmup + 2 * compiled)
                rows.append({"model": name, "variant": "compiled" if compiled else "eager", **result, "note": ""})
            except Exception as exc:
                if not _is_oom(exc):
                    raise
                rows.append({"model": name, "variant": "compiled" if compiled else "eager", "batch": batch,
                             "note": "OOM"})
            finally:
                del model
    for row in rows:
        row["flops"] = train_flops(cfg, inputs_cfg)
    return rows


# -- Markdown ------------------------------------------------------------------------------------------------
def _fmt(value: Any, spec: str) -> str:
    if value is None or value == "":
        return "n/a"
    return format(value, spec)


def markdown(headers: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def _speed_cells(r: dict) -> list[str]:
    if r.get("note") and "step_s" not in r:
        return [str(r.get("batch") or "n/a"), r["note"], "", "", "", ""]
    gib = r["peak_bytes"] / 2**30
    return [str(r["batch"]), _fmt(r["samples_per_s"], ".3g"), _fmt(r["step_s"] * 1e3, ".1f"), f"{gib:.2f}",
            _fmt(r.get("mfu"), ".1%"), _fmt(r.get("compile_s") if r["variant"] in ("compiled", "flex") else None, ".0f")]


def device_line(device: torch.device) -> str:
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        props = torch.cuda.get_device_properties(device)
        peak = peak_bf16_flops(name)
        return (f"{name}, {props.total_memory / 2**30:.0f} GiB, dense bf16 peak "
                f"{'n/a (not in the table)' if peak is None else f'{peak / 1e12:.0f} TFLOP/s'}; torch {torch.__version__}, "
                f"CUDA {torch.version.cuda}")
    return f"CPU {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads; torch {torch.__version__}"


def run(args) -> str:
    """Run the benchmark; returns the Markdown report (also printed table by table)."""
    import warnings

    cuda = torch.cuda.is_available() and not args.cpu
    device = torch.device("cuda", 0) if cuda else torch.device("cpu")
    out: list[str] = []

    def emit(text: str) -> None:
        print(text, flush=True)
        out.append(text)

    emit(f"`{args.command}`\n")
    emit(f"{datetime.datetime.now().astimezone():%Y-%m-%d %H:%M %Z} - {device_line(device)}\n")
    if not cuda:
        emit("no GPU found: CPU run at a small size (fp32, batch 2; speeds say nothing about a GPU)\n")
    peak = peak_bf16_flops(torch.cuda.get_device_name(device)) if cuda else None
    ckpt = ["model.use_checkpoint=true"] if args.checkpoint else []
    with warnings.catch_warnings():
        # expected on a CPU: FlexAttention's reference path (the model filters its own notice); Inductor's
        # note that it falls back to eager for ops without a lowering is informative only
        warnings.filterwarnings("ignore", message=".*flex_attention called without torch.compile.*")
        rows = []
        for case in main_cases(not cuda, tuple(args.sizes)):
            if args.only and case.name not in args.only:
                continue
            model_cfg, inputs_cfg = _model_and_inputs([*case.overrides, *ckpt])
            batch = largest_batch(model_cfg, inputs_cfg, device, args.max_batch) if cuda else args.cpu_batch
            for variant in case.variants:
                rows.append(_variant_row(case, variant, model_cfg, inputs_cfg, batch, device, peak, args))
                r = rows[-1]
                print(f"  {case.name} {case.size} {variant}: " + (r["note"] or f"{r['step_s'] * 1e3:.1f} ms/step"),
                      file=sys.stderr, flush=True)
        title = ("Training step, 96^3 x 20 (Swin4D) / 1024 ROIs x 50 TRs (GPT), bf16 autocast, fused AdamW"
                 if cuda else "Training step, small sizes, fp32, fused AdamW")
        emit(f"### {title}{' , activation checkpointing' if args.checkpoint else ''}\n")
        emit(markdown(["model", "size", "variant", "batch", "samples/s", "step ms", "peak GiB", "MFU", "compile s"],
                      [[r["model"], r["size"], r["variant"], *_speed_cells(r)] for r in rows]) + "\n")

        repo = os.environ.get("SWIFT_REPO")
        if repo:
            batch = next((r["batch"] for r in rows if r["model"] == "swin4d_v7" and r.get("batch")), 1) or 1
            srows = swift_rows(Path(repo), device, batch if cuda else args.cpu_batch, args)
            for r in srows:
                r["mfu"] = r["flops"] * r["samples_per_s"] / peak if peak and "samples_per_s" in r else None
            emit(f"### SwiFT ver7 ({repo}) beside brainfm v7, SwiFT's released configuration (embed 36, full MSA)\n")
            emit(markdown(["model", "variant", "batch", "samples/s", "step ms", "peak GiB", "MFU", "compile s"],
                          [[r["model"], r["variant"], *_speed_cells(r)] for r in srows]) + "\n")
        else:
            emit("SwiFT side by side: set SWIFT_REPO=<checkout of Transconnectome/SwiFT> to add it.\n")

        if not args.no_families:
            batch = 8 if cuda else args.cpu_batch
            frows = []
            for case in family_cases(not cuda):
                if args.only and case.name not in args.only:
                    continue
                model_cfg, inputs_cfg = _model_and_inputs([*case.overrides, *ckpt])
                eager, comp = (_variant_row(case, v, model_cfg, inputs_cfg, batch, device, peak, args)
                               for v in ("sdpa", "compiled"))
                frows.append((case, eager, comp))
                print(f"  {case.name}: eager {eager['step_s'] * 1e3:.1f} ms, compiled {comp['step_s'] * 1e3:.1f} ms",
                      file=sys.stderr, flush=True)
            emit(f"### Eager vs compiled per family (batch {batch}, {'bf16 autocast' if cuda else 'fp32'}"
                 f"{'' if cuda else '; Swin4D and GPT: the table above'})\n")
            emit(markdown(["model", "size", "eager ms", "compiled ms", "speed-up", "compile s"],
                          [[c.name, c.size, f"{e['step_s'] * 1e3:.1f}", f"{k['step_s'] * 1e3:.1f}",
                            f"{e['step_s'] / k['step_s']:.2f}x", f"{k['compile_s']:.0f}"] for c, e, k in frows]) + "\n")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> str:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", nargs="*", default=list(SWIN_SIZES), help="Swin4D scale presets on a GPU")
    p.add_argument("--only", nargs="*", default=None, help="only these models (e.g. swin4d_v7 gpt lstm_ae)")
    p.add_argument("--steps", type=int, default=5, help="timed steps per variant (median)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first (+2 for compiled and flex variants)")
    p.add_argument("--max-batch", type=int, default=1024, help="largest batch tried on a GPU")
    p.add_argument("--cpu-batch", type=int, default=2, help="batch of a CPU run")
    p.add_argument("--checkpoint", action="store_true", help="model.use_checkpoint=true everywhere")
    p.add_argument("--no-families", action="store_true", help="skip the eager-vs-compiled table of every family")
    p.add_argument("--cpu", action="store_true", help="the CPU run even where a GPU exists")
    p.add_argument("--out", type=Path, default=None, help="also write the Markdown report here")
    args = p.parse_args(argv)
    args.command = " ".join(["python", "scripts/bench_gpu.py", *map(shlex.quote, sys.argv[1:] if argv is None else argv)])
    report = run(args)
    if args.out:
        atomic_write_text(args.out, report + "\n")
    return report
