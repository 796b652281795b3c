"""The real Perlmutter templates on a real one-node SLURM cluster (slurm/local/up.sh), with CPU
DDP over gloo: pretrain.sbatch with 2 ranks, sweep.sbatch with 2 array tasks, and a job sent the
preemption signal mid-training that is requeued and resumes with no step lost or repeated."""

from __future__ import annotations

import csv
import os
import re
import subprocess
import time
from pathlib import Path

import pytest
import torch

from brainfm.config import repo_root

ROOT = repo_root()
pytestmark = pytest.mark.skipif(os.name != "posix", reason="SLURM tests need Linux")


def _env(tmp_path: Path) -> dict:
    """Perlmutter settings switched off for the one-node CPU cluster (SBATCH_* override #SBATCH)."""
    return {**os.environ, "SBATCH_CONSTRAINT": "", "SBATCH_QOS": "", "SBATCH_ACCOUNT": "", "SBATCH_GPUS_PER_NODE": "0",
            "BRAINFM_LOCAL": "1", "BRAINFM_ROOT": str(ROOT), "BRAINFM_SCRATCH": str(tmp_path / "scratch"),
            "BRAINFM_SPLIT_DIR": str(tmp_path / "splits")}


SBATCH_LOCAL = ["--ntasks-per-node=2", "-c", "1", "--mem=6G", "-t", "00:15:00"]


def _overrides(hcp_h5, steps: int, every: int) -> list[str]:
    return ["experiment=gpt", "trainer=ddp_cpu", f"data.path={hcp_h5}", "model.d_model=32", "data.window.length=40",
            "data.window.min_length=null", f"trainer.max_steps={steps}", f"trainer.val_check_interval={every}",
            "trainer.log_every_n_steps=1", "logger=csv"]


def _steps(run_dir: Path) -> list[int]:
    with open(run_dir / "csv" / "metrics.csv") as f:
        return [int(r["step"]) for r in csv.DictReader(f) if r.get("train/loss")]


def _submit(args: list[str], env: dict, tmp_path: Path, wait: bool = True) -> str:
    cmd = ["sbatch", "--parsable", *(["--wait"] if wait else []), "-o", str(tmp_path / "%x-%j.out"), *args]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900, cwd=ROOT)
    logs = "".join(p.read_text()[-3000:] for p in tmp_path.glob("*.out"))
    assert out.returncode == 0, out.stdout + out.stderr + logs
    return out.stdout.strip().split(";")[0]


def test_pretrain_sbatch_runs_two_rank_ddp(slurm, hcp_h5, tmp_path):
    env = _env(tmp_path)
    job = _submit([*SBATCH_LOCAL, "slurm/perlmutter/pretrain.sbatch", *_overrides(hcp_h5, 20, 10)], env, tmp_path)
    run_dir = tmp_path / "scratch" / "outputs" / "gpt" / job  # run name = the SLURM job id
    assert _steps(run_dir) == list(range(1, 21))
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 20
    log = next(tmp_path.glob(f"*-{job}.out")).read_text()
    assert "MEMBER: 2/2" in log  # two ranks, found through SLURMEnvironment


def test_sweep_sbatch_runs_one_directory_per_line(slurm, hcp_h5, tmp_path):
    env = _env(tmp_path)
    sweep = tmp_path / "sweep.txt"
    sweep.write_text("# learning rates\ntask.optimizer.lr=1e-3\n\ntask.optimizer.lr=3e-4 model.depth=1\n")
    job = _submit([*SBATCH_LOCAL, "--array=0-1", "slurm/perlmutter/sweep.sbatch", str(sweep), *_overrides(hcp_h5, 10, 10)],
                  env, tmp_path)
    from omegaconf import OmegaConf

    for task, (lr, depth) in enumerate([(1e-3, 2), (3e-4, 1)]):
        run_dir = tmp_path / "scratch" / "outputs" / "gpt" / f"{job}_{task}"
        cfg = OmegaConf.load(run_dir / "config.yaml")
        assert cfg.task.optimizer.lr == pytest.approx(lr) and cfg.model.depth == depth
        assert _steps(run_dir) == list(range(1, 11))


