"""Brainmarks' probe protocol in brainfm (``brainfm-evaluate protocol=probe``; docs/brainmarks_protocols.md): each
head learns a learnable label, the kept head is the best validation score of the recorded grid, the same seed gives
the same numbers, and the errors name the fix. Small grids and few steps: the defaults (49 heads, 4,000 updates)
are Brainmarks' and are checked as configuration."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from brainfm.cli import evaluate as evaluate_cli
from brainfm.config import compose
from brainfm.errors import ConfigError
from helpers import QUIET, labelled_roi_store, supervised_on, train_in

from brainfm.eval.brainmarks_probe import DEFAULTS, LR_SCALE_GRID, lr_schedule, probe_protocol, train_head_grid

FAST = {"epochs": 4, "steps_per_epoch": 15, "warmup_epochs": 1, "batch_size": 16, "accum_iter": 1,
        "lr_scale_grid": [0.1, 10.0, 100.0], "bootstrap": 20, "device": "cpu"}

pytestmark = pytest.mark.usefixtures("one_thread")


def _tokens(n: int, seed: int, L: int = 6, D: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """``(n, L, D)`` embeddings whose class (3 classes) shows as a shift of one channel group in one token."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % 3
    x = rng.normal(size=(n, L, D)).astype(np.float32)
    for c in range(3):
        x[y == c, 2, 8 * c:8 * c + 8] += 4.0
    return x, y


def test_defaults_are_brainmarks():
    assert LR_SCALE_GRID == [float(f"{v:.2g}") for v in np.logspace(-1.7, 1.7, 49)]
    cfg = compose("evaluate", ["protocol=probe"])
    heads = {k: v for k, v in dict(cfg.probe_heads).items()
             if k not in ("fc_classifier", "window_length", "fc_length", "atlas", "split")}
    assert {k: v for k, v in heads.items() if k != "classifier_kwargs"} == \
        {k: v for k, v in DEFAULTS.items() if k != "classifier_kwargs"}
    assert dict(cfg.probe_heads.classifier_kwargs) == DEFAULTS["classifier_kwargs"]
    assert (DEFAULTS["epochs"], DEFAULTS["steps_per_epoch"], DEFAULTS["batch_size"], DEFAULTS["accum_iter"],
            DEFAULTS["lr"], DEFAULTS["weight_decay"], DEFAULTS["seed"]) == (20, 200, 64, 2, 3e-4, 0.05, 4466)
    s = lr_schedule(1.0, 10, 4)
    assert s[0] == 0 and s[3] == 1 and s[4] == 1 and s[-1] == pytest.approx(0) and len(s) == 10


@pytest.mark.parametrize("head, representation", [("linear", "cls"), ("attn", "patch"), ("mlp", "patch")])
def test_each_head_learns_and_keeps_the_best_validation_score(head, representation):
    feats, labels = {}, {}
    for k, (n, seed) in {"train": (96, 0), "val": (48, 1), "test": (48, 2)}.items():
        x, y = _tokens(n, seed)
        feats[k] = x[:, 2:3] if representation == "cls" else x  # cls: the informative token alone (B, 1, D)
        labels[k] = np.array(["abc"[c] for c in y])
    out = probe_protocol(feats, labels, classifier=head, **FAST)
    assert out["test"]["balanced_acc"] > 0.75, out["test"]  # chance: 1/3
    grid = np.array(out["cv_scores"])  # (epochs, grid points)
    assert grid.shape == (FAST["epochs"], len(FAST["lr_scale_grid"]))
    chosen = out["chosen"]
    assert chosen["score"] == grid.max() == grid[chosen["epoch"], chosen["index"]]
    first = np.argwhere(grid == grid.max())[0]  # ties: the earliest epoch, the first grid point
    assert (chosen["epoch"], chosen["index"]) == tuple(first)
    assert out["classes"] == ["a", "b", "c"] and "acc_std" in out["test"]
    assert chosen["lr"] == pytest.approx(FAST["lr_scale_grid"][chosen["index"]] * DEFAULTS["lr"])
    # the kept head, scored again on validation, gives the recorded score (cv_metric: acc)
    assert out["validation"]["acc"] == pytest.approx(chosen["score"])


