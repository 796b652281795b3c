"""TFF (Malkiel et al. 2022): model shapes and grids, the intensity loss against a hand computation,
the perceptual term's local VGG16 weights, and the experiment=tff_hcp preset trained on real volumes
(the nitime runs at their native 10x10x18 grid) and reloaded from its checkpoint."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from brainfm import training as train
from brainfm.config import compose, repo_root
from brainfm.errors import ConfigError
from brainfm.models.tff import TFF, tff_grids
from brainfm.tasks.tff import VGG16_CONVS, TFFAutoencoder, VGG16Features, intense_voxels


# Tiny 3-D convolutions: ~20x faster than with 2 threads
pytestmark = pytest.mark.usefixtures("one_thread_per_module")


TINY = dict(_target_="brainfm.models.tff.TFF", img_size=[8, 8, 4], hidden_size=16, num_heads=2, intermediate_size=32,
            encoder_blocks=[1, 1, 1])


# -- model ---------------------------------------------------------------------------------------------
def test_paper_size_grids_and_bottleneck():
    """At TFF's 75x93x81 the bottleneck flattens to exactly 2 x 10 x 12 x 11 = 2640 values (no Linear)."""
    with torch.device("meta"):
        hcp, cube = TFF(), TFF(img_size=(96, 96, 96))
    assert hcp.grids == [(75, 93, 81), (38, 47, 41), (19, 24, 21), (10, 12, 11)]
    assert isinstance(hcp.into_hidden, nn.Identity) and hcp.from_hidden.out_features == 2640
    assert isinstance(cube.into_hidden, nn.Linear) and cube.into_hidden.in_features == 2 * 12**3
    assert [lvl.block.conv1.in_channels for lvl in hcp.decoder.levels] == [16, 8, 4]
    assert hcp.encoder.out_channels == 32 and hcp.encoder.stem.in_channels == 2
    assert sum(p.numel() for p in hcp.parameters()) == 95_609_263
    assert tff_grids((9, 14, 10), 2) == [(9, 14, 10), (5, 7, 5), (3, 4, 3)]


def test_round_trip_shapes_pooling_and_temporal_mixing():
    torch.manual_seed(0)
    m = TFF(img_size=(9, 14, 10), hidden_size=16, num_heads=2, intermediate_size=32).eval()
    x = torch.randn(2, 2, 9, 14, 10, 3)
    with torch.no_grad():
        recon = m(x)
        seq, cls = m.encode(x)
        assert recon.shape == (2, 1, 9, 14, 10, 3) and seq.shape == (2, 3, 16)
        assert m.encoder(x[..., 0]).shape == (2, 32, 2, 2, 2)
        torch.testing.assert_close(m.embed(x), seq.mean(dim=1))
        torch.testing.assert_close(m.embed(x.half()), seq.mean(dim=1), atol=2e-3, rtol=1e-3)  # fp16 store clips
        assert cls is None and m.transformer.pooler is None  # BERT's pooler only with pool=cls
        with_cls = TFF(img_size=(9, 14, 10), hidden_size=16, num_heads=2, intermediate_size=32, pool="cls").eval()
        missing = with_cls.load_state_dict(m.state_dict(), strict=False).missing_keys
        assert missing == ["transformer.pooler.weight", "transformer.pooler.bias"]
        seq_c, cls = with_cls.encode(x)
        torch.testing.assert_close(seq_c, seq)
        assert cls.shape == (2, 16) and cls.abs().max() < 1  # tanh
        torch.testing.assert_close(with_cls.embed(x), cls)
        # the transformer mixes TRs: changing TR 2 changes the reconstruction of TR 0 ...
        x2 = x.clone()
        x2[..., 2] += 1.0
        assert not torch.allclose(m(x2)[..., 0], recon[..., 0])
        # ... which TFF's phase-1 autoencoder (no transformer) reconstructs frame by frame
        ae = TFF(img_size=(9, 14, 10), hidden_size=16, num_layers=0).eval()
        assert ae.encode(x)[1] is None and ae.transformer is None
        torch.testing.assert_close(ae(x2)[..., 0], ae(x)[..., 0])
    with pytest.raises(ConfigError, match="model.img_size must equal data.shape"):
        m(torch.randn(1, 1, 9, 14, 10, 2))
    with pytest.raises(ConfigError, match="model.max_positions=4"):
        TFF(img_size=(9, 14, 10), hidden_size=16, num_heads=2, max_positions=4)(torch.randn(1, 2, 9, 14, 10, 4))
    with pytest.raises(ConfigError, match="model.pool=cls needs the transformer"):
        TFF(img_size=(9, 14, 10), num_layers=0, pool="cls")


