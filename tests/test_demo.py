"""The demo's claim, at reduced length: contrastive pretraining beats its random initialisation
on subject re-identification of held-out data (slow: ~3 min; `make test-slow`)."""

from __future__ import annotations

import pytest

from brainfm.cli import train
from brainfm.eval.protocol import run_reidentification


@pytest.mark.slow
def test_pretrained_beats_random_init(cfg_for):
    cfg = cfg_for("experiment=demo", "trainer.max_steps=1000", "trainer.val_check_interval=500")
    train.run(cfg)
    report = run_reidentification(f"{cfg.paths.run_dir}/checkpoints/last.ckpt", window_lengths=[30, 60, 120])
    for length in ("30", "60", "120"):
        pre = report["results"]["pretrained"][length]["rank1"]
        rnd = report["results"]["random_init"][length]["rank1"]
        assert pre > rnd + 0.15, (length, pre, rnd)
