"""Test-only callbacks, referenced from Hydra overrides (``+callbacks.x._target_=helpers.X``), and the
tiny deterministic training setup the multi-process tests share."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from lightning.pytorch.callbacks import Callback

from brainfm.errors import ConfigError
from brainfm.models.backbone import Backbone

#: 7-way subject classification on the embedded data, dropout 0: strategies must agree up to float order
MODEL = ["experiment=gpt", "task=supervised", "task.target=subject", "task.kind=multiclass", "task.num_classes=7",
         "task.optimizer.lr=1e-3", "task.scheduler.warmup_fraction=0", "model.d_model=32", "model.depth=1",
         "model.dropout=0", "model.attn_dropout=0", "data.window.length=40", "data.window.min_length=null",
         "trainer.val_check_interval=10", "trainer.limit_val_batches=2", "trainer.log_every_n_steps=1",
         "trainer.enable_model_summary=false", "logger=csv", "callbacks.progress_bar=null"]
#: 2 gloo ranks on the CPU for the sharded strategies
CPU = ["trainer.accelerator=cpu", "trainer.precision=32-true", "trainer.devices=2", "trainer.num_nodes=1",
       "+trainer.strategy.process_group_backend=gloo"]


def subprocess_env() -> dict:
    """The environment of a ``brainfm-train`` subprocess: no SLURM variables, one thread, ``tests/`` on the
    path (for ``helpers.CrashAtStep``)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBATCH_"))}
    path = os.pathsep.join(filter(None, [str(Path(__file__).parent), env.get("PYTHONPATH")]))
    return {**env, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "PYTHONPATH": path}


class SimulatedCrash(RuntimeError):
    pass


class CrashAtStep(Callback):
    """Raise before the training batch that would make global step ``step`` (a crashed job)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step >= self.step:
            raise SimulatedCrash(f"simulated crash at step {trainer.global_step}")


def check_backbone_contract(model, batch: dict, any_tr: bool) -> None:
    """The backbone contract (brainfm.models.backbone): shapes of ``features`` and ``pooled``, ``pooled_batch``,
    the token hook composing to ``pooled`` (or refused), inputs read by ``input_keys``."""
    model.eval()
    assert isinstance(model, Backbone) and model.any_tr is any_tr
    inputs = model.inputs({**batch, "subject": torch.zeros(2)})
    assert len(inputs) == len(model.input_keys)
    with torch.no_grad():
        pooled = model.pooled(*inputs)
        features = model.features(*inputs)
        assert pooled.shape == (2, model.out_dim)
        assert features.ndim == 3 and features.shape[0] == 2
        torch.testing.assert_close(model.pooled_batch(batch), pooled)
        if model.token_dim is not None:
            tokens = model.embed_inputs(*inputs)
            assert tokens.shape[-1] == model.token_dim
            torch.testing.assert_close(model.pool_tokens(tokens), pooled)
        else:
            with pytest.raises(ConfigError, match="no token-level hook"):
                model.embed_inputs(*inputs)
    with pytest.raises(ConfigError, match=str(list(model.input_keys)).replace("[", r"\[").replace("]", r"\]")):
        model.inputs({"other": torch.zeros(1)})
