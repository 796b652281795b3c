"""TFF: a 3-D CNN encoder, a BERT-like transformer over the TRs of a clip and a mirrored 3-D CNN
decoder (Malkiel, Rosenman, Wolf & Hendler 2022, "Pre-training and fine-tuning transformers for fMRI
prediction tasks", arXiv:2112.05761; code: GonyRosenman/TFF ``model.py``, ``nvidia_blocks.py``).

Every TR of a clip ``(B, C, X, Y, Z, T)`` is encoded on its own by the CNN into one vector of
``hidden_size``; the transformer mixes the ``T`` vectors (plus a CLS token); the decoder turns every
output vector back into a volume. Numbers of the reference (checked against its code):

- input: HCP S1200 REST1 volumes in MNI space (91x109x91, 2 mm) cropped ``[8:-8, 8:-8, :-10]`` to
  ``75x93x81``, first 10 TRs dropped; two channels: global z-norm (background = minimum) and
  per-voxel z-norm over time; clips of 20 TRs (``sequence_length_phase2=20``).
- encoder: Conv3d(2 -> 4, 3x3x3), Dropout3d(0.2), then residual ("green") blocks and stride-2
  Conv3d(3x3x3) downsampling: 1 block at 4 channels -> 8, 2 blocks at 8 -> 16, 2 blocks at 16 -> 32,
  4 blocks at 32. A residual block is GroupNorm(C/4 groups) -> LeakyReLU -> Conv3d -> GroupNorm ->
  LeakyReLU -> Conv3d, dropout 0.4 on that branch, plus the identity (the "green block" of
  Myronenko 2018, "3D MRI brain tumor segmentation using autoencoder regularization").
- bottleneck: GroupNorm(8) -> LeakyReLU -> Conv3d(32 -> 2), flatten, Linear to 2640 (at 75x93x81 the
  grid is 10x12x11, so 2 x 1320 = 2640 and the Linear is dropped: an identity); back: Linear(2640 ->
  2 x grid), GroupNorm(2) -> LeakyReLU -> Conv3d(2 -> 32).
- transformer: Hugging Face BERT, hidden 2640, 2 layers, 16 heads, intermediate 3072 (BERT's
  default), GELU, post-LayerNorm (eps 1e-12), learned positions (30), hidden and attention dropout
  0.1, a CLS token first and BERT's pooler (Linear + tanh) on it.
- decoder: per level 1x1x1 Conv3d (halving the channels), nearest upsampling to the encoder's grid
  of that level, one residual block (dropout 0.2); then Conv3d(4 -> 4, 3x3x3) and Conv3d(4 -> 1, 1x1x1).

Differences from the reference, on purpose:

- the CLS token is a learned vector (the reference feeds a constant 0.5 vector through
  Linear + LeakyReLU, which is a learned constant too); BERT's token-type embedding (one type, a
  constant) is left out; BERT's pooler exists only with ``pool=cls`` (reconstruction never trains it);
- the transformer is ``torch.nn.TransformerEncoder`` with BERT's layer layout (post-LN, GELU) instead
  of Hugging Face ``BertModel``;
- grids are computed from ``img_size`` (the reference runs a dummy forward pass to find them);
- ``num_layers=0`` is TFF's first pre-training phase (``AutoEncoder``: every TR through the
  bottleneck without the transformer).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from brainfm.errors import ConfigError
from brainfm.models.backbone import Backbone
from brainfm.models.transformer import checkpointed

POOLS = ("mean", "cls")


def tff_grids(img_size: Sequence[int], n_down: int) -> list[tuple[int, int, int]]:
    """Spatial grids of the encoder: ``img_size`` and the grid after each stride-2 convolution
    (kernel 3, padding 1: ``ceil(n / 2)``). TFF at 75x93x81: (38, 47, 41), (19, 24, 21), (10, 12, 11)."""
    grids = [tuple(int(s) for s in img_size)]
    for _ in range(n_down):
        grids.append(tuple((s + 1) // 2 for s in grids[-1]))
    return grids


def _groups(channels: int) -> int:
    """TFF's GroupNorm groups, ``channels // 4`` (at least 1), lowered to a divisor of ``channels``."""
    g = max(1, channels // 4)
    while channels % g:
        g -= 1
    return g


class ResidualBlock3D(nn.Module):
    """``x + dropout(conv(act(norm(conv(act(norm(x)))))))``, 3x3x3 convolutions, GroupNorm with
    ``channels // 4`` groups, LeakyReLU (slope 0.01): TFF's "green block" (Myronenko 2018).

    MONAI's ``ResBlock`` has the same layout but no dropout on the residual branch, which TFF uses
    (0.4 in the encoder, 0.2 in the decoder), hence this small module.

    Shapes: ``(N, C, X, Y, Z)`` -> ``(N, C, X, Y, Z)``.
    """

    def __init__(self, channels: int, dropout: float = 0.0) -> None:
        super().__init__()
        g = _groups(channels)
        self.norm1 = nn.GroupNorm(g, channels)
        self.conv1 = nn.Conv3d(channels, channels, 3, padding=1)
        self.norm2 = nn.GroupNorm(g, channels)
        self.conv2 = nn.Conv3d(channels, channels, 3, padding=1)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.leaky_relu(self.norm1(x)))
        h = self.conv2(F.leaky_relu(self.norm2(h)))
        return x + self.drop(h)


