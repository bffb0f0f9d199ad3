"""Every private Optuna attribute sweeper relies on, checked once when imported.

Optuna's public API has no way to name a trial's storage id, reach the
storage under a study's cache, read trials as plain rows (also in place of
its storage's own trial reads, which its cache goes through), write several
attributes of a trial in one transaction, list the trials whose heartbeat
went silent, open a storage to read it without loading alembic, or show its
GP sampler more trials than the complete ones.
Those few accesses live here, and this module checks at import that they
still exist, so an Optuna release that moves them fails with one clear
message instead of deep inside a sweep.
"""

from __future__ import annotations

import contextlib
import copy
import datetime as dt
import inspect
import json
import logging
import re
from collections.abc import Callable, Container, Iterator, Sequence
from pathlib import Path
from typing import Any

import optuna
import sqlalchemy as sa
from optuna.distributions import (
    BaseDistribution,
    check_distribution_compatibility,
    distribution_to_json,
)
from optuna.storages import BaseStorage, RDBStorage
from optuna.storages._rdb import models
from optuna.storages._rdb.storage import _create_scoped_session
from optuna.study import StudyDirection
from optuna.trial import FrozenTrial, TrialState

from sweeper.errors import SweeperError

TESTED_MAJOR = 5
"""The Optuna major version sweeper is tested with (pyproject.toml pins it)."""

__all__ = [
    "TESTED_MAJOR",
    "attrs_with_end",
    "backend",
    "gp_sampler_seeing",
    "models",
    "params_held",
    "rdb_storage_reading",
    "stale_trial_ids",
    "storage_of",
    "study_id",
    "trial_id",
    "trials_as_read",
    "write_user_attrs",
]


class OptunaMismatch(SweeperError):
    """The installed Optuna lacks something sweeper relies on."""

    exit_code = 2


def trial_id(trial: optuna.Trial | FrozenTrial) -> int:
    """The storage id of a trial (not its number)."""
    return int(trial._trial_id)


def study_id(study: optuna.Study) -> int:
    return int(study._study_id)


def running_trial(study: optuna.Study, number: int) -> optuna.Trial:
    """The trial ``number`` of ``study`` as the process running it holds it, to tell it."""
    found = storage_of(study).get_trial_id_from_study_id_trial_number(study_id(study), number)
    return optuna.Trial(study, found)


@contextlib.contextmanager
def telling(study: optuna.Study) -> Iterator[None]:
    """Tell trials as ``study.optimize`` would: a sampler that asks the study to stop (the grid
    sampler, once every point is visited) is heard, not refused with a RuntimeError; sweeper's
    claims decide when a study has run enough."""
    local = study._thread_local
    before = local.in_optimize_loop
    local.in_optimize_loop = True
    try:
        yield
    finally:
        local.in_optimize_loop = before
        study._stop_flag = False


def storage_of(study: optuna.Study) -> BaseStorage:
    """The storage a study writes through (Optuna's cache layer over the RDB storage)."""
    storage: BaseStorage = study._storage
    return storage


def backend(study: optuna.Study) -> Any:
    """The storage under the study's cache layer: an RDBStorage for every URL sweeper opens."""
    storage = storage_of(study)
    return getattr(storage, "_backend", storage)


def stale_trial_ids(study: optuna.Study) -> list[int]:
    """Storage ids of the RUNNING trials whose heartbeat has been silent past the grace period."""
    storage = backend(study)
    if getattr(storage, "heartbeat_interval", None) is None:
        return []
    return [int(found) for found in storage._get_stale_trial_ids(study_id(study))]


@contextlib.contextmanager
def params_held(study: optuna.Study) -> Iterator[None]:
    """Hold the param writes of the trials asked for inside: :func:`write_user_attrs` writes
    them in its transaction, and what is left is written on the way out (dropped on an error).

    Optuna writes each param of a new trial in a transaction of its own; a
    claim asks for a trial and writes its owner record under the study's
    claim lock, where every transaction makes the next claim wait.
    """
    storage = backend(study)
    if not hasattr(storage, "held") or storage.held is not None:
        yield  # not sweeper's storage (nothing to hold), or already held further up
        return
    storage.held = []
    try:
        yield
        if storage.held:
            with _create_scoped_session(storage.scoped_session) as session:
                _write_held(storage, session)
    finally:
        storage.held = None


