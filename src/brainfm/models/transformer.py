"""Pre-LayerNorm transformer encoder on ``F.scaled_dot_product_attention`` (fused kernels on GPU,
the efficient math path on CPU), with optional causal masking, LayerScale and activation
checkpointing of every block (``use_checkpoint``).

Options for loading foreign weights (defaults keep brainfm's own layout and checkpoints):
``activation`` (:data:`ACTIVATIONS`: ``"gelu"``, exact erf GELU; ``"gelu_tanh"``, the tanh
approximation that Hugging Face calls ``gelu_new``, used by GPT-2 and by Thomas et al.'s released
GPT/BERT), ``norm_layout`` (:data:`NORM_LAYOUTS`: ``"pre"``, GPT-2's ``x + f(LN(x))`` blocks and a
final LayerNorm; ``"post"``, BERT's ``LN(x + f(x))`` blocks and no final LayerNorm) and ``norm_eps``
(the LayerNorms' epsilon: 1e-5 in PyTorch and GPT-2, 1e-12 in BERT)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint


def checkpointed(fn, *args, enabled: bool):
    """``fn(*args)``; with ``enabled`` and gradients on, under activation checkpointing
    (``torch.utils.checkpoint``, non-reentrant: only ``args`` are kept for backward, ``fn`` runs again
    there with the RNG state of its first run, so dropout masks are the same). Backbones pass
    ``enabled=self.use_checkpoint and self.training`` (``model.use_checkpoint``, training only)."""
    if enabled and torch.is_grad_enabled():
        return checkpoint(fn, *args, use_reentrant=False)
    return fn(*args)


class SelfAttention(nn.Module):
    """Multi-head self-attention. ``x`` ``(B, N, d)`` -> ``(B, N, d)``.

    ``key_padding_mask`` ``(B, N)`` is True where a token must not be attended to.
    """

    def __init__(self, d_model: int, n_heads: int, attn_dropout: float = 0.0, dropout: float = 0.0, bias: bool = True) -> None:
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model={d_model} is not divisible by n_heads={n_heads}")
        self.n_heads = n_heads
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=bias)
        self.proj = nn.Linear(d_model, d_model, bias=bias)
        self.attn_dropout = attn_dropout
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, causal: bool = False, key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.n_heads, d // self.n_heads).permute(2, 0, 3, 1, 4)
        mask = None
        if key_padding_mask is not None:
            mask = ~key_padding_mask[:, None, None, :]
            if causal:
                mask = mask & torch.ones(n, n, dtype=torch.bool, device=x.device).tril()
                causal = False
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=self.attn_dropout if self.training else 0.0, is_causal=causal
        )
        return self.drop(self.proj(y.transpose(1, 2).reshape(b, n, d)))


#: ``model.activation`` -> the MLP's non-linearity (``"gelu_tanh"`` = Hugging Face ``gelu_new``:
#: ``0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))``, GPT-2 / Thomas et al.)
ACTIVATIONS = {"gelu": "none", "gelu_tanh": "tanh"}
#: ``model.norm_layout``: ``"pre"`` (pre-LN blocks + final LayerNorm) or ``"post"`` (post-LN, no final norm)
NORM_LAYOUTS = ("pre", "post")


def check_transformer_options(activation: str, norm_layout: str) -> None:
    """Raises ValueError for an ``activation`` not in :data:`ACTIVATIONS` or a ``norm_layout`` not in
    :data:`NORM_LAYOUTS`, naming the config key and the valid values."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"model.activation={activation!r} must be one of {sorted(ACTIVATIONS)}")
    if norm_layout not in NORM_LAYOUTS:
        raise ValueError(f"model.norm_layout={norm_layout!r} must be one of {list(NORM_LAYOUTS)}")


class MLP(nn.Sequential):
    """``Linear(d -> mlp_ratio d)``, GELU (``activation``: :data:`ACTIVATIONS`), ``Linear(-> d)``, dropout."""

    def __init__(self, d_model: int, mlp_ratio: float = 4.0, dropout: float = 0.0, activation: str = "gelu") -> None:
        check_transformer_options(activation, "pre")
        hidden = int(d_model * mlp_ratio)
        super().__init__(nn.Linear(d_model, hidden), nn.GELU(approximate=ACTIVATIONS[activation]),
                         nn.Linear(hidden, d_model), nn.Dropout(dropout))


