"""``sweeper trials``: one row per trial, as a table, JSON or CSV."""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from sweeper.errors import ConfigError
from sweeper.store.queries import first_value, named_values

STATES = {
    state.name.lower(): state
    for state in (
        TrialState.COMPLETE,
        TrialState.PRUNED,
        TrialState.FAIL,
        TrialState.RUNNING,
        TrialState.WAITING,
    )
}
"""The states ``--state`` accepts: complete, pruned, fail, running, waiting."""

COLUMNS = ("number", "state", "value", "params", "stop_reason", "duration_s")


def states_named(names: list[str]) -> set[TrialState]:
    """The states named by ``--state`` (any case); a clear error for another name."""
    chosen = set()
    for name in names:
        state = STATES.get(name.lower())
        if state is None:
            raise ConfigError(f"--state: expected one of {', '.join(STATES)}, got {name!r}")
        chosen.add(state)
    return chosen


def rows(
    study: optuna.Study, states: set[TrialState] | None = None, metrics: Sequence[str] = ()
) -> list[dict[str, Any]]:
    """The study's trials in number order, those in ``states`` only when given.

    ``metrics``: the study's, when it has several: each row then has ``values``
    by metric name (None until the trial completes).
    """
    from sweeper.store import read_trials

    return [row(t, metrics) for t in read_trials(study) if states is None or t.state in states]


def row(trial: FrozenTrial, metrics: Sequence[str] = ()) -> dict[str, Any]:
    """One trial as ``sweeper trials`` lists it; ``value`` is the first metric's."""
    started, completed = trial.datetime_start, trial.datetime_complete
    duration = (completed - started).total_seconds() if started and completed else None
    complete = trial.state == TrialState.COMPLETE
    found: dict[str, Any] = {
        "number": trial.number,
        "state": trial.state.name.lower(),
        "value": first_value(trial) if complete else None,
    }
    if len(metrics) > 1:
        found["values"] = named_values(metrics, trial) if complete else None
    return {
        **found,
        "params": dict(trial.params),
        "stop_reason": trial.user_attrs.get("stop_reason"),
        "duration_s": None if duration is None else round(duration, 3),
        "started": started.isoformat() if started else None,
        "completed": completed.isoformat() if completed else None,
    }


def to_csv(found: list[dict[str, Any]], metrics: Sequence[str] = ()) -> str:
    """One line per trial; each parameter a column of its own (``param_<name>``), and with
    several metrics each metric's value too (``value_<metric>``)."""
    names = sorted({name for r in found for name in r["params"]})
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    head = ["number", "state", "value", "stop_reason", "duration_s", "started", "completed"]
    several = list(metrics) if len(metrics) > 1 else []
    writer.writerow(head + [f"value_{m}" for m in several] + [f"param_{name}" for name in names])
    for r in found:
        cells = [r[key] for key in head]
        cells += [(r.get("values") or {}).get(m) for m in several]
        cells += [r["params"].get(name) for name in names]
        writer.writerow(["" if cell is None else cell for cell in cells])
    return buffer.getvalue()


def params_text(params: dict[str, Any]) -> str:
    return " ".join(f"{name}={_short(value)}" for name, value in params.items())


def _short(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)
