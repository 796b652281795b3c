"""The baselines as models (issue 19, part 4): ``model=fc`` (Pearson connectome), ``model=mean_mlp`` (Popov et al.
2024) and ``model=brainnetcnn`` (Kawahara et al. 2017) train with ``task=supervised`` and go through every protocol:
re-identification, ``protocol=logistic``, ``protocol=probe`` and Brainmarks' plugin; ``model=fc`` with the fixed
identity projection and no centring is Brainmarks' ``Connectome``, edge for edge."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import brainmarks_smoke_test, labelled_roi_store, require_brainmarks, supervised_on, train_in

from brainfm.cli import evaluate as evaluate_cli
from brainfm.config import compose

#: model=fc as Brainmarks' Connectome: the fixed identity projection, edges not centred
FC_AS_CONNECTOME = ["model=fc", "model.readout.learn_projection=false", "model.readout.center=false"]
FAST_PROBE = ["probe_heads.epochs=2", "probe_heads.steps_per_epoch=5", "probe_heads.warmup_epochs=1",
              "probe_heads.batch_size=16", "probe_heads.accum_iter=1", "probe_heads.lr_scale_grid=[1.0,10.0]",
              "probe_heads.bootstrap=10", "probe_heads.device=cpu"]

pytestmark = pytest.mark.usefixtures("one_thread")


def _connectome(bold: torch.Tensor) -> torch.Tensor:
    """Brainmarks' own ``Connectome`` (the installed package, unmodified): ``cls`` ``(B, R (R - 1) / 2)``."""
    from brainmarks.models.connectome import Connectome

    cls, reg, patch = Connectome()({"bold": bold})
    assert reg is None and patch is None
    return cls[:, 0]


def test_fc_model_is_brainmarks_connectome():
    """Same edges in the same (row-major upper-triangle) order; brainfm's default readout centres the edges (its
    re-identification metric), which differs from Connectome by each window's mean edge only."""
    require_brainmarks()
    from hydra.utils import instantiate

    bold = torch.randn(3, 50, 17, dtype=torch.float64).float() * 4 + 100
    theirs = _connectome(bold)
    cfg = compose("train", [*FC_AS_CONNECTOME, "data.n_rois=17"])
    model = instantiate(cfg.model)
    ours = model.pooled(bold)
    assert ours.shape == theirs.shape == (3, 17 * 16 // 2)
    torch.testing.assert_close(ours, theirs, atol=2e-6, rtol=0)
    # the default model=fc (learned projection from the identity, centred edges): Connectome minus its mean edge
    default = instantiate(compose("train", ["model=fc", "data.n_rois=17"]).model).pooled(bold)
    torch.testing.assert_close(default, theirs - theirs.mean(dim=1, keepdim=True), atol=2e-6, rtol=0)


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    return labelled_roi_store(tmp_path_factory.mktemp("baselines_sup"))


@pytest.mark.parametrize("model", [FC_AS_CONNECTOME, ["model=mean_mlp"], ["model=brainnetcnn"]],
                         ids=["fc", "mean_mlp", "brainnetcnn"])
def test_baseline_trains_supervised_and_runs_every_protocol(model, store, tmp_path):
    run, metrics = train_in(tmp_path, *supervised_on(store, *model))
    assert np.isfinite(metrics["train/loss"])

    reid = evaluate_cli.run(compose("evaluate", [f"ckpt={run}", "window_lengths=[12]", "probe=false",
                                                 f"out_dir={tmp_path}/reid"]))
    assert {"pretrained", "random_init", "fc_fingerprint"} <= set(reid["results"])
    assert 0.0 <= reid["results"]["pretrained"]["12"]["rank1"] <= 1.0

    # FC's own window for model=fc: the whole sample (48 TRs), as the FC row reads it
    whole = model is FC_AS_CONNECTOME
    logistic = evaluate_cli.run(compose("evaluate", ["protocol=logistic", f"ckpt={run}", "target=gender",
                                                     "logistic.n_trials=0", "logistic.bootstrap=10",
                                                     *(["logistic.window_length=48"] if whole else [])]))
    assert list(logistic["results"]) == ["model", "fc"]
    assert 0.0 <= logistic["results"]["model"]["fixed"]["test"]["balanced_acc"] <= 1.0

    probe = evaluate_cli.run(compose("evaluate", ["protocol=probe", f"ckpt={run}", "target=gender", *FAST_PROBE,
                                                  *(["probe_heads.window_length=48"] if whole else [])]))
    assert list(probe["results"]) == ["model", "fc"]
    assert 0.0 <= probe["results"]["model"]["test"]["balanced_acc"] <= 1.0
    if whole:  # the checkpoint's cls is FC itself: both rows see the same features, score the same
        assert probe["results"]["model"]["dim"] == probe["results"]["fc"]["dim"] == 66
        assert probe["results"]["model"]["test"] == probe["results"]["fc"]["test"]
        assert logistic["results"]["model"]["fixed"] == logistic["results"]["fc"]["fixed"]


@pytest.fixture(scope="module")
def fc400_run(tmp_path_factory) -> Path:
    """model=fc (Connectome settings) trained 2 steps with task=supervised on 400 ROIs (Brainmarks' schaefer400)."""
    tmp = tmp_path_factory.mktemp("fc400")
    h5 = labelled_roi_store(tmp / "data", n_subjects=8, n_rois=400, n_trs=40, atlas="schaefer400")
    return train_in(tmp, *supervised_on(h5, *FC_AS_CONNECTOME, n_rois=400, atlas="schaefer400", window=20),
                    "data.batch_size=2")[0]


def test_fc_checkpoint_through_the_plugin_is_brainmarks_connectome(fc400_run):
    """Brainmarks' plugin ``brainfm`` on a model=fc checkpoint: its ``cls`` of a sample equals Brainmarks'
    ``Connectome`` of the same sample (the window the checkpoint takes: ``window_length`` = the sample's TRs)."""
    require_brainmarks()
    from brainmarks.models.registry import create_model

    rng = np.random.default_rng(3)
    raw = (rng.normal(size=(30, 400)) * 3 + 50).astype(np.float32)
    mean, std = raw.mean(0, keepdims=True), raw.std(0, keepdims=True)
    sample = {"bold": torch.from_numpy((raw - mean) / std), "mean": torch.from_numpy(mean),
              "std": torch.from_numpy(std), "tr": 0.72}
    transform, wrapper = create_model("brainfm", ckpt_path=str(fc400_run), window_length=30)
    assert wrapper.__space__ == "schaefer400"
    batch = {k: v[None] if torch.is_tensor(v) else torch.tensor([v]) for k, v in transform(sample).items()}
    cls, reg, patch = wrapper(batch)
    assert reg is None and cls.shape == (1, 1, 400 * 399 // 2) and patch.shape == (1, 400, 400)
    theirs = _connectome(torch.from_numpy(raw)[None])  # Connectome of the raw sample: Pearson ignores scaling
    torch.testing.assert_close(cls[:, 0], theirs, atol=2e-5, rtol=0)


def test_brainmarks_smoke_test_passes_on_an_fc_checkpoint(fc400_run, tmp_path):
    """``BRAINFM_CKPT=<model=fc run> python -m brainmarks.models.test_models brainfm`` (Brainmarks' code)."""
    require_brainmarks()
    code, summary, text = brainmarks_smoke_test(fc400_run, tmp_path, timeout=600)
    assert code == 0 and summary and summary[-1].split(",")[0] == "2 passed", text[-3000:]
    assert not re.search(r"\d+ (failed|error|skipped)", summary[-1]), text[-3000:]
