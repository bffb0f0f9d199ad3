"""``[search]`` entries to Optuna distributions, and fixed values passed through."""

from __future__ import annotations

import difflib
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from optuna.distributions import (
    BaseDistribution,
    CategoricalDistribution,
    FloatDistribution,
    IntDistribution,
    distribution_to_json,
)

from sweeper.config import shown
from sweeper.errors import ConfigError

_RANGE_KEYS = ("low", "high", "log", "step")


@dataclass(frozen=True)
class SearchSpace:
    """What a trial samples (``distributions``) and what it is simply given (``fixed``)."""

    distributions: dict[str, BaseDistribution]
    fixed: dict[str, Any]

    def fingerprint(self) -> str:
        """A stable text form, stored on the study to detect a changed space."""
        return json.dumps(
            {
                "distributions": {
                    name: json.loads(distribution_to_json(dist))
                    for name, dist in sorted(self.distributions.items())
                },
                "fixed": {name: self.fixed[name] for name in sorted(self.fixed)},
            },
            sort_keys=True,
        )


def space_changes(stored: str, current: str) -> str:
    """What differs between two fingerprints, parameter by parameter (one line)."""

    def entries(fingerprint: str) -> dict[str, Any]:
        data = json.loads(fingerprint)
        found = {
            name: dist.get("attributes", dist) for name, dist in data["distributions"].items()
        }
        found.update({name: {"value": value} for name, value in data["fixed"].items()})
        return found

    def shown(entry: dict[str, Any]) -> str:
        return " ".join(f"{k}={json.dumps(v)}" for k, v in sorted(entry.items()) if v is not None)

    before, after = entries(stored), entries(current)
    changes = []
    for name in sorted(before.keys() | after.keys()):
        if name not in after:
            changes.append(f"{name} removed")
        elif name not in before:
            changes.append(f"{name} added")
        elif before[name] != after[name]:
            changes.append(f"{name} changed ({shown(before[name])} -> {shown(after[name])})")
    return ", ".join(changes)


def parse_space(search: Mapping[str, Any], path: Path) -> SearchSpace:
    """Turn the ``[search]`` table into a :class:`SearchSpace`, or raise ConfigError."""
    distributions: dict[str, BaseDistribution] = {}
    fixed: dict[str, Any] = {}
    for name, entry in search.items():
        key = f"{path}: search.{name}"
        if isinstance(entry, Mapping):
            distributions[name] = _distribution(key, entry)
        else:
            fixed[name] = entry
    if not distributions:
        raise ConfigError(f"{path}: search: nothing to search; give at least one range or choices")
    return SearchSpace(distributions, fixed)


def _distribution(key: str, entry: Mapping[str, Any]) -> BaseDistribution:
    if "choices" in entry:
        return _categorical(key, entry)
    unknown = [k for k in entry if k not in _RANGE_KEYS]
    if unknown:
        close = difflib.get_close_matches(unknown[0], [*_RANGE_KEYS, "choices"], n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ConfigError(f"{key}.{unknown[0]}: unknown key{hint}")
    for bound in ("low", "high"):
        if bound not in entry:
            raise ConfigError(
                f"{key}: a range needs 'low' and 'high' (or give 'choices'); '{bound}' is missing"
            )
        if not _finite(entry[bound]):
            raise ConfigError(f"{key}.{bound}: must be a number, got {shown(entry[bound])}")
    low, high = entry["low"], entry["high"]
    log = entry.get("log", False)
    step = entry.get("step")
    if not isinstance(log, bool):
        raise ConfigError(f"{key}.log: must be true or false, got {shown(log)}")
    if low >= high:
        raise ConfigError(f"{key}: low must be below high, got low={low!r} and high={high!r}")
    if log and low <= 0:
        raise ConfigError(f"{key}: a log range needs low > 0, got low={low!r}")
    if step is not None:
        if not _finite(step) or step <= 0:
            raise ConfigError(f"{key}.step: must be a positive number, got {shown(step)}")
        if log:
            raise ConfigError(f"{key}: 'step' and 'log = true' cannot be used together")
        if step > high - low:
            raise ConfigError(
                f"{key}.step: {step!r} is larger than the range from {low!r} to {high!r}, "
                "which would hold a single value; give a smaller step, or a fixed value"
            )
    if isinstance(low, int) and isinstance(high, int) and (step is None or isinstance(step, int)):
        return IntDistribution(low, high, log=log, step=step or 1)
    return FloatDistribution(float(low), float(high), log=log, step=step)


def _finite(value: Any) -> bool:
    """A number that bounds a range: no boolean, nan or infinity."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    return isinstance(value, int) or math.isfinite(value)


def _categorical(key: str, entry: Mapping[str, Any]) -> BaseDistribution:
    extra = [k for k in entry if k != "choices"]
    if extra:
        raise ConfigError(f"{key}.{extra[0]}: 'choices' takes no other keys")
    choices = entry["choices"]
    if not isinstance(choices, list) or not choices:
        raise ConfigError(f"{key}.choices: must be a non-empty list, got {shown(choices)}")
    for choice in choices:
        if not isinstance(choice, bool | int | float | str):
            raise ConfigError(f"{key}.choices: each choice must be a number, string or boolean")
        if isinstance(choice, float) and not math.isfinite(choice):
            raise ConfigError(f"{key}.choices: {choice!r} is not a choice a trial can record")
    if len(set(map(repr, choices))) != len(choices):
        raise ConfigError(f"{key}.choices: choices must be distinct, got {shown(choices)}")
    return CategoricalDistribution(choices)


def grid_space(search: Mapping[str, Any], path: Path) -> dict[str, list[Any]]:
    """Every value the grid sampler visits, per parameter."""
    grid: dict[str, list[Any]] = {}
    for name, dist in parse_space(search, path).distributions.items():
        if isinstance(dist, CategoricalDistribution):
            grid[name] = list(dist.choices)
        elif isinstance(dist, IntDistribution) and not dist.log:
            grid[name] = list(range(dist.low, dist.high + 1, dist.step))
        elif isinstance(dist, FloatDistribution) and dist.step is not None:
            count = round((dist.high - dist.low) / dist.step)
            grid[name] = [round(dist.low + i * dist.step, 12) for i in range(count + 1)]
        else:
            raise ConfigError(
                f"{path}: search.{name}: the grid sampler needs a finite set of values; "
                "give 'choices' or a 'step' (and no 'log')"
            )
    return grid
