"""Swin4D: the 4-D shifted-window transformer of SwiFT (Kim et al., NeurIPS 2023,
Transconnectome/SwiFT ``swin4d_transformer_ver7.py``) and its SwiFT v2 descendants, as one module
whose versions are configurations (``conf/model/swin4d_v7.yaml`` ... ``swin4d_v11.yaml``).

Input ``(B, C, H, W, D, T)`` (SwiFT's layout: volume axes, then time); output
``(B, C_last, d, h, w, t)`` features of the last stage, and :meth:`SwinTransformer4D.pool` gives
the ``(B, C_last)`` embedding (mean over tokens, as SwiFT's heads).

Architecture (v7, checked against SwiFT's public code with the fixtures in ``tests``):
non-overlapping patches ``patch_size`` flattened in (x, y, z, t, channel) order -> Linear; four
stages of window-attention blocks; between stages a spatial 2x2x2 patch merging
(LayerNorm(8C) -> Linear(8C -> c_multiplier*C, no bias)); learned spatial ``(1,C,d,h,w,1)`` and
temporal ``(1,C,1,1,1,t)`` embeddings re-added before every stage. Windows shrink to the grid
(and stop shifting) along any axis not larger than the window; odd blocks shift by half a
window, time included. ``last_layer_full_MSA`` makes the last stage's spatial window the whole
grid. The state dict of v7 has SwiFT's key names, so SwiFT checkpoints load unchanged.

Options beyond v7 (SwiFT v2: u-SwiFT = v9, d-SwiFT = v11; v8 and v10 have no public code and are
brainfm's definitions, see the model configs):

- ``patch_size[3] > 1``: temporal patching; ``patch_norm``: LayerNorm after the patch embedding;
- ``attention="factorized"``: each block is temporal 1-D window attention, then 3-D spatial window
  attention, then the MLP, each a residual branch (v11). The public ver11 adds the MLP residual
  twice; here it is added once;
- ``ape``: ``"separable"`` (learned spatial + learned temporal, v7), ``"joint"`` (one learned
  ``(d,h,w,t)`` embedding), ``"sincos_time"`` (learned spatial + fixed sin-cos temporal),
  ``"none"``; ``rope``: rotary position embedding in every attention, 1-D over time and joint
  3-D over space (factorized), or 4-D (joint windows), base ``rope_theta``;
- ``layer_scale``: LayerScale initial values, ``(attn, mlp)`` or ``(attn_t, attn_s, mlp)``;
- ``attn_scale="mup"``: 1/head_dim attention scale (muP) instead of 1/sqrt(head_dim);
- ``use_checkpoint``: gradient checkpointing of every block.

Differences from SwiFT's code, on purpose: attention runs on ``F.scaled_dot_product_attention``
(or FlexAttention, ``attention_backend="flex"``) with masks computed once per shape and cached
(SwiFT: a manual softmax and a -100 additive mask rebuilt in every stage); the pad, cyclic shift and
window partition (and their inverses) are one token gather each way, planned once per shape
(:class:`WindowPlan`), so that a block is one graph for ``torch.compile``; zero-padded tokens (when a window does not divide the grid) are
masked out as keys (SwiFT lets them be attended to); dropout, attention dropout and drop-path have
separate rates (SwiFT's ``load_model`` ties all three to ``attn_drop_rate``); no CUDA-only calls.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from functools import lru_cache
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from brainfm.errors import CheckpointError
from brainfm.models.backbone import Backbone

Dims = tuple[int, int, int, int]


def effective_window(grid: Sequence[int], window: Sequence[int], shift: Sequence[int]) -> tuple[Dims, Dims]:
    """Clamp the window to the grid; no shift along an axis the window covers entirely."""
    win = tuple(min(g, w) for g, w in zip(grid, window))
    sh = tuple(0 if g <= w else s for g, w, s in zip(grid, window, shift))
    return win, sh


def window_partition(x: torch.Tensor, window: Dims) -> torch.Tensor:
    """``(B, D, H, W, T, C)`` -> ``(B * n_windows, prod(window), C)``; windows in (d, h, w, t) order."""
    b, d, h, w, t, c = x.shape
    wd, wh, ww, wt = window
    x = x.view(b, d // wd, wd, h // wh, wh, w // ww, ww, t // wt, wt, c)
    return x.permute(0, 1, 3, 5, 7, 2, 4, 6, 8, 9).reshape(-1, wd * wh * ww * wt, c)


def window_merge(windows: torch.Tensor, window: Dims, dims: Sequence[int]) -> torch.Tensor:
    """Inverse of :func:`window_partition`: ``(B * n_windows, N, C)`` -> ``(B, D, H, W, T, C)``."""
    b, d, h, w, t = dims
    wd, wh, ww, wt = window
    x = windows.view(b, d // wd, h // wh, w // ww, t // wt, wd, wh, ww, wt, -1)
    return x.permute(0, 1, 5, 2, 6, 3, 7, 4, 8, 9).reshape(b, d, h, w, t, -1)


class _TakeTokens(torch.autograd.Function):
    """``x[:, index]`` of ``x`` ``(B, L, C)`` (with ``pad``, a zero token appended that ``index == L``
    reads), whose gradient is the gather ``grad[:, back]`` (``back``: where each of the ``L`` tokens went;
    ``pad_back``: the same zero token for positions that came from padding). Both directions are one
    row gather; torch's ``index_select`` backward would be a scatter-add."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, index: torch.Tensor, back: torch.Tensor, pad: bool, pad_back: bool) -> torch.Tensor:
        ctx.save_for_backward(back)
        ctx.pad_back = pad_back
        return (F.pad(x, (0, 0, 0, 1)) if pad else x).index_select(1, index)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (back,) = ctx.saved_tensors
        return (F.pad(grad, (0, 0, 0, 1)) if ctx.pad_back else grad).index_select(1, back), None, None, None, None


