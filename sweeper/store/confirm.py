"""Confirmations: the best configurations of a finished search, run again with new seeds.

A confirmation is an ordinary trial, enqueued with the params of a search
trial and two user attributes: ``confirms`` (the number of the trial whose
configuration it runs again) and ``confirm_seed`` (1 to ``[confirm] seeds``).
Its seed comes from its own trial number, as every trial's does, so each
confirmation runs with a new seed. Confirmations never count toward
``n_trials``; a study with ``[confirm]`` is complete once its search has
``n_trials`` finished trials and every confirmation of its top configurations
is finished.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

import optuna
from optuna.trial import FrozenTrial, TrialState

from sweeper.config import StudyConfig
from sweeper.store.claims import claim_lock

CONFIRMS = "confirms"
"""User attribute of a confirmation: the number of the search trial it runs again."""

CONFIRM_SEED = "confirm_seed"
"""User attribute of a confirmation: which of its configuration's new seeds it is (1, 2, ...)."""

_FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)


def is_confirmation(trial: FrozenTrial | optuna.Trial) -> bool:
    """A trial that runs a configuration of the search again (not a search trial)."""
    return isinstance(trial.user_attrs.get(CONFIRMS), int)


def confirms(trial: FrozenTrial) -> tuple[int, int] | None:
    """``(trial it confirms, seed index)`` of a confirmation, None for a search trial."""
    if not is_confirmation(trial):
        return None
    seed = trial.user_attrs.get(CONFIRM_SEED)
    return int(trial.user_attrs[CONFIRMS]), seed if isinstance(seed, int) else 0


def top_configurations(trials: Sequence[FrozenTrial], maximize: bool, k: int) -> list[FrozenTrial]:
    """The ``k`` best COMPLETE search trials with distinct params, best first.

    A configuration met more than once is represented by its best trial; ties
    go to the earlier trial, so the choice is the same on every resume.
    """
    complete = [
        t
        for t in trials
        if t.state == TrialState.COMPLETE and t.value is not None and not is_confirmation(t)
    ]
    complete.sort(key=lambda t: (-t.value if maximize else t.value, t.number))  # type: ignore[operator]
    chosen: list[FrozenTrial] = []
    seen: set[str] = set()
    for trial in complete:
        key = json.dumps(trial.params, sort_keys=True, default=str)
        if key not in seen:
            seen.add(key)
            chosen.append(trial)
        if len(chosen) == k:
            break
    return chosen


def wanted(trials: Sequence[FrozenTrial], config: StudyConfig) -> list[tuple[FrozenTrial, int]]:
    """Every confirmation the study asks for: ``(trial confirmed, seed index)``.

    None before the search has ``n_trials`` finished trials, nor without ``[confirm]``.
    """
    if config.confirm is None:
        return []
    searched = sum(t.state in _FINISHED and not is_confirmation(t) for t in trials)
    if searched < config.study.n_trials:
        return []
    maximize = config.study.maximize
    top = top_configurations(trials, maximize, config.confirm.top_k)
    return [(trial, seed) for trial in top for seed in range(1, config.confirm.seeds + 1)]


def _marks(trials: Sequence[FrozenTrial], states: Sequence[TrialState]) -> set[tuple[int, int]]:
    return {mark for t in trials if t.state in states and (mark := confirms(t)) is not None}


def enqueue_confirmations(study: optuna.Study, config: StudyConfig) -> int:
    """Enqueue the confirmations that are not finished, running or waiting; how many are left.

    Idempotent, under the study's claim lock: a resumed study (or a second
    machine) enqueues only those missing. Returns the confirmations not
    finished yet, the waiting, running and new ones together.
    """
    if config.confirm is None:
        return 0
    with claim_lock(config):
        trials = study.get_trials(deepcopy=False)
        needed = wanted(trials, config)
        present = _marks(trials, (*_FINISHED, TrialState.RUNNING, TrialState.WAITING))
        for trial, seed in needed:
            if (trial.number, seed) not in present:
                study.enqueue_trial(
                    trial.params, user_attrs={CONFIRMS: trial.number, CONFIRM_SEED: seed}
                )
        done = _marks(trials, _FINISHED)
        return sum((trial.number, seed) not in done for trial, seed in needed)


def confirmations_missing(trials: Sequence[FrozenTrial], config: StudyConfig) -> str | None:
    """What is missing of the confirmations a finished search asks for, else None."""
    needed = wanted(trials, config)
    done = _marks(trials, _FINISHED)
    left = [pair for pair in needed if (pair[0].number, pair[1]) not in done]
    if not left:
        return None
    return f"{len(needed) - len(left)} of {len(needed)} confirmation trials finished"


def confirmation_groups(trials: Sequence[FrozenTrial]) -> dict[int, list[FrozenTrial]]:
    """The finished confirmations of each confirmed trial number, by seed index."""
    groups: dict[int, list[FrozenTrial]] = {}
    for trial in trials:
        mark = confirms(trial)
        if mark is not None and trial.state in _FINISHED:
            groups.setdefault(mark[0], []).append(trial)
    for group in groups.values():
        group.sort(key=lambda t: (confirms(t) or (0, 0))[1])
    return groups
