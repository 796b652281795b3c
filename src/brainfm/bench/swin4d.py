"""Swin4D forward+backward time per version and size at 96^3 x 20, batch 1; optionally side by
side with the public SwiFT ver7 code from a local checkout (measured in the same process,
interleaved, same input); on a GPU also bf16 autocast, torch.compile and MFU.

The SwiFT code is imported from the checkout given with ``--swift-repo`` (it is never part of
brainfm); its CUDA-only NVTX calls are replaced by no-ops in this process, as the parity fixture's
README describes.
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
import time
import types
from pathlib import Path

import torch
from hydra.utils import instantiate

from brainfm.config import compose
from brainfm.models.swin4d import SwinTransformer4D
from brainfm.tasks.base import compile_backbone

SHAPE = (1, 1, 96, 96, 96, 20)
SWIFT_V7_DEFAULT = dict(img_size=(96, 96, 96, 20), in_chans=1, embed_dim=24, window_size=(4, 4, 4, 4),
                        first_window_size=(2, 2, 2, 2), patch_size=(6, 6, 6, 1), depths=(2, 2, 6, 2),
                        num_heads=(3, 6, 12, 24), c_multiplier=2, last_layer_full_MSA=False)
SWIFT_V7_RELEASED = {**SWIFT_V7_DEFAULT, "embed_dim": 36, "first_window_size": (4, 4, 4, 4), "last_layer_full_MSA": True}


def load_swift_class(repo: Path):
    """``SwinTransformer4D`` of SwiFT's ``swin4d_transformer_ver7.py`` from a checkout."""
    models = repo / "project" / "module" / "models"
    if not (models / "swin4d_transformer_ver7.py").is_file():
        raise SystemExit(f"--swift-repo {repo}: no project/module/models/swin4d_transformer_ver7.py there")
    torch.cuda.nvtx.range_push = lambda *a, **k: None  # CUDA-only calls in SwiFT's PatchEmbed
    torch.cuda.nvtx.range_pop = lambda *a, **k: None
    pkg = types.ModuleType("_swift_models")
    pkg.__path__ = [str(models)]
    sys.modules["_swift_models"] = pkg
    spec = importlib.util.spec_from_file_location("_swift_models.swin4d_transformer_ver7", models / "swin4d_transformer_ver7.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod.SwinTransformer4D


def build(version: str, size: str | None, device: str = "cpu"):
    cfg = compose("train", [f"model={version}"] + ([f"model/size={size}"] if size else []))
    with torch.device(device):
        return instantiate(cfg.model, _convert_="all")


def step_time(model, x, reps: int = 3, autocast: bool = False) -> float:
    """Median seconds of ``(model(x) ** 2).mean().backward()`` after one warm-up step."""
    def step():
        model.zero_grad(set_to_none=True)
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=autocast):
            y = model(x)
        (y.float() ** 2).mean().backward()
        if x.is_cuda:
            torch.cuda.synchronize()

    step()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def compare_with_swift(repo: Path, reps: int = 5, compiled: bool = False) -> list[dict]:
    """SwiFT ver7 and brainfm's v7 on the same weights and input, forward+backward, at SwiFT's default
    and released configurations: the median of ``reps`` interleaved steps each (``brainfm_s``,
    ``swift_s``; with ``compiled``, also ``compiled_s``: brainfm with ``trainer.compile``'s regional
    compile, warmed up (compiled) before the timed steps)."""
    Ref = load_swift_class(repo)
    x = torch.randn(*SHAPE)
    rows = []
    for name, kw in (("SwiFT defaults (embed 24, first window 2)", SWIFT_V7_DEFAULT),
                     ("SwiFT released (embed 36, first window 4, full MSA)", SWIFT_V7_RELEASED)):
        ours, ref = SwinTransformer4D(**kw), Ref(**kw, to_float=True)
        ref.load_state_dict(ours.state_dict())
        models = {"brainfm_s": ours, "swift_s": ref}
        if compiled:
            comp = SwinTransformer4D(**kw)
            comp.load_state_dict(ours.state_dict())
            compile_backbone(comp)
            start = time.perf_counter()
            step_time(comp, x, reps=1)  # compiles every block (forward and backward): two steps
            first = time.perf_counter() - start
            models["compiled_s"] = comp
        times = {k: [] for k in models}
        for _ in range(reps):  # interleaved, so that machine noise hits all alike
            for k, m in models.items():
                times[k].append(step_time(m, x, reps=1))
        row = {"config": name, **{k: statistics.median(v) for k, v in times.items()}}
        if compiled:
            row["compile_s"] = first - 2 * row["compiled_s"]
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> None:
    from rich.console import Console
    from rich.table import Table

    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--swift-repo", type=Path, default=None, help="checkout of Transconnectome/SwiFT to compare with")
    p.add_argument("--versions", nargs="*", default=["swin4d_v7", "swin4d_v8", "swin4d_v9", "swin4d_v10", "swin4d_v11"])
    p.add_argument("--sizes", nargs="*", default=["5m", "51m"])
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--swift-reps", type=int, default=5, help="interleaved steps of the SwiFT comparison (median)")
    p.add_argument("--compiled", action="store_true", help="add brainfm compiled (trainer.compile) to the SwiFT comparison")
    p.add_argument("--only-swift", action="store_true", help="only the SwiFT comparison")
    args = p.parse_args(argv)
    console = Console()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.swift_repo:
        table = Table(title=f"Swin4D v7 forward+backward, 96^3 x 20, batch 1, CPU fp32, {torch.get_num_threads()} threads: "
                            f"brainfm vs public SwiFT ver7 (same weights and input; median of {args.swift_reps}, interleaved)")
        cols = ["configuration", "SwiFT (s)", "brainfm (s)", "speed-up"] + (
            ["brainfm compiled (s)", "speed-up"] if args.compiled else [])
        for col in cols:
            table.add_column(col, justify="right")
        for r in compare_with_swift(args.swift_repo, reps=args.swift_reps, compiled=args.compiled):
            cells = [r["config"], f"{r['swift_s']:.3f}", f"{r['brainfm_s']:.3f}", f"{r['swift_s'] / r['brainfm_s']:.2f}x"]
            if args.compiled:
                cells += [f"{r['compiled_s']:.3f}", f"{r['swift_s'] / r['compiled_s']:.2f}x"]
            table.add_row(*cells)
        console.print(table)
        if args.only_swift:
            return
    table = Table(title=f"Swin4D forward+backward, 96^3 x 20, batch 1, {device} ({torch.get_num_threads()} threads)")
    cols = ["version", "size", "parameters", "fp32 (s)"] + (["bf16 (s)", "bf16+compile (s)", "MFU bf16+compile"] if device == "cuda" else [])
    for col in cols:
        table.add_column(col, justify="right")
    x = torch.randn(*SHAPE, device=device)
    for version in args.versions:
        for size in args.sizes:
            model = build(version, size, device)
            n = sum(p.numel() for p in model.parameters())
            row = [version, size, f"{n / 1e6:.1f} M", f"{step_time(model, x, args.reps):.3f}"]
            if device == "cuda":
                from torch.utils.flop_counter import FlopCounterMode

                with FlopCounterMode(display=False) as counter:
                    (model(x) ** 2).mean().backward()
                flops = counter.get_total_flops()
                t_bf16 = step_time(model, x, args.reps, autocast=True)
                compiled = torch.compile(model)
                t_comp = step_time(compiled, x, args.reps, autocast=True)
                # dense bf16 peak: H100 SXM 989 TFLOP/s, H200 989, A100 312
                peak_flops = 312e12 if "A100" in torch.cuda.get_device_name(0) else 989e12
                row += [f"{t_bf16:.3f}", f"{t_comp:.3f}", f"{flops / t_comp / peak_flops:.1%}"]
            table.add_row(*row)
            del model
    console.print(table)


if __name__ == "__main__":
    main()
