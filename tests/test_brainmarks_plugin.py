"""The Brainmarks plugin (src/brainmarks/models/brainfm.py) with the real, unmodified brainmarks package: tiny
checkpoints trained a few steps on synthetic data of two Brainmarks spaces (a sequence transformer on
``schaefer400``, Brain-Semantoks on ``schaefer400_tians3_buckner7`` with its shipped network map), then
Brainmarks' own smoke test on them, and the plugin's embeddings against brainfm's own on the same window.

Skipped only when brainmarks does not import and ``BRAINFM_REQUIRE_BRAINMARKS`` is unset; ``make test`` installs
it (``make install-brainmarks``) and sets the variable, so CI fails instead of skipping.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import synthetic_series
from helpers import QUIET, brainmarks_smoke_test, train_in

try:
    from brainmarks.models import registry
except ImportError as exc:  # brainmarks not installed (its plugin module alone does not make it importable)
    if os.environ.get("BRAINFM_REQUIRE_BRAINMARKS"):
        raise ImportError(f"BRAINFM_REQUIRE_BRAINMARKS is set but brainmarks does not import ({exc}). "
                          "Fix: make install-brainmarks") from exc
    pytest.skip(f"brainmarks is not installed ({exc}); `make install-brainmarks` installs it (make test does)",
                allow_module_level=True)

from brainfm.data.windows import collate_windows
from brainfm.errors import CheckpointError
from brainfm.runs import load_run, window_dataset

SMALL = [*QUIET, "data.window.min_length=null", "data.batch_size=4"]

pytestmark = pytest.mark.usefixtures("one_thread")


def _schaefer7_names() -> list[str]:
    """Schaefer-400 parcel names in the 7-network order of the shipped network map (its ``roi_pattern``s)."""
    from brainfm.models.network_maps import MAP_DIR

    import yaml

    spec = yaml.safe_load((MAP_DIR / "schaefer400_7n_tian3_buckner7.yaml").read_text())["networks"]
    names = [""] * 400
    for net, entry in spec.items():
        for hemi, (a, b) in zip(("LH", "RH"), entry["ranges"]):
            if b <= 400:
                for k, i in enumerate(range(a, b)):
                    names[i] = f"7Networks_{hemi}_{net}_{k + 1}"
    return names


@pytest.fixture(scope="module")
def bert_run(tmp_path_factory) -> Path:
    """Sequence-BERT on 400 ROIs (schaefer400) at TR 0.8 s, global z-scoring (the un-normalizing path)."""
    from brainfm.data.stores.roi import write_roi_h5

    tmp = tmp_path_factory.mktemp("bm_bert")
    series = synthetic_series(n_subjects=4, n_rois=400, n_trs=160, seed=1)
    h5 = write_roi_h5(tmp / "synth400.h5", series={"schaefer400": series}, subject_ids=[f"s{i}" for i in range(4)],
                      tr=0.8, roi_names={"schaefer400": _schaefer7_names()})
    return train_in(tmp, *SMALL, "experiment=seq_bert", f"data.path={h5}", "data.name=synth400",
                    "data.atlas=schaefer400", "data.n_rois=400", "data.tr=0.8", "data.normalization.mode=global",
                    "data.window.length=40", "model.d_model=32", "model.depth=1", "model.n_heads=2")[0]


@pytest.fixture(scope="module")
def semantoks_run(tmp_path_factory) -> Path:
    """Brain-Semantoks on Brainmarks' schaefer400_tians3_buckner7 space (457 ROIs, its 9-network map) at TR 2 s."""
    from brainfm.data.stores.roi import write_roi_h5

    tmp = tmp_path_factory.mktemp("bm_semantoks")
    series = synthetic_series(n_subjects=4, n_rois=457, n_trs=100, seed=2)
    parts = {"schaefer400": [s[:400] for s in series], "tian3": [s[400:450] for s in series],
             "buckner7": [s[450:] for s in series]}
    names = {"schaefer400": _schaefer7_names(), "tian3": [f"tian{i}" for i in range(50)],
             "buckner7": [f"buckner{i}" for i in range(7)]}
    h5 = write_roi_h5(tmp / "synth457.h5", series=parts, subject_ids=[f"s{i}" for i in range(4)], tr=2.0,
                      roi_names=names)
    return train_in(tmp, *SMALL, "experiment=semantoks", f"data.path={h5}", "data.name=synth457",
                    "data.atlas=[schaefer400,tian3,buckner7]", "data.n_rois=457", "data.tr=2.0",
                    "data.window.length=20", "model.network_map=schaefer400_7n_tian3_buckner7", "model.patch_size=10",
                    "model.conv_channels=16", "model.long_conv_channels=16", "model.depth=1", "model.n_heads=2",
                    "task.head.hidden_dim=32", "task.head.bottleneck_dim=16")[0]


@pytest.mark.parametrize("which", ["bert_run", "semantoks_run"])
def test_brainmarks_own_smoke_test_passes(which, request, tmp_path):
    """``BRAINFM_CKPT=<run> python -m brainmarks.models.test_models brainfm``, Brainmarks' code as installed."""
    run = request.getfixturevalue(which)
    code, summary, text = brainmarks_smoke_test(run, tmp_path, timeout=300)
    assert code == 0 and summary and summary[-1].split(",")[0] == "2 passed", text
    assert not re.search(r"\d+ (failed|error|skipped)", summary[-1]), text


