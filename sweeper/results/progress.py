"""What a running sweep shows: timestamped one-line events, and a live table on a terminal."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from optuna.trial import FrozenTrial, TrialState

from sweeper.store.confirm import confirms, is_confirmation
from sweeper.store.queries import first_value

if TYPE_CHECKING:
    from sweeper.store import Snapshot


def describe_value(metric: str, value: float | None) -> str:
    return f"{metric}={value:.4f}" if value is not None and math.isfinite(value) else f"{metric}=-"


def describe_values(metrics: Sequence[str], values: Sequence[float] | None) -> str:
    """``val_f1=0.8123 latency_ms=2.1000``: each metric with its value (``-`` when missing)."""
    values = values or []
    return " ".join(
        describe_value(metric, values[i] if i < len(values) else None)
        for i, metric in enumerate(metrics)
    )


def describe_named(values: Mapping[str, float]) -> str:
    """``val_f1=0.8123 latency_ms=2.1000``, from values by metric name."""
    return describe_values(list(values), list(values.values()))


@dataclass
class EventLog:
    """Turns successive snapshots of the study's trials into events.

    ``metrics``: the study's; a "new best" is the first metric's, said only
    when the study has one metric (several have a Pareto front instead).
    """

    metrics: Sequence[str]
    maximize: bool
    emit: Callable[[str], None]
    clock: Callable[[], float] = time.time
    _seen: dict[int, TrialState] = field(default_factory=dict)
    _best: float | None = None

    def seen(self, trials: Sequence[FrozenTrial]) -> None:
        """Take these trials as known: only what changes after them is an event."""
        for trial in trials:
            if trial.state != TrialState.WAITING:
                self._seen[trial.number] = trial.state
            value = first_value(trial) if trial.state == TrialState.COMPLETE else None
            if value is not None and not is_confirmation(trial) and self._improves(value):
                self._best = value

    def update(self, trials: Sequence[FrozenTrial]) -> None:
        """Emit an event for each trial that started or finished since the last update."""
        for trial in trials:
            before = self._seen.get(trial.number)
            if before == trial.state or trial.state == TrialState.WAITING:
                continue
            if trial.state == TrialState.RUNNING and "device" not in trial.user_attrs:
                continue  # claimed a moment ago; reported once its slot is recorded
            self._seen[trial.number] = trial.state
            if trial.state == TrialState.RUNNING:
                device = trial.user_attrs.get("device", "?")
                self._say(
                    f"trial {trial.number}{_confirming(trial)} started on {device} "
                    f"{_params(trial)}"
                )
            else:
                self._finished(trial)

    def _finished(self, trial: FrozenTrial) -> None:
        reason = trial.user_attrs.get("stop_reason", "")
        if trial.state == TrialState.COMPLETE:
            value = first_value(trial)
            line = (
                f"trial {trial.number}{_confirming(trial)} completed: "
                f"{describe_values(self.metrics, trial.values)}"
            )
            if value is not None and not is_confirmation(trial) and self._improves(value):
                self._best = value
                line += " (new best)" if len(self.metrics) == 1 else ""
            self._say(line)
        elif trial.state == TrialState.PRUNED:
            self._say(f"trial {trial.number} pruned: {reason}")
        else:
            self._say(f"trial {trial.number} failed: {reason}")

    def _improves(self, value: float) -> bool:
        if self._best is None:
            return True
        return value > self._best if self.maximize else value < self._best

    def _say(self, message: str) -> None:
        stamp = time.strftime("%H:%M:%S", time.localtime(self.clock()))
        self.emit(f"{stamp} {message}")


def _confirming(trial: FrozenTrial) -> str:
    """`` (confirms trial 3, seed 2)`` for a confirmation (``[confirm]``), else nothing."""
    mark = confirms(trial)
    return "" if mark is None else f" (confirms trial {mark[0]}, seed {mark[1]})"


def _params(trial: FrozenTrial) -> str:
    return " ".join(f"{k}={_short(v)}" for k, v in trial.params.items())


def _short(value: object) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def study_view(snapshot: Snapshot, metric: str, maximize: bool, elapsed: float) -> Any:
    """A rich table: one line per running trial's slot, then the study line."""
    from rich.table import Table

    table = Table(box=None, pad_edge=False, show_header=True, header_style="bold")
    for column in ("slot", "device", "trial", "epoch/step", metric, "elapsed"):
        table.add_column(column)
    now = time.time()
    trials, n_trials, counts = snapshot.trials, snapshot.n_trials, snapshot.search_counts
    running = sorted(
        (t for t in trials if t.state == TrialState.RUNNING and "slot" in t.user_attrs),
        key=lambda t: t.user_attrs["slot"],
    )
    for trial in running:
        history = trial.user_attrs.get("history", [])
        last = history[-1] if history else {}
        started = trial.datetime_start.timestamp() if trial.datetime_start else now
        table.add_row(
            str(trial.user_attrs["slot"]),
            str(trial.user_attrs.get("device", "?")),
            str(trial.number),
            f"{last.get('epoch', 0)}/{last.get('step', 0)}" if last else "-",
            describe_value(metric, last.get(metric)).split("=", 1)[1],
            f"{now - started:.0f} s",
        )
    finished = snapshot.finished
    values = [
        value
        for t in snapshot.search
        if t.state == TrialState.COMPLETE and (value := first_value(t)) is not None
    ]
    best = (max if maximize else min)(values) if values else None
    left = ""
    if 0 < finished < n_trials:
        left = f", about {elapsed / finished * (n_trials - finished):.0f} s left"
    table.caption = (
        f"{finished}/{n_trials} finished ({counts['pruned']} pruned), "
        f"{counts['fail']} failed, {snapshot.counts['running']} running; "
        f"best {describe_value(metric, best)}; {elapsed:.0f} s elapsed{left}"
    )
    table.caption_justify = "left"
    return table