# -- intensity loss ---------------------------------------------------------------------------------------
def test_intensity_loss_equals_a_hand_computation(monkeypatch):
    # one sample, a 4x4x1 grid, 2 TRs; the brain is the first 10 voxels in C order
    brain = torch.zeros(1, 4, 4, 1, dtype=torch.bool)
    brain.view(-1)[:10] = True
    voxel = torch.zeros(1, 4, 4, 1, 2)  # per-voxel z, 0 outside the brain (brainfm's store)
    voxel.view(16, 2)[:10, 0] = torch.tensor([-10.0, 1, 2, 3, 4, 5, 6, 7, 8, 9])
    voxel.view(16, 2)[:10, 1] = torch.tensor([1.0, 2, 3, 4, 5, 6, 7, 8, 9, 9.05])
    sel = intense_voxels(voxel, brain, 0.9).view(16, 2)
    # TR 0: |z| = 10, 1..9 -> 0.9 quantile 9 + 0.1 * (10 - 9) = 9.1: only |-10| lies above
    # TR 1: 1..9, 9.05 -> 9 + 0.1 * 0.05 = 9.005: only 9.05
    assert sel[:, 0].nonzero().flatten().tolist() == [0] and sel[:, 1].nonzero().flatten().tolist() == [9]
    # without a mask, TFF's rule: voxels equal to the corner voxel [0, 0, 0] are background
    flat = voxel.view(16, 2).flip(0).reshape(1, 4, 4, 1, 2)  # brain in the last 10 voxels, corner = 0
    sel_nomask = intense_voxels(flat, None, 0.9).view(16, 2)
    assert sel_nomask[:, 0].nonzero().flatten().tolist() == [15] and sel_nomask[:, 1].nonzero().flatten().tolist() == [6]

    task = TFFAutoencoder(dict(TINY, img_size=[4, 4, 1]))
    g = torch.arange(32, dtype=torch.float32).view(1, 4, 4, 1, 2) / 10  # global channel
    x = torch.cat([g[:, None], voxel[:, None]], dim=1)  # (1, 2, 4, 4, 1, 2)
    recon = torch.zeros(1, 1, 4, 4, 1, 2)
    monkeypatch.setattr(task.model, "forward", lambda v: recon)
    out = task.compute_losses({"volume": x, "brain_mask": brain})
    # intense voxels: (voxel 0, TR 0) target 0.0 and (voxel 9, TR 1) target (9 * 2 + 1) / 10 = 1.9
    assert out["intensity"].item() == pytest.approx((0.0 + 1.9) / 2)
    assert out["l1"].item() == pytest.approx(np.arange(32).sum() / 10 / 32)
    assert out["loss"].item() == pytest.approx(out["l1"].item() + out["intensity"].item())


def test_intense_voxels_match_numpy_per_sample_and_tr():
    rng = np.random.default_rng(0)
    ref = rng.standard_normal((3, 5, 6, 4, 7)).astype(np.float32)
    mask = rng.random((3, 5, 6, 4)) > 0.3
    got = intense_voxels(torch.from_numpy(ref), torch.from_numpy(mask), 0.9).numpy()
    for b in range(3):
        for t in range(7):
            v = np.abs(ref[b, ..., t])
            want = mask[b] & (v > np.quantile(v[mask[b]], 0.9))
            np.testing.assert_array_equal(got[b, ..., t], want)
            assert want.sum() == pytest.approx(0.1 * mask[b].sum(), abs=1)


