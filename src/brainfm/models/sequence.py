"""Transformer backbone over parcellated BOLD sequences: the GPT (causal) and BERT (bidirectional)
models of Thomas, Ré & Poldrack (2022), athms/learning-from-brains.

Differences from the reference, on purpose:

- pre-LayerNorm blocks on ``F.scaled_dot_product_attention`` instead of Hugging Face GPT-2/BERT
  (post-LN BERT); same widths, depths, heads and learned absolute positions;
- the MASK/CLS/SEP tokens live in embedding space (the reference puts them in input space),
  so the backbone is independent of the parcellation's size;
- the CLS token is the first token and BERT pools it there (the reference appends CLS at the end
  of the sequence but pools position 0).
"""

from __future__ import annotations

import torch
from torch import nn

from brainfm.models.backbone import Backbone
from brainfm.models.embedding import TREmbedding
from brainfm.models.transformer import TransformerEncoder


class SequenceTransformer(nn.Module, Backbone):
    """Embed TRs, add learned positions (and segments), run a transformer encoder.

    Args:
        n_rois: ROIs per TR.
        d_model, depth, n_heads, mlp_ratio: transformer size (paper: 768, 4, 12, 4).
        dropout, attn_dropout: residual/embedding and attention dropout (paper: 0.1).
        causal: causal self-attention (GPT) or bidirectional (BERT).
        max_positions: longest token sequence (specials included).
        n_segments: number of segment (token type) embeddings; 0 disables them.
        t_max_s, t_resolution_s: time embedding range and bin width, seconds.
        use_checkpoint: activation checkpointing of every transformer block (training only; see
            :class:`~brainfm.models.transformer.TransformerEncoder`).

    Shapes: :meth:`forward` ``bold`` ``(B, T, n_rois)``, ``t`` ``(B, T)`` s -> ``(B, T, d_model)``.
    """

    def __init__(
        self,
        n_rois: int,
        d_model: int = 128,
        depth: int = 2,
        n_heads: int = 4,
        mlp_ratio: float = 4.0,
        dropout: float = 0.1,
        attn_dropout: float = 0.1,
        causal: bool = False,
        max_positions: int = 512,
        n_segments: int = 0,
        t_max_s: float = 300.0,
        t_resolution_s: float = 0.2,
        use_checkpoint: bool = False,
    ) -> None:
        super().__init__()
        self.n_rois = int(n_rois)
        self.d_model = int(d_model)
        self.causal = bool(causal)
        self.max_positions = int(max_positions)
        self.embedding = TREmbedding(n_rois, d_model, t_max_s, t_resolution_s)
        self.position = nn.Embedding(self.max_positions, d_model)
        self.segment = nn.Embedding(n_segments, d_model) if n_segments else None
        self.mask_token = nn.Parameter(torch.zeros(d_model))
        self.cls_token = nn.Parameter(torch.zeros(d_model))
        self.sep_token = nn.Parameter(torch.zeros(d_model))
        self.drop = nn.Dropout(dropout)
        self.encoder = TransformerEncoder(d_model, depth, n_heads, mlp_ratio, dropout, attn_dropout,
                                          use_checkpoint=use_checkpoint)
        self.apply(self._init_weights)
        for p in (self.mask_token, self.cls_token, self.sep_token):
            nn.init.normal_(p, std=0.02)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, std=0.02)

    @property
    def out_dim(self) -> int:
        return self.d_model

    # -- the backbone contract (brainfm.models.backbone) --------------------------------------------------
    time_in_seconds = True  # TREmbedding: any TR

    @property
    def token_dim(self) -> int:
        return self.d_model

    def features(self, bold: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Windows ``(B, T, n_rois)``, ``t`` ``(B, T)`` s -> hidden states per TR ``(B, T, d_model)``
        (no special tokens)."""
        return self(bold, t)

    def embed_inputs(self, bold: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.embed_trs(bold, t)

    def pool_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """TR tokens ``(B, T, d_model)`` -> the mean of the encoded states ``(B, d_model)``."""
        return self.encode(tokens).mean(dim=1)

    def compile_regions(self) -> list[nn.Module]:
        """What ``trainer.compile=true`` compiles: every transformer block (regional compilation: the
        objectives enter through :meth:`embed_trs` / :meth:`encode`, not ``forward``, and identical
        blocks share one compiled graph). The TR embedding stays eager: its range check reads
        ``t.max()`` on the host, a graph break, and it is a small part of a step."""
        return list(self.encoder.blocks)

    def use_special_tokens(self, *names: str) -> None:
        """Keep only the special embeddings an objective uses trainable (``"mask"``, ``"cls"``,
        ``"sep"``, ``"segment"``); the others get ``requires_grad=False`` so that DDP does not wait
        for gradients that never come."""
        unknown = set(names) - {"mask", "cls", "sep", "segment"}
        if unknown:
            raise ValueError(f"unknown special tokens {sorted(unknown)}")
        params = {"mask": [self.mask_token], "cls": [self.cls_token], "sep": [self.sep_token],
                  "segment": list(self.segment.parameters()) if self.segment is not None else []}
        for name, ps in params.items():
            for p in ps:
                p.requires_grad_(name in names)

    def embed_trs(self, bold: torch.Tensor, t: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """TR tokens ``(B, T, d)``; where ``mask`` ``(B, T)`` is True the value embedding is
        replaced by the learned MASK token (the time embedding stays)."""
        x = self.embedding.embed_values(bold)
        if mask is not None:
            x = torch.where(mask[..., None], self.mask_token.to(x.dtype), x)
        return x + self.embedding.embed_time(t)

    def special(self, name: str, batch: int) -> torch.Tensor:
        """A CLS or SEP token for every sequence of the batch, ``(B, 1, d)``."""
        token = {"cls": self.cls_token, "sep": self.sep_token}[name]
        return token.expand(batch, 1, -1) + self.embedding.special_time(batch, token.device)

    def encode(self, tokens: torch.Tensor, segment_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Add positions (and segments) to ``tokens`` ``(B, N, d)`` and run the encoder."""
        n = tokens.shape[1]
        if n > self.max_positions:
            raise ValueError(f"{n} tokens exceed model.max_positions={self.max_positions}")
        x = tokens + self.position.weight[:n]
        if segment_ids is not None:
            if self.segment is None:
                raise ValueError("segment_ids given but the model has no segment embeddings (n_segments=0)")
            x = x + self.segment(segment_ids)
        return self.encoder(self.drop(x), causal=self.causal)

    def forward(self, bold: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.encode(self.embed_trs(bold, t))