def _write_held(storage: Any, session: Any, checked: int | None = None) -> None:
    """The held param writes, in ``session``, in the order they were asked: those of trial
    ``checked`` (found RUNNING in this transaction; their distributions were checked when
    held) in one insert, any other as Optuna writes it."""
    held, storage.held = storage.held, []
    if any(found != checked for found, *_ in held):
        for param in held:
            storage._set_trial_param_without_commit(session, *param)
        return
    rows = []
    for found, name, value, distribution in held:
        text = distribution_to_json(distribution)
        rows.append(
            dict(trial_id=found, param_name=name, param_value=value, distribution_json=text)
        )
    if rows:
        session.execute(sa.insert(models.TrialParamModel.__table__), rows)


def write_user_attrs(
    study: optuna.Study, trial: optuna.Trial, attrs: dict[str, Any], first_beat: bool = False
) -> None:
    """Write several user attributes of a RUNNING trial (and, with ``first_beat``, its first
    heartbeat) in one transaction, with the params :func:`params_held` holds;
    UpdateFinishedTrialError if it has ended.

    Optuna writes each attribute in a transaction of its own (find the trial,
    check it, find the attribute, write, commit): a claim writes eight under
    the study's claim lock, and an outcome a dozen, each taking SQLite's
    write lock once.
    """
    storage = backend(study)
    found = trial_id(trial)
    if not isinstance(storage, RDBStorage):  # an in-memory study: nothing to batch
        for key, value in attrs.items():
            trial.set_user_attr(key, value)
        return
    trials = models.TrialModel.__table__
    beats = models.TrialHeartbeatModel.__table__
    with _create_scoped_session(storage.scoped_session) as session:
        state = session.execute(
            sa.select(trials.c.state).where(trials.c.trial_id == found)
        ).scalar_one_or_none()
        if state is None:
            raise KeyError(models.NOT_FOUND_MSG)
        storage.check_trial_is_updatable(found, TrialState(state))
        if getattr(storage, "held", None):
            _write_held(storage, session, checked=found)
        _upsert_user_attrs(session, found, attrs)
        if (
            first_beat
            and not session.execute(
                sa.select(beats.c.trial_heartbeat_id).where(beats.c.trial_id == found)
            ).first()
        ):
            session.execute(sa.insert(beats).values(trial_id=found))  # the column's default: now
    trial._cached_frozen_trial.user_attrs.update(attrs)


def _upsert_user_attrs(session: Any, found: int, attrs: dict[str, Any]) -> None:
    """Write the user attributes ``attrs`` of trial ``found`` in ``session``: one update of
    those it has, one insert of the others."""
    table = models.TrialUserAttributeModel.__table__
    stored_keys = {
        key: row_id
        for key, row_id in session.execute(
            sa.select(table.c.key, table.c.trial_user_attribute_id).where(
                table.c.trial_id == found
            )
        )
    }
    texts = {key: json.dumps(value) for key, value in attrs.items()}
    changed = [
        {"row": stored_keys[key], "text": text}
        for key, text in texts.items()
        if key in stored_keys
    ]
    added = [
        {"trial_id": found, "key": key, "value_json": text}
        for key, text in texts.items()
        if key not in stored_keys
    ]
    if changed:
        session.execute(
            sa.update(table)
            .where(table.c.trial_user_attribute_id == sa.bindparam("row"))
            .values(value_json=sa.bindparam("text")),
            changed,
        )
    if added:
        session.execute(sa.insert(table), added)


