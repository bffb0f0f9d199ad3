"""Create, resume, load and delete studies in their storage; refuse a changed study."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import optuna

from sweeper.config import StudyConfig
from sweeper.errors import ConfigError, StorageError
from sweeper.space import SearchSpace, parse_space
from sweeper.store.claims import claim_lock
from sweeper.store.open import check_database, open_storage, sqlite_path
from sweeper.store.rows import stored_study_names

SPACE_ATTR = "sweeper:search_space"
METRIC_ATTR = "sweeper:metric"


def create_or_resume(config: StudyConfig) -> optuna.Study:
    """Create the study, or load it when it exists; refuse a changed search space.

    A new SQLite file is made whole under a temporary name and then renamed
    into place, so no reader ever opens a half-made database.
    """
    space = parse_space(config.search, config.path)
    url = config.storage_url
    path = sqlite_path(url)
    if path is not None:
        check_database(path)  # before the claim lock's file is made beside it
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
    except OSError as exc:
        raise StorageError(f"cannot create SQLite storage {path}: {exc.strerror}") from exc
    finally:
        for leftover in (partial, Path(f"{partial}-wal"), Path(f"{partial}-shm")):
            leftover.unlink(missing_ok=True)


def _new_study(config: StudyConfig, storage: Any, space: SearchSpace) -> optuna.Study:
    from sweeper.plugins import pruner_for, sampler_for

    study = optuna.create_study(
        study_name=config.study.name,
        storage=storage,
        directions=list(config.study.directions),
        sampler=sampler_for(config),
        pruner=pruner_for(config),
        load_if_exists=True,
    )
    study.set_user_attr(SPACE_ATTR, space.fingerprint())
    study.set_user_attr(METRIC_ATTR, config.study.metric)  # a name, or a list of them
    return study


def load(config: StudyConfig, seed: int | None = None, *, read_only: bool = False) -> optuna.Study:
    """Load an existing study for running trials, or (``read_only``) for reading it."""
    storage = open_storage(config.storage_url, read_only=read_only)
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


def load_named(config: StudyConfig, name: str) -> optuna.Study:
    """Another study of the same storage (a night), for reading."""
    storage = open_storage(config.storage_url, read_only=True)
    return optuna.load_study(study_name=name, storage=storage)


def study_names(url: str) -> list[str]:
    """Every study name in the storage; none when a SQLite file does not exist yet."""
    path = sqlite_path(url)
    if path is not None and not path.exists():
        return []
    storage = open_storage(url, read_only=True)
    try:
        return stored_study_names(storage)
    finally:
        storage.engine.dispose()


def delete(config: StudyConfig) -> None:
    """Delete the study (its trials too) from its storage."""
    optuna.delete_study(study_name=config.study.name, storage=open_storage(config.storage_url))


def _load(config: StudyConfig, storage: Any, seed: int | None = None) -> optuna.Study:
    from sweeper.plugins import pruner_for, sampler_for

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
    stored_directions = tuple(direction.name.lower() for direction in study.directions)
    if stored_directions != config.study.directions:
        raise ConfigError(
            f"{config.path}: study.direction: the study {config.study.name!r} was created to "
            f"{' and '.join(stored_directions)}; give the study a new name to "
            f"{' and '.join(config.study.directions)}"
        )
    stored = study.user_attrs.get(SPACE_ATTR)
    if stored is not None and stored != space.fingerprint():
        from sweeper.space import space_changes

        raise ConfigError(
            f"{config.path}: search: the search space changed since the study "
            f"{config.study.name!r} was created: {space_changes(stored, space.fingerprint())}; "
            "its trials would not be comparable. Give "
            "[study] a new name (or remove its storage) to start a new study"
        )
    stored_metric = study.user_attrs.get(METRIC_ATTR)
    if stored_metric is not None and stored_metric != config.study.metric:
        raise ConfigError(
            f"{config.path}: study.metric: the study {config.study.name!r} optimizes "
            f"{stored_metric!r}; give the study a new name to optimize {config.study.metric!r}"
        )
