"""``logger=wandb``: offline run files in the run directory at brainfm's steps (the values of ``metrics.csv``), quiet
output and the ``wandb sync`` command; a run stopped with Ctrl-C and resumed with ``ckpt_path=auto`` continues its W&B
run, ``overwrite=true`` starts another; a requeued job's files are complete before ``scontrol requeue``; the mode rule,
the run id, and the errors without wandb installed and online without a login. No network: every run is offline and
W&B's folders are under ``tmp_path``.

W&B 0.31 ships no reader of its offline run files (``run-<id>.wandb``): :func:`wandb_records` reads the layout W&B's
core writes (LevelDB's log format behind a 7-byte W&B header, ``core/pkg/leveldb/record.go`` in wandb/wandb), whose
records are ``wandb_internal_pb2.Record``."""

from __future__ import annotations

import csv
import json
import logging
import signal
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import wandb
from helpers import subprocess_env, train_command
from lightning.pytorch.callbacks import Callback
from wandb.proto import wandb_internal_pb2

import brainfm.training.callbacks
from brainfm.training import run
from brainfm.config import repo_root
from brainfm.errors import ConfigError
from brainfm.training.tracking import WandbLogger, wandb_mode, wandb_run_id
from brainfm.training import TrainingInterrupted

SMALL = ("experiment=gpt", "model.d_model=32", "model.depth=1", "data.window.length=30", "data.window.min_length=null",
         "trainer.val_check_interval=3", "trainer.limit_val_batches=1", "trainer.log_every_n_steps=1", "run_name=t",
         "logger=wandb", "logger.wandb.mode=offline", "logger.wandb.tags=[a,b]", "logger.wandb.group=g")


@pytest.fixture(autouse=True)
def wandb_folders(tmp_path, monkeypatch):
    """Every folder W&B writes outside a run's own directory under ``tmp_path``, and no mode or SLURM job from the
    caller's environment."""
    for key in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(key, str(tmp_path / "wandb-home" / key.lower()))
    monkeypatch.setenv("WANDB_ERROR_REPORTING", "false")  # W&B reports its own errors to its servers otherwise
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)


class SignalAtStep(Callback):
    """Signal ``name`` to this process after optimizer step ``step``: ``SIGINT`` (Ctrl-C) or ``SIGUSR1`` (SLURM's
    preemption signal); ResumeCheckpoint saves and stops."""

    def __init__(self, step: int, name: str = "SIGINT") -> None:
        self.step, self.signal = step, getattr(signal, name)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            signal.raise_signal(self.signal)


def wandb_records(path: Path) -> list:
    """The records of a W&B transaction log (``run-<id>.wandb``): 32 KiB blocks of chunks ``crc32c (4) length (2,
    little-endian) type (1: full, 2: first, 3: middle, 4: last) payload``, the first block 7 bytes short (W&B's header
    ``:W&B``, magic, version)."""
    data, block = path.read_bytes(), 32 * 1024
    assert data[:4] == b":W&B", path
    records, payload, pos = [], b"", 7
    while pos + 7 <= len(data):
        room = block - pos % block
        length, kind = struct.unpack("<HB", data[pos + 4:pos + 7]) if room >= 7 else (0, 0)
        if kind == 0:  # the zero padding at a block's end
            pos += room
            continue
        payload += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(payload)
            records.append(record)
            payload = b""
    return records


def _items(items) -> dict:
    """A record's items by key (a key with ``/`` is stored as its parts, ``nested_key``), values decoded."""
    return {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in items}


def wandb_parts(run_dir: Path) -> list[dict]:
    """Each start of the run's W&B run, in order: its run id, name, group, tags, config and history by step."""
    parts = []
    for folder in sorted(p for p in (run_dir / "wandb").glob("offline-run-*") if not p.is_symlink()):
        (log,) = folder.glob("run-*.wandb")
        part = {"history": {}, "config": {}}
        for record in wandb_records(log):
            if record.HasField("run"):
                part.update(id=record.run.run_id, name=record.run.display_name, group=record.run.run_group,
                            tags=list(record.run.tags), project=record.run.project)
                part["config"].update(_items(record.run.config.update))
            elif record.HasField("config"):
                part["config"].update(_items(record.config.update))
            elif record.HasField("history"):
                row = {k: v for k, v in _items(record.history.item).items() if not k.startswith("_")}
                part["history"].setdefault(record.history.step.num, {}).update(row)
        parts.append(part)
    return parts


def csv_by_step(run_dir: Path) -> dict[int, dict[str, float]]:
    """``metrics.csv``'s values by step (a step's training, validation and learning-rate rows merged)."""
    rows: dict[int, dict[str, float]] = {}
    with open(run_dir / "csv" / "metrics.csv") as f:
        for r in csv.DictReader(f):
            rows.setdefault(int(r["step"]), {}).update({k: float(v) for k, v in r.items() if v and k != "step"})
    return rows


