"""Checkpoints at scale: FSDP2 saves ``last.ckpt`` as a torch.distributed.checkpoint (DCP) directory of
per-rank shards (nothing gathered on rank 0), also on a wall-clock interval, resumes from it to the
weights of the uninterrupted run, and ``python -m brainfm.runs consolidate`` turns it into one file
that ``brainfm-evaluate`` and :func:`brainfm.runs.load_checkpoint` read.

The runs are real (``brainfm-train`` in a subprocess, 2 gloo ranks on CPU, the tiny deterministic
subject-classification model of tests/test_distributed.py); the rest are file-level checks of the
atomic directory replacement, the resume fallback and the consolidation of plain files.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import helpers
import pytest
import torch
from helpers import subprocess_env, train_command, train_subprocess

from brainfm.config import repo_root

ROOT = repo_root()
pytestmark = pytest.mark.skipif(os.name != "posix", reason="multi-process tests need POSIX")
STEPS, CRASH = 10, 6

# the tiny, deterministic model and the 2-rank CPU overrides shared with tests/test_distributed.py
MODEL, CPU = helpers.MODEL, helpers.CPU
FSDP = ["trainer=fsdp", *CPU, "data.batch_size=8", f"trainer.max_steps={STEPS}"]


def _dcp_weights(directory: Path, tmp: Path) -> dict[str, torch.Tensor]:
    """The model weights of a DCP directory through torch's own converter (independent of brainfm's reader)."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    out = tmp / f"{directory.parent.parent.name}-{directory.name}.pt"
    dcp_to_torch_save(directory, out)
    return torch.load(out, weights_only=True)["state_dict"]


def _assert_sharded(directory: Path, world_size: int = 2) -> dict:
    """``directory`` is a complete DCP checkpoint with one shard per rank; returns its ``meta.pt``,
    which must hold no tensor state (no full state was gathered anywhere)."""
    assert directory.is_dir(), f"{directory} is not a directory"
    names = {p.name for p in directory.iterdir()}
    assert names == {".metadata", "meta.pt", *(f"__{r}_0.distcp" for r in range(world_size))}, names
    meta = torch.load(directory / "meta.pt", weights_only=True)
    assert "state_dict" not in meta and "optimizer_states" not in meta
    assert not any(torch.is_tensor(v) for v in meta.values())
    return meta


@pytest.fixture(scope="module")
def runs(tmp_path_factory, hcp_h5) -> dict:
    """An uninterrupted 1-rank run (batch 16), and a 2-rank FSDP2 run (batch 8 per rank) saving by
    wall-clock only (every_minutes=0.0001, every_n_steps=1000) that crashes after step 6 and is
    resumed with ckpt_path=last."""
    tmp = tmp_path_factory.mktemp("sharded")
    one, _ = train_subprocess(tmp, "one", hcp_h5, "trainer=cpu", "data.batch_size=16", f"trainer.max_steps={STEPS}")
    run, crash_log = train_subprocess(tmp, "fsdp", hcp_h5, *FSDP, "callbacks.resume_checkpoint.every_n_steps=1000",
                                      "callbacks.resume_checkpoint.every_minutes=0.0001",
                                      "+callbacks.crash._target_=helpers.CrashAtStep", f"+callbacks.crash.step={CRASH}",
                                      crash=True)
    last = run / "checkpoints" / "last.ckpt"
    crashed_meta = _assert_sharded(last)
    crashed_names = sorted(p.name for p in (run / "checkpoints").iterdir())
    _, resume_log = train_subprocess(tmp, "fsdp", hcp_h5, *FSDP, "ckpt_path=last")
    return {"tmp": tmp, "one": one / "checkpoints" / "last.ckpt", "run": run, "last": last,
            "crash_log": crash_log, "crashed_meta": crashed_meta, "crashed_names": crashed_names,
            "resume_log": resume_log}


