"""Strategies and requeue safety, each run as the user runs it (``brainfm-train`` in a subprocess):

- a run killed with ``kill -9`` and restarted (``ckpt_path=last``) ends with the same weights and
  loss as the uninterrupted run;
- 2-rank DDP on CPU (gloo) reaches the same loss as 1 rank with the doubled batch;
- DeepSpeed ZeRO-2 and ZeRO-3 (CPU test vehicle, brainfm.strategies.DeepSpeedStrategy) and FSDP2
  train, save ``last.ckpt``, resume from it and reach the DDP run's loss; the ZeRO checkpoints are
  consolidated into one fp32 file that loads without DeepSpeed.

The objective is deterministic (7-way subject classification, dropout 0) so that different
strategies must agree up to the order of floating-point reductions. Tolerances: final evaluation
loss within 1e-4 relative and weights within 1e-4 absolute after 20 AdamW steps at lr 1e-3.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import CPU, subprocess_env, train_command, train_subprocess

from brainfm.config import repo_root

ROOT = repo_root()
pytestmark = pytest.mark.skipif(os.name != "posix", reason="multi-process tests need POSIX")
STEPS = 20


def _weights(path: Path) -> dict[str, torch.Tensor]:
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    return {k: v.float() for k, v in ckpt["state_dict"].items()}


def _eval_loss(path: Path, hcp_h5: Path) -> float:
    """The supervised loss of a checkpoint on fixed windows of the embedded data."""
    from brainfm.data.stores.roi import ROIStore
    from brainfm.runs import build_task_from_checkpoint, load_checkpoint

    task = build_task_from_checkpoint(load_checkpoint(path)).eval()
    store = ROIStore(hcp_h5)
    x = torch.stack([torch.as_tensor(store.read(i, 600, 640), dtype=torch.float32) for i in range(len(store.lengths))])
    x = (x - x.mean(1, keepdim=True)) / x.std(1, keepdim=True)
    batch = {"bold": x, "t": torch.arange(40, dtype=torch.float32).expand(len(x), 40) * store.tr,
             "subject": torch.arange(len(x))}
    with torch.no_grad():
        return float(task.compute_losses(batch)["loss"])


def _assert_same(a: Path, b: Path, hcp_h5: Path) -> None:
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    worst = max((wa[k] - wb[k]).abs().max().item() for k in wa)
    assert worst < 1e-4, f"weights differ by up to {worst:.2e}"
    la, lb = _eval_loss(a, hcp_h5), _eval_loss(b, hcp_h5)
    assert lb == pytest.approx(la, rel=1e-4)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, hcp_h5) -> dict[str, Path]:
    """Uninterrupted runs: 1 rank with batch 16, and 2-rank DDP with batch 8 per rank."""
    tmp = tmp_path_factory.mktemp("reference")
    one, _ = train_subprocess(tmp, "one", hcp_h5, "trainer=cpu", f"trainer.max_steps={STEPS}", "data.batch_size=16")
    ddp, _ = train_subprocess(tmp, "ddp", hcp_h5, "trainer=ddp_cpu", "trainer.devices=2", f"trainer.max_steps={STEPS}",
                              "data.batch_size=8")
    return {"one": one / "checkpoints" / "last.ckpt", "ddp": ddp / "checkpoints" / "last.ckpt"}


def test_two_rank_ddp_matches_one_rank_with_the_doubled_batch(reference, hcp_h5):
    assert torch.load(reference["ddp"], weights_only=True)["global_step"] == STEPS
    _assert_same(reference["one"], reference["ddp"], hcp_h5)
    # and the runs really trained: the weights moved well beyond the tolerance
    from brainfm.runs import build_task_from_checkpoint, load_checkpoint

    init = build_task_from_checkpoint(load_checkpoint(reference["one"]), weights=False).state_dict()
    trained = _weights(reference["one"])
    assert max((trained[k] - init[k].float()).abs().max().item() for k in trained) > 1e-2


def test_run_killed_with_sigkill_resumes_to_the_same_loss(reference, hcp_h5, tmp_path):
    """kill -9 after the first periodic last.ckpt; the restarted run (ckpt_path=last) must end where
    the uninterrupted 1-rank run ended."""
    args = train_command(tmp_path, "killed", hcp_h5, "trainer=cpu", f"trainer.max_steps={STEPS}", "data.batch_size=16",
                         "trainer.val_check_interval=5")
    last = tmp_path / "gpt" / "killed" / "checkpoints" / "last.ckpt"
    proc = subprocess.Popen(args, env=subprocess_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=ROOT)
    deadline = time.time() + 300
    while not last.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    saved = torch.load(last, weights_only=True)["global_step"]
    assert 0 < saved < STEPS
    train_subprocess(tmp_path, "killed", hcp_h5, "trainer=cpu", f"trainer.max_steps={STEPS}", "data.batch_size=16",
                     "trainer.val_check_interval=5", "ckpt_path=last")
    assert torch.load(last, weights_only=True)["global_step"] == STEPS
    _assert_same(reference["one"], last, hcp_h5)


# -- what is global: negatives, batch statistics, coding rate -------------------------------------------------------------
GLOBAL = {  # objective: overrides (no dropout, no random augmentation or masking: the streams differ per rank)
    "contrastive": ["experiment=contrastive", "model.d_model=32", "model.depth=1", "model.dropout=0", "model.attn_dropout=0",
                    "data.window.length=60", "data.window.min_length=30"],
    "r2t_roi": ["data=r2t_roi", "task=r2t", "model=temporal_mlp", "model.dropout=0", "model.d_model=32",
                "task.modality_dropout=0", "task.noise_std=0",
                "task.temporal_crop_min_ratio=1.0", "task.embed_dim=32", "data.n_rois=12", "data.atlas=toy",
                "data.window.length=40", "data.pairs_per_subject=8"],
    "simdino": ["experiment=semantoks", "model.conv_channels=16", "model.long_conv_channels=16", "model.depth=1",
                "model.n_heads=2", "task.head.hidden_dim=64", "task.head.bottleneck_dim=16", "task.masking.frequency=0",
                "task.augment=null", "data.window.length=60", "data.window.min_length=30"],
}


def _train_loss(run: Path, step: int) -> float:
    import csv

    rows = [r for r in csv.DictReader(open(run / "csv" / "metrics.csv")) if r.get("train/loss")]
    return float(next(r["train/loss"] for r in rows if int(r["step"]) == step))


@pytest.mark.parametrize("objective", sorted(GLOBAL))
def test_two_ranks_equal_one_rank_with_the_doubled_batch_for_objectives_across_samples(objective, hcp_h5, tmp_path):
    """NT-Xent (contrastive, R2T) takes its negatives from the global batch, BatchNorm in heads its
    statistics, SimDINO its coding rate: 2 gloo ranks x batch 8 = 1 rank x batch 16 after 20 steps
    (weights within 1e-4, the logged training loss within 1e-4 relative)."""
    extra = list(GLOBAL[objective])
    if objective == "r2t_roi":
        from fixtures_r2t import write_roi_pairs

        rest, task = write_roi_pairs(tmp_path / "rest.h5", n_subjects=8, task_path=tmp_path / "task.h5")
        extra += [f"data.path={rest}", f"data.task_path={task}"]
    else:
        extra += [f"data.path={hcp_h5}"]
    common = [*extra, f"paths.output_dir={tmp_path}", f"paths.split_dir={tmp_path}/splits", "experiment_name=g",
              f"trainer.max_steps={STEPS}", "trainer.val_check_interval=10", "trainer.limit_val_batches=1",
              "trainer.log_every_n_steps=1", "trainer.enable_model_summary=false", "logger=csv",
              "callbacks.progress_bar=null", "data.num_workers=0"]
    runs = {}
    for name, setting in (("one", ["trainer=cpu", "data.batch_size=16"]),
                          ("two", ["trainer=ddp_cpu", "trainer.devices=2", "data.batch_size=8"])):
        out = subprocess.run([sys.executable, "-m", "brainfm.cli.train", *common, *setting, f"run_name={name}"],
                             env=subprocess_env(), capture_output=True, text=True, timeout=900, cwd=ROOT)
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-5000:]
        runs[name] = tmp_path / "g" / name
    wa, wb = (_weights(runs[k] / "checkpoints" / "last.ckpt") for k in ("one", "two"))
    diffs = {k: (wa[k] - wb[k]).abs().max().item() for k in wa}
    # the projection head's BatchNorm removes the batch mean, so the bias before it and the encoder's final
    # LayerNorm bias (a constant shift of the pooled states) have no gradient in exact arithmetic: AdamW turns
    # their float32 noise into steps of ~lr, different in every run. They are excluded; nothing else is.
    gauge = {"projection.0.bias", "projection.1.running_mean", "model.encoder.norm.bias"} if objective == "contrastive" else set()
    worst = max(v for k, v in diffs.items() if k not in gauge)
    assert worst < 1e-4, f"weights differ by up to {worst:.2e}: {sorted(diffs, key=diffs.get)[-3:]}"
    first, last = _train_loss(runs["one"], 1), _train_loss(runs["one"], STEPS)
    assert _train_loss(runs["two"], STEPS) == pytest.approx(last, rel=1e-4)
    assert abs(first - last) > 1e-3  # it trained


def _val_row(run: Path) -> dict[str, float]:
    import csv

    rows = [r for r in csv.DictReader(open(run / "csv" / "metrics.csv")) if r.get("val/n_windows") or r.get("val/loss")]
    return {k: float(v) for k, v in rows[-1].items() if k.startswith("val/") and v}


@pytest.mark.parametrize("kind", ["multiclass", "regression"])
def test_subject_metrics_are_the_same_on_one_and_two_ranks_and_each_rank_validates_its_share(kind, hcp_h5, tmp_path):
    """Validation windows are partitioned over the ranks and the outputs gathered before the subject
    metrics (acc, balanced acc, AUROC; MAE, Pearson): 2 ranks report 1 rank's numbers, from as many
    windows (each rank evaluating everything would double val/n_windows)."""
    extra = ["trainer.limit_val_batches=1.0", "data.eval_batch_size=16", "trainer.max_steps=10",
             "trainer.val_check_interval=10"]
    if kind == "regression":
        from brainfm.data.stores.roi import ROIStore

        labels = tmp_path / "labels.csv"
        subjects = sorted(set(ROIStore(hcp_h5).subject_ids))
        labels.write_text("subject,score\n" + "".join(f"{s},{20 + 3 * i}\n" for i, s in enumerate(subjects)))
        extra += ["task.kind=regression", "task.target=score", f"+data.labels.file={labels}",
                  "+data.labels.id_column=subject", "+data.labels.columns={score: score}", "task.loss=l1"]
    metrics = {}
    for name, setting in (("one", ["trainer=cpu", "data.batch_size=16"]),
                          ("two", ["trainer=ddp_cpu", "trainer.devices=2", "data.batch_size=8"])):
        run, _ = train_subprocess(tmp_path, f"{kind}-{name}", hcp_h5, *setting, *extra)
        metrics[name] = _val_row(run)
    one, two = metrics["one"], metrics["two"]
    keys = ["val/acc", "val/balanced_acc", "val/auroc"] if kind == "multiclass" else ["val/mae", "val/pearson_r"]
    assert set(keys) <= set(one) and one["val/n_windows"] == two["val/n_windows"] == 7 * 15  # 600 TRs / 40 each
    for k in [*keys, "val/loss"]:
        assert two[k] == pytest.approx(one[k], rel=1e-4, abs=1e-6), k


def test_contrastive_validation_loss_is_the_same_on_one_and_two_ranks(hcp_h5, tmp_path):
    """experiment=demo: 1 rank x 16 and 2 gloo ranks x 8 print and log the same val/loss (and same-run top-1).
    The validation windows are partitioned over the ranks (rank r: windows r, r + 2, ...); NT-Xent is taken over
    fixed groups (data.eval_batch_size = 8 consecutive windows: 5 groups of the 35) of every rank's gathered
    projections, not over each rank's batch (which gave 0.916 instead of 1.361 after 50 steps)."""
    common = ["experiment=demo", f"data.path={hcp_h5}", f"paths.output_dir={tmp_path}", f"paths.split_dir={tmp_path}/splits",
              "trainer.max_steps=4", "trainer.val_check_interval=4", "data.eval_batch_size=8", "logger=csv",
              "callbacks.progress_bar=null", "trainer.enable_model_summary=false"]
    printed, logged = {}, {}
    for name, setting in (("one", ["trainer=cpu", "data.batch_size=16"]),
                          ("two", ["trainer=ddp_cpu", "trainer.devices=2", "data.batch_size=8"])):
        out = subprocess.run([sys.executable, "-m", "brainfm.cli.train", *common, *setting, f"run_name={name}"],
                             env=subprocess_env(), capture_output=True, text=True, timeout=900, cwd=ROOT)
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-5000:]
        printed[name] = re.search(r"finished at step 4: .*val/loss=([\d.]+)", out.stdout)[1]
        logged[name] = _val_row(tmp_path / "demo" / name)
    assert printed["one"] == printed["two"]
    assert logged["one"]["val/loss"] > 0.1  # not a degenerate 0
    for k in ("val/loss", "val/nt_xent", "val/same_run_top1"):
        assert logged["two"][k] == pytest.approx(logged["one"][k], rel=1e-4), k


