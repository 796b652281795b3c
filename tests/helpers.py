"""Test-only callbacks, referenced from Hydra overrides (``+callbacks.x._target_=helpers.X``)."""

from __future__ import annotations

from lightning.pytorch.callbacks import Callback


class SimulatedCrash(RuntimeError):
    pass


class CrashAtStep(Callback):
    """Raise before the training batch that would make global step ``step`` (a crashed job)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step >= self.step:
            raise SimulatedCrash(f"simulated crash at step {trainer.global_step}")
