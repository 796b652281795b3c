"""The resume point of a run: ``<run_dir>/checkpoints/last.ckpt``, and the one owner of the
preemption signal.

:class:`ResumeCheckpoint` writes ``last.ckpt`` every ``every_n_steps`` optimizer steps, every
``every_minutes`` of wall-clock time (whichever comes first; both reset after any save), at the end
of training, and when the job receives the preemption signal (SLURM sends it ``--signal=USR1@<s>``
seconds before the time limit). On the signal it finishes the current optimizer step, saves,
stops training, finalizes (flushes and closes) the loggers and then asks SLURM to requeue the job
(``scontrol requeue``). The requeued job keeps its job id, hence its run directory, and resumes from
``last.ckpt`` (``ckpt_path=auto``, the default under SLURM). Lightning's own SLURM auto-requeue is
switched off by ``brainfm-train`` so that exactly one handler owns the signal. Under DDP/FSDP every rank may see the signal, and its own
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

Ctrl-C (SIGINT) is handled the same way without the requeue: the current optimizer step finishes,
``last.ckpt`` is saved and training stops; ``brainfm-train`` then writes ``summary.json`` (marked
``"interrupted": true``), prints the command that resumes the run and exits with status 130. A second
Ctrl-C stops at once (Python's ``KeyboardInterrupt``), without saving. Under DDP every rank of the
terminal's job gets the signal and the ranks agree on the step as for the preemption signal;
DataLoader workers forked after the handler is installed leave the decision to their main process.

:class:`BestCheckpoint` is Lightning's ``ModelCheckpoint`` (the best-k checkpoints by a monitored
metric) with the same atomic writes, and best-k kept across a resume: ``last.ckpt`` of a step that
also validates is written before that validation (at the end of the training batch), so the best
file that validation wrote is unknown to the restored callback state; the resumed run adopts such
files with the score they recorded and prunes to ``save_top_k``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import signal
import subprocess
import threading
import time
import warnings
from pathlib import Path
from weakref import proxy

import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.utilities.rank_zero import rank_zero_only

from brainfm.checkpoints import DCP_META, checkpoint_format, read_checkpoint
from brainfm.errors import CheckpointError, ConfigError
from brainfm.io import remove_path
from brainfm.runs import previous_checkpoint, temporary_checkpoint

_log = logging.getLogger("brainfm")


def slurm_job_ref() -> str | None:
    env = os.environ
    if env.get("SLURM_ARRAY_JOB_ID") and env.get("SLURM_ARRAY_TASK_ID"):
        return f"{env['SLURM_ARRAY_JOB_ID']}_{env['SLURM_ARRAY_TASK_ID']}"
    return env.get("SLURM_JOB_ID")


def requeue_slurm_job(job: str) -> tuple[bool, str]:
    """``scontrol requeue <job>``: ``(True, note)`` when SLURM requeued the job, else ``(False, why)``.

    SLURM signals every process of the job as it requeues it, and ``scontrol`` itself is one of them: on a busy
    node it can be ended by that SIGTERM before it exits 0 (a negative return code, nothing on stderr). Then the
    job's restart count (``scontrol show job``, against ``SLURM_RESTART_COUNT`` of this run) says whether the
    requeue happened.
    """
    before = int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0)
    result = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True, check=False)
    if result.returncode == 0:
        return True, ""
    why = result.stderr.strip() or f"exit status {result.returncode}"
    if result.returncode < 0:
        show = subprocess.run(["scontrol", "show", "job", "-o", job], capture_output=True, text=True, check=False)
        found = re.search(r"\bRestarts=(\d+)", show.stdout)
        if found and int(found.group(1)) > before:
            return True, f" (scontrol was ended by signal {-result.returncode}, SLURM's own as it requeued the job)"
        why = f"scontrol was ended by signal {-result.returncode}; {show.stdout.strip() or show.stderr.strip()}"
    return False, why


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
        interrupt_signal: the signal that saves and stops without a requeue (``SIGINT``: Ctrl-C), or
            ``null`` to leave it to Python (``KeyboardInterrupt``). After it, :attr:`interrupted` is true.

    Raises:
        ConfigError: a negative ``every_n_steps`` or ``every_minutes``.
    """

    def __init__(self, dirpath: str, every_n_steps: int = 100, every_minutes: float | None = 30.0,
                 signal_name: str | None = "SIGUSR1", requeue: bool = True,
                 interrupt_signal: str | None = "SIGINT") -> None:
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
        self.interrupt_signal = interrupt_signal
        self._interrupt_received = False
        self._previous_interrupt = None
        self._pid = os.getpid()
        #: training was stopped by :attr:`interrupt_signal` (Ctrl-C) after saving ``last.ckpt``
        self.interrupted = False

    @property
    def last_path(self) -> Path:
        return self.dirpath / "last.ckpt"

    # -- signal ------------------------------------------------------------------------------------
    def _handler(self, signum, frame) -> None:
        self._received = True

    def _interrupt_handler(self, signum, frame) -> None:
        if os.getpid() != self._pid:  # a DataLoader worker forked with this handler: the main process decides
            return
        self._interrupt_received = True
        self._restore_interrupt_handler()  # a second Ctrl-C stops at once
        if rank_zero_only.rank == 0:  # every rank of a terminal's job gets it; one line says so
            _log.warning("Ctrl-C: saving last.ckpt after this step, then stopping (Ctrl-C again stops at once, "
                         "without saving)")

    def _restore_interrupt_handler(self) -> None:
        if self._previous_interrupt is not None:
            signal.signal(getattr(signal, self.interrupt_signal), self._previous_interrupt)
            self._previous_interrupt = None

    def setup(self, trainer, pl_module, stage: str) -> None:
        if stage != "fit" or threading.current_thread() is not threading.main_thread():
            return
        if self.signal_name:
            self._previous = signal.signal(getattr(signal, self.signal_name), self._handler)
        if self.interrupt_signal:
            self._interrupt_received = self.interrupted = False
            self._pid = os.getpid()
            previous = signal.signal(getattr(signal, self.interrupt_signal), self._interrupt_handler)
            self._previous_interrupt = previous if previous is not None else signal.SIG_DFL

    def _restore_handlers(self) -> None:
        if self._previous is not None:
            signal.signal(getattr(signal, self.signal_name), self._previous)
            self._previous = None
        self._restore_interrupt_handler()

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        self._restore_handlers()  # Lightning does not call teardown after an exception

    def teardown(self, trainer, pl_module, stage: str) -> None:
        self._restore_handlers()
        if self._requeue_pending:  # after the loop logged its last step: requeueing kills this job
            self._requeue_pending = False
            for logger in trainer.loggers:  # closed now, not after teardown: SLURM's SIGTERM may come first (W&B
                logger.finalize("success")  # writes the end of an offline run's file only when it is finished)
            job = slurm_job_ref()
            if self.requeue and job and trainer.is_global_zero:
                with _sigterm_deferred():  # SLURM sends SIGTERM as soon as it requeues: log the outcome first
                    done, detail = requeue_slurm_job(job)
                    if done:
                        _log.info(f"requeued SLURM job {job}{detail}")
                    else:
                        _log.warning(f"`scontrol requeue {job}` failed: {detail}")

    # -- saving --------------------------------------------------------------------------------------
    def save(self, trainer, reason: str = "step interval") -> None:
        """Write ``last.ckpt`` at the current global step (a no-op if that step is saved already).
        Called on every rank: sharded strategies write their shards collectively."""
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
        replace_checkpoint(tmp, target, step)

    def _remove_temporaries(self, trainer) -> None:
        """Global rank 0 deletes what a killed save left behind (``.last.ckpt.tmp-*``, and
        ``.last.ckpt.old-*`` once ``last.ckpt`` is complete); the other ranks wait for it."""
        if trainer.is_global_zero and self.dirpath.is_dir():
            patterns = [f".{self.last_path.name}.tmp-*"]
            if checkpoint_format(self.last_path) is not None:
                patterns.append(f".{self.last_path.name}.old-*")
            for pattern in patterns:
                for stale in self.dirpath.glob(pattern):
                    _log.info(f"removing {stale}, left by an interrupted save")
                    remove_path(stale)
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
        stop, due, interrupt = self._received, stepped and self._time_due(), self._interrupt_received and stepped
        if trainer.world_size > 1:  # one all-reduce of the decisions: any rank's flag is every rank's
            flags = torch.tensor([int(stop), int(due), int(interrupt)], device=trainer.strategy.root_device)
            flags = trainer.strategy.reduce(flags, reduce_op="sum")
            stop, due, interrupt = (bool(f.item()) for f in flags)
        if stop:
            self._on_preemption(trainer)
        elif interrupt:
            self._on_interrupt(trainer)
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

    def _on_interrupt(self, trainer) -> None:
        self.save(trainer, "Ctrl-C")
        trainer.should_stop = True
        self._interrupt_received = False
        self.interrupted = True


