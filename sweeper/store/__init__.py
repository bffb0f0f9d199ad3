"""The study storage: the only part of sweeper that touches Optuna's storage and SQLAlchemy.

Open storages (URLs through SQLAlchemy, SQLite tuned for many writers,
read-only readers), create and resume studies, claim trials under the study's
lock with an owner record, fail and retry them idempotently, recover orphans,
enqueue the confirmations of a finished search's best,
read a snapshot of trial outcomes where "finished" and the counts are
defined once, and answer status questions with one query each.
"""

from __future__ import annotations

from sweeper.store._compat import running_trial
from sweeper.store.claims import (
    Owner,
    SamplerFailed,
    before_fork,
    claim,
    claim_lock,
    process_start,
)
from sweeper.store.confirm import (
    CONFIRM_SEED,
    CONFIRMS,
    confirmation_groups,
    confirmations_missing,
    confirms,
    enqueue_confirmations,
    is_confirmation,
    top_configurations,
)
from sweeper.store.open import (
    GRACE_PERIOD,
    HEARTBEAT_INTERVAL,
    forget_connections,
    is_server,
    mask_url,
    open_storage,
    sqlite_path,
    storage_failure,
)
from sweeper.store.outcomes import (
    ENDED,
    FINISHED,
    INTERRUPTED,
    OUTCOMES,
    Snapshot,
    counts,
    fail_stale,
    fail_trial,
    has_ended,
    heartbeat,
    is_diverged,
    is_finished,
    outcome,
    outcome_of,
    recover,
    snapshot,
    tell,
)
from sweeper.store.pruning import REPORTED, intermediate_values, report
from sweeper.store.queries import (
    best_trial,
    first_value,
    named_values,
    numbers_with_user_attr,
    pareto_front,
    running_trials,
    trials_per_state,
)
from sweeper.store.rows import read_trials
from sweeper.store.stops import StopRequest, request_stop, stop_request, withdraw_stop
from sweeper.store.studies import (
    create_or_resume,
    delete,
    load,
    load_named,
    study_names,
)

__all__ = [
    "CONFIRMS",
    "CONFIRM_SEED",
    "ENDED",
    "FINISHED",
    "GRACE_PERIOD",
    "HEARTBEAT_INTERVAL",
    "INTERRUPTED",
    "OUTCOMES",
    "REPORTED",
    "Owner",
    "SamplerFailed",
    "Snapshot",
    "StopRequest",
    "before_fork",
    "best_trial",
    "claim",
    "claim_lock",
    "confirmation_groups",
    "confirmations_missing",
    "confirms",
    "counts",
    "create_or_resume",
    "delete",
    "enqueue_confirmations",
    "fail_stale",
    "fail_trial",
    "first_value",
    "forget_connections",
    "has_ended",
    "heartbeat",
    "intermediate_values",
    "is_confirmation",
    "is_diverged",
    "is_finished",
    "is_server",
    "load",
    "load_named",
    "mask_url",
    "named_values",
    "numbers_with_user_attr",
    "open_storage",
    "outcome",
    "outcome_of",
    "pareto_front",
    "process_start",
    "read_trials",
    "recover",
    "report",
    "request_stop",
    "running_trial",
    "running_trials",
    "snapshot",
    "sqlite_path",
    "stop_request",
    "storage_failure",
    "study_names",
    "tell",
    "top_configurations",
    "trials_per_state",
    "withdraw_stop",
]