def assert_same_values(history: dict[int, dict], expected: dict[int, dict[str, float]]) -> None:
    assert sorted(history) == sorted(expected)
    for step, values in expected.items():
        assert history[step]["trainer/global_step"] == step
        for key, value in values.items():
            assert history[step][key] == pytest.approx(value, rel=1e-6), (step, key)


def test_offline_run_writes_its_wandb_files_in_the_run_directory_at_brainfms_steps(tmp_path, hcp_h5):
    """brainfm-train as a user runs it: W&B's files in the run directory, each metrics.csv value at the same W&B
    step, the composed config as the W&B config, no W&B output or warning on the screen, the sync command printed and
    in summary.json."""
    env = {**subprocess_env(), "PYTHONWARNINGS": "default"}  # every warning once: none may reach the output
    out = subprocess.run(train_command(tmp_path, "w", hcp_h5, "trainer.max_steps=6", "trainer.val_check_interval=3",
                                       "logger=wandb", "logger.wandb.mode=offline", "logger.wandb.project=p",
                                       "logger.wandb.tags=[a,b]"),
                         env=env, capture_output=True, text=True, timeout=600, cwd=repo_root())
    text = out.stdout + out.stderr
    assert out.returncode == 0, text[-5000:]
    run_dir = tmp_path / "gpt" / "w"
    sync = f"wandb sync {run_dir}/wandb"
    assert json.loads((run_dir / "summary.json").read_text())["wandb_sync_command"] == sync
    assert f"upload from a login node with: {sync}" in out.stdout
    noise = [line for line in text.splitlines()
             if line.lower().startswith("wandb") or "warn" in line.lower() or "deprecat" in line.lower()]
    assert not noise, "\n".join(noise)

    (part,) = wandb_parts(run_dir)
    assert part["id"] == (run_dir / "wandb_run_id").read_text() and part["id"].startswith("gpt-w-")
    assert (part["name"], part["project"], part["tags"]) == ("gpt/w", "p", ["a", "b"])
    assert_same_values(part["history"], csv_by_step(run_dir))
    assert sorted(part["history"]) == [1, 2, 3, 4, 5, 6] and "val/loss" in part["history"][3]
    config = part["config"]
    assert config["trainer"]["max_steps"] == 6 and config["model"]["d_model"] == 32 and config["run_name"] == "w"
    assert config["hparams"]["optimizer"]["lr"] == 1e-3  # the task's saved hyper-parameters


def test_ctrl_c_and_ckpt_path_auto_continue_the_same_wandb_run_and_overwrite_starts_another(cfg_for, tmp_path, capsys):
    run_dir = tmp_path / "outputs" / "gpt" / "t"
    with pytest.raises(TrainingInterrupted):
        run(cfg_for(*SMALL, "trainer.max_steps=8", "+callbacks.stop._target_=test_wandb.SignalAtStep",
                    "+callbacks.stop.step=2"))
    summary = json.loads((run_dir / "summary.json").read_text())
    stopped = summary["global_step"]
    assert summary["interrupted"] and 2 <= stopped < 8
    assert summary["wandb_sync_command"] == f"wandb sync {run_dir}/wandb" and "wandb sync" in capsys.readouterr().out
    run_id = (run_dir / "wandb_run_id").read_text()

    run(cfg_for(*SMALL, "trainer.max_steps=8", "ckpt_path=auto"))
    first, second = wandb_parts(run_dir)
    assert first["id"] == second["id"] == run_id and (run_dir / "wandb_run_id").read_text() == run_id
    assert sorted(first["history"]) == list(range(1, stopped + 1))
    assert sorted(second["history"]) == list(range(stopped + 1, 9))  # each step once, in one W&B run
    assert_same_values({**first["history"], **second["history"]}, csv_by_step(run_dir))
    assert (second["name"], second["group"], second["tags"]) == ("gpt/t", "g", ["a", "b"])

    run(cfg_for(*SMALL, "trainer.max_steps=2", "overwrite=true"))  # the run replaced: a new W&B run
    (only,) = wandb_parts(run_dir)
    assert only["id"] != run_id and only["id"] == (run_dir / "wandb_run_id").read_text()
    assert sorted(only["history"]) == [1, 2]


