"""Storage URLs to Optuna storages: SQLite tuned for many writers, read-only readers, masking."""

from __future__ import annotations

import contextlib
import os
import re
import sqlite3
import warnings
from pathlib import Path
from typing import Any

import optuna
from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback
from optuna.trial import FrozenTrial
from sqlalchemy import event
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError

from sweeper.errors import StorageError
from sweeper.store.rows import SNAPSHOT, FastRDBStorage

GRACE_PERIOD = int(os.environ.get("SWEEPER_HEARTBEAT_GRACE", "120"))
"""Seconds without a heartbeat after which a trial of a lost machine is failed."""

HEARTBEAT_INTERVAL = max(1, min(20, GRACE_PERIOD // 4))
"""Seconds between heartbeats of a running trial: well inside the grace period, so a
live trial never looks lost (20 s for the default grace of two minutes)."""

SQLITE_BUSY_TIMEOUT = 120.0
"""Seconds a SQLite writer waits for the lock before giving up."""

SERVER_SCHEMES = ("postgresql", "postgres", "mysql", "mariadb")


def parse_url(url: str) -> URL:
    """The storage URL parsed by SQLAlchemy; a clear error when it is not one."""
    try:
        return make_url(url)
    except (ArgumentError, ValueError) as exc:
        raise StorageError(f"not a storage URL: {mask_url(url)} ({exc})") from None


def usable_url(url: str) -> None:
    """Raise ValueError, with the way out, for a URL sweeper cannot keep a study in.

    Unparseable URLs (not shown: they may hold a password), unknown databases,
    and in-memory SQLite, which workers cannot share.
    """
    try:
        parsed = make_url(url)
    except Exception:  # ArgumentError, ValueError
        raise ValueError(
            "not a database URL; give e.g. sqlite:///study.db or postgresql://host/db"
        ) from None
    backend = parsed.get_backend_name()
    if backend == "sqlite" and (
        parsed.database in (None, "", ":memory:") or parsed.query.get("mode") == "memory"
    ):
        raise ValueError(
            "an in-memory SQLite database cannot be shared by workers (each would have its "
            "own); give a file, e.g. sqlite:///study.db"
        )
    try:
        parsed.get_dialect()
    except Exception:  # NoSuchModuleError, or a dialect that fails to load
        hint = "; write postgresql://" if backend == "postgres" else ""
        raise ValueError(
            f"unknown database {backend[:40]!r}{hint}; use sqlite, postgresql or mysql"
        ) from None


def relative_to(url: str, folder: Path) -> str:
    """The URL with a relative SQLite path made relative to ``folder`` (the study file's)."""
    parsed = make_url(url)
    database = parsed.database
    if (
        parsed.get_backend_name() != "sqlite"
        or not database
        or database.startswith("file:")
        or Path(database).is_absolute()
    ):
        return url
    resolved = parsed.set(database=str((folder / database).resolve()))
    return resolved.render_as_string(hide_password=False)


def sqlite_path(url: str) -> Path | None:
    """The database file of a SQLite URL, else None (also for in-memory SQLite)."""
    try:
        parsed = make_url(url)
    except (ArgumentError, ValueError):
        return None
    if parsed.get_backend_name() != "sqlite" or parsed.database in (None, "", ":memory:"):
        return None
    return Path(parsed.database)


def is_server(url: str) -> bool:
    """Whether the URL names a database server (PostgreSQL, MySQL, MariaDB)."""
    try:
        return make_url(url).get_backend_name() in SERVER_SCHEMES
    except (ArgumentError, ValueError):
        return False


def mask_url(url: str) -> str:
    """The URL with any password (user part or query) replaced by ``***``."""
    try:
        parsed = make_url(url)
    except (ArgumentError, ValueError):
        masked = re.sub(r"(://[^/@]*?:)[^@/]*@", r"\1***@", url)
    else:
        masked = parsed.render_as_string(hide_password=True)
    return re.sub(r"(?i)([?&](?:password|passwd|pwd)=)[^&]*", r"\1***", masked)


def retrying(retries: int | None) -> RetryHeartbeatStaleTrialCallback:
    """Optuna's own retry callback: enqueue a failed trial's params again, at most
    ``retries`` times over the trial's lineage (None: without limit)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return RetryHeartbeatStaleTrialCallback(max_retry=retries)


def is_retry(trial: FrozenTrial) -> bool:
    """A trial :func:`retrying` enqueued: another trial's params, run again."""
    return RetryHeartbeatStaleTrialCallback.retried_trial_number(trial) is not None


def open_storage(
    url: str, *, create: bool = False, writer: bool = True, read_only: bool = False
) -> RDBStorage:
    """Open the study storage; with ``create`` a missing SQLite file is made.

    SQLite runs in WAL mode with a busy timeout, and a writer's transactions
    take the write lock up front (``BEGIN IMMEDIATE``): a deferred transaction
    that upgrades from reading to writing fails at once with "database is
    locked" when another writer got in first, whatever the timeout. Sweeper's
    trial reads are deferred transactions (a snapshot: they wait for no
    writer, and writers wait for none of them). A reader
    (``writer=False``, the dashboard) keeps deferred transactions; a
    ``read_only`` one (status, best, report) opens the file read-only, so it
    can neither write nor take the write lock.

    The schema is checked on every open: a storage made by an older Optuna is
    a clear error naming the command that upgrades it.
    """
    parsed = parse_url(url)
    shown = mask_url(url)
    path = sqlite_path(url)
    engine_kwargs: dict[str, Any] = {}
    if path is not None:
        check_sqlite_path(path)
        check_database(path)
        if not path.exists() and not create:
            raise StorageError(f"no study storage at {path}; run `sweeper start` first")
        if create:
            _prepare_sqlite(path)
        engine_kwargs["connect_args"] = {"timeout": SQLITE_BUSY_TIMEOUT, "isolation_level": None}
        if read_only:
            url = read_only_url(path)
            writer = False
    elif is_server(url):
        # A connection the server dropped (restart, failover, terminated) is
        # replaced on its next checkout instead of failing the sweep.
        engine_kwargs["pool_pre_ping"] = True
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            storage = FastRDBStorage(
                url,
                engine_kwargs=engine_kwargs,
                reader=read_only,  # without Optuna's schema manager (see FastRDBStorage)
                skip_table_creation=not create,
                heartbeat_interval=HEARTBEAT_INTERVAL,
                grace_period=GRACE_PERIOD,
                heartbeat_stale_trial_callback=retrying(
                    None
                ),  # a lost machine: not the trial's fault
            )
    except RuntimeError as exc:
        if "optuna storage upgrade" in str(exc):
            raise StorageError(
                f"the study storage {mask_url(str(parsed))} was made by an older Optuna; "
                f"upgrade it with `optuna storage upgrade --storage '{mask_url(str(parsed))}'` "
                "(back it up first), then run again"
            ) from exc
        raise StorageError(f"cannot open study storage {shown}: {first_line(exc)}") from exc
    except Exception as exc:  # SQLAlchemy and driver errors vary by backend
        raise StorageError(f"cannot open study storage {shown}: {first_line(exc)}") from exc
    if path is not None:
        event.listen(storage.engine, "connect", _sync_on_checkpoint)
    if path is not None:
        event.listen(storage.engine, "begin", _begin_immediate if writer else _begin_snapshot)
    return storage


def read_only_url(path: Path) -> str:
    """A SQLite URL that opens ``path`` read-only: a ``file:`` URI, so a folder
    name with ``#``, ``?`` or ``%`` is escaped, not read as URI syntax.

    On a read-only file system SQLite cannot make the shared-memory file WAL
    needs; nothing can write there either, so a database without pending WAL
    content is opened as immutable (one with it needs SQLite's own read-only
    WAL path, which needs its ``-shm`` file).
    """
    query = {"mode": "ro", "uri": "true"}
    wal = path.with_name(f"{path.name}-wal")
    with contextlib.suppress(OSError):  # the open says what is wrong
        pending = wal.exists() and wal.stat().st_size > 0
        if os.statvfs(path.parent).f_flag & os.ST_RDONLY and not pending:
            query["immutable"] = "1"
    uri = path.absolute().as_uri()
    return URL.create("sqlite", database=uri, query=query).render_as_string(hide_password=False)


def check_sqlite_path(path: Path) -> None:
    """Refuse a SQLite path that names a folder, something that is not a file (a pipe would
    hang), or whose folder is a file. Only looks (``stat``): closing a file this process
    opened would drop the locks its SQLite connections hold on it."""
    if path.is_dir():
        raise StorageError(f"the storage {path} is a folder; name a database file in it")
    if path.exists() and not path.is_file():
        raise StorageError(f"the storage {path} is not a regular file; name a database file")
    parent = next((p for p in path.parents if p.exists()), None)
    if parent is not None and not parent.is_dir():
        raise StorageError(f"cannot keep the storage {path}: {parent} is a file, not a folder")


class StorageFailed(StorageError):
    """The storage failed while a sweep used it (a lost server, a read-only file)."""

    exit_code = 1


def storage_failure(exc: BaseException) -> StorageFailed:
    """A one-line error for a failure of the storage mid-command, from Optuna's wrapper."""
    cause = exc.__cause__ or exc.__context__ or exc
    return StorageFailed(
        f"the study storage failed: {first_line(cause)}; once it is back, `sweeper start` "
        "resumes the study"
    )


def first_line(exc: BaseException) -> str:
    """The first line of a database error, without SQLAlchemy's background link; under
    Optuna's "exception during the commit" wrapper, the error it wraps."""
    while isinstance(exc, optuna.exceptions.StorageInternalError) and (
        exc.__cause__ or exc.__context__
    ):
        exc = exc.__cause__ or exc.__context__  # type: ignore[assignment]
    text = str(getattr(exc, "orig", None) or exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def check_database(path: Path) -> None:
    """Refuse an existing file that is not a SQLite database (an empty one is a new one).

    SQLite reads the header itself: it keeps its locks when this connection closes.
    """
    if not path.exists() or path.stat().st_size == 0:
        return
    try:
        connection = sqlite3.connect(f"{path.absolute().as_uri()}?mode=ro", uri=True)
        try:
            connection.execute("PRAGMA schema_version")
        finally:
            connection.close()
    except sqlite3.DatabaseError as exc:
        if "not a database" in str(exc):
            raise StorageError(
                f"the storage {path} is not a SQLite database; name a new file or a study's "
                "database"
            ) from exc
        # any other trouble (a read-only mount, a lock) is for the real open to report


def _prepare_sqlite(path: Path) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with sqlite3.connect(path, timeout=SQLITE_BUSY_TIMEOUT) as connection:
            connection.execute("PRAGMA journal_mode=WAL")
        connection.close()
    except OSError as exc:
        raise StorageError(f"cannot create SQLite storage {path}: {exc.strerror or exc}") from exc
    except sqlite3.Error as exc:
        raise StorageError(f"cannot create SQLite storage {path}: {exc}") from exc


def _sync_on_checkpoint(connection: Any, _: Any) -> None:
    """WAL with ``synchronous=NORMAL``: a commit survives any process dying (a kill -9
    loses nothing), only a power cut may lose the last commits; commits stop waiting
    for the disk, which the claim's many small ones did."""
    connection.execute("PRAGMA synchronous=NORMAL")


def _begin_immediate(connection: Any) -> None:
    """A writer's transaction: it takes the write lock up front, unless it only reads
    (:data:`~sweeper.store.rows.SNAPSHOT`)."""
    connection.exec_driver_sql("BEGIN" if _snapshot(connection) else "BEGIN IMMEDIATE")


def _begin_snapshot(connection: Any) -> None:
    """A reader's transaction: one snapshot for a read of several statements; any other
    statement commits alone, as before."""
    if _snapshot(connection):
        connection.exec_driver_sql("BEGIN")


def _snapshot(connection: Any) -> bool:
    return bool(connection.get_execution_options().get(SNAPSHOT))


def forget_connections(study: optuna.Study) -> None:
    """In a forked process: drop the parent's pooled connections without closing them.

    The parent still uses them; this process opens its own on first use.
    """
    from sweeper.store._compat import backend

    backend(study).engine.dispose(close=False)