class TransformerBlock(nn.Module):
    """``x + LS(attn(LN(x)))`` then ``x + LS(mlp(LN(x)))``; LayerScale (Touvron et al. 2021) when
    ``layer_scale`` is a number (its initial value). ``norm_layout="post"``: ``LN(x + LS(attn(x)))``
    then ``LN(x + LS(mlp(x)))`` (BERT, Devlin et al. 2019; ``norm1``/``norm2`` are then BERT's
    ``attention.output.LayerNorm``/``output.LayerNorm``). ``activation``, ``norm_eps``: see the module."""

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        mlp_ratio: float = 4.0,
        dropout: float = 0.0,
        attn_dropout: float = 0.0,
        layer_scale: float | None = None,
        activation: str = "gelu",
        norm_layout: str = "pre",
        norm_eps: float = 1e-5,
    ) -> None:
        super().__init__()
        check_transformer_options(activation, norm_layout)
        self.norm_first = norm_layout == "pre"
        self.norm1 = nn.LayerNorm(d_model, eps=norm_eps)
        self.attn = SelfAttention(d_model, n_heads, attn_dropout, dropout)
        self.norm2 = nn.LayerNorm(d_model, eps=norm_eps)
        self.mlp = MLP(d_model, mlp_ratio, dropout, activation)
        if layer_scale is not None:
            self.gamma1 = nn.Parameter(torch.full((d_model,), float(layer_scale)))
            self.gamma2 = nn.Parameter(torch.full((d_model,), float(layer_scale)))
        else:
            self.gamma1 = self.gamma2 = None

    def forward(self, x: torch.Tensor, causal: bool = False, key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        if not self.norm_first:
            a = self.attn(x, causal, key_padding_mask)
            x = self.norm1(x + (a if self.gamma1 is None else self.gamma1 * a))
            m = self.mlp(x)
            return self.norm2(x + (m if self.gamma2 is None else self.gamma2 * m))
        a = self.attn(self.norm1(x), causal, key_padding_mask)
        x = x + (a if self.gamma1 is None else self.gamma1 * a)
        m = self.mlp(self.norm2(x))
        return x + (m if self.gamma2 is None else self.gamma2 * m)


class TransformerEncoder(nn.Module):
    """A stack of :class:`TransformerBlock` and a final LayerNorm. ``(B, N, d)`` -> ``(B, N, d)``.

    ``use_checkpoint``: activation checkpointing of every block while training with gradients
    (``torch.utils.checkpoint``, non-reentrant; Chen et al. 2016): a block keeps only its input for
    backward and runs its forward again there, so activation memory is one ``(B, N, d)`` tensor per
    block plus one block's intermediates, for about one more forward pass of compute. The same
    numbers as without (dropout masks are replayed: the RNG state is restored for the recompute).

    ``activation``, ``norm_layout``, ``norm_eps``: see the module; with ``norm_layout="post"`` there
    is no final LayerNorm (``norm`` is an ``nn.Identity``, no state-dict keys), as in BERT.
    """

    def __init__(
        self,
        d_model: int,
        depth: int,
        n_heads: int,
        mlp_ratio: float = 4.0,
        dropout: float = 0.0,
        attn_dropout: float = 0.0,
        layer_scale: float | None = None,
        use_checkpoint: bool = False,
        activation: str = "gelu",
        norm_layout: str = "pre",
        norm_eps: float = 1e-5,
    ) -> None:
        super().__init__()
        check_transformer_options(activation, norm_layout)
        self.use_checkpoint = bool(use_checkpoint)
        self.blocks = nn.ModuleList(
            TransformerBlock(d_model, n_heads, mlp_ratio, dropout, attn_dropout, layer_scale, activation, norm_layout,
                             norm_eps)
            for _ in range(depth)
        )
        self.norm = nn.LayerNorm(d_model, eps=norm_eps) if norm_layout == "pre" else nn.Identity()

    def forward(self, x: torch.Tensor, causal: bool = False, key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        for block in self.blocks:
            x = checkpointed(block, x, causal, key_padding_mask, enabled=self.use_checkpoint and self.training)
        return self.norm(x)
