"""Brain-Semantoks backbone: a network tokenizer and a transformer over network x time tokens.

Gijsen, Schulz & Ritter (ICLR 2026), "Brain-Semantoks: Learning Semantic Tokens of Brain Dynamics
with a Self-Distilled Foundation Model" (SamGijsen/Brain-Semantoks: ``model/tokenizer.py``,
``model/semantoks.py``, ``config/example_config.yaml``).

Input: z-scored BOLD ``(B, T, V)`` (TRs x ROIs). The ROIs are grouped into ``N`` networks by a
network map (:mod:`brainfm.models.network_maps`); the time axis is cut into ``P = T // patch_size``
temporal patches of ``patch_size`` TRs (trailing TRs that do not fill a patch are dropped, as the
reference's ``unfold`` does). For every network and patch, :class:`NetworkTokenizer` turns the
``(V_n, patch_size)`` block into one ``d``-dim token: a Conv1d over the network's ROIs (kernel 3)
in parallel with a structured long convolution (:class:`LongConv1d`), concatenated, GELU, mean over
the patch's TRs, LayerNorm. Tokens get a learned network embedding plus a fixed sine-cosine
embedding of the patch index, are flattened network-major (``N * P``), a CLS token is prepended and
a pre-LN transformer with LayerScale runs over all of them.

The patch is a number of **TRs**, so its duration depends on the data set's TR: the reference's
20 TRs are 40 s at its TR of 2 s, but 14.4 s at HCP's 0.72 s. Pick ``patch_size`` for the data's
TR (``patch_size * TR`` seconds per token); a checkpoint refuses data with another TR.

Reference defaults (``config/example_config.yaml``): patch 20 TRs, Conv1d 384 channels (kernel 3)
and long convolution 384 channels (kernel 4, 3 scales, decay 2), so ``d = 768``; depth 8,
``d / 64 = 12`` heads, MLP ``4 d``, LayerScale 0.1, no dropout, CLS pooling: 58.7 M parameters
here on the Schaefer+Tian+Buckner map (the paper's ~63 M also counts tokenizer copies the reference
builds for its second and third atlas but never uses). Differences, on purpose: attention projections carry biases
(``qkv_bias=false`` drops the query/key/value bias, as the reference, for its released weights) and run
on ``F.scaled_dot_product_attention`` (brainfm's :class:`~brainfm.models.transformer.TransformerEncoder`);
the long-convolution kernel norm is fixed at initialisation instead of at the first forward pass (a
converted checkpoint brings the reference's buffer); the sine-cosine table is computed for any
number of patches (windows of any length), not for one.

Missing atlases: data read with ``data.atlas=[schaefer400, tian3, buckner7]`` from a file that lacks
an atlas carry ``roi_mask`` ``(B, V)`` (True: the ROI was read; :mod:`brainfm.data.stores.roi`).
A network whose ROIs are all missing is a *missing token* at every patch (:meth:`SemantoksEncoder.missing_networks`):
its tokenizer output is replaced by the learned MASK token (so the output does not depend on the
zeros read for it) and, with ``missing_tokens="pad"`` (default), no other token attends to it
(attention key padding); ``"mask"`` keeps it attended, as the reference README suggests ("masking
their tokens post-tokenizer"). Losses and the mean-token features leave missing tokens out.

Released weights: :func:`semantoks_checkpoint_filter` maps the reference's ``CNN_TF`` (or a whole
``SimDINOModel`` state, teacher by default) onto this module (``brainfm-convert
semantoks <ckpt> <out>``; ``tests/test_semantoks_parity.py`` reproduces the reference's tokens, CLS
and gradients from the fixture in ``shared/fixtures/semantoks_parity``).

Computation: :meth:`SemantoksEncoder.tokenize` runs all networks as one grouped Conv1d, each
network's two branches folded into one equivalent kernel (:meth:`NetworkTokenizer.effective_conv`;
the long convolution and its Linear are linear, so they compose into a convolution) and its ROIs
padded with a zero channel to the largest network. The parameters are the two-branch ones;
:meth:`SemantoksEncoder.tokenize_per_network` computes the same tokens branch by branch, network by
network.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from brainfm.errors import CheckpointError, ConfigError
from brainfm.models.backbone import Backbone
from brainfm.models.network_maps import available_network_maps, load_network_map
from brainfm.models.transformer import TransformerEncoder, checkpointed


def sincos_embedding(positions: torch.Tensor, dim: int) -> torch.Tensor:
    """Fixed 1-D sine-cosine embedding (Vaswani et al. 2017; the MAE/Brain-Semantoks layout: the
    first ``dim/2`` channels are sines, the last ``dim/2`` cosines, frequencies ``10000^(-k/(dim/2))``).

    Args:
        positions: ``(P,)`` positions (patch indices).
        dim: even embedding width.

    Returns:
        ``(P, dim)`` float32.

    Raises:
        ValueError: odd ``dim``.
    """
    if dim % 2:
        raise ValueError(f"sine-cosine embedding needs an even width, got {dim}")
    half = dim // 2
    omega = 1.0 / 10000 ** (torch.arange(half, dtype=torch.float32, device=positions.device) / half)
    angles = positions.float()[:, None] * omega[None, :]
    return torch.cat([angles.sin(), angles.cos()], dim=1)


class LongConv1d(nn.Module):
    """Structured long convolution (SGConv: Li et al. 2023, "What makes convolutional models great
    on long sequence modeling?", ICLR), as in Brain-Semantoks' ``sgconv`` tokenizer branch.

    Depthwise: each input channel is convolved with ``heads`` kernels of ``kernel_size *
    2**(scales - 1)`` taps. A kernel is the concatenation of ``scales`` learned sub-kernels of
    ``kernel_size`` taps; sub-kernel ``i`` is stretched ``2**max(0, i - 1)`` times (nearest) and
    weighted ``decay**(scales - 1 - i)``, so distant taps are smooth and small; the kernel is then
    divided by its norm at initialisation. Zero "same" padding keeps the length (a kernel longer
    than the input sees zeros beyond it); a learned skip ``D * x`` is added.

    Args:
        channels: input channels ``C`` (the network's ROIs).
        heads: kernels per channel ``H``.
        kernel_size, scales, decay: kernel parametrisation (reference: 4, 3, 2.0).

    Shapes: ``(B, C, L)`` -> ``(B, C * H, L)`` (channel-major: output ``c * H + h``).
    """

    def __init__(self, channels: int, heads: int = 1, kernel_size: int = 4, scales: int = 3, decay: float = 2.0) -> None:
        super().__init__()
        if channels < 1 or heads < 1 or kernel_size < 1 or scales < 1:
            raise ValueError(f"LongConv1d needs positive channels/heads/kernel_size/scales, got {channels}/{heads}/{kernel_size}/{scales}")
        self.channels, self.heads = int(channels), int(heads)
        self.kernel_size, self.scales, self.decay = int(kernel_size), int(scales), float(decay)
        out = self.channels * self.heads
        self.sub_kernels = nn.ParameterList(nn.Parameter(torch.randn(out, kernel_size)) for _ in range(self.scales))
        self.skip = nn.Parameter(torch.randn(out))
        with torch.no_grad():
            norm = self._raw_kernel().norm(dim=-1, keepdim=True)
        self.register_buffer("kernel_norm", norm)

    @property
    def length(self) -> int:
        """Taps of the full kernel."""
        return self.kernel_size * 2 ** (self.scales - 1)

    def _raw_kernel(self) -> torch.Tensor:
        parts = []
        for i, sub in enumerate(self.sub_kernels):
            stretched = sub.repeat_interleave(2 ** max(0, i - 1), dim=-1)
            parts.append(stretched * self.decay ** (self.scales - 1 - i))
        return torch.cat(parts, dim=-1)

    def kernel(self) -> torch.Tensor:
        """The normalized kernel, ``(C * H, length)``; tap ``j`` weighs the input ``j`` steps back
        (relative to the kernel's centre)."""
        return self._raw_kernel() / self.kernel_norm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k = self.kernel()
        left = (k.shape[-1] - 1) // 2
        # a convolution (not a cross-correlation): flip the taps for F.conv1d
        y = F.conv1d(F.pad(x, (left, k.shape[-1] - 1 - left)), k.flip(-1)[:, None, :], groups=self.channels)
        return y + x.repeat_interleave(self.heads, dim=1) * self.skip[None, :, None]


class NetworkTokenizer(nn.Module):
    """One network's tokenizer: ``(B', V_n, L)`` ROI time courses of one patch -> ``(B', d)``.

    Conv1d(V_n -> ``conv_channels``, ``conv_kernel``, same padding) in parallel with
    :class:`LongConv1d` (``ceil(long_conv_channels / V_n)`` heads per ROI) followed by
    Linear(-> ``long_conv_channels``); the branches are concatenated (``d = conv_channels +
    long_conv_channels``), GELU, mean over the ``L`` TRs, LayerNorm. Either branch may be switched
    off with 0 channels.
    """

    def __init__(
        self,
        n_rois: int,
        conv_channels: int = 384,
        conv_kernel: int = 3,
        long_conv_channels: int = 384,
        long_conv_kernel: int = 4,
        long_conv_scales: int = 3,
        long_conv_decay: float = 2.0,
    ) -> None:
        super().__init__()
        self.conv = nn.Conv1d(n_rois, conv_channels, conv_kernel, padding="same") if conv_channels else None
        if long_conv_channels:
            heads = math.ceil(long_conv_channels / n_rois)
            self.long_conv = LongConv1d(n_rois, heads, long_conv_kernel, long_conv_scales, long_conv_decay)
            self.long_proj = nn.Linear(n_rois * heads, long_conv_channels)
        else:
            self.long_conv = self.long_proj = None
        self.norm = nn.LayerNorm(conv_channels + long_conv_channels)

    def span(self) -> tuple[int, int]:
        """TRs before and after an output TR that the branches see (their "same" padding)."""
        spans = []
        if self.conv is not None:
            k = self.conv.kernel_size[0]
            spans.append(((k - 1) // 2, k - 1 - (k - 1) // 2))
        if self.long_conv is not None:
            k = self.long_conv.length
            spans.append(((k - 1) // 2, k - 1 - (k - 1) // 2))
        return max(s[0] for s in spans), max(s[1] for s in spans)

    def effective_conv(self, before: int, after: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Both branches as one Conv1d (cross-correlation) over ``before + 1 + after`` taps.

        The long convolution followed by its Linear is linear in the input, so it equals a Conv1d
        whose weight is ``sum_h Linear[c, (v, h)] * kernel[(v, h)]`` (taps flipped) plus the skip at
        the centre tap. Returns ``weight`` ``(d, V_n, before + 1 + after)`` and ``bias`` ``(d,)``.
        """
        weights, biases = [], []
        taps = before + 1 + after
        if self.conv is not None:
            k = self.conv.kernel_size[0]
            left = (k - 1) // 2
            weights.append(F.pad(self.conv.weight, (before - left, taps - k - (before - left))))
            biases.append(self.conv.bias)
        if self.long_conv is not None:
            lc = self.long_conv
            k = lc.length
            left = (k - 1) // 2
            proj = self.long_proj.weight.reshape(-1, lc.channels, lc.heads)  # (C, V, H)
            kern = lc.kernel().reshape(lc.channels, lc.heads, k).flip(-1)  # cross-correlation taps
            w = torch.einsum("cvh,vhk->cvk", proj, kern)
            skip = torch.einsum("cvh,vh->cv", proj, lc.skip.reshape(lc.channels, lc.heads))
            w = w + F.pad(skip[..., None], (left, k - 1 - left))
            weights.append(F.pad(w, (before - left, taps - k - (before - left))))
            biases.append(self.long_proj.bias)
        return torch.cat(weights), torch.cat(biases)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The tokenizer as written (two branches); :class:`SemantoksEncoder` runs all networks at
        once through :meth:`effective_conv`, which gives the same tokens."""
        branches = []
        if self.conv is not None:
            branches.append(self.conv(x))
        if self.long_conv is not None:
            branches.append(self.long_proj(self.long_conv(x).transpose(1, 2)).transpose(1, 2))
        y = F.gelu(torch.cat(branches, dim=1))
        return self.norm(y.mean(dim=-1))


def _conv_gelu_mean(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, before: int, after: int,
                    groups: int) -> torch.Tensor:
    """The tokenizer's grouped convolution ``(B*P, N*V, L)`` -> ``(B*P, N*d, L)``, GELU, mean over the
    ``L`` TRs of the patch -> ``(B*P, N*d)``."""
    return F.gelu(F.conv1d(F.pad(x, (before, after)), weight, bias, groups=groups)).mean(dim=-1)


class SemantoksEncoder(nn.Module, Backbone):
    """Network tokenizer + transformer (Brain-Semantoks' ``CNN_TF``).

    Args:
        n_rois: ROIs per TR ``V``.
        network_assignment: ``(V,)`` network index of each ROI (0..N-1, every network used).
            Written by the task from ``network_map`` and the data's ROI names, and saved with the
            checkpoint.
        network_names: ``(N,)`` token names (for reports).
        network_map: the name of a map kept with the model (:mod:`brainfm.models.network_maps`),
            resolved by ROI count when ``network_assignment`` is not given (the task resolves a name or
            a map file by ROI name instead and passes ``network_assignment``; the model reads no user file).
        patch_size: TRs per temporal patch (token). Reference: 20 TRs (40 s at TR 2 s).
        conv_channels, conv_kernel: Conv1d branch (reference 384, 3).
        long_conv_channels, long_conv_kernel, long_conv_scales, long_conv_decay: long-convolution
            branch (reference 384, 4, 3, 2.0). ``d_model = conv_channels + long_conv_channels``.
        depth, n_heads, mlp_ratio: transformer (reference 8, d/64 = 12, 4).
        layer_scale: LayerScale initial value (reference 0.1; ``None``: off).
        dropout, attn_dropout: residual and attention dropout (reference 0).
        use_checkpoint: activation checkpointing (training only) of the tokenizer's convolution (its
            ``(B * P, N * d, patch_size)`` output before the mean over the patch) and of every
            transformer block.
        qkv_bias: the attention's query/key/value projection has a bias (brainfm's default; the
            reference has none: ``false`` for its converted weights).
        missing_tokens: ``"pad"`` (missing networks' tokens become the MASK token and are key-padded
            out of attention) or ``"mask"`` (MASK token, still attended); see the module docstring.
        pooling: ``cls`` (the CLS token's state; the reference's), ``mean`` (of the network tokens), or a
            second-order ``correlation`` / ``covariance`` readout (:mod:`brainfm.models.pooling`, options
            in ``readout``) of :meth:`frame_features`: each patch's network tokens averaged and held for
            the patch's TRs.

    Shapes: :meth:`forward` ``bold`` ``(B, T, V)``, ``mask`` ``(B, N, P)`` bool (True: the token is
    replaced by the learned MASK token), ``roi_mask`` ``(B, V)`` or ``(V,)`` bool (True: the ROI was
    read; None: all were) -> ``(B, 1 + N * P, d)``, CLS first, then the tokens network-major (token
    ``1 + n * P + p`` is network ``n``, patch ``p``), after a final LayerNorm.

    Raises:
        ConfigError: no network assignment, or one that does not fit ``n_rois``; a ``network_map``
            that is a file, not a shipped name, without ``network_assignment``; d_model odd.
        ValueError: (forward) wrong ROI count, a window shorter than one patch, a mask or
            ``roi_mask`` of the wrong shape.
    """

    def __init__(
        self,
        n_rois: int,
        network_assignment: Sequence[int] | None = None,
        network_names: Sequence[str] | None = None,
        network_map: str | None = None,
        patch_size: int = 20,
        conv_channels: int = 384,
        conv_kernel: int = 3,
        long_conv_channels: int = 384,
        long_conv_kernel: int = 4,
        long_conv_scales: int = 3,
        long_conv_decay: float = 2.0,
        depth: int = 8,
        n_heads: int = 12,
        mlp_ratio: float = 4.0,
        layer_scale: float | None = 0.1,
        dropout: float = 0.0,
        attn_dropout: float = 0.0,
        use_checkpoint: bool = False,
        qkv_bias: bool = True,
        missing_tokens: str = "pad",
        pooling: str = "cls",
        readout: dict | None = None,
    ) -> None:
        super().__init__()
        self.n_rois = int(n_rois)
        self.use_checkpoint = bool(use_checkpoint)
        if missing_tokens not in ("pad", "mask"):
            raise ConfigError(f"model.missing_tokens={missing_tokens!r} must be 'pad' or 'mask'")
        self.missing_tokens = missing_tokens
        if network_assignment is None:
            if network_map is None:
                raise ConfigError("the Semantoks model needs model.network_map (or an explicit network_assignment)")
            if str(network_map) not in available_network_maps():  # a model reads no user file
                raise ConfigError(
                    f"model.network_map={str(network_map)!r}: the model itself resolves only the maps kept with it "
                    f"({available_network_maps()}). Fix: train through task=simdino, which matches a map file to the "
                    "data's ROI names, or pass network_assignment "
                    "(brainfm.models.network_maps.load_network_map(file, roi_names).assignment)."
                )
            resolved = load_network_map(network_map, n_rois=self.n_rois)
            network_assignment, network_names = resolved.assignment, resolved.network_names
        assignment = [int(a) for a in network_assignment]
        if len(assignment) != self.n_rois:
            raise ConfigError(f"network_assignment has {len(assignment)} entries but the model has n_rois={self.n_rois}")
        n_networks = max(assignment) + 1
        if min(assignment) < 0 or set(assignment) != set(range(n_networks)):
            raise ConfigError(f"network_assignment must use every network index 0..{n_networks - 1} (got {sorted(set(assignment))})")
        self.network_assignment = assignment
        self.network_names = list(network_names) if network_names is not None else [f"network{k}" for k in range(n_networks)]
        if len(self.network_names) != n_networks:
            raise ConfigError(f"{len(self.network_names)} network names for {n_networks} networks")
        self.network_map = network_map
        self.n_networks = n_networks
        self.patch_size = int(patch_size)
        if self.patch_size < 1:
            raise ConfigError(f"model.patch_size={patch_size} must be >= 1 TR")
        self.d_model = int(conv_channels) + int(long_conv_channels)
        if self.d_model < 2 or self.d_model % 2:
            raise ConfigError(f"conv_channels + long_conv_channels = {self.d_model} must be even and >= 2 (sine-cosine time embedding)")
        # ROIs grouped by network: one gather, then a split per network
        self.network_sizes = [assignment.count(k) for k in range(n_networks)]
        vmax = max(self.network_sizes)
        padded = []  # network k's ROIs, then the zero channel (index n_rois) up to vmax
        for k in range(n_networks):
            rois = [i for i in range(self.n_rois) if assignment[i] == k]
            padded += rois + [self.n_rois] * (vmax - len(rois))
        self.register_buffer("padded_order", torch.tensor(padded, dtype=torch.long), persistent=False)
        self.register_buffer("assignment_index", torch.tensor(assignment, dtype=torch.long), persistent=False)
        self.tokenizers = nn.ModuleList(
            NetworkTokenizer(v, conv_channels, conv_kernel, long_conv_channels, long_conv_kernel, long_conv_scales, long_conv_decay)
            for v in self.network_sizes
        )
        self.network_embedding = nn.Embedding(n_networks, self.d_model)
        self.cls_token = nn.Parameter(torch.zeros(self.d_model))
        self.mask_token = nn.Parameter(torch.zeros(self.d_model))
        self.drop = nn.Dropout(dropout)
        self.encoder = TransformerEncoder(self.d_model, depth, n_heads, mlp_ratio, dropout, attn_dropout, layer_scale,
                                          use_checkpoint)
        if not qkv_bias:  # the reference's Attention: Linear(d, 3 d, bias=False)
            for block in self.encoder.blocks:
                block.attn.qkv = nn.Linear(self.d_model, 3 * self.d_model, bias=False)
        self.encoder.apply(self._init_linear)
        for p in (self.network_embedding.weight, self.cls_token, self.mask_token):
            nn.init.normal_(p, std=0.02)
        self.init_pooling(pooling, readout, self.d_model, self.n_rois)

    @staticmethod
    def _init_linear(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    @property
    def out_dim(self) -> int:
        return self.pooled_dim(self.d_model)

    # -- the backbone contract (brainfm.models.backbone) --------------------------------------------------
    input_keys = ("bold",)
    poolings = ("cls", "mean", "correlation", "covariance")

    def features(self, bold: torch.Tensor, roi_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Windows ``(B, T, n_rois)`` -> the network tokens' states ``(B, n_networks * n_patches, d)``
        (the CLS token left out; ``roi_mask``: see :meth:`forward`)."""
        return self(bold, roi_mask=roi_mask)[:, 1:]

    def frame_features(self, bold: torch.Tensor, roi_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Features per TR ``(B, T, d)``: the mean over networks of each patch's tokens, held for the
        patch's ``patch_size`` TRs (the TRs after the last whole patch take the last patch's)."""
        b, n_trs = bold.shape[:2]
        tokens = self.features(bold, roi_mask)
        p = tokens.shape[1] // self.n_networks
        per_patch = tokens.reshape(b, self.n_networks, p, -1).mean(dim=1)  # (B, P, d)
        index = (torch.arange(n_trs, device=bold.device) // self.patch_size).clamp_max(p - 1)
        return per_patch[:, index]

    def pooled(self, bold: torch.Tensor, roi_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Windows -> ``(B, out_dim)`` by ``model.pooling``: the CLS token's state (``cls``), the mean of
        the network tokens (``mean``) or the second-order readout of :meth:`frame_features` and ``bold``."""
        readout = self.pooling_readout
        if readout is not None:
            return readout(self.frame_features(bold, roi_mask) if readout.feature_dim else None, bold)
        states = self(bold, roi_mask=roi_mask)
        return states[:, 0] if self.pooling == "cls" else states[:, 1:].mean(dim=1)

    def pooled_batch(self, batch) -> torch.Tensor:
        """:meth:`pooled` of a batch's ``bold``, with its ``roi_mask`` when it has one (multi-atlas data)."""
        return self.pooled(*self.inputs(batch), roi_mask=batch.get("roi_mask"))

    def missing_networks(self, roi_mask: torch.Tensor | None, batch: int) -> torch.Tensor | None:
        """Networks none of whose ROIs were read: ``roi_mask`` ``(B, V)`` or ``(V,)`` bool (True: read)
        -> ``(B, N)`` bool (True: missing), or None when nothing is missing (or ``roi_mask`` is None).

        Raises:
            ValueError: ``roi_mask`` not ``(V,)`` / ``(batch, V)``.
        """
        if roi_mask is None:
            return None
        if roi_mask.ndim == 1:
            roi_mask = roi_mask.expand(batch, -1)
        if roi_mask.shape != (batch, self.n_rois):
            raise ValueError(f"roi_mask {tuple(roi_mask.shape)} must be ({self.n_rois},) or (batch, ROIs) = "
                             f"{(batch, self.n_rois)}")
        read = torch.zeros(batch, self.n_networks, device=roi_mask.device).index_add_(
            1, self.assignment_index.to(roi_mask.device), roi_mask.float())
        missing = read == 0
        return missing if bool(missing.any()) else None

    def token_padding(self, roi_mask: torch.Tensor | None, batch: int, n_patches: int) -> torch.Tensor | None:
        """``(B, N * P)`` bool, True for the network tokens of missing networks (:meth:`missing_networks`),
        in :meth:`forward`'s token order (without the CLS); None when nothing is missing."""
        missing = self.missing_networks(roi_mask, batch)
        if missing is None:
            return None
        return missing[:, :, None].expand(batch, self.n_networks, n_patches).reshape(batch, -1)

    def compile_regions(self) -> list[nn.Module]:
        """What ``trainer.compile=true`` compiles: the whole encoder (SimDINO's student calls
        ``forward``; tokenizer and transformer trace into one graph without breaks)."""
        return [self]

    def n_patches(self, n_trs: int) -> int:
        """Temporal patches (tokens per network) of a window of ``n_trs`` TRs.

        Raises:
            ValueError: the window is shorter than one patch.
        """
        p = int(n_trs) // self.patch_size
        if p < 1:
            raise ValueError(
                f"a window of {n_trs} TRs is shorter than one temporal patch (model.patch_size={self.patch_size} TRs); "
                "use longer windows or a smaller patch"
            )
        return p

    def tokenize(self, bold: torch.Tensor) -> torch.Tensor:
        """Network tokens before the transformer: ``(B, T, V)`` -> ``(B, N, P, d)``."""
        if bold.ndim != 3 or bold.shape[-1] != self.n_rois:
            raise ValueError(
                f"input {tuple(bold.shape)} must be (batch, TRs, {self.n_rois} ROIs); the parcellation (and ROI "
                "order) must match the one the model was built for"
            )
        b, t, _ = bold.shape
        p, n, d, length = self.n_patches(t), self.n_networks, self.d_model, self.patch_size
        # all networks in one grouped convolution: each network's ROIs padded to the largest
        # network with a zero channel, its two branches folded into one kernel (effective_conv)
        before, after = self._span()
        vmax = max(self.network_sizes)
        effective = [tok.effective_conv(before, after) for tok in self.tokenizers]
        weight = torch.cat([F.pad(w, (0, 0, 0, vmax - w.shape[1])) for w, _ in effective])
        bias = torch.cat([bb for _, bb in effective])
        x = F.pad(bold[:, : p * length], (0, 1)).index_select(2, self.padded_order)  # (B, P*L, N*vmax)
        x = x.reshape(b, p, length, n * vmax).permute(0, 1, 3, 2).reshape(b * p, n * vmax, length)
        y = checkpointed(_conv_gelu_mean, x, weight, bias, before, after, n,
                         enabled=self.use_checkpoint and self.training).reshape(b, p, n, d)
        y = F.layer_norm(y, (d,), eps=self.tokenizers[0].norm.eps)
        scale = torch.stack([tok.norm.weight for tok in self.tokenizers])
        shift = torch.stack([tok.norm.bias for tok in self.tokenizers])
        return (y * scale + shift).permute(0, 2, 1, 3)

    def _span(self) -> tuple[int, int]:
        spans = [tok.span() for tok in self.tokenizers]
        return max(s[0] for s in spans), max(s[1] for s in spans)

    def tokenize_per_network(self, bold: torch.Tensor) -> torch.Tensor:
        """:meth:`tokenize` one network at a time through :meth:`NetworkTokenizer.forward` (the
        reference's formulation; slower, kept to check the fused path)."""
        b, t, _ = bold.shape
        p = self.n_patches(t)
        x = bold[:, : p * self.patch_size].reshape(b, p, self.patch_size, self.n_rois).permute(0, 1, 3, 2)
        tokens = []
        for k, tok in enumerate(self.tokenizers):
            rois = [i for i, a in enumerate(self.network_assignment) if a == k]
            xs = x[:, :, rois].reshape(b * p, len(rois), self.patch_size)
            tokens.append(tok(xs).reshape(b, p, self.d_model))
        return torch.stack(tokens, dim=1)

    def encode(self, tokens: torch.Tensor, mask: torch.Tensor | None = None,
               missing: torch.Tensor | None = None) -> torch.Tensor:
        """Mask, add network and time embeddings, prepend CLS, run the transformer:
        ``(B, N, P, d)`` -> ``(B, 1 + N * P, d)``. ``missing`` ``(B, N)`` bool: networks whose tokens are
        MASK tokens and, with ``missing_tokens="pad"``, key-padded (:meth:`missing_networks`)."""
        b, n, p, d = tokens.shape
        if mask is not None:
            if mask.shape != (b, n, p):
                raise ValueError(f"mask {tuple(mask.shape)} must be (batch, networks, patches) = {(b, n, p)}")
            tokens = torch.where(mask[..., None], self.mask_token.to(tokens.dtype), tokens)
        padding = None
        if missing is not None:
            tokens = torch.where(missing[:, :, None, None], self.mask_token.to(tokens.dtype), tokens)
            if self.missing_tokens == "pad":
                cls = torch.zeros(b, 1, dtype=torch.bool, device=tokens.device)
                padding = torch.cat([cls, missing[:, :, None].expand(b, n, p).reshape(b, n * p)], dim=1)
        time = sincos_embedding(torch.arange(p, device=tokens.device), d).to(tokens.dtype)
        x = tokens + self.network_embedding.weight[None, :, None, :] + time[None, None, :, :]
        x = torch.cat([self.cls_token.expand(b, 1, d).to(x.dtype), x.reshape(b, n * p, d)], dim=1)
        if padding is None:
            return self.encoder(self.drop(x))
        return self.encoder(self.drop(x), key_padding_mask=padding)

    def forward(self, bold: torch.Tensor, mask: torch.Tensor | None = None,
                roi_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.encode(self.tokenize(bold), mask, self.missing_networks(roi_mask, bold.shape[0]))


# -- the reference's weights ----------------------------------------------------------------------
#: prefixes of the two encoders in a whole ``SimDINOModel`` state (``model_state_dict`` of the
#: reference's ``checkpoint_epoch_<n>.pth``; keys as the fixture's ``keys_full_simdino.txt``)
SIMDINO_ENCODERS = ("teacher_encoder.", "student_encoder.")


def _chosen_atlas(groups: dict[str, dict[str, torch.Tensor]]) -> str:
    """The reference builds one tokenizer set per atlas name but runs only ``atlas_names[0]``'s; the
    one whose long-convolution kernel norm was initialised (a first forward ran) is that one."""
    used = [a for a, g in groups.items() if any(k.endswith("kernel_norm_initialized") and bool(v) for k, v in g.items())]
    if len(used) == 1:
        return used[0]
    if "schaefer400" in groups:
        return "schaefer400"
    if len(groups) == 1:
        return next(iter(groups))

    raise CheckpointError(f"cannot tell which of the tokenizer sets {sorted(groups)} the reference ran (its "
                          "atlas_names[0]); none has kernel_norm_initialized set")


def _long_conv_norm(kernels: list[torch.Tensor], multiplier: torch.Tensor) -> torch.Tensor:
    """The reference's ``SLConv`` kernel norm ``(H, V, 1)`` from its sub-kernels ``(H, V, k)`` and decay
    ``multiplier`` ``(1, V, 1)`` (what its first forward pass stores)."""
    s = len(kernels)
    parts = [k.repeat_interleave(2 ** max(0, i - 1), dim=-1) * multiplier ** (s - 1 - i) for i, k in enumerate(kernels)]
    return torch.cat(parts, dim=-1).norm(dim=-1, keepdim=True)


def semantoks_checkpoint_filter(state: dict[str, torch.Tensor], encoder: str = "teacher",
                                ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Brain-Semantoks weights (SamGijsen/Brain-Semantoks: ``model/semantoks.py`` ``CNN_TF``,
    ``model/tokenizer.py``) -> a :class:`SemantoksEncoder` state dict, ``(encoder_state, left_out)``.

    ``state`` is either a ``CNN_TF`` state dict (``network_tokenizers.*``, ``inter_network_transformer.*``,
    ``norm.*``) or a whole ``SimDINOModel`` state (``student_encoder.*``, ``teacher_encoder.*`` and the
    heads, e.g. the released checkpoint's ``model_state_dict``; a ``module.`` prefix from DDP is
    dropped); ``encoder`` picks ``teacher`` (the reference's probe features) or ``student``. The
    model that loads the result needs ``qkv_bias=false`` and the reference's sizes
    (:func:`semantoks_model_config` reads them off the state), and its network map must be the
    reference's (``schaefer400_7n_tian3_buckner7``: the tokenizers are matched by network index).

    Mapping: tokenizer ``network_tokenizers.<atlas>.<k>`` -> ``tokenizers.<k>``: ``branches.0`` (the
    dense Conv1d) -> ``conv``; the ``sgconv`` branch's ``slconv.kernel_list.<i>`` ``(H, V, k)`` ->
    ``long_conv.sub_kernels.<i>`` ``(V * H, k)`` (channel-major, as the reference's
    ``(h c)`` rearrangement), ``slconv.D`` ``(H, V)`` -> ``long_conv.skip`` ``(V * H,)``,
    ``slconv.kernel_norm`` -> ``long_conv.kernel_norm`` (the norm frozen at the reference's first forward;
    computed from the kernels when that never ran), ``projection`` -> ``long_proj``; transformer
    ``transformer_blocks.<i>`` -> ``encoder.blocks.<i>`` (``mlp.3`` -> ``mlp.2``, ``ls1/ls2.gamma`` ->
    ``gamma1/gamma2``); ``mask_embedding``, ``cls_token``, ``network_learnable_pos_embedding`` ->
    ``mask_token``, ``cls_token``, ``network_embedding``; the final ``norm`` -> ``encoder.norm``. Left
    out: the other encoder and the heads, the tokenizer copies of the other atlases (never run),
    ``inter_network_transformer.norm`` (never run), the sine-cosine buffer (recomputed; checked equal),
    the decay ``multiplier`` buffers (checked constant: ``model.long_conv_decay``) and
    ``kernel_norm_initialized``.

    Raises:
        CheckpointError: neither layout; an unknown key; a tokenizer this model cannot express
            (depthwise-separable or dilated dense branch, branches in another order, per-ROI decay);
            a time-embedding buffer that is not the sine-cosine table.
    """
    if encoder not in ("teacher", "student"):
        raise CheckpointError(f"encoder={encoder!r} must be 'teacher' or 'student'")
    state = {k.removeprefix("module."): v for k, v in state.items()}
    left_out: dict[str, torch.Tensor] = {}
    if any(k.startswith(SIMDINO_ENCODERS) for k in state):
        prefix = f"{encoder}_encoder."
        if not any(k.startswith(prefix) for k in state):
            raise CheckpointError(f"no {prefix!r} keys in a SimDINO state (keys: {sorted(state)[:4]} ...)")
        left_out.update({k: v for k, v in state.items() if not k.startswith(prefix)})
        state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    if not any(k.startswith("network_tokenizers.") for k in state):
        raise CheckpointError("not a Brain-Semantoks CNN_TF/SimDINOModel state: no 'network_tokenizers.' keys "
                              f"(keys: {sorted(state)[:4]} ...)")
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for k, v in state.items():
        if k.startswith("network_tokenizers."):
            atlas, rest = k[len("network_tokenizers."):].split(".", 1)
            groups.setdefault(atlas, {})[rest] = v
    atlas = _chosen_atlas(groups)
    for other, g in groups.items():
        if other != atlas:
            left_out.update({f"network_tokenizers.{other}.{r}": v for r, v in g.items()})
    out: dict[str, torch.Tensor] = {}
    tok = groups[atlas]
    networks = sorted({int(r.split(".", 1)[0]) for r in tok})
    decays = set()
    for n in networks:
        g = {r.split(".", 1)[1]: v for r, v in tok.items() if r.split(".", 1)[0] == str(n)}
        where = f"network_tokenizers.{atlas}.{n}"
        kinds = []
        for b in sorted({int(r.split(".")[1]) for r in g if r.startswith("branches.")}):
            kinds.append("long" if any(r.startswith(f"branches.{b}.slconv.") for r in g) else "dense")
        if kinds not in (["dense", "long"], ["dense"], ["long"]) or any(".depthwise." in r for r in g):
            raise CheckpointError(f"{where}: tokenizer branches {kinds} (or a depthwise-separable dense branch) cannot "
                                  "be expressed by SemantoksEncoder (one dense Conv1d, then one sgconv branch)")
        dst = f"tokenizers.{n}"
        for b, kind in enumerate(kinds):
            src = f"branches.{b}"
            if kind == "dense":
                out[f"{dst}.conv.weight"], out[f"{dst}.conv.bias"] = g.pop(f"{src}.weight"), g.pop(f"{src}.bias")
                continue
            kernels = [g.pop(f"{src}.slconv.kernel_list.{i}") for i in range(sum(
                r.startswith(f"{src}.slconv.kernel_list.") for r in g))]
            heads, rois = kernels[0].shape[:2]
            mult = g.pop(f"{src}.slconv.multiplier")
            if not torch.allclose(mult, mult.flatten()[0]):
                raise CheckpointError(f"{where}: per-ROI decay multipliers (decay_min != decay_max) are not supported")
            decays.add(round(float(mult.flatten()[0]), 6))
            initialised = g.pop(f"{src}.slconv.kernel_norm_initialized", torch.tensor(True))
            norm = g.pop(f"{src}.slconv.kernel_norm")
            if not bool(initialised):
                norm = _long_conv_norm(kernels, mult)
            for i, k in enumerate(kernels):
                out[f"{dst}.long_conv.sub_kernels.{i}"] = k.permute(1, 0, 2).reshape(rois * heads, -1)
            out[f"{dst}.long_conv.skip"] = g.pop(f"{src}.slconv.D").T.reshape(-1)
            out[f"{dst}.long_conv.kernel_norm"] = norm.permute(1, 0, 2).reshape(rois * heads, 1)
            out[f"{dst}.long_proj.weight"] = g.pop(f"{src}.projection.weight")
            out[f"{dst}.long_proj.bias"] = g.pop(f"{src}.projection.bias")
        for r in ("norm.weight", "norm.bias"):
            if r in g:
                out[f"{dst}.{r}"] = g.pop(r)
        if g:
            raise CheckpointError(f"{where}: unexpected keys {sorted(g)}")
    if len(decays) > 1:
        raise CheckpointError(f"networks use different long-convolution decays {sorted(decays)}; not supported")
    t = "inter_network_transformer."
    fixed = {f"{t}mask_embedding": "mask_token", f"{t}cls_token": "cls_token",
             f"{t}network_learnable_pos_embedding.weight": "network_embedding.weight",
             "norm.weight": "encoder.norm.weight", "norm.bias": "encoder.norm.bias"}
    block = {"norm1.weight": "norm1.weight", "norm1.bias": "norm1.bias", "norm2.weight": "norm2.weight",
             "norm2.bias": "norm2.bias", "attn.qkv.weight": "attn.qkv.weight", "attn.qkv.bias": "attn.qkv.bias",
             "attn.proj.weight": "attn.proj.weight", "attn.proj.bias": "attn.proj.bias",
             "mlp.0.weight": "mlp.0.weight", "mlp.0.bias": "mlp.0.bias", "mlp.3.weight": "mlp.2.weight",
             "mlp.3.bias": "mlp.2.bias", "ls1.gamma": "gamma1", "ls2.gamma": "gamma2"}
    unknown = []
    for k, v in state.items():
        if k.startswith("network_tokenizers."):
            continue
        if k in fixed:
            out[fixed[k]] = v.reshape(-1) if fixed[k] in ("mask_token", "cls_token") else v
        elif k.startswith(f"{t}transformer_blocks."):
            i, rest = k[len(f"{t}transformer_blocks."):].split(".", 1)
            if rest not in block:
                unknown.append(k)
                continue
            out[f"encoder.blocks.{i}.{block[rest]}"] = v
        elif k == f"{t}temporal_pos_embedding":
            p, d = v.shape
            if not torch.allclose(v.float(), sincos_embedding(torch.arange(p), d), atol=1e-5):
                raise CheckpointError(f"{k} is not the sine-cosine table SemantoksEncoder computes")
            left_out[k] = v
        elif k.startswith((f"{t}norm.", "head.")):
            left_out[k] = v
        else:
            unknown.append(k)
    if unknown:
        raise CheckpointError(f"unexpected Brain-Semantoks keys {unknown[:6]}{' ...' if len(unknown) > 6 else ''}")
    if decays:  # the decay is a model option, not a tensor: recorded with what is left out
        left_out["long_conv_decay"] = torch.tensor(min(decays))
    return out, left_out


def semantoks_model_config(state: dict[str, torch.Tensor]) -> dict:
    """The ``model`` options a :func:`semantoks_checkpoint_filter` output needs (``conv_channels``,
    ``long_conv_channels``, ``conv_kernel``, ``long_conv_kernel``, ``long_conv_scales``, ``depth``,
    ``mlp_ratio``, ``layer_scale`` (True when present: its value is in the weights), ``qkv_bias``,
    ``n_rois``, network sizes), read off the converted state. Not in the weights: ``patch_size``
    (reference 20 TRs), ``n_heads`` (reference ``d / 64``) and ``long_conv_decay`` (the filter's
    ``left_out["long_conv_decay"]``)."""
    tok = sorted({int(k.split(".")[1]) for k in state if k.startswith("tokenizers.")})
    sizes = []
    cfg: dict = {"conv_channels": 0, "long_conv_channels": 0}
    for n in tok:
        p = f"tokenizers.{n}."
        if f"{p}conv.weight" in state:
            w = state[f"{p}conv.weight"]
            cfg["conv_channels"], cfg["conv_kernel"] = int(w.shape[0]), int(w.shape[2])
            sizes.append(int(w.shape[1]))
        if f"{p}long_proj.weight" in state:
            cfg["long_conv_channels"] = int(state[f"{p}long_proj.weight"].shape[0])
            cfg["long_conv_kernel"] = int(state[f"{p}long_conv.sub_kernels.0"].shape[1])
            cfg["long_conv_scales"] = sum(k.startswith(f"{p}long_conv.sub_kernels.") for k in state)
            if len(sizes) < len(tok[: tok.index(n) + 1]):  # no dense branch: V from V * ceil(C / V) = V * H
                vh, c = int(state[f"{p}long_conv.skip"].numel()), cfg["long_conv_channels"]
                sizes.append(next(v for v in range(1, vh + 1) if v * -(-c // v) == vh))
    depth = len({k.split(".")[2] for k in state if k.startswith("encoder.blocks.")})
    d = cfg["conv_channels"] + cfg["long_conv_channels"]
    return {**cfg, "depth": depth, "n_heads": max(1, d // 64), "n_rois": sum(sizes), "network_sizes": sizes,
            "mlp_ratio": float(state["encoder.blocks.0.mlp.0.weight"].shape[0]) / d if depth else 4.0,
            "layer_scale": "encoder.blocks.0.gamma1" in state, "qkv_bias": "encoder.blocks.0.attn.qkv.bias" in state}