# -- perceptual loss ----------------------------------------------------------------------------------------
def _vgg16_state(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    state = {}
    for i, (c_in, c_out) in VGG16_CONVS.items():
        state[f"features.{i}.weight"] = torch.randn(c_out, c_in, 3, 3, generator=g) * (2 / (9 * c_in)) ** 0.5
        state[f"features.{i}.bias"] = torch.randn(c_out, generator=g) * 0.01
    state["classifier.0.weight"] = torch.zeros(4, 4)  # a whole VGG16 state dict carries more: ignored
    return state


def test_perceptual_needs_a_weights_file_and_runs_with_one(tmp_path):
    with pytest.raises(ConfigError, match="task.perceptual_weights=<path"):
        TFFAutoencoder(TINY, perceptual=True)
    missing = TFFAutoencoder(TINY, perceptual=True, perceptual_weights=str(tmp_path / "vgg16.pth"))
    x = torch.randn(2, 2, 8, 8, 4, 3)
    with pytest.raises(ConfigError, match="vgg16.pth: no such file"):
        missing.compute_losses({"volume": x})

    state = _vgg16_state()
    path = tmp_path / "vgg16.pth"
    torch.save(state, path)
    # the features are torchvision's layout: the same as nn.Sequential(features[:16]) loaded from the file
    layers = []
    for i in range(16):
        if i in VGG16_CONVS:
            layers.append(nn.Conv2d(*VGG16_CONVS[i], 3, padding=1))
        else:
            layers.append(nn.MaxPool2d(2) if i in (4, 9) else nn.ReLU())
    ref = nn.Sequential(*layers)
    ref.load_state_dict({k[len("features."):]: v for k, v in state.items() if k.startswith("features.")})
    img = torch.randn(2, 3, 16, 16)
    relu2_2, relu3_3 = VGG16Features(path)(img)
    torch.testing.assert_close(relu2_2, ref[:9](img))
    torch.testing.assert_close(relu3_3, ref(img))

    torch.manual_seed(0)
    task = TFFAutoencoder(TINY, perceptual=True, perceptual_weights=str(path), perceptual_fraction=0.5)
    out = task.compute_losses({"volume": x})
    assert out["perceptual"].item() > 0
    torch.testing.assert_close(out["loss"], out["l1"] + out["intensity"] + out["perceptual"])
    out["loss"].backward()
    assert task.model.encoder.stem.weight.grad.abs().sum() > 0
    assert not any("w0_weight" in k for k in task.state_dict())  # VGG16 stays out of checkpoints ...
    assert sum(p.numel() for p in task.parameters()) == sum(p.numel() for p in task.model.parameters())  # ... and the optimiser

    bad = dict(state)
    bad["features.5.weight"] = torch.zeros(128, 3, 3, 3)
    torch.save(bad, tmp_path / "bad.pth")
    with pytest.raises(ConfigError, match=r"features.5.weight is shape \(128, 3, 3, 3\), expected \(128, 64, 3, 3\)"):
        VGG16Features(tmp_path / "bad.pth")


# -- task checks and phase-1 -> phase-2 initialisation ------------------------------------------------------
def test_data_mismatches_are_named():
    with pytest.raises(ConfigError, match="data.normalization.load=stored\\+voxel"):
        TFFAutoencoder(TINY, data_meta={"in_chans": 1, "normalization": {"load": "stored"}})
    with pytest.raises(ConfigError, match=r"model.img_size=\[8, 8, 4\] but the data's grid is \[10, 10, 18\]"):
        TFFAutoencoder(TINY, data_meta={"in_chans": 2, "shape": [10, 10, 18]})
    with pytest.raises(ConfigError, match="data.window.length=30"):
        TFFAutoencoder(TINY, data_meta={"window_length": 30})
    with pytest.raises(ConfigError, match="needs model=tff"):
        TFFAutoencoder(dict(_target_="torch.nn.Linear", in_features=2, out_features=2))
    with pytest.raises(ConfigError, match="task.intensity_channel=1 is not a channel"):
        TFFAutoencoder(dict(TINY, in_chans=1))
    one = TFFAutoencoder(dict(TINY, in_chans=1), intensity_channel=0)
    assert one.compute_losses({"volume": torch.randn(1, 1, 8, 8, 4, 2)})["loss"].isfinite()


def test_phase1_autoencoder_initialises_phase2(tmp_path):
    phase1 = TFFAutoencoder(dict(TINY, num_layers=0))
    torch.save({"state_dict": phase1.state_dict()}, tmp_path / "phase1.ckpt")
    phase2 = TFFAutoencoder(TINY, init_from=str(tmp_path / "phase1.ckpt"))
    torch.testing.assert_close(phase2.model.encoder.stem.weight, phase1.model.encoder.stem.weight)
    torch.testing.assert_close(phase2.model.decoder.head[1].weight, phase1.model.decoder.head[1].weight)
    assert phase2.hparams.init_from is None  # the weights travel in the checkpoint, not the path
    with pytest.raises(ConfigError, match="does not fit the model"):
        TFFAutoencoder(dict(TINY, hidden_size=32), init_from=str(tmp_path / "phase1.ckpt"))


# -- the preset ---------------------------------------------------------------------------------------------
def test_tff_hcp_preset_is_the_paper_setup(tmp_path):
    cfg = compose("train", [f"paths.output_dir={tmp_path}", "experiment=tff_hcp"])
    assert list(cfg.data.shape) == [75, 93, 81] and cfg.data.tr == 0.72 and cfg.data.window.length == 20
    assert cfg.data.normalization.load == "stored+voxel" and list(cfg.model.img_size) == [75, 93, 81]
    assert (cfg.model.hidden_size, cfg.model.num_layers, cfg.model.num_heads) == (2640, 2, 16)
    assert not cfg.task.perceptual and cfg.task.intensity_quantile == 0.9
    from omegaconf import OmegaConf

    with torch.device("meta"):
        task = TFFAutoencoder(OmegaConf.to_container(cfg.model, resolve=True),
                              data_meta={"in_chans": 2, "shape": [75, 93, 81], "window_length": 20})
    assert isinstance(task.model.into_hidden, nn.Identity)


def _nitime_store(tmp: Path) -> Path:
    """The two nitime runs (real BOLD, 10x10x18 voxels in LSP, stored LAS: 10x18x10; 40 TRs, TR 1.35 s) as a volume
    store on their own grid."""
    from brainfm.data.embedded import fetch
    from brainfm.data.preprocess.volumes import preprocess_volumes

    folder = fetch("nifti_toy", data_dir=repo_root() / "data")
    preprocess_volumes(folder, tmp / "store", pattern="sub-nitime_*_bold.nii.gz", progress=False)
    return tmp / "store"


def _small_tff_hcp(tmp: Path, store: Path) -> list[str]:
    """experiment=tff_hcp on the nitime store, with small widths."""
    return [
        f"paths.output_dir={tmp}/outputs", f"paths.split_dir={tmp}/splits", "trainer.enable_progress_bar=false",
        "trainer.enable_model_summary=false", "logger=csv", "experiment=tff_hcp",
        f"data.path={store}", "data.tr=1.35", "data.shape=[10,18,10]", "data.split.kind=time", "data.window.length=4",
        "data.batch_size=2", "data.eval_batch_size=4", "data.num_workers=0", "data.pin_memory=false", "data.pool_mb=16",
        "model.hidden_size=32", "model.num_heads=4", "model.intermediate_size=64", "model.encoder_blocks=[1,1,1,1]",
        "task.optimizer.lr=3e-3", "trainer.log_every_n_steps=1",
    ]


@pytest.fixture(scope="module")
def tff_run(tmp_path_factory):
    """experiment=tff_hcp for 50 steps on one CPU process."""
    tmp = tmp_path_factory.mktemp("tff")
    cfg = compose("train", [*_small_tff_hcp(tmp, _nitime_store(tmp)), "trainer=cpu", "trainer.max_steps=50",
                            "trainer.val_check_interval=50"])
    datamodule, task, trainer = train.build(cfg)
    trainer.fit(task, datamodule=datamodule)
    return cfg, datamodule, task


def test_tff_hcp_trains_on_real_volumes_and_the_loss_falls(tff_run):
    cfg, datamodule, task = tff_run
    with open(Path(cfg.paths.run_dir) / "csv" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    losses = [float(r["train/loss"]) for r in rows if r.get("train/loss")]
    assert len(losses) == 50
    # medians: the clips that start at a run's first TR (before steady-state magnetisation, which is why
    # TFF drops the first 10 TRs) stay ~0.7 above the others and come back every epoch
    assert np.median(losses[-10:]) < 0.85 * np.median(losses[:10]), losses
    val = {k: float(v) for r in rows for k, v in r.items() if k.startswith("val/") and v}
    assert set(val) == {"val/loss", "val/l1", "val/intensity"}
    assert val["val/loss"] == pytest.approx(val["val/l1"] + val["val/intensity"], rel=1e-5)


def test_checkpoint_reloads_and_embeds_the_same(tff_run):
    from brainfm.runs import build_task_from_checkpoint, load_checkpoint

    cfg, datamodule, task = tff_run
    ckpt = load_checkpoint(cfg.paths.run_dir)  # torch.load(weights_only=True)
    assert ckpt["brainfm"]["task_class"] == "brainfm.tasks.tff.TFFAutoencoder"
    assert ckpt["hyper_parameters"]["data_meta"]["in_chans"] == 2
    assert ckpt["hyper_parameters"]["data_meta"]["normalization"]["load"] == "stored+voxel"
    reloaded = build_task_from_checkpoint(ckpt)
    fresh = build_task_from_checkpoint(ckpt, weights=False)
    batch = next(iter(datamodule.val_dataloader()))
    task.eval()
    emb = reloaded.embed(batch)
    assert emb.shape == (batch["volume"].shape[0], 32)
    torch.testing.assert_close(emb, task.embed(batch))
    assert not torch.allclose(emb, fresh.embed(batch))


@pytest.mark.slow
def test_tff_hcp_trains_under_ddp_without_unused_parameters(tmp_path):
    """The preset's DDP (find_unused_parameters=false) on 2 gloo processes, as brainfm-train runs it."""
    import json
    import os
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "brainfm.cli.train", *_small_tff_hcp(tmp_path, _nitime_store(tmp_path)),
           "trainer.accelerator=cpu", "trainer.precision=32-true", "trainer.devices=2", "trainer.num_nodes=1",
           "trainer.strategy.process_group_backend=gloo", "trainer.max_steps=4", "trainer.val_check_interval=4"]
    env = {**{k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBATCH_"))}, "OMP_NUM_THREADS": "1"}
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=repo_root())
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-5000:]
    summary = json.loads((tmp_path / "outputs" / "tff_hcp" / "local" / "summary.json").read_text())
    assert summary["global_step"] == 4 and np.isfinite(summary["metrics"]["val/loss"])