@lru_cache(maxsize=64)
def _window_plan(real: Dims, window: Dims, shift: Dims, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, Dims]:
    """The token permutation of a (shifted) window attention: ``(to_windows (P,), to_grid (L,), padded)``.

    ``to_windows[p]`` is the grid token (index into the ``L = prod(real)`` tokens of ``(D, H, W, T)``,
    or ``L`` for a zero pad token) at window-major position ``p`` of the padded grid rolled by
    ``-shift``; ``to_grid[l]`` is the window-major position of grid token ``l``. One gather replaces
    the pad, the cyclic shift (a copy per rolled axis), the window partition and their inverses.
    """
    cpu = torch.device("cpu")  # built on the CPU whatever the default device (the meta device included)
    padded = tuple(n + (w - n % w) % w for n, w in zip(real, window))
    coords = torch.meshgrid(*[(torch.arange(p, device=cpu) + s) % p for p, s in zip(padded, shift)], indexing="ij")
    inside = torch.ones(padded, dtype=torch.bool, device=cpu)
    for c, r in zip(coords, real):
        inside &= c < r
    flat = ((coords[0] * real[1] + coords[1]) * real[2] + coords[2]) * real[3] + coords[3]
    n_real = math.prod(real)
    flat = torch.where(inside, flat, torch.full_like(flat, n_real))
    to_windows = window_partition(flat[None, ..., None], window).reshape(-1)
    # every real token sits at exactly one position; the pad slots all write entry n_real, which is dropped
    # (a scatter, not boolean indexing: no data-dependent shapes, so it also runs on fake tensors)
    positions = torch.arange(len(to_windows), device=cpu)
    to_grid = torch.zeros(n_real + 1, dtype=torch.long, device=cpu).scatter_(0, to_windows, positions)[:n_real]
    return to_windows.to(device), to_grid.to(device), padded


def _window_regions(padded: Dims, real: Dims, window: Dims, shift: Dims) -> tuple[torch.Tensor, torch.Tensor]:
    """``(region (n_windows, N) long, valid (n_windows, N) bool)`` of every window token: the region of the
    rolled grid it comes from (tokens of different regions of a shifted window must not attend to each
    other: the classic Swin mask) and whether it is a real token (not zero padding)."""
    cpu = torch.device("cpu")  # built on the CPU whatever the default device
    region = torch.zeros(padded, dtype=torch.long, device=cpu)
    if any(shift):
        cnt = 0
        bounds = [
            ((0, p - w), (p - w, p - s), (p - s, p)) if s else ((0, p),)
            for p, w, s in zip(padded, window, shift)
        ]
        for sl in itertools.product(*bounds):
            region[tuple(slice(a, b) for a, b in sl)] = cnt
            cnt += 1
    valid = torch.ones(padded, dtype=torch.bool, device=cpu)
    for axis, (p, r) in enumerate(zip(padded, real)):
        if p > r:
            idx = [slice(None)] * 4
            idx[axis] = slice(r, p)
            valid[tuple(idx)] = False
    if any(shift):  # the regions above are laid out in the rolled frame already; padding is not
        valid = torch.roll(valid, [-s for s in shift], dims=(0, 1, 2, 3))
    rw = window_partition(region[None, ..., None], window)[..., 0]  # (nW, N)
    vw = window_partition(valid[None, ..., None].long(), window)[..., 0].bool()
    return rw, vw


@lru_cache(maxsize=64)
def _attention_mask(padded: Dims, real: Dims, window: Dims, shift: Dims, device: torch.device) -> torch.Tensor | None:
    """Boolean ``(n_windows, 1, N, N)``: True where a query may attend to a key (same region, real key);
    the diagonal is always allowed, so no row is empty. ``None`` when nothing is masked."""
    if not any(shift) and padded == real:
        return None
    rw, vw = _window_regions(padded, real, window, shift)
    allowed = (rw[:, :, None] == rw[:, None, :]) & vw[:, None, :]
    allowed |= torch.eye(allowed.shape[-1], dtype=torch.bool, device=rw.device)
    return allowed[:, None].to(device)


