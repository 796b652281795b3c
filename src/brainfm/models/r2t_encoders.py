"""Light temporal encoders for frame sequences of parcellated or dense (grayordinate) BOLD, after
the temporal encoders of R2T-Net (rest2task/R2T-Net, ``r2tnet/backbones/temporal.py``: a linear
projection of every frame, a temporal network, mean pooling).

:class:`TemporalMLPEncoder` is the cheap alternative to the sequence transformer
(:class:`brainfm.models.sequence.SequenceTransformer`) for R2T-Net's ROI ``[V, T]`` and grayordinate
``[91282, T]`` inputs: each TR's vector goes through the TR embedding of Thomas et al. (2022)
(Linear + LayerNorm + learned embedding of the TR's time in seconds), a residual per-frame MLP,
then residual dilated 1-D convolutions over time (R2T-Net's ``TemporalConvEncoder`` uses dilations
``2**i``). It has the interface of the sequence transformer (``embed_trs`` -> ``encode`` ->
token states), so objectives can add tokens (e.g. a modality embedding) before the temporal part.
"""

from __future__ import annotations

import torch
from torch import nn

from brainfm.models.backbone import TRTokenBackbone
from brainfm.models.embedding import TREmbedding
from brainfm.models.transformer import checkpointed


class _TemporalBlock(nn.Module):
    """Pre-LN residual block: LayerNorm -> Conv1d over time (same length) -> GELU -> dropout."""

    def __init__(self, d_model: int, kernel_size: int, dilation: int, dropout: float) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(d_model)
        self.conv = nn.Conv1d(d_model, d_model, kernel_size, padding=dilation * (kernel_size // 2), dilation=dilation)
        self.act = nn.GELU()
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, d)
        y = self.conv(self.norm(x).transpose(1, 2)).transpose(1, 2)
        return x + self.drop(self.act(y))


class TemporalMLPEncoder(nn.Module, TRTokenBackbone):
    """Per-frame MLP + dilated temporal convolutions over ROI or grayordinate frames.

    Args:
        n_rois: values per TR (ROIs of a parcellation, or 91282 grayordinates of HCP's
            32k_fs_LR CIFTI space).
        d_model: token width.
        mlp_ratio: hidden width of the per-frame MLP, as a multiple of ``d_model``.
        depth: temporal convolution blocks (dilation ``2**i`` in block ``i``, capped at 32).
        kernel_size: odd temporal kernel in TRs.
        dropout: dropout in the MLP and the temporal blocks.
        t_max_s, t_resolution_s: range and bin width of the time embedding, seconds.
        use_checkpoint: activation checkpointing (training only) of the per-frame MLP (its hidden
            ``(B, T, mlp_ratio * d)`` activations) and of every temporal block.
        pooling, readout: ``mean`` of the TR states, or a second-order ``correlation`` / ``covariance``
            readout of them (:mod:`brainfm.models.pooling`, options in ``readout``).

    Shapes: ``bold`` ``(B, T, n_rois)``, ``t`` ``(B, T)`` seconds from the window onset ->
    :meth:`forward` ``(B, T, d_model)``; the objective pools over time.

    Raises:
        ValueError: an even ``kernel_size`` or a non-positive size.
    """

    def __init__(
        self,
        n_rois: int,
        d_model: int = 256,
        mlp_ratio: float = 2.0,
        depth: int = 2,
        kernel_size: int = 5,
        dropout: float = 0.1,
        t_max_s: float = 1000.0,
        t_resolution_s: float = 0.2,
        use_checkpoint: bool = False,
        pooling: str = "mean",
        readout: dict | None = None,
    ) -> None:
        super().__init__()
        self.use_checkpoint = bool(use_checkpoint)
        if int(kernel_size) % 2 == 0 or int(kernel_size) < 1:
            raise ValueError(f"kernel_size={kernel_size} must be odd and positive (windows keep their length)")
        if int(d_model) < 1 or int(depth) < 0:
            raise ValueError(f"d_model={d_model} must be positive and depth={depth} non-negative")
        self.n_rois = int(n_rois)
        self.d_model = int(d_model)
        self.embedding = TREmbedding(self.n_rois, self.d_model, t_max_s, t_resolution_s)
        hidden = max(1, int(round(mlp_ratio * self.d_model)))
        self.mlp = nn.Sequential(nn.LayerNorm(self.d_model), nn.Linear(self.d_model, hidden), nn.GELU(),
                                 nn.Dropout(dropout), nn.Linear(hidden, self.d_model))
        self.blocks = nn.ModuleList(_TemporalBlock(self.d_model, int(kernel_size), 2 ** min(i, 5), dropout)
                                    for i in range(int(depth)))
        self.norm = nn.LayerNorm(self.d_model)
        self.drop = nn.Dropout(dropout)
        self.init_pooling(pooling, readout, self.d_model, self.n_rois)

    @property
    def out_dim(self) -> int:
        return self.pooled_dim(self.d_model)

    def compile_regions(self) -> list[nn.Module]:
        """What ``trainer.compile=true`` compiles: the per-frame MLP and every temporal block (R2T calls
        :meth:`embed_trs` / :meth:`encode`, not ``forward``; the TR embedding's range check reads
        ``t.max()`` on the host, a graph break, so it stays eager)."""
        return [self.mlp, *self.blocks]

    def embed_trs(self, bold: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """TR tokens ``(B, T, d)`` from ``bold`` ``(B, T, n_rois)`` and ``t`` ``(B, T)`` seconds."""
        return self.embedding(bold, t)

    def encode(self, tokens: torch.Tensor) -> torch.Tensor:
        """Tokens ``(B, T, d)`` -> token states ``(B, T, d)`` (MLP per frame, then over time)."""
        ckpt = self.use_checkpoint and self.training
        # R2T's temporal crop gives every batch its own length: compiled regions take the time axis as
        # dynamic from the first call, instead of one recompile per length (per block dilation) until
        # torch._dynamo's recompile limit (a no-op in eager mode)
        torch._dynamo.maybe_mark_dynamic(tokens, 1)
        x = tokens + self.drop(checkpointed(self.mlp, tokens, enabled=ckpt))
        for block in self.blocks:
            torch._dynamo.maybe_mark_dynamic(x, 1)
            x = checkpointed(block, x, enabled=ckpt)
        return self.norm(x)

    def forward(self, bold: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.encode(self.embed_trs(bold, t))

    # -- the backbone contract (brainfm.models.backbone) --------------------------------------------------
    any_tr = True  # TREmbedding: any TR
    poolings = ("mean", "correlation", "covariance")
