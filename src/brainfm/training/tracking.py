"""Experiment tracking that survives resuming, and training throughput.

- :class:`ResumableCSVLogger`: CSV metrics that a resumed run extends instead of overwriting.
- :class:`ResumableMLFlowLogger`: MLflow (``logger=mlflow``); a resumed run continues the same MLflow run.
- :class:`WandbLogger`: Weights & Biases (``logger=wandb``), offline inside SLURM jobs; a resumed run continues
  the same W&B run.
- :class:`TensorBoardLogger`: Lightning's, with brainfm's step convention.
- :class:`ProgressLog`, :class:`StepProgressBar`: progress in a log file, and in a terminal.
- :func:`neptune_removed`: what ``logger=neptune`` raises.
- :class:`TrainingThroughput`: samples/s, TRs/s and, on GPU, model FLOPs utilisation (MFU).

Lightning's ``CSVLogger`` deletes an existing ``metrics.csv`` when it starts, so a resumed (or
requeued) run would lose the history of its first part. :class:`ResumableCSVLogger` keeps it and,
when training resumes from a checkpoint at global step ``G``, drops the rows of steps ``> G``
that were logged after that checkpoint was written: the file then holds every optimizer step
exactly once.

One step convention everywhere (log lines, ``metrics.csv``, TensorBoard, MLflow, W&B, checkpoint names
``best-step<N>.ckpt``, "saved ... at step N"): ``step`` is the number of optimizer steps completed,
``trainer.global_step``; 1 for the first step, ``max_steps`` for the last; validation rows carry the
step they validated (``val_check_interval``, ``2 * val_check_interval``, ...). Lightning's loggers
number rows from 0 (its logging step is the number of steps completed before the current one), so
brainfm's loggers (:class:`StepsCompleted`) write Lightning's step + 1. The learning-rate row of step
``N`` is the rate that step ``N`` used.
"""

from __future__ import annotations

import csv
import logging
import os
import re
import secrets
import shlex
import time
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.loggers.csv_logs import _ExperimentWriter as _FabricWriter
from lightning.fabric.utilities.logger import _add_prefix, _convert_params
from lightning.pytorch.callbacks import Callback, RichProgressBar, ThroughputMonitor
from lightning.pytorch.loggers import CSVLogger, MLFlowLogger
from lightning.pytorch.loggers import TensorBoardLogger as _TensorBoardLogger
from lightning.pytorch.loggers import WandbLogger as _LightningWandbLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.loggers.logger import rank_zero_experiment
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from omegaconf import OmegaConf

from brainfm.errors import ConfigError
from brainfm.io import atomic_path, atomic_write_text

_log = logging.getLogger("brainfm")


class StepsCompleted:
    """Mixin for a Lightning logger: the ``step`` written is the number of optimizer steps completed.

    Lightning logs every training-loop row (``train/*``, ``val/*`` after the validation at step ``N``,
    ``lr-*`` before step ``N``, throughput) at its logging step, ``N - 1`` when the row belongs to the
    ``N``-th optimizer step; this mixin writes ``N``. Code that calls a logger itself logs at
    Lightning's step too (``trainer.global_step - 1`` for "after ``global_step`` steps").
    """

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        super().log_metrics(metrics, None if step is None else int(step) + 1)


class _KeepingWriter(ExperimentWriter):
    def _check_log_dir_exists(self) -> None:  # keep the previous metrics.csv
        if os.path.isfile(self.metrics_file_path):
            with open(self.metrics_file_path, newline="") as f:
                header = next(csv.reader(f), [])
            self.metrics_keys = sorted(header)


class ResumableCSVLogger(StepsCompleted, CSVLogger):
    """``CSVLogger`` that appends to an existing ``metrics.csv`` (same arguments); its ``step`` column is
    the number of optimizer steps completed (:class:`StepsCompleted`)."""

    @property
    def experiment(self) -> _FabricWriter:
        if self._experiment is None:
            os.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _KeepingWriter(log_dir=self.log_dir)
        return self._experiment

    def truncate(self, global_step: int) -> None:
        """Remove rows logged at steps ``> global_step``: what the run logged after the checkpoint of
        ``global_step`` optimizer steps that it resumes from was written (called when a run resumes)."""
        path = self.experiment.metrics_file_path
        if not os.path.isfile(path):
            return
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            fields = reader.fieldnames or []
            rows = [r for r in reader if r.get("step") in (None, "") or int(float(r["step"])) <= global_step]
        with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=fields)
            writer.writeheader()
            writer.writerows(rows)


