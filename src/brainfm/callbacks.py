"""The resume point of a run: ``<run_dir>/checkpoints/last.ckpt``, and the one owner of the
preemption signal.

:class:`ResumeCheckpoint` writes ``last.ckpt`` every ``every_n_steps`` optimizer steps, at the end
of training, and when the job receives the preemption signal (SLURM sends it ``--signal=USR1@<s>``
seconds before the time limit). On the signal it finishes the current optimizer step, saves,
stops training, flushes the loggers and then asks SLURM to requeue the job (``scontrol requeue``). The requeued
job keeps its job id, hence its run directory, and resumes from ``last.ckpt`` (``ckpt_path=auto``,
the default under SLURM). Lightning's own SLURM auto-requeue is switched off by ``brainfm-train`` so
that exactly one handler owns the signal. Under DDP every rank may see the signal at a slightly
different step; the ranks agree on the step to stop at through one all-reduce of a flag per step.

Writes are atomic: a checkpoint is written under a temporary name and renamed, so a job killed
while saving (``kill -9``) leaves the previous ``last.ckpt`` intact.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import threading
from pathlib import Path

from lightning.pytorch.callbacks import Callback

_log = logging.getLogger("brainfm")


def slurm_job_ref() -> str | None:
    env = os.environ
    if env.get("SLURM_ARRAY_JOB_ID") and env.get("SLURM_ARRAY_TASK_ID"):
        return f"{env['SLURM_ARRAY_JOB_ID']}_{env['SLURM_ARRAY_TASK_ID']}"
    return env.get("SLURM_JOB_ID")


class ResumeCheckpoint(Callback):
    """Periodic, final and on-signal ``last.ckpt``, and SLURM requeue on the preemption signal.

    Args:
        dirpath: checkpoint folder (``<run_dir>/checkpoints``).
        every_n_steps: optimizer steps between periodic saves (0: only at the end and on a signal).
        signal_name: the preemption signal (``SIGUSR1``), or ``null`` to install no handler.
        requeue: ``scontrol requeue`` the SLURM job after saving on the signal.
    """

    def __init__(self, dirpath: str, every_n_steps: int = 100, signal_name: str | None = "SIGUSR1", requeue: bool = True) -> None:
        self.dirpath = Path(dirpath)
        self.every_n_steps = int(every_n_steps)
        self.signal_name = signal_name
        self.requeue = bool(requeue)
        self._received = False
        self._previous = None
        self._last_saved_step = -1
        self._flush_next = False
        self._requeue_pending = False

    @property
    def last_path(self) -> Path:
        return self.dirpath / "last.ckpt"

    # -- signal ------------------------------------------------------------------------------------
    def _handler(self, signum, frame) -> None:
        self._received = True

    def setup(self, trainer, pl_module, stage: str) -> None:
        if self.signal_name and stage == "fit" and threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(getattr(signal, self.signal_name), self._handler)

    def teardown(self, trainer, pl_module, stage: str) -> None:
        if self._previous is not None:
            signal.signal(getattr(signal, self.signal_name), self._previous)
            self._previous = None
        if self._requeue_pending:  # after the loop logged its last step: requeueing kills this job
            self._requeue_pending = False
            for logger in trainer.loggers:
                logger.save()
            job = slurm_job_ref()
            if self.requeue and job and trainer.is_global_zero:
                result = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True)
                if result.returncode == 0:
                    _log.info(f"requeued SLURM job {job}")
                else:
                    _log.warning(f"`scontrol requeue {job}` failed: {result.stderr.strip()}")

    # -- saving --------------------------------------------------------------------------------------
    def save(self, trainer) -> None:
        step = trainer.global_step
        if step == self._last_saved_step:
            return
        for logger in trainer.loggers:  # the log must hold every step the checkpoint holds
            logger.save()
        self._flush_next = True  # ... including the step whose row is logged right after this hook
        tmp = self.dirpath / f".last.ckpt.tmp-{step}"
        trainer.save_checkpoint(tmp, weights_only=False)
        trainer.strategy.barrier("brainfm_last_checkpoint")
        if trainer.is_global_zero:
            target = self.last_path
            if target.is_dir():  # DeepSpeed checkpoints are directories
                shutil.rmtree(target)
            os.replace(tmp, target)
        trainer.strategy.barrier("brainfm_last_checkpoint_renamed")
        self._last_saved_step = step

    def on_train_start(self, trainer, pl_module) -> None:
        self._last_saved_step = trainer.global_step  # a resumed run: that state is on disk already

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self._flush_next:
            self._flush_next = False
            for logger in trainer.loggers:
                logger.save()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        stop = self._received
        if trainer.world_size > 1:
            stop = trainer.strategy.reduce_boolean_decision(stop, all=False)
        if stop:
            self._on_preemption(trainer)
        elif self.every_n_steps and trainer.global_step % self.every_n_steps == 0:
            self.save(trainer)

    def on_train_end(self, trainer, pl_module) -> None:
        self.save(trainer)

    def _on_preemption(self, trainer) -> None:
        self.save(trainer)
        _log.info(f"preemption signal: saved {self.last_path} at step {trainer.global_step}")
        trainer.should_stop = True
        self._received = False
        self._requeue_pending = True
