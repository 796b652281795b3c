"""Building objects from config nodes, with errors that say what to change.

``hydra.utils.instantiate`` fails with a raw ``TypeError`` for a key the target does not take (a typo such as
``+trainer.max_step=20``), with Lightning's ``MisconfigurationException`` for a GPU trainer on a machine without
one, and wraps brainfm's own errors in its ``InstantiationException``. :func:`instantiate` turns each into a
:class:`~brainfm.errors.ConfigError` (or the BrainfmError behind it) with the fix as typed: "did you mean
max_steps? Fix: trainer.max_steps=20" (:func:`unknown_key_error`), "trainer=cpu or trainer=ddp_cpu"
(:func:`no_gpu_error`). Every entry point builds through it; ``cli/`` turns the errors into exit status 2.
"""

from __future__ import annotations

import difflib
import inspect
import os
import re
from collections.abc import Iterator
from typing import Any

from brainfm.errors import BrainfmError, ConfigError, brainfm_cause

_UNEXPECTED = re.compile(r"got an unexpected keyword argument '(\w+)'")


def instantiate(node: Any, **kwargs: Any) -> Any:
    """``hydra.utils.instantiate(node, _convert_="all", **kwargs)`` whose errors are explained
    (:func:`explain_instantiation_error`).

    Raises:
        ConfigError: a key the target does not take, a GPU trainer without a GPU.
        BrainfmError: the target's own error, unwrapped from Hydra's.
    """
    from hydra.utils import instantiate as hydra_instantiate

    kwargs.setdefault("_convert_", "all")
    try:
        return hydra_instantiate(node, **kwargs)
    except Exception as exc:
        clear = explain_instantiation_error(node, exc)
        if clear is not None and clear is not exc:
            raise clear from None
        raise


def _chain(exc: BaseException) -> Iterator[BaseException]:
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def _locate(target: Any) -> Any:
    if not isinstance(target, str):
        return target
    from hydra.utils import get_object

    try:
        return get_object(target)
    except Exception:  # an unimportable target has its own error
        return None


def accepted_arguments(target: Any) -> list[str]:
    """The keyword arguments ``target`` (a class or function, or its import path) accepts: its signature's
    and, where it passes ``**kwargs`` on (``brainfm.tasks.base.Trainer`` to Lightning's), those of the
    ``__init__`` of its base classes. An empty list when its signature cannot be read."""
    target = _locate(target)
    if target is None:
        return []
    if inspect.isclass(target):
        funcs = [k.__dict__["__init__"] for k in target.__mro__ if "__init__" in k.__dict__ and k is not object]
    else:
        funcs = [target]
    names: list[str] = []
    for func in funcs:
        try:
            params = list(inspect.signature(func).parameters.values())
        except (TypeError, ValueError):
            break
        names += [p.name for p in params if p.name != "self"
                  and p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)]
        if not any(p.kind == inspect.Parameter.VAR_KEYWORD for p in params):
            break
    return list(dict.fromkeys(names))


def _value_text(value: Any) -> str:
    from omegaconf import OmegaConf

    if OmegaConf.is_config(value):
        value = OmegaConf.to_container(value, resolve=False)
    if isinstance(value, bool):
        return str(value).lower()
    if value is None:
        return "null"
    if isinstance(value, (list, dict)):
        import json

        return json.dumps(value).replace(" ", "")
    return str(value)


def _nodes_with(node: Any, key: str) -> Iterator[Any]:
    """``node`` and the nodes under it that have a ``_target_`` and ``key``."""
    from omegaconf import DictConfig, ListConfig

    if isinstance(node, DictConfig):
        if "_target_" in node and key in node:
            yield node
        for k in node:
            child = node._get_node(k)
            if isinstance(child, (DictConfig, ListConfig)):
                yield from _nodes_with(child, key)
    elif isinstance(node, ListConfig):
        for child in node:
            if isinstance(child, (DictConfig, ListConfig)):
                yield from _nodes_with(child, key)


def unknown_key_error(node: Any, exc: BaseException) -> ConfigError | None:
    """A ConfigError for an instantiation that failed on a key its ``_target_`` does not take (a typo such
    as ``+trainer.max_step=20``): the key, the target, the closest valid keys (:func:`difflib.get_close_matches`
    on :func:`accepted_arguments`) and the override that works as typed (``+`` only where the key is not in
    the config). None for any other error."""
    match = next((m for e in _chain(exc) if isinstance(e, TypeError) for m in [_UNEXPECTED.search(str(e))] if m), None)
    if match is None or node is None:
        return None
    key = match.group(1)
    owners = list(_nodes_with(node, key))
    try:  # a target built inside another (the model inside the task): its node is elsewhere in the config
        root = node._get_root()
        owners += [n for n in _nodes_with(root, key) if all(n is not o for o in owners)]
    except Exception:  # not part of a larger config
        pass
    for owner in owners:
        target = owner.get("_target_")
        valid = accepted_arguments(target)
        if not valid or key in valid:
            continue
        prefix = owner._get_full_key(None) or ""
        dotted = f"{prefix}.{key}" if prefix else key
        try:
            value = _value_text(owner[key])
        except Exception:  # an interpolation that does not resolve here
            value = "<value>"
        close = difflib.get_close_matches(key, valid, n=3, cutoff=0.6)
        if close:
            best = close[0]
            plus = "" if best in owner else "+"
            fix = (f"{plus}{prefix + '.' if prefix else ''}{best}={value}"
                   + (" (no '+': the key exists in the config)" if not plus else ""))
            others = f" (or {', '.join(close[1:])})" if len(close) > 1 else ""
            return ConfigError(f"{dotted} is not a setting of {target}: did you mean {best}{others}? "
                               f"Fix: {fix}")
        shown = ", ".join(sorted(valid)[:40]) + (", ..." if len(valid) > 40 else "")
        return ConfigError(f"{dotted} is not a setting of {target}. Fix: remove it; {target} takes: {shown}")
    return None


def no_gpu_error(node: Any, exc: BaseException) -> ConfigError | None:
    """A ConfigError for a trainer that asks for a GPU on a machine where CUDA sees none (Lightning's
    ``MisconfigurationException``): what was asked, that ``torch.cuda.is_available()`` is False, and the
    CPU trainers. None for any other error."""
    if not any(type(e).__name__ == "MisconfigurationException" for e in _chain(exc)):
        return None
    accelerator = str(node.get("accelerator", "")) if hasattr(node, "get") else ""
    if accelerator not in ("gpu", "cuda", "auto"):
        return None
    import torch

    if torch.cuda.is_available():
        return None
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    where = f"; CUDA_VISIBLE_DEVICES={visible!r}" if visible is not None else ""
    return ConfigError(
        f"trainer.accelerator={accelerator} asks for a CUDA GPU, but none is visible on this machine "
        f"(torch.cuda.is_available() is False{where}). Fix: trainer=cpu (one process) or trainer=ddp_cpu (several "
        "CPU processes, gloo); on a cluster run inside a GPU allocation (e.g. srun/sbatch with --gpus-per-node)"
    )


def explain_instantiation_error(node: Any, exc: BaseException) -> BrainfmError | None:
    """The clear error behind a failed ``hydra.utils.instantiate(node)``: brainfm's own (Hydra wraps it), an
    unknown key with a "did you mean" (:func:`unknown_key_error`), or a GPU trainer without a GPU
    (:func:`no_gpu_error`). None: re-raise ``exc`` as it is."""
    cause = brainfm_cause(exc)
    if cause is not None:
        return cause
    return unknown_key_error(node, exc) or no_gpu_error(node, exc)
