"""brainfm-search: Optuna studies whose trials are brainfm runs on the embedded data.

Search spaces, override formatting and storages on their own; then real 12-trial searches of the
7-way subject classification with two parallel workers (a subprocess and this process) on a journal
file, on SQLite and on a PostgreSQL server started here; a worker killed with SIGKILL mid-trial;
and two SLURM array workers running slurm/perlmutter/optuna_worker.sbatch on the local cluster.
Trials are tiny (d_model 32, one layer, 30-TR windows, 30 steps, 3 validations).
"""

from __future__ import annotations

import glob
import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import optuna
import pytest
import yaml
from omegaconf import OmegaConf
from optuna.trial import TrialState

from brainfm.config import compose, repo_root
from brainfm.errors import ConfigError
from brainfm.search import (HeartbeatJournalStorage, MetricNotLogged, OptunaPruning, Search, SearchSpace, format_value,
                            merge_overrides, redact, resolve_storage)
from brainfm.search.storage import make_storage

pytestmark = [
    pytest.mark.filterwarnings("ignore:.*The `srun` command is available.*"),  # a CPU run beside a SLURM install
    pytest.mark.filterwarnings("ignore:.*isinstance\\(treespec, LeafSpec\\).*"),
    pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning"),
    pytest.mark.filterwarnings("ignore:Heartbeat of storage is supposed to be used with Study.optimize"),
]
ROOT = repo_root()
TINY = ["model.d_model=32", "model.depth=1", "data.window.length=30", "trainer.max_steps=30",
        "trainer.val_check_interval=10", "logger=csv", "trainer.enable_progress_bar=false",
        "trainer.enable_model_summary=false"]


def _overrides(tmp_path: Path, hcp_h5: Path, storage: str, n_trials: int = 12, *extra: str) -> list[str]:
    return ["search=subject_probe", f"search.n_trials={n_trials}", f"search.storage={storage}",
            f"paths.output_dir={tmp_path}/outputs", f"paths.split_dir={tmp_path}/splits", f"data.path={hcp_h5}",
            *TINY, "search.heartbeat_interval=1", "search.grace_period=10", "search.threads=1",  # tolerant of a loaded CI machine
            "search.min_validations=2", *extra]


def _start_worker(overrides: list[str], worker: int, log: Path) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "brainfm.cli.search", *overrides, "search.action=work", f"search.worker={worker}"]
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)