@lru_cache(maxsize=64)
def _additive_mask(padded: Dims, real: Dims, window: Dims, shift: Dims, device: torch.device,
                   dtype: torch.dtype) -> torch.Tensor | None:
    """:func:`_attention_mask` as the additive ``(n_windows, 1, N, N)`` mask SDPA adds to the scores
    (0 where allowed, -inf elsewhere) in the compute dtype: SDPA converts a boolean mask to this form
    in every call (a quarter of the attention time of a masked block on the CPU)."""
    allowed = _attention_mask(padded, real, window, shift, torch.device("cpu"))
    if allowed is None:
        return None
    return torch.zeros(allowed.shape, dtype=dtype).masked_fill_(~allowed, float("-inf")).to(device)


@lru_cache(maxsize=64)
def _flex_block_mask(padded: Dims, real: Dims, window: Dims, shift: Dims, batch: int, device: torch.device):
    """The :func:`_attention_mask` of ``batch`` images as a FlexAttention ``BlockMask`` over the
    ``batch * n_windows`` windows (window ``i`` of image ``b`` is batch entry ``b * n_windows + i``), built
    from the regions without an ``N x N`` mask per window; None when nothing is masked."""
    if not any(shift) and padded == real:
        return None
    from torch.nn.attention.flex_attention import create_block_mask

    rw, vw = (a.to(device) for a in _window_regions(padded, real, window, shift))
    n_windows, n = rw.shape

    def mask_mod(b, h, q, kv):
        w = b % n_windows
        return ((rw[w, q] == rw[w, kv]) & vw[w, kv]) | (q == kv)

    return create_block_mask(mask_mod, B=batch * n_windows, H=None, Q_LEN=n, KV_LEN=n, device=device)


def _flex_attention(q, k, v, block_mask, scale):
    """FlexAttention, compiled on accelerators (its fused kernel); on the CPU (torch 2.13: forward only)
    the reference implementation, whose "called without torch.compile" notice is expected there."""
    import warnings

    from torch.nn.attention.flex_attention import flex_attention

    if q.device.type == "cpu":
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*flex_attention called without torch.compile.*")
            return flex_attention(q, k, v, block_mask=block_mask, scale=scale)
    global _COMPILED_FLEX
    if _COMPILED_FLEX is None:
        _COMPILED_FLEX = torch.compile(flex_attention, dynamic=False)
    return _COMPILED_FLEX(q, k, v, block_mask=block_mask, scale=scale)


_COMPILED_FLEX = None
ATTENTION_BACKENDS = ("sdpa", "flex")


