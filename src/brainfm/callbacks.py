"""The resume point of a run: ``<run_dir>/checkpoints/last.ckpt``, and the one owner of the
preemption signal.

:class:`ResumeCheckpoint` writes ``last.ckpt`` every ``every_n_steps`` optimizer steps, every
``every_minutes`` of wall-clock time (whichever comes first; both reset after any save), at the end
of training, and when the job receives the preemption signal (SLURM sends it ``--signal=USR1@<s>``
seconds before the time limit). On the signal it finishes the current optimizer step, saves,
stops training, flushes the loggers and then asks SLURM to requeue the job (``scontrol requeue``). The requeued
job keeps its job id, hence its run directory, and resumes from ``last.ckpt`` (``ckpt_path=auto``,
the default under SLURM). Lightning's own SLURM auto-requeue is switched off by ``brainfm-train`` so
that exactly one handler owns the signal. Under DDP/FSDP every rank may see the signal, and its own
clock pass the wall-clock interval, at a slightly different step; the ranks agree on the step to
stop or save at through one all-reduce per step of both flags (any rank decides for all).

``last.ckpt`` is whatever the strategy writes: one file (1 process, DDP), or a directory of per-rank
shards (``trainer=fsdp``: torch.distributed.checkpoint through Lightning's
``ModelParallelStrategy(save_distributed_checkpoint=True)``, no full state gathered on rank 0;
DeepSpeed ZeRO). Writes are atomic for both: every rank writes its part under
``.last.ckpt.tmp-<step>``; after a barrier global rank 0 renames it to ``last.ckpt`` (a file over a
file in one ``os.replace``; a directory by moving the old one aside to ``.last.ckpt.old-<step>``,
renaming the new one in and deleting the old one). A job killed while saving (``kill -9``) leaves
the previous checkpoint intact: either ``last.ckpt`` itself or, killed between the two renames, the
``.old-<step>`` directory, which :func:`brainfm.runs.resolve_resume` then resumes from. Leftover
temporaries of a killed job are removed when the next run starts training.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path

import torch
from lightning.pytorch.callbacks import Callback

from brainfm.errors import ConfigError

_log = logging.getLogger("brainfm")


def slurm_job_ref() -> str | None:
    env = os.environ
    if env.get("SLURM_ARRAY_JOB_ID") and env.get("SLURM_ARRAY_TASK_ID"):
        return f"{env['SLURM_ARRAY_JOB_ID']}_{env['SLURM_ARRAY_TASK_ID']}"
    return env.get("SLURM_JOB_ID")


class ResumeCheckpoint(Callback):
    """Periodic (steps and wall-clock), final and on-signal ``last.ckpt``, and SLURM requeue on the
    preemption signal.

    Args:
        dirpath: checkpoint folder (``<run_dir>/checkpoints``).
        every_n_steps: optimizer steps between periodic saves (0: only at the end and on a signal).
        every_minutes: wall-clock minutes between periodic saves, measured from the start of
            training or the last save (0 or ``None``: no time-based saves). Checked after every
            optimizer step, so a save happens at the first step boundary past the interval.
        signal_name: the preemption signal (``SIGUSR1``), or ``null`` to install no handler.
        requeue: ``scontrol requeue`` the SLURM job after saving on the signal.

    Raises:
        ConfigError: a negative ``every_n_steps`` or ``every_minutes``.
    """

    def __init__(self, dirpath: str, every_n_steps: int = 100, every_minutes: float | None = 30.0,
                 signal_name: str | None = "SIGUSR1", requeue: bool = True) -> None:
        self.dirpath = Path(dirpath)
        self.every_n_steps = int(every_n_steps or 0)
        self.every_minutes = float(every_minutes or 0.0)
        if self.every_n_steps < 0 or self.every_minutes < 0:
            raise ConfigError(
                f"callbacks.resume_checkpoint: every_n_steps={every_n_steps}, every_minutes={every_minutes}; both must "
                "be >= 0 (0 or null switches that interval off)"
            )
        self.signal_name = signal_name
        self.requeue = bool(requeue)
        self._received = False
        self._previous = None
        self._last_saved_step = -1
        self._last_save_time = time.monotonic()
        self._step_at_last_batch = -1
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
                result = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True, check=False)
                if result.returncode == 0:
                    _log.info(f"requeued SLURM job {job}")
                else:
                    _log.warning(f"`scontrol requeue {job}` failed: {result.stderr.strip()}")

    # -- saving --------------------------------------------------------------------------------------
    def save(self, trainer, reason: str = "step interval") -> None:
        """Write ``last.ckpt`` at the current global step (a no-op if that step is saved already).
        Called on every rank: sharded strategies write their shards collectively."""
        from brainfm.runs import temporary_checkpoint

        step = trainer.global_step
        if step == self._last_saved_step:
            return
        for logger in trainer.loggers:  # the log must hold every step the checkpoint holds
            logger.save()
        self._flush_next = True  # ... including the step whose row is logged right after this hook
        tmp = temporary_checkpoint(self.last_path, step)
        trainer.save_checkpoint(tmp, weights_only=False)
        trainer.strategy.barrier("brainfm_last_checkpoint")  # every rank's shard is on disk
        if trainer.is_global_zero:
            self._replace(tmp, self.last_path, step)
            _log.info(f"saved {self.last_path} at step {step} ({reason})")
        trainer.strategy.barrier("brainfm_last_checkpoint_renamed")
        self._last_saved_step = step
        self._last_save_time = time.monotonic()

    @staticmethod
    def _replace(tmp: Path, target: Path, step: int) -> None:
        """Put the complete checkpoint ``tmp`` (file or directory) at ``target`` (global rank 0 only)."""
        from brainfm.runs import previous_checkpoint

        if target.is_dir() or (tmp.is_dir() and target.exists()):  # rename(2) cannot replace a directory
            old = previous_checkpoint(target, step)
            _remove(old)
            os.replace(target, old)
            os.replace(tmp, target)
        else:
            os.replace(tmp, target)  # one atomic rename
        for stale in target.parent.glob(f".{target.name}.old-*"):  # the new one is in place
            _remove(stale)

    def _remove_temporaries(self, trainer) -> None:
        """Global rank 0 deletes what a killed save left behind (``.last.ckpt.tmp-*``, and
        ``.last.ckpt.old-*`` once ``last.ckpt`` is complete); the other ranks wait for it."""
        from brainfm.runs import checkpoint_format

        if trainer.is_global_zero and self.dirpath.is_dir():
            patterns = [f".{self.last_path.name}.tmp-*"]
            if checkpoint_format(self.last_path) is not None:
                patterns.append(f".{self.last_path.name}.old-*")
            for pattern in patterns:
                for stale in self.dirpath.glob(pattern):
                    _log.info(f"removing {stale}, left by an interrupted save")
                    _remove(stale)
        trainer.strategy.barrier("brainfm_last_checkpoint_cleanup")

    def on_train_start(self, trainer, pl_module) -> None:
        self._last_saved_step = trainer.global_step  # a resumed run: that state is on disk already
        self._step_at_last_batch = trainer.global_step
        self._last_save_time = time.monotonic()
        self._remove_temporaries(trainer)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self._flush_next:
            self._flush_next = False
            for logger in trainer.loggers:
                logger.save()

    def _time_due(self) -> bool:
        return bool(self.every_minutes) and time.monotonic() - self._last_save_time >= 60.0 * self.every_minutes

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        stepped = trainer.global_step != self._step_at_last_batch  # False while accumulating gradients
        self._step_at_last_batch = trainer.global_step
        stop, due = self._received, stepped and self._time_due()
        if trainer.world_size > 1:  # one all-reduce of both decisions: any rank's flag is every rank's
            flags = torch.tensor([int(stop), int(due)], device=trainer.strategy.root_device)
            flags = trainer.strategy.reduce(flags, reduce_op="sum")
            stop, due = bool(flags[0].item()), bool(flags[1].item())
        if stop:
            self._on_preemption(trainer)
        elif self.every_n_steps and trainer.global_step % self.every_n_steps == 0:
            self.save(trainer, "step interval")
        elif due:
            self.save(trainer, f"wall-clock interval of {self.every_minutes:g} min")

    def on_train_end(self, trainer, pl_module) -> None:
        self.save(trainer, "end of training")

    def _on_preemption(self, trainer) -> None:
        self.save(trainer, "preemption signal")
        _log.info(f"preemption signal: saved {self.last_path} at step {trainer.global_step}")
        trainer.should_stop = True
        self._received = False
        self._requeue_pending = True


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()
