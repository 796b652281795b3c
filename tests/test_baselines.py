"""The simple baselines (:mod:`brainfm.models.baselines`): meanMLP and BrainNetCNN keep the backbone
contract, build from their configs, and compute what their papers say (meanMLP's correlation readout
of the input is FC; BrainNetCNN sees a window only through its FC, so the order of its TRs does not
matter)."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

from brainfm.config import compose
from brainfm.errors import ConfigError
from brainfm.eval.fingerprinting import fc_features
from brainfm.models import build_model
from brainfm.models.backbone import Backbone
from brainfm.models.baselines import BrainNetCNN, MeanMLP
from helpers import check_backbone_contract

torch.manual_seed(0)
R, T = 12, 20


def _models():
    return {
        "mean_mlp": MeanMLP(R, hidden=16, d_model=8),
        "mean_mlp_correlation": MeanMLP(R, hidden=16, d_model=8, pooling="correlation"),
        "brainnetcnn": BrainNetCNN(R, e2e_channels=(4, 4), e2n_channels=6, n2g_channels=10),
    }


@pytest.mark.parametrize("name", ["mean_mlp", "mean_mlp_correlation", "brainnetcnn"])
def test_baselines_keep_the_backbone_contract(name):
    model = _models()[name]
    assert model.input_keys == ("bold",) and model.token_dim is None
    check_backbone_contract(model, {"bold": torch.randn(2, T, R), "t": torch.arange(T) * 0.72}, any_tr=True)


def test_mean_mlp_is_an_mlp_per_tr_then_the_mean_over_trs():
    model = MeanMLP(R, hidden=16, d_model=8).eval()
    bold = torch.randn(3, T, R)
    with torch.no_grad():
        per_tr = torch.stack([model.mlp(bold[:, i]) for i in range(T)], dim=1)
        torch.testing.assert_close(model.features(bold), per_tr)
        torch.testing.assert_close(model.pooled(bold), per_tr.mean(dim=1))
        # no time order and no window length: shuffled and shorter windows are fine
        torch.testing.assert_close(model.pooled(bold[:, torch.randperm(T)]), model.pooled(bold), atol=1e-6, rtol=0)
        assert model.pooled(bold[:, :5]).shape == (3, 8)
    assert isinstance(model.mlp[1], torch.nn.LayerNorm)
    assert isinstance(MeanMLP(R, layer_norm=False).mlp[1], torch.nn.Identity)


def test_mean_mlp_correlation_readout_of_the_input_is_fc():
    model = MeanMLP(R, hidden=16, d_model=8, pooling="correlation",
                    readout={"include_input": True, "init": "identity", "learn_projection": False}).eval()
    assert model.out_dim == R * (R - 1) // 2
    windows = torch.randn(4, T, R)
    windows[1, :, 3] = 0.0  # a constant ROI: zero correlations, as fc_features
    with torch.no_grad():
        pooled = model.pooled(windows)
    fc = torch.from_numpy(fc_features(windows.numpy()))
    expected = fc - fc.mean(dim=1, keepdim=True)  # the readout's default center=True: the edge vector's mean removed
    torch.testing.assert_close(pooled, expected, atol=1e-6, rtol=0)


def test_mean_mlp_covariance_pooling_has_its_width():
    model = MeanMLP(R, hidden=16, d_model=8, pooling="covariance", readout={"include_input": False}).eval()
    assert model.out_dim == 8 * 9 // 2
    with torch.no_grad():
        assert model.pooled(torch.randn(2, T, R)).shape == (2, model.out_dim)


def test_brainnetcnn_reads_the_window_through_its_fc():
    model = BrainNetCNN(R, e2e_channels=(4, 4), e2n_channels=6, n2g_channels=10).eval()
    bold = torch.randn(3, T, R)
    bold[2, :, 5] = 1.0  # a constant ROI
    with torch.no_grad():
        fc = model.connectivity(bold)
        expected = torch.from_numpy(fc_features(bold.numpy()))
        rows, cols = torch.triu_indices(R, R, 1)
        torch.testing.assert_close(fc[:, rows, cols], expected, atol=1e-6, rtol=0)
        assert torch.all(fc[2, 5] == 0)
        shuffled = bold[:, torch.randperm(T)]
        torch.testing.assert_close(model.pooled(shuffled), model.pooled(bold), atol=1e-5, rtol=0)
        torch.testing.assert_close(model.features(shuffled), model.features(bold), atol=1e-5, rtol=0)
        assert model.features(bold).shape == (3, R, 6)
    with pytest.raises(ConfigError, match="at least 2 TRs"):
        model.pooled(bold[:, :1])
    with pytest.raises(ConfigError, match="no per-TR features"):
        model.frame_features(bold)


def test_brainnetcnn_edge_to_edge_is_a_cross_shaped_filter():
    model = BrainNetCNN(R, e2e_channels=(3,), e2n_channels=4, n2g_channels=5)
    layer = model.e2e[0]
    x = torch.randn(2, 1, R, R)
    with torch.no_grad():
        y = layer(x)
        w_row, w_col = layer.row.weight[:, 0, 0], layer.col.weight[:, 0, :, 0]  # (C, R) each
        # edge (i, j): a filter over row i plus a filter over column j
        expected = (torch.einsum("brk,ck->bcr", x[:, 0], w_row)[..., None]
                    + torch.einsum("bkr,ck->bcr", x[:, 0], w_col)[:, :, None, :]
                    + (layer.row.bias + layer.col.bias)[None, :, None, None])
        torch.testing.assert_close(y, expected, atol=1e-5, rtol=1e-5)


def test_brainnetcnn_gradients_reach_every_parameter():
    model = BrainNetCNN(R, e2e_channels=(4, 4), e2n_channels=6, n2g_channels=10, dropout=0.0)
    model.pooled(torch.randn(3, T, R)).square().sum().backward()
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    frozen = sorted(n for n, p in model.named_parameters() if not p.requires_grad)
    assert frozen == ["connectome.proj.weight"]  # the fixed identity projection of the FC readout
    for name, p in trainable.items():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("cls, pooling, choices", [
    (BrainNetCNN, "correlation", r"\['mean'\]"),
    (BrainNetCNN, "cls", r"\['mean'\]"),
    (MeanMLP, "code", r"\['mean', 'correlation', 'covariance'\]"),
])
def test_an_unsupported_pooling_names_the_choices(cls, pooling, choices):
    with pytest.raises(ConfigError, match=rf"model.pooling='{pooling}'.*{cls.__name__}.*{choices}"):
        cls(R, pooling=pooling)


def test_a_readout_without_a_second_order_pooling_is_refused():
    with pytest.raises(ConfigError, match="model.readout.rank is set but model.pooling=mean has no readout"):
        BrainNetCNN(R, readout={"rank": 4})
    with pytest.raises(ConfigError, match="model.readout.rank is set but model.pooling=mean has no readout"):
        MeanMLP(R, readout={"rank": 4})
    MeanMLP(R, readout={"rank": None, "center": True})  # the defaults: accepted (the config group always has them)


@pytest.mark.parametrize("choice, cls, out_dim", [("mean_mlp", MeanMLP, 128), ("brainnetcnn", BrainNetCNN, 256)])
def test_baselines_build_from_their_configs(choice, cls, out_dim):
    cfg = compose("train", [f"model={choice}"])
    assert cfg.model.n_rois == cfg.data.n_rois == 94
    model = build_model(OmegaConf.to_container(cfg.model, resolve=True))
    assert type(model) is cls and model.out_dim == out_dim and model.pooling == "mean"
    model.eval()
    with torch.no_grad():
        assert model.pooled_batch({"bold": torch.randn(2, 30, 94)}).shape == (2, out_dim)


def test_mean_mlp_config_takes_a_second_order_pooling_from_the_command_line():
    cfg = compose("train", ["model=mean_mlp", "model.pooling=correlation", "model.readout.learn_projection=false",
                            "model.readout.rank=10"])
    model = build_model(OmegaConf.to_container(cfg.model, resolve=True))
    assert model.pooling == "correlation" and model.out_dim == 10 * 9 // 2
    assert not model.readout.proj.weight.requires_grad
