"""The search driver: an Optuna study whose trials are brainfm runs composed from the Hydra configs.

A trial's parameters become Hydra overrides of ``conf/search.yaml`` (which composes
``conf/train.yaml`` plus the ``search`` node), so a trial is exactly the run
``brainfm-train <overrides> <parameters>`` would make, in its own run directory
``<search.dir>/trial_<number>`` (= ``outputs/<experiment_name>/<study_name>/trial_0007``).

Workers: any number of processes (SLURM array tasks, shells) run :meth:`Search.work` on one study.
Each takes trials until the budget ``search.n_trials`` of finished (complete or pruned) trials is
reached; a failed trial does not count, so it is replaced. A worker that finds the remaining budget
taken by running trials waits (``search.wait_for_running``) until they finish or, if their worker
died, until their heartbeat goes stale and it can take their place. Raising ``search.n_trials``
later and starting workers again extends the study.
"""

from __future__ import annotations

import gc
import json
import logging
import os
import socket
import time
import warnings
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import optuna
from omegaconf import DictConfig, OmegaConf
from optuna.trial import TrialState

from brainfm.config import compose
from brainfm.errors import BrainfmError, ConfigError
from brainfm.io import atomic_write_text
from brainfm.search.pruning import OptunaPruning
from brainfm.search.results import SKIPPED, train_command, write_results
from brainfm.search.space import SearchSpace, override_key
from brainfm.search.storage import make_storage, redact, resolve_storage
from brainfm.training import build
from brainfm.training.callbacks import slurm_job_ref

_log = logging.getLogger("brainfm.search")

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)
ATTR_SPACE, ATTR_OBJECTIVE, ATTR_OVERRIDES = "brainfm:space", "brainfm:objective", "brainfm:overrides"
# overrides that steer the search itself, not the trained model (dropped from the train command line)
_SEARCH_KEYS = ("search", "hydra")
_TRIAL_KEYS = ("run_name", "ckpt_path")


class SearchError(BrainfmError):
    """The study cannot go on (too many failed trials, a study made with another space)."""


class TrialFailed(Exception):
    """A trial's training raised; the trial is FAIL and the worker goes on with the next."""


class NoValidation(ConfigError):
    """A trial finished without a single validation (a search-wide configuration error)."""


def merge_overrides(first: Sequence[str], then: Sequence[str]) -> list[str]:
    """``first`` followed by ``then``, dropping the entries of ``first`` whose key ``then`` sets again."""
    keys = {override_key(o) for o in then}
    return [o for o in first if override_key(o) not in keys] + list(then)


def is_search_override(override: str) -> bool:
    key = override_key(override)
    return key.split("/")[0].split(".")[0] in _SEARCH_KEYS


def default_compose(overrides: Sequence[str]) -> DictConfig:
    return compose("search", list(overrides))


