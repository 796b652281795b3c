"""``scripts/bench_scale.py``: simulated against resident-set-size memory of the first training
step, per size (a table)."""

from __future__ import annotations

import argparse

from omegaconf import OmegaConf

from brainfm.config import compose
from brainfm.scaling.driver import size_group
from brainfm.scaling.measure import first_step_rss
from brainfm.scaling.memory import GiB, simulate_step_memory


def main(argv: list[str] | None = None) -> list[dict]:
    from rich.console import Console
    from rich.table import Table


    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", default="swin4d_v9")
    p.add_argument("--sizes", nargs="*", default=["5m", "51m"])
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("overrides", nargs="*", help="Hydra overrides of conf/scale.yaml")
    args = p.parse_args(argv)
    base = compose("scale", [f"model={args.model}", *args.overrides])
    group = size_group(base)
    table = Table(title=f"First fp32 training step of {args.model}, batch {args.batch_size}: peak above the "
                        "model and batch (GiB)")
    for col in ("size", "simulated (fake tensors)", "resident set size", "RSS / simulated"):
        table.add_column(col, justify="right")
    rows = []
    for size in args.sizes:
        cfg = compose("scale", [f"model={args.model}", f"{group}={size}", *args.overrides])
        model_cfg = OmegaConf.to_container(cfg.model, resolve=True)
        inputs_cfg = OmegaConf.to_container(cfg.inputs, resolve=True)
        clip = cfg.trainer.get("gradient_clip_val")
        sim = simulate_step_memory(model_cfg, args.batch_size, "32-true", inputs_cfg, gradient_clip_val=clip,
                                   first_step=True)
        rss = first_step_rss(model_cfg, args.batch_size, inputs_cfg, clip)
        rows.append({"size": size, "simulated": sim.working, "rss": rss})
        table.add_row(size, f"{sim.working / GiB:.3f}", "n/a" if rss is None else f"{rss / GiB:.3f}",
                      "n/a" if rss is None else f"{rss / sim.working:.3f}")
    Console().print(table)
    return rows
