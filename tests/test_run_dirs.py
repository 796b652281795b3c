"""Run directories as a user meets them (issue 20, items 1, 2 and 8): the jobs of a multirun never share
one, a run directory with checkpoints is never trained over from scratch (refused with the fixes as typed;
``ckpt_path=auto`` resumes, ``overwrite=true`` replaces), Ctrl-C saves ``last.ckpt`` and a summary and
prints the command that resumes, and best-k pruning survives a resume with every best file written
under a temporary name first. ``brainfm-train`` runs in a subprocess where the exit status or the
terminal output is the point, in this process (:func:`helpers.train_in`) elsewhere."""

from __future__ import annotations

import csv
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import QUIET, SimulatedCrash, logged_steps, subprocess_env, train_in
from omegaconf import OmegaConf

from brainfm.config import compose, repo_root

pytestmark = pytest.mark.skipif(os.name != "posix", reason="signals and process groups need POSIX")
ROOT = repo_root()
DEMO = ["experiment=demo", *QUIET, "trainer.log_every_n_steps=1"]


def _cli(tmp: Path, hcp_h5: Path, *args: str, **popen) -> list[str]:
    """The ``brainfm-train`` command line with the run's outputs and splits under ``tmp``."""
    exe = Path(sys.executable).parent / "brainfm-train"
    head = [str(exe)] if exe.exists() else [sys.executable, "-m", "brainfm.cli.train"]
    return [*head, *args, f"data.path={hcp_h5}", f"paths.output_dir={tmp}/outputs", f"paths.split_dir={tmp}/splits"]


def _run(cmd: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, env=subprocess_env(), capture_output=True, text=True, timeout=600, cwd=ROOT)


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
        assert (run_dir / "train.log").is_file() and logged_steps(run_dir) == [1, 2]
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
    assert logged_steps(run_dir) == [1, 2, 3, 4]
    assert _best(run_dir) == ["best-step4.ckpt"] and not (run_dir / "eval").exists()
    assert json.loads((run_dir / "summary.json").read_text())["global_step"] == 4
    assert OmegaConf.load(run_dir / "config.yaml").seed == 1
    assert not list(run_dir.glob(".replaced-*"))


def test_ctrl_c_saves_last_ckpt_and_a_summary_and_prints_the_command_that_resumes(tmp_path, hcp_h5):
    marker = tmp_path / "paused"
    args = [*DEMO, "run_name=tty", "trainer.max_steps=8", "trainer.val_check_interval=4",
            "+callbacks.pause._target_=helpers.PauseAtStep", "+callbacks.pause.step=2", f"+callbacks.pause.marker={marker}",
            "data.num_workers=1"]  # a DataLoader worker gets Ctrl-C too and must not die of it
    # its own process group, as a terminal's foreground job: Ctrl-C reaches every process of it
    proc = subprocess.Popen(_cli(tmp_path, hcp_h5, *args), env=subprocess_env(), cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    deadline = time.monotonic() + 300
    while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert marker.exists(), proc.communicate()[1][-3000:] if proc.poll() is not None else "no step 2 in 300 s"
    os.killpg(proc.pid, signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 130, stdout[-2000:] + stderr[-3000:]
    assert "graceful shutdown" not in stdout + stderr and "Traceback" not in stderr, stderr[-3000:]
    run_dir = tmp_path / "outputs" / "demo" / "tty"
    assert torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 3
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["interrupted"] is True and summary["global_step"] == 3
    assert "interrupted (Ctrl-C) at step 3" in stdout
    command = stdout.split("resume with: ", 1)[1].splitlines()[0]
    assert summary["resume_command"] == command
    assert command.startswith("brainfm-train ") and command.endswith(" ckpt_path=auto") and "run_name=tty" in command
    # the printed command's overrides, as the shell splits them, resume the run to its end: every step logged once
    from brainfm import training as train

    metrics = train.run(compose("train", shlex.split(command)[1:]))
    assert torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 8
    assert logged_steps(run_dir) == list(range(1, 9)) and metrics["val/loss"] > 0
    assert json.loads((run_dir / "summary.json").read_text())["interrupted"] is False
    assert len(_best(run_dir)) == 1


def test_best_k_is_kept_across_a_resume_and_every_best_file_is_written_under_a_temporary_name(tmp_path, hcp_h5,
                                                                                             monkeypatch):
    """last.ckpt of a validation step is saved before that validation: the best file it writes is unknown to
    the restored state (Lightning then kept it beside the next one, with save_top_k=1)."""
    from lightning.pytorch import Trainer

    saved = []
    save = Trainer.save_checkpoint
    monkeypatch.setattr(Trainer, "save_checkpoint", lambda self, path, *a, **k: (saved.append(Path(path)),
                                                                                 save(self, path, *a, **k))[1])
    common = [f"data.path={hcp_h5}", *DEMO, "run_name=r", "trainer.max_steps=8", "trainer.val_check_interval=2"]
    with pytest.raises(SimulatedCrash):
        train_in(tmp_path, *common, "+callbacks.crash._target_=helpers.CrashAtStep", "+callbacks.crash.step=5")
    run_dir = tmp_path / "outputs" / "demo" / "r"
    assert _best(run_dir) == ["best-step4.ckpt"]
    state = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    assert state["global_step"] == 4  # ... saved before step 4's validation wrote best-step4
    assert not any("best-step4" in p for s in state["callbacks"].values() for p in s.get("best_k_models", {}))
    train_in(tmp_path, *common, "ckpt_path=auto")
    assert len(_best(run_dir)) == 1, _best(run_dir)
    best = torch.load(run_dir / "checkpoints" / _best(run_dir)[0], weights_only=True)
    with open(run_dir / "csv" / "metrics.csv") as f:
        val = [float(r["val/loss"]) for r in csv.DictReader(f) if r.get("val/loss")]
    assert len(val) == 4 and [c.get("best_model_score") for c in best["callbacks"].values()
                              if "best_model_score" in c][0] == pytest.approx(min(val), rel=1e-5)
    # every checkpoint went to a hidden temporary name first, then was renamed into place
    assert saved and all(p.name.startswith(".") and ".tmp-" in p.name for p in saved), saved
    assert not [p for p in (run_dir / "checkpoints").iterdir() if p.name.startswith(".")]