class TFFEncoder3D(nn.Module):
    """One volume -> feature map: stem convolution, then per level residual blocks and a stride-2
    3x3x3 convolution doubling the channels; the last level has no downsampling.

    Args:
        in_chans: input channels (TFF: 2, global and per-voxel z-norm).
        base_channels: channels of the first level (TFF: 4; then 8, 16, 32).
        blocks: residual blocks per level (TFF: ``[1, 2, 2, 4]``: 3 downsamplings).
        input_dropout: Dropout3d after the stem (TFF: 0.2). dropout: residual-branch dropout (0.4).
        use_checkpoint: activation checkpointing of every residual block and downsampling (training only).

    Shapes: ``(N, in_chans, X, Y, Z)`` -> ``(N, base * 2**(len(blocks) - 1), *grids[-1])``.
    """

    def __init__(self, in_chans: int = 2, base_channels: int = 4, blocks: Sequence[int] = (1, 2, 2, 4),
                 input_dropout: float = 0.2, dropout: float = 0.4, use_checkpoint: bool = False) -> None:
        super().__init__()
        self.use_checkpoint = bool(use_checkpoint)
        self.stem = nn.Conv3d(in_chans, base_channels, 3, padding=1)
        self.stem_drop = nn.Dropout3d(input_dropout)
        self.levels = nn.ModuleList()
        c = base_channels
        for i, n in enumerate(blocks):
            layers: list[nn.Module] = [ResidualBlock3D(c, dropout) for _ in range(int(n))]
            if i < len(blocks) - 1:
                layers.append(nn.Conv3d(c, 2 * c, 3, stride=2, padding=1))
                c *= 2
            self.levels.append(nn.Sequential(*layers))
        self.out_channels = c

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem_drop(self.stem(x))
        for level in self.levels:
            for layer in level:
                x = checkpointed(layer, x, enabled=self.use_checkpoint and self.training)
        return x


