"""Functional-connectivity features: the classical baseline for subject identification
(Finn et al. 2015, Nature Neuroscience 18:1664)."""

from __future__ import annotations

import numpy as np


def fc_features(windows: np.ndarray, fisher_z: bool = False) -> np.ndarray:
    """Upper triangle of each window's ROI x ROI Pearson correlation matrix.

    Args:
        windows: ``(N, T, R)`` BOLD windows (TRs x ROIs).
        fisher_z: return ``arctanh(r)`` instead of ``r``.

    Returns:
        ``(N, R (R - 1) / 2)`` float32 edge vectors. A constant ROI in a window yields 0 for its
        edges (no correlation is defined there).
    """
    x = np.asarray(windows, dtype=np.float64)
    x = x - x.mean(axis=1, keepdims=True)
    std = np.sqrt((x**2).sum(axis=1, keepdims=True))
    x = np.divide(x, std, out=np.zeros_like(x), where=std > 0)
    corr = np.einsum("ntr,nts->nrs", x, x)
    iu = np.triu_indices(x.shape[2], k=1)
    edges = corr[:, iu[0], iu[1]]
    if fisher_z:
        edges = np.arctanh(np.clip(edges, -0.999999, 0.999999))
    return edges.astype(np.float32)
