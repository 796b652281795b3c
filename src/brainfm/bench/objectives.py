"""Training steps/s of each objective at its small CPU size on the embedded data."""

from __future__ import annotations

import tempfile
import time

from lightning.pytorch.callbacks import Callback

from brainfm.config import compose
from brainfm.training import build

EXPERIMENTS = ("gpt", "seq_bert", "net_bert", "lstm_ae", "contrastive")


class StepTimer(Callback):
    def __init__(self, skip: int = 5) -> None:
        self.skip, self.times = skip, []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.times.append(time.perf_counter())


def measure(experiment: str, steps: int = 40, length: int = 60, batch_size: int = 16) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        cfg = compose("train", [
            f"experiment={experiment}", f"paths.output_dir={tmp}", "logger=none", "callbacks=none",
            "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false",
            f"trainer.max_steps={steps}", "trainer.limit_val_batches=0", "+trainer.enable_checkpointing=false",
            f"data.window.length={length}", "data.window.min_length=null", f"data.batch_size={batch_size}",
        ])
        dm, task, trainer = build(cfg)
        timer = StepTimer()
        trainer.callbacks.append(timer)
        trainer.fit(task, datamodule=dm)
    t = timer.times[timer.skip:]
    per_step = (t[-1] - t[0]) / (len(t) - 1)
    n_params = sum(p.numel() for p in task.parameters())
    return {"experiment": experiment, "params": n_params, "steps_per_s": 1.0 / per_step,
            "windows_per_s": batch_size / per_step, "length": length, "batch": batch_size}


def main(steps: int = 40) -> list[dict]:
    from rich.console import Console
    from rich.table import Table

    rows = [measure(e, steps) for e in EXPERIMENTS]
    table = Table(title=f"Training throughput, small CPU sizes, windows of {rows[0]['length']} TRs, batch {rows[0]['batch']}")
    for col in ("experiment", "parameters", "steps/s", "windows/s"):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(r["experiment"], f"{r['params'] / 1e6:.2f} M", f"{r['steps_per_s']:.1f}", f"{r['windows_per_s']:.0f}")
    Console().print(table)
    return rows
