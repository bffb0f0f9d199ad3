"""``[search]`` entries to Optuna distributions, fixed values passed through, and the
conditions (``when``) under which a parameter is searched at all."""

from __future__ import annotations

import difflib
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from optuna.distributions import (
    BaseDistribution,
    CategoricalDistribution,
    FloatDistribution,
    IntDistribution,
    distribution_to_json,
)

from sweeper.config import shown
from sweeper.errors import ConfigError

if TYPE_CHECKING:
    import optuna

_RANGE_KEYS = ("low", "high", "log", "step")
WHEN = "when"
"""The key of a ``[search]`` entry that makes it conditional: ``when = { optimizer = "sgd" }``."""
_EXAMPLE = 'e.g. when = { optimizer = "sgd" }'

Conditions = dict[str, dict[str, tuple[Any, ...]]]
"""Per conditional parameter: each categorical parameter it depends on and the values it needs."""


@dataclass(frozen=True)
class SearchSpace:
    """What a trial samples (``distributions``), what it is simply given (``fixed``), and
    when a parameter is sampled at all (``conditions``: absent means always)."""

    distributions: dict[str, BaseDistribution]
    fixed: dict[str, Any]
    conditions: Conditions = field(default_factory=dict)

    def fingerprint(self) -> str:
        """A stable text form, stored on the study to detect a changed space.

        A space without conditions has the form it had before conditions existed,
        so the studies made then still match.
        """
        form: dict[str, Any] = {
            "distributions": {
                name: json.loads(distribution_to_json(dist))
                for name, dist in sorted(self.distributions.items())
            },
            "fixed": {name: self.fixed[name] for name in sorted(self.fixed)},
        }
        if self.conditions:
            form["conditions"] = {
                name: {
                    parent: sorted(values, key=json.dumps)
                    for parent, values in sorted(when.items())
                }
                for name, when in sorted(self.conditions.items())
            }
        return json.dumps(form, sort_keys=True)

    def order(self) -> list[str]:
        """The searched parameters, each after those its condition names (file order else)."""
        placed: list[str] = []
        waiting = list(self.distributions)
        while waiting:
            ready = [n for n in waiting if set(self.conditions.get(n, {})) <= set(placed)]
            placed += ready or waiting  # nothing ready: a loop, which parse_space refuses
            waiting = [n for n in waiting if n not in placed]
        return placed

    def holds(self, name: str, params: Mapping[str, Any]) -> bool | None:
        """Whether ``name`` is searched given ``params``; None while a parent is unknown.

        A parameter named by a condition but absent from ``params`` because its own
        condition failed makes the condition fail; absent for another reason, unknown.
        """
        unknown = False
        for parent, values in self.conditions.get(name, {}).items():
            if parent in params:
                if not any(_same(params[parent], value) for value in values):
                    return False
            elif self.holds(parent, params) is False:
                return False
            else:
                unknown = True
        return None if unknown else True

    def describe(self, name: str) -> str:
        """The condition of ``name`` as the study file writes it: ``optimizer = "sgd"``."""
        return " and ".join(
            f"{parent} = {json.dumps(values[0])}"
            if len(values) == 1
            else f"{parent} in {json.dumps(list(values))}"
            for parent, values in self.conditions.get(name, {}).items()
        )


def ask(study: optuna.Study, space: SearchSpace) -> optuna.Trial:
    """A new trial of ``study`` with its parameters sampled.

    A space without conditions is asked of Optuna in one call, as it always was
    (same parameters, same seeds). A conditional one is suggested parent first,
    each parameter only where its condition holds, so it is absent elsewhere.
    """
    if not space.conditions:
        return study.ask(space.distributions)
    trial = study.ask()
    suggest(trial, space)
    return trial


def suggest(trial: optuna.Trial, space: SearchSpace) -> dict[str, Any]:
    """Suggest every parameter whose condition holds, in dependency order; the values."""
    values: dict[str, Any] = {}
    for name in space.order():
        if not space.holds(name, values):
            continue
        dist = space.distributions[name]
        if isinstance(dist, CategoricalDistribution):
            values[name] = trial.suggest_categorical(name, dist.choices)
        elif isinstance(dist, IntDistribution):
            values[name] = trial.suggest_int(
                name, dist.low, dist.high, step=dist.step, log=dist.log
            )
        else:
            assert isinstance(dist, FloatDistribution)
            values[name] = trial.suggest_float(
                name, dist.low, dist.high, step=dist.step, log=dist.log
            )
    return values


def _same(value: Any, choice: Any) -> bool:
    """Equal and of the same type: the choice ``true`` is not 1, nor ``1`` the choice 1.0."""
    return type(value) is type(choice) and value == choice


