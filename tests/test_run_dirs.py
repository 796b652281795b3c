"""Run directories as a user meets them (issue 20, items 1 and 2): the jobs of a multirun never share
one, and a run directory with checkpoints is never trained over from scratch (refused with the fixes as
typed; ``ckpt_path=auto`` resumes, ``overwrite=true`` replaces). ``brainfm-train`` runs in a subprocess
where the exit status or the terminal output is the point, in this process (:func:`helpers.train_in`)
elsewhere."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import QUIET, subprocess_env, train_in
from omegaconf import OmegaConf

from brainfm.config import compose, repo_root

pytestmark = pytest.mark.skipif(os.name != "posix", reason="subprocess runs need POSIX")
ROOT = repo_root()
DEMO = ["experiment=demo", *QUIET, "trainer.log_every_n_steps=1"]


def _cli(tmp: Path, hcp_h5: Path, *args: str, **popen) -> list[str]:
    """The ``brainfm-train`` command line with the run's outputs and splits under ``tmp``."""
    exe = Path(sys.executable).parent / "brainfm-train"
    head = [str(exe)] if exe.exists() else [sys.executable, "-m", "brainfm.cli.train"]
    return [*head, *args, f"data.path={hcp_h5}", f"paths.output_dir={tmp}/outputs", f"paths.split_dir={tmp}/splits"]


def _run(cmd: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, env=subprocess_env(), capture_output=True, text=True, timeout=600, cwd=ROOT)


def _steps(run_dir: Path) -> list[int]:
    with open(run_dir / "csv" / "metrics.csv") as f:
        return [int(r["step"]) for r in csv.DictReader(f) if r.get("train/loss")]


def _best(run_dir: Path) -> list[str]:
    return sorted(p.name for p in (run_dir / "checkpoints").glob("best-*"))


def test_every_job_of_a_multirun_gets_its_own_run_directory(tmp_path, hcp_h5):
    out = _run(_cli(tmp_path, hcp_h5, "-m", *DEMO, "task.optimizer.lr=1e-3,1e-4"))
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    sweep = tmp_path / "outputs" / "demo" / "local"
    lrs = []
    for job in ("0", "1"):  # <run_name>/<job number>, each a complete run with its Hydra log beside it
        run_dir = sweep / job
        assert torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 2
        assert json.loads((run_dir / "summary.json").read_text())["run_dir"] == str(run_dir)
        assert (run_dir / "train.log").is_file() and _steps(run_dir) == [0, 1]
        lrs.append(OmegaConf.load(run_dir / "config.yaml").task.optimizer.lr)
    assert lrs == [1e-3, 1e-4]
    assert "demo/local/0 finished at step 2" in out.stdout and "demo/local/1 finished at step 2" in out.stdout
    # a config composed outside Hydra's app (tests, notebooks) has no job number
    cfg = compose("train", ["experiment=demo", "run_name=x", f"paths.output_dir={tmp_path}"])
    assert cfg.paths.run_dir == f"{tmp_path}/demo/x"


def test_a_run_directory_with_checkpoints_is_refused_resumed_or_replaced_never_trained_over(tmp_path, hcp_h5):
    run_dir, _ = train_in(tmp_path, f"data.path={hcp_h5}", *DEMO, "run_name=tty")
    config = (run_dir / "config.yaml").read_text()
    # the same command again: refused before anything of the earlier run is written, both fixes as typed
    again = _run(_cli(tmp_path, hcp_h5, *DEMO, "run_name=tty", "seed=1"))
    assert again.returncode == 2, again.stdout[-2000:] + again.stderr[-2000:]
    error = again.stderr.strip().splitlines()[-1]
    assert error.startswith(f"brainfm-train: error: {run_dir} holds the checkpoints of an earlier run"), error
    for fix in ("ckpt_path=auto", "run_name=<new name>", "overwrite=true"):
        assert fix in error, (fix, error)
    assert (run_dir / "config.yaml").read_text() == config  # still seed 0
    # ckpt_path=auto: resumed; a finished run ends at once and leaves its directory as it was
    before = {p.name: p.stat().st_mtime_ns for p in (run_dir / "checkpoints").iterdir()}
    summary = (run_dir / "summary.json").read_text()
    _, metrics = train_in(tmp_path, f"data.path={hcp_h5}", *DEMO, "run_name=tty", "ckpt_path=auto")
    assert metrics == json.loads(summary)["metrics"]
    assert {p.name: p.stat().st_mtime_ns for p in (run_dir / "checkpoints").iterdir()} == before
    assert (run_dir / "summary.json").read_text() == summary
    # overwrite=true: the earlier run's checkpoints, summary and metrics are gone, the new run is alone
    (run_dir / "eval").mkdir()
    train_in(tmp_path, f"data.path={hcp_h5}", *DEMO, "run_name=tty", "overwrite=true", "seed=1",
             "trainer.max_steps=4", "trainer.val_check_interval=4")
    assert _steps(run_dir) == [0, 1, 2, 3]
    assert _best(run_dir) == ["best-step4.ckpt"] and not (run_dir / "eval").exists()
    assert json.loads((run_dir / "summary.json").read_text())["global_step"] == 4
    assert OmegaConf.load(run_dir / "config.yaml").seed == 1
    assert not list(run_dir.glob(".replaced-*"))