def test_fsdp_saves_a_sharded_last_checkpoint_on_a_wall_clock_interval_and_resumes_to_the_uninterrupted_weights(runs):
    # the crashed run saved only by wall-clock time (no step is a multiple of every_n_steps=1000), at >= 2 steps
    saved = [int(s) for s in re.findall(r"at step (\d+) \(wall-clock interval", runs["crash_log"])]
    assert len(saved) >= 2 and all(0 < s <= CRASH for s in saved), saved
    assert saved == sorted(set(saved))
    assert runs["crashed_meta"]["global_step"] == saved[-1]  # the newest save is the complete last.ckpt
    assert runs["crashed_names"] == ["last.ckpt"]  # no temporaries or replaced directories left behind
    # the resumed run continued from that directory, wrote a sharded last.ckpt again, and no full-state file anywhere
    assert f"Restoring states from the checkpoint path at {runs['last']}" in runs["resume_log"]
    assert _assert_sharded(runs["last"])["global_step"] == STEPS
    files = [p for p in runs["run"].rglob("*") if p.is_file() and p.suffix in (".ckpt", ".pt", ".pth", ".bin")]
    assert files and all(p.name == "meta.pt" for p in files), files
    for directory in (runs["run"] / "checkpoints").glob("*.ckpt"):  # ModelCheckpoint's best too
        _assert_sharded(directory)
    # same weights as the uninterrupted, unsharded run (which has the DDP run's keys)
    sharded = _dcp_weights(runs["last"], runs["tmp"])
    reference = torch.load(runs["one"], weights_only=True)["state_dict"]
    assert sharded.keys() == reference.keys()
    worst = max((sharded[k].float() - reference[k].float()).abs().max().item() for k in reference)
    assert worst < 1e-4, f"weights differ by up to {worst:.2e}"
    init = torch.load(runs["one"], weights_only=True)  # and they trained: far beyond the tolerance from the start
    from brainfm.runs import build_task_from_checkpoint

    fresh = build_task_from_checkpoint({**init, "state_dict": {}}, weights=False).state_dict()
    assert max((reference[k].float() - fresh[k].float()).abs().max().item() for k in reference) > 1e-2


def test_sharded_checkpoint_consolidates_into_one_file_that_evaluate_and_load_checkpoint_read(runs, tmp_path):
    from brainfm.errors import CheckpointError
    from brainfm.runs.__main__ import main
    from brainfm.runs import build_task_from_checkpoint, load_checkpoint

    last = runs["last"]
    for where in (last, runs["run"]):  # the directory itself, or its run directory
        with pytest.raises(CheckpointError, match=r"python -m brainfm\.runs consolidate"):
            load_checkpoint(where)
    single = tmp_path / "export" / "model.ckpt"
    main(["consolidate", str(last), str(single)])
    assert single.is_file() and not list(single.parent.glob(".*tmp*"))
    ckpt = torch.load(single, map_location="cpu", weights_only=True)
    reference = torch.load(runs["one"], map_location="cpu", weights_only=True)
    assert ckpt["state_dict"].keys() == reference["state_dict"].keys()
    assert ckpt["hyper_parameters"] == reference["hyper_parameters"]
    assert ckpt["brainfm"]["task_class"] == reference["brainfm"]["task_class"] == "brainfm.tasks.supervised.SupervisedTask"
    assert ckpt["brainfm"]["data_meta"] == reference["brainfm"]["data_meta"]
    assert ckpt["global_step"] == STEPS and "optimizer_states" not in ckpt
    # the rebuilt task holds exactly the sharded weights
    sharded = _dcp_weights(last, tmp_path)
    task = build_task_from_checkpoint(load_checkpoint(single))
    rebuilt = task.state_dict()
    assert rebuilt.keys() == sharded.keys()
    assert all(torch.equal(rebuilt[k], sharded[k]) for k in sharded)
    # --weights-only keeps what rebuilding needs, nothing of the training loop
    lean = tmp_path / "lean.ckpt"
    main(["consolidate", str(runs["run"]), str(lean), "--weights-only"])
    lean_ckpt = torch.load(lean, weights_only=True)
    assert {"state_dict", "hyper_parameters", "brainfm", "global_step"} <= lean_ckpt.keys()
    assert not {"loops", "callbacks", "lr_schedulers", "optimizer_states"} & lean_ckpt.keys()
    # brainfm-evaluate reads the consolidated file
    out = subprocess.run([sys.executable, "-m", "brainfm.cli.evaluate", f"ckpt={single}", "window_lengths=[40]",
                          "baselines=[]", "probe=false", f"out_dir={tmp_path}/eval"],
                         env=subprocess_env(), capture_output=True, text=True, timeout=300, cwd=ROOT, check=False)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    report = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert report["global_step"] == STEPS and report["checkpoint"] == str(single)
    assert 0.0 <= report["results"]["pretrained"]["40"]["rank1"] <= 1.0


