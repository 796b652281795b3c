"""Transformer backbone over parcellated BOLD sequences: the GPT (causal) and BERT (bidirectional)
models of Thomas, Ré & Poldrack (2022), athms/learning-from-brains.

Differences from the reference, on purpose:

- pre-LayerNorm blocks on ``F.scaled_dot_product_attention`` instead of Hugging Face GPT-2/BERT
  (post-LN BERT); same widths, depths, heads and learned absolute positions. The reference's
  layouts are options: ``activation="gelu_tanh"`` (HF ``gelu_new``), ``norm_layout="post"`` (BERT's
  post-LN blocks, its embedding LayerNorm, no final norm), ``norm_eps`` (1e-12 in BERT);
- the MASK/CLS/SEP tokens live in embedding space (the reference puts them in input space),
  so the backbone is independent of the parcellation's size;
- the CLS token is the first token and BERT pools it there (the reference appends CLS at the end
  of the sequence but pools position 0, the first TR of the first half);
- AdamW's beta2 is 0.999 (``conf/task/*.yaml``; the reference's 0.9 was an accident).

Thomas et al.'s released GPT (CSM) and Sequence-BERT weights (``pytorch_model.bin``) load through
:func:`lfb_checkpoint_filter` (``brainfm-convert lfb <src> <dst>``), which also
says which model config they need (:func:`lfb_model_config`); the two corrected quirks above do not
change the weights: they load and reproduce the reference's outputs (tests/test_lfb_parity.py).
"""

from __future__ import annotations

import re

import torch
from torch import nn

from brainfm.errors import CheckpointError
from brainfm.models.backbone import TRTokenBackbone
from brainfm.models.embedding import TREmbedding
from brainfm.models.transformer import TransformerEncoder


