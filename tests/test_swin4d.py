"""Swin4D: parity with the public SwiFT ver7 code, presets, scale presets, version options."""

from __future__ import annotations

import time

import pytest
import torch
from helpers import parity_fixture, shared_fixtures
from hydra.utils import instantiate

from brainfm.config import compose, config_dir
from brainfm.models.swin4d import SwinTransformer4D, _attention_mask

FIXTURES = shared_fixtures("swift_v7_parity")
VERSIONS = sorted(p.stem for p in (config_dir() / "model").glob("swin4d_v*.yaml"))
SIZES = {"5m": 7.3e6, "51m": 51e6, "202m": 202e6, "806m": 806e6, "3.2b": 3.2e9}


@pytest.mark.parametrize("name", ["A_default", "B_released"])
def test_parity_with_public_swift_ver7(name):
    info, load = parity_fixture(FIXTURES / name)
    a = info["constructor_args"]
    keys = ("img_size", "in_chans", "embed_dim", "depths", "num_heads", "window_size", "first_window_size",
            "patch_size", "c_multiplier", "last_layer_full_MSA")
    model = SwinTransformer4D(**{k: a[k] for k in keys})
    model.load_state_dict(load("state_dict.safetensors"), strict=True)  # SwiFT's key names, unchanged
    assert sum(p.numel() for p in model.parameters()) == info["n_params_total"]
    x = load("input.safetensors")["x"]
    model.eval()
    with torch.no_grad():
        y = model(x)
    ref = load("output.safetensors")["y"]
    assert y.shape == ref.shape == tuple(info["output_shape"])
    torch.testing.assert_close(y, ref, atol=1e-5, rtol=1e-4)
    model.train()
    loss = (model(x) ** 2).mean()
    loss.backward()
    assert loss.item() == pytest.approx(info["loss"], abs=1e-6)
    params = dict(model.named_parameters())
    for key, grad in load("grads.safetensors").items():
        torch.testing.assert_close(params[key].grad, grad, atol=1e-6, rtol=1e-4)
    assert params["norm.weight"].grad is None  # unused by SwiFT's forward, as in the reference