@lru_cache(maxsize=64)
def _rope_tables(padded: Dims, window: Dims, shift: Dims, axes: tuple[int, ...], head_dim: int, theta: float,
                 device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin ``(n_windows, 1, N, head_dim // 2)`` of each window token.

    Channel pairs are dealt to the ``axes`` round-robin (pair ``k`` -> axis ``k mod n``) and rotate
    by the token's grid coordinate along their axis times ``theta ** (-j / m)`` (``j``-th of ``m``
    pairs of that axis), as axial RoPE (Heo et al. 2024, "Rotary position embedding for vision
    transformer"). A head with fewer pairs than axes (e.g. head_dim 6 for 4-D RoPE) deals the
    remaining axes on: such a pair rotates by the sum of its axes' coordinates.
    """
    pairs = head_dim // 2
    n = len(axes)
    assign = torch.zeros(pairs, 4, dtype=torch.float64)
    for k in range(max(pairs, n)):
        assign[k % pairs, axes[k % n]] = 1.0
    m = -(-pairs // n)
    freqs = theta ** (-torch.tensor([k // n for k in range(pairs)], dtype=torch.float64) / m)
    coords = torch.stack(torch.meshgrid(*[torch.arange(p, dtype=torch.float64) for p in padded], indexing="ij"), -1)
    if any(shift):
        coords = torch.roll(coords, [-s for s in shift], dims=(0, 1, 2, 3))
    cw = window_partition(coords[None], window)  # (nW, N, 4)
    angles = (cw @ assign.T) * freqs
    return angles.cos()[:, None].to(device, dtype), angles.sin()[:, None].to(device, dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate channel pairs ``(x_i, x_{i + d/2})`` of ``x`` ``(B*nW, heads, N, d)`` by the angles."""
    b = x.shape[0] // cos.shape[0]
    x = x.view(b, cos.shape[0], *x.shape[1:])
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half : 2 * half]
    out = torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos, x[..., 2 * half :]], dim=-1)
    return out.view(-1, *out.shape[2:])


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype ``q`` will have: autocast's on its device when enabled, else ``x``'s."""
    kind = x.device.type
    if kind in ("cpu", "cuda", "xpu", "mps") and torch.is_autocast_enabled(kind):
        return torch.get_autocast_dtype(kind)
    return x.dtype


class WindowPlan(NamedTuple):
    """What a window attention needs besides the tokens, fixed by the grid shape: built once per
    shape (cached) in eager code and passed into the blocks, so that a compiled block sees only
    tensors and constants (no cache lookups, no data-dependent indexing to trace).

    ``window``: window ``(wd, wh, ww, wt)`` in tokens; ``pad``: the grid is zero-padded to whole
    windows; ``to_windows (P,)`` / ``to_grid (L,)``: the token gathers of :func:`_window_plan`;
    ``mask``: SDPA: the additive ``(n_windows, 1, N, N)`` mask (None: nothing masked); flex: the
    ``BlockMask`` of the batch (None: nothing masked); ``rope``: cos/sin ``(n_windows, 1, N, head_dim/2)``
    or None.
    """

    window: Dims
    pad: bool
    to_windows: torch.Tensor
    to_grid: torch.Tensor
    mask: Any
    rope: tuple[torch.Tensor, torch.Tensor] | None


class WindowAttention4D(nn.Module):
    """Multi-head self-attention inside windows of a ``(B, D, H, W, T, C)`` token grid.

    ``window``/``shift`` have one entry per axis (d, h, w, t); a window of 1 along an axis makes
    attention factorised (e.g. ``(1, 1, 1, wT)``: temporal attention at every voxel).
    Parameter names (``qkv``, ``proj``) are SwiFT's.
    """

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, attn_drop: float = 0.0, proj_drop: float = 0.0,
                 scale: str = "sqrt", rope_axes: tuple[int, ...] = (), rope_theta: float = 1e4,
                 backend: str = "sdpa") -> None:
        super().__init__()
        if backend not in ATTENTION_BACKENDS:
            raise ValueError(f"attention_backend={backend!r} must be one of {ATTENTION_BACKENDS}")
        if backend == "flex" and attn_drop > 0:
            raise ValueError("attention_backend=flex has no attention dropout: set attn_drop_rate=0 or use sdpa")
        self.backend = backend
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.attn_drop = attn_drop
        self.proj_drop = nn.Dropout(proj_drop)
        if scale not in ("sqrt", "mup"):
            raise ValueError(f"attn_scale={scale!r} must be 'sqrt' or 'mup'")
        self.scale = self.head_dim ** -0.5 if scale == "sqrt" else 1.0 / self.head_dim
        self.rope_axes = tuple(rope_axes)
        self.rope_theta = float(rope_theta)
        if self.rope_axes and self.head_dim < 2:
            raise ValueError(f"head_dim {self.head_dim} is too small for RoPE")

    def plan(self, x: torch.Tensor, window: Dims, shift: Dims) -> WindowPlan:
        """The :class:`WindowPlan` of ``x`` ``(B, D, H, W, T, C)`` for this attention (cached per shape,
        device and compute dtype; built eagerly, outside any compiled region)."""
        b, d, h, w, t, _ = x.shape
        real = (d, h, w, t)
        to_windows, to_grid, padded = _window_plan(real, window, shift, x.device)
        dtype = _compute_dtype(x)
        rope = (_rope_tables(padded, window, shift, self.rope_axes, self.head_dim, self.rope_theta, x.device, dtype)
                if self.rope_axes else None)
        if self.backend == "flex":
            mask = _flex_block_mask(padded, real, window, shift, b, x.device)
        else:
            mask = _additive_mask(padded, real, window, shift, x.device, dtype)
        return WindowPlan(tuple(window), padded != real, to_windows, to_grid, mask, rope)

    def forward(self, x: torch.Tensor, plan: WindowPlan) -> torch.Tensor:
        """``(B, D, H, W, T, C)`` -> ``(B, D, H, W, T, C)`` with the windows of ``plan`` (:meth:`plan`)."""
        b, d, h, w, t, c = x.shape
        # pad, roll by -shift and partition in one gather (and back after the attention)
        windows = _TakeTokens.apply(x.reshape(b, -1, c), plan.to_windows, plan.to_grid, plan.pad, False)
        windows = windows.view(-1, math.prod(plan.window), c)
        bw, n, _ = windows.shape
        q, k, v = self.qkv(windows).view(bw, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        if plan.rope is not None:
            q, k = apply_rope(q, *plan.rope), apply_rope(k, *plan.rope)
        if self.backend == "flex":
            if q.device.type == "cpu" and torch.is_grad_enabled() and q.requires_grad:
                raise RuntimeError("attention_backend=flex has no backward on the CPU (torch 2.13): train on a GPU, "
                                   "or set model.attention_backend=sdpa")
            y = _flex_attention(q, k, v, plan.mask, self.scale)
        else:
            mask = plan.mask
            if mask is not None and b > 1:  # (nW, 1, N, N) -> (B * nW, 1, N, N)
                mask = mask.expand(b, *mask.shape).reshape(-1, *mask.shape[1:])
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=self.attn_drop if self.training else 0.0,
                                               scale=self.scale)
        y = self.proj_drop(self.proj(y.transpose(1, 2).reshape(bw, n, c)))
        y = _TakeTokens.apply(y.view(b, -1, c), plan.to_grid, plan.to_windows, False, plan.pad)
        return y.view(b, d, h, w, t, c)


class Mlp(nn.Module):
    """``linear1 -> GELU -> dropout -> linear2 -> dropout`` (key names of MONAI's MLPBlock in SwiFT)."""

    def __init__(self, dim: int, hidden: int, drop: float = 0.0) -> None:
        super().__init__()
        self.linear1 = nn.Linear(dim, hidden)
        self.linear2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.linear2(self.drop(F.gelu(self.linear1(x)))))