class TensorBoardLogger(StepsCompleted, _TensorBoardLogger):
    """Lightning's ``TensorBoardLogger`` (same arguments) whose steps are optimizer steps completed
    (:class:`StepsCompleted`), as in ``metrics.csv``."""


class ProgressLog(Callback):
    """A progress line in the log every ``every_n_steps`` optimizer steps, for output that is not a
    terminal (SLURM logs, CI), where a live progress bar prints garbage:
    ``step 500/2500  train/loss=0.0123  val/loss=0.4470  7.4 steps/s``.

    ``step`` is the number of optimizer steps completed (the ``step`` of ``metrics.csv`` and of the
    checkpoint names); ``train/loss`` is that step's. At a step that validates the line is written after
    that validation and carries its ``val/loss`` (the value ``metrics.csv`` holds at the same step); a
    line at a step without validation shows no ``val/loss`` rather than an older one. The rate is steps
    since training (re)started over the wall-clock time, validations included.
    """

    def __init__(self, every_n_steps: int = 100) -> None:
        self.every_n_steps = max(1, int(every_n_steps))
        self._t0: float | None = None
        self._step0 = 0
        self._pending: tuple[int, dict[str, float], float] | None = None

    def on_train_start(self, trainer, pl_module) -> None:
        self._t0, self._step0 = time.perf_counter(), trainer.global_step
        self._pending = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._flush(trainer)
        step = trainer.global_step
        if step % self.every_n_steps or step == self._step0 or not trainer.is_global_zero:
            return
        rate = (step - self._step0) / max(time.perf_counter() - self._t0, 1e-9)
        train = {k: float(v) for k, v in trainer.callback_metrics.items() if k == "train/loss"}
        # written after the validation Lightning may run at the end of this step (on_validation_end), else at
        # the next batch or the end of training
        self._pending = (step, train, rate)

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.state.fn == "fit" and not trainer.sanity_checking:
            self._flush(trainer, validated=True)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._flush(trainer)

    def on_train_end(self, trainer, pl_module) -> None:
        self._flush(trainer)

    def _flush(self, trainer, validated: bool = False) -> None:
        if self._pending is None:
            return
        step, metrics, rate = self._pending
        self._pending = None
        if validated:
            metrics.update({k: float(v) for k, v in trainer.callback_metrics.items() if k == "val/loss"})
        shown = "  ".join(f"{k}={v:.4f}" for k, v in sorted(metrics.items()))
        total = trainer.max_steps if trainer.max_steps and trainer.max_steps > 0 else "?"
        _log.info(f"step {step}/{total}  {shown}  {rate:.1f} steps/s")


class StepProgressBar(RichProgressBar):
    """Lightning's ``RichProgressBar`` (same arguments) that counts optimizer steps in a run bounded by
    ``trainer.max_steps`` (``max_epochs=-1``, brainfm's runs): one bar for the whole run, described
    ``step N/max_steps`` (Lightning's shows ``Epoch 0/-2`` there and restarts at every epoch). A run
    bounded by epochs gets Lightning's bar.
    """

    def _by_steps(self) -> bool:
        t = self.trainer
        return (t.max_epochs is None or t.max_epochs < 0) and t.max_steps is not None and t.max_steps > 0

    def _get_train_description(self, current_epoch: int) -> str:
        if not self._by_steps():
            return super()._get_train_description(current_epoch)
        text = f"step {self.trainer.global_step}/{self.trainer.max_steps}"
        return f"{text:{len(self.validation_description)}}"  # as wide as "Validation": no flicker

    @property
    def total_train_batches(self) -> int | float:
        return self.trainer.max_steps if self._by_steps() else super().total_train_batches

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        if not self._by_steps() or self.progress is None or self.train_progress_bar_id is None:
            super().on_train_epoch_start(trainer, pl_module)
        if self._by_steps():
            self._show_step(trainer)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if not self._by_steps():
            return super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if not self.is_disabled and self.train_progress_bar_id is None:  # resumed mid-epoch
            self._initialize_train_progress_bar_id()
        self._show_step(trainer)
        self._update_metrics(trainer, pl_module)
        self.refresh()

    def _show_step(self, trainer) -> None:
        if self.progress is not None and self.is_enabled and self.train_progress_bar_id is not None:
            self.progress.update(self.train_progress_bar_id, completed=trainer.global_step,
                                 total=trainer.max_steps, description=self._get_train_description(0))


