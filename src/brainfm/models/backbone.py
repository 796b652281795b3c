"""The contract every brainfm backbone implements, so that tasks, inference and attribution never
test a model's class (the shape of timm's ``forward_features`` / ``forward_head`` split).

A backbone (an ``nn.Module`` that also derives from :class:`Backbone`) says which batch entries
it reads (:attr:`Backbone.input_keys`) and gives

- :meth:`Backbone.features`: its last-layer token features ``(B, N, D)``;
- :meth:`Backbone.pooled`: one embedding per sample ``(B, out_dim)``, the one every head, probe
  and extraction uses;
- :attr:`Backbone.out_dim`: ``D`` of :meth:`pooled`;
- :attr:`Backbone.time_in_seconds`: whether it takes data at any TR (evaluate, extract, predict and
  fine-tuning accept another TR than the pretraining's for these models);
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

from brainfm.errors import ConfigError


class Backbone:
    """Mixin of brainfm's backbones (no state of its own).

    Subclasses set :attr:`input_keys` and implement :meth:`features` and :attr:`out_dim`;
    :meth:`pooled` defaults to the mean of :meth:`features` over its tokens.
    """

    #: the batch entries the backbone reads, in its call order: ``("volume",)`` for clips
    #: ``(B, C, X, Y, Z, T)``; ``("bold", "t")`` for windows ``(B, T, V)`` with their times
    #: ``(B, T)`` in seconds from the window onset; ``("bold",)`` for models without a time input
    input_keys: ClassVar[tuple[str, ...]] = ("bold", "t")
    #: the model embeds each TR's time in seconds (brainfm.models.embedding.TREmbedding), so it takes
    #: data at any TR; False: it assumes the TR it was trained at (patches of TRs, frames)
    time_in_seconds: ClassVar[bool] = False

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

    def pooled(self, *inputs: torch.Tensor) -> torch.Tensor:
        """One embedding per sample ``(B, out_dim)``: by default the mean of :meth:`features`."""
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

    def use_special_tokens(self, *names: str) -> None:
        """Keep only the special embeddings (``mask``, ``cls``, ...) an objective uses trainable; a
        no-op for backbones without any."""


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
