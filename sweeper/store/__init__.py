"""The study storage: the only part of sweeper that touches Optuna's storage and SQLAlchemy.

Open storages (URLs through SQLAlchemy, SQLite tuned for many writers,
read-only readers), create and resume studies, claim trials under the study's
lock with an owner record, fail and retry them idempotently, recover orphans,
and read a snapshot of trial outcomes where "finished" and the counts are
defined once.
"""

from __future__ import annotations

from sweeper.store.claims import Owner, SamplerFailed, claim, claim_lock, process_start
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
    FINISHED,
    INTERRUPTED,
    Snapshot,
    counts,
    fail_stale,
    fail_trial,
    heartbeat,
    is_diverged,
    is_finished,
    recover,
    snapshot,
    tell,
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
    "FINISHED",
    "GRACE_PERIOD",
    "HEARTBEAT_INTERVAL",
    "INTERRUPTED",
    "Owner",
    "SamplerFailed",
    "Snapshot",
    "StopRequest",
    "claim",
    "claim_lock",
    "counts",
    "create_or_resume",
    "delete",
    "fail_stale",
    "fail_trial",
    "forget_connections",
    "heartbeat",
    "is_diverged",
    "is_finished",
    "is_server",
    "load",
    "load_named",
    "mask_url",
    "open_storage",
    "process_start",
    "read_trials",
    "recover",
    "request_stop",
    "snapshot",
    "sqlite_path",
    "stop_request",
    "storage_failure",
    "study_names",
    "tell",
    "withdraw_stop",
]
