"""Training on the real embedded data: every objective learns, resuming is exact, checkpoints
carry what inference needs and load with weights_only=True."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import SimulatedCrash, logged_steps, train_losses

from brainfm import training as train
from brainfm.data.atlases import AAL2_CEREBRUM_94
from brainfm.errors import CheckpointError, ConfigError
from brainfm.runs import build_task_from_checkpoint, load_checkpoint

FAST = ("data.window.length=40", "data.window.min_length=20", "trainer.log_every_n_steps=1")


@pytest.mark.parametrize(
    "experiment,lr,steps",
    [("gpt", 1e-3, 50), ("seq_bert", 1e-3, 50), ("net_bert", 1e-3, 50), ("lstm_ae", 3e-3, 80),
     ("contrastive", 1e-3, 50)],
)
def test_each_objective_learns_on_real_data(experiment, lr, steps, cfg_for):
    cfg = cfg_for(f"experiment={experiment}", f"trainer.max_steps={steps}", f"trainer.val_check_interval={steps}",
                  f"task.optimizer.lr={lr}", "model.d_model=64", *FAST)
    metrics = train.run(cfg)
    losses = np.array([v for _, v in sorted(train_losses(Path(cfg.paths.run_dir)).items())])
    assert len(losses) == steps
    first, last = losses[:10].mean(), losses[-10:].mean()
    assert last < 0.95 * first, (experiment, first, last)
    assert np.isfinite(metrics["val/loss"])


def test_resume_from_last_reaches_the_same_loss(cfg_for, tmp_path):
    common = ("experiment=seq_bert", "model.d_model=64", "trainer.val_check_interval=10", *FAST)
    full = cfg_for(*common, "trainer.max_steps=30", "run_name=full")
    train.run(full)
    # same schedule, crashed after step 23 (last.ckpt written at step 20; steps 21-23 logged after it)
    part = cfg_for(*common, "trainer.max_steps=30", "run_name=part",
                   "+callbacks.crash._target_=helpers.CrashAtStep", "+callbacks.crash.step=23")
    with pytest.raises(SimulatedCrash):
        train.run(part)
    assert max(train_losses(Path(part.paths.run_dir))) == 23
    resumed = cfg_for(*common, "trainer.max_steps=30", "run_name=part", "ckpt_path=last")
    train.run(resumed)
    a, b = train_losses(Path(full.paths.run_dir)), train_losses(Path(resumed.paths.run_dir))
    logged = logged_steps(Path(resumed.paths.run_dir))
    assert logged == list(range(1, 31))  # each step once: the rows logged after the checkpoint are gone
    assert sorted(b) == sorted(a) == list(range(1, 31))  # step = optimizer steps completed
    for step in range(1, 31):  # the steps after the restart included
        assert b[step] == pytest.approx(a[step], rel=1e-6, abs=1e-7), step
    w_full = torch.load(Path(full.paths.run_dir) / "checkpoints/last.ckpt", weights_only=True)["state_dict"]
    w_res = torch.load(Path(resumed.paths.run_dir) / "checkpoints/last.ckpt", weights_only=True)["state_dict"]
    for k in w_full:
        torch.testing.assert_close(w_res[k], w_full[k], rtol=1e-5, atol=1e-6)


def test_ckpt_path_last_without_checkpoint_is_a_clear_error(cfg_for):
    with pytest.raises(CheckpointError, match="nothing to resume"):
        train.run(cfg_for("ckpt_path=last", "run_name=never"))


def test_checkpoint_is_plain_and_carries_tr_rois_and_normalization(cfg_for):
    cfg = cfg_for("experiment=gpt", "model.d_model=32", "trainer.max_steps=4", "trainer.val_check_interval=4", *FAST)
    train.run(cfg)
    path = Path(cfg.paths.run_dir) / "checkpoints" / "last.ckpt"
    raw = torch.load(path, weights_only=True)  # plain containers and tensors only
    meta = raw["hyper_parameters"]["data_meta"]
    assert meta["tr"] == pytest.approx(0.72)
    assert meta["roi_names"] == list(AAL2_CEREBRUM_94)
    assert meta["normalization"] == {"mode": "run", "eps": 1e-6}
    # run z-scoring fits nothing: the checkpoint carries the mode, not one row per training run or subject
    assert raw["brainfm"]["normalization"] == {"mode": "run", "eps": 1e-6}
    assert meta["n_subjects"] == 7 and "subjects" not in meta
    task = build_task_from_checkpoint(load_checkpoint(path))
    torch.testing.assert_close(task.state_dict()["head.weight"], raw["state_dict"]["head.weight"])


def test_wrong_model_for_objective_is_a_config_error(cfg_for):
    with pytest.raises(Exception) as info:
        train.run(cfg_for("task=seq_bert", "model=gpt", "trainer.max_steps=1"))
    from brainfm.cli.common import brainfm_cause

    assert isinstance(brainfm_cause(info.value), ConfigError)
    assert "bidirectional" in str(brainfm_cause(info.value))
