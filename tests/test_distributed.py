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
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from brainfm.config import repo_root

ROOT = repo_root()
pytestmark = pytest.mark.skipif(os.name != "posix", reason="multi-process tests need POSIX")
STEPS = 20

MODEL = ["experiment=gpt", "task=supervised", "task.target=subject", "task.kind=multiclass", "task.num_classes=7",
         "task.optimizer.lr=1e-3", "task.scheduler.warmup_fraction=0", "model.d_model=32", "model.depth=1",
         "model.dropout=0", "model.attn_dropout=0", "data.window.length=40", "data.window.min_length=null",
         "trainer.val_check_interval=10", "trainer.limit_val_batches=2", "trainer.log_every_n_steps=1",
         "trainer.enable_model_summary=false", "logger=csv", "callbacks.progress_bar=null"]
CPU = ["trainer.accelerator=cpu", "trainer.precision=32-true", "trainer.devices=2", "trainer.num_nodes=1",
       "+trainer.strategy.process_group_backend=gloo"]


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBATCH_"))}
    path = os.pathsep.join(filter(None, [str(ROOT / "tests"), env.get("PYTHONPATH")]))  # helpers.CrashAtStep
    return {**env, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "PYTHONPATH": path}


def _cmd(tmp: Path, run: str, hcp_h5: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "brainfm.cli.train", *MODEL, f"data.path={hcp_h5}", f"paths.output_dir={tmp}",
            f"paths.split_dir={tmp}/splits", f"run_name={run}", *extra]


def _train(tmp: Path, run: str, hcp_h5: Path, *extra: str, crash: bool = False) -> Path:
    out = subprocess.run(_cmd(tmp, run, hcp_h5, *extra), env=_env(), capture_output=True, text=True, timeout=900,
                         cwd=ROOT)
    if crash:
        assert out.returncode != 0 and "simulated crash" in out.stderr, out.stderr[-5000:]
    else:
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-5000:]
    return tmp / "gpt" / run


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
    one = _train(tmp, "one", hcp_h5, "trainer=cpu", f"trainer.max_steps={STEPS}", "data.batch_size=16")
    ddp = _train(tmp, "ddp", hcp_h5, "trainer=ddp_cpu", "trainer.devices=2", f"trainer.max_steps={STEPS}",
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
    args = _cmd(tmp_path, "killed", hcp_h5, "trainer=cpu", f"trainer.max_steps={STEPS}", "data.batch_size=16",
                "trainer.val_check_interval=5")
    last = tmp_path / "gpt" / "killed" / "checkpoints" / "last.ckpt"
    proc = subprocess.Popen(args, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=ROOT)
    deadline = time.time() + 300
    while not last.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    saved = torch.load(last, weights_only=True)["global_step"]
    assert 0 < saved < STEPS
    _train(tmp_path, "killed", hcp_h5, "trainer=cpu", f"trainer.max_steps={STEPS}", "data.batch_size=16",
           "trainer.val_check_interval=5", "ckpt_path=last")
    assert torch.load(last, weights_only=True)["global_step"] == STEPS
    _assert_same(reference["one"], last, hcp_h5)


@pytest.mark.parametrize("strategy", ["deepspeed_stage_2", "deepspeed_stage_3", "fsdp"])
def test_sharded_strategy_saves_resumes_and_matches_ddp(strategy, reference, hcp_h5, tmp_path):
    """A 20-step run crashes after its step-10 last.ckpt, resumes from it and ends where DDP ended;
    DeepSpeed checkpoints are consolidated into one file."""
    common = [f"trainer={strategy}", *CPU, "data.batch_size=8", f"trainer.max_steps={STEPS}"]
    run = _train(tmp_path, strategy, hcp_h5, *common, "+callbacks.crash._target_=helpers.CrashAtStep",
                 f"+callbacks.crash.step={STEPS // 2}", crash=True)
    last = run / "checkpoints" / "last.ckpt"
    _train(tmp_path, strategy, hcp_h5, *common, "ckpt_path=last")
    if strategy.startswith("deepspeed"):
        assert last.is_dir()  # a DeepSpeed checkpoint directory, sharded per rank
        from brainfm.errors import CheckpointError
        from brainfm.runs import consolidate, load_checkpoint

        with pytest.raises(CheckpointError, match="consolidate"):
            load_checkpoint(last)
        single = consolidate(last, tmp_path / "consolidated.ckpt")
        assert not list(tmp_path.glob(".consolidated.ckpt.tmp*"))
        ckpt = torch.load(single, map_location="cpu", weights_only=True)
        assert ckpt["global_step"] == STEPS and ckpt["hyper_parameters"]["seed"] == 0
        _assert_same(reference["ddp"], single, hcp_h5)
    else:
        assert torch.load(last, weights_only=True)["global_step"] == STEPS
        _assert_same(reference["ddp"], last, hcp_h5)
