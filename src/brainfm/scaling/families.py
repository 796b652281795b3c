"""How the scale test feeds each model family: a synthetic batch of the family's input, the
forward call, a scalar loss, and the family's stages (for per-stage parameter counts).

The scale test measures a backbone, not an objective: the loss is the mean square of the
backbone's output (Swin4D features, sequence-transformer tokens) or the reconstruction error
(LSTM autoencoder), so task heads and decoders are not included. A new backbone joins the scale
test with one :func:`register_family` call.

Inputs (shapes per sample):

- ``SwinTransformer4D``: a volume clip ``(in_chans, H, W, D, T)`` = ``(in_chans, *img_size)``
  (96^3 x 20 for SwiFT);
- ``SequenceTransformer`` (Thomas et al. 2022 GPT / BERT): ``bold (T, n_rois)`` and the TR times
  ``t (T,)`` in seconds, ``T = inputs.seq_len`` TRs of ``inputs.tr`` seconds;
- ``LSTMAutoencoder``: as the sequence transformer; decoded with teacher forcing (one call).
- ``TemporalMLPEncoder`` (R2T-Net's light temporal encoder): as the sequence transformer.
- ``SemantoksEncoder``: ``bold (T, n_rois)``, ``T = inputs.seq_len`` TRs (``T // patch_size``
  tokens per network).
- ``TFF``: a clip ``(in_chans, X, Y, Z, T)``, ``T = min(inputs.seq_len, max_positions - 1)``
  TRs; the loss is the reconstruction error of the first channel.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any
from unittest import mock

import torch
from torch import nn

from brainfm.errors import ConfigError
from brainfm.models import swin4d
from brainfm.models.embedding import TREmbedding
from brainfm.models.lstm import LSTMAutoencoder
from brainfm.models.r2t_encoders import TemporalMLPEncoder
from brainfm.models.semantoks import SemantoksEncoder
from brainfm.models.sequence import SequenceTransformer
from brainfm.models.swin4d import FactorizedSwinBlock4D, SwinBlock4D, SwinTransformer4D
from brainfm.models.tff import TFF
from brainfm.models.transformer import TransformerBlock


@dataclass(frozen=True)
class Family:
    """A model family in the scale test.

    Attributes:
        name: short name (``swin4d``, ``sequence``, ``lstm``).
        make_inputs: ``(model, batch_size, device, inputs_cfg) -> tuple`` of forward arguments.
        loss: ``(model, inputs, output) -> scalar`` loss of one step.
        stages: ``model -> {stage name: [modules]}``; parameters outside every stage are reported
            as ``other``.
        block_types: the repeated blocks (FSDP2 shards them; informative otherwise).
        meta_safe: context manager under which the forward runs on meta or fake tensors (none of
            the model's data-dependent input checks, which need real values).
    """

    name: str
    make_inputs: Callable[..., tuple]
    loss: Callable[..., torch.Tensor]
    stages: Callable[[nn.Module], dict[str, list[nn.Module]]]
    block_types: tuple[type, ...] = ()
    meta_safe: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext
    forward: Callable[..., Any] = field(default=lambda model, *inputs: model(*inputs))


_FAMILIES: dict[type, Family] = {}


def register_family(cls: type, family: Family) -> None:
    """Make the backbone class ``cls`` (and its subclasses) known to the scale test."""
    _FAMILIES[cls] = family


def family_of(model: nn.Module | type) -> Family:
    """The :class:`Family` of ``model`` (a module or a module class).

    Raises:
        ConfigError: the model's class is not registered.
    """
    model_cls = model if isinstance(model, type) else type(model)
    for cls in model_cls.__mro__:
        if cls in _FAMILIES:
            return _FAMILIES[cls]
    known = ", ".join(sorted(f"{c.__module__}.{c.__qualname__}" for c in _FAMILIES))
    raise ConfigError(f"brainfm-scale does not know how to feed {model_cls.__qualname__}; known backbones: {known}. "
                      "Register it with brainfm.scaling.families.register_family.")


# -- Swin4D ---------------------------------------------------------------------------------------
def _swin_inputs(model: nn.Module, batch_size: int, device: torch.device | str, inputs_cfg: dict) -> tuple:
    return (torch.randn(batch_size, model.in_chans, *model.img_size, device=device),)


def _mean_square(model: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
    return output.float().square().mean()


def _swin_stages(model: nn.Module) -> dict[str, list[nn.Module]]:
    stages: dict[str, list[nn.Module]] = {"patch_embed": [model.patch_embed]}
    for i, layer in enumerate(model.layers):
        stages[f"stage{i + 1}"] = [layer] + ([model.pos_embeds[i]] if len(model.pos_embeds) > i else [])
    return stages


# -- sequence models on parcellated BOLD ---------------------------------------------------------
def _seq_inputs(model: nn.Module, batch_size: int, device: torch.device | str, inputs_cfg: dict) -> tuple:
    n = int(inputs_cfg.get("seq_len", 50))
    tr = float(inputs_cfg.get("tr", 0.72))
    bold = torch.randn(batch_size, n, model.n_rois, device=device)
    t = (torch.arange(n, device=device, dtype=torch.float32) * tr).expand(batch_size, n)
    return bold, t


def _lstm_forward(model: nn.Module, bold: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return model(bold, t, teacher_forcing=True)[0]


def _reconstruction(model: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
    return (output.float() - inputs[0].float()).abs().mean()


def _tr_embedding_meta_safe() -> contextlib.AbstractContextManager:
    """``TREmbedding.time_index`` checks ``float(t.max())`` against the embedding's range: a value
    meta and fake tensors do not have. Under this context it only bins the times (the same
    operations, without the check)."""
    def time_index(self: TREmbedding, t: torch.Tensor) -> torch.Tensor:
        idx = torch.round(t / self.t_resolution_s).long()
        return torch.where(t < 0, torch.full_like(idx, self.n_time_bins), idx)

    return mock.patch.object(TREmbedding, "time_index", time_index)


def _sequence_stages(model: nn.Module) -> dict[str, list[nn.Module]]:
    emb = [model.embedding, model.position] + ([model.segment] if model.segment is not None else [])
    return {"embedding": emb, "encoder": [model.encoder]}


def _lstm_stages(model: nn.Module) -> dict[str, list[nn.Module]]:
    return {"embedding": [model.embedding], "encoder": [model.encoder, model.encoder_norms, model.pooler],
            "decoder": [model.decoder, model.decoder_norms, model.decoder_out, model.head]}


def _semantoks_inputs(model: nn.Module, batch_size: int, device: torch.device | str, inputs_cfg: dict) -> tuple:
    return (torch.randn(batch_size, int(inputs_cfg.get("seq_len", 50)), model.n_rois, device=device),)


def _semantoks_stages(model: nn.Module) -> dict[str, list[nn.Module]]:
    return {"tokenizer": [model.tokenizers], "encoder": [model.encoder]}


def _tff_inputs(model: nn.Module, batch_size: int, device: torch.device | str, inputs_cfg: dict) -> tuple:
    t = int(inputs_cfg.get("seq_len", 20))
    if model.transformer is not None:
        t = min(t, model.transformer.max_positions - 1)
    return (torch.randn(batch_size, model.in_chans, *model.img_size, t, device=device),)


def _tff_reconstruction(model: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
    return (output.float() - inputs[0][:, :1].float()).abs().mean()


def _tff_stages(model: nn.Module) -> dict[str, list[nn.Module]]:
    return {"encoder": [model.encoder, model.to_hidden, model.into_hidden],
            "transformer": [model.transformer] if model.transformer is not None else [],
            "decoder": [model.from_hidden, model.from_bottleneck, model.decoder]}


def _temporal_mlp_stages(model: nn.Module) -> dict[str, list[nn.Module]]:
    return {"embedding": [model.embedding], "mlp": [model.mlp], "temporal": [model.blocks, model.norm]}


def _register_builtin() -> None:

    register_family(SwinTransformer4D, Family("swin4d", _swin_inputs, _mean_square, _swin_stages,
                                              (SwinBlock4D, FactorizedSwinBlock4D)))
    register_family(SequenceTransformer, Family("sequence", _seq_inputs, _mean_square, _sequence_stages,
                                                (TransformerBlock,), _tr_embedding_meta_safe))
    register_family(LSTMAutoencoder, Family("lstm", _seq_inputs, _reconstruction, _lstm_stages, (),
                                            _tr_embedding_meta_safe, _lstm_forward))
    register_family(TemporalMLPEncoder, Family("temporal_mlp", _seq_inputs, _mean_square, _temporal_mlp_stages, (),
                                               _tr_embedding_meta_safe))
    register_family(SemantoksEncoder, Family("semantoks", _semantoks_inputs, _mean_square, _semantoks_stages,
                                             (TransformerBlock,)))
    register_family(TFF, Family("tff", _tff_inputs, _tff_reconstruction, _tff_stages))


_register_builtin()


@contextlib.contextmanager
def no_model_caches() -> Iterator[None]:
    """Empty the models' per-shape caches (Swin4D's window masks and RoPE tables, keyed by device)
    before and after: tensors cached while running on fake tensors must not leak into real runs."""
    def clear() -> None:
        for value in vars(swin4d).values():
            if callable(getattr(value, "cache_clear", None)):
                value.cache_clear()

    clear()
    try:
        yield
    finally:
        clear()