def test_eval_batches_partition_the_windows_over_the_ranks(monkeypatch):
    from brainfm.data import windows

    seen = []
    for rank in range(3):
        monkeypatch.setattr(windows, "dist_rank_world", lambda r=rank: (r, 3))
        sampler = windows.WindowBatchSampler(17, 4, 10, shuffle=False, drop_last=False)
        batches = [[i for i, _ in b] for b in sampler]
        assert len(batches) == len(sampler)
        seen += [i for b in batches for i in b]
    assert sorted(seen) == list(range(17))  # every window exactly once, no padding


def test_demo_preset_runs_on_two_cpu_ranks(hcp_h5, tmp_path):
    out = subprocess.run([sys.executable, "-m", "brainfm.cli.train", "experiment=demo", "trainer=ddp_cpu",
                          f"data.path={hcp_h5}", f"paths.output_dir={tmp_path}", f"paths.split_dir={tmp_path}/splits",
                          "trainer.max_steps=3", "trainer.val_check_interval=3", "trainer.limit_val_batches=1",
                          "logger=csv", "run_name=demo2"], env=subprocess_env(), capture_output=True, text=True,
                         timeout=900, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-5000:]
    assert torch.load(tmp_path / "demo" / "demo2" / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 3


@pytest.mark.parametrize("strategy", ["deepspeed_stage_2", "deepspeed_stage_3", "fsdp"])
def test_sharded_strategy_saves_resumes_and_matches_ddp(strategy, reference, hcp_h5, tmp_path):
    """A 20-step run crashes after its step-10 last.ckpt, resumes from it and ends where DDP ended;
    the sharded checkpoint directories (DeepSpeed, FSDP2/DCP) are consolidated into one file."""
    common = [f"trainer={strategy}", *CPU, "data.batch_size=8", f"trainer.max_steps={STEPS}"]
    run, _ = train_subprocess(tmp_path, strategy, hcp_h5, *common, "+callbacks.crash._target_=helpers.CrashAtStep",
                              f"+callbacks.crash.step={STEPS // 2}", crash=True)
    last = run / "checkpoints" / "last.ckpt"
    train_subprocess(tmp_path, strategy, hcp_h5, *common, "ckpt_path=last")
    assert last.is_dir()  # DeepSpeed, or FSDP2 through torch.distributed.checkpoint: a directory, sharded per rank
    from brainfm.errors import CheckpointError
    from brainfm.runs import consolidate, load_checkpoint

    with pytest.raises(CheckpointError, match="consolidate"):
        load_checkpoint(last)
    single = consolidate(last, tmp_path / "consolidated.ckpt")
    assert not list(tmp_path.glob(".consolidated.ckpt.tmp*"))
    ckpt = torch.load(single, map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == STEPS and ckpt["hyper_parameters"]["seed"] == 0
    _assert_same(reference["ddp"], single, hcp_h5)
