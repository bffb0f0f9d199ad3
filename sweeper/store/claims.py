"""Claiming trials: the study's claim lock, and an owner record written in the claim itself.

Every RUNNING trial of a study is made under its claim lock, and its owner
(host, pid, process start time) and first heartbeat are written before the
lock is released. So a RUNNING trial seen without an owner while holding the
lock was left by a process that died inside its claim, and a trial whose owner
on this host is gone (or whose pid now belongs to a newer process) is an
orphan. Both are failed and enqueued again by the next claim.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import socket
import threading
import time
import warnings
import weakref
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
import sqlalchemy as sa
from optuna.trial import TrialState

from sweeper.config import StudyConfig
from sweeper.errors import StorageError, SweeperError
from sweeper.space import ask, parse_space
from sweeper.store._compat import params_held, trials_as_read, write_user_attrs
from sweeper.store.open import (
    HEARTBEAT_INTERVAL,
    check_sqlite_path,
    first_line,
    is_server,
    mask_url,
    sqlite_path,
)
from sweeper.store.pruning import REPORTED

LOCK_WAIT = float(os.environ.get("SWEEPER_LOCK_WAIT", "600"))
"""Seconds a claim waits for the study's claim lock before giving up with a message."""


OWNER_ATTRS = ("host", "pid", "pid_start", "worker_pid", "worker_start")


class SamplerFailed(SweeperError):
    """The sampler raised while asking for a trial: its options or the study are wrong."""

    exit_code = 2


@dataclass(frozen=True)
class Owner:
    """Who runs a trial: its host, its process and, where that process was forked to claim
    it, the worker that forked it.

    A worker claims a trial and forks a process to run it, recording the
    trial's end when that process dies (the process dies with its worker):
    the worker owns the trial. Where the sampler runs torch, the forked
    process claims for its worker; it owns the trial then, and its worker
    records its end. Each process is named by pid and start time, so a pid
    reused by a newer process does not look alive. A trial is orphaned once
    both are gone.
    """

    host: str
    pid: int
    start: int | None
    worker: int | None = None
    worker_start: int | None = None

    @classmethod
    def me(cls) -> Owner:
        """This process, which records the end of the trials it claims."""
        pid = os.getpid()
        return cls(socket.gethostname(), pid, process_start(pid))

    @classmethod
    def forked(cls) -> Owner:
        """This process, forked by the worker that is its parent and records its trial's end."""
        pid, parent = os.getpid(), os.getppid()
        return cls(socket.gethostname(), pid, process_start(pid), parent, process_start(parent))

    @classmethod
    def of(cls, attrs: dict[str, Any]) -> Owner | None:
        """The owner recorded on a trial, or None when it has none."""
        host, pid = attrs.get("host"), attrs.get("pid")
        if not isinstance(host, str) or not isinstance(pid, int):
            return None

        def number(key: str) -> int | None:
            value = attrs.get(key)
            return value if isinstance(value, int) else None

        return cls(host, pid, number("pid_start"), number("worker_pid"), number("worker_start"))

    def record(self) -> dict[str, Any]:
        """The owner's user attributes, all of them (a retry carries the failed run's)."""
        values = (self.host, self.pid, self.start, self.worker, self.worker_start)
        return dict(zip(OWNER_ATTRS, values, strict=True))

    def gone(self, asker: int) -> bool:
        """Whether nobody will record this trial's end (answerable on its own host only).

        ``asker`` is the worker asking: a trial of its own whose process died
        is its to fail, although the worker is alive.
        """
        if running(self.pid, self.start):
            return False
        if self.worker is None or self.worker == asker:
            return True
        return not running(self.worker, self.worker_start)


def running(pid: int, start: int | None) -> bool:
    """Whether the process ``pid`` that started at ``start`` still runs on this machine."""
    if not process_alive(pid):
        return False
    return start is None or process_start(pid) in (None, start)


def process_start(pid: int) -> int | None:
    """When the process started, in clock ticks since boot (Linux), else None."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return int(stat.rsplit(")", 1)[1].split()[19])  # the name in (...) may hold spaces
    except (OSError, IndexError, ValueError):
        return None


def process_alive(pid: int) -> bool:
    """Whether a process with this id exists on this machine."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextlib.contextmanager