class SequenceTransformer(nn.Module, TRTokenBackbone):
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
        activation: ``"gelu"`` (brainfm) or ``"gelu_tanh"`` (GPT-2's and the released weights'
            ``gelu_new``).
        norm_layout: ``"pre"`` (pre-LN blocks + final LayerNorm: brainfm, GPT-2) or ``"post"``
            (BERT: LayerNorm of the summed embeddings (``embed_norm``), post-LN blocks, no final norm).
        norm_eps: epsilon of the transformer's LayerNorms (1e-5; HF BERT: 1e-12).
        pooling: ``mean`` (of the TR states), ``cls`` (a CLS token before the TRs; Sequence-BERT's
            pooled state), ``correlation`` or ``covariance`` (a second-order readout of the TR states,
            :mod:`brainfm.models.pooling`).
        readout: the second-order readout's options (``model.readout``; e.g. ``include_input``,
            ``rank``, ``init``).

    Shapes: :meth:`forward` ``bold`` ``(B, T, n_rois)``, ``t`` ``(B, T)`` s -> ``(B, T, d_model)``.

    Raises:
        ValueError: an unknown ``activation`` or ``norm_layout``.
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
        activation: str = "gelu",
        norm_layout: str = "pre",
        norm_eps: float = 1e-5,
        pooling: str = "mean",
        readout: dict | None = None,
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
        # BERT's LayerNorm of token + position + segment embeddings (post-LN layout only)
        self.embed_norm = nn.LayerNorm(d_model, eps=norm_eps) if norm_layout == "post" else None
        self.drop = nn.Dropout(dropout)
        self.encoder = TransformerEncoder(d_model, depth, n_heads, mlp_ratio, dropout, attn_dropout,
                                          use_checkpoint=use_checkpoint, activation=activation,
                                          norm_layout=norm_layout, norm_eps=norm_eps)
        self.apply(self._init_weights)
        for p in (self.mask_token, self.cls_token, self.sep_token):
            nn.init.normal_(p, std=0.02)
        self.init_pooling(pooling, readout, self.d_model, self.n_rois)  # after _init_weights: the readout keeps its init

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
        return self.pooled_dim(self.d_model)

    # -- the backbone contract (brainfm.models.backbone) --------------------------------------------------
    any_tr = True  # TREmbedding: any TR
    poolings = ("mean", "cls", "correlation", "covariance")

    def pool_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """TR tokens ``(B, T, d_model)`` -> the pooled encoded states ``(B, out_dim)`` (``model.pooling``).

        Raises:
            ConfigError: a readout that reads the input BOLD (:attr:`token_dim` is None then).
        """
        if self.pooling == "cls":
            return self.encode(torch.cat([self.special("cls", tokens.shape[0]).to(tokens.dtype), tokens], dim=1))[:, 0]
        return super().pool_tokens(tokens)

    def pool_first_order(self, bold: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """``mean`` of the TR states, or the state of a CLS token put before the TRs (``cls``)."""
        return self.pool_tokens(self.embed_trs(bold, t))

    def compile_regions(self) -> list[nn.Module]:
        """What ``trainer.compile=true`` compiles: every transformer block (regional compilation: the
        objectives enter through :meth:`embed_trs` / :meth:`encode`, not ``forward``, and identical
        blocks share one compiled graph). The TR embedding stays eager: its range check reads
        ``t.max()`` on the host, a graph break, and it is a small part of a step."""
        return list(self.encoder.blocks)

    def fsdp_units(self) -> list[nn.Module]:
        """FSDP2's sharding units under ``trainer=fsdp``: every transformer block."""
        return list(self.encoder.blocks)

    def use_special_tokens(self, *names: str) -> None:
        """Keep only the special embeddings an objective uses trainable (``"mask"``, ``"cls"``,
        ``"sep"``, ``"segment"``); the others get ``requires_grad=False`` so that DDP does not wait
        for gradients that never come."""
        unknown = set(names) - {"mask", "cls", "sep", "segment"}
        if unknown:
            raise ValueError(f"unknown special tokens {sorted(unknown)}")
        if self.pooling == "cls":  # the pooled embedding is the CLS token's state
            names = (*names, "cls")
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

    def encode(self, tokens: torch.Tensor, segment_ids: torch.Tensor | None = None,
               key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Add positions (and segments ``(B, N)``) to ``tokens`` ``(B, N, d)`` and run the encoder;
        ``key_padding_mask`` ``(B, N)`` is True at padding tokens, which are not attended to (their
        own outputs are computed but meaningless)."""
        n = tokens.shape[1]
        if n > self.max_positions:
            raise ValueError(f"{n} tokens exceed model.max_positions={self.max_positions}")
        x = tokens + self.position.weight[:n]
        if segment_ids is not None:
            if self.segment is None:
                raise ValueError("segment_ids given but the model has no segment embeddings (n_segments=0)")
            x = x + self.segment(segment_ids)
        if self.embed_norm is not None:
            x = self.embed_norm(x)
        return self.encoder(self.drop(x), causal=self.causal, key_padding_mask=key_padding_mask)

    def forward(self, bold: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.encode(self.embed_trs(bold, t))


# -- Thomas et al.'s released weights (athms/learning-from-brains) ------------------------------------
# Reference key -> brainfm key, per layer ``{n}``; a ``T`` marks Hugging Face GPT-2's ``Conv1D``
# weights, stored ``(in, out)``: the transpose of ``nn.Linear``'s ``(out, in)``. Shape of
# torchtitan's ``StateDictAdapter.from_hf_map``.
_LFB_EMBEDDER = {
    "embedder.embed_model.model.0.weight": "model.embedding.proj.weight",
    "embedder.embed_model.model.0.bias": "model.embedding.proj.bias",
    "embedder.embed_model.model.1.weight": "model.embedding.norm.weight",
    "embedder.embed_model.model.1.bias": "model.embedding.norm.bias",
    "embedder.wt_re.weight": "model.embedding.time.weight",
    "unembedder.model.0.weight": "head.weight",  # the task's reconstruction head (ReconstructionHead)
    "unembedder.model.0.bias": "head.bias",
}
_LFB_GPT = {
    "decoder.transformer.wpe.weight": ("model.position.weight", False),
    "decoder.transformer.ln_f.weight": ("model.encoder.norm.weight", False),
    "decoder.transformer.ln_f.bias": ("model.encoder.norm.bias", False),
    "decoder.transformer.h.{n}.ln_1.weight": ("model.encoder.blocks.{n}.norm1.weight", False),
    "decoder.transformer.h.{n}.ln_1.bias": ("model.encoder.blocks.{n}.norm1.bias", False),
    "decoder.transformer.h.{n}.attn.c_attn.weight": ("model.encoder.blocks.{n}.attn.qkv.weight", True),
    "decoder.transformer.h.{n}.attn.c_attn.bias": ("model.encoder.blocks.{n}.attn.qkv.bias", False),
    "decoder.transformer.h.{n}.attn.c_proj.weight": ("model.encoder.blocks.{n}.attn.proj.weight", True),
    "decoder.transformer.h.{n}.attn.c_proj.bias": ("model.encoder.blocks.{n}.attn.proj.bias", False),
    "decoder.transformer.h.{n}.ln_2.weight": ("model.encoder.blocks.{n}.norm2.weight", False),
    "decoder.transformer.h.{n}.ln_2.bias": ("model.encoder.blocks.{n}.norm2.bias", False),
    "decoder.transformer.h.{n}.mlp.c_fc.weight": ("model.encoder.blocks.{n}.mlp.0.weight", True),
    "decoder.transformer.h.{n}.mlp.c_fc.bias": ("model.encoder.blocks.{n}.mlp.0.bias", False),
    "decoder.transformer.h.{n}.mlp.c_proj.weight": ("model.encoder.blocks.{n}.mlp.2.weight", True),
    "decoder.transformer.h.{n}.mlp.c_proj.bias": ("model.encoder.blocks.{n}.mlp.2.bias", False),
}
_LFB_BERT = {
    "decoder.transformer.embeddings.position_embeddings.weight": "model.position.weight",
    "decoder.transformer.embeddings.token_type_embeddings.weight": "model.segment.weight",
    "decoder.transformer.embeddings.LayerNorm.weight": "model.embed_norm.weight",
    "decoder.transformer.embeddings.LayerNorm.bias": "model.embed_norm.bias",
    "decoder.transformer.encoder.layer.{n}.attention.output.dense.weight": "model.encoder.blocks.{n}.attn.proj.weight",
    "decoder.transformer.encoder.layer.{n}.attention.output.dense.bias": "model.encoder.blocks.{n}.attn.proj.bias",
    "decoder.transformer.encoder.layer.{n}.attention.output.LayerNorm.weight": "model.encoder.blocks.{n}.norm1.weight",
    "decoder.transformer.encoder.layer.{n}.attention.output.LayerNorm.bias": "model.encoder.blocks.{n}.norm1.bias",
    "decoder.transformer.encoder.layer.{n}.intermediate.dense.weight": "model.encoder.blocks.{n}.mlp.0.weight",
    "decoder.transformer.encoder.layer.{n}.intermediate.dense.bias": "model.encoder.blocks.{n}.mlp.0.bias",
    "decoder.transformer.encoder.layer.{n}.output.dense.weight": "model.encoder.blocks.{n}.mlp.2.weight",
    "decoder.transformer.encoder.layer.{n}.output.dense.bias": "model.encoder.blocks.{n}.mlp.2.bias",
    "decoder.transformer.encoder.layer.{n}.output.LayerNorm.weight": "model.encoder.blocks.{n}.norm2.weight",
    "decoder.transformer.encoder.layer.{n}.output.LayerNorm.bias": "model.encoder.blocks.{n}.norm2.bias",
    # BERT's pooler (Linear, tanh) and is-next classifier: the task's BinaryHead (Linear, Tanh, Linear)
    "decoder.pooler_layer.0.weight": "nsp_head.0.weight",
    "decoder.pooler_layer.0.bias": "nsp_head.0.bias",
    "decoder.is_next_head.0.weight": "nsp_head.2.weight",
    "decoder.is_next_head.0.bias": "nsp_head.2.bias",
}
#: reference keys that are not carried over, with the reason (``{n}``: any layer)
LFB_DROPPED = {
    "decoder.transformer.wte.weight": "GPT-2's token embedding (vocab_size 1): unused with inputs_embeds",
    "decoder.transformer.h.{n}.attn.bias": "GPT-2's causal-mask buffer (brainfm: causal attention)",
    "decoder.transformer.h.{n}.attn.masked_bias": "GPT-2's mask-fill buffer (-1e4)",
    "decoder.transformer.embeddings.word_embeddings.weight":
        "BERT's token embedding (vocab_size 1): unused with inputs_embeds",
    "decoder.transformer.embeddings.position_ids": "BERT's arange buffer",
    "GPT:decoder.pooler_layer.0.weight": "the GPT's decoding-mode pooler: CSM does not use it",
    "GPT:decoder.pooler_layer.0.bias": "the GPT's decoding-mode pooler: CSM does not use it",
}
#: the reference's special tokens (input space, ``(.., n_rois)``) -> brainfm's (embedding space, ``(d,)``)
_LFB_SPECIALS = {"embedder.msk_embed": "model.mask_token", "embedder.cls_embed": "model.cls_token",
                 "embedder.sep_embed": "model.sep_token"}


_BERT_QKV = re.compile(r"\.attention\.self\.((?:query|key|value)\.(?:weight|bias))$")


def _lfb_family(state: dict[str, torch.Tensor]) -> str:
    if any(k.startswith("decoder.transformer.h.") for k in state):
        return "GPT"
    if any(k.startswith("decoder.transformer.encoder.layer.") for k in state):
        return "BERT"

    raise CheckpointError(
        "not a learning-from-brains GPT or BERT state dict (no 'decoder.transformer.h.*' or "
        f"'decoder.transformer.encoder.layer.*' keys; first keys: {sorted(state)[:5]}). Only their GPT (CSM) "
        "and BERT (Sequence-BERT) models convert; the LSTM autoencoder and linear baselines do not")


def _lfb_template(key: str) -> tuple[str, str | None]:
    """``decoder.transformer.h.3.ln_1.weight`` -> (``decoder.transformer.h.{n}.ln_1.weight``, "3")."""
    m = re.match(r"^(decoder\.transformer\.(?:h|encoder\.layer))\.(\d+)\.(.+)$", key)
    return (f"{m.group(1)}.{{n}}.{m.group(3)}", m.group(2)) if m else (key, None)


def lfb_checkpoint_filter(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Thomas et al.'s GPT (CSM) or Sequence-BERT ``Model.state_dict()`` (athms/learning-from-brains,
    ``results/models/upstream/<run>/model_final/pytorch_model.bin``; keys ``embedder.*``,
    ``decoder.transformer.*`` (Hugging Face GPT-2 / BERT), ``decoder.pooler_layer.*``,
    ``decoder.is_next_head.*``, ``unembedder.*``) -> ``(brainfm_state, left_out)``.

    ``brainfm_state`` holds a task's keys: ``model.*`` (a :class:`SequenceTransformer` built with
    :func:`lfb_model_config`), ``head.*`` (the unembedder: the task's ``ReconstructionHead``, d ->
    n_rois) and, for BERT, ``nsp_head.*`` (its pooler and is-next classifier: ``BinaryHead``).
    ``task.init_from`` and :func:`brainfm.checkpoints.load_backbone` read the ``model.*`` part.

    Mapping (the GPT/BERT family is read from the keys):

    - GPT-2's ``Conv1D`` weights ``(in, out)`` are transposed to ``nn.Linear``'s ``(out, in)``;
      ``c_attn`` holds ``[q | k | v]``, as brainfm's fused ``qkv``; BERT's ``query``/``key``/``value``
      are concatenated into it. BERT's post-LN ``attention.output.LayerNorm``/``output.LayerNorm`` are
      ``norm1``/``norm2`` of a ``norm_layout="post"`` block, its embedding LayerNorm ``embed_norm``.
    - ``embedder.embed_model`` (one hidden layer: Linear 1024 -> d + LayerNorm) is brainfm's
      ``TREmbedding`` ``proj``/``norm``; ``embedder.wt_re`` (``tr_max / tr_precision + 1`` = 1501 rows,
      index ``round(t / 0.2)``, last row: special tokens) is its ``time`` table, unchanged.
    - The reference's MASK/CLS/SEP embeddings live in input space (1024 values) and go through the
      embedding model like a TR; brainfm's live after it, so they are converted to
      ``LayerNorm(Linear(embed))``: the same token vectors in the forward pass (dropout off). The time
      index of CLS/SEP is the dummy row 1500 in both. Their gradients differ by that Jacobian.
    - The reference's GPT has no SEP token: brainfm's (unused by CSM) ``sep_token`` is written as
      zeros so that the file is a complete backbone.
    - Left out (and returned in ``left_out``, reasons in :data:`LFB_DROPPED`): GPT-2's ``wte`` and
      BERT's ``word_embeddings`` (vocabulary of 1, unused with ``inputs_embeds``), the causal-mask and
      ``position_ids`` buffers, the GPT's decoding-mode pooler (unused by CSM).

    Kept corrected in brainfm (the weights load regardless; see the module docstring): brainfm's BERT
    puts CLS first and pools it, the reference appends CLS after the sequence and pools position 0
    (a TR); brainfm's AdamW beta2 is 0.999 (the reference's 0.9 was an accident).

    Raises:
        CheckpointError: not a GPT/BERT state dict of that project, a key this adapter does not know
            (e.g. more than one hidden layer in the embedding/unembedding models), or a missing one.
    """
    family = _lfb_family(state)
    table = _LFB_GPT if family == "GPT" else {k: (v, False) for k, v in _LFB_BERT.items()}
    out: dict[str, torch.Tensor] = {}
    left_out: dict[str, torch.Tensor] = {}
    qkv: dict[str, dict[str, torch.Tensor]] = {}
    unknown: list[str] = []
    for key, value in state.items():
        template, n = _lfb_template(key)
        if key in _LFB_EMBEDDER:
            out[_LFB_EMBEDDER[key]] = value
        elif key in _LFB_SPECIALS:
            pass  # below, once the embedding model is known
        elif template in table:
            target, transpose = table[template]
            out[target.format(n=n)] = value.t() if transpose else value
        elif family == "BERT" and (m := _BERT_QKV.search(template)):
            qkv.setdefault(n, {})[m.group(1)] = value
        elif template in LFB_DROPPED or f"{family}:{key}" in LFB_DROPPED:
            left_out[key] = value
        else:
            unknown.append(key)
    if unknown:
        raise CheckpointError(
            f"learning-from-brains {family} state dict: keys this adapter does not know: {unknown[:6]}"
            f"{' ...' if len(unknown) > 6 else ''}. brainfm loads the released configuration (one hidden layer in "
            "the embedding and unembedding models, HF GPT-2/BERT decoders)")
    for n, parts in sorted(qkv.items()):
        prefix = f"model.encoder.blocks.{n}.attn.qkv"
        try:
            out[f"{prefix}.weight"] = torch.cat([parts[f"{p}.weight"] for p in ("query", "key", "value")], dim=0)
            out[f"{prefix}.bias"] = torch.cat([parts[f"{p}.bias"] for p in ("query", "key", "value")], dim=0)
        except KeyError as exc:
            raise CheckpointError(f"BERT layer {n}: attention.self.{exc.args[0]} is missing") from exc
    need = [k for k in _LFB_EMBEDDER if k not in state] + [k for k in ("embedder.msk_embed", "embedder.cls_embed")
                                                           if k not in state]
    if family == "BERT":
        need += [k for k in ("embedder.sep_embed",) if k not in state]
    if need:
        raise CheckpointError(
            f"learning-from-brains {family} state dict without {need}: not a whole Model.state_dict()")
    w, b = state["embedder.embed_model.model.0.weight"], state["embedder.embed_model.model.0.bias"]
    g, beta = state["embedder.embed_model.model.1.weight"], state["embedder.embed_model.model.1.bias"]
    for ref, ours in _LFB_SPECIALS.items():
        if ref in state:
            out[ours] = lfb_special_token(state[ref], w, b, g, beta)
    if "model.sep_token" not in out:
        out["model.sep_token"] = torch.zeros(w.shape[0], dtype=w.dtype, device=w.device)
    return out, left_out


def lfb_special_token(embed: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, norm_weight: torch.Tensor,
                      norm_bias: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """A learning-from-brains special embedding in input space (``msk_embed``/``cls_embed``
    ``(1, 1, n_rois)``, ``sep_embed`` ``(1, n_rois)``) -> brainfm's token in embedding space ``(d,)``:
    ``LayerNorm(Linear(embed))`` with the embedding model's weights (``Linear`` ``weight`` ``(d, n_rois)``,
    ``bias``, ``LayerNorm`` ``norm_weight``/``norm_bias``/``eps`` 1e-5), what the reference's embedder
    computes for it (in float64, returned in ``embed``'s dtype). Differentiable, so a test can carry
    brainfm's token gradient back to the reference's parameter."""
    x = embed.reshape(-1)
    y = torch.nn.functional.linear(x.double(), weight.double(), bias.double())
    y = torch.nn.functional.layer_norm(y, y.shape, norm_weight.double(), norm_bias.double(), eps)
    return y.to(embed.dtype)


def lfb_model_config(state: dict[str, torch.Tensor], n_heads: int | None = None) -> dict:
    """The :class:`SequenceTransformer` config (``model`` group, with ``_target_``) that a
    :func:`lfb_checkpoint_filter` output needs, and the brainfm task it was trained for::

        {"model": {...}, "task": "csm" | "seq_bert"}

    Read from the weights: ``n_rois``, ``d_model``, ``depth``, ``mlp_ratio``, ``max_positions``,
    ``n_segments``, ``t_max_s`` (time-table rows - 1, times 0.2 s) and the family (GPT: causal,
    pre-LN, eps 1e-5; BERT: bidirectional, post-LN, eps 1e-12 as HF ``BertConfig``). Not in the
    weights: ``n_heads`` (default ``d_model // 64``, the 64-wide heads of GPT-2/BERT and of the
    released 768 x 12 models), ``t_resolution_s`` (the reference's 0.2 s), dropout (its 0.1),
    ``activation`` (``gelu_tanh``: their ``gelu_new``).

    Raises:
        CheckpointError: ``state`` is not a :func:`lfb_checkpoint_filter` output.
    """
    try:
        d, n_rois = (int(s) for s in state["model.embedding.proj.weight"].shape)
        depth = len({k.split(".")[3] for k in state if k.startswith("model.encoder.blocks.")})
        hidden = int(state["model.encoder.blocks.0.mlp.0.weight"].shape[0])
        max_positions = int(state["model.position.weight"].shape[0])
        time_rows = int(state["model.embedding.time.weight"].shape[0])
    except KeyError as exc:
        raise CheckpointError(f"not a converted learning-from-brains state dict: no {exc.args[0]}") from exc
    bert = "model.embed_norm.weight" in state
    heads = int(n_heads) if n_heads else max(1, d // 64)
    model = {
        "_target_": f"{SequenceTransformer.__module__}.{SequenceTransformer.__qualname__}",
        "n_rois": n_rois, "d_model": d, "depth": depth, "n_heads": heads, "mlp_ratio": hidden / d,
        "dropout": 0.1, "attn_dropout": 0.1, "causal": not bert, "max_positions": max_positions,
        "n_segments": int(state["model.segment.weight"].shape[0]) if "model.segment.weight" in state else 0,
        "t_max_s": round((time_rows - 1) * 0.2, 6), "t_resolution_s": 0.2, "use_checkpoint": False,
        "activation": "gelu_tanh", "norm_layout": "post" if bert else "pre", "norm_eps": 1e-12 if bert else 1e-5,
    }
    return {"model": model, "task": "seq_bert" if bert else "csm"}