@pytest.mark.slow  # flaky on a loaded 2-core CI machine: the requeued job was sometimes not started again within 10 min
def test_preempted_job_is_requeued_and_resumes_without_lost_or_repeated_steps(slurm, hcp_h5, tmp_path):
    env = _env(tmp_path)
    steps = 200
    job = _submit([*SBATCH_LOCAL, "slurm/perlmutter/pretrain.sbatch", *_overrides(hcp_h5, steps, 50)], env, tmp_path,
                  wait=False)
    run_dir = tmp_path / "scratch" / "outputs" / "gpt" / job
    deadline = time.time() + 300
    while time.time() < deadline:  # let it train past the first periodic checkpoint
        metrics = run_dir / "csv" / "metrics.csv"
        if metrics.is_file() and len(_steps(run_dir)) > 60:
            break
        time.sleep(0.5)
    else:
        pytest.fail("the job did not start training in time")
    subprocess.run(["scancel", "--signal=USR1", job], check=True)  # what SLURM sends before the time limit
    deadline = time.time() + 600
    hurried = False
    while time.time() < deadline:
        # scontrol (not squeue, which can briefly list nothing while a job is requeued) says when the
        # job has run again and ended
        show = subprocess.run(["scontrol", "-o", "show", "job", job], capture_output=True, text=True).stdout
        state = re.search(r"JobState=(\S+)", show)
        restarts = re.search(r"Restarts=(\d+)", show)
        state = state.group(1) if state else ""
        if state == "PENDING" and not hurried:
            # slurmctld holds a requeued batch job for 120 s (BeginTime); an admin's nudge skips the wait
            hurried = subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"]).returncode == 0
        # a terminal state with Restarts >= 1 can be seen for a moment while the first run ends and before the
        # requeue makes the job PENDING: it counts only once the second run has started (its banner is in the log)
        logs = list(tmp_path.glob(f"*-{job}.out"))
        rerun = bool(logs) and f"job {job} restart 1" in logs[0].read_text()
        if state in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY") and restarts \
                and int(restarts.group(1)) >= 1 and rerun:
            break
        time.sleep(0.5)
    else:
        pytest.fail("the requeued job did not run again and finish")
    log = next(tmp_path.glob(f"*-{job}.out")).read_text()
    assert "preemption signal: saved" in log and f"requeued SLURM job {job}" in log
    assert f"job {job} restart 1" in log  # the same job ran again
    logged = _steps(run_dir)
    assert logged == list(range(1, steps + 1))  # every optimizer step exactly once
    assert torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == steps


def test_cluster_perlmutter_submits_a_multirun_through_the_submitit_launcher(slurm, hcp_h5, tmp_path):
    """`brainfm-train -m cluster=perlmutter ...`: two SLURM jobs (an array), two run directories."""
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    env = _env(tmp_path)
    local = ["hydra.launcher.constraint=null", "hydra.launcher.qos=null", "hydra.launcher.gpus_per_node=0",
             "hydra.launcher.tasks_per_node=1", "hydra.launcher.cpus_per_task=1", "hydra.launcher.mem_gb=3",
             "hydra.launcher.timeout_min=15", "trainer=cpu"]
    args = [*_overrides(hcp_h5, 6, 3), "trainer=cpu", "task.optimizer.lr=1e-3,3e-4", f"paths.split_dir={tmp_path}/splits"]
    args = [a for a in args if a != "trainer=ddp_cpu"]
    out = subprocess.run([str(ROOT / ".venv/bin/python") if (ROOT / ".venv/bin/python").exists() else "python",
                          "-m", "brainfm.cli.train", "-m", "cluster=perlmutter", *local, *args],
                         env=env, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    # every job its own run directory: <array job>_<task>/<job number> (paths.run_dir under a multirun)
    runs = sorted(p.parent for p in (tmp_path / "scratch" / "outputs" / "gpt").glob("*/*/config.yaml"))
    assert len(runs) == 2 and all("_" in p.parent.name and p.name.isdigit() for p in runs), runs
    assert sorted(p.name for p in runs) == ["0", "1"]
    from omegaconf import OmegaConf

    lrs = sorted(float(OmegaConf.load(p / "config.yaml").task.optimizer.lr) for p in runs)
    assert lrs == [3e-4, 1e-3]
    for p in runs:
        assert _steps(p) == list(range(1, 7))