def claim_lock(config: StudyConfig, keep_session: bool = False) -> Iterator[None]:
    """Serialize claiming and failing trials among every process of one study.

    SQLite: a file lock beside the database (one machine). PostgreSQL and
    MySQL/MariaDB: a lock held by a database session, so workers on every
    machine that joins the study take turns; the server drops it if the
    holder dies. With ``keep_session`` (a worker, claiming trial after trial)
    that session is kept for this process's next claim: opening one costs the
    server a process and the claim milliseconds; otherwise it is closed. A
    claim waits at most ``LOCK_WAIT`` seconds.
    """
    url = config.storage_url
    path = sqlite_path(url)
    if path is not None:
        lock_file = f"{path}.lock"
        check_sqlite_path(path)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(lock_file, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise StorageError(
                f"cannot create the claim lock {lock_file}: {exc.strerror or exc}"
            ) from exc
        try:  # closing the file lets the lock go
            try:
                taken = _flock_within(fd, LOCK_WAIT)
            except OSError as exc:  # no locks on this file system, say
                raise StorageError(
                    f"cannot take the claim lock {lock_file}: {exc.strerror or exc}"
                ) from exc
            if not taken:
                raise StorageError(
                    f"could not take the claim lock {lock_file} in {LOCK_WAIT:g} s; another "
                    "process holds it"
                )
            yield
        finally:
            os.close(fd)
    elif is_server(url):
        with _server_lock(url, config.study.name, keep_session):
            yield
    else:
        yield


def _flock_within(fd: int, wait: float) -> bool:
    """Take the exclusive flock of ``fd`` within ``wait`` seconds; False when it stayed held.

    A contended lock is waited for in the kernel, by a thread (a blocking
    flock has no timeout of its own), which wakes the moment the holder lets
    go: waiters that poll sleep past that moment, and eight of them polling
    take the CPU the holder needs. The thread waits on a file descriptor of
    its own for the same open file, and closes it: a lock it takes after it
    was given up on goes with the file, once ``fd`` is closed too.
    """
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        pass
    own = os.dup(fd)
    ended: list[OSError | None] = []

    def take() -> None:
        try:
            fcntl.flock(own, fcntl.LOCK_EX)
            ended.append(None)
        except OSError as exc:
            ended.append(exc)
        finally:
            os.close(own)  # the lock stays with the open file, which ``fd`` holds

    waiter = threading.Thread(target=take, name="claim-lock", daemon=True)
    waiter.start()
    waiter.join(wait)  # ended, where it took the lock: no thread is left for a fork to copy
    if ended and ended[0] is not None:
        raise ended[0]
    return bool(ended)


@contextlib.contextmanager
def _server_lock(url: str, name: str, keep_session: bool) -> Iterator[None]:
    """A lock held by a database session: PostgreSQL advisory lock, MySQL/MariaDB GET_LOCK."""
    digest = hashlib.sha256(f"sweeper:{name}".encode()).digest()
    mysql = url.startswith(("mysql", "mariadb"))
    setup: str | None = None
    if mysql:
        lock = f"SELECT GET_LOCK(:key, {int(LOCK_WAIT)})"
        unlock = "SELECT RELEASE_LOCK(:key)"
        key: int | str = f"sweeper:{digest.hex()[:40]}"  # lock names: 64 characters at most
    else:
        setup = f"SET lock_timeout = {int(LOCK_WAIT * 1000)}"
        lock = "SELECT pg_advisory_lock(:key)"
        unlock = "SELECT pg_advisory_unlock(:key)"
        key = int.from_bytes(digest[:8], signed=True)
    try:
        connection = _lock_engine(url, keep_session).connect()
    except sa.exc.SQLAlchemyError as exc:
        raise StorageError(
            f"cannot reach the study storage {mask_url(url)}: {first_line(exc)}"
        ) from exc
    with connection:
        try:
            if setup is not None:
                connection.execute(sa.text(setup))
            answer = connection.execute(sa.text(lock), {"key": key}).scalar()
            got = bool(answer) if mysql else True  # pg_advisory_lock waits or raises
        except sa.exc.OperationalError as exc:
            if "lock timeout" not in str(exc):
                raise StorageError(
                    f"lost the study storage {mask_url(url)}: {first_line(exc)}"
                ) from exc
            got = False
        if not got:
            raise StorageError(
                f"could not take the claim lock of study {name!r} in {LOCK_WAIT:g} s"
            )
        try:
            yield
        finally:
            try:
                let_go = connection.execute(sa.text(unlock), {"key": key}).scalar()
            except sa.exc.SQLAlchemyError:
                let_go = False
            if not let_go:  # a session still holding the lock must not be kept: closed, it
                connection.invalidate()  # drops the lock


_ENGINES: dict[tuple[int, str, bool], Any] = {}


def _lock_engine(url: str, keep_session: bool) -> Any:
    """One engine per process, URL and way (a forked trial makes its own connections): one that
    keeps its session between claims, or one that closes it."""
    key = (os.getpid(), url, keep_session)
    found = _ENGINES.get(key)
    if found is None:
        pool: dict[str, Any] = (
            {"pool_size": 1} if keep_session else {"poolclass": sa.pool.NullPool}
        )
        found = _ENGINES[key] = sa.create_engine(
            url, isolation_level="AUTOCOMMIT", pool_pre_ping=True, **pool
        )
    return found


def before_fork(study: optuna.Study) -> None:
    """Read what a claim reads, in the process that forks trial processes.

    A forked trial starts from its parent's copy of the study: with every trial
    cached and the claim's queries compiled, its claim (under the claim lock)
    reads only the trials that changed since and compiles little.
    """
    from sweeper.store._compat import stale_trial_ids

    try:
        study.get_trials(deepcopy=False)
        stale_trial_ids(study)
    except (sa.exc.SQLAlchemyError, optuna.exceptions.StorageInternalError):
        pass  # only a head start: the trial's claim reads, and reports, for itself


_STALE_CHECKED: weakref.WeakKeyDictionary[optuna.Study, float] = weakref.WeakKeyDictionary()


def _stale_due(study: optuna.Study) -> bool:
    """Whether this process's claim looks for machines gone silent now: at most once per
    heartbeat interval (so a silent machine's trials are taken over at most that much later
    than its grace period ends), not in every claim."""
    now = time.monotonic()
    last = _STALE_CHECKED.get(study)
    if last is not None and now - last < HEARTBEAT_INTERVAL:
        return False
    _STALE_CHECKED[study] = now
    return True


def claim(
    study: optuna.Study,
    config: StudyConfig,
    owner: Owner,
    attrs: dict[str, Any],
    since: int | None = None,
) -> optuna.Trial | None:
    """Start the next trial owned by ``owner``; None when ``n_trials`` search trials are finished
    or under way and no confirmation waits, or the study was asked to stop.

    Call under :func:`claim_lock`. Orphans are failed and enqueued again
    first; waiting trials (retries, enqueued configurations) go first. With
    ``since`` (the first trial number of this run) no trial is started once
    this run's trials fail systematically or ``[study] max_failures`` times. The
    owner record, ``attrs`` and a first heartbeat are written before the
    lock is released. When the sampler raises, the trial it left is failed
    and :class:`SamplerFailed` says why.
    """
    from sweeper.plugins import sampler_for, trial_seed
    from sweeper.store.outcomes import Snapshot, drop_surplus, fail_orphans, fail_stale
    from sweeper.store.stops import stop_request

    if stop_request(study) is not None:
        return None  # `sweeper stop`: no new trial, whoever asks
    trials = study.get_trials(deepcopy=False)
    running = [t for t in trials if t.state == TrialState.RUNNING]
    stale = fail_stale(study) if _stale_due(study) else []
    if fail_orphans(study, owner.host, asker=owner.worker, running=running) + stale:
        trials = study.get_trials(deepcopy=False)
    now = Snapshot(trials, config.study.n_trials, since or 0)
    if drop_surplus(study, now):
        trials = study.get_trials(deepcopy=False)
        now = Snapshot(trials, config.study.n_trials, since or 0)
    if now.finished + now.search_running >= config.study.n_trials and not (
        now.confirmations_waiting  # the search is done: only its confirmations are left
    ):
        return None
    if since is not None and (
        now.systematic() is not None or len(now.failures()) >= config.study.max_failures
    ):
        return None
    # Each trial gets a sampler seeded from the study seed and its number: the
    # same seed in every worker would make parallel workers suggest alike.
    study.sampler = sampler_for(config, trial_seed(config.study.seed, len(trials)))
    space = parse_space(config.search, config.path)
    with params_held(study):  # written with the owner record, in one transaction
        try:
            with warnings.catch_warnings():
                # Heartbeats are recorded by the worker, which Optuna cannot see from here.
                warnings.filterwarnings("ignore", message="Heartbeat of storage")
                with trials_as_read(study):  # read above: no other claim came in since
                    trial = ask(study, space)  # parents first where the space has conditions
        except Exception as exc:
            reason = f"error: the sampler failed: {type(exc).__name__}: {exc}"
            fail_orphans(study, owner.host, ownerless_reason=reason)
            raise SamplerFailed(
                f"{config.path}: sampler: asking {config.sampler.name} for a trial failed: "
                f"{type(exc).__name__}: {exc}"
            ) from exc
        if len(study.directions) > 1 and REPORTED in trial.user_attrs:
            # A retry is enqueued with the failed run's user attributes: its own reports
            # start anew, or the pruner would judge it by the dead run's later steps.
            attrs = {**attrs, REPORTED: []}
        write_user_attrs(study, trial, {**owner.record(), **attrs}, first_beat=True)
    return trial
