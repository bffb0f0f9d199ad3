"""Plain, timestamped one-line events of a running sweep, read from the study."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from optuna.trial import FrozenTrial, TrialState


def describe_value(metric: str, value: float | None) -> str:
    return f"{metric}={value:.4f}" if value is not None and math.isfinite(value) else f"{metric}=-"


@dataclass
class EventLog:
    """Turns successive snapshots of the study's trials into events."""

    metric: str
    maximize: bool
    emit: Callable[[str], None]
    clock: Callable[[], float] = time.time
    _seen: dict[int, TrialState] = field(default_factory=dict)
    _best: float | None = None

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
                self._say(f"trial {trial.number} started on {device} {_params(trial)}")
            else:
                self._finished(trial)

    def _finished(self, trial: FrozenTrial) -> None:
        reason = trial.user_attrs.get("stop_reason", "")
        if trial.state == TrialState.COMPLETE:
            value = trial.value
            line = f"trial {trial.number} completed: {describe_value(self.metric, value)}"
            if value is not None and self._improves(value):
                self._best = value
                line += " (new best)"
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


def _params(trial: FrozenTrial) -> str:
    return " ".join(f"{k}={_short(v)}" for k, v in trial.params.items())


def _short(value: object) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)
