"""Optuna searches over downstream settings: trials are brainfm runs composed from the Hydra
configs, shared by any number of workers through SQLite, a journal file or PostgreSQL, pruned per
validation, with results as CSV, YAML and plots. Entry point: ``brainfm-search``
(:mod:`brainfm.cli.search`)."""

from brainfm.search.pruning import MetricNotLogged, OptunaPruning
from brainfm.search.space import Param, SearchSpace, format_value, override_key
from brainfm.search.storage import HeartbeatJournalStorage, make_storage, redact, resolve_storage
from brainfm.search.study import Search, SearchError, TrialFailed, merge_overrides, train_command

__all__ = [
    "HeartbeatJournalStorage", "MetricNotLogged", "OptunaPruning", "Param", "Search", "SearchError",
    "SearchSpace", "TrialFailed", "format_value", "make_storage", "merge_overrides", "override_key", "redact",
    "resolve_storage", "train_command",
]
