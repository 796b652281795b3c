"""Small heads shared by the objectives."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from brainfm.errors import ConfigError


class ReconstructionHead(nn.Linear):
    """Token state ``(..., d)`` -> BOLD of every ROI ``(..., n_rois)``."""

    def __init__(self, d_model: int, n_rois: int) -> None:
        super().__init__(d_model, n_rois)


class BinaryHead(nn.Sequential):
    """Pooled state ``(B, d)`` -> one logit ``(B, 1)``: ``Linear -> tanh -> Linear`` (BERT's
    pooler followed by the next-sentence classifier)."""

    def __init__(self, d_model: int) -> None:
        super().__init__(nn.Linear(d_model, d_model), nn.Tanh(), nn.Linear(d_model, 1))


class ProjectionHead(nn.Sequential):
    """The projection head of the embedding objectives: an MLP of ``n_layers`` Linear layers
    ``in_dim -> hidden_dim -> ... -> out_dim``, with ``norm`` (optional) and ``activation`` after every
    hidden layer, then optionally L2 normalization. ``(..., in_dim) -> (..., out_dim)``.

    - SimCLR's head (Chen et al. 2020; ``task=contrastive``): 2 layers, ``norm`` a BatchNorm
      (the task passes its global-batch ``GlobalBatchNorm1d``), ReLU, PyTorch's default initialisation:
      ``Linear -> BatchNorm -> ReLU -> Linear``.
    - SimDINO's head (DINOHead without the prototype layer; Wu et al. 2025; ``task=simdino``): 2 layers,
      hidden 1024, out 128, GELU, no norm, truncated-normal weights (std 0.02) with zero biases, and
      ``l2_normalize``.

    State-dict keys are the layers' indices (``0.weight``, ``1.running_mean``, ``3.weight`` for SimCLR's;
    ``0.weight``, ``2.weight`` for SimDINO's). SimDINO checkpoints written before the two heads became one
    named them ``mlp.<index>.*``; :meth:`_load_from_state_dict` reads those names too.

    Args:
        in_dim: input width. out_dim: output width.
        hidden_dim: width of the hidden layers (default ``in_dim``).
        n_layers: Linear layers (>= 1; 1: a single Linear, no norm or activation).
        norm: factory of the layer after each hidden Linear (called with its width), or None.
        activation: ``relu`` or ``gelu``.
        init_std: truncated-normal std of the Linear weights, biases zero; None: PyTorch's default.
        l2_normalize: divide each output by its L2 norm.

    Raises:
        ConfigError: ``n_layers < 1`` or an unknown ``activation``.
    """

    ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU}

    def __init__(self, in_dim: int, out_dim: int, hidden_dim: int | None = None, n_layers: int = 2,
                 norm: Callable[[int], nn.Module] | None = None, activation: str = "relu",
                 init_std: float | None = None, l2_normalize: bool = False) -> None:
        if n_layers < 1:
            raise ConfigError(f"task.head.n_layers={n_layers} must be >= 1")
        if activation not in self.ACTIVATIONS:
            raise ConfigError(f"projection head activation={activation!r} must be one of {sorted(self.ACTIVATIONS)}")
        h = int(hidden_dim or in_dim)
        dims = [int(in_dim)] + [h] * (n_layers - 1) + [int(out_dim)]
        layers: list[nn.Module] = []
        for k in range(n_layers):
            layers.append(nn.Linear(dims[k], dims[k + 1]))
            if k < n_layers - 1:
                if norm is not None:
                    layers.append(norm(dims[k + 1]))
                layers.append(self.ACTIVATIONS[activation]())
        super().__init__(*layers)
        self.l2_normalize = bool(l2_normalize)
        if init_std is not None:
            for m in self:
                if isinstance(m, nn.Linear):
                    nn.init.trunc_normal_(m.weight, std=float(init_std))
                    nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = super().forward(x)
        return F.normalize(x, dim=-1) if self.l2_normalize else x

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs) -> None:
        # SimDINO's head before it was this class: its layers under ``mlp.`` (``head.mlp.0.weight``)
        legacy = prefix + "mlp."
        for key in [k for k in state_dict if k.startswith(legacy)]:
            state_dict[prefix + key[len(legacy):]] = state_dict.pop(key)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)


# -- classification heads on frozen embeddings (protocol=probe) ----------------------------------------------
# The three heads of Brainmarks' probe protocol (MedARC, brainmarks 0.1.1 ``classifiers.py``, after CAPI,
# facebookresearch/capi ``eval_classification.py``): the same layers, initialisation and pooling, written here.
# Every head takes embeddings ``(B, L, D)`` (``cls``: L = 1) or ``(B, D)`` and returns logits ``(B, C)``.
class LinearProbeHead(nn.Module):
    """Tokens averaged over ``L``, then one linear layer: ``(B, L, D)`` or ``(B, D)`` -> ``(B, C)``.

    ``xavier_init``: Xavier-uniform weights (else truncated normal, std 0.02); bias zero. ``norm`` is accepted
    and, as in Brainmarks 0.1.1 (whose forward never applies the BatchNorm it builds), changes nothing.
    """

    def __init__(self, in_dim: int, out_dim: int, xavier_init: bool = False, norm: bool = False) -> None:
        super().__init__()
        self.linear = nn.Linear(in_dim, out_dim)
        if xavier_init:
            nn.init.xavier_uniform_(self.linear.weight)
        else:
            nn.init.trunc_normal_(self.linear.weight, std=0.02)
        nn.init.zeros_(self.linear.bias)

    def forward(self, x):
        return self.linear(x.mean(dim=1) if x.ndim == 3 else x)


class AttentionPoolHead(nn.Module):
    """One learned query attending over the tokens (multi-head, 64 channels a head), then a linear layer:
    ``(B, L, D)`` -> ``(B, C)``.

    The attention width is ``embed_dim`` (default ``in_dim``) rounded down to a multiple of 64.

    Raises:
        ValueError: a width under 64 (no head); fix: ``embed_dim >= 64``.
    """

    def __init__(self, in_dim: int, out_dim: int, embed_dim: int | None = None) -> None:
        super().__init__()
        width = 64 * (int(embed_dim or in_dim) // 64)
        if width == 0:
            raise ValueError(f"the attention-pooling head needs a width of at least 64 channels (one head); the "
                             f"embeddings have {in_dim} and embed_dim={embed_dim}. Fix: embed_dim=64")
        self.width, self.n_heads = width, width // 64
        self.query = nn.Parameter(torch.empty(width))
        self.kv = nn.Linear(in_dim, 2 * width)
        self.linear = nn.Linear(width, out_dim)
        for w in (self.query, self.kv.weight, self.linear.weight):
            nn.init.trunc_normal_(w, std=0.02)
        nn.init.zeros_(self.kv.bias)
        nn.init.zeros_(self.linear.bias)

    def forward(self, x):
        if x.ndim == 2:
            x = x[:, None]
        b, n, _ = x.shape
        h, d = self.n_heads, self.width // self.n_heads
        q = self.query.reshape(1, h, 1, d).expand(b, h, 1, d)
        k, v = self.kv(x).reshape(b, n, 2, h, d).permute(2, 0, 3, 1, 4)  # 2 x (B, heads, L, d)
        pooled = torch.nn.functional.scaled_dot_product_attention(q, k, v)  # (B, heads, 1, d)
        return self.linear(pooled.reshape(b, self.width))


class MLPProbeHead(nn.Module):
    """``Linear -> ReLU -> Dropout -> LayerNorm -> Linear`` on every token, logits averaged over ``L``:
    ``(B, L, D)`` or ``(B, D)`` -> ``(B, C)``; hidden width ``embed_dim`` (default ``in_dim``)."""

    def __init__(self, in_dim: int, out_dim: int, embed_dim: int | None = None, dropout: float = 0.0) -> None:
        super().__init__()
        width = int(embed_dim or in_dim)
        self.fc1 = nn.Linear(in_dim, width)
        self.act = nn.ReLU()
        self.drop = nn.Dropout(float(dropout))
        self.norm = nn.LayerNorm(width)
        self.fc2 = nn.Linear(width, out_dim)
        for layer in (self.fc1, self.fc2):
            nn.init.trunc_normal_(layer.weight, std=0.02)
            nn.init.zeros_(layer.bias)

    def forward(self, x):
        out = self.fc2(self.norm(self.drop(self.act(self.fc1(x)))))
        return out.mean(dim=1) if out.ndim == 3 else out


#: ``classifier=`` names of protocol=probe (Brainmarks' names)
PROBE_HEADS = {"linear": LinearProbeHead, "attn": AttentionPoolHead, "mlp": MLPProbeHead}
