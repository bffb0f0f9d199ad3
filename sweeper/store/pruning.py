"""A trial's value at each validation, reported to the study's pruner: for one metric or several.

Optuna's ``Trial.report`` and ``should_prune`` refuse studies of several
objectives. For those, sweeper keeps the first metric's intermediate values
on the trial itself (user attribute ``reported``: ``[[step, value], ...]``)
and shows the pruner the study as if it had that one metric: the first
direction, and every trial's intermediate values read from that attribute.
They are not written as Optuna's own intermediate values: its TPE sampler
ranks pruned trials by those through a single direction, which a study of
several objectives does not have.
"""

from __future__ import annotations

import copy
from collections.abc import Container
from typing import Any

import optuna
from optuna.study import StudyDirection
from optuna.trial import FrozenTrial, TrialState

from sweeper.store._compat import storage_of, trial_id, write_user_attrs

REPORTED = "reported"
"""User attribute of a trial in a study of several objectives: its first metric's
intermediate values, ``[[step, value], ...]``."""


def report(
    study: optuna.Study, trial: optuna.Trial, value: float, step: int, judge: bool = True
) -> bool:
    """Report the (first) metric's ``value`` at ``step``; True when the pruner stops the trial.

    ``judge=False`` records the value without asking the pruner (a k-fold trial's last fold:
    a whole trial is never pruned, and asking would leave ASHA a rung record).
    """
    if len(study.directions) == 1:
        trial.report(value, step)
        return judge and trial.should_prune()
    reported = [*trial.user_attrs.get(REPORTED, []), [step, value]]
    write_user_attrs(study, trial, {REPORTED: reported})
    if not judge:
        return False
    current = storage_of(study).get_trial(trial_id(trial))
    return bool(study.pruner.prune(FirstObjective(study), with_reported(current)))  # type: ignore[arg-type]


def intermediate_values(trial: FrozenTrial) -> dict[int, float]:
    """The trial's intermediate values of its (first) metric, whatever the study's objectives."""
    kept = trial.user_attrs.get(REPORTED)
    if not isinstance(kept, list):
        return trial.intermediate_values
    return {int(step): float(value) for step, value in kept}


def with_reported(trial: FrozenTrial) -> FrozenTrial:
    """A shallow copy of ``trial`` whose intermediate values are :func:`intermediate_values`."""
    if REPORTED not in trial.user_attrs:
        return trial
    seen = copy.copy(trial)
    seen.intermediate_values = intermediate_values(trial)
    return seen


class FirstObjective:
    """A study of several objectives as its pruner sees it: the first metric's alone.

    Everything but the direction and the trials' intermediate values is the
    study's own (its storage, where asynchronous successive halving keeps its rungs).
    """

    def __init__(self, study: optuna.Study) -> None:
        self._study = study

    @property
    def direction(self) -> StudyDirection:
        return self._study.directions[0]

    @property
    def directions(self) -> list[StudyDirection]:
        return [self.direction]

    def get_trials(
        self, deepcopy: bool = True, states: Container[TrialState] | None = None
    ) -> list[FrozenTrial]:
        return [with_reported(t) for t in self._study.get_trials(deepcopy=False, states=states)]

    def __getattr__(self, name: str) -> Any:
        return getattr(self._study, name)