class _UpLevel(nn.Module):
    """1x1x1 Conv3d (``c_in -> c_out``), nearest upsampling to ``size``, one residual block."""

    def __init__(self, c_in: int, c_out: int, size: Sequence[int], dropout: float) -> None:
        super().__init__()
        self.size = tuple(int(s) for s in size)
        self.proj = nn.Conv3d(c_in, c_out, 1)
        self.block = ResidualBlock3D(c_out, dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(F.interpolate(self.proj(x), size=self.size, mode="nearest"))


class TFFDecoder3D(nn.Module):
    """Feature map -> volume, mirroring :class:`TFFEncoder3D`: per level a 1x1x1 convolution halving
    the channels, nearest upsampling to the encoder grid of that level and a residual block; then a
    3x3x3 and a 1x1x1 convolution.

    Args:
        out_chans: output channels (TFF: 1, the global z-norm channel).
        base_channels: channels of the finest level. grids: :func:`tff_grids` (finest first).
        dropout: residual-branch dropout (TFF: 0.2).
        use_checkpoint: activation checkpointing of every level (training only).

    Shapes: ``(N, base * 2**(len(grids) - 1), *grids[-1])`` -> ``(N, out_chans, *grids[0])``.
    """

    def __init__(self, out_chans: int, base_channels: int, grids: Sequence[Sequence[int]], dropout: float = 0.2,
                 use_checkpoint: bool = False) -> None:
        super().__init__()
        self.use_checkpoint = bool(use_checkpoint)
        n_down = len(grids) - 1
        self.levels = nn.ModuleList(
            _UpLevel(base_channels * 2 ** (i + 1), base_channels * 2**i, grids[i], dropout)
            for i in reversed(range(n_down))
        )
        self.head = nn.Sequential(nn.Conv3d(base_channels, base_channels, 3, padding=1),
                                  nn.Conv3d(base_channels, out_chans, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for level in self.levels:
            x = checkpointed(level, x, enabled=self.use_checkpoint and self.training)
        return self.head(x)


class TemporalBERT(nn.Module):
    """BERT over the TRs of a clip: CLS token first, learned positions, LayerNorm and dropout on the
    embeddings, post-LN encoder layers (GELU), BERT's pooler (Linear + tanh) on the CLS output.

    Args:
        hidden_size, num_layers, num_heads, intermediate_size: TFF: 2640, 2, 16, 3072.
        max_positions: longest sequence including CLS (TFF: 30, so clips of at most 29 TRs).
        dropout: hidden and attention dropout (TFF: 0.1).
        pooler: build BERT's pooler. Reconstruction never uses it, so it is left out unless asked
            for (a parameter without gradients stops DDP with ``find_unused_parameters=false``).

    Shapes: ``tokens`` ``(B, T, H)`` -> ``(sequence (B, T, H), pooled CLS (B, H) or None)``.

    Raises:
        ConfigError: ``hidden_size`` not divisible by ``num_heads``; a clip longer than ``max_positions - 1``.
    """

    def __init__(self, hidden_size: int = 2640, num_layers: int = 2, num_heads: int = 16,
                 intermediate_size: int = 3072, max_positions: int = 30, dropout: float = 0.1,
                 pooler: bool = True, use_checkpoint: bool = False) -> None:
        super().__init__()
        self.use_checkpoint = bool(use_checkpoint)
        if hidden_size % num_heads:
            raise ConfigError(f"model.hidden_size={hidden_size} is not divisible by model.num_heads={num_heads}")
        self.max_positions = int(max_positions)
        self.cls_token = nn.Parameter(torch.zeros(hidden_size))
        self.position = nn.Embedding(self.max_positions, hidden_size)
        self.norm = nn.LayerNorm(hidden_size, eps=1e-12)
        self.drop = nn.Dropout(dropout)
        layer = nn.TransformerEncoderLayer(hidden_size, num_heads, intermediate_size, dropout, activation="gelu",
                                           layer_norm_eps=1e-12, batch_first=True, norm_first=False)
        self.encoder = nn.TransformerEncoder(layer, num_layers, enable_nested_tensor=False)
        self.pooler = nn.Linear(hidden_size, hidden_size) if pooler else None
        self.apply(self._init_weights)
        nn.init.normal_(self.cls_token, std=0.02)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:  # BERT's initialisation: N(0, 0.02), zero biases
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, std=0.02)
        elif isinstance(m, nn.MultiheadAttention):
            nn.init.normal_(m.in_proj_weight, std=0.02)
            nn.init.zeros_(m.in_proj_bias)

    def forward(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        b, t, h = tokens.shape
        if t + 1 > self.max_positions:
            raise ConfigError(f"a clip of {t} TRs needs {t + 1} positions (CLS included) but model.max_positions="
                              f"{self.max_positions}: raise model.max_positions or lower data.clip.length")
        x = torch.cat([self.cls_token.to(tokens.dtype).expand(b, 1, h), tokens], dim=1)
        x = self.drop(self.norm(x + self.position.weight[: t + 1].to(x.dtype)))
        for layer in self.encoder.layers:  # what nn.TransformerEncoder does without masks, layer by layer
            x = checkpointed(layer, x, enabled=self.use_checkpoint and self.training)
        return x[:, 1:], (torch.tanh(self.pooler(x[:, 0])) if self.pooler is not None else None)


class TFF(nn.Module, Backbone):
    """TFF autoencoder: 3-D CNN encoder per TR -> bottleneck vector -> transformer over the TRs ->
    bottleneck -> mirrored 3-D CNN decoder per TR.

    Args:
        img_size: ``[X, Y, Z]`` voxels of a volume (TFF: HCP cropped to ``[75, 93, 81]``).
        in_chans: input channels (2: global and per-voxel z-norm, ``data.normalization.load=stored+voxel``).
        out_chans: reconstructed channels (1: the global z-norm channel).
        base_channels, encoder_blocks: CNN width and residual blocks per level (TFF: 4, ``[1, 2, 2, 4]``).
        bottleneck_channels: channels before flattening (TFF: 2).
        hidden_size, num_layers, num_heads, intermediate_size, max_positions: the transformer (TFF:
            2640, 2, 16, 3072, 30). ``num_layers=0``: no transformer (TFF's phase-1 autoencoder).
        input_dropout, encoder_dropout, decoder_dropout, hidden_dropout: TFF: 0.2, 0.4, 0.2, 0.1.
        pool: what :meth:`embed` returns: ``mean`` over the TRs of the transformer output, or ``cls``
            (BERT's pooled CLS, what TFF fine-tunes). ``cls`` adds BERT's pooler, which reconstruction
            does not train (after pre-training alone it is a random projection; pre-train it under DDP
            with ``trainer.strategy.find_unused_parameters=true``).
        use_checkpoint: activation checkpointing (training only) of every residual block of the CNN
            encoder and decoder (where the memory is: every TR's full-resolution feature maps) and of
            every transformer layer.

    Shapes: :meth:`forward` ``(B, in_chans, X, Y, Z, T)`` -> reconstruction ``(B, out_chans, X, Y, Z, T)``;
    :meth:`encode` -> ``(sequence (B, T, hidden), pooled CLS (B, hidden) or None)``; :meth:`embed` ->
    ``(B, hidden)``.

    Raises:
        ConfigError: bad sizes, an unknown ``pool``, ``pool=cls`` without a transformer, or inputs whose
        channels or grid differ from the model's.
    """

    def __init__(
        self,
        img_size: Sequence[int] = (75, 93, 81),
        in_chans: int = 2,
        out_chans: int = 1,
        base_channels: int = 4,
        encoder_blocks: Sequence[int] = (1, 2, 2, 4),
        bottleneck_channels: int = 2,
        hidden_size: int = 2640,
        num_layers: int = 2,
        num_heads: int = 16,
        intermediate_size: int = 3072,
        max_positions: int = 30,
        input_dropout: float = 0.2,
        encoder_dropout: float = 0.4,
        decoder_dropout: float = 0.2,
        hidden_dropout: float = 0.1,
        pool: str = "mean",
        use_checkpoint: bool = False,
    ) -> None:
        super().__init__()
        if len(img_size) != 3 or min(int(s) for s in img_size) < 1:
            raise ConfigError(f"model.img_size={list(img_size)} must be [X, Y, Z] voxels (TFF: [75, 93, 81])")
        if len(encoder_blocks) < 1 or min(int(n) for n in encoder_blocks) < 0:
            raise ConfigError(f"model.encoder_blocks={list(encoder_blocks)} must list >= 0 residual blocks per level")
        if pool not in POOLS:
            raise ConfigError(f"model.pool={pool!r} must be one of {POOLS}")
        if pool == "cls" and int(num_layers) == 0:
            raise ConfigError("model.pool=cls needs the transformer (model.num_layers > 0)")
        self.img_size = tuple(int(s) for s in img_size)
        self.in_chans, self.out_chans = int(in_chans), int(out_chans)
        self.hidden_size, self.pool = int(hidden_size), pool
        self.grids = tff_grids(self.img_size, len(encoder_blocks) - 1)
        self.encoder = TFFEncoder3D(in_chans, base_channels, encoder_blocks, input_dropout, encoder_dropout,
                                    use_checkpoint)
        c_top, bc, cells = self.encoder.out_channels, int(bottleneck_channels), math.prod(self.grids[-1])
        self.bottleneck_shape = (bc, *self.grids[-1])
        self.to_hidden = nn.Sequential(nn.GroupNorm(_groups(c_top), c_top), nn.LeakyReLU(),
                                       nn.Conv3d(c_top, bc, 3, padding=1), nn.Flatten())
        # TFF drops this Linear when the flattened bottleneck already has hidden_size values (75x93x81)
        self.into_hidden = nn.Identity() if bc * cells == self.hidden_size else nn.Linear(bc * cells, self.hidden_size)
        self.transformer = (TemporalBERT(hidden_size, num_layers, num_heads, intermediate_size, max_positions,
                                         hidden_dropout, pooler=pool == "cls", use_checkpoint=use_checkpoint)
                            if int(num_layers) > 0 else None)
        self.from_hidden = nn.Linear(self.hidden_size, bc * cells)
        self.from_bottleneck = nn.Sequential(nn.GroupNorm(bc, bc), nn.LeakyReLU(),  # TFF: GroupNorm(2 groups, 2)
                                             nn.Conv3d(bc, c_top, 3, padding=1))
        self.decoder = TFFDecoder3D(out_chans, base_channels, self.grids, decoder_dropout, use_checkpoint)

    @property
    def out_dim(self) -> int:
        """Width of :meth:`embed` (``hidden_size``)."""
        return self.hidden_size

    def compile_regions(self) -> list[nn.Module]:
        """What ``trainer.compile=true`` compiles: the whole autoencoder (the objective calls
        ``forward``; no graph break in it)."""
        return [self]

    def _check(self, x: torch.Tensor) -> None:
        if x.dim() != 6 or x.shape[1] != self.in_chans or tuple(x.shape[2:5]) != self.img_size:
            raise ConfigError(
                f"TFF expects volumes (B, {self.in_chans}, {', '.join(map(str, self.img_size))}, T), got "
                f"{tuple(x.shape)}. Fix: model.img_size must equal data.shape, and model.in_chans the data's channels "
                "(2 with data.normalization.load=stored+voxel)"
            )

    def encode_frames(self, x: torch.Tensor) -> torch.Tensor:
        """Every TR through the CNN encoder and bottleneck: ``(B, C, X, Y, Z, T)`` -> ``(B, T, hidden)``."""
        self._check(x)
        x = x.to(self.encoder.stem.weight.dtype)  # fp16 clips from the volume store
        b, c, *_, t = x.shape
        frames = x.permute(0, 5, 1, 2, 3, 4).reshape(b * t, c, *self.img_size)
        return self.into_hidden(self.to_hidden(self.encoder(frames))).view(b, t, self.hidden_size)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(B, C, X, Y, Z, T)`` -> ``(sequence (B, T, hidden), pooled CLS (B, hidden) or None)``; the
        CLS output is None without the transformer or with ``pool=mean``."""
        tokens = self.encode_frames(x)
        if self.transformer is None:
            return tokens, None
        return self.transformer(tokens)

    def decode_frames(self, sequence: torch.Tensor) -> torch.Tensor:
        """``(B, T, hidden)`` -> reconstruction ``(B, out_chans, X, Y, Z, T)``."""
        b, t, _ = sequence.shape
        h = self.from_hidden(sequence.reshape(b * t, self.hidden_size)).view(b * t, *self.bottleneck_shape)
        y = self.decoder(self.from_bottleneck(h))
        return y.view(b, t, self.out_chans, *self.img_size).permute(0, 2, 3, 4, 5, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode_frames(self.encode(x)[0])

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """One vector per clip ``(B, hidden)``: the mean of the transformer output over the TRs
        (``pool=mean``) or BERT's pooled CLS (``pool=cls``)."""
        sequence, cls = self.encode(x)
        return cls if self.pool == "cls" else sequence.mean(dim=1)

    # -- the backbone contract (brainfm.models.backbone) --------------------------------------------------
    input_keys = ("volume",)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Clips ``(B, C, X, Y, Z, T)`` -> the transformer's states per TR ``(B, T, hidden)``."""
        return self.encode(x)[0]

    def pooled(self, x: torch.Tensor) -> torch.Tensor:
        """Clips -> ``(B, hidden)`` (:meth:`embed`)."""
        return self.embed(x)