@contextlib.contextmanager
def trials_as_read(study: optuna.Study) -> Iterator[None]:
    """Inside, Optuna's reads of the study's trials are served from its cache as last read,
    not refreshed: a claim reads the trials first, under the claim lock, and Optuna asking
    for a trial would read them again (for its queue of waiting trials, then for the
    sampler), each time with every RUNNING trial.

    Only Optuna's cache reads through here: a waiting trial it pops is still taken by a
    write that checks its state.
    """
    storage = backend(study)
    if not hasattr(storage, "settled") or storage.settled:
        yield
        return
    storage.settled = True
    try:
        yield
    finally:
        storage.settled = False


@contextlib.contextmanager
def attrs_with_end(
    study: optuna.Study, trial: optuna.Trial, attrs: dict[str, Any]
) -> Iterator[None]:
    """Write the user attributes ``attrs`` of ``trial`` in the transaction that ends it, when
    ``study.tell`` inside records its state and values: a reader sees the trial end with its
    outcome, and the outcome costs no transaction of its own. When the trial had already
    ended, they are not written.
    """
    storage = backend(study)
    if not hasattr(storage, "ending"):  # not sweeper's storage: written apart, first
        write_user_attrs(study, trial, attrs)
        yield
        return
    storage.ending = (trial_id(trial), attrs)
    try:
        yield
    finally:
        storage.ending = None


_HEAD_VERSION: dict[str, str] = {}
"""The newest schema revision of the installed Optuna, once read."""


def newest_schema_revision() -> str | None:
    """The newest revision of Optuna's schema, read from the headers of the migration scripts
    it ships; None unless they form one chain (then alembic decides).

    Alembic, to name it, imports itself and runs every script: a third of a read command.
    """
    versions = Path(models.__file__).parent / "alembic" / "versions"
    revisions: dict[str, str | None] = {}
    for script in versions.glob("*.py"):
        text = script.read_text(encoding="utf-8")
        revision = re.search(r"^revision(?:: *str)? *= *[\"']([^\"']+)[\"'] *$", text, re.M)
        down = re.search(
            r"^down_revision(?:: *[^=]+)? *= *(?:None|[\"']([^\"']+)[\"']) *$", text, re.M
        )
        if revision is None or down is None:
            return None
        revisions[revision[1]] = down[1]
    heads = set(revisions) - set(revisions.values())
    if len(heads) != 1:
        return None
    head = heads.pop()
    chain: list[str | None] = [head]  # from the newest down to the first, whose parent is None
    while chain[-1] in revisions and len(chain) <= len(revisions):
        chain.append(revisions[chain[-1]])
    return head if chain[-1] is None and len(chain) == len(revisions) + 1 else None


TrialReader = Callable[
    [RDBStorage, int, Container[TrialState] | None, set[int], int], list[FrozenTrial]
]
"""Reads a study's trials: (storage, study id, states or None, trial ids to include
although not newer, only trials with a greater id unless -1)."""


HeldParam = tuple[int, str, float, BaseDistribution]
"""A param write Optuna asked for, checked: (trial id, name, internal value, distribution)."""


PlainReader = Callable[[RDBStorage, Callable[[sa.Connection], Any]], Any]
"""Runs a read of plain rows (a function of a connection) in a read-only transaction of its
own, and returns what it returns; any database error as Optuna's StorageInternalError."""


