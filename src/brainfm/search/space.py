"""Search spaces: ``search.space`` of a ``conf/search/*.yaml`` preset -> Optuna distributions ->
Hydra overrides of a trial.

A space maps a parameter name to its distribution::

    space:
      task.optimizer.lr: {type: float, low: 1.0e-5, high: 1.0e-2, log: true}
      data.batch_size:   {type: int, low: 8, high: 64, step: 8}
      task.head:         {type: categorical, choices: [linear, bn_linear, mlp]}
      label_scaling:                       # named choices: each one sets several keys
        type: categorical
        choices:
          zscore: {task.label_mean: 63.9, task.label_std: 7.6}
          none: {task.label_mean: 0.0, task.label_std: 1.0}

A parameter named after a config key (``task.optimizer.lr``; ``+key`` to add a new key) becomes the
override ``key=value``; a categorical with named choices (a mapping) becomes the overrides of the
chosen entry, and its parameter name is free. ``grid: [values]`` lists the points of a float/int
parameter for the grid sampler (categoricals use their choices). Values are scalars (int, float,
bool, str, null).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from brainfm.errors import ConfigError

TYPES = ("float", "int", "categorical")
_PLAIN = re.compile(r"^[A-Za-z0-9_./:+-]+$")  # strings Hydra's override grammar reads as they are
_WORDS = {"true", "false", "null", "nan", "inf", "-inf"}


def format_value(value: Any) -> str:
    """A scalar as Hydra's override grammar reads it back unchanged (``1e-05``, ``true``, ``null``,
    ``'a b'``).

    Raises:
        ConfigError: a list or dict value (spaces hold scalars only).
    """
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value) or math.isinf(value):
            raise ConfigError(f"search space value {value!r} is not finite")
        return repr(value)
    if isinstance(value, str):
        if _PLAIN.match(value) and value.lower() not in _WORDS and not _is_number(value):
            return value
        return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"
    raise ConfigError(f"search space values must be scalars (int, float, bool, str, null), got {value!r}")


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def override_key(override: str) -> str:
    """The key an override sets: ``task.head`` for ``task.head=mlp``, ``+x.y=1`` and ``~x.y``;
    ``model`` for the group override ``model=bert``."""
    key = override.split("=", 1)[0].strip()
    return key.lstrip("+~")


@dataclass
class Param:
    """One searched parameter (see the module docstring for the YAML form)."""

    name: str
    type: str
    low: float | int | None = None
    high: float | int | None = None
    log: bool = False
    step: float | int | None = None
    choices: list | None = None
    named: dict[str, dict[str, Any]] | None = None  # categorical with named choices -> key: value
    grid: list | None = None

    def distribution(self):
        """The Optuna distribution of this parameter."""
        import optuna.distributions as d

        if self.type == "float":
            return d.FloatDistribution(self.low, self.high, log=self.log, step=self.step)
        if self.type == "int":
            return d.IntDistribution(int(self.low), int(self.high), log=self.log, step=int(self.step or 1))
        return d.CategoricalDistribution(list(self.named) if self.named is not None else self.choices)

    def suggest(self, trial) -> Any:
        if self.type == "float":
            return trial.suggest_float(self.name, self.low, self.high, log=self.log, step=self.step)
        if self.type == "int":
            return trial.suggest_int(self.name, int(self.low), int(self.high), log=self.log, step=int(self.step or 1))
        return trial.suggest_categorical(self.name, list(self.named) if self.named is not None else self.choices)

    def grid_values(self) -> list:
        if self.type == "categorical":
            return list(self.named) if self.named is not None else list(self.choices)
        if self.grid is not None:
            return list(self.grid)
        if self.type == "int" and self.step and not self.log:
            return list(range(int(self.low), int(self.high) + 1, int(self.step)))
        raise ConfigError(
            f"search/sampler=grid needs the points of search.space.{self.name}: add `grid: [v1, v2, ...]` "
            "to it (or make it categorical, or an int with a step)"
        )

    def overrides(self, value: Any) -> list[str]:
        """Hydra overrides that set this parameter to ``value``."""
        if self.named is not None:
            if value not in self.named:
                raise ConfigError(f"search.space.{self.name}: {value!r} is not one of {list(self.named)}")
            return [f"{k}={format_value(v)}" for k, v in self.named[value].items()]
        return [f"{self.name}={format_value(value)}"]

    def first_value(self) -> Any:
        """A value inside the range (for checking that the keys exist before any trial runs)."""
        if self.type == "categorical":
            return next(iter(self.named)) if self.named is not None else self.choices[0]
        return int(self.low) if self.type == "int" else float(self.low)

    def spec(self) -> dict:
        """Plain description (stored with the study, compared when a worker joins)."""
        out: dict[str, Any] = {"type": self.type}
        for k in ("low", "high", "step", "choices", "named", "grid"):
            v = getattr(self, k)
            if v is not None:
                out[k] = v
        if self.log:
            out["log"] = True
        return out


@dataclass
class SearchSpace:
    """The parameters of a study, in the order they are suggested."""

    params: list[Param] = field(default_factory=list)

    @classmethod
    def from_config(cls, space: Mapping | None) -> "SearchSpace":
        """Parse ``search.space`` (a plain mapping).

        Raises:
            ConfigError: unknown type, missing or inverted bounds, log with low <= 0, empty or
                non-scalar choices, a named choice that is not a mapping of keys to scalars.
        """
        if not space:
            raise ConfigError("search.space is empty: name at least one parameter, e.g. "
                              "search.space={task.optimizer.lr: {type: float, low: 1e-5, high: 1e-2, log: true}} "
                              "(or choose a preset: search=<name>)")
        params = []
        for name, spec in space.items():
            where = f"search.space.{name}"
            if not isinstance(spec, Mapping):
                raise ConfigError(f"{where} must be a mapping with a `type` ({', '.join(TYPES)}), got {spec!r}")
            unknown = set(spec) - {"type", "low", "high", "log", "step", "choices", "grid"}
            if unknown:
                raise ConfigError(f"{where}: unknown field(s) {sorted(unknown)}; allowed: type, low, high, log, step, "
                                  "choices, grid")
            kind = spec.get("type")
            if kind not in TYPES:
                raise ConfigError(f"{where}.type={kind!r} must be one of {TYPES}")
            if kind == "categorical":
                params.append(_categorical(str(name), spec.get("choices"), where))
                continue
            low, high = spec.get("low"), spec.get("high")
            if low is None or high is None:
                raise ConfigError(f"{where}: a {kind} parameter needs `low` and `high`")
            cast = float if kind == "float" else int
            try:
                low, high = cast(low), cast(high)
            except (TypeError, ValueError):
                raise ConfigError(f"{where}: low={spec.get('low')!r} and high={spec.get('high')!r} "
                                  f"must be {kind}s") from None
            if kind == "int" and (float(spec["low"]) != low or float(spec["high"]) != high):
                raise ConfigError(f"{where}: an int parameter needs integer bounds, got {spec['low']}..{spec['high']}")
            if not low < high:
                raise ConfigError(f"{where}: low={low} must be below high={high}")
            log = bool(spec.get("log", False))
            if log and low <= 0:
                raise ConfigError(f"{where}: log=true needs low > 0 (got {low})")
            step = spec.get("step")
            if step is not None and log:
                raise ConfigError(f"{where}: step and log=true cannot be combined (Optuna)")
            grid = list(spec["grid"]) if spec.get("grid") is not None else None
            if grid is not None and any(not (low <= g <= high) for g in grid):
                raise ConfigError(f"{where}.grid={grid} has points outside [{low}, {high}]")
            params.append(Param(str(name), kind, low, high, log, cast(step) if step is not None else None, grid=grid))
        return cls(params)

    @property
    def names(self) -> list[str]:
        return [p.name for p in self.params]

    def suggest(self, trial) -> dict[str, Any]:
        """Sample (or, for an enqueued/retried trial, read) every parameter of ``trial``."""
        return {p.name: p.suggest(trial) for p in self.params}

    def overrides(self, params: Mapping[str, Any]) -> list[str]:
        """The Hydra overrides of a parameter set (in space order)."""
        missing = [p.name for p in self.params if p.name not in params]
        if missing:
            raise ConfigError(f"parameters {missing} have no value (the study's trial was made with another space)")
        out: list[str] = []
        for p in self.params:
            out.extend(p.overrides(params[p.name]))
        return out

    def keys(self) -> set[str]:
        """Config keys the space sets."""
        out = set()
        for p in self.params:
            out.update(override_key(o) for o in p.overrides(p.first_value()))
        return out

    def example_overrides(self) -> list[str]:
        return self.overrides({p.name: p.first_value() for p in self.params})

    def grid(self) -> dict[str, list]:
        """Search space of ``optuna.samplers.GridSampler``."""
        return {p.name: p.grid_values() for p in self.params}

    def grid_size(self) -> int:
        return math.prod(len(v) for v in self.grid().values())

    def spec(self) -> dict[str, dict]:
        return {p.name: p.spec() for p in self.params}


def _categorical(name: str, choices: Any, where: str) -> Param:
    if isinstance(choices, Mapping):
        if not choices:
            raise ConfigError(f"{where}.choices is empty")
        named = {}
        for label, sets in choices.items():
            if not isinstance(sets, Mapping) or not sets:
                raise ConfigError(f"{where}.choices.{label} must map config keys to values, e.g. "
                                  f"{{task.label_mean: 0.0, task.label_std: 1.0}}; got {sets!r}")
            for k, v in sets.items():
                format_value(v)
            named[str(label)] = dict(sets)
        return Param(name, "categorical", named=named)
    if not isinstance(choices, (list, tuple)) or not choices:
        raise ConfigError(f"{where}: a categorical parameter needs a non-empty list `choices` (or a mapping of "
                          "named choices)")
    for c in choices:
        if not (c is None or isinstance(c, (bool, int, float, str))):
            raise ConfigError(f"{where}.choices: {c!r} is not a scalar (int, float, bool, str, null)")
    if len(set(map(repr, choices))) != len(choices):
        raise ConfigError(f"{where}.choices={list(choices)} has duplicates")
    return Param(name, "categorical", choices=list(choices))