def _wait_joined(proc: subprocess.Popen, log: Path, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if "joined study" in log.read_text():
            return
        if proc.poll() is not None:
            pytest.fail(f"worker exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        time.sleep(0.2)
    proc.kill()
    pytest.fail(f"worker did not join the study in {timeout} s:\n{log.read_text()[-3000:]}")


def _check_study(search: Search, study: optuna.Study, n: int, workers: int) -> None:
    """Budget spent exactly; every finished trial is a brainfm run with its parameters; results."""
    trials = study.get_trials()
    finished = [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    assert len(finished) == n
    assert len({t.user_attrs["worker"] for t in finished}) == workers  # every worker took trials
    for t in finished:
        run_dir = Path(t.user_attrs["run_dir"])
        assert run_dir == search.dir / f"trial_{t.number:04d}"
        cfg = OmegaConf.load(run_dir / "config.yaml")
        assert cfg.task.optimizer.lr == pytest.approx(t.params["task.optimizer.lr"])
        assert cfg.task.optimizer.weight_decay == pytest.approx(t.params["task.optimizer.weight_decay"])
        assert cfg.task.head == t.params["task.head"] and cfg.task.freeze_backbone == t.params["task.freeze_backbone"]
        assert cfg.task.dropout == pytest.approx(t.params["task.dropout"])
        hparams = yaml.safe_load((run_dir / "csv" / "hparams.yaml").read_text())  # logged with the run
        assert hparams["optuna/trial"] == t.number and hparams["optuna/study"] == search.study_name
        assert hparams["optuna/task.head"] == t.params["task.head"]
        reported = [t.intermediate_values[k] for k in sorted(t.intermediate_values)]
        assert sorted(t.intermediate_values) == list(range(1, len(reported) + 1))  # one report per validation
        assert t.user_attrs["validations"] == len(reported)
        assert t.user_attrs["global_step"] == 10 * len(reported)  # a pruned trial stops at its validation
        if t.state == TrialState.COMPLETE:
            assert len(reported) == 3
            assert t.value == pytest.approx(min(reported))  # reduce=best of a minimised metric
        else:  # pruned, never before search.min_validations
            assert len(reported) >= 2
    best = yaml.safe_load((search.dir / "best.yaml").read_text())
    assert best["value"] == pytest.approx(study.best_value) and best["trial"] == study.best_trial.number
    assert best["trials"]["complete"] + best["trials"]["pruned"] == n
    # the printed line is ready to run: brainfm-train composes the best trial's run from it
    cfg = compose("train", best["overrides"])
    trial_cfg = OmegaConf.load(search.dir / f"trial_{study.best_trial.number:04d}" / "config.yaml")
    for key in ("task", "model", "data"):
        assert OmegaConf.to_container(cfg[key], resolve=True) == OmegaConf.to_container(trial_cfg[key])
    assert cfg.trainer.max_steps == trial_cfg.trainer.max_steps == 30
    assert best["command"].startswith("brainfm-train experiment=subject_probe ")
    import pandas as pd

    table = pd.read_csv(search.dir / "trials.csv")
    assert len(table) == len(trials) and set(table["state"]) <= {"COMPLETE", "PRUNED", "FAIL"}
    assert {"params_task.optimizer.lr", "value", "validations", "run_dir", "val/acc"} <= set(table.columns)
    for name in ("optimization_history", "param_importances", "intermediate_values"):
        png = search.dir / "plots" / f"{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _run_two_workers(tmp_path: Path, overrides: list[str]) -> tuple[Search, optuna.Study, int, subprocess.Popen]:
    search = Search.from_overrides(overrides)
    search.create()  # once, before the workers start
    log = tmp_path / "worker1.log"
    other = _start_worker(overrides, 1, log)
    try:
        _wait_joined(other, log)
        study = search.load()
        ran = search.work(study)  # worker 0, in this process, at the same time
        assert other.wait(timeout=600) == 0, log.read_text()[-3000:]
    finally:
        if other.poll() is None:
            other.kill()
    search.report(study)
    return search, study, ran, other


# -- spaces, overrides, storages -----------------------------------------------------------------------

def test_space_parses_distributions_and_named_choices():
    space = SearchSpace.from_config({
        "task.optimizer.lr": {"type": "float", "low": 1e-5, "high": 1e-2, "log": True},
        "data.batch_size": {"type": "int", "low": 8, "high": 32, "step": 8},
        "task.head": {"type": "categorical", "choices": ["linear", "mlp"]},
        "label_scaling": {"type": "categorical", "choices": {"zscore": {"task.label_mean": 64.0, "task.label_std": 7.5},
                                                              "none": {"task.label_mean": 0.0, "task.label_std": 1.0}}},
    })
    lr, bs, head, scaling = (p.distribution() for p in space.params)
    assert isinstance(lr, optuna.distributions.FloatDistribution) and lr.log and (lr.low, lr.high) == (1e-5, 1e-2)
    assert isinstance(bs, optuna.distributions.IntDistribution) and bs.step == 8
    assert head.choices == ("linear", "mlp") and scaling.choices == ("zscore", "none")
    params = {"task.optimizer.lr": 3e-4, "data.batch_size": 16, "task.head": "mlp", "label_scaling": "zscore"}
    assert space.overrides(params) == ["task.optimizer.lr=0.0003", "data.batch_size=16", "task.head=mlp",
                                       "task.label_mean=64.0", "task.label_std=7.5"]
    assert space.keys() == {"task.optimizer.lr", "data.batch_size", "task.head", "task.label_mean", "task.label_std"}
    assert space.params[1].grid_values() == [8, 16, 24, 32] and space.params[3].grid_values() == ["zscore", "none"]
    with pytest.raises(ConfigError, match="grid"):
        space.grid_size()  # the log-float lr has no grid points


@pytest.mark.parametrize("spec, message", [
    ({"type": "uniform", "low": 0, "high": 1}, "type='uniform' must be one of"),
    ({"type": "float", "low": 1.0, "high": 0.1}, "low=1.0 must be below high=0.1"),
    ({"type": "float", "low": 0.0, "high": 1.0, "log": True}, "log=true needs low > 0"),
    ({"type": "float", "high": 1.0}, "needs `low` and `high`"),
    ({"type": "int", "low": 1.5, "high": 4}, "integer bounds"),
    ({"type": "categorical", "choices": []}, "non-empty list"),
    ({"type": "categorical", "choices": [[1, 2]]}, "not a scalar"),
    ({"type": "float", "low": 0, "high": 1, "lgo": True}, r"unknown field\(s\) \['lgo'\]"),
])
def test_space_errors_name_the_key_and_the_fix(spec, message):
    with pytest.raises(ConfigError, match=message) as err:
        SearchSpace.from_config({"task.dropout": spec})
    assert "search.space.task.dropout" in str(err.value)
    with pytest.raises(ConfigError, match="search.space is empty"):
        SearchSpace.from_config({})


@pytest.mark.parametrize("value", [1e-5, 0.1, 3, 0, True, False, None, "mlp", "a b", "1e-3", "true", "it's"])
def test_override_values_read_back_unchanged_by_hydra(value):
    cfg = compose("train", [f"+probe_value={format_value(value)}"])
    assert cfg.probe_value == value and type(cfg.probe_value) is type(value)


def test_fixed_overrides_yield_to_the_users_own():
    assert merge_overrides(["experiment=subject_probe", "trainer.max_steps=300"], ["trainer.max_steps=30", "x=1"]) == \
        ["experiment=subject_probe", "trainer.max_steps=30", "x=1"]


def test_storage_urls(tmp_path):
    assert resolve_storage(None, tmp_path) == ("rdb", f"sqlite:///{tmp_path}/study.db")
    assert resolve_storage("sqlite", tmp_path) == ("rdb", f"sqlite:///{tmp_path}/study.db")
    assert resolve_storage("journal", tmp_path) == ("journal", f"{tmp_path}/study.journal")
    assert resolve_storage(f"journal://{tmp_path}/a.log", "x") == ("journal", f"{tmp_path}/a.log")
    assert resolve_storage(f"{tmp_path}/b.journal", "x") == ("journal", f"{tmp_path}/b.journal")
    url = "postgresql+psycopg2://me:secret@db:5432/optuna"
    assert resolve_storage(url, tmp_path) == ("rdb", url)
    assert redact(url) == "postgresql+psycopg2://me:***@db:5432/optuna"
    with pytest.raises(ConfigError, match="postgresql://"):
        resolve_storage("postgres://me@db/optuna", tmp_path)
    with pytest.raises(ConfigError, match="unknown scheme"):
        resolve_storage("redis://localhost", tmp_path)


def test_journal_heartbeat_fails_a_dead_workers_trial_and_queues_it_again(tmp_path):
    storage = make_storage("journal", str(tmp_path / "s.journal"), heartbeat_interval=1, grace_period=1, retry_stale=1)
    assert isinstance(storage, HeartbeatJournalStorage)
    study = optuna.create_study(storage=storage, study_name="hb")
    live = study.ask({"x": optuna.distributions.FloatDistribution(0, 1)})  # a worker that keeps beating
    dead = study.ask({"x": optuna.distributions.FloatDistribution(0, 1)})  # a worker killed right after ask()
    for _ in range(3):
        storage.record_heartbeat(live._trial_id)
        time.sleep(0.6)
    optuna.storages.fail_stale_trials(study)
    states = {t.number: t.state for t in study.get_trials()}
    assert states[live.number] == TrialState.RUNNING and states[dead.number] == TrialState.FAIL
    retry = [t for t in study.get_trials() if t.state == TrialState.WAITING]
    assert len(retry) == 1 and retry[0].params == {"x": dead.params["x"]}  # same parameters, queued again
    assert retry[0].system_attrs["failed_trial"] == dead.number
    storage.record_heartbeat(dead._trial_id)  # a late heartbeat of the failed trial is ignored, not an error


def test_pruning_callback_reports_each_validation_and_stops_training():
    study = optuna.create_study(pruner=optuna.pruners.ThresholdPruner(upper=1.0))
    trial = study.ask()
    cb = OptunaPruning(trial, "val/loss")
    trainer = SimpleNamespace(sanity_checking=False, global_step=10, should_stop=False,
                              callback_metrics={"val/loss": 0.5})
    cb.on_validation_end(trainer, None)
    trainer.global_step, trainer.callback_metrics["val/loss"] = 20, 1.5
    cb.on_validation_end(trainer, None)
    assert trial.storage.get_trial(trial._trial_id).intermediate_values == {1: 0.5, 2: 1.5}
    assert cb.pruned_at == 2 and trainer.should_stop and cb.history == [(10, 0.5), (20, 1.5)]
    with pytest.raises(MetricNotLogged, match=r"'val/acc' was not logged.*\['val/loss'\]"):
        OptunaPruning(study.ask(), "val/acc").on_validation_end(trainer, None)


def test_search_settings_are_checked(tmp_path, hcp_h5):
    base = _overrides(tmp_path, hcp_h5, "sqlite")
    with pytest.raises(ConfigError, match="direction='up'"):
        Search.from_overrides([*base, "search.objective.direction=up"])
    with pytest.raises(ConfigError, match=r"\['task.head'\] are searched"):
        Search.from_overrides([*base, "task.head=mlp"])
    with pytest.raises(ConfigError, match="no study 'subject_probe'"):
        Search.from_overrides(base).load()  # workers never create the study
    search = Search.from_overrides([*base, "++search.space={task.optimizer.betaz: {type: float, low: 0.1, high: 0.9}}"])
    from hydra.errors import ConfigCompositionException

    with pytest.raises(ConfigCompositionException, match="betaz"):
        search.create()  # a trial is composed before the study exists: unknown keys fail here


@pytest.mark.parametrize("sampler, pruner, kinds", [
    ("tpe", "median", ("TPESampler", "MedianPruner")), ("random", "hyperband", ("RandomSampler", "HyperbandPruner")),
    ("cmaes", "none", ("CmaEsSampler", "NopPruner")),
])
def test_samplers_and_pruners_come_from_the_config(sampler, pruner, kinds):
    search = Search.from_overrides(["search=subject_probe", f"search/sampler={sampler}", f"search/pruner={pruner}",
                                    "search.min_validations=4"])
    assert (type(search.sampler()).__name__, type(search.pruner()).__name__) == kinds
    if pruner == "median":
        assert search.pruner()._n_warmup_steps == 4
    if pruner == "hyperband":
        assert search.pruner()._min_resource == 4
    # workers of one study draw different seeds; one worker is reproducible
    other = Search.from_overrides(["search=subject_probe", "search.worker=1"])
    same = Search.from_overrides(["search=subject_probe"])
    assert search.sampler_seed() == same.sampler_seed() != other.sampler_seed()


def test_grid_sampler_walks_the_grid_and_caps_the_budget():
    grid = Search.from_overrides(["search=subject_probe", "search/sampler=grid", "~search.space",
                                  "+search.space={task.head: {type: categorical, choices: [linear, mlp]}, "
                                  "task.dropout: {type: float, low: 0.0, high: 0.5, grid: [0.0, 0.25, 0.5]}}"])
    assert grid.budget == 6 and grid.sampler()._search_space == {"task.head": ["linear", "mlp"],
                                                                 "task.dropout": [0.0, 0.25, 0.5]}
    with pytest.raises(ConfigError, match=r"search.space.task.optimizer.lr: add `grid"):
        Search.from_overrides(["search=subject_probe", "search/sampler=grid"]).sampler()


def test_cli_without_a_space_lists_the_spaces(capsys):
    from brainfm.cli.search import main

    with pytest.raises(SystemExit) as exit_:
        main([])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "You must specify 'search'" in err and "subject_probe" in err and "swift_v2_age" in err


@pytest.mark.parametrize("preset", ["swift_v2_sex", "swift_v2_age", "swift_v2_intelligence", "swift_v2_depression",
                                    "swift_v2_asd", "subject_probe"])
def test_presets_compose_a_trial(preset):
    stats = [f"search.label_stats.{k}={v}" for k, v in (("mean", 64.0), ("std", 7.5), ("min", 45.0), ("range", 37.0))]
    search = Search.from_overrides([f"search={preset}", "paths.data_dir=/scratch/me",
                                    *(stats if preset in ("swift_v2_age", "swift_v2_intelligence") else [])])
    cfg = search.trial_config(3, search.space.example_overrides())
    assert cfg.task._target_ == "brainfm.tasks.SupervisedTask" and cfg.run_name.endswith("/trial_0003")
    assert {"task.optimizer.lr", "task.optimizer.weight_decay", "task.head", "task.freeze_backbone",
            "task.dropout"} <= search.space.keys()
    assert cfg.callbacks.model_checkpoint.monitor == search.metric  # the best checkpoint is the best by the objective
    if preset.startswith("swift_v2"):
        assert cfg.model._target_.endswith("SwinTransformer4D") and cfg.data._target_.endswith("VolumeDataModule")
        assert cfg.task.target == preset.removeprefix("swift_v2_")
        assert cfg.data.labels.file == "/scratch/me/phenotypes.csv"  # the space's overrides follow the user's paths
    if preset in ("swift_v2_age", "swift_v2_intelligence"):
        assert cfg.task.kind == "regression" and cfg.task.label_mean == 64.0 and cfg.task.label_std == 7.5
        minmax = {**{p.name: p.first_value() for p in search.space.params}, "label_scaling": "minmax"}
        assert search.space.overrides(minmax)[-2:] == ["task.label_mean=45.0", "task.label_std=37.0"]
        with pytest.raises(ConfigError, match="search.label_stats.mean"):
            Search.from_overrides([f"search={preset}"])


def test_subject_probe_starts_from_a_pretrained_backbone(tmp_path, hcp_h5, one_thread):
    from brainfm.training import build

    pre = compose("train", [f"paths.output_dir={tmp_path}/outputs", f"paths.split_dir={tmp_path}/splits",
                            f"data.path={hcp_h5}", "experiment=contrastive", *TINY, "trainer.max_steps=2",
                            "run_name=pre"])
    dm, task, trainer = build(pre)
    trainer.fit(task, datamodule=dm)
    ckpt = Path(pre.paths.run_dir) / "checkpoints" / "last.ckpt"
    search = Search.from_overrides(_overrides(tmp_path, hcp_h5, "sqlite", 2, f"task.init_from={ckpt}"))
    _, probe, _ = build(search.trial_config(0, ["task.freeze_backbone=true", "task.head=linear"]))
    for name, value in task.model.state_dict().items():
        assert (probe.model.state_dict()[name] == value).all(), name
    assert not any(p.requires_grad for p in probe.model.parameters())  # frozen: a linear probe


# -- searches --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("storage", ["journal", "sqlite"])
def test_twelve_trials_two_parallel_workers(storage, tmp_path, hcp_h5, one_thread):
    overrides = _overrides(tmp_path, hcp_h5, storage)
    search, study, ran, _ = _run_two_workers(tmp_path, overrides)
    assert 1 <= ran <= 11
    _check_study(search, study, 12, workers=2)
    if storage == "journal":
        assert (search.dir / "study.journal").is_file()
        # extended later: a restarted worker with a larger budget resumes the same study
        more = Search.from_overrides([*overrides, "search.n_trials=14"])
        assert more.work(more.load()) == 2
        assert sum(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in more.load().get_trials()) == 14
        assert (search.dir / "trial_0013" / "config.yaml").is_file()
    else:
        assert (search.dir / "study.db").is_file()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.fixture(scope="module")
def postgres_url():
    """A PostgreSQL server of Debian's `postgresql` on loopback with its own data directory, started
    by slurm/local/postgres_up.sh and stopped (by PID) by postgres_down.sh."""
    have = glob.glob("/usr/lib/postgresql/*/bin/postgres")
    if not have and (os.geteuid() != 0 or not shutil.which("apt-get")):
        pytest.skip("PostgreSQL is not installed and cannot be (needs root and apt-get)")
    state = tempfile.mkdtemp(prefix="brainfm-pg-", dir="/tmp")  # the postgres user must reach it
    env = {**os.environ, "STATE": state, "PGPORT": str(_free_port())}
    up = subprocess.run(["bash", str(ROOT / "slurm/local/postgres_up.sh")], env=env, capture_output=True, text=True,
                        timeout=600)
    assert up.returncode == 0, up.stdout[-2000:] + up.stderr[-2000:]
    pid = int(Path(state, "postgres.pid.bg").read_text())
    try:
        yield up.stdout.strip().splitlines()[-1]
    finally:
        down = subprocess.run(["bash", str(ROOT / "slurm/local/postgres_down.sh")], env=env, capture_output=True,
                              text=True, timeout=120)
        shutil.rmtree(state, ignore_errors=True)
        assert down.returncode == 0 and not _alive(pid), down.stdout + down.stderr


def test_twelve_trials_two_parallel_workers_on_postgresql(postgres_url, tmp_path, hcp_h5, one_thread):
    assert postgres_url.startswith("postgresql+psycopg2://") and "127.0.0.1" in postgres_url
    search, study, ran, _ = _run_two_workers(tmp_path, _overrides(tmp_path, hcp_h5, postgres_url))
    assert 1 <= ran <= 11
    _check_study(search, study, 12, workers=2)
    assert not (search.dir / "study.db").exists()


def test_worker_killed_mid_trial_leaves_a_failed_trial_and_the_study_completes(tmp_path, hcp_h5, one_thread):
    overrides = _overrides(tmp_path, hcp_h5, "journal", 8, "search.plots=false")
    search = Search.from_overrides(overrides)
    search.create()
    log = tmp_path / "victim.log"
    victim = _start_worker(overrides, 1, log)
    killed: dict = {}

    def kill_mid_trial() -> None:  # SIGKILL the other worker once it is inside a trial
        watch = search.load()
        deadline = time.time() + 300
        while time.time() < deadline and victim.poll() is None:
            for t in watch.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
                if t.user_attrs.get("worker", "").endswith(f":{victim.pid}") and t.intermediate_values:
                    os.kill(victim.pid, signal.SIGKILL)
                    killed["trial"] = t.number
                    return
            time.sleep(0.1)

    try:
        _wait_joined(victim, log)
        watcher = threading.Thread(target=kill_mid_trial)
        watcher.start()
        study = search.load()
        search.work(study)  # the surviving worker goes on and completes the study
        watcher.join()
        assert victim.wait(timeout=60) == -signal.SIGKILL, log.read_text()[-2000:]
    finally:
        if victim.poll() is None:
            victim.kill()
    trials = {t.number: t for t in study.get_trials()}
    dead = trials[killed["trial"]]
    assert dead.state == TrialState.FAIL  # failed through its stale heartbeat
    assert sum(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in trials.values()) == 8
    retried = [t for t in trials.values() if t.system_attrs.get("failed_trial") == dead.number]
    assert len(retried) == 1 and retried[0].params == dead.params  # run again with the same parameters
    assert retried[0].state in (TrialState.COMPLETE, TrialState.PRUNED)
    assert retried[0].user_attrs["worker"].endswith(f":{os.getpid()}")
    best = search.report(study, plots=False)
    assert best["trials"]["fail"] == 1 and best["trials"]["running"] == 0


# -- SLURM -----------------------------------------------------------------------------------------------

def test_optuna_worker_sbatch_runs_two_workers_on_one_study(slurm, tmp_path, hcp_h5):
    overrides = _overrides(tmp_path, hcp_h5, "journal", 6, "trainer=cpu", "search.plots=false")
    overrides.remove("search.threads=1")  # SLURM gives each worker one CPU (OMP_NUM_THREADS from env.sh)
    search = Search.from_overrides(overrides)
    search.create()
    env = {**os.environ, "SBATCH_CONSTRAINT": "", "SBATCH_QOS": "", "SBATCH_ACCOUNT": "", "SBATCH_GPUS_PER_NODE": "0",
           "BRAINFM_LOCAL": "1", "BRAINFM_ROOT": str(ROOT), "BRAINFM_SCRATCH": str(tmp_path / "scratch")}
    cmd = ["sbatch", "--parsable", "--wait", "--array=0-1", "--ntasks-per-node=1", "-c", "1", "--mem=3G",
           "-t", "00:15:00", "-o", str(tmp_path / "%x-%A_%a.out"), "slurm/perlmutter/optuna_worker.sbatch", *overrides]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900, cwd=ROOT)
    logs = "".join(p.read_text()[-3000:] for p in tmp_path.glob("*.out"))
    assert out.returncode == 0, out.stdout + out.stderr + logs
    job = out.stdout.strip().split(";")[0]
    study = search.load()
    finished = [t for t in study.get_trials() if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    assert len(finished) == 6
    assert {t.user_attrs["slurm_job"] for t in finished} == {f"{job}_0", f"{job}_1"}  # both array tasks took trials
    for task in (0, 1):
        log = (tmp_path / f"brainfm-optuna-{job}_{task}.out").read_text()
        assert f"worker {task} (" in log and "joined study 'subject_probe'" in log
    record = json.loads((search.dir / f"trial_{finished[0].number:04d}" / "trial.json").read_text())
    assert record["study"] == "subject_probe" and record["trial"] == finished[0].number
    assert math.isfinite(study.best_value)