@contextmanager
def _quiet_experimental():
    """Optuna flags heartbeats, stale-trial retries and some samplers as experimental."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        yield


class Search:
    """One study of ``brainfm-search``: the composed config, its space, objective and storage.

    Build it with :meth:`from_overrides` (what the command line does)::

        search = Search.from_overrides(["search=subject_probe", "search.n_trials=12"])
        study = search.create()         # once, before workers start
        search.work(search.load())      # in every worker
        search.report(search.load())    # trials.csv, best.yaml, plots

    Args:
        cfg: the composed ``search`` config (``conf/search.yaml`` with the space's overrides).
        overrides: the overrides it was composed from (the space's ``search.overrides`` first,
            then the user's).
        compose: ``overrides -> DictConfig`` of ``conf/search.yaml`` (Hydra's compose).

    Raises:
        ConfigError: invalid ``search.*`` settings or space (naming the key and the fix).
    """

    def __init__(self, cfg: DictConfig, overrides: Sequence[str],
                 compose: Callable[[Sequence[str]], DictConfig] = default_compose) -> None:
        self.cfg = cfg
        self.overrides = list(overrides)
        self.compose = compose
        s = cfg.search
        self.study_name = str(s.study_name)
        self.dir = Path(str(s.dir))
        self.n_trials = int(s.n_trials)
        if self.n_trials < 1:
            raise ConfigError(f"search.n_trials={self.n_trials} must be at least 1")
        self.max_failures = None if s.get("max_failures") is None else int(s.max_failures)
        obj = s.objective
        self.metric = str(obj.metric)
        self.direction = str(obj.direction)
        if self.direction not in ("minimize", "maximize"):
            raise ConfigError(f"search.objective.direction={self.direction!r} must be 'minimize' or 'maximize'")
        self.reduce = str(obj.get("reduce", "best"))
        if self.reduce not in ("best", "last"):
            raise ConfigError(f"search.objective.reduce={self.reduce!r} must be 'best' (over the trial's validations) "
                              "or 'last'")
        self.kind, self.location = resolve_storage(s.get("storage"), self.dir)
        try:
            space = OmegaConf.to_container(s.space, resolve=True) if s.get("space") is not None else None
        except Exception as exc:  # MissingMandatoryValue / InterpolationResolutionError
            raise ConfigError(f"search.space: {exc}. Set the missing value on the command line") from exc
        self.space = SearchSpace.from_config(space)
        taken = self.space.keys() & {override_key(o) for o in self.overrides}
        if taken:
            raise ConfigError(f"{sorted(taken)} are searched (search.space) and also set by an override; "
                              "drop the override, or remove the parameter from the space")
        self.worker = int(s.get("worker") or 0)
        self.worker_name = f"{socket.gethostname()}:{os.getpid()}"

    # -- construction ------------------------------------------------------------------------------
    @classmethod
    def from_overrides(cls, overrides: Sequence[str],
                       compose: Callable[[Sequence[str]], DictConfig] = default_compose) -> "Search":
        """Compose ``conf/search.yaml`` with ``overrides``; a space's fixed ``search.overrides``
        (e.g. ``experiment=subject_probe``) go first, so the user's own overrides win.

        The space is read from a first composition with the ``search`` overrides alone (the user's
        other overrides may name keys that exist only once the space's experiment is in), and its
        overrides are taken unresolved, so ``${paths.data_dir}`` in them follows the user's paths."""
        user = list(overrides)
        first = compose([o for o in user if is_search_override(o)])
        fixed = OmegaConf.to_container(first.search, resolve=False).get("overrides") or []
        merged = merge_overrides([str(o) for o in fixed], user)
        return cls(compose(merged), merged, compose)

    @property
    def train_overrides(self) -> list[str]:
        """The overrides that make a trial's run with ``brainfm-train`` (no ``search.*``)."""
        return [o for o in self.overrides if not is_search_override(o) and override_key(o) not in _TRIAL_KEYS]

    @property
    def storage_name(self) -> str:
        return redact(self.location)

    def objective_spec(self) -> dict:
        return {"metric": self.metric, "direction": self.direction, "reduce": self.reduce}

    # -- Optuna objects ------------------------------------------------------------------------------
    def storage(self, create: bool = False):
        s = self.cfg.search
        return make_storage(self.kind, self.location, heartbeat_interval=int(s.heartbeat_interval),
                            grace_period=s.get("grace_period"), retry_stale=int(s.get("retry_stale") or 0),
                            create_tables=create, journal_lock=str(s.get("journal_lock") or "symlink"))

    def sampler_seed(self) -> int | None:
        """``search.seed`` mixed with ``search.worker``: reproducible for one worker, and workers of
        one study draw different start points (same seeds would suggest the same parameters)."""
        seed = self.cfg.search.get("seed")
        if seed is None:
            return None
        import numpy as np

        return int(np.random.SeedSequence([int(seed), self.worker]).generate_state(1)[0])

    def sampler(self):
        from hydra.utils import get_class, instantiate

        node = self.cfg.search.sampler
        kwargs: dict[str, Any] = {"seed": self.sampler_seed()}
        if get_class(node._target_) is optuna.samplers.GridSampler:
            kwargs["search_space"] = self.space.grid()
        with _quiet_experimental():
            return instantiate(node, **kwargs, _convert_="all")

    def pruner(self):
        from hydra.utils import instantiate

        with _quiet_experimental():
            return instantiate(self.cfg.search.pruner, _convert_="all")

    @property
    def budget(self) -> int:
        """``search.n_trials``, capped by the grid's size under the grid sampler."""
        from hydra.utils import get_class

        if get_class(self.cfg.search.sampler._target_) is optuna.samplers.GridSampler:
            return min(self.n_trials, self.space.grid_size())
        return self.n_trials

    # -- study --------------------------------------------------------------------------------------
    def check(self) -> None:
        """Compose a trial's config with the first value of every parameter (unknown keys, wrong
        groups and bad values fail here, before any worker starts)."""
        self.trial_config(0, self.space.example_overrides())

    def create(self) -> optuna.Study:
        """Create the study (or load it if it exists, checking it was made with this space and
        objective). Run once before the workers start."""
        self.check()
        self.dir.mkdir(parents=True, exist_ok=True)
        with _quiet_experimental():
            study = optuna.create_study(study_name=self.study_name, storage=self.storage(create=True),
                                        direction=self.direction, sampler=self.sampler(), pruner=self.pruner(),
                                        load_if_exists=True)
        attrs = study.user_attrs
        if ATTR_SPACE not in attrs:
            study.set_user_attr(ATTR_SPACE, self.space.spec())
            study.set_user_attr(ATTR_OBJECTIVE, self.objective_spec())
            study.set_user_attr(ATTR_OVERRIDES, self.train_overrides)
            _log.info("created study %r in %s (%s, budget %d trials)", self.study_name, self.storage_name,
                      self.direction, self.budget)
        else:
            self._check_joined(study)
        return study

    def load(self) -> optuna.Study:
        """Load the existing study (a worker joining it).

        Raises:
            ConfigError: no such study in the storage (with the command that creates it), or a
                study made with another space / objective.
        """
        import sqlalchemy.exc

        missing = ConfigError(
            f"no study {self.study_name!r} in {self.storage_name}. Create it once before starting workers: "
            "brainfm-search <the same overrides> search.action=create"
        )
        local_file = self.location if self.kind == "journal" else (
            self.location.split(":///", 1)[1] if self.location.startswith("sqlite:///") else None)
        if local_file and not Path(local_file).is_file():
            raise missing  # (and no empty database or journal file is left behind)
        try:
            with _quiet_experimental():
                study = optuna.load_study(study_name=self.study_name, storage=self.storage(create=False),
                                          sampler=self.sampler(), pruner=self.pruner())
        except (KeyError, sqlalchemy.exc.OperationalError, sqlalchemy.exc.ProgrammingError,
                optuna.exceptions.StorageInternalError) as exc:
            raise missing from exc
        self._check_joined(study)
        return study

    def _check_joined(self, study: optuna.Study) -> None:
        attrs = study.user_attrs
        for key, mine, what in ((ATTR_SPACE, self.space.spec(), "search space"),
                                (ATTR_OBJECTIVE, self.objective_spec(), "objective")):
            if key in attrs and json.loads(json.dumps(mine)) != attrs[key]:
                raise SearchError(
                    f"study {self.study_name!r} in {self.storage_name} was created with another {what}:\n"
                    f"  study: {attrs[key]}\n  here:  {mine}\n"
                    "Use the study's settings, or a new search.study_name for a new search"
                )
        if study.directions[0].name.lower() != self.direction:
            raise SearchError(f"study {self.study_name!r} is {study.directions[0].name.lower()}d, "
                              f"but search.objective.direction={self.direction}")
        theirs = attrs.get(ATTR_OVERRIDES)
        mine = self.train_overrides
        if theirs is not None and _without_paths(theirs) != _without_paths(mine):
            _log.warning("this worker's overrides differ from those the study was created with:\n  study: %s\n"
                         "  here:  %s", " ".join(theirs), " ".join(mine))

    def counts(self, study: optuna.Study) -> dict[str, int]:
        """Trials per state (``skipped``: over-budget trials failed without running)."""
        out = {"complete": 0, "pruned": 0, "fail": 0, "running": 0, "waiting": 0, "skipped": 0}
        for t in study.get_trials(deepcopy=False):
            if t.state == TrialState.FAIL and t.user_attrs.get(SKIPPED):
                out["skipped"] += 1
            else:
                out[t.state.name.lower()] += 1
        out["finished"] = out["complete"] + out["pruned"]
        return out

    # -- worker -------------------------------------------------------------------------------------
    def work(self, study: optuna.Study, max_trials: int | None = None) -> int:
        """Take trials of ``study`` until its budget is spent; return how many this worker ran.

        Raises:
            SearchError: more than ``search.max_failures`` trials failed.
            ConfigError / BrainfmError: a configuration error that fails every trial (unknown
                metric, missing data file, ...); the trial is marked FAIL first.
        """
        s = self.cfg.search
        if s.get("threads"):
            import torch

            torch.set_num_threads(int(s.threads))
        poll = max(1.0, float(s.heartbeat_interval))
        budget = self.budget
        ran = 0
        _log.info("worker %d (%s) joined study %r in %s: budget %d trials", self.worker, self.worker_name,
                  self.study_name, self.storage_name, budget)
        waiting_logged = False
        while max_trials is None or ran < max_trials:
            with _quiet_experimental():
                optuna.storages.fail_stale_trials(study)
            n = self.counts(study)
            if n["finished"] >= budget:
                break
            if self.max_failures is not None and n["fail"] > self.max_failures:
                raise SearchError(
                    f"study {self.study_name!r}: {n['fail']} trials failed (search.max_failures={self.max_failures}); "
                    f"see the failed trials' run directories under {self.dir} and fix the cause"
                )
            if n["finished"] + n["running"] >= budget and n["waiting"] == 0:
                if not s.get("wait_for_running", True):
                    break
                if not waiting_logged:
                    _log.info("worker %d: the remaining budget is taken by %d running trial(s); waiting for them",
                              self.worker, n["running"])
                    waiting_logged = True
                time.sleep(poll)
                continue
            waiting_logged = False
            try:
                study.optimize(self._objective, n_trials=1, catch=(TrialFailed,), gc_after_trial=True)
            except optuna.exceptions.UpdateFinishedTrialError:
                _log.warning("worker %d: a trial was marked failed by another worker while it ran (its heartbeat went "
                             "stale: search.grace_period too short for this file system?); its result is dropped",
                             self.worker)
            ran += 1
        n = self.counts(study)
        _log.info("worker %d done: ran %d trial(s); study %r has %d complete, %d pruned, %d failed, %d running",
                  self.worker, ran, self.study_name, n["complete"], n["pruned"], n["fail"], n["running"])
        return ran

    def _objective(self, trial: optuna.Trial) -> float:
        ahead = sum(1 for t in trial.study.get_trials(deepcopy=False)
                    if t.number < trial.number and t.state in (*FINISHED, TrialState.RUNNING, TrialState.WAITING))
        if ahead >= self.budget:  # another worker took the last slot between our count and ask()
            trial.set_user_attr(SKIPPED, "over budget")
            raise TrialFailed(f"trial {trial.number} is over the budget of {self.budget} trials; not run")
        return self.run_trial(trial)

    def trial_config(self, number: int, param_overrides: Sequence[str]) -> DictConfig:
        """The composed config of trial ``number`` (run directory ``<search.dir>/trial_<number>``)."""
        run_name = f"{self.study_name}/trial_{number:04d}"
        cfg = self.compose([*self.overrides, *param_overrides, f"run_name={run_name}", "ckpt_path=null"])
        callbacks = cfg.get("callbacks") or {}
        # the search owns the objective: the best checkpoint is the best by it
        if callbacks.get("model_checkpoint") is not None:
            callbacks.model_checkpoint.monitor = self.metric
            callbacks.model_checkpoint.mode = "min" if self.direction == "minimize" else "max"
        # a signalled worker must not finish its trial early and report a truncated run as complete:
        # it dies, its trial goes stale and is failed (and retried) through the heartbeat (Ctrl-C too)
        if callbacks.get("resume_checkpoint") is not None:
            callbacks.resume_checkpoint.signal_name = None
            callbacks.resume_checkpoint.requeue = False
            callbacks.resume_checkpoint.interrupt_signal = None
        return cfg

    def run_trial(self, trial: optuna.Trial) -> float:
        """Train one trial; return its objective value (raises ``optuna.TrialPruned`` when pruned)."""
        params = self.space.suggest(trial)
        param_overrides = self.space.overrides(params)
        cfg = self.trial_config(trial.number, param_overrides)
        run_dir = Path(cfg.paths.run_dir)
        _set_aside(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        trial.set_user_attr("run_dir", str(run_dir))
        trial.set_user_attr("worker", self.worker_name)
        trial.set_user_attr("overrides", [*self.train_overrides, *param_overrides])

        if slurm_job_ref():
            trial.set_user_attr("slurm_job", slurm_job_ref())
        record = {"study": self.study_name, "storage": self.storage_name, "trial": trial.number, "params": params,
                  "overrides": param_overrides, "worker": self.worker_name,
                  "command": train_command([*self.train_overrides, *param_overrides], run_name=None)}
        atomic_write_text(run_dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
        atomic_write_text(run_dir / "trial.json", json.dumps(record, indent=2))
        _log.info("trial %d: %s -> %s", trial.number, " ".join(param_overrides), run_dir)
        try:
            datamodule, task, trainer = build(cfg)
        except BrainfmError:
            raise
        except Exception as exc:
            raise TrialFailed(f"building trial {trial.number} failed: {exc!r}") from exc
        pruning = OptunaPruning(trial, self.metric)
        trainer.callbacks.append(pruning)
        hparams = {"optuna/study": self.study_name, "optuna/trial": trial.number,
                   **{f"optuna/{k}": v for k, v in params.items()}}
        for logger in trainer.loggers:
            logger.log_hyperparams(hparams)
        try:
            trainer.fit(task, datamodule=datamodule)
        except BrainfmError:  # a configuration error (e.g. MetricNotLogged) fails every trial: stop
            raise
        except Exception as exc:
            raise TrialFailed(f"trial {trial.number} failed while training: {exc!r}") from exc
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
        step = int(trainer.global_step)
        history = list(pruning.history)
        del datamodule, task, trainer
        _free_memory()
        summary = {"experiment": cfg.experiment_name, "run_dir": str(run_dir), "global_step": step,
                   "metrics": metrics, "optuna": {**record, "validations": [list(h) for h in history],
                                                  "pruned_at_validation": pruning.pruned_at}}
        atomic_write_text(run_dir / "summary.json", json.dumps(summary, indent=2))
        trial.set_user_attr("validations", len(history))
        trial.set_user_attr("global_step", step)
        for k, v in sorted(metrics.items()):
            if k.startswith("val/"):
                trial.set_user_attr(k, v)
        if pruning.pruned_at is not None:
            raise optuna.TrialPruned(f"pruned at validation {pruning.pruned_at} (step {step})")
        if not history:
            raise NoValidation(
                f"trial {trial.number} trained {step} steps without a validation: set trainer.val_check_interval "
                "below trainer.max_steps (the pruner and the objective read the validation metric)"
            )
        values = [v for _, v in history]
        if self.reduce == "last":
            return values[-1]
        finite = [v for v in values if v == v and abs(v) != float("inf")]
        if not finite:
            return float("nan")  # Optuna marks the trial FAIL
        return min(finite) if self.direction == "minimize" else max(finite)

    # -- results ------------------------------------------------------------------------------------
    def report(self, study: optuna.Study, plots: bool | None = None) -> dict:
        """Write ``trials.csv``, ``best.yaml`` and the plots into ``search.dir``; print the best
        trial as a ``brainfm-train`` command. Returns the contents of ``best.yaml``."""
        return write_results(self, study, plots=self.cfg.search.get("plots", True) if plots is None else plots)


def _without_paths(overrides: Sequence[str]) -> list[str]:
    return [o for o in overrides if not override_key(o).startswith("paths.")]


def _set_aside(run_dir: Path) -> None:
    """A run directory left by an earlier study of the same name (its database was deleted) is
    renamed, never mixed into the new trial's logs."""
    if run_dir.is_dir() and any(run_dir.iterdir()):
        old = run_dir.with_name(f"{run_dir.name}.old-{int(time.time())}")
        _log.warning("%s exists (from an earlier study of this name?); moved to %s", run_dir, old.name)
        run_dir.rename(old)


def _free_memory() -> None:
    gc.collect()
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except Exception:  # pragma: no cover - best effort
        pass
