"""Tracking: MLflow (a requeued run continues its MLflow run), the Neptune notice, throughput."""

from __future__ import annotations

import csv

import pytest

from brainfm.cli.train import run
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
    assert sorted(m.step for m in history) == list(range(6))
    assert client.get_run(run_id).data.params["optimizer/lr"] == "0.0005"

    run(cfg_for(*SMALL, "logger=mlflow", "trainer.max_steps=10", "ckpt_path=last"))
    assert (run_dir / "mlflow_run_id").read_text().strip() == run_id
    assert len(client.search_runs([client.get_experiment_by_name("gpt").experiment_id])) == 1
    steps = sorted(m.step for m in client.get_metric_history(run_id, "train/loss"))
    assert steps[-1] == 9 and set(range(10)) <= set(steps)


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