def test_a_requeued_job_has_finished_its_offline_wandb_files_before_scontrol_requeue(cfg_for, tmp_path, monkeypatch):
    """SLURM kills a job as soon as it is requeued: W&B's offline file must hold every step already (W&B writes the
    end of the file only when the run is finished), as metrics.csv does."""
    run_dir, seen = tmp_path / "outputs" / "gpt" / "t", {}

    def scontrol(args, **_):
        assert args == ["scontrol", "requeue", "42"]
        (seen["part"],) = wandb_parts(run_dir)
        seen["csv"] = csv_by_step(run_dir)
        return subprocess.CompletedProcess(args, 0, "", "")

    monkeypatch.setattr(brainfm.training.callbacks, "slurm_job_ref", lambda: "42")
    monkeypatch.setattr(brainfm.training.callbacks.subprocess, "run", scontrol)
    run(cfg_for(*SMALL, "trainer.max_steps=8", "+callbacks.stop._target_=test_wandb.SignalAtStep",
                "+callbacks.stop.step=2", "+callbacks.stop.name=SIGUSR1"))
    stopped = json.loads((run_dir / "summary.json").read_text())["global_step"]
    assert 2 <= stopped < 8 and sorted(seen["csv"]) == list(range(1, stopped + 1))
    assert_same_values(seen["part"]["history"], seen["csv"])


def test_wandb_mode_from_config_then_wandb_mode_then_slurm(monkeypatch):
    assert wandb_mode(None) == "online"
    monkeypatch.setenv("SLURM_JOB_ID", "123")
    assert wandb_mode(None) == "offline"  # a compute node: no outbound internet
    assert wandb_mode("online") == "online"
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert wandb_mode(None) == "disabled" and wandb_mode("offline") == "offline"
    monkeypatch.setenv("WANDB_MODE", "dryrun")  # W&B's older name
    assert wandb_mode(None) == "offline"
    monkeypatch.setenv("WANDB_MODE", "of")
    with pytest.raises(ConfigError, match=r"WANDB_MODE=of: .* Fix: logger.wandb.mode=offline"):
        wandb_mode(None)
    with pytest.raises(ConfigError, match=r"logger.wandb.mode=sometimes"):
        wandb_mode("sometimes")


def test_wandb_run_id_is_the_run_identity_in_wandbs_characters():
    assert wandb_run_id("gpt/123_4/0", "9f3a61c2") == "gpt-123_4-0-9f3a61c2"
    assert wandb_run_id("gpt/sweep/0", "9f3a61c2") != wandb_run_id("gpt/sweep/1", "9f3a61c2")  # multirun jobs
    odd = wandb_run_id("a:b;c,d#e?f'g h/é", "9f3a61c2")
    assert odd == "a-b-c-d-e-f-g-h-9f3a61c2"
    long = wandb_run_id("x" * 100 + "/local", "9f3a61c2")
    assert len(long) == 64 and long.endswith("x-9f3a61c2")


def test_missing_wandb_is_a_config_error_naming_the_extra(cfg_for, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` raises ImportError
    with pytest.raises(ConfigError, match=r"logger=wandb needs the wandb package: pip install 'brainfm\[wandb\]'"):
        run(cfg_for(*SMALL, "trainer.max_steps=2"))


def test_online_without_a_login_names_the_fixes(tmp_path, monkeypatch):
    def no_key(**_):
        raise wandb.errors.UsageError("No API key configured. Use `wandb login` to log in.")

    monkeypatch.setattr(wandb, "init", no_key)
    logger = WandbLogger(run_dir=str(tmp_path / "r"), name="gpt/r", mode="online")
    with pytest.raises(ConfigError, match=r"No API key.*`wandb login`.*logger.wandb.mode=offline.*wandb sync "):
        logger.experiment  # noqa: B018 - starts the W&B run


class _ResumedOnline:
    """A W&B run resumed online that holds steps 1..5 (``run.step`` 6: W&B's next step)."""

    id, disabled, offline, resumed, step = "gpt-r-1", False, False, True, 6

    def __init__(self) -> None:
        self.rows: list[tuple[dict, int]] = []

    def log(self, row: dict, step: int) -> None:
        self.rows.append((row, step))


def test_a_resumed_online_run_leaves_out_the_steps_wandb_holds_with_one_line(tmp_path, caplog):
    """After a crash the run resumes from an older checkpoint (step 3) while W&B holds steps up to 5: W&B would drop
    the rows of steps 4 and 5 with a warning each; brainfm leaves them out with one line."""
    caplog.set_level(logging.INFO, logger="brainfm")
    logger = WandbLogger(run_dir=str(tmp_path / "r"), name="gpt/r", mode="offline")
    logger._experiment = run = _ResumedOnline()
    logger._started(run)
    for lightning_step in (3, 4, 5):  # brainfm's steps 4, 5, 6
        logger.log_metrics({"train/loss": 1.0}, step=lightning_step)
    assert run.rows == [({"train/loss": 1.0, "trainer/global_step": 6}, 6)]
    assert [r.getMessage() for r in caplog.records if "holds steps up to 5" in r.getMessage()] != []
    assert len([r for r in caplog.records if "W&B run" in r.getMessage()]) == 1