def replace_checkpoint(tmp: Path, target: Path, step: int) -> None:
    """Put the complete checkpoint ``tmp`` (file or directory) at ``target`` (global rank 0 only): a
    file over a file in one ``os.replace``; a directory by moving the old one aside to
    ``.<name>.old-<step>``, renaming the new one in and deleting the old one."""
    # kept outside brainfm.io: all ranks agree on .<name>.tmp-<step> (no pid), resume finds .<name>.old-<step>
    if target.is_dir() or (tmp.is_dir() and target.exists()):  # rename(2) cannot replace a directory
        old = previous_checkpoint(target, step)
        remove_path(old)
        os.replace(target, old)
        os.replace(tmp, target)
    else:
        os.replace(tmp, target)  # one atomic rename
    for stale in target.parent.glob(f".{target.name}.old-*"):  # the new one is in place
        remove_path(stale)


class BestCheckpoint(ModelCheckpoint):
    """Lightning's ``ModelCheckpoint`` (same arguments: ``dirpath``, ``filename``, ``monitor``,
    ``mode``, ``save_top_k``, ...), with every file written atomically and best-k kept across a resume.

    - Each best file (one file, or a directory of shards under ``trainer=fsdp``) is written under
      ``.<name>.tmp-<step>`` by every rank and renamed into place by global rank 0 after a barrier
      (:func:`replace_checkpoint`), as ``last.ckpt``: a killed save never leaves half a best checkpoint.
    - On a resumed run (:meth:`on_train_start`), best files in ``dirpath`` the restored state does
      not know are reconciled: a file saved at or before the resumed step (the validation of the
      step ``last.ckpt`` was saved at runs after that save) is adopted with the score it recorded; a
      file from after the resumed step (a crashed run's steps, trained again now) is deleted. Then the
      files beyond ``save_top_k`` are deleted, so ``checkpoints/`` holds ``save_top_k`` best files.
      Lightning's own callback only prunes the files its restored state lists.
    """

    def setup(self, trainer, pl_module, stage: str) -> None:
        with warnings.catch_warnings():  # resuming into its own folder is the normal case (brainfm.runs.refuse_fresh_start)
            warnings.filterwarnings("ignore", message=r"Checkpoint directory .* exists and is not empty")
            super().setup(trainer, pl_module, stage)

    def _save_checkpoint(self, trainer, filepath: str) -> None:
        target, step = Path(filepath), trainer.global_step
        tmp = temporary_checkpoint(target, step)
        trainer.save_checkpoint(tmp, self.save_weights_only)
        trainer.strategy.barrier("brainfm_best_checkpoint")  # every rank's shard is on disk
        if trainer.is_global_zero:
            replace_checkpoint(tmp, target, step)
        trainer.strategy.barrier("brainfm_best_checkpoint_renamed")
        self._last_global_step_saved = step
        self._last_checkpoint_saved = filepath
        if trainer.is_global_zero:  # as ModelCheckpoint._save_checkpoint
            for logger in trainer.loggers:
                logger.after_save_checkpoint(proxy(self))

    def _own_files(self) -> list[Path]:
        """The best files of this callback in ``dirpath`` (named by ``filename`` up to its first
        ``{``), not ``last*`` and not hidden temporaries."""
        folder = Path(self.dirpath)
        prefix = (self.filename or "").split("{")[0]
        return sorted(p for p in folder.glob(f"{prefix}*{self.FILE_EXTENSION}")
                      if not p.name.startswith((".", self.CHECKPOINT_NAME_LAST)))

    def _recorded(self, path: Path) -> tuple[int | None, torch.Tensor | None]:
        """``(global_step, score)`` a best file recorded: its step and this callback's ``current_score``
        in its callback state (a DCP directory: from ``meta.pt``); ``(None, None)`` if unreadable."""
        form = checkpoint_format(path)
        if form not in ("file", "dcp"):
            return None, None
        try:
            state = read_checkpoint(path / DCP_META if form == "dcp" else path, mmap=form == "file")
        except CheckpointError:
            return None, None
        mine = (state.get("callbacks") or {}).get(self.state_key) or {}
        score = mine.get("current_score")
        step = state.get("global_step")
        return (int(step) if step is not None else None), (torch.as_tensor(score) if score is not None else None)

    def on_train_start(self, trainer, pl_module) -> None:
        super().on_train_start(trainer, pl_module)
        if self.save_top_k == 0 or self.dirpath is None or not Path(self.dirpath).is_dir():
            return
        known = {os.path.abspath(p) for p in self.best_k_models}
        remove: list[tuple[Path, str]] = []
        for path in self._own_files():
            if os.path.abspath(path) in known:
                continue
            step, score = self._recorded(path)
            if step is None or score is None:
                _log.warning(f"{path}: a best checkpoint without a readable score; left as it is")
            elif step > trainer.global_step:  # from steps after the resumed one: they are trained again
                remove.append((path, f"saved at step {step}, after the resumed step {trainer.global_step}"))
            else:
                self.best_k_models[os.path.join(self.dirpath, path.name)] = score
        if self.save_top_k > 0 and len(self.best_k_models) > self.save_top_k:
            ranked = sorted(self.best_k_models, key=lambda p: float(self.best_k_models[p]), reverse=self.mode == "max")
            for path in ranked[self.save_top_k:]:
                self.best_k_models.pop(path)
                remove.append((Path(path), f"not among the best {self.save_top_k} by {self.monitor}"))
        if self.best_k_models:
            best, worst = (min, max) if self.mode == "min" else (max, min)
            self.best_model_path = best(self.best_k_models, key=lambda p: float(self.best_k_models[p]))
            self.best_model_score = self.best_k_models[self.best_model_path]
            if len(self.best_k_models) == self.save_top_k:
                self.kth_best_model_path = worst(self.best_k_models, key=lambda p: float(self.best_k_models[p]))
                self.kth_value = self.best_k_models[self.kth_best_model_path]
        trainer.strategy.barrier("brainfm_best_checkpoint_read")  # every rank has read before rank 0 deletes
        if trainer.is_global_zero:
            for path, why in remove:
                _log.info(f"removing {path}: {why}")
                remove_path(path)
            for stale in Path(self.dirpath).glob(f".{(self.filename or '').split('{')[0]}*{self.FILE_EXTENSION}.tmp-*"):
                _log.info(f"removing {stale}, left by an interrupted save")
                remove_path(stale)
        trainer.strategy.barrier("brainfm_best_checkpoint_pruned")


@contextlib.contextmanager
def _sigterm_deferred():
    """Hold a SIGTERM that arrives inside the block and deliver it on leaving (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received = []
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: received.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)
        if received:
            signal.raise_signal(signal.SIGTERM)
