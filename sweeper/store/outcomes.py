"""How trials end: telling a result, failing (and retrying) idempotently, orphans, counts.

"Finished", "diverged", "interrupted" and the counts are defined here once.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import optuna
from optuna.exceptions import UpdateFinishedTrialError
from optuna.trial import FrozenTrial, TrialState

from sweeper.config import StudyConfig
from sweeper.store._compat import (
    attrs_with_end,
    backend,
    stale_trial_ids,
    storage_of,
    study_id,
    telling,
    trial_id,
    write_user_attrs,
)
from sweeper.store.claims import Owner, claim_lock
from sweeper.store.confirm import is_confirmation
from sweeper.store.open import GRACE_PERIOD, is_retry, retrying
from sweeper.store.queries import trials_per_state

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)
"""The states that count toward ``n_trials``."""

INTERRUPTED = "interrupted"
"""Stop reasons of trials ended from outside (stopped sweep, lost process) start with this."""

SYSTEMATIC_AFTER = 3
"""This many task errors in a row, the same each time, at the start of a run stop it."""


ENDED = (*FINISHED, TrialState.FAIL)
"""The states of a trial that will not run again (a failed one may be retried as a new trial)."""

OUTCOMES = ("complete", "pruned", "diverged", "failed")
"""How an ended trial ended, in the order reports list them."""


def is_finished(trial: FrozenTrial) -> bool:
    """Counts toward ``n_trials``: complete or pruned (diverged trials are pruned)."""
    return trial.state in FINISHED


def has_ended(trial: FrozenTrial) -> bool:
    """Finished or failed: the trial's run is over."""
    return trial.state in ENDED


def is_diverged(trial: FrozenTrial) -> bool:
    """Stopped by the divergence guard (a pruned trial)."""
    return outcome(trial) == "diverged"


def outcome(trial: FrozenTrial) -> str:
    """One of :data:`OUTCOMES` for an ended trial; its state in lower case otherwise."""
    return outcome_of(trial.state, trial.user_attrs)


def outcome_of(state: TrialState, user_attrs: dict[str, Any]) -> str:
    """:func:`outcome` of a trial in ``state`` with these user attributes (while it is told)."""
    if state == TrialState.COMPLETE:
        return "complete"
    if state == TrialState.PRUNED:
        return "diverged" if user_attrs.get("diverged") else "pruned"
    if state == TrialState.FAIL:
        return "failed"
    return state.name.lower()


def is_task_error(trial: FrozenTrial) -> bool:
    """A FAIL raised by the task's own code (not a kill, timeout or stopped sweep)."""
    reason = str(trial.user_attrs.get("stop_reason", ""))
    return trial.state == TrialState.FAIL and reason.startswith("error:")


def tell(
    study: optuna.Study,
    trial: optuna.Trial,
    state: TrialState,
    values: float | Sequence[float] | None,
    attrs: dict[str, Any],
) -> bool:
    """Record how a trial ended, with its value (one per study metric) and attributes;
    False when it was already finished.

    A trial can be failed from outside while it runs (its time limit, a lost
    heartbeat): then the outcome recorded first stands.
    """
    try:
        if attrs.get("diverged"):
            # TPE ranks a pruned trial by how far it got: one that diverged late
            # would rank above one the median pruner stopped early, and one that
            # diverged before its first validation has no value at all. As an
            # infeasible trial it ranks below every feasible one, as it should.
            trial.set_constraint("diverged", 1.0)
        with telling(study), attrs_with_end(study, trial, attrs):
            told = study.tell(trial, values, state=state, skip_if_finished=True)
    except UpdateFinishedTrialError:
        return False
    except optuna.exceptions.StorageInternalError:
        raise
    except Exception:  # refused (a value Optuna does not take): the failure that follows
        with contextlib.suppress(UpdateFinishedTrialError):  # keeps what the trial reported
            write_user_attrs(study, trial, attrs)
        raise
    return told.state == state and told.user_attrs.get("stop_reason") == attrs.get("stop_reason")


