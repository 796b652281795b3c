"""Tracking: MLflow (a requeued run continues its MLflow run), the Neptune notice, throughput."""

from __future__ import annotations

import csv

import pytest

from brainfm.training import run
from brainfm.errors import ConfigError

SMALL = ("experiment=gpt", "model.d_model=32", "model.depth=1", "data.window.length=30", "data.window.min_length=null",
         "trainer.val_check_interval=5", "trainer.limit_val_batches=1", "trainer.log_every_n_steps=1", "run_name=t")


def test_mlflow_logs_metrics_and_a_resumed_run_continues_the_same_mlflow_run(cfg_for, tmp_path):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    cfg = cfg_for(*SMALL, "logger=mlflow", "trainer.max_steps=6")
    run(cfg)
    run_dir = tmp_path / "outputs" / "gpt" / "t"
    run_id = (run_dir / "mlflow_run_id").read_text().strip()
    uri = f"sqlite:///{tmp_path}/outputs/mlflow.db"
    client = MlflowClient(uri)
    history = client.get_metric_history(run_id, "train/loss")
    assert sorted(m.step for m in history) == list(range(1, 7))  # optimizer steps completed
    assert client.get_run(run_id).data.params["optimizer/lr"] == "0.0005"

    run(cfg_for(*SMALL, "logger=mlflow", "trainer.max_steps=10", "ckpt_path=last"))
    assert (run_dir / "mlflow_run_id").read_text().strip() == run_id
    assert len(client.search_runs([client.get_experiment_by_name("gpt").experiment_id])) == 1
    steps = sorted(m.step for m in client.get_metric_history(run_id, "train/loss"))
    assert steps[-1] == 10 and set(range(1, 11)) <= set(steps)


def test_neptune_is_refused_with_the_replacements_named(cfg_for):
    with pytest.raises(ConfigError, match=r"2026-03-05.*logger=mlflow.*logger=tensorboard"):
        run(cfg_for(*SMALL, "logger=neptune", "trainer.max_steps=2"))


def test_throughput_is_logged_in_samples_and_trs_per_second(cfg_for, tmp_path):
    run(cfg_for(*SMALL, "trainer.max_steps=30", "callbacks.throughput.window_size=5", "data.batch_size=8"))
    with open(tmp_path / "outputs" / "gpt" / "t" / "csv" / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("throughput/samples_per_sec")]
    assert rows, "no throughput rows"
    for r in rows:  # 30-TR windows, batch 8: TRs/s = 30 x samples/s = 240 x batches/s
        samples, trs = float(r["throughput/samples_per_sec"]), float(r["throughput/trs_per_sec"])
        assert samples > 0 and trs == pytest.approx(30 * samples, rel=1e-6)
        assert samples == pytest.approx(8 * float(r["throughput/batches_per_sec"]), rel=1e-6)
        assert not r.get("throughput/mfu")  # CPU: no MFU


def _csv(run_dir) -> list[dict]:
    with open(run_dir / "csv" / "metrics.csv") as f:
        return list(csv.DictReader(f))


def test_progress_line_carries_its_steps_validation_and_one_step_convention_everywhere(cfg_for, tmp_path, caplog):
    """A log line at a validation step is written after that validation (its val/loss is the CSV's at the same
    step); metrics.csv, the log lines and the checkpoint names all count optimizer steps completed (1..max_steps)."""
    import logging
    import re

    import torch

    caplog.set_level(logging.INFO, logger="brainfm")
    run(cfg_for(*SMALL, "trainer.max_steps=10", "task.optimizer.lr=3e-3",
                "trainer.enable_progress_bar=true"))  # not a terminal here: the bar becomes ProgressLog's lines
    run_dir = tmp_path / "outputs" / "gpt" / "t"
    rows = _csv(run_dir)
    assert [int(r["step"]) for r in rows if r.get("train/loss")] == list(range(1, 11))
    assert [int(r["step"]) for r in rows if r.get("lr-AdamW/pg1")] == list(range(1, 11))
    val = {int(r["step"]): float(r["val/loss"]) for r in rows if r.get("val/loss")}
    assert sorted(val) == [5, 10] and round(val[5], 4) != round(val[10], 4)
    lines = {int(m[1]): m for m in (re.search(r"step (\d+)/10 .*val/loss=([\d.]+)", r.getMessage()) for r in caplog.records)
             if m}
    assert sorted(lines) == [5, 10]
    for step, m in lines.items():
        assert float(m[2]) == pytest.approx(val[step], abs=5e-5), step
    best = min(val, key=val.get)
    assert [p.name for p in (run_dir / "checkpoints").glob("best-step*.ckpt")] == [f"best-step{best}.ckpt"]
    assert torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 10 == max(val)
    assert any(f"at step 10" in r.getMessage() for r in caplog.records if "saved" in r.getMessage())


def test_progress_bar_in_a_terminal_counts_steps_not_epochs(cfg_for, monkeypatch):
    """A step-bounded run (max_epochs=-1) in a terminal: the bar reads ``step N/max_steps``, not ``Epoch 0/-2``."""
    import sys

    import rich

    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)
    try:
        run(cfg_for(*SMALL, "trainer.max_steps=6", "trainer.enable_progress_bar=true",
                    "+callbacks.progress_bar.console_kwargs={force_terminal: true, width: 120, record: true}"))
        shown = rich.get_console().export_text()
    finally:
        rich.reconfigure()
    assert "step 6/6" in shown and "Epoch" not in shown, shown[-2000:]
