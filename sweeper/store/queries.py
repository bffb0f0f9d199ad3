"""Questions about a study answered by one query each, not by reading all its trials.

``sweeper status`` and ``sweeper best`` need the trials per state, the
trials carrying one user attribute, the running trials and the best trial.
On an RDB storage each is one SQL query over Optuna's tables (or Optuna's
own ordered query for the best), so they stay fast at 100,000 trials; other
storages are answered through Optuna's reads.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

import optuna
import sqlalchemy as sa
from optuna.study import StudyDirection
from optuna.trial import FrozenTrial, TrialState

from sweeper.store._compat import models, study_id
from sweeper.store.rows import rdb, read_trials


def trials_per_state(study: optuna.Study) -> dict[TrialState, int]:
    """How many trials the study has in each state (states without trials are left out)."""
    storage = rdb(study)
    if storage is None:
        return dict(Counter(t.state for t in study.get_trials(deepcopy=False)))
    table = models.TrialModel.__table__
    query = (
        sa.select(table.c.state, sa.func.count())
        .where(table.c.study_id == study_id(study))
        .group_by(table.c.state)
    )
    with storage.engine.connect() as connection:
        return {TrialState(state): int(n) for state, n in connection.execute(query)}


def numbers_with_user_attr(study: optuna.Study, key: str) -> list[int]:
    """The numbers, in order, of the trials carrying user attribute ``key`` (of any value)."""
    storage = rdb(study)
    if storage is None:
        return [t.number for t in study.get_trials(deepcopy=False) if key in t.user_attrs]
    trials = models.TrialModel.__table__
    attrs = models.TrialUserAttributeModel.__table__
    query = (
        sa.select(trials.c.number)
        .join(attrs, attrs.c.trial_id == trials.c.trial_id)
        .where(trials.c.study_id == study_id(study), attrs.c.key == key)
        .order_by(trials.c.number)
    )
    with storage.engine.connect() as connection:
        return [int(number) for number in connection.scalars(query)]


def running_trials(study: optuna.Study) -> list[FrozenTrial]:
    """The RUNNING trials in number order, read alone (Optuna's cache would read every trial)."""
    return read_trials(study, states=(TrialState.RUNNING,))


def named_values(metrics: Sequence[str], trial: FrozenTrial) -> dict[str, float] | None:
    """A trial's values by metric name; None when it has none (it did not complete)."""
    if trial.values is None:
        return None
    return dict(zip(metrics, trial.values, strict=True))


def first_value(trial: FrozenTrial) -> float | None:
    """The trial's value; in a study of several objectives, its first metric's.

    (Optuna's ``FrozenTrial.value`` raises for a trial with several values.)
    """
    return trial.values[0] if trial.values else None


def pareto_front(study: optuna.Study) -> list[FrozenTrial]:
    """The COMPLETE trials that no other complete trial dominates (as good on every metric and
    better on one), best first metric first.

    Confirmations are none of them: a study of several objectives has none.
    """
    maximize = study.directions[0] == StudyDirection.MAXIMIZE
    front = study.best_trials
    return sorted(front, key=lambda t: (-t.values[0] if maximize else t.values[0], t.number))


def best_trial(study: optuna.Study) -> FrozenTrial | None:
    """The best COMPLETE trial, or None when no trial has completed.

    Optuna's storage finds it with one query ordered by value; only when that
    trial breaks a constraint does Optuna read the complete trials to find the
    best feasible one (sweeper's diverged trials, the constrained ones, are
    pruned, so that does not happen in its studies). In a study of several
    objectives: the trial of the Pareto front best on the first metric.
    """
    if len(study.directions) > 1:
        front = pareto_front(study)
        return front[0] if front else None
    try:
        return study.best_trial
    except ValueError:
        return None