def fail_trial(
    study: optuna.Study, config: StudyConfig, number: int, reason: str, *, retries: int | None
) -> bool:
    """Fail a RUNNING trial with ``reason`` and enqueue its params again.

    ``retries`` bounds how often one configuration is retried: 0 never (a
    timeout would hang again), 1 once (a kill, maybe out of memory), None
    without limit (interrupted from outside: it did nothing wrong).

    Idempotent: timeout, death and orphan paths may race to fail the same
    trial; the first wins and a finished trial is left as it is. False when
    the trial had already finished.
    """
    with claim_lock(config):
        storage = storage_of(study)
        found = storage.get_trial_id_from_study_id_trial_number(study_id(study), number)
        return _fail(study, found, reason, retries=retries)


def _fail(study: optuna.Study, found: int, reason: str, *, retries: int | None) -> bool:
    """Fail trial ``found`` (a storage id) under the claim lock; see :func:`fail_trial`."""
    storage = storage_of(study)
    try:
        storage.set_trial_user_attr(found, "stop_reason", reason)
        with telling(study):
            number = storage.get_trial(found).number
            told = study.tell(number, state=TrialState.FAIL, skip_if_finished=True)
    except UpdateFinishedTrialError:
        return False
    if told.state != TrialState.FAIL or told.user_attrs.get("stop_reason") != reason:
        return False
    if retries != 0:
        retrying(retries)(study, told)
    return True


def fail_orphans(
    study: optuna.Study,
    host: str,
    ownerless_reason: str | None = None,
    asker: int | None = None,
    running: Sequence[FrozenTrial] | None = None,
) -> list[int]:
    """Fail and retry the RUNNING trials whose process is gone; call under the claim lock.

    A trial without an owner was left by a process that died inside its claim
    (or, with ``ownerless_reason``, by a sampler that raised: failed, not
    retried). A trial owned on this host by a process that ended is an
    orphan once its worker is gone too (or is ``asker``, the worker asking).
    A trial of another host is left to its heartbeat (:func:`fail_stale`).
    ``running``: the RUNNING trials, where the caller has just read them.
    """
    recovered = []
    if running is None:
        running = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    for trial in running:
        owner = Owner.of(trial.user_attrs)
        if owner is None:
            reason = ownerless_reason or f"{INTERRUPTED}: its process died while claiming it"
            retries: int | None = None if ownerless_reason is None else 0
        elif owner.host == host and owner.gone(asker if asker is not None else -1):
            reason, retries = f"{INTERRUPTED}: its process ended before the trial did", None
        else:
            continue
        if _fail(study, trial_id(trial), reason, retries=retries):
            recovered.append(trial.number)
    return recovered


def recover(study: optuna.Study, config: StudyConfig) -> list[int]:
    """Fail and retry every orphan this machine can tell apart, and the trials of machines
    gone silent; the numbers of the orphans."""
    import socket

    with claim_lock(config):
        recovered = fail_orphans(study, socket.gethostname())
        fail_stale(study)
        return recovered


def drop_surplus(study: optuna.Study, now: Snapshot) -> list[int]:
    """Fail the retries still WAITING once the search is done and its confirmations wait
    (``[confirm]``); their numbers. Call under the claim lock.

    A retry enqueued while the last trials were finishing is no longer needed;
    left WAITING, Optuna would hand it out before the confirmations, and the
    search would run one trial too many. A trial enqueued on purpose (by a user,
    a warm start) is left as it is; without confirmations waiting, so is a retry,
    for a later run with a larger ``n_trials``.
    """
    if now.finished < now.n_trials or not now.confirmations_waiting:
        return []
    storage = storage_of(study)
    reason = f"{INTERRUPTED}: not run: the search already had its {now.n_trials} finished trials"
    dropped = []
    for trial in now.search:
        if trial.state == TrialState.WAITING and is_retry(trial):
            with contextlib.suppress(UpdateFinishedTrialError):
                storage.set_trial_user_attr(trial_id(trial), "stop_reason", reason)
                if storage.set_trial_state_values(trial_id(trial), TrialState.FAIL):
                    dropped.append(trial.number)
    return dropped


def fail_stale(study: optuna.Study) -> list[int]:
    """Fail and enqueue again the trials whose heartbeat has been silent too long; their numbers.

    Their machine is gone (or cut off): not the trial's fault, so retried
    without limit, with a stop reason that says so. Several machines may race
    to fail the same trial: one wins, and only its retry is enqueued.
    """
    failed = []
    reason = f"{INTERRUPTED}: its machine went silent (no heartbeat for {GRACE_PERIOD} s)"
    for found in stale_trial_ids(study):
        if _fail(study, found, reason, retries=None):
            failed.append(storage_of(study).get_trial(found).number)
    return failed


