"""The scale table: one JSON row file per (model, size), merged into ``scale.csv`` and ``scale.md``.

Row files let SLURM array tasks write their results independently (each atomically: a temporary
name, then ``os.replace``: :mod:`brainfm.io`); :func:`merge` reads them all and rewrites the table under an
exclusive ``flock`` on ``<dir>/.merge.lock``, so the last task to merge sees every row written
before it.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import math
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from brainfm.errors import DataError
from brainfm.io import atomic_write_text
from brainfm.scaling.plot import plot_scale

GiB = 2**30
STATE_COLUMNS = {
    "states_gpu_gib": "1 GPU",
    "states_ddp_gib": "DDP",
    "states_deepspeed_stage_2_gib": "ZeRO-2",
    "states_deepspeed_stage_2_offload_gib": "ZeRO-2 + offload",
    "states_deepspeed_stage_3_gib": "ZeRO-3",
    "states_deepspeed_stage_3_offload_gib": "ZeRO-3 + offload",
}


def row_path(out_dir: Path, row: dict) -> Path:
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "-", f"{row['model']}_{row['size']}")
    return Path(out_dir) / "rows" / f"{safe}.json"


def write_row(out_dir: Path, row: dict) -> Path:
    """Write one row file atomically; returns its path."""
    path = row_path(out_dir, row)
    atomic_write_text(path, json.dumps(row, indent=1, default=float))
    return path


def read_rows(out_dir: Path) -> list[dict]:
    """Every row file under ``<out_dir>/rows``, sorted by model and parameter count.

    Raises:
        DataError: the folder has no row files, or one is not valid JSON.
    """
    files = sorted((Path(out_dir) / "rows").glob("*.json"))
    if not files:
        raise DataError(f"no scale rows in {Path(out_dir) / 'rows'}: run `brainfm-scale` (or the scale.sbatch array) "
                        "with this out_dir first")
    rows = []
    for f in files:
        try:
            rows.append(json.loads(f.read_text()))
        except json.JSONDecodeError as exc:
            raise DataError(f"scale row {f} is not valid JSON ({exc}); delete it and rerun that size") from exc
    return sorted(rows, key=lambda r: (str(r.get("model")), float(r.get("params_total") or 0)))


@contextlib.contextmanager
def _locked(out_dir: Path) -> Iterator[None]:
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    with open(Path(out_dir) / ".merge.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _fmt(value: Any, spec: str = ".2f", missing: str = "n/a") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return missing
    return format(value, spec)


def _count(n: float | None) -> str:
    if n is None:
        return "n/a"
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.3g} {unit}"
    return str(int(n))


def _err(pred: float | None, meas: float | None) -> str:
    if not pred or not meas:
        return "n/a"
    return f"{pred:.3g} / {meas:.3g} ({(pred - meas) / meas:+.1%})"


def to_markdown(rows: list[dict]) -> str:
    """Two Markdown tables: the plan (every size) and the measured runs (the sizes measured)."""
    if not rows:
        return ""
    r0 = rows[0]
    nodes, gpn = r0.get("nodes"), r0.get("gpus_per_node")
    plan = [
        f"Plan: {r0.get('precision')} with micro-batch {r0.get('batch_size')} per GPU; model states per GPU at "
        f"{nodes} node(s) x {gpn} GPUs (1 GPU: one device); fits = model states + batch + step working memory "
        f"<= {r0.get('usable_fraction', 0.9):.0%} of the GPU.",
        "",
        "| model | size | parameters | GFLOP/sample fwd / train | activations / step working (GiB) | "
        + " / ".join(STATE_COLUMNS.values()) + " (GiB) | smallest fit A100 40 GB | smallest fit A100 80 GB | recommended |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        states = " / ".join(_fmt(r.get(c), ".3g") for c in STATE_COLUMNS)
        plan.append(
            f"| {r['model']} | {r['size']} | {_count(r.get('params_total'))} | "
            f"{_fmt(r.get('fwd_gflops'), '.3g')} / {_fmt(r.get('train_gflops'), '.3g')} | "
            f"{_fmt(r.get('act_gib'), '.3g')} / {_fmt(r.get('step_gib'), '.3g')} | {states} | "
            f"{r.get('fit_a100_40g') or 'none'} | {r.get('fit_a100_80g') or 'none'} | {r.get('recommended') or 'none'} |")
    stages = ["", "Parameters (total / trainable) and per stage:", "",
              "| model | size | total | trainable | per stage |", "|---|---|---|---|---|"]
    for r in rows:
        per = "; ".join(f"{k} {_count(float(v))}" for k, _, v in
                        (item.partition("=") for item in str(r.get("params_per_stage") or "").split("; ") if item))
        stages.append(f"| {r['model']} | {r['size']} | {r.get('params_total', 0):,} | {r.get('params_trainable', 0):,} | {per} |")
    measured = [r for r in rows if r.get("step_s")]
    out = "\n".join(plan) + "\n" + "\n".join(stages) + "\n"
    if measured:
        lines = [
            "",
            "Measured (median step after warm-up; peak = memory of one step, predicted / measured (error)):",
            "",
            "| model | size | device | trainer | ranks x batch | precision | step (s) | samples/s | peak (GiB) | "
            "step working (GiB) | MFU |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in measured:
            mfu = "n/a" if r.get("mfu") is None else f"{r['mfu']:.1%}"
            lines.append(
                f"| {r['model']} | {r['size']} | {r.get('measured_device')} | {r.get('measured_trainer')} | "
                f"{r.get('world_size')} x {r.get('measured_batch_size')} | {r.get('measured_precision')} | "
                f"{_fmt(r.get('step_s'), '.3g')} | {_fmt(r.get('samples_per_s'), '.3g')} | "
                f"{_err(r.get('predicted_peak_gib'), r.get('measured_peak_gib'))} | "
                f"{_err(r.get('predicted_step_gib'), r.get('measured_step_gib'))} | {mfu} |")
        out += "\n".join(lines) + "\n"
    skipped = [r for r in rows if not r.get("step_s") and r.get("not_measured")]
    if skipped:
        out += "\nNot measured: " + "; ".join(f"{r['model']} {r['size']} ({r['not_measured']})" for r in skipped) + "\n"
    return out


def write_table(rows: list[dict], out_dir: Path, plot: bool = True) -> dict[str, Path]:
    """Write ``scale.csv``, ``scale.md`` and (``plot``) ``scale.png`` into ``out_dir``, atomically."""
    import pandas as pd

    out_dir = Path(out_dir)
    frame = pd.DataFrame(rows)
    paths = {"csv": out_dir / "scale.csv", "md": out_dir / "scale.md"}
    atomic_write_text(paths["csv"], frame.to_csv(index=False))
    atomic_write_text(paths["md"], to_markdown(rows))
    if plot:
        paths["png"] = plot_scale(frame, out_dir / "scale.png")
    return paths


def merge(out_dir: Path, plot: bool = True) -> dict[str, Path]:
    """Rebuild the table (and the plot) from every row file in ``out_dir`` (see the module doc)."""
    with _locked(Path(out_dir)):
        return write_table(read_rows(Path(out_dir)), Path(out_dir), plot)