def rdb_storage_reading(
    read: TrialReader, read_one: Callable[[RDBStorage, int], FrozenTrial], plain: PlainReader
) -> Callable[..., RDBStorage]:
    """An RDBStorage subclass whose every trial read (its cache's too) goes through ``read``,
    whose read of one trial by its id goes through ``read_one``, whose reads of a study's
    id, directions, attributes and best trial and of the schema's revision are plain rows
    read through ``plain`` (not Optuna's ORM, whose first query costs a tenth of a read
    command), whose param writes are held while ``held`` is a list (see
    :func:`params_held`), and which writes a trial's outcome attributes in the transaction
    that ends it (see :func:`attrs_with_end`). It can open a storage as a reader (see its
    constructor)."""

    class Storage(RDBStorage):
        held: list[HeldParam] | None = None
        ending: tuple[int, dict[str, Any]] | None = None
        settled = False
        created: FrozenTrial | None = None

        def __init__(
            self,
            url: str,
            engine_kwargs: dict[str, Any] | None = None,
            *,
            reader: bool = False,
            skip_table_creation: bool = False,
            heartbeat_interval: int | None = None,
            grace_period: int | None = None,
            heartbeat_stale_trial_callback: Callable[..., None] | None = None,
            **options: Any,
        ) -> None:
            """With ``reader``, open an existing storage to read it (no table is created): its
            schema is checked by its revision, and Optuna's schema manager, which imports
            alembic and loads every migration script (a third of a read command), is made only
            if something asks for it."""
            if not reader:
                super().__init__(
                    url,
                    engine_kwargs,
                    skip_table_creation=skip_table_creation,
                    heartbeat_interval=heartbeat_interval,
                    grace_period=grace_period,
                    heartbeat_stale_trial_callback=heartbeat_stale_trial_callback,
                    **options,
                )
                return
            if options:
                raise TypeError(f"a reader takes no {', '.join(options)}")
            for name, seconds in (
                ("heartbeat_interval", heartbeat_interval),
                ("grace_period", grace_period),
            ):
                if seconds is not None and seconds <= 0:  # as Optuna's constructor refuses it
                    raise ValueError(f"The value of `{name}` should be a positive integer.")
            # What Optuna's constructor sets, but for the schema manager (see __getattr__).
            self.engine_kwargs = dict(engine_kwargs or {})
            self.url = self._fill_storage_url_template(url)
            self.skip_compatibility_check = False
            self.heartbeat_interval = heartbeat_interval
            self.grace_period = grace_period
            self.heartbeat_stale_trial_callback = heartbeat_stale_trial_callback
            self.failed_trial_callback = heartbeat_stale_trial_callback
            self._set_default_engine_kwargs_for_mysql(url, self.engine_kwargs)
            self.engine = sa.create_engine(self.url, **self.engine_kwargs)
            self.scoped_session = sa.orm.scoped_session(sa.orm.sessionmaker(bind=self.engine))
            if self.get_current_version() != self.get_head_version():
                self._version_manager.check_table_schema_compatibility()  # Optuna's message

        def __getattr__(self, name: str) -> Any:
            # A reader's schema manager, made when first asked for.
            if name != "_version_manager" or "engine" not in self.__dict__:
                raise AttributeError(name)
            from optuna.storages._rdb.storage import _VersionManager

            manager = self._version_manager = _VersionManager(
                self.url, self.engine, self.scoped_session
            )
            return manager

        def __getstate__(self) -> dict[Any, Any]:
            _ = self._version_manager  # made first: Optuna's copy of a storage drops it
            return super().__getstate__()

        def _create_new_trial(
            self, study_id: int, template_trial: FrozenTrial | None = None
        ) -> FrozenTrial:
            frozen = super()._create_new_trial(study_id, template_trial)
            # Optuna reads the trial it has just created at once, to make its Trial
            # object: the next read of one trial, if it is that one, is served from here.
            self.created = frozen if template_trial is None else None
            return frozen

        def _get_prepared_new_trial(
            self, study_id: int, template_trial: FrozenTrial | None, session: Any
        ) -> Any:
            if template_trial is not None:
                return super()._get_prepared_new_trial(study_id, template_trial, session)
            # Optuna's own steps (insert, count the study's earlier trials, number it) as
            # three statements, not through the ORM's unit of work.
            table = models.TrialModel.__table__
            start = dt.datetime.now(dt.UTC).replace(tzinfo=None)  # stored as naive UTC
            if session.get_bind().dialect.name in ("mysql", "mariadb"):  # whole seconds
                start = start.replace(microsecond=0)
            found = session.execute(
                sa.insert(table).values(
                    number=None, study_id=study_id, state=TrialState.RUNNING, datetime_start=start
                )
            ).inserted_primary_key[0]
            number = session.execute(
                sa.select(sa.func.count(table.c.trial_id)).where(
                    table.c.study_id == study_id, table.c.trial_id < found
                )
            ).scalar_one()
            session.execute(
                sa.update(table).where(table.c.trial_id == found).values(number=number)
            )
            trial = models.TrialModel(  # not added to the session: only read from
                trial_id=found, number=number, study_id=study_id, state=TrialState.RUNNING
            )
            trial.datetime_start = start.replace(tzinfo=dt.UTC)
            return trial

        def set_trial_state_values(
            self, trial_id: int, state: TrialState, values: Sequence[float] | None = None
        ) -> bool:
            if self.ending is None or self.ending[0] != trial_id or not state.is_finished():
                return super().set_trial_state_values(trial_id, state, values)
            attrs = self.ending[1]
            session = self.scoped_session()  # the thread's session, which Optuna's write uses
            written: list[bool] = []

            def write(session: Any) -> None:  # in the transaction, before it commits
                _upsert_user_attrs(session, trial_id, attrs)
                written.append(True)

            sa.event.listen(session, "before_commit", write)
            try:
                ended = super().set_trial_state_values(trial_id, state, values)
            finally:
                sa.event.remove(session, "before_commit", write)
            if ended and not written:
                raise OptunaMismatch(
                    "Optuna ended a trial outside its thread's session: its outcome was not "
                    f"written; install a tested Optuna ({TESTED_MAJOR}.x)"
                )
            return ended

        def get_head_version(self) -> str:
            # Optuna loads every migration script it ships to name the newest, for each
            # schema check: the same answer for every storage of this process.
            head = _HEAD_VERSION.get("head")
            if head is None:
                head = newest_schema_revision() or super().get_head_version()
                _HEAD_VERSION["head"] = head
            return head

        def get_current_version(self) -> str:
            table = sa.table("alembic_version", sa.column("version_num"))
            try:
                found = plain(self, lambda c: c.execute(sa.select(table.c.version_num)).all())
            except optuna.exceptions.StorageInternalError:  # no such table: Optuna says why
                found = []
            return str(found[0][0]) if len(found) == 1 else super().get_current_version()

        def get_study_id_from_name(self, study_name: str) -> int:
            studies = models.StudyModel.__table__
            named = sa.select(studies.c.study_id).where(studies.c.study_name == study_name)
            found = plain(self, lambda connection: connection.execute(named).scalar())
            if found is None:
                raise KeyError(models.NOT_FOUND_MSG)
            return int(found)

        def get_study_directions(self, study_id: int) -> list[StudyDirection]:
            rows = self._of_study(study_id, models.StudyDirectionModel, "objective", "direction")
            return [StudyDirection(direction) for _, direction in sorted(rows)]

        def get_study_user_attrs(self, study_id: int) -> dict[str, Any]:
            rows = self._of_study(study_id, models.StudyUserAttributeModel, "key", "value_json")
            return {key: json.loads(text) for key, text in rows}

        def get_study_system_attrs(self, study_id: int) -> dict[str, Any]:
            rows = self._of_study(study_id, models.StudySystemAttributeModel, "key", "value_json")
            return {key: json.loads(text) for key, text in rows}

        def _get_best_trial_id(self, study_id: int, direction: StudyDirection) -> int:
            # Optuna's query (its cache calls this), as plain rows.
            trials = models.TrialModel.__table__
            values = models.TrialValueModel.__table__
            kinds = models.TrialValueModel.TrialValueType
            kind = values.c.value_type
            rank = sa.case((kind == kinds.INF_NEG, -1), (kind == kinds.FINITE, 0), else_=1)
            order = sa.desc if direction == StudyDirection.MAXIMIZE else sa.asc
            best = (
                sa.select(trials.c.trial_id)
                .join(values, values.c.trial_id == trials.c.trial_id)
                .where(
                    trials.c.study_id == study_id,
                    trials.c.state == TrialState.COMPLETE,
                    values.c.objective == 0,
                )
                .order_by(order(rank), order(values.c.value))
                .limit(1)
            )
            found = plain(self, lambda connection: connection.execute(best).scalar())
            if found is None:
                raise ValueError(models.NOT_FOUND_MSG)
            return int(found)

        def _of_study(self, study_id: int, model: Any, *columns: str) -> list[Any]:
            """The rows of ``model``'s table (a study's child) of study ``study_id``, in the
            order they were written; KeyError, as Optuna's, when there is no such study."""
            studies = models.StudyModel.__table__
            table = model.__table__
            exists = sa.select(studies.c.study_id).where(studies.c.study_id == study_id)
            rows = (
                sa.select(*(table.c[name] for name in columns))
                .where(table.c.study_id == study_id)
                .order_by(table.primary_key.columns.values()[0])
            )

            def read(connection: sa.Connection) -> list[Any]:
                if connection.execute(exists).first() is None:
                    raise KeyError(models.NOT_FOUND_MSG)
                return list(connection.execute(rows).all())

            found: list[Any] = plain(self, read)
            return found

        def get_trial(self, trial_id: int) -> FrozenTrial:
            created, self.created = self.created, None
            if created is not None and created._trial_id == trial_id:
                return copy.deepcopy(created)
            return read_one(self, trial_id)

        def _set_trial_param(
            self,
            trial_id: int,
            param_name: str,
            param_value_internal: float,
            distribution: BaseDistribution,
            previous_distribution: BaseDistribution | None,
        ) -> None:
            if self.held is None:
                super()._set_trial_param(
                    trial_id, param_name, param_value_internal, distribution, previous_distribution
                )
                return
            if previous_distribution is not None:  # refused now, as Optuna would
                check_distribution_compatibility(previous_distribution, distribution)
            else:  # the study's own is not known here yet: Optuna's check, its write undone
                session = self.scoped_session()
                try:
                    self._set_trial_param_without_commit(
                        session, trial_id, param_name, param_value_internal, distribution
                    )
                finally:
                    session.rollback()
            self.held.append((trial_id, param_name, param_value_internal, distribution))

        def _get_trials(
            self,
            study_id: int,
            states: Container[TrialState] | None,
            included_trial_ids: set[int],
            trial_id_greater_than: int,
        ) -> list[FrozenTrial]:
            if self.settled:  # nothing new: the cache keeps what it holds
                return []
            return read(self, study_id, states, included_trial_ids, trial_id_greater_than)

    return Storage