def test_swift_lightning_checkpoint_converter(tmp_path):
    info, load = parity_fixture(FIXTURES / "A_default")
    import argparse

    from brainfm.cli.convert import main as convert_main

    sd = load("state_dict.safetensors")
    # as SwiFT's Lightning 1.x saves it: argparse values among the hyper-parameters
    lightning = {"state_dict": {**{f"model.{k}": v for k, v in sd.items()}, "output_head.head.weight": torch.zeros(1, 192)},
                 "hyper_parameters": {"model": "swin4d_ver7", "args": argparse.Namespace(img_size=[96, 96, 96, 20])}}
    torch.save(lightning, tmp_path / "swift.ckpt")
    convert_main(["swift", str(tmp_path / "swift.ckpt"), str(tmp_path / "backbone.safetensors")])
    from brainfm.models.convert import convert

    backbone, heads = convert("swift", tmp_path / "swift.ckpt")
    assert set(backbone) == set(sd) and set(heads) == {"output_head.head.weight"}
    a = info["constructor_args"]
    model = SwinTransformer4D(**{k: a[k] for k in ("img_size", "embed_dim", "depths", "num_heads", "window_size",
                                                   "first_window_size", "patch_size")})
    from safetensors.torch import load_file

    model.load_state_dict(load_file(str(tmp_path / "backbone.safetensors")), strict=True)


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("size", [None, *SIZES])
def test_every_preset_and_size_runs_on_meta(version, size):
    overrides = [f"model={version}"] + ([f"model/size={size}"] if size else [])
    cfg = compose("train", overrides)
    start = time.perf_counter()
    with torch.device("meta"):
        model = instantiate(cfg.model, _convert_="all")
        y = model(torch.empty(2, 1, 96, 96, 96, 20))
    elapsed = time.perf_counter() - start
    assert y.shape == (2, model.num_features, 2, 2, 2, 20 // cfg.model.patch_size[3])
    assert model.pool(y).shape == (2, model.num_features)
    if size == "3.2b":
        assert elapsed < 10.0, elapsed


def test_scale_presets_match_their_names():
    for version in VERSIONS:
        for size, target in SIZES.items():
            cfg = compose("train", [f"model={version}", f"model/size={size}"])
            with torch.device("meta"):
                n = sum(p.numel() for p in instantiate(cfg.model, _convert_="all").parameters())
            if size == "5m":  # the lab's loose "5M": 7,323,660 in the public ver7 code at 96^3 x 20
                if version == "swin4d_v7":
                    assert n == 7_323_660
                continue
            if version == "swin4d_v11":  # two attentions per block: ~31 % more than the name says
                assert 1.15 * target < n < 1.45 * target, (version, size, n)
                continue
            assert abs(n - target) / target < 0.15, (version, size, n)


def test_windows_shrink_and_padding_is_masked():
    m = SwinTransformer4D(img_size=(48, 48, 48, 10), embed_dim=12, depths=(2, 2, 2, 2), num_heads=(2, 2, 2, 2),
                          window_size=(4, 4, 4, 4), first_window_size=(4, 4, 4, 4), patch_size=(6, 6, 6, 2))
    y = m(torch.randn(1, 1, 48, 48, 48, 10))  # 5 time tokens, window 4: padded to 8
    assert y.shape == (1, 96, 1, 1, 1, 5) and torch.isfinite(y).all()
    mask = _attention_mask((4, 4, 4, 8), (4, 4, 4, 5), (4, 4, 4, 4), (0, 0, 0, 0), torch.device("cpu"))
    # second time window holds t = 4 (real) and 5..7 (padding): only t = 4 may be attended to
    # (plus each padded query's own position)
    w = mask[1, 0]
    key_t = torch.arange(256) % 4 + 4
    assert bool(w[:, key_t == 4].all())
    off_diag = w & ~torch.eye(256, dtype=torch.bool)
    assert not bool(off_diag[:, key_t > 4].any())


@pytest.mark.parametrize("version", VERSIONS)
def test_versions_train_a_step_on_cpu(version):
    cfg = compose("train", [f"model={version}", "model.img_size=[48,48,48,8]", "model.embed_dim=12",
                            "model.depths=[1,1,1,1]", "model.num_heads=[2,2,2,2]", "model.use_checkpoint=true"])
    model = instantiate(cfg.model, _convert_="all")
    x = torch.randn(2, 1, 48, 48, 48, 8)
    loss = model.pool(model(x)).pow(2).mean()
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


def test_rope_is_relative_in_time():
    """With RoPE and no APE, shifting the input in time by a whole window changes nothing inside."""
    torch.manual_seed(0)
    m = SwinTransformer4D(img_size=(48, 48, 48, 8), embed_dim=12, depths=(1, 1, 1, 1), num_heads=(2, 2, 2, 2),
                          window_size=(4, 4, 4, 4), first_window_size=(4, 4, 4, 4), ape="none", rope=True,
                          attention="factorized").eval()
    x = torch.randn(1, 1, 48, 48, 48, 8)
    with torch.no_grad():
        a = m(x)
        b = m(torch.roll(x, 4, dims=-1))
    torch.testing.assert_close(torch.roll(a, 4, dims=-1), b, atol=1e-4, rtol=1e-4)


FLEX_CASES = {  # small grids whose windows are both shifted and zero-padded (time axis)
    "swin4d_v7": ["model.img_size=[48,48,48,10]"],  # 10 time tokens, windows of 4: padded to 12
    "swin4d_v9": ["model.img_size=[48,48,48,20]"],  # temporal patch 2: 10 tokens, padded to 12
    "swin4d_v11": ["model.img_size=[48,48,48,15]"],  # 15 time tokens, temporal windows of 10: padded to 20
}


def _backend_pair(version: str):
    overrides = [f"model={version}", "model.embed_dim=12", "model.depths=[2,2,2,2]", "model.num_heads=[2,2,2,2]",
                 *FLEX_CASES[version]]
    torch.manual_seed(0)
    sdpa = instantiate(compose("train", overrides)["model"], _convert_="all")
    flex = instantiate(compose("train", [*overrides, "model.attention_backend=flex"])["model"], _convert_="all")
    with torch.no_grad():  # zero-initialised embeddings and small LayerScales would hide differences
        for p in sdpa.parameters():
            p.add_(0.05 * torch.randn_like(p))
    flex.load_state_dict(sdpa.state_dict())
    return sdpa, flex


@pytest.mark.parametrize("version", sorted(FLEX_CASES))
def test_flex_attention_equals_sdpa(version):
    """FlexAttention with block masks built from the window regions = SDPA with dense masks (fp32),
    with shifted and zero-padded windows and a batch of 2 (the block mask spans the batch)."""
    sdpa, flex = _backend_pair(version)
    masked = [p.mask is not None for stage in sdpa.layers for blk in stage.blocks
              for p in blk.plans(torch.zeros(2, *_grid_of(sdpa, stage), 12))]
    assert any(masked), "the case must have masked windows"
    x = torch.randn(2, 1, *sdpa.img_size)
    with torch.no_grad():
        a, b = sdpa(x), flex(x)
    torch.testing.assert_close(b, a, atol=2e-5, rtol=1e-5)


def _grid_of(model, stage):
    i = list(model.layers).index(stage)
    d, h, w, t = model.grid_size
    return (d >> i, h >> i, w >> i, t)


def test_flex_attention_refuses_cpu_training():
    _, flex = _backend_pair("swin4d_v7")
    with pytest.raises(RuntimeError, match="no backward on the CPU"):
        flex(torch.randn(1, 1, *flex.img_size))


def test_checkpoint_reader_refuses_pickled_code(tmp_path):
    """weights_only=True everywhere: a file whose pickle would run code is refused with the file named."""
    from brainfm.checkpoints import read_state_dict
    from brainfm.errors import CheckpointError

    class Payload:
        def __reduce__(self):
            return (print, ("this must never run",))

    torch.save({"state_dict": {"w": torch.zeros(1)}, "extra": Payload()}, tmp_path / "evil.ckpt")
    with pytest.raises(CheckpointError, match="evil.ckpt"):
        read_state_dict(tmp_path / "evil.ckpt")
    torch.save({"w": torch.ones(2)}, tmp_path / "plain.pt")
    assert torch.equal(read_state_dict(tmp_path / "plain.pt")["w"], torch.ones(2))