def heartbeat(study: optuna.Study, number: int) -> None:
    """Record that trial ``number`` is alive."""
    with contextlib.suppress(UpdateFinishedTrialError):
        storage = storage_of(study)
        found = storage.get_trial_id_from_study_id_trial_number(study_id(study), number)
        backend(study).record_heartbeat(found)


@dataclass
class Snapshot:
    """One read of a study's trials, and what sweeper counts in it.

    ``since`` is the first trial number of this run: failures are judged
    among this run's trials only, so a study is never poisoned by the
    failures of an earlier run.
    """

    trials: list[FrozenTrial]
    n_trials: int
    since: int = 0
    counts: dict[str, int] = field(init=False)

    def __post_init__(self) -> None:
        self.counts = _per_state(self.trials)

    @property
    def search(self) -> list[FrozenTrial]:
        """The trials of the search: every trial but the confirmations of its best."""
        return [t for t in self.trials if not is_confirmation(t)]

    @property
    def finished(self) -> int:
        """Finished trials of the search (confirmations do not count toward ``n_trials``)."""
        return sum(t.state in FINISHED for t in self.search)

    @property
    def search_counts(self) -> dict[str, int]:
        """Search trials per state, in lower case (confirmations left out)."""
        return _per_state(self.search)

    @property
    def confirmations_finished(self) -> int:
        return sum(t.state in FINISHED and is_confirmation(t) for t in self.trials)

    @property
    def search_running(self) -> int:
        return sum(t.state == TrialState.RUNNING for t in self.search)

    @property
    def confirmations_waiting(self) -> int:
        return sum(t.state == TrialState.WAITING and is_confirmation(t) for t in self.trials)

    @property
    def diverged(self) -> int:
        return sum(is_diverged(t) for t in self.trials)

    @property
    def this_run(self) -> list[FrozenTrial]:
        return [t for t in self.trials if t.number >= self.since]

    def failures(self) -> list[FrozenTrial]:
        """This run's failed trials (task errors, kills, timeouts), not those interrupted
        from outside (a stopped sweep, a machine gone silent): ``max_failures`` counts these."""
        return [
            t
            for t in self.this_run
            if t.state == TrialState.FAIL
            and not str(t.user_attrs.get("stop_reason", "")).startswith(INTERRUPTED)
        ]

    def systematic(self) -> FrozenTrial | None:
        """The last of this run's first trials when they all failed the same way in the task.

        Trials ended from outside (killed, timed out, interrupted) do not
        count: they say nothing of the task.
        """
        judged = [
            t
            for t in self.this_run
            if t.state in FINISHED or (t.state == TrialState.FAIL and is_task_error(t))
        ][:SYSTEMATIC_AFTER]
        if len(judged) < SYSTEMATIC_AFTER or not all(is_task_error(t) for t in judged):
            return None
        reasons = {str(t.user_attrs.get("stop_reason")) for t in judged}
        return judged[-1] if len(reasons) == 1 else None

    def missing(self) -> str | None:
        """What is missing when fewer than ``n_trials`` are finished, else None."""
        if self.finished >= self.n_trials:
            return None
        c = self.counts
        return (
            f"{self.finished} of {self.n_trials} trials finished ({c['fail']} failed, "
            f"{c['running']} running, {c['waiting']} waiting)"
        )


def _per_state(trials: list[FrozenTrial]) -> dict[str, int]:
    found = {state.name.lower(): 0 for state in TrialState}
    for trial in trials:
        found[trial.state.name.lower()] += 1
    return found


def snapshot(study: optuna.Study, n_trials: int, since: int = 0) -> Snapshot:
    """The study's trials as they are now (Optuna's cache keeps finished ones: cheap to repeat)."""
    return Snapshot(study.get_trials(deepcopy=False), n_trials, since)


def counts(study: optuna.Study) -> dict[str, int]:
    """Trials per state, in lower case: complete, pruned, fail, running, waiting (one query)."""
    found = trials_per_state(study)
    return {state.name.lower(): found.get(state, 0) for state in TrialState}
