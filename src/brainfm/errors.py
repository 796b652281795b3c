"""Errors brainfm raises for bad input. Each message names the file, subject or key and the fix."""


class BrainfmError(Exception):
    """Base class of brainfm's own errors."""


class DataError(BrainfmError, ValueError):
    """A data file is missing, truncated or inconsistent with the configuration."""


class ConfigError(BrainfmError, ValueError):
    """A configuration value is invalid or inconsistent with the data or checkpoint."""


class CheckpointError(BrainfmError, ValueError):
    """A checkpoint cannot be found, loaded or does not match the data it is applied to."""