def space_changes(stored: str, current: str) -> str:
    """What differs between two fingerprints, parameter by parameter (one line)."""

    def entries(fingerprint: str) -> dict[str, Any]:
        data = json.loads(fingerprint)
        found = {
            name: dict(dist.get("attributes", dist))
            for name, dist in data["distributions"].items()
        }
        for name, when in data.get("conditions", {}).items():
            found[name][WHEN] = when
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
            distributions[name] = _distribution(key, {k: v for k, v in entry.items() if k != WHEN})
        else:
            fixed[name] = entry
    if not distributions:
        raise ConfigError(f"{path}: search: nothing to search; give at least one range or choices")
    conditions = {
        name: _condition(f"{path}: search.{name}.{WHEN}", name, entry[WHEN], search, distributions)
        for name, entry in search.items()
        if isinstance(entry, Mapping) and WHEN in entry
    }
    _refuse_cycles(path, conditions)
    return SearchSpace(distributions, fixed, conditions)


def _condition(
    key: str,
    name: str,
    when: Any,
    search: Mapping[str, Any],
    distributions: Mapping[str, BaseDistribution],
) -> dict[str, tuple[Any, ...]]:
    """One ``when`` table: each categorical parameter it names and the values it needs."""
    if not isinstance(when, Mapping) or not when:
        raise ConfigError(
            f"{key}: must be a table naming a parameter with 'choices' and the value (or list "
            f"of values) it must have, {_EXAMPLE}; got {shown(when)}"
        )
    found: dict[str, tuple[Any, ...]] = {}
    for parent, wanted in when.items():
        where = f"{key}.{parent}"
        if parent == name:
            raise ConfigError(f"{where}: a parameter cannot depend on itself")
        if parent not in search:
            close = difflib.get_close_matches(parent, list(distributions), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"{where}: no parameter {parent!r} in [search]{hint}")
        dist = distributions.get(parent)
        if not isinstance(dist, CategoricalDistribution):
            kind = "a fixed value" if dist is None else "a range"
            raise ConfigError(
                f"{where}: {parent} is {kind}; a condition names a parameter with 'choices'"
            )
        values = wanted if isinstance(wanted, list) else [wanted]
        if not values:
            raise ConfigError(f"{where}: an empty list; give a choice of {parent} or several")
        for value in values:
            if not any(_same(value, choice) for choice in dist.choices):
                raise ConfigError(
                    f"{where}: {shown(value)} is not one of the choices of {parent} "
                    f"({', '.join(map(repr, dist.choices))})"
                )
        found[parent] = tuple(values)
    return found


def _refuse_cycles(path: Path, conditions: Conditions) -> None:
    """Refuse conditions that depend on each other in a loop, naming the loop."""
    stuck = _unordered(list(conditions), conditions)
    if not stuck:
        return
    trail = [stuck[0]]
    while True:  # every parameter left unordered waits for another one left unordered
        parent = next(p for p in conditions[trail[-1]] if p in stuck)
        if parent in trail:
            loop = [*trail[trail.index(parent) :], parent]
            raise ConfigError(
                f"{path}: search.{loop[0]}.{WHEN}: the conditions form a loop "
                f"({' -> '.join(loop)}); a parameter cannot depend, even through others, "
                "on a parameter that depends on it"
            )
        trail.append(parent)


def _unordered(names: list[str], conditions: Conditions) -> list[str]:
    """The conditional parameters that cannot follow all they depend on: those of a loop."""
    placed: set[str] = set()
    waiting = names
    while waiting:
        ready = [
            n for n in waiting if all(p in placed or p not in conditions for p in conditions[n])
        ]
        if not ready:
            break
        placed |= set(ready)
        waiting = [n for n in waiting if n not in placed]
    return waiting


def _distribution(key: str, entry: Mapping[str, Any]) -> BaseDistribution:
    if "choices" in entry:
        return _categorical(key, entry)
    unknown = [k for k in entry if k not in _RANGE_KEYS]
    if unknown:
        close = difflib.get_close_matches(unknown[0], [*_RANGE_KEYS, "choices", WHEN], n=1)
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
        raise ConfigError(f"{key}.{extra[0]}: 'choices' takes no other keys but '{WHEN}'")
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
    """Every value the grid sampler visits, per parameter; a conditional space is refused.

    Optuna's grid sampler visits every combination of every parameter: it cannot
    leave a parameter out of a trial, so it would run each configuration whose
    condition fails once per value of the parameters it lacks.
    """
    space = parse_space(search, path)
    for name in space.conditions:
        raise ConfigError(
            f"{path}: search.{name}.{WHEN}: the grid sampler cannot search a parameter only "
            "under a condition (it would run the same configuration once per value of the "
            "parameters it lacks); use another sampler (tpe, random) or remove the condition"
        )
    grid: dict[str, list[Any]] = {}
    for name, dist in space.distributions.items():
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
