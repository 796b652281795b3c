"""SimMIM pieces (masks, decoder layout, loss on masked voxels) and the supervised task."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from brainfm import training as train
from brainfm.models.simmim import SimMIMDecoder, patch_mask
from brainfm.tasks.volume_modeling import SimMIM

TINY = dict(_target_="brainfm.models.swin4d.SwinTransformer4D", img_size=[48, 48, 48, 4], embed_dim=12,
            depths=[1, 1, 1, 1], num_heads=[2, 2, 2, 2], window_size=[4, 4, 4, 4], first_window_size=[4, 4, 4, 4],
            patch_size=[6, 6, 6, 2])


def test_patch_masks_have_the_exact_ratio_and_tubes_are_constant_in_time():
    m = patch_mask(3, (4, 4, 4, 10), 0.6, "random")
    assert m.shape == (3, 4, 4, 4, 10) and (m.flatten(1).sum(1) == round(0.6 * 640)).all()
    t = patch_mask(3, (4, 4, 4, 10), 0.8, "tube")
    assert (t == t[..., :1]).all() and (t[..., 0].flatten(1).sum(1) == round(0.8 * 64)).all()
    with pytest.raises(ValueError):
        patch_mask(1, (2, 2, 2, 2), 1.0)


@pytest.mark.parametrize("kind", ["linear", "pixel_shuffle"])
def test_decoder_unshuffles_tokens_back_to_voxels(kind):
    stride, c = (2, 3, 2, 2), 1
    x = torch.randn(2, c, 4, 6, 4, 6)
    dec = SimMIMDecoder(24 if kind == "linear" else 8, stride, c, kind, hidden=8)
    with torch.no_grad():
        if kind == "linear":  # token features = the voxels of its patch, in (x, y, z, t, c) order
            dec.proj.weight.copy_(torch.eye(24))
            dec.proj.bias.zero_()
            feats = x.view(2, c, 2, 2, 2, 3, 2, 2, 3, 2).permute(0, 2, 4, 6, 8, 3, 5, 7, 9, 1).reshape(2, 2, 2, 2, 3, 24)
            feats = feats.permute(0, 5, 1, 2, 3, 4)
            torch.testing.assert_close(dec(feats), x)
        else:  # shapes only; the layout is shared with the linear path
            assert dec(torch.randn(2, 8, 2, 2, 2, 3)).shape == (2, 1, 4, 6, 4, 6)


def test_simmim_loss_counts_masked_voxels_only(monkeypatch):
    task = SimMIM(TINY, mask_ratio=0.5)
    x = torch.randn(1, 1, 48, 48, 48, 4)
    base = task.compute_losses({"volume": x})["loss"]
    # one masked patch (the first 6x6x6 voxels x 2 TRs): the loss is the L1 over exactly those voxels
    fixed = torch.zeros(1, 8, 8, 8, 2, dtype=torch.bool)
    fixed[0, 0, 0, 0, 0] = True
    monkeypatch.setattr("brainfm.tasks.volume_modeling.patch_mask", lambda *a, **k: fixed)
    with torch.no_grad():
        tokens = task.model.embed_patches(x)
        tokens = torch.where(fixed[..., None], task.mask_token, tokens)
        recon = task.decoder(task.model.forward_tokens(tokens))
    expected = (recon - x)[:, :, :6, :6, :6, :2].abs().mean()
    torch.testing.assert_close(task.compute_losses({"volume": x})["loss"].detach(), expected)
    assert torch.isfinite(base)


def test_simmim_learns_a_fixed_volume():
    torch.manual_seed(0)
    task = SimMIM(TINY, mask_ratio=0.6, mask_kind="tube", decoder="pixel_shuffle")
    opt = torch.optim.AdamW(task.parameters(), lr=3e-3)
    x = torch.randn(2, 1, 48, 48, 48, 4).cumsum(dim=2) / 10  # spatially smooth signal
    losses = []
    for _ in range(25):
        loss = task.compute_losses({"volume": x})["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert sum(losses[-5:]) / 5 < 0.9 * sum(losses[:5]) / 5


def test_supervised_subject_classification_on_roi_windows(cfg_for):
    cfg = cfg_for("model=bert", "task=supervised", "task.target=subject", "task.kind=multiclass", "task.num_classes=7",
                  "task.optimizer.lr=1e-3", "task.head=bn_linear", "trainer.max_steps=60", "trainer.val_check_interval=60",
                  "data.window.length=60", "data.window.min_length=null", "experiment_name=probe")
    metrics = train.run(cfg)
    assert set(metrics) >= {"val/acc", "val/balanced_acc", "val/auroc", "val/loss"}
    assert metrics["val/acc"] > 2 / 7  # chance is 1/7 (one value per subject: 0, 1/7, ..., 1)


def test_simmim_loss_falls_on_real_nifti(cfg_for, tmp_path):
    """The nitime/nipy runs, preprocessed into the volume store, train a small Swin4D v9 with SimMIM."""
    from brainfm.config import repo_root
    from brainfm.data.embedded import build_nifti_toy_store, fetch

    fetch("nifti_toy", data_dir=repo_root() / "data")
    store = build_nifti_toy_store(repo_root() / "data")
    cfg = cfg_for("experiment=simmim_toy", f"data.path={store}", "trainer.max_steps=40", "trainer.val_check_interval=40",
                  "trainer.log_every_n_steps=1")
    train.run(cfg)
    import csv

    with open(Path(cfg.paths.run_dir) / "csv" / "metrics.csv") as f:
        losses = [float(r["train/loss"]) for r in csv.DictReader(f) if r.get("train/loss")]
    assert len(losses) == 40
    assert sum(losses[-8:]) / 8 < 0.8 * sum(losses[:8]) / 8


def test_labels_are_joined_by_subject_and_errors_name_the_fix(tmp_path, hcp_h5):
    from brainfm.data.datamodules.roi import ROIDataModule
    from brainfm.errors import DataError

    ids = ["101309", "102311", "102816", "131217", "211619", "213522", "377451"]
    csv_path = tmp_path / "pheno.csv"
    csv_path.write_text("Subject,Gender,Age\n" + "".join(f"{s},{'MF'[i % 2]},{20 + i}\n" for i, s in enumerate(ids)))
    labels = {"file": str(csv_path), "id_column": "Subject", "columns": {"sex": "Gender", "age": "Age"},
              "categories": {"sex": ["F", "M"]}}
    dm = ROIDataModule(name="hcp", path=str(hcp_h5), window={"length": 30}, labels=labels, batch_size=8)
    dm.setup()
    batch = dm.on_before_batch_transfer(next(iter(dm.train_dataloader())), 0)
    for s, sex, age in zip(batch["subject"], batch["sex"], batch["age"]):
        assert int(sex) == (0 if int(s) % 2 else 1) and float(age) == 20 + int(s)
    with pytest.raises(DataError, match=r"no column\(s\) \['Sex'\]"):
        ROIDataModule(name="hcp", path=str(hcp_h5), labels={**labels, "columns": {"sex": "Sex"}}).setup()
    csv_path.write_text("Subject,Gender,Age\n101309,M,20\n")
    with pytest.raises(DataError, match="6 subject"):
        ROIDataModule(name="hcp", path=str(hcp_h5), labels=labels).setup()
