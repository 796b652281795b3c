"""Experiment tracking that survives resuming.

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

from lightning.fabric.loggers.csv_logs import _ExperimentWriter as _FabricWriter
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter


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
