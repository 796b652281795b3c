"""Backbones and heads (``nn.Module`` only; no Lightning, no file access).

Models are built from configs with a ``_target_`` key (``conf/model/*.yaml``): the config is the
registry, so a user model is one import path away.
"""

from __future__ import annotations

from typing import Any

from torch import nn


def build_model(cfg: dict[str, Any]) -> nn.Module:
    """Instantiate a model from a plain config with a ``_target_`` import path.

    Raises:
        ValueError: the config has no ``_target_``.
    """
    from hydra.utils import instantiate

    if "_target_" not in cfg:
        raise ValueError(f"model config has no _target_ (keys: {sorted(cfg)})")
    return instantiate(cfg, _convert_="all")