def _sample(bold_raw: np.ndarray, tr: float, mean: np.ndarray | None = None, std: np.ndarray | None = None) -> dict:
    """A Brainmarks sample: ``bold`` z-scored over time per ROI, ``mean``/``std`` ``(1, R)``, ``tr`` seconds."""
    mean = bold_raw.mean(0, keepdims=True) if mean is None else mean.reshape(1, -1)
    std = bold_raw.std(0, keepdims=True) if std is None else std.reshape(1, -1)
    return {"bold": torch.from_numpy(((bold_raw - mean) / std).astype(np.float32)),
            "mean": torch.from_numpy(mean.astype(np.float32)), "std": torch.from_numpy(std.astype(np.float32)),
            "tr": tr, "gender": 1}


def test_sequence_transformer_embeddings_equal_brainfm_extraction(bert_run):
    """Global z-scoring: the plugin un-normalizes Brainmarks' sample and applies the checkpoint's statistics, so
    ``cls`` is the task's embedding of the same window (what brainfm-extract exports), ``patch`` its TR states."""
    from torch.utils.data import default_collate

    transform, model = registry.create_model("brainfm", ckpt_path=str(bert_run))
    assert model.__space__ == "schaefer400" and transform.mode == "global" and transform.tr is None  # any TR
    loaded = load_run(bert_run)
    ds = window_dataset(loaded.datamodule, "val")
    run, start = ds.window(1)
    raw = ds.store.read(run, start, start + 40).astype(np.float64)
    sample = transform(_sample(raw, tr=0.8))
    assert sample["gender"] == 1 and sample["bold"].shape == (40, 400)
    torch.testing.assert_close(sample["bold"], ds[1]["bold"], atol=1e-4, rtol=1e-4)
    cls, reg, patch = model(default_collate([sample, sample]))
    want = loaded.task.embed(collate_windows([ds[1]]))
    assert cls.shape == (2, 1, want.shape[1]) and reg is None and patch.shape == (2, 40, 32)
    torch.testing.assert_close(cls[:1, 0], want, atol=1e-4, rtol=1e-4)
    # a longer sample at another TR: no resampling (BERT embeds time in seconds), the first 40 TRs
    longer = transform(_sample(np.random.default_rng(0).normal(size=(100, 400)), tr=2.0))
    assert longer["bold"].shape == (40, 400) and longer["t"][1].item() == pytest.approx(2.0)


def test_semantoks_embeddings_equal_brainfm_extraction_and_resample(semantoks_run):
    """Run z-scoring (Brainmarks' own): the first window of a run equals brainfm's; a sample at TR 1 s is resampled to
    the checkpoint's 2 s (Semantoks' patches are TRs), a short one padded to one patch."""
    from torch.utils.data import default_collate

    transform, model = registry.create_model("brainfm", ckpt_path=str(semantoks_run / "checkpoints" / "last.ckpt"))
    assert model.__space__ == "schaefer400_tians3_buckner7" and transform.mode == "run" and transform.tr == 2.0
    loaded = load_run(semantoks_run)
    ds = window_dataset(loaded.datamodule, "train")
    run, start = ds.window(0)
    assert start == 0
    stats = ds.store.run_stats(run)
    raw = ds.store.read(run).astype(np.float64)
    sample = transform(_sample(raw, tr=2.0, mean=stats["mean"], std=stats["std"]))
    torch.testing.assert_close(sample["bold"], ds[0]["bold"], atol=1e-5, rtol=1e-5)
    cls, reg, patch = model(default_collate([sample]))
    torch.testing.assert_close(cls[:, 0], loaded.task.embed(collate_windows([ds[0]])), atol=1e-5, rtol=1e-5)
    # cls: [mean of the tokens, CLS] (task.embed_features=both, d 16 + 16 = 32 each); patch: 9 networks x 2 patches
    assert cls.shape == (1, 1, 64) and reg is None and patch.shape == (1, 9 * 2, 32)
    at_1s = transform(_sample(np.random.default_rng(0).normal(size=(160, 457)), tr=1.0))
    assert at_1s["bold"].shape == (20, 457) and at_1s["tr"] == 2.0
    torch.testing.assert_close(at_1s["bold"].std(0).mean(), torch.tensor(1.0), atol=0.2, rtol=0)
    short = transform(_sample(np.random.default_rng(1).normal(size=(16, 457)), tr=1.0))  # 8 TRs at 2 s -> 1 patch
    assert short["bold"].shape == (10, 457) and (short["bold"][8:] == 0).all()


def test_errors_name_the_fix(monkeypatch, tmp_path):
    from brainmarks.models.brainfm import _space

    monkeypatch.delenv("BRAINFM_CKPT", raising=False)
    with pytest.raises(ValueError, match="BRAINFM_CKPT"):
        registry.create_model("brainfm")
    with pytest.raises(CheckpointError, match="does not exist"):
        registry.create_model("brainfm", ckpt_path=str(tmp_path / "missing.ckpt"))
    with pytest.raises(CheckpointError, match="not a Brainmarks space.*schaefer400.*train on a Brainmarks parcellation"):
        _space({"atlas": "aal2", "n_rois": 94}, "checkpoint x", None)
    with pytest.raises(CheckpointError, match="pass space=schaefer400"):
        _space({"atlas": "Schaefer2018_400Parcels_7Networks", "n_rois": 400}, "checkpoint x", None)
    assert _space({"atlas": "Schaefer2018_400Parcels_7Networks", "n_rois": 400}, "x", "schaefer400") == "schaefer400"
