"""Optuna's GP sampler, made to see diverged trials.

TPE ranks a diverged trial below every feasible one through the constraint
sweeper sets on it. Optuna's GPSampler models COMPLETE trials only: pruned
trials, diverged or not, are invisible to it, so after trials diverge at large
learning rates it keeps proposing them (the region looks unexplored). Here the
GP also sees each diverged trial, as a complete trial at the worst value any
complete trial reached.
"""

from __future__ import annotations

from typing import Any

import optuna
from optuna.distributions import BaseDistribution
from optuna.study import StudyDirection
from optuna.trial import FrozenTrial, TrialState, create_trial


def diverged_as_worst(
    study: optuna.Study, completed: list[FrozenTrial], search_space: dict[str, BaseDistribution]
) -> list[FrozenTrial]:
    """The complete trials, and each diverged trial as a complete one at the worst value."""
    if not completed:
        return completed
    diverged = [
        t
        for t in study.get_trials(deepcopy=False, states=(TrialState.PRUNED,))
        if t.user_attrs.get("diverged") and search_space.keys() <= t.params.keys()
    ]
    if not diverged:
        return completed
    values = [t.value for t in completed if t.value is not None]
    worst = min(values) if study.direction == StudyDirection.MAXIMIZE else max(values)
    return completed + [
        create_trial(
            state=TrialState.COMPLETE,
            value=worst,
            params={name: t.params[name] for name in search_space},
            distributions={name: t.distributions[name] for name in search_space},
        )
        for t in diverged
    ]


class DivergenceAwareGPSampler(optuna.samplers.GPSampler):
    """GPSampler whose model also sees diverged trials, at the worst value (see module)."""

    def _sample_relative_impl(
        self,
        study: optuna.Study,
        completed_trials: list[FrozenTrial],
        running_trials: list[FrozenTrial],
        search_space: dict[str, BaseDistribution],
    ) -> dict[str, Any]:
        seen = diverged_as_worst(study, completed_trials, search_space)
        return super()._sample_relative_impl(study, seen, running_trials, search_space)
