"""The demo's claim (slow: ~3 min; `make test-slow`): the model `make demo` trains re-identifies subjects on
the held-out second halves at least as well as FC fingerprinting (Rank-1) and better in mAP, at every window
length, and zero-shot on another site (gw) within 0.05 mAP of FC or above; its initialisation is (Fisher-z) FC."""

from __future__ import annotations

import pytest

from brainfm import training as train
from brainfm.data.embedded import fetch
from brainfm.eval.protocol import run_reidentification


@pytest.mark.slow
def test_the_demo_model_beats_fc_fingerprinting(cfg_for, hcp_h5):
    cfg = cfg_for("experiment=demo")
    train.run(cfg)
    ckpt = f"{cfg.paths.run_dir}/checkpoints/last.ckpt"
    report = run_reidentification(ckpt, window_lengths=[30, 60, 120], probe=False)
    for length in ("30", "60", "120"):
        ours, fc = report["results"]["pretrained"][length], report["results"]["fc_fingerprint"][length]
        assert ours["rank1"] >= fc["rank1"] and ours["mAP"] > fc["mAP"] + 0.02, (length, ours, fc)
        start = report["results"]["random_init"][length]  # the identity readout: Fisher-z FC
        assert abs(start["mAP"] - fc["mAP"]) < 0.05, (length, start, fc)
    gw = run_reidentification(ckpt, window_lengths=[30, 60], probe=False, data_path=fetch("gw_rest_roi", hcp_h5.parent))
    for length in ("30", "60"):
        assert gw["results"]["pretrained"][length]["mAP"] >= gw["results"]["fc_fingerprint"][length]["mAP"] - 0.05
