"""Second-order readouts (brainfm.models.pooling): the identity readout is FC, exactly; the matrix
normalizations are what they claim; every ROI backbone keeps the contract with every pooling it offers."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg
import torch

from brainfm.errors import ConfigError
from brainfm.eval.fingerprinting import fc_features
from brainfm.eval.reidentification import reidentification
from brainfm.models.pooling import SecondOrderReadout, build_readout, n_edges


def _windows(n=6, t=40, r=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(r, r, generator=g)
    return torch.randn(n, t, r, generator=g) @ mix  # correlated ROIs


def test_identity_correlation_readout_is_fc_exactly():
    x = _windows(n=8, t=30, r=94)
    readout = SecondOrderReadout("correlation", 0, 94, center=False, learn_projection=False)
    with torch.no_grad():
        edges = readout(None, x).numpy()
    assert edges.shape == (8, 94 * 93 // 2) and readout.out_dim == edges.shape[1]
    np.testing.assert_allclose(edges, fc_features(x.numpy()), atol=1e-6, rtol=0)
    assert not readout.proj.weight.requires_grad


def test_centred_identity_readout_reidentifies_as_fc_fingerprinting():
    """Cosine similarity of centred edges = Pearson correlation of edges (Finn et al.'s similarity)."""
    x = _windows(n=20, t=30, r=10, seed=1).numpy()
    subjects = np.repeat(np.arange(5), 4)
    gallery, queries = x[::2], x[1::2]
    readout = SecondOrderReadout("correlation", 0, 10, learn_projection=False)
    with torch.no_grad():
        eg, eq = (readout(None, torch.from_numpy(w)).numpy() for w in (gallery, queries))
    np.testing.assert_allclose(eg.mean(axis=1), 0, atol=1e-6)
    ours = reidentification(eg, subjects[::2], eq, subjects[1::2], metric="cosine")
    fc = reidentification(fc_features(gallery), subjects[::2], fc_features(queries), subjects[1::2], metric="pearson")
    assert ours == pytest.approx(fc, abs=1e-9)


def test_features_enter_with_zero_weight_at_identity_init():
    x, h = _windows(n=3, t=25, r=7), torch.randn(3, 25, 5)
    readout = SecondOrderReadout("correlation", 5, 7, center=False)
    assert readout.proj.weight.shape == (7, 12)
    with torch.no_grad():
        np.testing.assert_allclose(readout(h, x).numpy(), fc_features(x.numpy()), atol=1e-6)
    # ... and they are learned: a gradient reaches their weights
    readout(h, x).sum().backward()
    assert readout.proj.weight.grad[:, 7:].abs().sum() > 0


@pytest.mark.parametrize("norm", ["log", "sqrt", "none"])
def test_covariance_readout_normalizations(norm):
    x = _windows(n=2, t=50, r=6, seed=2)
    readout = SecondOrderReadout("covariance", 0, 6, matrix_norm=norm, center=False, sqrt_iterations=30)
    with torch.no_grad():
        m = readout.matrix(None, x).double().numpy()
        e = readout(None, x).numpy()
    cov = np.stack([np.cov(w.numpy(), rowvar=False) for w in x])
    expected = {"none": cov, "log": np.stack([scipy.linalg.logm(c).real for c in cov]),
                "sqrt": np.stack([scipy.linalg.sqrtm(c).real for c in cov])}[norm]
    np.testing.assert_allclose(m, expected, atol=2e-4, rtol=2e-4)
    assert e.shape == (2, n_edges(6, "covariance")) == (2, 21)
    # the vector's Euclidean norm is the matrix's Frobenius norm
    np.testing.assert_allclose(np.linalg.norm(e, axis=1), np.linalg.norm(m, axis=(1, 2)), rtol=1e-4)


def test_readout_is_float32_under_autocast_and_constant_rois_give_zero_edges():
    x = _windows(n=2, t=30, r=5)
    x[:, :, 2] = 3.0  # constant ROI
    readout = SecondOrderReadout("correlation", 0, 5, center=False)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        e = readout(None, x)
    assert e.dtype == torch.float32 and torch.isfinite(e).all()
    m = readout.matrix(None, x)
    assert torch.all(m[:, 2] == 0) and torch.all(m[:, :, 2] == 0)
    # ... with finite gradients (a zeroed ROI: roi_dropout)
    x.requires_grad_(True)
    readout(None, x).square().sum().backward()
    assert torch.isfinite(x.grad).all() and torch.isfinite(readout.proj.weight.grad).all()


def test_readout_errors_name_the_key():
    with pytest.raises(ConfigError, match=r"model.readout has unknown key\(s\) \['rnak'\]"):
        build_readout("correlation", {"rnak": 3}, 0, 5)
    with pytest.raises(ConfigError, match="matrix_norm"):
        build_readout("covariance", {"matrix_norm": "logm"}, 0, 5)
    with pytest.raises(ConfigError, match="include_input=true"):
        build_readout("correlation", {"include_input": False}, 0, 5)
    readout = build_readout("correlation", {}, 4, 5)
    with pytest.raises(ConfigError, match="needs the window's BOLD"):
        readout(torch.randn(2, 10, 4), None)
    assert build_readout("mean", None, 4, 5) is None
