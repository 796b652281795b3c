"""Augmentations of ROI windows (brainfm.tasks.augment): ROI dropout zeroes whole (sample, ROI) columns,
TR jitter is linear interpolation at ``k s`` TRs with its times following, tube masks hide a fixed number of
ROIs per window, Gaussian noise has the std it is given."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from brainfm.tasks.augment import gaussian_noise, roi_dropout, tr_jitter, tube_mask


def _bold(b=4, t=50, r=6, seed=0):
    """Windows without a single zero (so a zeroed entry can only come from the augmentation)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, t, r, generator=g).abs() + 0.5


# -- ROI dropout -------------------------------------------------------------------------------------------
def test_roi_dropout_p0_is_the_identity():
    x = _bold()
    assert torch.equal(roi_dropout(x, 0.0), x)


def test_roi_dropout_zeroes_whole_columns_and_nothing_else():
    x = _bold(b=200, t=20, r=94)
    torch.manual_seed(0)
    y = roi_dropout(x, 0.3)
    assert y.shape == x.shape and y.dtype == x.dtype
    zero_col = (y == 0).all(dim=1)  # (B, R): the whole column over time is 0
    kept_col = (y == x).all(dim=1)  # ... or untouched
    assert torch.all(zero_col ^ kept_col)  # every (sample, ROI) is one or the other, never partly
    frac = zero_col.float().mean().item()
    assert frac == pytest.approx(0.3, abs=0.02)  # 18,800 columns: the std of the fraction is 0.003
    # drawn per sample: the dropped ROIs differ between samples of the batch
    assert not torch.all(zero_col == zero_col[:1])
    # the same seed draws the same columns (a resumed run repeats them)
    torch.manual_seed(0)
    assert torch.equal(roi_dropout(x, 0.3), y)


# -- TR jitter ------------------------------------------------------------------------------------------------
def test_tr_jitter_off_returns_the_inputs():
    x, t = _bold(), (torch.arange(50) * 0.72).expand(4, 50)
    bold, times = tr_jitter(x, t, 0.0)
    assert bold is x and times is t
    one = x[:, :1]  # a single TR cannot be resampled
    bold, times = tr_jitter(one, t[:, :1], 0.3)
    assert bold is one


@pytest.mark.parametrize("seed", [0, 1, 2, 3, 4])
def test_tr_jitter_is_linear_interpolation_at_k_s_trs(seed):
    tr, n, jitter = 0.72, 50, 0.3
    x = _bold(b=3, t=n, r=5, seed=seed)
    t = (torch.arange(n, dtype=torch.float32) * tr).expand(3, n).contiguous()
    torch.manual_seed(seed)
    bold, times = tr_jitter(x, t, jitter)
    s = float(times[0, 1] - times[0, 0]) / tr  # the drawn factor, read off the new times
    assert 1 - jitter - 1e-5 <= s <= 1 + jitter + 1e-5
    n_out = math.floor((n - 1) / s) + 1
    assert bold.shape == (3, n_out, 5) and times.shape == (3, n_out)
    k = np.arange(n_out)
    np.testing.assert_allclose(times.numpy(), np.broadcast_to(k * s * tr, (3, n_out)), atol=1e-4)
    # the same window covers the same time: the last sample lies within one new interval of the end
    assert (n - 1) - s < (n_out - 1) * s <= (n - 1) + 1e-4
    for b, r in [(0, 0), (2, 3)]:
        expected = np.interp(k * s, np.arange(n), x[b, :, r].double().numpy())
        np.testing.assert_allclose(bold[b, :, r].numpy(), expected, atol=1e-4)
    # the draw is from the global generator: the same seed repeats it
    torch.manual_seed(seed)
    again, _ = tr_jitter(x, t, jitter)
    assert torch.equal(again, bold)


def test_tr_jitter_draws_both_faster_and_slower_sampling_and_keeps_t_none():
    x = _bold(b=1, t=40, r=2)
    lengths = set()
    for seed in range(20):
        torch.manual_seed(seed)
        bold, times = tr_jitter(x, None, 0.5)
        assert times is None
        lengths.add(bold.shape[1])
    assert min(lengths) < 40 < max(lengths)  # s > 1 shortens the window, s < 1 lengthens it


@pytest.mark.parametrize("bad", [-0.1, 1.0, 1.5])
def test_tr_jitter_outside_0_1_is_refused(bad):
    with pytest.raises(ValueError, match=rf"tr_jitter={bad} must lie in \[0, 1\)"):
        tr_jitter(_bold(), None, bad)


# -- tube masking and noise ----------------------------------------------------------------------------------
@pytest.mark.parametrize("ratio,r,expected", [(0.75, 12, 9), (0.1, 94, 9), (0.5, 7, 4), (0.0, 10, 1), (0.01, 10, 1),
                                              (1.0, 10, 9), (0.99, 10, 9)])
def test_tube_mask_hides_round_ratio_r_rois_per_window(ratio, r, expected):
    torch.manual_seed(0)
    mask = tube_mask((64, r), ratio, torch.device("cpu"))
    assert mask.shape == (64, r) and mask.dtype == torch.bool
    assert mask.sum(dim=1).tolist() == [expected] * 64  # round(ratio R), at least 1, at most R - 1
    if 1 < expected < r - 1:
        assert len({tuple(row.tolist()) for row in mask}) > 1  # drawn per window


def test_gaussian_noise_has_the_given_std():
    x = torch.zeros(64, 100, 20)
    torch.manual_seed(0)
    y = gaussian_noise(x, 0.5)
    assert y.shape == x.shape
    assert y.std().item() == pytest.approx(0.5, rel=0.02) and abs(y.mean().item()) < 0.01
    assert gaussian_noise(x + 1, 0.0).equal(x + 1)