class DropPath(nn.Module):
    """Stochastic depth (per sample)."""

    def __init__(self, p: float = 0.0) -> None:
        super().__init__()
        self.p = float(p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        keep = torch.empty((x.shape[0],) + (1,) * (x.ndim - 1), device=x.device, dtype=x.dtype).bernoulli_(1 - self.p)
        return x * keep / (1 - self.p)


def _scale(dim: int, value: float | None) -> nn.Parameter | None:
    return None if value is None else nn.Parameter(torch.full((dim,), float(value)))


class SwinBlock4D(nn.Module):
    """Joint 4-D window attention block (v7-v10): ``x + attn(norm1(x))``, ``x + mlp(norm2(x))``."""

    def __init__(self, dim: int, num_heads: int, window: Dims, shift: Dims, mlp_ratio: float, qkv_bias: bool, drop: float,
                 attn_drop: float, drop_path: float, scale: str, rope: bool, rope_theta: float,
                 layer_scale: Sequence[float] | None, backend: str = "sdpa") -> None:
        super().__init__()
        self.window, self.shift = tuple(window), tuple(shift)
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention4D(dim, num_heads, qkv_bias, attn_drop, drop, scale, (0, 1, 2, 3) if rope else (),
                                      rope_theta, backend)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop)
        self.drop_path = DropPath(drop_path)
        ls = layer_scale or (None, None)
        self.gamma_attn, self.gamma_mlp = _scale(dim, ls[0]), _scale(dim, ls[-1])

    def _branch(self, y: torch.Tensor, gamma: nn.Parameter | None) -> torch.Tensor:
        return self.drop_path(y if gamma is None else gamma * y)

    def plans(self, x: torch.Tensor) -> tuple[WindowPlan]:
        """The window plan of ``x`` ``(B, D, H, W, T, C)`` (:meth:`WindowAttention4D.plan`)."""
        return (self.attn.plan(x, *effective_window(x.shape[1:5], self.window, self.shift)),)

    def forward(self, x: torch.Tensor, plans: tuple[WindowPlan] | None = None) -> torch.Tensor:
        """``(B, D, H, W, T, C)`` -> same; ``plans`` from :meth:`plans` (built here when None)."""
        (plan,) = plans if plans is not None else self.plans(x)
        x = x + self._branch(self.attn(self.norm1(x), plan), self.gamma_attn)
        return x + self._branch(self.mlp(self.norm2(x)), self.gamma_mlp)


class FactorizedSwinBlock4D(nn.Module):
    """d-SwiFT block (v11): temporal 1-D window attention, then 3-D spatial window attention,
    then the MLP, each its own residual with LayerScale (once each; the public ver11 adds the MLP
    residual twice)."""

    def __init__(self, dim: int, num_heads: int, window: Dims, shift: Dims, mlp_ratio: float, qkv_bias: bool, drop: float,
                 attn_drop: float, drop_path: float, scale: str, rope: bool, rope_theta: float,
                 layer_scale: Sequence[float] | None, backend: str = "sdpa") -> None:
        super().__init__()
        self.window, self.shift = tuple(window), tuple(shift)
        self.norm_t = nn.LayerNorm(dim)
        self.attn_t = WindowAttention4D(dim, num_heads, qkv_bias, attn_drop, drop, scale, (3,) if rope else (), rope_theta,
                                        backend)
        self.norm_s = nn.LayerNorm(dim)
        self.attn_s = WindowAttention4D(dim, num_heads, qkv_bias, attn_drop, drop, scale, (0, 1, 2) if rope else (),
                                        rope_theta, backend)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop)
        self.drop_path = DropPath(drop_path)
        ls = layer_scale or (None, None, None)
        if len(ls) != 3:
            raise ValueError(f"factorized blocks take three LayerScale values (attn_t, attn_s, mlp), got {ls}")
        self.gamma_t, self.gamma_s, self.gamma_mlp = (_scale(dim, v) for v in ls)

    def _branch(self, y: torch.Tensor, gamma: nn.Parameter | None) -> torch.Tensor:
        return self.drop_path(y if gamma is None else gamma * y)

    def plans(self, x: torch.Tensor) -> tuple[WindowPlan, WindowPlan]:
        """The temporal and the spatial window plans of ``x`` ``(B, D, H, W, T, C)``."""
        grid = x.shape[1:5]
        wd, wh, ww, wt = self.window
        sd, sh, sw, st = self.shift
        return (self.attn_t.plan(x, *effective_window(grid, (1, 1, 1, wt), (0, 0, 0, st))),
                self.attn_s.plan(x, *effective_window(grid, (wd, wh, ww, 1), (sd, sh, sw, 0))))

    def forward(self, x: torch.Tensor, plans: tuple[WindowPlan, WindowPlan] | None = None) -> torch.Tensor:
        """``(B, D, H, W, T, C)`` -> same; ``plans`` from :meth:`plans` (built here when None)."""
        plan_t, plan_s = plans if plans is not None else self.plans(x)
        x = x + self._branch(self.attn_t(self.norm_t(x), plan_t), self.gamma_t)
        x = x + self._branch(self.attn_s(self.norm_s(x), plan_s), self.gamma_s)
        return x + self._branch(self.mlp(self.norm2(x)), self.gamma_mlp)