def test_same_seed_same_numbers_and_errors():
    x, y = _tokens(64, 0)
    vx, vy = _tokens(32, 1)
    a = train_head_grid((x, y), (vx, vy), 3, classifier="mlp", **FAST)
    b = train_head_grid((x, y), (vx, vy), 3, classifier="mlp", **FAST)
    c = train_head_grid((x, y), (vx, vy), 3, classifier="mlp", **{**FAST, "seed": 1})
    assert a["cv_scores"] == b["cv_scores"] and a["chosen"] == b["chosen"]
    for p, q in zip(a["heads"].parameters(), b["heads"].parameters()):
        assert torch.equal(p, q)
    assert any(not torch.equal(p, q) for p, q in zip(a["heads"].parameters(), c["heads"].parameters()))
    with pytest.raises(ConfigError, match=r"classifier='svm' is not a head; available: \['linear', 'attn', 'mlp'\]"):
        train_head_grid((x, y), (vx, vy), 3, classifier="svm", **FAST)
    with pytest.raises(ConfigError, match="at least 64 channels.*embed_dim=64"):
        train_head_grid((x[..., :32], y), (vx[..., :32], vy), 3, classifier="attn", **FAST)
    with pytest.raises(ConfigError, match="fewer than one batch.*probe_heads.batch_size=64"):
        train_head_grid((x, y), (vx, vy), 3, **{**FAST, "batch_size": 100})
    with pytest.raises(ConfigError, match="holds .* weights.*embed_dim=256"):
        train_head_grid((np.zeros((20, 1, 20_000), np.float32), y[:20]), (vx[:4, :1, :1], vy[:4]), 3,
                        classifier="mlp", **FAST)


@pytest.fixture(scope="module")
def labelled(tmp_path_factory) -> Path:
    """12 ROIs, 60 single-run subjects, label ``gender`` carried by a latent signal shared by 4 ROIs."""
    return labelled_roi_store(tmp_path_factory.mktemp("probe"))


def _probe(*overrides: str) -> dict:
    fast = [f"probe_heads.{k}={json.dumps(v)}" for k, v in FAST.items()]
    return evaluate_cli.run(compose("evaluate", ["protocol=probe", *fast, *overrides]))


def test_fc_alone_and_a_checkpoint_beside_fc(labelled, tmp_path, capsys):
    report = _probe("model=fc", f"data_path={labelled}", "target=gender", f"out_dir={tmp_path}/fc")
    assert list(report["results"]) == ["fc"] and report["results"]["fc"]["dim"] == 66
    assert report["results"]["fc"]["test"]["balanced_acc"] >= 0.5
    assert json.loads((tmp_path / "fc" / "metrics.json").read_text())["results"]["fc"]["chosen"]
    assert "FC" in capsys.readouterr().out

    run_dir, _ = train_in(tmp_path, *QUIET, "experiment=gpt", f"data.path={labelled}", "data.atlas=toy",
                          "data.n_rois=12", "model.d_model=64", "model.depth=1", "model.n_heads=2",
                          "data.window.length=24", "data.window.min_length=null")
    report = _probe(f"ckpt={run_dir}", f"data_path={labelled}", "target=gender", "probe_heads.classifier=attn",
                    "probe_heads.representation=patch")
    assert list(report["results"]) == ["model", "fc"]
    assert report["results"]["model"]["classifier"] == "attn" and report["results"]["fc"]["classifier"] == "linear"
    assert report["results"]["model"]["representation"] == "patch" and report["results"]["model"]["dim"] == 64
    assert (run_dir / "eval" / "probe_gender" / "metrics.json").exists()
    assert not [p for p in (run_dir / "eval" / "probe_gender").iterdir() if p.name.startswith(".")]

    with pytest.raises(ConfigError, match="representation=reg: brainfm models have no register tokens"):
        _probe(f"ckpt={run_dir}", "target=gender", "probe_heads.representation=reg")
    with pytest.raises(ConfigError, match="fc_classifier='knn' is not a head"):
        _probe("model=fc", f"data_path={labelled}", "target=gender", "probe_heads.fc_classifier=knn")
    with pytest.raises(ConfigError, match="protocol=probe needs ckpt="):
        _probe(f"data_path={labelled}", "target=gender")


def test_patch_of_a_task_without_tokens_is_refused(labelled, tmp_path, monkeypatch):
    """A task whose embedding has no tokens (R2T-Net's: ``tokens`` is None) cannot give ``patch``."""
    from brainfm.tasks.base import BrainfmTask

    run_dir, _ = train_in(tmp_path, *supervised_on(labelled, "model=fc"))
    monkeypatch.setattr(BrainfmTask, "tokens", lambda self, batch: None)
    with pytest.raises(ConfigError, match=r"has no tokens \(Brainmarks' patch\); use probe_heads.representation=cls"):
        _probe(f"ckpt={run_dir}", f"data_path={labelled}", "target=gender",
               "probe_heads.representation=patch")
