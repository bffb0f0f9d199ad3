"""Storage URL to an Optuna storage: SQLite tuned for many writers, heartbeats, masking."""

from __future__ import annotations

import os
import re
import sqlite3
import warnings
from pathlib import Path
from typing import Any

import optuna
from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback

from sweeper.errors import StorageError

HEARTBEAT_INTERVAL = 20
"""Seconds between heartbeats of a running trial."""

GRACE_PERIOD = int(os.environ.get("SWEEPER_HEARTBEAT_GRACE", "120"))
"""Seconds without a heartbeat after which a trial of a lost machine is failed."""

SQLITE_BUSY_TIMEOUT = 120.0
"""Seconds a SQLite writer waits for the lock before giving up."""

_PREFIX = "sqlite:///"


def sqlite_path(url: str) -> Path | None:
    """The database file of a SQLite URL, else None."""
    if url.startswith(_PREFIX):
        return Path(url[len(_PREFIX) :])
    return None


def mask_url(url: str) -> str:
    """The URL with any password replaced by ``***``, fit for logs and messages."""
    return re.sub(r"(://[^:/@]+:)[^@]*@", r"\1***@", url)


def retry_once() -> RetryHeartbeatStaleTrialCallback:
    """Optuna's own retry callback: enqueue a failed trial's params again, once."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return RetryHeartbeatStaleTrialCallback(max_retry=1)


def open_storage(url: str, *, create: bool = False, writer: bool = True) -> RDBStorage:
    """Open the study storage; with ``create`` a missing SQLite file is made.

    SQLite runs in WAL mode with a busy timeout, and a writer's transactions
    take the write lock up front (``BEGIN IMMEDIATE``): a deferred transaction
    that upgrades from reading to writing fails at once with "database is
    locked" when another writer got in first, whatever the timeout. A reader
    (``writer=False``, the dashboard) keeps deferred transactions, so its
    reads never hold the write lock.
    """
    path = sqlite_path(url)
    engine_kwargs: dict[str, Any] = {}
    if path is not None:
        if not path.exists() and not create:
            raise StorageError(f"no study storage at {path}; run `sweeper start` first")
        if create:
            _prepare_sqlite(path)
        engine_kwargs["connect_args"] = {"timeout": SQLITE_BUSY_TIMEOUT, "isolation_level": None}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            storage = RDBStorage(
                url,
                engine_kwargs=engine_kwargs,
                skip_table_creation=not create,
                skip_compatibility_check=not create,
                heartbeat_interval=HEARTBEAT_INTERVAL,
                grace_period=GRACE_PERIOD,
                heartbeat_stale_trial_callback=retry_once(),
            )
    except Exception as exc:  # SQLAlchemy and driver errors vary by backend
        raise StorageError(f"cannot open study storage {mask_url(url)}: {exc}") from None
    if path is not None and writer:
        from sqlalchemy import event

        event.listen(storage.engine, "begin", _begin_immediate)
    return storage


def _prepare_sqlite(path: Path) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with sqlite3.connect(path, timeout=SQLITE_BUSY_TIMEOUT) as connection:
            connection.execute("PRAGMA journal_mode=WAL")
        connection.close()
    except sqlite3.Error as exc:
        raise StorageError(f"cannot create SQLite storage {path}: {exc}") from None


def _begin_immediate(connection: Any) -> None:
    connection.exec_driver_sql("BEGIN IMMEDIATE")


def backend(study: optuna.Study) -> RDBStorage:
    """The RDB storage under a study's cache layer."""
    storage: Any = study._storage
    return getattr(storage, "_backend", storage)
