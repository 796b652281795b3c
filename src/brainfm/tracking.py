"""Experiment tracking that survives resuming, and training throughput.

- :class:`ResumableCSVLogger`: CSV metrics that a resumed run extends instead of overwriting.
- :class:`ResumableMLFlowLogger`: MLflow (``logger=mlflow``); a resumed run continues the same MLflow run.
- :func:`neptune_removed`: what ``logger=neptune`` raises.
- :class:`TrainingThroughput`: samples/s, TRs/s and, on GPU, model FLOPs utilisation (MFU).

Lightning's ``CSVLogger`` deletes an existing ``metrics.csv`` when it starts, so a resumed (or
requeued) run would lose the history of its first part. :class:`ResumableCSVLogger` keeps it and,
when training resumes from a checkpoint at global step ``G``, drops the rows of steps ``>= G``
that were logged after that checkpoint was written: the file then holds every optimizer step
exactly once.
"""

from __future__ import annotations

import csv
import logging
import os
import time
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.loggers.csv_logs import _ExperimentWriter as _FabricWriter
from lightning.pytorch.callbacks import Callback, ThroughputMonitor
from lightning.pytorch.loggers import CSVLogger, MLFlowLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter

from brainfm.errors import ConfigError

_log = logging.getLogger("brainfm")


class _KeepingWriter(ExperimentWriter):
    def _check_log_dir_exists(self) -> None:  # keep the previous metrics.csv
        if os.path.isfile(self.metrics_file_path):
            with open(self.metrics_file_path, newline="") as f:
                header = next(csv.reader(f), [])
            self.metrics_keys = sorted(header)


class ResumableCSVLogger(CSVLogger):
    """``CSVLogger`` that appends to an existing ``metrics.csv`` (same arguments)."""

    @property
    def experiment(self) -> _FabricWriter:
        if self._experiment is None:
            os.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _KeepingWriter(log_dir=self.log_dir)
        return self._experiment

    def truncate(self, global_step: int) -> None:
        """Remove rows logged at steps ``>= global_step`` (called when a run resumes)."""
        path = self.experiment.metrics_file_path
        if not os.path.isfile(path):
            return
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            fields = reader.fieldnames or []
            rows = [r for r in reader if r.get("step") in (None, "") or int(float(r["step"])) < global_step]
        tmp = f"{path}.tmp-{os.getpid()}"
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=fields)
            writer.writeheader()
            writer.writerows(rows)
        os.replace(tmp, path)


class ProgressLog(Callback):
    """A progress line in the log every ``every_n_steps`` optimizer steps, for output that is not a
    terminal (SLURM logs, CI), where a live progress bar prints garbage:
    ``step 500/2500  train/loss=0.0123  val/loss=0.4470  7.4 steps/s``."""

    def __init__(self, every_n_steps: int = 100) -> None:
        self.every_n_steps = max(1, int(every_n_steps))
        self._t0: float | None = None
        self._step0 = 0

    def on_train_start(self, trainer, pl_module) -> None:
        self._t0, self._step0 = time.perf_counter(), trainer.global_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if step % self.every_n_steps or step == self._step0 or not trainer.is_global_zero:
            return
        rate = (step - self._step0) / max(time.perf_counter() - self._t0, 1e-9)
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k in ("train/loss", "val/loss")}
        shown = "  ".join(f"{k}={v:.4f}" for k, v in sorted(metrics.items()))
        total = trainer.max_steps if trainer.max_steps and trainer.max_steps > 0 else "?"
        _log.info(f"step {step}/{total}  {shown}  {rate:.1f} steps/s")


class ResumableMLFlowLogger(MLFlowLogger):
    """Lightning's ``MLFlowLogger`` whose run survives a requeue: the MLflow run id is kept in
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
            self._id_file.parent.mkdir(parents=True, exist_ok=True)
            tmp = self._id_file.with_name(f".{self._id_file.name}.tmp-{os.getpid()}")
            tmp.write_text(self._run_id)
            os.replace(tmp, self._id_file)
        return client


def neptune_removed(**_: Any):
    """``logger=neptune``: Neptune's hosted service is gone; say so and name the replacements.

    Raises:
        ConfigError: always.
    """
    raise ConfigError(
        "logger=neptune is not available: Neptune's hosted service was shut down on 2026-03-05 (hosted data "
        "deleted) and Lightning >= 2.6.4 removed its NeptuneLogger. Use logger=mlflow (a local SQLite "
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
