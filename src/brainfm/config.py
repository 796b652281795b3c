"""Locating the Hydra config tree, brainfm's OmegaConf resolvers, and composing configs in code.

``conf/`` sits beside ``src/`` in the repository (the package is installed editable by
``make install``); ``$BRAINFM_CONFIG_DIR`` points elsewhere. Resolvers:

- ``${brainfm_root:}``: ``$BRAINFM_ROOT`` or the repository root;
- ``${brainfm_run_name:}``: ``<array job>_<task>`` in a SLURM array, the SLURM job id in a job,
  else ``local``: a requeued job gets the same run directory and finds its ``last.ckpt``;
- ``${brainfm_job_subdir:}``: ``/<job number>`` in a job of a Hydra multirun (``brainfm-train -m``),
  else empty: every job of a sweep gets its own run directory ``<run_name>/<job number>``, locally
  and under the submitit launcher (``cluster=perlmutter``).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from brainfm.errors import ConfigError

_REPO = Path(__file__).resolve().parents[2]


def repo_root() -> Path:
    return Path(os.environ.get("BRAINFM_ROOT", _REPO)).resolve()


def config_dir() -> Path:
    path = Path(os.environ.get("BRAINFM_CONFIG_DIR", _REPO / "conf")).resolve()
    if not (path / "train.yaml").is_file():
        raise ConfigError(
            f"no brainfm config tree at {path} (train.yaml missing). brainfm is meant to be "
            "installed editable from its repository (`make install`); otherwise set "
            "BRAINFM_CONFIG_DIR to the repository's conf/ folder."
        )
    return path


def run_name() -> str:
    env = os.environ
    if env.get("SLURM_ARRAY_JOB_ID") and env.get("SLURM_ARRAY_TASK_ID"):
        return f"{env['SLURM_ARRAY_JOB_ID']}_{env['SLURM_ARRAY_TASK_ID']}"
    return env.get("SLURM_JOB_ID") or "local"


def default_resume() -> str | None:
    """``auto`` inside a SLURM job (a requeued job finds its own last.ckpt), else ``None``."""
    return "auto" if os.environ.get("SLURM_JOB_ID") else None


def job_subdir() -> str:
    """``/<hydra.job.num>`` inside a job of a Hydra multirun, else ``""`` (a single run, or a config
    composed outside Hydra's app with :func:`compose`, where Hydra's job fields do not exist)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized():
        return ""
    hydra_cfg = HydraConfig.get()
    num = OmegaConf.select(hydra_cfg, "job.num", default=None, throw_on_missing=False)
    if hydra_cfg.get("mode") != RunMode.MULTIRUN or num is None or OmegaConf.is_missing(hydra_cfg.job, "num"):
        return ""
    return f"/{num}"


def register_resolvers() -> None:
    OmegaConf.register_new_resolver("brainfm_root", lambda: str(repo_root()), replace=True)
    OmegaConf.register_new_resolver("brainfm_default_resume", default_resume, replace=True)
    OmegaConf.register_new_resolver("brainfm_run_name", run_name, replace=True)
    OmegaConf.register_new_resolver("brainfm_job_subdir", job_subdir, replace=True)


def compose(config_name: str = "train", overrides: Sequence[str] = ()) -> DictConfig:
    """Compose a config as the command line would (for tests, notebooks and scripts)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    register_resolvers()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        return hydra_compose(config_name=config_name, overrides=list(overrides))


register_resolvers()