def test_consolidating_a_plain_file_drops_only_the_optimizer_state(runs, tmp_path):
    from brainfm.runs import WEIGHTS_ONLY_KEYS, consolidate

    source = torch.load(runs["one"], weights_only=True)
    assert source["optimizer_states"]
    out = torch.load(consolidate(runs["one"], tmp_path / "a.ckpt"), weights_only=True)
    assert out.keys() == source.keys() - {"optimizer_states"}
    assert all(torch.equal(out["state_dict"][k], source["state_dict"][k]) for k in source["state_dict"])
    assert out["loops"] == source["loops"]
    # a file without optimizer state is copied byte for byte; --weights-only re-saves the lean subset
    again = consolidate(tmp_path / "a.ckpt", tmp_path / "b.ckpt")
    assert again.read_bytes() == (tmp_path / "a.ckpt").read_bytes()
    lean = torch.load(consolidate(tmp_path / "a.ckpt", tmp_path / "c.ckpt", weights_only=True), weights_only=True)
    assert set(lean) == set(WEIGHTS_ONLY_KEYS) & set(source)


def _fake_dcp(directory: Path, step: int) -> Path:
    """A directory with the two files that make a DCP checkpoint complete (no real shards)."""
    directory.mkdir(parents=True)
    (directory / ".metadata").write_bytes(b"")
    torch.save({"global_step": step}, directory / "meta.pt")
    return directory


def test_directory_checkpoints_are_replaced_atomically_and_a_killed_rename_resumes_from_the_previous(tmp_path):
    from brainfm.training.callbacks import ResumeCheckpoint
    from brainfm.errors import CheckpointError
    from brainfm.runs import (
        checkpoint_format,
        previous_checkpoint,
        resolve_resume,
        temporary_checkpoint,
    )

    ckpts = tmp_path / "run" / "checkpoints"
    last = ckpts / "last.ckpt"
    _fake_dcp(last, 5)
    new = _fake_dcp(temporary_checkpoint(last, 10), 10)
    ResumeCheckpoint._replace(new, last, 10)
    assert torch.load(last / "meta.pt", weights_only=True)["global_step"] == 10
    assert sorted(p.name for p in ckpts.iterdir()) == ["last.ckpt"]
    # a file replaced by a directory (trainer switched to fsdp) and back
    last_file = ckpts / "other.ckpt"
    torch.save({"global_step": 1}, last_file)
    ResumeCheckpoint._replace(_fake_dcp(temporary_checkpoint(last_file, 2), 2), last_file, 2)
    assert checkpoint_format(last_file) == "dcp"
    tmp_file = temporary_checkpoint(last_file, 3)
    torch.save({"global_step": 3}, tmp_file)
    ResumeCheckpoint._replace(tmp_file, last_file, 3)
    assert checkpoint_format(last_file) == "file"
    # killed between the two renames: last.ckpt is gone, the complete previous directory is resumed from
    os.replace(last, previous_checkpoint(last, 15))
    _fake_dcp(temporary_checkpoint(last, 15), 15).joinpath(".metadata").unlink()  # an unfinished save
    assert resolve_resume("auto", tmp_path / "run") == str(previous_checkpoint(last, 15))
    assert resolve_resume("last", tmp_path / "run") == str(previous_checkpoint(last, 15))
    # an unfinished directory is never resumed from
    with pytest.raises(CheckpointError, match="incomplete checkpoint directory"):
        resolve_resume(str(temporary_checkpoint(last, 15)), tmp_path / "run")
    with pytest.raises(CheckpointError, match="ckpt_path=last"):
        resolve_resume("last", tmp_path / "empty")
    assert resolve_resume("auto", tmp_path / "empty") is None


