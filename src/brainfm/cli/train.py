"""``brainfm-train`` / ``python -m brainfm.cli.train``: compose the config, build the data,
task, loggers and callbacks, and fit. Any key is overridable (``trainer.max_steps=100``);
``--cfg job`` prints the composed config; ``ckpt_path=last`` resumes the run.

``trainer.compile=true`` (``trainer.compile_mode``) compiles the backbone with ``torch.compile``.
The two keys are brainfm's, not Lightning's: the ``trainer`` group's ``_target_``,
:class:`brainfm.tasks.base.Trainer`, takes them off before building Lightning's ``Trainer`` (so
every place that instantiates the group, here, the scale test and the inference entry points,
accepts them), and the task compiles in ``configure_model`` (:func:`brainfm.tasks.base.compile_backbone`).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import hydra
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict

from brainfm.cli.common import exit_on_brainfm_error, tidy_logging
from brainfm.config import config_dir


def _instantiate(node: DictConfig, **kwargs: Any) -> Any:
    """``hydra.utils.instantiate(node, _convert_="all", **kwargs)``; Hydra wraps errors, brainfm's own
    (a clear message) surface as they are."""
    from brainfm.cli.common import brainfm_cause

    try:
        return instantiate(node, _convert_="all", **kwargs)
    except Exception as exc:
        cause = brainfm_cause(exc)
        if cause is not None and cause is not exc:
            raise cause from None
        raise


def _instantiate_group(group: DictConfig | None) -> list[Any]:
    return [_instantiate(node) for node in (group or {}).values() if node is not None]


def build(cfg: DictConfig):
    """Build ``(datamodule, task, trainer)`` from a composed config (data set up and checked)."""
    import lightning as L

    L.seed_everything(int(cfg.seed), workers=True, verbose=False)
    datamodule = instantiate(cfg.data, _convert_="all")
    datamodule.setup("fit")
    meta = datamodule.meta
    with open_dict(cfg):
        if cfg.data.get("n_rois") is None and "n_rois" in cfg.model:
            cfg.model.n_rois = meta["n_rois"]
    model_cfg = OmegaConf.to_container(cfg.model, resolve=True)
    task = instantiate(cfg.task, model=model_cfg, data_meta=meta, seed=int(cfg.seed), _recursive_=False)
    callbacks = _instantiate_group(cfg.get("callbacks"))
    from lightning.pytorch.callbacks import ProgressBar

    has_bar = any(isinstance(c, ProgressBar) for c in callbacks)
    if has_bar and (not cfg.trainer.get("enable_progress_bar", True) or not sys.stdout.isatty()):
        # no terminal (SLURM, CI): a log line every validation interval instead of a live bar
        from brainfm.tracking import ProgressLog

        callbacks = [c for c in callbacks if not isinstance(c, ProgressBar)]
        if cfg.trainer.get("enable_progress_bar", True):
            callbacks.append(ProgressLog(int(cfg.trainer.get("val_check_interval") or 100)))
    loggers = _instantiate_group(cfg.get("logger"))
    overrides = {} if any(isinstance(c, ProgressBar) for c in callbacks) else {"enable_progress_bar": False}
    from lightning.pytorch.plugins.environments import SLURMEnvironment

    if SLURMEnvironment.detect():  # brainfm's ResumeCheckpoint owns the preemption signal, not Lightning
        overrides["plugins"] = [SLURMEnvironment(auto_requeue=False)]
    trainer = _instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False, **overrides)
    return datamodule, task, trainer


def run(cfg: DictConfig) -> dict[str, float]:
    """Train; return the final logged metrics. Writes ``config.yaml`` and ``summary.json`` into
    the run directory.

    Raises:
        CheckpointError: ``ckpt_path`` names no checkpoint, or a sharded checkpoint directory the
            trainer's strategy cannot resume (:func:`brainfm.runs.check_resume_strategy`).
    """
    from brainfm.runs import check_resume_strategy, resolve_resume

    run_dir = Path(cfg.paths.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    resume = resolve_resume(cfg.get("ckpt_path"), run_dir)
    datamodule, task, trainer = build(cfg)
    if resume is not None:  # a sharded directory only on the strategy that wrote it
        check_resume_strategy(resume, trainer.strategy)
    trainer.fit(task, datamodule=datamodule, ckpt_path=resume)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    summary = {
        "experiment": cfg.experiment_name,
        "run_dir": str(run_dir),
        "global_step": int(trainer.global_step),
        "resumed_from": resume,
        "last_checkpoint": str(run_dir / "checkpoints" / "last.ckpt"),
        "best_checkpoint": getattr(trainer.checkpoint_callback, "best_model_path", None),
        "metrics": metrics,
    }
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    if trainer.is_global_zero:
        shown = "  ".join(f"{k}={v:.4f}" for k, v in sorted(metrics.items()) if k.startswith(("train/loss", "val/")))
        print(f"brainfm-train: {cfg.experiment_name}/{run_dir.name} finished at step {trainer.global_step}: {shown}\n"
              f"  checkpoint: {summary['last_checkpoint']}")
    return metrics


@hydra.main(version_base="1.3", config_path=str(config_dir()), config_name="train")
def _main(cfg: DictConfig) -> None:
    tidy_logging()
    with exit_on_brainfm_error("brainfm-train"):
        run(cfg)


def main() -> None:
    _main()


if __name__ == "__main__":
    main()