class PatchMerging(nn.Module):
    """Spatial 2x2x2 merging of ``(B, D, H, W, T, C)``: LayerNorm(8C) -> Linear(8C -> m*C, no bias).
    Neighbours are concatenated in SwiFT's order (``itertools.product`` over d, h, w offsets)."""

    def __init__(self, dim: int, c_multiplier: int = 2) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(8 * dim)
        self.reduction = nn.Linear(8 * dim, c_multiplier * dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        d, h, w = x.shape[1:4]
        if d % 2 or h % 2 or w % 2:
            raise ValueError(f"patch merging needs an even spatial grid, got {(d, h, w)}; choose img_size so that "
                             "img_size / patch_size is divisible by 2**(stages - 1)")
        b, _, _, _, t, c = x.shape
        # the 8 neighbours in SwiFT's channel order (itertools.product over the d, h, w offsets), as one
        # view + permute: one copy forward and backward, instead of 8 strided slices and a concatenation
        x = x.view(b, d // 2, 2, h // 2, 2, w // 2, 2, t, c).permute(0, 1, 3, 5, 7, 2, 4, 6, 8)
        return self.reduction(self.norm(x.reshape(b, d // 2, h // 2, w // 2, t, 8 * c)))


class Stage(nn.Module):
    """Blocks of one resolution, then optional patch merging. Keys: ``blocks.*``, ``downsample.*``."""

    def __init__(self, blocks: list[nn.Module], downsample: nn.Module | None, use_checkpoint: bool) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.downsample = downsample
        self.use_checkpoint = use_checkpoint

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        plans = _block_plans(self.blocks, x)
        for blk, plan in zip(self.blocks, plans):
            if self.use_checkpoint and self.training and torch.is_grad_enabled():
                x = checkpoint(blk, x, plan, use_reentrant=False)
            else:
                x = blk(x, plan)
        return self.downsample(x) if self.downsample is not None else x


@torch.compiler.disable
def _block_plans(blocks: Sequence[nn.Module], x: torch.Tensor) -> list[tuple[WindowPlan, ...]]:
    """Every block's window plans for ``x``, looked up eagerly: under ``torch.compile`` of a whole stage this
    is its one graph break (compiled blocks, brainfm's compile regions, receive the plans as inputs)."""
    return [blk.plans(x) for blk in blocks]


def sincos_1d(n: int, dim: int) -> torch.Tensor:
    """Fixed sinusoidal embedding ``(n, dim)`` (Vaswani et al. 2017)."""
    pos = torch.arange(n, dtype=torch.float64)[:, None]
    i = torch.arange(dim // 2, dtype=torch.float64)[None]
    ang = pos / (10000 ** (2 * i / dim))
    out = torch.zeros(n, dim, dtype=torch.float64)
    out[:, 0 : 2 * (dim // 2) : 2] = ang.sin()
    out[:, 1 : 2 * (dim // 2) : 2] = ang.cos()
    return out.float()


class PositionalEmbedding(nn.Module):
    """Absolute position embedding of one stage, added to ``(B, D, H, W, T, C)``.

    ``separable``: learned ``pos_embed (1, C, d, h, w, 1)`` + learned ``time_embed (1, C, 1, 1, 1, t)``
    (SwiFT's parameters and key names); ``joint``: learned ``pos_embed (1, C, d, h, w, t)``;
    ``sincos_time``: learned spatial + fixed sinusoidal temporal (a buffer, not learned).
    """

    def __init__(self, kind: str, dim: int, grid: Dims) -> None:
        super().__init__()
        d, h, w, t = grid
        self.kind = kind
        if kind == "joint":
            self.pos_embed = nn.Parameter(torch.zeros(1, dim, d, h, w, t))
        else:
            self.pos_embed = nn.Parameter(torch.zeros(1, dim, d, h, w, 1))
        if kind == "separable":
            self.time_embed = nn.Parameter(torch.zeros(1, dim, 1, 1, 1, t))
        elif kind == "sincos_time":
            self.register_buffer("time_embed", sincos_1d(t, dim).T.reshape(1, dim, 1, 1, 1, t), persistent=False)
        for p in self.parameters():
            nn.init.trunc_normal_(p, std=0.02, a=-2.0, b=2.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = x.shape[4]
        x = x + self.pos_embed[..., :t].permute(0, 2, 3, 4, 5, 1)
        if self.kind in ("separable", "sincos_time"):
            x = x + self.time_embed[..., :t].permute(0, 2, 3, 4, 5, 1)
        return x


class PatchEmbed(nn.Module):
    """Non-overlapping 4-D patches -> Linear (``fc``), optional LayerNorm (``norm``).

    ``(B, C, H, W, D, T)`` -> ``(B, d, h, w, t, E)``; features flattened in (x, y, z, t, channel)
    order as SwiFT's ``PatchEmbed.proj``."""

    def __init__(self, img_size: Dims, patch_size: Dims, in_chans: int, embed_dim: int, norm: bool) -> None:
        super().__init__()
        for s, p in zip(img_size, patch_size):
            if s % p:
                raise ValueError(f"img_size {tuple(img_size)} is not divisible by patch_size {tuple(patch_size)}")
        self.img_size, self.patch_size = tuple(img_size), tuple(patch_size)
        self.grid_size = tuple(s // p for s, p in zip(img_size, patch_size))
        self.fc = nn.Linear(in_chans * math.prod(patch_size), embed_dim)
        self.norm = nn.LayerNorm(embed_dim) if norm else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, *size = x.shape
        if tuple(size[:3]) != self.img_size[:3] or size[3] % self.patch_size[3]:
            raise ValueError(f"input volume {tuple(size)} does not match the model's img_size {self.img_size} "
                             f"(time must be a multiple of {self.patch_size[3]})")
        gh, gw, gd = self.grid_size[:3]
        sh, sw, sd, st = self.patch_size
        x = x.view(b, c, gh, sh, gw, sw, gd, sd, -1, st)
        x = x.permute(0, 2, 4, 6, 8, 3, 5, 7, 9, 1).reshape(b, gh, gw, gd, -1, sh * sw * sd * st * c)
        return self.norm(self.fc(x))


class SwinTransformer4D(nn.Module, Backbone):
    """One Swin4D for every SwiFT version (see the module docstring).

    Args:
        img_size: ``(H, W, D, T)`` of the input (SwiFT default 96, 96, 96, 20).
        in_chans: input channels.
        embed_dim: channels of stage 1 (doubles with every merge for ``c_multiplier=2``).
        depths, num_heads: blocks and heads per stage.
        window_size: window ``(wd, wh, ww, wt)`` in tokens for stages 2+; ``first_window_size`` for stage 1.
        patch_size: ``(pH, pW, pD, pT)`` voxels x TRs per token.
        mlp_ratio, qkv_bias, c_multiplier: as SwiFT.
        drop_rate, attn_drop_rate, drop_path_rate: dropout, attention dropout, stochastic depth (max).
        last_layer_full_MSA: the last stage attends over its whole spatial grid.
        attention: ``"joint"`` or ``"factorized"``.
        ape: ``"separable"``, ``"joint"``, ``"sincos_time"`` or ``"none"``.
        rope, rope_theta: rotary position embedding in every attention.
        layer_scale: LayerScale init values or ``None``.
        patch_norm: LayerNorm after the patch embedding.
        attn_scale: ``"sqrt"`` or ``"mup"``.
        use_checkpoint: gradient checkpointing of every block (training only).
        attention_backend: ``sdpa`` (``F.scaled_dot_product_attention`` with an additive ``(n_windows, 1, N, N)``
            mask per shifted or padded stage, expanded over the batch in each step) or ``flex``
            (``torch.nn.attention.flex_attention`` with a block mask built from the window regions: the
            fused kernel on GPUs, no dense masks; compiled on first use; no attention dropout; forward
            only on the CPU in torch 2.13).

    Raises:
        ValueError: sizes that do not divide, unknown option values.
    """

    def __init__(
        self,
        img_size: Sequence[int] = (96, 96, 96, 20),
        in_chans: int = 1,
        embed_dim: int = 24,
        depths: Sequence[int] = (2, 2, 6, 2),
        num_heads: Sequence[int] = (3, 6, 12, 24),
        window_size: Sequence[int] = (4, 4, 4, 4),
        first_window_size: Sequence[int] | None = (2, 2, 2, 2),
        patch_size: Sequence[int] = (6, 6, 6, 1),
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        c_multiplier: int = 2,
        drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        last_layer_full_MSA: bool = False,
        attention: str = "joint",
        ape: str = "separable",
        rope: bool = False,
        rope_theta: float = 1e4,
        layer_scale: Sequence[float] | None = None,
        patch_norm: bool = False,
        attn_scale: str = "sqrt",
        use_checkpoint: bool = False,
        attention_backend: str = "sdpa",
    ) -> None:
        super().__init__()
        if attention not in ("joint", "factorized"):
            raise ValueError(f"attention={attention!r} must be 'joint' or 'factorized'")
        if ape not in ("separable", "joint", "sincos_time", "none"):
            raise ValueError(f"ape={ape!r} must be 'separable', 'joint', 'sincos_time' or 'none'")
        if len(depths) != len(num_heads):
            raise ValueError(f"depths {list(depths)} and num_heads {list(num_heads)} differ in length")
        self.img_size = tuple(int(v) for v in img_size)
        self.patch_size = tuple(int(v) for v in patch_size)
        self.in_chans = int(in_chans)
        self.embed_dim = int(embed_dim)
        self.num_layers = len(depths)
        self.patch_embed = PatchEmbed(self.img_size, self.patch_size, in_chans, embed_dim, patch_norm)
        self.grid_size = self.patch_embed.grid_size
        self.pos_drop = nn.Dropout(drop_rate)
        spatial_div = 2 ** (self.num_layers - 1)
        if any(g % spatial_div for g in self.grid_size[:3]):
            raise ValueError(f"token grid {self.grid_size[:3]} must be divisible by {spatial_div} for "
                             f"{self.num_layers} stages; pick img_size accordingly")
        n_blocks = sum(depths)  # stochastic depth grows linearly with depth (no tensor: meta-device safe)
        dpr = [drop_path_rate * i / max(n_blocks - 1, 1) for i in range(n_blocks)]
        block_cls = SwinBlock4D if attention == "joint" else FactorizedSwinBlock4D
        self.pos_embeds = nn.ModuleList()
        self.layers = nn.ModuleList()
        dim = int(embed_dim)
        grid = self.grid_size
        for i, depth in enumerate(depths):
            if ape != "none":
                self.pos_embeds.append(PositionalEmbedding(ape, dim, grid))
            window = tuple(first_window_size if (i == 0 and first_window_size is not None) else window_size)
            full = last_layer_full_MSA and i == self.num_layers - 1
            if full:  # the whole spatial grid, time window unchanged, never shifted
                window = (grid[0], grid[1], grid[2], window[3])
            shift = tuple(w // 2 for w in window)
            blocks = [
                block_cls(dim, num_heads[i], window, (0, 0, 0, 0) if (j % 2 == 0 or full) else shift, mlp_ratio, qkv_bias,
                          drop_rate, attn_drop_rate, dpr[sum(depths[:i]) + j], attn_scale, rope, rope_theta, layer_scale,
                          attention_backend)
                for j in range(depth)
            ]
            last = i == self.num_layers - 1
            self.layers.append(Stage(blocks, None if last else PatchMerging(dim, c_multiplier), use_checkpoint))
            if not last:
                dim *= c_multiplier
                grid = (grid[0] // 2, grid[1] // 2, grid[2] // 2, grid[3])
        self.num_features = dim
        # SwiFT keeps a final LayerNorm that its forward never uses (the heads pool without it); it
        # stays for checkpoint compatibility, frozen so that DDP does not wait for its gradient.
        self.norm = nn.LayerNorm(dim)
        self.norm.requires_grad_(False)

    @property
    def out_dim(self) -> int:
        return self.num_features

    def fsdp_units(self) -> list[nn.Module]:
        """FSDP2's sharding units under ``trainer=fsdp``, and the regions ``trainer.compile=true`` compiles:
        every window-attention block of every stage (:class:`SwinBlock4D` / :class:`FactorizedSwinBlock4D`)."""
        return [blk for layer in self.layers for blk in layer.blocks]

    def embed_patches(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C, H, W, D, T)`` -> tokens ``(B, d, h, w, t, E)``."""
        weight = self.patch_embed.fc.weight
        return self.patch_embed(x if x.dtype == weight.dtype else x.to(weight.dtype))  # e.g. fp16 clips from the store

    def forward_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """Tokens ``(B, d, h, w, t, E)`` -> last-stage features ``(B, C_last, d', h', w', t)``."""
        x = self.pos_drop(tokens)
        for i, layer in enumerate(self.layers):
            if len(self.pos_embeds):
                x = self.pos_embeds[i](x)
            x = layer(x)
        return x.permute(0, 5, 1, 2, 3, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_tokens(self.embed_patches(x))

    @staticmethod
    def pool(features: torch.Tensor) -> torch.Tensor:
        """``(B, C, d, h, w, t)`` -> ``(B, C)``: mean over all tokens (SwiFT's heads)."""
        return features.flatten(2).mean(dim=2)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self(x))

    # -- the backbone contract (brainfm.models.backbone) --------------------------------------------------
    input_keys = ("volume",)

    @property
    def token_dim(self) -> int:
        return self.embed_dim

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Clips ``(B, C, X, Y, Z, T)`` -> last-stage tokens ``(B, d' h' w' t', C_last)``."""
        return self(x).flatten(2).transpose(1, 2)

    def pooled(self, x: torch.Tensor) -> torch.Tensor:
        """Clips -> ``(B, C_last)``: the mean over all last-stage tokens (SwiFT's heads)."""
        return self.embed(x)

    def embed_inputs(self, x: torch.Tensor) -> torch.Tensor:
        """Clips -> patch tokens ``(B, d, h, w, t, embed_dim)`` (:meth:`embed_patches`)."""
        return self.embed_patches(x)

    def pool_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.pool(self.forward_tokens(tokens))


def swift_checkpoint_filter(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """A SwiFT Lightning ``state_dict`` -> ``(backbone, left_out)``: its ``model.*`` entries are the
    ver7 ``SwinTransformer4D`` whose key names this module keeps, so they load unchanged (prefix
    removed); the heads (``output_head.*``, ``emb_mlp.*``) are left out.

    Raises:
        CheckpointError: no ``model.``-prefixed key.
    """
    backbone = {k[len("model."):]: v for k, v in state.items() if k.startswith("model.")}
    if not backbone:
        raise CheckpointError(f"no 'model.'-prefixed keys: not a SwiFT Lightning checkpoint? keys: {sorted(state)[:5]}")
    return backbone, {k: v for k, v in state.items() if not k.startswith("model.")}

