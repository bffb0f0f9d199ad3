"""Create or resume the study; sampler and pruner from config; claiming trials."""

from __future__ import annotations

import contextlib
import difflib
import inspect
import os
import socket
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from sweeper.config import StudyConfig
from sweeper.errors import ConfigError, StorageError
from sweeper.samplers import DivergenceAwareGPSampler
from sweeper.space import SearchSpace, grid_space, parse_space
from sweeper.storage import open_storage, retry_once, sqlite_path

SPACE_ATTR = "sweeper:search_space"
METRIC_ATTR = "sweeper:metric"
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)


def sampler_for(config: StudyConfig, seed: int | None = None) -> optuna.samplers.BaseSampler:
    """The configured sampler; ``seed`` defaults to the study seed."""
    seed = config.study.seed if seed is None else seed
    name, options = config.sampler.name, config.sampler.options
    samplers = optuna.samplers
    if name == "grid":
        return _build(
            config,
            "sampler",
            samplers.GridSampler,
            {"seed": seed, **options},
            grid_space(config.search, config.path),
        )
    factory = {
        "tpe": samplers.TPESampler,
        "random": samplers.RandomSampler,
        "gp": DivergenceAwareGPSampler,
        "cmaes": samplers.CmaEsSampler,
        "qmc": samplers.QMCSampler,
    }[name]
    return _build(config, "sampler", factory, {"seed": seed, **options})


def pruner_for(config: StudyConfig) -> optuna.pruners.BasePruner:
    """The configured pruner (``[pruner]``), with its options."""
    pruners = optuna.pruners
    factory = {
        "median": pruners.MedianPruner,
        "percentile": pruners.PercentilePruner,
        "hyperband": pruners.HyperbandPruner,
        "asha": pruners.SuccessiveHalvingPruner,
        "threshold": pruners.ThresholdPruner,
        "none": pruners.NopPruner,
    }[config.pruner.name]
    return _build(config, "pruner", factory, config.pruner.options)


