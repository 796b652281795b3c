"""Training a run: :func:`build` and :func:`run` (``fit.py``), the Lightning callbacks brainfm adds
(``callbacks.py``: checkpoints written atomically on every rank, SLURM requeue, Ctrl-C, best-k) and
the loggers' step convention and progress lines (``tracking.py``). ``brainfm-train``, the Optuna
driver and the benchmarks train through :func:`run`."""

from brainfm.training.fit import TrainingInterrupted, build, resume_command, run

__all__ = ["TrainingInterrupted", "build", "resume_command", "run"]
