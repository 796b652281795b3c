"""The contract every brainfm backbone implements, so that tasks, inference and attribution never
test a model's class (the shape of timm's ``forward_features`` / ``forward_head`` split).

A backbone (an ``nn.Module`` that also derives from :class:`Backbone`) says which batch entries
it reads (:attr:`Backbone.input_keys`) and gives

- :meth:`Backbone.features`: its last-layer token features ``(B, N, D)``;
- :meth:`Backbone.pooled`: one embedding per sample ``(B, out_dim)``, the one every head, probe
  and extraction uses, by the backbone's ``model.pooling`` (:mod:`brainfm.models.pooling`: ``mean``,
  ``cls``, ``code``, or a second-order ``correlation`` / ``covariance`` readout of
  :meth:`Backbone.frame_features`, the per-TR features, optionally beside the input BOLD);
- :attr:`Backbone.out_dim`: ``D`` of :meth:`pooled`;
- :attr:`Backbone.any_tr`: whether it takes data at any TR (evaluate, extract, predict and
  fine-tuning accept another TR than the pretraining's for these models);
- :meth:`Backbone.fsdp_units`: the submodules FSDP2 shards one by one under ``trainer=fsdp`` (its
  repeated blocks; declared with the model, as torchtitan keeps ``parallelize`` with each model, beside
  ``compile_regions()`` where a backbone has one);
- optionally a token hook, :meth:`Backbone.embed_inputs` and :meth:`Backbone.pool_tokens`
  (``pooled(*x) == pool_tokens(embed_inputs(*x))``), for objectives that add something to the
  input tokens (R2T's modality embedding); :attr:`Backbone.token_dim` is ``None`` without one.

Objectives that need more than that (a causal sequence model for CSM, mask tokens for BERT,
patch embeddings for SimMIM) state it with :func:`require`, which checks capabilities (methods
and attribute values), not classes, and names the model config that has them.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import torch
from torch import nn

from brainfm.errors import ConfigError
from brainfm.models.pooling import build_readout
from brainfm.models.transformer import TransformerBlock


class Backbone:
    """Mixin of brainfm's backbones (no state of its own).

    Subclasses set :attr:`input_keys` and implement :meth:`features` and :attr:`out_dim`;
    :meth:`pooled` defaults to the mean of :meth:`features` over its tokens.
    """

    #: the batch entries the backbone reads, in its call order: ``("volume",)`` for clips
    #: ``(B, C, X, Y, Z, T)``; ``("bold", "t")`` for windows ``(B, T, V)`` with their times
    #: ``(B, T)`` in seconds from the window onset; ``("bold",)`` for models without a time input
    input_keys: ClassVar[tuple[str, ...]] = ("bold", "t")
    #: the model takes data at any TR: it embeds each TR's time in seconds
    #: (brainfm.models.embedding.TREmbedding), or its embedding has no notion of time order (FC,
    #: meanMLP); False: it assumes the TR it was trained at (patches of TRs, frames)
    any_tr: ClassVar[bool] = False
    #: the ``model.pooling`` values the backbone supports (:mod:`brainfm.models.pooling`); the first
    #: is its default
    poolings: ClassVar[tuple[str, ...]] = ("mean",)
    #: the pooling in use (:meth:`init_pooling` sets it per instance)
    pooling: str = "mean"

    def init_pooling(self, pooling: str | None, readout: Mapping[str, Any] | None, feature_dim: int,
                     n_rois: int) -> None:
        """Set ``model.pooling`` (None: the backbone's default) and build its readout module
        (registered as ``readout`` only for second-order poolings, so first-order backbones keep
        their state-dict keys). Call from ``__init__`` after ``nn.Module.__init__``.

        Raises:
            ConfigError: a pooling this backbone does not support (its choices named), or a bad
                ``model.readout`` (:func:`brainfm.models.pooling.build_readout`).
        """
        pooling = pooling or self.poolings[0]
        if pooling not in self.poolings:
            raise ConfigError(f"model.pooling={pooling!r} is not available for {type(self).__name__}; choose one of "
                              f"{list(self.poolings)}")
        self.pooling = pooling
        self._frame_dim = int(feature_dim)
        module = build_readout(pooling, dict(readout or {}), feature_dim, n_rois)
        if module is not None:
            self.readout = module

    @property
    def frame_dim(self) -> int | None:
        """Width ``D`` of :meth:`frame_features` (per-TR features), None for a backbone without them."""
        return getattr(self, "_frame_dim", 0) or None

    @property
    def pooling_readout(self):
        """The second-order readout (:class:`~brainfm.models.pooling.SecondOrderReadout`) or None."""
        return self.__dict__.get("_modules", {}).get("readout")

    def pooled_dim(self, native: int) -> int:
        """:attr:`out_dim` given the width ``native`` of the first-order poolings."""
        readout = self.pooling_readout
        return readout.out_dim if readout is not None else int(native)

    def inputs(self, batch: Mapping[str, Any]) -> tuple[torch.Tensor, ...]:
        """The tensors of ``batch`` the backbone takes, in :attr:`input_keys` order.

        Raises:
            ConfigError: an entry is missing (the data recipe does not fit the model).
        """
        missing = [k for k in self.input_keys if k not in batch]
        if missing:
            kind = "volume clips (data=volumes, a volume recipe)" if "volume" in self.input_keys else \
                "ROI/grayordinate windows (an ROI recipe)"
            raise ConfigError(f"model {type(self).__name__} reads {list(self.input_keys)} from a batch, which has "
                              f"{sorted(batch)}: it takes {kind}")
        return tuple(batch[k] for k in self.input_keys)

    @property
    def out_dim(self) -> int:
        raise NotImplementedError

    @property
    def token_dim(self) -> int | None:
        """Width of :meth:`embed_inputs`' tokens (their last axis); ``None``: no token hook."""
        return None

    def features(self, *inputs: torch.Tensor) -> torch.Tensor:
        """Last-layer token features ``(B, N, D)`` of the inputs (:attr:`input_keys`)."""
        raise NotImplementedError

    def frame_features(self, *inputs: torch.Tensor) -> torch.Tensor:
        """Features on the input's time axis ``(B, T, D)`` (one row per TR), what a second-order readout
        correlates over time; by default :meth:`features` (backbones with one token per TR)."""
        return self.features(*inputs)

    def pooled(self, *inputs: torch.Tensor) -> torch.Tensor:
        """One embedding per sample ``(B, out_dim)`` by ``model.pooling``: a second-order readout of
        :meth:`frame_features` and the input BOLD (``inputs[0]``), else :meth:`pool_first_order`."""
        readout = self.pooling_readout
        if readout is not None:
            return readout(self.frame_features(*inputs) if readout.feature_dim else None, inputs[0])
        return self.pool_first_order(*inputs)

    def pool_first_order(self, *inputs: torch.Tensor) -> torch.Tensor:
        """``mean`` (the mean of :meth:`features` over its tokens) and the backbone's other first-order
        poolings (``cls``, ``code``), ``(B, out_dim)``."""
        return self.features(*inputs).mean(dim=1)

    def pooled_batch(self, batch: Mapping[str, Any]) -> torch.Tensor:
        """:meth:`pooled` of a batch's inputs (:meth:`inputs`)."""
        return self.pooled(*self.inputs(batch))

    def embed_inputs(self, *inputs: torch.Tensor) -> torch.Tensor:
        """Input tokens ``(B, ..., token_dim)`` (the token hook; see :meth:`pool_tokens`).

        Raises:
            ConfigError: the backbone has no token hook (:attr:`token_dim` is ``None``).
        """
        raise ConfigError(f"model {type(self).__name__} has no token-level hook")

    def pool_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """``(B, ..., token_dim)`` tokens of :meth:`embed_inputs` -> :meth:`pooled`'s ``(B, out_dim)``."""
        raise ConfigError(f"model {type(self).__name__} has no token-level hook")

    def fsdp_units(self) -> list[nn.Module]:
        """The submodules FSDP2 shards one by one under ``trainer=fsdp`` (each all-gathered for its own
        forward and freed after it), before the task as a whole
        (:meth:`brainfm.tasks.base.BrainfmTask.fsdp_units`); also the compile regions of a backbone without
        ``compile_regions()``. By default every block of brainfm's transformer
        (:class:`~brainfm.models.transformer.TransformerBlock`) in the backbone, in module order; backbones
        with other repeated blocks override it (Swin4D); ``[]`` (no such block: LSTM, CNNs, FC, MLPs): only
        the whole task is sharded."""
        return [m for m in self.modules() if isinstance(m, TransformerBlock)]

    def use_special_tokens(self, *names: str) -> None:
        """Keep only the special embeddings (``mask``, ``cls``, ...) an objective uses trainable; a
        no-op for backbones without any."""


class TRTokenBackbone(Backbone):
    """Mixin of the backbones with one token per TR (windows ``(B, T, n_rois)`` with times ``(B, T)`` s):
    the subclass implements ``embed_trs(bold, t) -> (B, T, d_model)`` and ``encode(tokens) -> (B, T,
    d_model)`` and sets ``d_model``; the token hook (:meth:`embed_inputs` / :meth:`pool_tokens`, for
    attribution), :meth:`features` and :attr:`token_dim` follow from them. Sequence transformers
    (:class:`~brainfm.models.sequence.SequenceTransformer`) and R2T's temporal MLP
    (:class:`~brainfm.models.r2t_encoders.TemporalMLPEncoder`)."""

    d_model: int

    @property
    def token_dim(self) -> int | None:
        """``d_model``; None when the readout reads the input BOLD (``model.readout.include_input``),
        which a token hook does not carry."""
        readout = self.pooling_readout
        return None if readout is not None and readout.include_input else self.d_model

    def features(self, bold: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Windows ``(B, T, n_rois)``, ``t`` ``(B, T)`` s -> encoded states per TR ``(B, T, d_model)``
        (the module's ``forward``: ``encode(embed_trs(bold, t))``, through ``__call__`` so hooks run)."""
        return self(bold, t)

    def embed_inputs(self, bold: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """TR tokens ``(B, T, d_model)``.

        Raises:
            ConfigError: no token-level hook (:attr:`token_dim` is None: the readout reads the input BOLD).
        """
        if self.token_dim is None:
            raise ConfigError(f"model {type(self).__name__} has no token-level hook with model.pooling={self.pooling} "
                              "and model.readout.include_input=true (the readout reads the input BOLD)")
        return self.embed_trs(bold, t)

    def pool_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """TR tokens ``(B, T, d_model)`` -> the pooled encoded states ``(B, out_dim)`` (``model.pooling``:
        the readout, else the mean over TRs)."""
        states = self.encode(tokens)
        readout = self.pooling_readout
        return readout(states, None) if readout is not None else states.mean(dim=1)


def require(model: Any, task: str, what: str, fix: str, *methods: str, **attributes: Any) -> None:
    """Check that ``model`` has what the objective ``task`` needs (``what``, in words): the
    ``methods`` and the ``attributes`` with these values.

    Raises:
        ConfigError: naming the task, what it needs, what the model lacks and ``fix`` (the model
            config that has it).
    """
    lacks = [f"{m}()" for m in methods if not callable(getattr(model, m, None))]
    lacks += [f"{a}={v!r} (it has {getattr(model, a, None)!r})" for a, v in attributes.items()
              if getattr(model, a, None) != v]
    if lacks:
        raise ConfigError(f"{task} needs {what}; model {type(model).__name__} lacks {', '.join(lacks)}. Fix: {fix}")
