"""Training a run from a composed config: :func:`build` (data, task, trainer, callbacks, loggers) and :func:`run`
(the run directory's rules, fit, ``summary.json``). ``brainfm-train`` (:mod:`brainfm.cli.train`) is this behind
Hydra; the drivers (Optuna search, benchmarks) call it in-process.

Run directories: ``outputs/<experiment>/<run_name>`` (``paths.run_dir``), ``<run_name>/<job number>`` for
each job of a multirun (``-m``). One that holds checkpoints is resumed (``ckpt_path=auto``), replaced
(``overwrite=true``) or refused (:func:`run`). Ctrl-C saves ``last.ckpt``, writes ``summary.json``,
prints the command that resumes and raises :class:`TrainingInterrupted`
(:class:`brainfm.training.callbacks.ResumeCheckpoint`).

``trainer.compile=true`` (``trainer.compile_mode``) compiles the backbone with ``torch.compile``.
The two keys are brainfm's, not Lightning's: the ``trainer`` group's ``_target_``,
:class:`brainfm.tasks.base.Trainer`, takes them off before building Lightning's ``Trainer`` (so
every place that instantiates the group, here, the scale test and the inference entry points,
accepts them), and the task compiles in ``configure_model`` (:func:`brainfm.tasks.base.compile_backbone`).
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf, open_dict

from brainfm.config import job_subdir
from brainfm.instantiate import instantiate
from brainfm.io import atomic_write_text
from brainfm.runs import (
    check_resume_strategy,
    check_training_start,
    checkpoint_step,
    discard_outputs,
    refuse_fresh_start,
    resolve_resume,
    restore_outputs,
    set_aside_outputs,
)
from brainfm.training.tracking import ProgressLog

log = logging.getLogger("brainfm")


def _instantiate_group(group: DictConfig | None) -> list[Any]:
    return [instantiate(node) for node in (group or {}).values() if node is not None]


def build(cfg: DictConfig):
    """Build ``(datamodule, task, trainer)`` from a composed config (data set up and checked, also against the
    data contract of ``task.init_from``: :func:`brainfm.runs.check_training_start`).

    Raises:
        CheckpointError: data in another voxel orientation than ``task.init_from``'s. ConfigError / DataError:
            from the data and the task.
    """
    import lightning as L

    L.seed_everything(int(cfg.seed), workers=True, verbose=False)
    datamodule = instantiate(cfg.data)
    datamodule.setup("fit")
    # weights to fine-tune carry the data contract they were trained with (voxel orientation)
    check_training_start(datamodule, init_from=(cfg.get("task") or {}).get("init_from"))
    meta = datamodule.meta
    with open_dict(cfg):
        if cfg.data.get("n_rois") is None and "n_rois" in cfg.model:
            cfg.model.n_rois = meta["n_rois"]
    model_cfg = OmegaConf.to_container(cfg.model, resolve=True)
    task = instantiate(cfg.task, _convert_="none", model=model_cfg, data_meta=meta, seed=int(cfg.seed),
                        _recursive_=False)
    callbacks = _instantiate_group(cfg.get("callbacks"))
    from lightning.pytorch.callbacks import ProgressBar

    has_bar = any(isinstance(c, ProgressBar) for c in callbacks)
    if has_bar and (not cfg.trainer.get("enable_progress_bar", True) or not sys.stdout.isatty()):
        # no terminal (SLURM, CI): a log line every validation interval instead of a live bar

        callbacks = [c for c in callbacks if not isinstance(c, ProgressBar)]
        if cfg.trainer.get("enable_progress_bar", True):
            callbacks.append(ProgressLog(int(cfg.trainer.get("val_check_interval") or 100)))
    loggers = _instantiate_group(cfg.get("logger"))
    overrides = {} if any(isinstance(c, ProgressBar) for c in callbacks) else {"enable_progress_bar": False}
    from lightning.pytorch.plugins.environments import SLURMEnvironment

    if SLURMEnvironment.detect():  # brainfm's ResumeCheckpoint owns the preemption signal, not Lightning
        overrides["plugins"] = [SLURMEnvironment(auto_requeue=False)]
    trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False, **overrides)
    return datamodule, task, trainer


class TrainingInterrupted(Exception):
    """Training stopped on Ctrl-C after saving ``last.ckpt`` and ``summary.json``; ``command`` resumes it
    (``brainfm-train`` exits with status 130)."""

    def __init__(self, run_dir: Path, step: int, command: str) -> None:
        super().__init__(f"training in {run_dir} interrupted at step {step}; resume with: {command}")
        self.run_dir, self.step, self.command = run_dir, step, command


def _global_rank() -> int:
    """This process's global rank before Lightning sets up the strategy, read as Lightning reads it
    (``RANK``, ``LOCAL_RANK`` in the processes it launches, ``SLURM_PROCID`` under ``srun``); 0 in the
    process that starts a run."""
    for key in ("RANK", "LOCAL_RANK", "SLURM_PROCID"):
        if os.environ.get(key, "").isdigit():
            return int(os.environ[key])
    return 0


def resume_command(cfg: DictConfig, run_dir: Path) -> str:
    """The command line that resumes this run: ``brainfm-train`` with the overrides it was started with
    (Hydra's ``hydra.overrides.task``, shell-quoted) and ``ckpt_path=auto``; a job of a multirun resumes
    on its own with ``run_name=<run_name>/<job number>`` (its run directory). Outside Hydra's app (a
    config from :func:`brainfm.config.compose`) the overrides are not known: ``<overrides of this run>``."""
    import shlex

    from hydra.core.hydra_config import HydraConfig

    overrides: list[str] | None = None
    if HydraConfig.initialized():
        hydra_cfg = HydraConfig.get()
        output_dir = OmegaConf.select(hydra_cfg, "runtime.output_dir", default=None)
        if output_dir is not None and Path(output_dir).resolve() == run_dir.resolve():  # this run's app, not a stale one
            overrides = [o for o in hydra_cfg.overrides.task if o.split("=", 1)[0].lstrip("+~") not in ("ckpt_path", "overwrite")]
            if job_subdir():  # a multirun job: point at its run directory
                overrides = [o for o in overrides if o.split("=", 1)[0].lstrip("+~") != "run_name"]
                overrides.append(f"run_name={cfg.run_name}{job_subdir()}")
    if overrides is None:
        return f"brainfm-train <overrides of this run> run_name={cfg.run_name} ckpt_path=auto"
    return " ".join(["brainfm-train", *(shlex.quote(o) for o in overrides), "ckpt_path=auto"])


def _finished_already(cfg: DictConfig, resume: str | None) -> int | None:
    """The step of ``resume`` when it already reached ``trainer.max_steps`` (nothing left to train), else ``None``."""
    max_steps = cfg.trainer.get("max_steps")
    if resume is None or max_steps is None or int(max_steps) <= 0:
        return None
    step = checkpoint_step(resume)
    return step if step is not None and step >= int(max_steps) else None


def run(cfg: DictConfig) -> dict[str, float]:
    """Train; return the final logged metrics. Writes ``config.yaml`` and ``summary.json`` into the run
    directory (``paths.run_dir``); after an offline W&B run (``logger=wandb``) the summary's ``wandb_sync_command``
    and the last line printed are the command that uploads it.

    A run directory that holds checkpoints is never trained over from scratch: without a checkpoint to
    resume (``ckpt_path``, :func:`brainfm.runs.resolve_resume`) the run is refused before anything in it
    is written, unless ``overwrite=true``, which deletes the earlier run's outputs
    (:data:`brainfm.runs.RUN_OUTPUTS`) once the new run is built. A resumed run that already reached
    ``trainer.max_steps`` ends at once and leaves its directory as it is.

    Raises:
        CheckpointError: the run directory holds checkpoints and neither a resume nor ``overwrite=true``
            was asked for (:func:`brainfm.runs.refuse_fresh_start`); ``ckpt_path`` names no checkpoint;
            a sharded checkpoint directory the trainer's strategy cannot resume
            (:func:`brainfm.runs.check_resume_strategy`).
        TrainingInterrupted: Ctrl-C stopped training (``last.ckpt`` and ``summary.json`` are written,
            ``summary["interrupted"]`` is true); its ``command`` resumes the run.
    """
    run_dir = Path(cfg.paths.run_dir)
    name = os.path.relpath(run_dir, Path(cfg.paths.output_dir))
    resume = resolve_resume(cfg.get("ckpt_path"), run_dir)
    done = _finished_already(cfg, resume)
    if done is not None:
        if _global_rank() == 0:
            print(f"brainfm-train: {name} finished already at step {done} (trainer.max_steps={cfg.trainer.max_steps}); "
                  f"nothing to train. To train on, raise trainer.max_steps; to start over, ckpt_path=null "
                  f"overwrite=true.\n  checkpoint: {resume}")
        summary = run_dir / "summary.json"
        return json.loads(summary.read_text()).get("metrics", {}) if summary.is_file() else {}
    aside = None
    if resume is None:  # a fresh start: never over an earlier run's checkpoints
        if not cfg.get("overwrite", False):
            refuse_fresh_start(run_dir)
        elif _global_rank() == 0:
            aside = set_aside_outputs(run_dir)
    elif cfg.get("overwrite", False):  # a requeued SLURM job (ckpt_path=auto) must not start over
        log.warning("overwrite=true is ignored: resuming from %s (ckpt_path=%s); to replace the run, pass "
                    "ckpt_path=null overwrite=true", resume, cfg.get("ckpt_path"))
    config_text = OmegaConf.to_yaml(cfg, resolve=True)  # as composed (build() fills in data facts)
    try:
        datamodule, task, trainer = build(cfg)
        if resume is not None:
            check_resume_strategy(resume, trainer.strategy)
            check_training_start(datamodule, resume=resume)
    except BaseException:
        restore_outputs(aside)  # nothing of the earlier run is lost to a run that did not start
        raise
    if aside is not None:
        log.info("overwrite=true: removed the outputs of the earlier run in %s", run_dir)
        discard_outputs(aside)
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(run_dir / "config.yaml", config_text)
    trainer.fit(task, datamodule=datamodule, ckpt_path=resume)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    interrupted = any(getattr(c, "interrupted", False) for c in trainer.callbacks)
    summary = {
        "experiment": cfg.experiment_name,
        "run_dir": str(run_dir),
        "global_step": int(trainer.global_step),
        "interrupted": interrupted,
        "resumed_from": resume,
        "last_checkpoint": str(run_dir / "checkpoints" / "last.ckpt"),
        "best_checkpoint": getattr(trainer.checkpoint_callback, "best_model_path", None),
        "metrics": metrics,
    }
    command = resume_command(cfg, run_dir) if interrupted else None
    if command:
        summary["resume_command"] = command
    # an offline W&B run (logger=wandb): the command that uploads it from a machine with internet
    sync = next((c for c in (getattr(lg, "sync_command", None) for lg in trainer.loggers) if c), None)
    if sync:
        summary["wandb_sync_command"] = sync
    if trainer.is_global_zero:
        atomic_write_text(run_dir / "summary.json", json.dumps(summary, indent=2))
        shown = "  ".join(f"{k}={v:.4f}" for k, v in sorted(metrics.items()) if k.startswith(("train/loss", "val/")))
        synced = f"\n  W&B (offline), upload from a login node with: {sync}" if sync else ""
        if interrupted:
            print(f"brainfm-train: {name} interrupted (Ctrl-C) at step {trainer.global_step}: {shown}\n"
                  f"  checkpoint: {summary['last_checkpoint']}\n"
                  f"  resume with: {command}{synced}", flush=True)
        else:
            print(f"brainfm-train: {name} finished at step {trainer.global_step}: {shown}\n"
                  f"  checkpoint: {summary['last_checkpoint']}{synced}")
    if interrupted:
        raise TrainingInterrupted(run_dir, int(trainer.global_step), command)
    return metrics


