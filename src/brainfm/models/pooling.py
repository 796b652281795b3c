"""Readouts: a backbone's features over a window -> one embedding per window (``model.pooling``).

First-order readouts average tokens (``mean``) or take a learned summary token (``cls``). They
cannot see what functional-connectivity (FC) fingerprinting sees: subject identity in resting-state
fMRI lives in the *covariance* of regional signals over time (Finn et al. 2015, Nature Neuroscience
18:1664; it survives shuffling the TRs, Chen & Hu 2018), and the mean of a window's tokens discards
it. The second-order readouts here keep it:

- ``correlation``: the Pearson correlation over time of ``k`` channels, a learned linear projection
  of the backbone's per-TR features (optionally with the window's input BOLD beside them), upper
  triangle without the diagonal -> ``k (k - 1) / 2`` edges. With the identity projection of the
  input ROIs it *is* the FC of the window (``tests/test_pooling.py``: equal to
  :func:`brainfm.eval.fingerprinting.fc_features` within 1e-6), so a model trained from that
  initialisation starts at FC fingerprinting and can only move from there.
- ``covariance``: the covariance of the projected channels with a matrix normalization: ``log``
  (the log-Euclidean map, Arsigny et al. 2006: the matrix logarithm of ``C + eps I``, so distances
  are those of the tangent space of SPD matrices), ``sqrt`` (iSQRT-COV, Li et al. CVPR 2018: the
  matrix square root by Newton-Schulz iterations after trace normalization, GPU-friendly, no
  eigendecomposition) or ``none``; upper triangle with the diagonal, off-diagonal entries times
  sqrt(2) so the vector's Euclidean norm is the matrix's Frobenius norm -> ``k (k + 1) / 2`` values.

The projection is low-rank when ``rank`` is smaller than its input (the number of edges grows as
``rank**2``); it is initialised to the identity on the input ROIs (``init: identity``), or randomly.
The statistics are computed in float32 outside autocast: correlations of bf16 channels over a
30-TR window lose the digits that separate subjects.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from brainfm.errors import ConfigError

#: ``model.pooling`` values; each backbone supports a subset (``Backbone.poolings``)
POOLINGS = ("mean", "cls", "code", "correlation", "covariance")
SECOND_ORDER = ("correlation", "covariance")
#: matrix normalizations of ``pooling=covariance`` (``model.readout.matrix_norm``)
MATRIX_NORMS = ("log", "sqrt", "none")
#: ``model.readout`` and its defaults (conf/model/readout/default.yaml)
READOUT_DEFAULTS = {"rank": None, "include_input": True, "init": "identity", "learn_projection": True,
                    "fisher_z": False, "center": True, "matrix_norm": "log", "eps": 1e-6, "sqrt_iterations": 5}
READOUT_KEYS = tuple(READOUT_DEFAULTS)


def n_edges(rank: int, statistic: str) -> int:
    """Length of a second-order embedding of ``rank`` channels: ``k (k - 1) / 2`` correlations or
    ``k (k + 1) / 2`` covariance entries."""
    return rank * (rank - 1) // 2 if statistic == "correlation" else rank * (rank + 1) // 2


def correlation_matrix(z: torch.Tensor, eps: float = 1e-6, fisher_z: bool = False) -> torch.Tensor:
    """Pearson correlation over time ``(B, k, k)`` of channels ``z`` ``(B, T, k)`` (float32 or wider);
    a channel constant over the window (standard deviation below ``eps``) correlates 0 with every
    channel, itself included. ``fisher_z``: ``arctanh`` of the correlations (clamped at 1 - 1e-6)."""
    z = z - z.mean(dim=1, keepdim=True)
    # the floor before the square root: its derivative at a constant channel (sum 0) would be inf, and 0 * inf NaN
    z = z / z.square().sum(dim=1, keepdim=True).clamp_min(eps * eps * z.shape[1]).sqrt()
    c = z.transpose(1, 2) @ z
    return torch.atanh(c.clamp(-1 + 1e-6, 1 - 1e-6)) if fisher_z else c


def _matrix_log(c: torch.Tensor, eps: float) -> torch.Tensor:
    """Log-Euclidean map of SPD ``(B, k, k)``: ``V diag(log(max(lambda, eps))) V^T`` (float64 eigh)."""
    vals, vecs = torch.linalg.eigh(c.double())
    logs = torch.log(vals.clamp_min(eps))
    return ((vecs * logs[:, None, :]) @ vecs.transpose(1, 2)).to(c.dtype)


def _matrix_sqrt(c: torch.Tensor, iterations: int, eps: float) -> torch.Tensor:
    """iSQRT-COV (Li et al. 2018): pre-normalize by the trace, ``iterations`` coupled Newton-Schulz
    steps ``Y <- Y (3I - ZY) / 2``, ``Z <- (3I - ZY) Z / 2``, post-compensate by ``sqrt(trace)``."""
    k = c.shape[-1]
    eye = torch.eye(k, dtype=c.dtype, device=c.device).expand_as(c)
    trace = c.diagonal(dim1=1, dim2=2).sum(-1).clamp_min(eps)[:, None, None]
    y, z = c / trace, eye
    for _ in range(int(iterations)):
        t = 0.5 * (3.0 * eye - z @ y)
        y, z = y @ t, t @ z
    return y * trace.sqrt()


class SecondOrderReadout(nn.Module):
    """Correlation or covariance over time of a learned projection of per-TR features.

    Args:
        statistic: ``"correlation"`` or ``"covariance"``.
        feature_dim: ``D`` of the backbone's per-TR features (0: the readout sees only the input).
        n_rois: ``R`` of the input BOLD (``include_input``).
        rank: ``k`` projected channels (None: ``n_rois`` with the input included, else ``feature_dim``).
        include_input: project ``[bold, features]`` (``R + D`` values per TR) rather than the features.
        init: ``"identity"`` (channel ``i`` = input ROI ``i`` for ``i < min(k, R)``; the other weights
            zero, the channels beyond ``R`` drawn N(0, 0.02)) or ``"random"`` (N(0, 1/sqrt(in)) rows).
        learn_projection: train the projection (False: a fixed readout; with the identity it is FC).
        fisher_z: ``arctanh`` of the correlations (correlation only).
        center: subtract each embedding's mean over its entries, so that the cosine similarity of two
            embeddings is the Pearson correlation of their edge vectors, FC fingerprinting's similarity
            (Finn et al. 2015).
        matrix_norm: covariance normalization, one of :data:`MATRIX_NORMS` (``log`` by default).
        eps: variance floor (a channel constant over the window gets zero correlations) and the
            eigenvalue floor of ``log``.
        sqrt_iterations: Newton-Schulz steps of ``matrix_norm=sqrt`` (iSQRT-COV uses 3-5).

    Shapes: :meth:`forward` ``features`` ``(B, T, D)`` (or None when ``feature_dim`` is 0), ``bold``
    ``(B, T, R)`` -> ``(B, out_dim)`` with ``out_dim`` = :func:`n_edges` ``(k, statistic)``.

    Raises:
        ConfigError: an unknown statistic, init or matrix norm, a rank below 2, nothing to project,
            or (at call time) ``include_input`` without the input.
    """

    def __init__(self, statistic: str, feature_dim: int, n_rois: int, rank: int | None = None,
                 include_input: bool = True, init: str = "identity", learn_projection: bool = True,
                 fisher_z: bool = False, center: bool = True, matrix_norm: str = "log", eps: float = 1e-6,
                 sqrt_iterations: int = 5) -> None:
        super().__init__()
        if statistic not in SECOND_ORDER:
            raise ConfigError(f"second-order statistic {statistic!r} is not one of {SECOND_ORDER}")
        if init not in ("identity", "random"):
            raise ConfigError(f"model.readout.init={init!r} must be identity or random")
        if matrix_norm not in MATRIX_NORMS:
            raise ConfigError(f"model.readout.matrix_norm={matrix_norm!r} must be one of {MATRIX_NORMS}")
        self.statistic, self.include_input = statistic, bool(include_input)
        self.feature_dim, self.n_rois = int(feature_dim), int(n_rois)
        self.in_dim = in_dim = self.feature_dim + (self.n_rois if self.include_input else 0)
        if in_dim < 2:
            raise ConfigError("a second-order readout needs at least 2 values per TR to project: set "
                              "model.readout.include_input=true or use a backbone with per-TR features")
        self.rank = int(rank) if rank else (self.n_rois if self.include_input else self.feature_dim)
        if self.rank < 2:
            raise ConfigError(f"model.readout.rank={rank} must be at least 2")
        self.fisher_z, self.center = bool(fisher_z), bool(center)
        self.matrix_norm, self.eps, self.sqrt_iterations = matrix_norm, float(eps), int(sqrt_iterations)
        self.proj = nn.Linear(in_dim, self.rank, bias=False)  # no bias: the statistics are centred over time
        with torch.no_grad():
            if init == "identity":
                w = torch.zeros(self.rank, in_dim)
                m = min(self.rank, in_dim if not self.include_input else self.n_rois)
                w[:m, :m] = torch.eye(m)
                if self.rank > m:
                    nn.init.normal_(w[m:], std=0.02)
                self.proj.weight.copy_(w)
            else:
                nn.init.normal_(self.proj.weight, std=1.0 / math.sqrt(in_dim))
        self.proj.weight.requires_grad_(bool(learn_projection))
        rows, cols = torch.triu_indices(self.rank, self.rank, 1 if statistic == "correlation" else 0)
        self.register_buffer("rows", rows, persistent=False)
        self.register_buffer("cols", cols, persistent=False)

    @property
    def out_dim(self) -> int:
        return n_edges(self.rank, self.statistic)

    def channels(self, features: torch.Tensor | None, bold: torch.Tensor | None) -> torch.Tensor:
        """The projected channels ``(B, T, k)`` (float32)."""
        parts = []
        if self.include_input:
            if bold is None:
                raise ConfigError("model.readout.include_input=true needs the window's BOLD, which this call does not "
                                  "pass (a token-level hook); set model.readout.include_input=false")
            parts.append(bold.float())
        if self.feature_dim:
            parts.append(features.float())
        x = parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)
        return x @ self.proj.weight.float().T

    def matrix(self, features: torch.Tensor | None, bold: torch.Tensor | None) -> torch.Tensor:
        """The ``(B, k, k)`` correlation or (normalized) covariance matrix over time."""
        device_type = (bold if bold is not None else features).device.type
        with torch.autocast(device_type, enabled=False):
            z = self.channels(features, bold)
            n = z.shape[1]
            if n < 2:
                raise ConfigError(f"a second-order readout needs windows of at least 2 TRs, got {n}")
            if self.statistic == "correlation":
                return correlation_matrix(z, self.eps, self.fisher_z)
            z = z - z.mean(dim=1, keepdim=True)
            c = z.transpose(1, 2) @ z / (n - 1)
            if self.matrix_norm == "log":
                eye = torch.eye(self.rank, dtype=c.dtype, device=c.device)
                return _matrix_log(c + self.eps * eye, self.eps)
            if self.matrix_norm == "sqrt":
                return _matrix_sqrt(c, self.sqrt_iterations, self.eps)
            return c

    def fc_edges(self, bold: torch.Tensor) -> torch.Tensor:
        """The window's own FC ``(B, R (R - 1) / 2)`` as this readout would give it at the identity
        initialisation (``fisher_z`` and ``center`` applied): the auxiliary target of
        ``task.fc_target_weight``. Correlation readouts of the input with ``rank = n_rois`` only.

        Raises:
            ConfigError: another statistic or rank.
        """
        if self.statistic != "correlation" or not self.include_input or self.rank != self.n_rois:
            raise ConfigError("the FC target needs a correlation readout of the input with rank = n_rois")
        with torch.autocast(bold.device.type, enabled=False):
            return self._vectorise(correlation_matrix(bold.float(), self.eps, self.fisher_z))

    def _vectorise(self, c: torch.Tensor) -> torch.Tensor:
        e = c[:, self.rows, self.cols]
        if self.statistic == "covariance":
            e = e * torch.where(self.rows == self.cols, 1.0, math.sqrt(2.0)).to(e.dtype)
        if self.center:
            e = e - e.mean(dim=1, keepdim=True)
        return e

    def forward(self, features: torch.Tensor | None, bold: torch.Tensor | None = None) -> torch.Tensor:
        return self._vectorise(self.matrix(features, bold))


def build_readout(pooling: str, readout: dict | None, feature_dim: int, n_rois: int) -> SecondOrderReadout | None:
    """The readout module of ``model.pooling`` (None for first-order poolings).

    Raises:
        ConfigError: unknown keys in ``model.readout`` (named, with the valid ones), or a first-order
            pooling with a readout option changed from its default (it would be silently unused).
    """
    cfg = dict(readout or {})
    unknown = sorted(set(cfg) - set(READOUT_KEYS))
    if unknown:
        raise ConfigError(f"model.readout has unknown key(s) {unknown}; valid: {list(READOUT_KEYS)}")
    if pooling not in SECOND_ORDER:
        changed = sorted(k for k, v in cfg.items() if v != READOUT_DEFAULTS[k])
        if changed:
            raise ConfigError(f"model.readout.{changed[0]} is set but model.pooling={pooling} has no readout: use "
                              "model.pooling=correlation or covariance, or leave model.readout at its defaults")
        return None
    return SecondOrderReadout(pooling, feature_dim, n_rois, **cfg)