def _build(
    config: StudyConfig,
    section: str,
    factory: Any,
    options: dict[str, Any],
    *args: Any,
) -> Any:
    known = [p for p in inspect.signature(factory).parameters if p not in {"search_space", "self"}]
    for key in options:
        if key not in known:
            close = difflib.get_close_matches(key, known, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigError(
                f"{config.path}: {section}.{key}: not an option of {factory.__name__}{hint}"
            )
    try:
        with _quiet_experimental():
            return factory(*args, **options)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{config.path}: {section}: {exc}") from None


@contextlib.contextmanager
def _quiet_experimental() -> Iterator[None]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        yield


def check_plugins(config: StudyConfig) -> None:
    """Build sampler and pruner once so that bad options fail before anything is written."""
    sampler_for(config)
    pruner_for(config)


def create_or_resume(config: StudyConfig) -> optuna.Study:
    """Create the study, or load it when it exists; refuse a changed search space.

    A new SQLite file is made whole under a temporary name and then renamed
    into place, so no reader ever opens a half-made database.
    """
    space = parse_space(config.search, config.path)
    check_plugins(config)
    url = config.storage_url
    path = sqlite_path(url)
    with claim_lock(config):
        if path is not None and not path.exists():
            _create_sqlite(config, path, space)
        storage = open_storage(url, create=path is None)
        if _find(storage, config.study.name) is None:
            return _new_study(config, storage, space)
    study = _load(config, storage)
    _check_same_study(config, study, space)
    return study


def _create_sqlite(config: StudyConfig, path: Path, space: SearchSpace) -> None:
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    try:
        storage = open_storage(f"sqlite:///{partial}", create=True)
        _new_study(config, storage, space)
        storage.engine.dispose()
        os.replace(partial, path)
    finally:
        for leftover in (partial, Path(f"{partial}-wal"), Path(f"{partial}-shm")):
            leftover.unlink(missing_ok=True)


def _new_study(config: StudyConfig, storage: Any, space: SearchSpace) -> optuna.Study:
    study = optuna.create_study(
        study_name=config.study.name,
        storage=storage,
        direction=config.study.direction,
        sampler=sampler_for(config),
        pruner=pruner_for(config),
        load_if_exists=True,
    )
    study.set_user_attr(SPACE_ATTR, space.fingerprint())
    study.set_user_attr(METRIC_ATTR, config.study.metric)
    return study


def load(config: StudyConfig, seed: int | None = None) -> optuna.Study:
    """Load an existing study for reading or for running trials."""
    storage = open_storage(config.storage_url)
    if _find(storage, config.study.name) is None:
        if config.night is not None:
            raise StorageError(
                f"no night {config.night} of study {config.base_name!r} in its storage; "
                f"`sweeper history {config.path}` lists the nights"
            )
        raise StorageError(
            f"no study named {config.study.name!r} in its storage yet; run `sweeper start "
            f"{config.path}` first"
        )
    return _load(config, storage, seed)


def _load(config: StudyConfig, storage: Any, seed: int | None = None) -> optuna.Study:
    return optuna.load_study(
        study_name=config.study.name,
        storage=storage,
        sampler=sampler_for(config, seed),
        pruner=pruner_for(config),
    )


def _find(storage: Any, name: str) -> int | None:
    try:
        return int(storage.get_study_id_from_name(name))
    except KeyError:
        return None


def _check_same_study(config: StudyConfig, study: optuna.Study, space: SearchSpace) -> None:
    stored_direction = study.direction.name.lower()
    if stored_direction != config.study.direction:
        raise ConfigError(
            f"{config.path}: study.direction: the study {config.study.name!r} was created to "
            f"{stored_direction}; give the study a new name to {config.study.direction}"
        )
    stored = study.user_attrs.get(SPACE_ATTR)
    if stored is not None and stored != space.fingerprint():
        raise ConfigError(
            f"{config.path}: search: the search space changed since the study "
            f"{config.study.name!r} was created; its trials would not be comparable. Give "
            "[study] a new name (or remove its storage) to start a new study"
        )
    stored_metric = study.user_attrs.get(METRIC_ATTR)
    if stored_metric is not None and stored_metric != config.study.metric:
        raise ConfigError(
            f"{config.path}: study.metric: the study {config.study.name!r} optimizes "
            f"{stored_metric!r}; give the study a new name to optimize {config.study.metric!r}"
        )


@contextlib.contextmanager
def claim_lock(config: StudyConfig) -> Iterator[None]:
    """Serialize counting and asking among every worker of one study.

    SQLite: a file lock beside the database (one machine). PostgreSQL and
    MySQL/MariaDB: a lock held by a database session, so workers on every
    machine that joins the study take turns; the server drops it if the
    holder dies.
    """
    url = config.storage_url
    path = sqlite_path(url)
    if path is not None:
        from filelock import FileLock

        path.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(f"{path}.lock"):
            yield
    elif url.startswith(("postgresql", "postgres", "mysql", "mariadb")):
        with _advisory_lock(url, config.study.name):
            yield
    else:
        yield


@contextlib.contextmanager
def _advisory_lock(url: str, name: str) -> Iterator[None]:
    """A lock held by a database session: PostgreSQL advisory lock, MySQL/MariaDB GET_LOCK."""
    import hashlib

    import sqlalchemy as sa

    digest = hashlib.sha256(f"sweeper:{name}".encode()).digest()
    mysql = url.startswith(("mysql", "mariadb"))
    if mysql:  # MariaDB takes no negative (endless) timeout: wait up to a day
        lock = f"SELECT GET_LOCK(:key, {LOCK_WAIT})"
        unlock = "SELECT RELEASE_LOCK(:key)"
        key: int | str = f"sweeper:{digest.hex()[:40]}"  # lock names: 64 characters at most
    else:
        lock = "SELECT pg_advisory_lock(:key)"
        unlock = "SELECT pg_advisory_unlock(:key)"
        key = int.from_bytes(digest[:8], signed=True)
    engine = _lock_engine(url)
    with engine.connect() as connection:
        got = connection.execute(sa.text(lock), {"key": key}).scalar()
        if mysql and got != 1:
            raise StorageError(f"could not take the claim lock of study {name!r} in {LOCK_WAIT} s")
        try:
            yield
        finally:
            connection.execute(sa.text(unlock), {"key": key})


_ENGINES: dict[tuple[int, str], Any] = {}
LOCK_WAIT = 86400
"""Seconds a claim waits for the lock on MySQL/MariaDB before giving up."""


def _lock_engine(url: str) -> Any:
    """One engine per process and URL (a forked trial makes its own connections)."""
    import sqlalchemy as sa

    found = _ENGINES.get((os.getpid(), url))
    if found is None:
        found = _ENGINES[(os.getpid(), url)] = sa.create_engine(
            url, poolclass=sa.pool.NullPool, isolation_level="AUTOCOMMIT"
        )
    return found


def claim(study: optuna.Study, config: StudyConfig) -> optuna.Trial | None:
    """Start the next trial, or None when ``n_trials`` are finished or under way.

    Waiting trials (retries, enqueued configurations) go first. Call under
    :func:`claim_lock` so two workers cannot both take the last place.
    """
    trials = study.get_trials(deepcopy=False)
    busy = sum(t.state in (*FINISHED, TrialState.RUNNING) for t in trials)
    if busy >= config.study.n_trials:
        return None
    # Each trial gets a sampler seeded from the study seed and its number: the
    # same seed in every worker would make parallel workers suggest alike.
    study.sampler = sampler_for(config, trial_seed(config.study.seed, len(trials)))
    space = parse_space(config.search, config.path)
    with warnings.catch_warnings():
        # Heartbeats are recorded by the worker, which Optuna cannot see from here.
        warnings.filterwarnings("ignore", message="Heartbeat of storage")
        return study.ask(space.distributions)


def trial_seed(study_seed: int, number: int) -> int:
    """The seed of trial ``number``: reproducible from the study seed alone.

    Mixed through NumPy's SeedSequence: neighbouring integer seeds give
    correlated first draws in Mersenne Twister, and samplers draw few numbers.
    """
    import numpy as np

    return int(np.random.SeedSequence([study_seed, number]).generate_state(1)[0])


def counts(study: optuna.Study) -> dict[str, int]:
    """Trials per state, in lower case: complete, pruned, fail, running, waiting."""
    result = {state.name.lower(): 0 for state in TrialState}
    for trial in study.get_trials(deepcopy=False):
        result[trial.state.name.lower()] += 1
    return result


def process_alive(pid: int) -> bool:
    """Whether a process with this id exists on this machine."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def fail_and_retry(study: optuna.Study, trial: FrozenTrial, reason: str) -> None:
    """Record a trial FAIL with ``reason``, then enqueue its params again (once)."""
    storage = study._storage
    try:
        storage.set_trial_user_attr(trial._trial_id, "stop_reason", reason)
        if not storage.set_trial_state_values(trial._trial_id, state=TrialState.FAIL):
            return
    except optuna.exceptions.UpdateFinishedTrialError:
        return
    retry_once()(study, storage.get_trial(trial._trial_id))


def recover_orphans(study: optuna.Study) -> list[int]:
    """Fail and retry RUNNING trials whose process on this host is gone.

    A trial of another host is left to the heartbeat, which fails it once its
    machine has been silent for the grace period.
    """
    host = socket.gethostname()
    recovered = []
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        pid = trial.user_attrs.get("pid")
        if trial.user_attrs.get("host") != host or not isinstance(pid, int):
            continue
        if not process_alive(pid):
            fail_and_retry(study, trial, "interrupted: its process ended before the trial did")
            recovered.append(trial.number)
    fail_stale(study)
    return recovered


def fail_stale(study: optuna.Study) -> None:
    """Fail (and enqueue again, once) the trials whose heartbeat has been silent too long."""
    with _quiet_experimental():
        optuna.storages.fail_stale_trials(study)


SYSTEMATIC_AFTER = 3


def systematic_failure(study: optuna.Study) -> str | None:
    """The shared stop reason when the first trials all failed the same way, else None."""
    first = study.get_trials(deepcopy=False)[:SYSTEMATIC_AFTER]
    if len(first) < SYSTEMATIC_AFTER or any(t.state != TrialState.FAIL for t in first):
        return None
    reasons = {str(t.user_attrs.get("stop_reason", "unknown error")) for t in first}
    return reasons.pop() if len(reasons) == 1 else None
