"""The Lightning callback that feeds a trial's validation metric to Optuna's pruner."""

from __future__ import annotations

import math

from lightning.pytorch.callbacks import Callback

from brainfm.errors import ConfigError


class MetricNotLogged(ConfigError):
    """The objective metric is not among the logged validation metrics (a search-wide error)."""


class OptunaPruning(Callback):
    """Report ``metric`` to ``trial`` after every validation and stop training when the pruner says so.

    The report's step is the validation's index, 1, 2, ... (one per ``trainer.val_check_interval``
    optimizer steps), the resource unit of the median and Hyperband pruners. A pruned trial stops
    after the current optimizer step (``trainer.should_stop``), so loggers and checkpoints are
    closed normally; the caller then raises ``optuna.TrialPruned``
    (:attr:`pruned_at` is the validation at which it was pruned).

    Written here rather than taken from ``optuna-integration``: its Lightning callback reports
    ``current_epoch`` as the step, while brainfm validates every ``val_check_interval`` steps,
    several times within one pass over the windows, so those reports would overwrite each other.

    Args:
        trial: the running ``optuna.Trial``.
        metric: a metric logged at validation (``val/loss``, ``val/acc``, ...).

    Raises:
        MetricNotLogged: after a validation that did not log ``metric`` (naming the ones it did).
    """

    def __init__(self, trial, metric: str) -> None:
        self.trial = trial
        self.metric = metric
        self.history: list[tuple[int, float]] = []  # (optimizer step, value) per validation
        self.pruned_at: int | None = None

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking or self.pruned_at is not None:
            return
        value = trainer.callback_metrics.get(self.metric)
        if value is None:
            logged = sorted(k for k in trainer.callback_metrics if not k.startswith("train/"))
            raise MetricNotLogged(
                f"search.objective.metric={self.metric!r} was not logged at validation; logged: {logged}. "
                "Fix search.objective.metric (the task's validation metrics are val/<name>)"
            )
        value = float(value)
        self.history.append((int(trainer.global_step), value))
        if not math.isfinite(value):
            return  # a NaN/inf trial fails when told; reporting it would poison the pruner's medians
        step = len(self.history)
        self.trial.report(value, step=step)
        if self.trial.should_prune():
            self.pruned_at = step
            trainer.should_stop = True

    @property
    def validations(self) -> int:
        return len(self.history)
