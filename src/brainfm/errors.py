"""Errors brainfm raises for bad input. Each message names the file, subject or key and the fix."""

from __future__ import annotations


class BrainfmError(Exception):
    """Base class of brainfm's own errors."""


class DataError(BrainfmError, ValueError):
    """A data file is missing, truncated or inconsistent with the configuration."""


class ConfigError(BrainfmError, ValueError):
    """A configuration value is invalid or inconsistent with the data or checkpoint."""


class CheckpointError(BrainfmError, ValueError):
    """A checkpoint cannot be found, loaded or does not match the data it is applied to."""


def brainfm_cause(exc: BaseException) -> BrainfmError | None:
    """The BrainfmError behind ``exc`` (Hydra and other libraries wrap errors raised
    inside them: the chain of causes and contexts is followed)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, BrainfmError):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None