class ResumableMLFlowLogger(StepsCompleted, MLFlowLogger):
    """Lightning's ``MLFlowLogger`` (steps: optimizer steps completed, :class:`StepsCompleted`) whose run survives a requeue: the MLflow run id is kept in
    ``<run_dir>/mlflow_run_id``, and a run directory that has one logs into that MLflow run again
    (a requeued SLURM job continues its curves instead of starting a second run).

    Args:
        run_dir: the brainfm run directory.
        tracking_uri: ``sqlite:///<path>.db`` (a local database file, MLflow 3's local backend; its
            plain-folder file store is in maintenance mode and refuses to start by default) or
            ``http(s)://host:port`` for a shared tracking server.
        **kwargs: the rest of ``MLFlowLogger``'s arguments (``experiment_name``, ``run_name``,
            ``artifact_location``, ``tags``, ...).

    Raises:
        ConfigError: mlflow is not installed.
    """

    def __init__(self, run_dir: str, **kwargs: Any) -> None:
        try:
            import mlflow  # noqa: F401
        except ImportError as e:
            raise ConfigError("logger=mlflow needs the mlflow package: pip install 'mlflow-skinny>=3,<4'") from e
        self._id_file = Path(run_dir) / "mlflow_run_id"
        if kwargs.get("run_id") is None and self._id_file.is_file():
            kwargs["run_id"] = self._id_file.read_text().strip()
        uri = kwargs.get("tracking_uri") or ""
        if uri.startswith("sqlite:///"):
            Path(uri[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
        super().__init__(**kwargs)

    @property
    def experiment(self):
        client = super().experiment
        if self._id_file is not None and not self._id_file.is_file() and self._run_id is not None:
            atomic_write_text(self._id_file, self._run_id)
        return client


#: what W&B accepts in a run id: it refuses ``:;,#?/'`` and the URL of a run carries its id, so brainfm keeps letters,
#: digits, ``-`` and ``_``; at most 64 characters
_WANDB_ID_UNSAFE = re.compile(r"[^A-Za-z0-9_-]+")
_WANDB_ID_MAX = 64
_WANDB_MODES = ("online", "offline", "disabled")


def wandb_mode(mode: str | None = None) -> str:
    """The W&B mode of a run (``online``, ``offline`` or ``disabled``): ``mode`` (``logger.wandb.mode``) when set,
    else ``$WANDB_MODE`` when set, else ``offline`` inside a SLURM job (``$SLURM_JOB_ID`` set: Perlmutter's compute
    nodes have no outbound internet; ``wandb sync`` uploads the run from a login node) and ``online`` elsewhere.
    W&B's older names ``dryrun`` and ``run`` read as ``offline`` and ``online``.

    Raises:
        ConfigError: a mode other than those three, named with where it came from.
    """
    if mode is not None:
        source = f"logger.wandb.mode={mode}"
    elif os.environ.get("WANDB_MODE"):
        mode = os.environ["WANDB_MODE"]
        source = f"WANDB_MODE={mode}"
    else:
        return "offline" if os.environ.get("SLURM_JOB_ID") else "online"
    value = str(mode).strip().lower()
    value = {"dryrun": "offline", "run": "online"}.get(value, value)
    if value not in _WANDB_MODES:
        raise ConfigError(f"{source}: the W&B mode is online, offline or disabled. Fix: logger.wandb.mode=offline "
                          "(or online, disabled; null picks offline inside a SLURM job, online elsewhere)")
    return value


def wandb_run_id(identity: str, token: str) -> str:
    """A W&B run id for the brainfm run ``identity`` (``<experiment>/<run_name>[/<job number>]``, its run directory
    under ``paths.output_dir``): ``<identity>-<token>`` with every run of characters W&B does not take in an id
    replaced by ``-``, at most 64 characters (a longer identity loses its end, the token stays):
    ``wandb_run_id("gpt/123_4/0", "9f3a61c2") == "gpt-123_4-0-9f3a61c2"``.

    ``token`` is drawn once, when the run starts from scratch, and kept in the run directory
    (:class:`WandbLogger`): the id stays the same for every resume of the run, and two runs with the same
    identity (``overwrite=true``, another ``paths.output_dir``, ``run_name=local`` on two machines) never write into
    one W&B run.
    """
    base = _WANDB_ID_UNSAFE.sub("-", identity).strip("-") or "run"
    return f"{base[:_WANDB_ID_MAX - len(token) - 1]}-{token}"


class _WandbAtStep(_LightningWandbLogger):
    """Lightning's ``WandbLogger`` sending each row at its step as W&B's own step (``run.log(..., step=N)``), and
    continuing the W&B run of the brainfm run (the arguments are :class:`WandbLogger`'s)."""

    def __init__(self, run_dir: str, name: str, project: str = "brainfm", entity: str | None = None,
                 group: str | None = None, tags: list[str] | None = None, mode: str | None = None,
                 settings: dict[str, Any] | None = None, **kwargs: Any) -> None:
        try:  # optional dependency (the extra brainfm[wandb]): imported only by logger=wandb
            import wandb
        except ImportError as e:
            raise ConfigError("logger=wandb needs the wandb package: pip install 'brainfm[wandb]'") from e
        self._id_file = Path(run_dir) / "wandb_run_id"
        run_id = kwargs.pop("id", None)
        if run_id is None and self._id_file.is_file():
            run_id = self._id_file.read_text().strip()
        mode = wandb_mode(mode)
        # Quiet: brainfm prints the run directory and, for an offline run, the one `wandb sync` command that uploads
        # every part of a resumed run; W&B's own banner names only the last part and its offline notes, sparklines and
        # sync hint would repeat them. Offline: nothing on the screen (silent; W&B's warnings go to its debug.log in
        # <run_dir>/wandb). Online: quiet keeps the run's URL and W&B's upload warnings and errors. console="off":
        # W&B does not capture stdout/stderr (train.log in the run directory and the SLURM job log hold them).
        quiet = {"silent": True} if mode == "offline" else {"quiet": True}
        super().__init__(name=name, save_dir=str(run_dir), id=run_id or wandb_run_id(name, secrets.token_hex(4)),
                         project=project, entity=entity, group=group, tags=list(tags) if tags else None, mode=mode,
                         settings=wandb.Settings(**{"console": "off", **quiet, **(settings or {})}), **kwargs)
        if self._wandb_init.get("anonymous") is None:  # Lightning passes anonymous=None; W&B warns that it is deprecated
            self._wandb_init.pop("anonymous", None)
        self._next_step = 0
        self._dropped = False
        self._offline_run = False

    @property
    @rank_zero_experiment
    def experiment(self):
        if self._experiment is None:
            import wandb  # optional dependency, imported in __init__ already

            Path(self.save_dir).mkdir(parents=True, exist_ok=True)
            self._wandb_init["config"] = self._run_config()
            try:
                run = super().experiment
            except wandb.errors.Error as e:
                raise ConfigError(
                    f"logger=wandb could not start W&B run {self._wandb_init['id']} ({e}). Fix: log in once with "
                    "`wandb login` (or set WANDB_API_KEY), or log offline with logger.wandb.mode=offline and upload "
                    f"the run later with `wandb sync {os.path.join(self.save_dir, 'wandb')}`") from e
            self._started(run)
        return self._experiment

    def _run_config(self) -> dict[str, Any] | None:
        """The composed config, as :func:`brainfm.training.run` wrote it to ``<run_dir>/config.yaml`` before training."""
        path = Path(self.save_dir) / "config.yaml"
        return OmegaConf.to_container(OmegaConf.load(path)) if path.is_file() else None

    def _started(self, run) -> None:
        if getattr(run, "disabled", False):
            return
        if not self._id_file.is_file():
            atomic_write_text(self._id_file, run.id)
        self._offline_run = bool(run.offline)
        # online, a resumed W&B run already holds the steps before run.step; W&B drops rows at lower steps (its steps
        # only increase), each with a warning: brainfm leaves them out with one line
        self._next_step = int(run.step) if run.resumed else 0

    @rank_zero_only
    def log_hyperparams(self, params: Any) -> None:
        """The task's saved hyper-parameters, under ``hparams`` in the W&B config (its top level is the composed
        config)."""
        super().log_hyperparams({"hparams": _convert_params(params)})

    @rank_zero_only
    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        if step is None:
            return super().log_metrics(metrics, None)
        if step < self._next_step:
            if not self._dropped:
                self._dropped = True
                _log.info(f"W&B run {self.version} holds steps up to {self._next_step - 1} already (logged before the "
                          f"checkpoint this run resumed from): this run's rows of those steps are in metrics.csv, not "
                          f"in W&B")
            return
        metrics = _add_prefix(metrics, self._prefix, self.LOGGER_JOIN_CHAR)
        self.experiment.log({**metrics, "trainer/global_step": step}, step=int(step))

    @rank_zero_only
    def finalize(self, status: str) -> None:
        if self._experiment is None:
            return
        import wandb  # optional dependency, imported in __init__ already

        super().finalize(status)
        self._experiment.finish(exit_code=0 if status in ("success", "finished") else 1)
        self._experiment = None
        # finish() returns before W&B's service has closed the run's file (offline, it writes 32 KiB blocks): teardown
        # waits for it, so the files are complete when brainfm-train prints the sync command, and before a requeued
        # SLURM job is killed (ResumeCheckpoint finalizes the loggers before `scontrol requeue`)
        wandb.teardown()

    @property
    def sync_command(self) -> str | None:
        """``wandb sync <run_dir>/wandb`` (absolute) for a run that logged offline, else ``None``: it uploads every part
        of the run (each resume adds one) in order, skipping parts uploaded already."""
        if not self._offline_run:
            return None
        return f"wandb sync {shlex.quote(os.path.abspath(os.path.join(self.save_dir, 'wandb')))}"


class WandbLogger(StepsCompleted, _WandbAtStep):
    """Weights & Biases (``logger=wandb``, https://wandb.ai): Lightning's ``WandbLogger`` with brainfm's run rules.

    - Steps: W&B's step of a row is brainfm's step (optimizer steps completed, :class:`StepsCompleted`), the ``step``
      of ``metrics.csv`` for the same values; ``trainer/global_step`` (Lightning's x-axis) holds the same number.
    - Files: in ``<run_dir>/wandb`` (``offline-run-<time>-<id>`` or ``run-<time>-<id>``, one per start of the run).
    - Run id: :func:`wandb_run_id` of the run's identity, kept in ``<run_dir>/wandb_run_id``, with
      ``resume="allow"``: a requeued SLURM job or a ``ckpt_path=auto`` resume continues the same W&B run; every job
      of a multirun has its own; ``overwrite=true`` starts a new one.
    - Mode: :func:`wandb_mode` (offline inside a SLURM job unless ``mode`` or ``$WANDB_MODE`` say otherwise). An
      offline run ends with :attr:`sync_command`, which ``brainfm-train`` prints and writes to ``summary.json``.
    - Config: the composed config (``<run_dir>/config.yaml``) is the W&B run's config, the task's saved
      hyper-parameters under ``hparams``.
    - Quiet: W&B prints nothing offline, only the run's URL and its warnings online, and does not capture the
      console.

    A run resumed from a checkpoint older than the last step W&B holds (after a crash: a requeue and Ctrl-C save the
    step they stop at) keeps W&B's first values of the steps in between; ``metrics.csv`` holds the resumed run's.

    Args:
        run_dir: the brainfm run directory.
        name: the run's identity, ``<experiment>/<run_name>[/<job number>]``: the W&B run name and the base of its id.
        project, entity, group, tags: W&B's (``entity=None``: the W&B account's default entity).
        mode: ``online``, ``offline``, ``disabled`` or ``None`` (:func:`wandb_mode`).
        settings: more ``wandb.Settings`` fields, over brainfm's quiet ones (``{console: wrap}`` uploads the console).
        **kwargs: the rest of Lightning's ``WandbLogger`` / ``wandb.init`` arguments (``notes``, ``job_type``, ...).

    Raises:
        ConfigError: wandb is not installed; a mode that is not one of the three; W&B could not start the run
            (online without a login or without internet), with the fixes.
    """


def neptune_removed(**_: Any):
    """``logger=neptune``: Neptune's hosted service is gone; say so and name the replacements.

    Raises:
        ConfigError: always.
    """
    raise ConfigError(
        "logger=neptune is not available: Neptune's hosted service was shut down on 2026-03-05 (hosted data "
        "deleted) and Lightning >= 2.6.4 removed its NeptuneLogger. Use logger=wandb (Weights & Biases, offline "
        "inside a SLURM job), logger=mlflow (a local SQLite "
        "database by default, or logger.mlflow.tracking_uri=http://<server>:5000 for a shared server) or "
        "logger=tensorboard (logger=default writes TensorBoard and CSV)."
    )


def _samples(batch: dict) -> int:
    for key in ("bold", "volume", "rest", "roi"):
        if key in batch and torch.is_tensor(batch[key]):
            return int(batch[key].shape[0])
    return int(next(v for v in batch.values() if torch.is_tensor(v)).shape[0])


def _trs(batch: dict) -> int:
    """TRs in a batch: ROI windows ``bold (B, T, V)``, volume clips ``volume (B, C, H, W, D, T)``."""
    if "bold" in batch:
        return int(batch["bold"].shape[0] * batch["bold"].shape[1])
    if "volume" in batch:
        return int(batch["volume"].shape[0] * batch["volume"].shape[-1])
    return 0


class TrainingThroughput(ThroughputMonitor):
    """Lightning's ``ThroughputMonitor`` with brainfm's batch layout, logged as
    ``throughput/samples_per_sec``, ``throughput/trs_per_sec`` (TRs seen per second) and
    ``throughput/batches_per_sec`` (summed over ranks) and, on a GPU whose peak Lightning knows
    (A100: 312 TFLOP/s bf16), ``throughput/mfu``: model FLOPs utilisation per device.

    The FLOPs of a training step are measured once, on the first batch, with
    ``torch.utils.flop_counter.FlopCounterMode`` around a forward pass (``no_grad``, eval mode: no
    batch-norm statistics change) and multiplied by 3 (backward = 2 x forward, the convention of
    PaLM's MFU, Chowdhery et al. 2022). The forward runs before the task re-seeds its random
    stream for that step, so the run's numbers are unchanged. Not on CPU: there is no meaningful
    peak there and the extra forward would cost time.

    Args:
        window_size: batches over which rates are averaged.
    """

    def __init__(self, window_size: int = 20, measure_flops: bool = True) -> None:
        super().__init__(batch_size_fn=_samples, length_fn=_trs, window_size=max(2, int(window_size)))
        self.measure_flops = bool(measure_flops)
        self._flops_done = False

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self._flops_done:
            return
        self._flops_done = True
        if not (self.measure_flops and trainer.strategy.root_device.type == "cuda" and self.available_flops):
            return
        from torch.utils.flop_counter import FlopCounterMode

        was_training = pl_module.training
        try:
            pl_module.eval()
            with torch.no_grad(), FlopCounterMode(display=False) as counter:
                pl_module(batch)
            pl_module.flops_per_batch = 3 * counter.get_total_flops()
        except Exception as e:  # noqa: BLE001 - a model the counter cannot trace still trains
            _log.warning(f"throughput: FLOPs not measured ({type(e).__name__}: {e}); MFU not logged")
        finally:
            pl_module.train(was_training)

    def _update(self, trainer, pl_module, batch, iter_num) -> None:
        self._module_has_flops = hasattr(pl_module, "flops_per_batch")  # no warning when not measured
        super()._update(trainer, pl_module, batch, iter_num)

    def _compute(self, trainer, iter_num=None) -> None:
        if not trainer._logger_connector.should_update_logs:
            return
        stage = trainer.state.stage
        raw = self._throughputs[stage].compute()
        prefix = "" if trainer.world_size > 1 else "device/"  # totals over ranks when there are several
        names = {"samples_per_sec": "samples_per_sec", "items_per_sec": "trs_per_sec", "batches_per_sec": "batches_per_sec"}
        metrics = {f"throughput/{new}": raw[prefix + old] for old, new in names.items() if prefix + old in raw}
        if "device/mfu" in raw:
            metrics["throughput/mfu"] = raw["device/mfu"]
        if metrics and stage.value == "train":
            trainer._logger_connector.log_metrics(metrics, step=iter_num)
