"""Functional connectivity (FC) as a model: the baseline every fMRI foundation model is held against.

:class:`FunctionalConnectivity` embeds a window by the second-order readout of its ROIs
(:class:`~brainfm.models.pooling.SecondOrderReadout` with the input only): with the fixed identity
projection that is the window's FC, the feature of FC fingerprinting (Finn et al. 2015, Nature
Neuroscience 18:1664). Two ways to learn from it, both configuration:

- ``readout.learn_projection=true``: the correlation of a learned linear projection of the ROIs
  (identity at initialisation, so training starts at FC): a metric on connectomes, ``R x k``
  parameters, no deep network;
- ``hidden_dims=[...]``: a multilayer perceptron on the FC upper triangle, the "shallow network on
  the FC upper triangle" that identifies HCP subjects from 20-s segments (Sarar, Rao & Liu, PNAS
  2021) and the FC-input baseline of Brainmarks' and Marraffini et al.'s (2026) comparisons.

It has no notion of time order (the statistics are over the window's TRs), so it takes data at any
TR (:attr:`any_tr`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from brainfm.errors import ConfigError
from brainfm.models.backbone import Backbone

#: defaults of ``model.readout`` for FC: the window's own correlation matrix to start from
FC_READOUT = {"include_input": True, "init": "identity", "learn_projection": False}


class FunctionalConnectivity(nn.Module, Backbone):
    """Args:
        n_rois: ROIs per TR ``R``.
        pooling: ``correlation`` (FC) or ``covariance`` (with ``readout.matrix_norm``).
        readout: options of the second-order readout (:mod:`brainfm.models.pooling`), over
            :data:`FC_READOUT` (``include_input`` is always true: FC has no other features).
        hidden_dims: widths of an MLP on the edges (``Linear -> GELU -> Dropout`` per layer, then a
            ``Linear`` to the last width); empty: the edges are the embedding.
        dropout: dropout of the MLP (and on the edges before it).

    Shapes: ``bold`` ``(B, T, R)`` -> :meth:`features` ``(B, k, k)`` (each projected ROI's
    connectivity profile, a row of the matrix), :meth:`pooled` ``(B, out_dim)``: the ``k (k - 1) / 2``
    edges, or the MLP's last width.

    Raises:
        ConfigError: ``readout.include_input=false`` (nothing else to read), a bad pooling or readout.
    """

    input_keys = ("bold",)
    any_tr = True  # no time order: correlations over the window's TRs
    poolings = ("correlation", "covariance")

    def __init__(self, n_rois: int, pooling: str = "correlation", readout: dict | None = None,
                 hidden_dims: Sequence[int] = (), dropout: float = 0.0) -> None:
        super().__init__()
        self.n_rois = int(n_rois)
        cfg = {**FC_READOUT, **(readout or {})}
        if not cfg["include_input"]:
            raise ConfigError("model=fc reads only the input ROIs: model.readout.include_input must stay true")
        self.init_pooling(pooling, cfg, 0, self.n_rois)
        self.hidden_dims = [int(h) for h in hidden_dims]
        layers: list[nn.Module] = []
        width = self.readout.out_dim
        if self.hidden_dims:
            layers.append(nn.Dropout(dropout))
            for h in self.hidden_dims[:-1]:
                layers += [nn.Linear(width, h), nn.GELU(), nn.Dropout(dropout)]
                width = h
            layers.append(nn.Linear(width, self.hidden_dims[-1]))
        self.mlp = nn.Sequential(*layers)

    @property
    def out_dim(self) -> int:
        return self.hidden_dims[-1] if self.hidden_dims else self.readout.out_dim

    def features(self, bold: torch.Tensor) -> torch.Tensor:
        """Windows ``(B, T, R)`` -> the ``(B, k, k)`` matrix: one token per projected ROI."""
        return self.readout.matrix(None, bold)

    def pooled(self, bold: torch.Tensor) -> torch.Tensor:
        """Windows ``(B, T, R)`` -> the edges ``(B, k (k - 1) / 2)`` (through the MLP when it has one)."""
        return self.mlp(self.readout(None, bold))
