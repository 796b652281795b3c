"""The simple baselines that every fMRI foundation model is held against (DESIGN.md, "Held against
the field"; ANCHORS.md, "Simple baselines"), as brainfm backbones: they train, probe, extract and
re-identify through the same tasks and evaluation as the large models.

- :class:`MeanMLP`: meanMLP (Popov, Mahmood, Fu, Yang, Calhoun & Plis, "A simple but tough-to-beat
  baseline for fMRI time-series classification", NeuroImage 303:120909, 2024; code:
  github.com/neuroneural/meanMLP, the ``meanMLP`` class of its ``ml4fmri`` package): one small MLP
  applied to every TR's ROI vector, then the mean over the window's TRs. It has no notion of time
  order, and it beat the sequence and graph models of its benchmark on most of its data sets.
- :class:`BrainNetCNN`: BrainNetCNN (Kawahara, Brown, Miller, Booth, Chau, Grunau, Zwicker &
  Hamarneh, "BrainNetCNN: Convolutional neural networks for brain networks; towards predicting
  neurodevelopment", NeuroImage 146:1038-1049, 2017; code: github.com/jeremykawahara/ann4brains,
  Caffe): a CNN on the ROI x ROI connectivity matrix with filters made for adjacency matrices
  (Edge-to-Edge, Edge-to-Node, Node-to-Graph). Here it reads a BOLD window and starts from the
  window's functional connectivity (FC, Pearson correlation), the statistic that re-identifies
  subjects (Finn et al. 2015) and that survives shuffling the TRs.

Both read ``("bold",)`` only (no time input) and are invariant to the TR (``any_tr``): meanMLP
averages over TRs, BrainNetCNN sees the window only through its correlation matrix.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from brainfm.errors import ConfigError
from brainfm.models.backbone import Backbone
from brainfm.models.pooling import SecondOrderReadout


class MeanMLP(nn.Module, Backbone):
    """meanMLP (Popov et al., NeuroImage 2024): an MLP shared over TRs, then the mean over TRs.

    Per TR: ``Linear(n_rois, hidden) -> LayerNorm(hidden) -> ReLU -> Dropout -> Linear(hidden, d_model)``.
    The LayerNorm is on by default because the authors' released model has it (``ml4fmri``'s
    ``meanMLP``: Linear, LayerNorm, ReLU, Dropout, Linear); ``layer_norm=False`` gives the plain MLP
    of the paper's figure. The defaults ``hidden=160`` and ``dropout=0.49`` are the released model's
    (tuned by the authors for classification; lower the dropout for self-supervised pretraining).

    What differs from the paper: the paper's last layer maps to the classes and the logits are
    averaged over time; here it maps to ``d_model`` and the head (a task's) comes after the mean.
    With a linear head this is the same model (the mean over TRs commutes with a linear map; the
    head and the last layer compose into one linear map of rank at most ``d_model``).

    Args:
        n_rois: ROIs per TR (``R``).
        hidden: width of the hidden layer.
        d_model: width of the per-TR features (the paper: the number of classes).
        dropout: dropout after the hidden layer's activation.
        layer_norm: LayerNorm on the hidden layer (before the ReLU), as the released code.
        pooling: ``mean`` (the paper's mean over TRs), or a second-order ``correlation`` /
            ``covariance`` readout of the per-TR features, optionally beside the input BOLD
            (:mod:`brainfm.models.pooling`; options in ``readout``).
        readout: the second-order readout's options (``model.readout``), left at its defaults for ``mean``.

    Shapes: ``bold`` ``(B, T, R)`` -> :meth:`features` ``(B, T, d_model)`` -> :meth:`pooled`
    ``(B, out_dim)`` (``d_model`` with ``pooling=mean``). Any ``T`` and any TR: no time input.

    Raises:
        ValueError: a non-positive size or a dropout outside [0, 1).
        ConfigError: an unsupported ``pooling`` (the choices named) or bad ``readout`` options.
    """

    input_keys = ("bold",)
    any_tr = True  # the mean over TRs: no time order, no TR
    poolings = ("mean", "correlation", "covariance")

    def __init__(self, n_rois: int, hidden: int = 160, d_model: int = 128, dropout: float = 0.49,
                 layer_norm: bool = True, pooling: str = "mean", readout: Mapping[str, Any] | None = None) -> None:
        super().__init__()
        if min(int(n_rois), int(hidden), int(d_model)) < 1:
            raise ValueError(f"n_rois={n_rois}, hidden={hidden} and d_model={d_model} must be positive")
        if not 0.0 <= float(dropout) < 1.0:
            raise ValueError(f"dropout={dropout} must be in [0, 1)")
        self.n_rois, self.hidden, self.d_model = int(n_rois), int(hidden), int(d_model)
        self.mlp = nn.Sequential(
            nn.Linear(self.n_rois, self.hidden),
            nn.LayerNorm(self.hidden) if layer_norm else nn.Identity(),
            nn.ReLU(),
            nn.Dropout(float(dropout)),
            nn.Linear(self.hidden, self.d_model),
        )
        self.init_pooling(pooling, readout, self.d_model, self.n_rois)

    @property
    def out_dim(self) -> int:
        return self.pooled_dim(self.d_model)

    def forward(self, bold: torch.Tensor) -> torch.Tensor:
        """Windows ``(B, T, R)`` -> per-TR features ``(B, T, d_model)`` (the MLP on every TR)."""
        return self.mlp(bold)

    def features(self, bold: torch.Tensor) -> torch.Tensor:
        """Windows ``(B, T, R)`` -> per-TR features ``(B, T, d_model)``; also :meth:`frame_features`,
        what a second-order readout correlates over time."""
        return self(bold)


class _EdgeToEdge(nn.Module):
    """Edge-to-Edge layer (Kawahara et al. 2017, Eq. 1): a cross-shaped filter on an ``R x R`` matrix:
    edge ``(i, j)`` gets a learned combination of row ``i`` and column ``j``, i.e. a ``1 x R`` convolution
    (one value per row) plus an ``R x 1`` convolution (one value per column), summed by broadcasting.

    Shapes: ``(B, C_in, R, R)`` -> ``(B, C_out, R, R)``.
    """

    def __init__(self, in_channels: int, out_channels: int, n_rois: int) -> None:
        super().__init__()
        self.row = nn.Conv2d(in_channels, out_channels, (1, n_rois))  # (B, C, R, 1): over each row
        self.col = nn.Conv2d(in_channels, out_channels, (n_rois, 1))  # (B, C, 1, R): over each column

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.row(x) + self.col(x)


class BrainNetCNN(nn.Module, Backbone):
    """BrainNetCNN (Kawahara et al., NeuroImage 2017) on the functional connectivity of a BOLD window.

    The window's ROI x ROI Pearson correlation matrix (float32, outside autocast; a constant ROI gets
    zero correlations and a zero diagonal entry) is computed by
    :class:`~brainfm.models.pooling.SecondOrderReadout` (the identity projection of the input ROIs,
    fixed: the module ``connectome``, whose ``R x R`` identity weight is in the state dict but never
    trained), then

    - Edge-to-Edge layers (``e2e_channels``; :class:`_EdgeToEdge`), each followed by leaky ReLU;
    - Edge-to-Node: a ``1 x R`` convolution, one embedding per node (ROI) -> leaky ReLU -> dropout:
      :meth:`features`, the node embeddings ``(B, R, e2n_channels)``;
    - Node-to-Graph: an ``R x 1`` convolution over the nodes -> leaky ReLU -> dropout: the graph
      embedding ``(B, n2g_channels)``, what :meth:`pooled` returns.

    All activations are leaky ReLUs of slope ``negative_slope`` (0.33, the paper's); weights are
    Xavier-initialised with zero biases, as the paper's Caffe model. The defaults are the paper's
    sizes (E2E 32, E2E 32, E2N 64, N2G 256; about 1.9 M parameters at 94 ROIs, cheap on a CPU: every
    layer is a matrix product over one axis of the ``R x R`` map).

    Pooling: the only ``model.pooling`` is ``mean``, and it returns the Node-to-Graph output. ``mean``
    is the name every backbone gives its default first-order summary of its tokens (:meth:`features`);
    BrainNetCNN's tokens are its nodes and its summary of them is Node-to-Graph, a learned weighted
    sum over the nodes per output channel (a mean with learned weights). No second-order readout is
    offered: the model has no per-TR features, and it already starts from the window's FC.

    What differs from the paper: the paper's input is a structural connectome (DTI tractography) and
    its network ends in dense layers (128 -> 30 -> outputs, dropout 0.5); here the input is the
    window's FC and the dense layers are the task's head, so the backbone ends at Node-to-Graph.
    Dropout (rate ``dropout``, the paper's 0.5) follows the Edge-to-Node and Node-to-Graph layers.

    Args:
        n_rois: ROIs per TR (``R``, the side of the connectivity matrix).
        e2e_channels: output channels of each Edge-to-Edge layer (``()``: none).
        e2n_channels: channels of the Edge-to-Node layer (the node embedding width).
        n2g_channels: channels of the Node-to-Graph layer (:attr:`out_dim`).
        dropout: dropout after Edge-to-Node and Node-to-Graph.
        negative_slope: slope of the leaky ReLUs.
        pooling: ``mean`` (the Node-to-Graph output; see above) or None.
        readout: left at its defaults (no second-order readout).

    Shapes: ``bold`` ``(B, T, R)`` with ``T >= 2`` -> FC ``(B, R, R)`` -> :meth:`features`
    ``(B, R, e2n_channels)``, :meth:`pooled` ``(B, n2g_channels)``. Any ``T``, any TR, any order of
    the TRs (the correlation does not see it).

    Raises:
        ValueError: a non-positive size, or a dropout outside [0, 1).
        ConfigError: a ``pooling`` other than ``mean`` (the choices named), ``readout`` set, or a
            window of fewer than 2 TRs (at call time).
    """

    input_keys = ("bold",)
    any_tr = True  # FC has no time order and no TR
    poolings = ("mean",)

    def __init__(self, n_rois: int, e2e_channels: Sequence[int] = (32, 32), e2n_channels: int = 64,
                 n2g_channels: int = 256, dropout: float = 0.5, negative_slope: float = 0.33,
                 pooling: str = "mean", readout: Mapping[str, Any] | None = None) -> None:
        super().__init__()
        e2e = [int(c) for c in e2e_channels]
        if min([int(n_rois), int(e2n_channels), int(n2g_channels), *e2e]) < 1:
            raise ValueError(f"n_rois={n_rois}, e2e_channels={list(e2e_channels)}, e2n_channels={e2n_channels} and "
                             f"n2g_channels={n2g_channels} must be positive")
        if not 0.0 <= float(dropout) < 1.0:
            raise ValueError(f"dropout={dropout} must be in [0, 1)")
        self.n_rois, self.e2n_channels, self.n2g_channels = int(n_rois), int(e2n_channels), int(n2g_channels)
        self.negative_slope = float(negative_slope)
        self.init_pooling(pooling, readout, 0, self.n_rois)
        # the window's Pearson correlation matrix: the readouts' FC (float32, no autocast, constant ROI -> 0)
        self.connectome = SecondOrderReadout("correlation", feature_dim=0, n_rois=self.n_rois, include_input=True,
                                             learn_projection=False, center=False)
        channels = [1, *e2e]
        self.e2e = nn.ModuleList(_EdgeToEdge(c_in, c_out, self.n_rois) for c_in, c_out in zip(channels, channels[1:]))
        self.e2n = nn.Conv2d(channels[-1], self.e2n_channels, (1, self.n_rois))  # (B, C, R, R) -> (B, E2N, R, 1)
        self.n2g = nn.Conv2d(self.e2n_channels, self.n2g_channels, (self.n_rois, 1))  # -> (B, N2G, 1, 1)
        self.drop = nn.Dropout(float(dropout))
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)

    @property
    def out_dim(self) -> int:
        return self.n2g_channels

    def _act(self, x: torch.Tensor) -> torch.Tensor:
        return F.leaky_relu(x, self.negative_slope)

    def connectivity(self, bold: torch.Tensor) -> torch.Tensor:
        """Windows ``(B, T, R)`` -> their Pearson correlation matrices ``(B, R, R)`` (float32)."""
        return self.connectome.matrix(None, bold)

    def node_embeddings(self, bold: torch.Tensor) -> torch.Tensor:
        """Windows ``(B, T, R)`` -> the Edge-to-Node output ``(B, E2N, R, 1)`` (activated, dropped out)."""
        x = self.connectivity(bold)[:, None]  # (B, 1, R, R)
        for layer in self.e2e:
            x = self._act(layer(x))
        return self.drop(self._act(self.e2n(x)))

    def forward(self, bold: torch.Tensor) -> torch.Tensor:
        """Windows ``(B, T, R)`` -> the graph embedding ``(B, n2g_channels)`` (Node-to-Graph)."""
        return self.drop(self._act(self.n2g(self.node_embeddings(bold)))).flatten(1)

    def features(self, bold: torch.Tensor) -> torch.Tensor:
        """Windows ``(B, T, R)`` -> node (ROI) embeddings ``(B, R, e2n_channels)`` (one token per ROI)."""
        return self.node_embeddings(bold).squeeze(-1).transpose(1, 2)

    def frame_features(self, bold: torch.Tensor) -> torch.Tensor:
        """BrainNetCNN has no per-TR features (it reads the window through its FC).

        Raises:
            ConfigError: always.
        """
        raise ConfigError("model BrainNetCNN has no per-TR features (it reads a window through its FC matrix); "
                          "use a model with per-TR features (model=mean_mlp, temporal_mlp) for a second-order readout")

    def pool_first_order(self, bold: torch.Tensor) -> torch.Tensor:
        """``mean``: the Node-to-Graph output ``(B, n2g_channels)`` (see the class docstring)."""
        return self(bold)