Transform = Callable[
    [optuna.Study, list[FrozenTrial], dict[str, BaseDistribution]], list[FrozenTrial]
]


def gp_sampler_seeing(transform: Transform) -> type[optuna.samplers.GPSampler]:
    """A GPSampler subclass whose model is fitted on ``transform(study, completed, space)``."""

    class Sampler(optuna.samplers.GPSampler):
        def _sample_relative_impl(
            self,
            study: optuna.Study,
            completed_trials: list[FrozenTrial],
            running_trials: list[FrozenTrial],
            search_space: dict[str, BaseDistribution],
        ) -> dict[str, Any]:
            seen = transform(study, completed_trials, search_space)
            return super()._sample_relative_impl(study, seen, running_trials, search_space)

    return Sampler


def _check() -> None:
    """Fail at import, with the way out, when this Optuna lacks what sweeper relies on."""
    problems = []
    major = int(optuna.__version__.split(".")[0])
    if major != TESTED_MAJOR:
        problems.append(f"Optuna {optuna.__version__} is installed, sweeper is tested with 5.x")
    impl = getattr(optuna.samplers.GPSampler, "_sample_relative_impl", None)
    if impl is None or list(inspect.signature(impl).parameters) != [
        "self",
        "study",
        "completed_trials",
        "running_trials",
        "search_space",
    ]:
        problems.append("GPSampler._sample_relative_impl changed")
    expected: dict[Any, set[str]] = {
        models.TrialModel: {"trial_id", "number", "study_id", "state"},
        models.TrialParamModel: {"trial_id", "param_name", "param_value", "distribution_json"},
        models.TrialValueModel: {"trial_id", "objective", "value", "value_type"},
        models.TrialIntermediateValueModel: {
            "trial_id",
            "step",
            "intermediate_value",
            "intermediate_value_type",
        },
        models.TrialUserAttributeModel: {"trial_id", "key", "value_json"},
        models.TrialSystemAttributeModel: {"trial_id", "key", "value_json"},
        models.StudyUserAttributeModel: {"study_id", "key", "value_json"},
        models.StudySystemAttributeModel: {"study_id", "key", "value_json"},
        models.StudyModel: {"study_id", "study_name"},
        models.StudyDirectionModel: {"study_id", "objective", "direction"},
    }
    for model, columns in expected.items():
        missing = columns - set(model.__table__.columns.keys())
        if missing:
            problems.append(f"{model.__name__} lacks {', '.join(sorted(missing))}")
    get_trials = getattr(optuna.storages.RDBStorage, "_get_trials", None)
    if get_trials is None or list(inspect.signature(get_trials).parameters) != [
        "self",
        "study_id",
        "states",
        "included_trial_ids",
        "trial_id_greater_than",
    ]:
        problems.append("RDBStorage._get_trials changed")
    for model, name in (
        (models.TrialHeartbeatModel, "where_trial_id"),
        (models.TrialModel, "find_or_raise_by_id"),
    ):
        if not callable(getattr(model, name, None)):
            problems.append(f"{model.__name__}.{name} is gone")
    for name in (
        "_set_trial_param",
        "_set_trial_param_without_commit",
        "_create_new_trial",
        "_get_prepared_new_trial",
        "_get_stale_trial_ids",
        "_get_best_trial_id",
        "_fill_storage_url_template",
        "_set_default_engine_kwargs_for_mysql",
    ):
        if not callable(getattr(optuna.storages.RDBStorage, name, None)):
            problems.append(f"RDBStorage.{name} is gone")
    constructor = inspect.signature(optuna.storages.RDBStorage.__init__).parameters
    if not {"heartbeat_interval", "grace_period", "heartbeat_stale_trial_callback"} <= set(
        constructor
    ):
        problems.append("RDBStorage's constructor changed")
    kinds = getattr(models.TrialValueModel, "TrialValueType", None)
    if kinds is None or {kind.name for kind in kinds} != {"INF_NEG", "FINITE", "INF_POS"}:
        problems.append("TrialValueModel.TrialValueType changed")
    if not callable(getattr(optuna.storages._rdb.storage, "_VersionManager", None)):
        problems.append("optuna.storages._rdb.storage._VersionManager is gone")
    for model, name in (
        (models.TrialValueModel, "stored_repr_to_value"),
        (models.TrialIntermediateValueModel, "stored_repr_to_intermediate_value"),
    ):
        if not callable(getattr(model, name, None)):
            problems.append(f"{model.__name__}.{name} is gone")
    logger = logging.getLogger("optuna")
    level = logger.level
    logger.setLevel(logging.WARNING)  # "A new study created in memory" is not news
    try:
        study = optuna.create_study(storage=optuna.storages.InMemoryStorage())
        trial = study.ask()
    finally:
        logger.setLevel(level)
    for owner, name in (
        (trial, "_trial_id"),
        (trial, "_cached_frozen_trial"),
        (study, "_study_id"),
        (study, "_storage"),
        (study, "_stop_flag"),
        (study._thread_local, "in_optimize_loop"),
    ):
        if not hasattr(owner, name):
            problems.append(f"{type(owner).__name__}.{name} is gone")
    if problems:
        raise OptunaMismatch(
            "this Optuna does not fit sweeper: "
            + "; ".join(problems)
            + f"; install a tested one with `pip install 'optuna>={TESTED_MAJOR}.0,"
            f"<{TESTED_MAJOR + 1}'`"
        )


_check()