def test_resume_checkpoint_intervals(tmp_path):
    from brainfm.training.callbacks import ResumeCheckpoint
    from brainfm.errors import ConfigError

    with pytest.raises(ConfigError, match="every_minutes"):
        ResumeCheckpoint(str(tmp_path), every_minutes=-1)
    off = ResumeCheckpoint(str(tmp_path), every_minutes=None)
    off._last_save_time -= 1e6
    assert off.every_minutes == 0 and not off._time_due()
    on = ResumeCheckpoint(str(tmp_path), every_minutes=30)
    assert not on._time_due()
    on._last_save_time -= 30 * 60
    assert on._time_due()


def test_init_from_a_sharded_directory_starts_a_new_run_from_its_full_weights(runs, tmp_path, hcp_h5):
    """``task.init_from=<FSDP2 last.ckpt directory>`` reads the shards at full shape in one process
    (issue 20, item 11); with lr 0 the new run's weights stay those of the directory."""
    run_dir, _ = helpers.train_in(tmp_path, *MODEL, f"data.path={hcp_h5}", "trainer=cpu", "trainer.max_steps=1",
                                  "trainer.val_check_interval=1", "task.optimizer.lr=0", "run_name=init",
                                  f"task.init_from={runs['last']}")
    started = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    sharded = _dcp_weights(runs["last"], tmp_path)
    backbone = [k for k in sharded if k.startswith("model.")]
    assert backbone and all(torch.equal(started[k], sharded[k]) for k in backbone)


def test_a_sharded_directory_is_resumed_only_by_the_strategy_that_wrote_it(runs, tmp_path, hcp_h5):
    from lightning.pytorch.strategies import SingleDeviceStrategy

    from brainfm.checkpoints import read_state_dict
    from brainfm.errors import CheckpointError
    from brainfm.runs import check_resume_strategy

    last = runs["last"]
    # brainfm-train ckpt_path=<FSDP2 directory> trainer=ddp_cpu: refused before training, with the fixes
    out = subprocess.run(train_command(tmp_path, "ddp", hcp_h5, "trainer=ddp_cpu", f"ckpt_path={last}"),
                         env=subprocess_env(), capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 2, out.stdout[-2000:] + out.stderr[-3000:]
    error = out.stderr.strip().splitlines()[-1]
    assert error.startswith(f"brainfm-train: error: {last} is an FSDP2 sharded"), error
    for fix in ("trainer=fsdp", f"task.init_from={last} run_name=<new name>", f"python -m brainfm.runs consolidate {last}"):
        assert fix in error, (fix, error)
    assert not (tmp_path / "gpt" / "ddp" / "checkpoints").exists()
    # a DeepSpeed directory: named by its ZeRO stage; as weights it needs one file
    ds = tmp_path / "ds" / "last.ckpt"
    (ds / "checkpoint").mkdir(parents=True)
    (ds / "latest").write_text("checkpoint")
    (ds / "checkpoint" / "zero_pp_rank_0_mp_rank_00_model_states.pt").write_bytes(b"")
    with pytest.raises(CheckpointError, match="trainer=deepspeed_stage_3"):
        check_resume_strategy(ds, SingleDeviceStrategy("cpu"))
    with pytest.raises(CheckpointError, match=r"python -m brainfm\.runs consolidate"):
        read_state_dict(ds)
