"""Read every trial of a large study fast: plain rows instead of ORM objects.

Optuna's RDB storage builds one ORM object per row (trial, param, value,
attribute, intermediate value) before it builds the FrozenTrials: reading
10,000 trials that way takes seconds. Here the same tables are read as plain
rows through Optuna's own table definitions and value conversions, which is
several times faster. Anything that is not an RDB storage at the current
schema goes through Optuna as usual.

Every storage sweeper opens reads this way (:class:`FastRDBStorage`), so
Optuna's cache, the claim, ``sweeper status`` and the dashboard all do.
"""

from __future__ import annotations

import datetime as dt
import functools
import json
from collections import defaultdict
from collections.abc import Callable, Container, Iterable
from typing import Any, TypeVar

import optuna
import sqlalchemy as sa
from optuna.distributions import BaseDistribution, json_to_distribution
from optuna.storages import RDBStorage
from optuna.trial import FrozenTrial, TrialState

from sweeper.store._compat import backend, models, rdb_storage_reading, study_id

T = TypeVar("T")


def read_trials(
    study: optuna.Study, states: Iterable[TrialState] | None = None
) -> list[FrozenTrial]:
    """The study's trials (those in ``states``, or all) in number order; do not modify them."""
    storage = rdb(study)
    if storage is None:
        return study.get_trials(deepcopy=False, states=None if states is None else tuple(states))
    table = models.TrialModel.__table__
    which: int | sa.ColumnElement[bool] = study_id(study)
    if states is not None:
        which = sa.and_(table.c.study_id == which, table.c.state.in_(list(states)))
    return _connected(storage, lambda connection: _read(connection, which))


SNAPSHOT = "sweeper_snapshot"
"""The execution option of a connection that only reads, in one transaction: on SQLite a
deferred one, a snapshot that never waits for the write lock (see :mod:`sweeper.store.open`);
on PostgreSQL one of repeatable read, whose statements see one snapshot."""


def study_user_attr(study: optuna.Study, key: str) -> Any:
    """The study's user attribute ``key`` (None when unset), read as a plain row: a claim asks
    for the stop request each time, and Optuna's read of every attribute takes SQLite's write
    lock."""
    storage = backend(study)
    if not isinstance(storage, RDBStorage):
        return study.user_attrs.get(key)
    select = _study_attr()
    values = {"study": study_id(study), "key": key}
    found = _connected(storage, lambda connection: connection.execute(select, values).scalar())
    return None if found is None else json.loads(found)


def stored_study_names(storage: RDBStorage) -> list[str]:
    """The names of every study in ``storage``, oldest first, read as plain rows."""
    table = models.StudyModel.__table__
    named = sa.select(table.c.study_name).order_by(table.c.study_id)
    return _connected(storage, lambda connection: list(connection.execute(named).scalars()))


@functools.cache
def _study_attr() -> sa.Select[Any]:
    table = models.StudyUserAttributeModel.__table__
    return sa.select(table.c.value_json).where(
        table.c.study_id == sa.bindparam("study"), table.c.key == sa.bindparam("key")
    )


def _connected(storage: RDBStorage, read: Callable[[sa.Connection], T]) -> T:
    """``read`` in one read-only transaction of a connection of its own (its statements see
    one state of the study); once more on a new one when the server dropped the connection (a
    restart, a terminated session), and any other database error as Optuna's
    ``StorageInternalError``, which its own reads raise."""
    for attempt in range(2):
        try:
            with storage.engine.connect() as connection:
                options: dict[str, Any] = {SNAPSHOT: True}
                if connection.dialect.name == "postgresql":  # MySQL's default already is
                    options |= {"isolation_level": "REPEATABLE READ", "postgresql_readonly": True}
                connection.execution_options(**options)  # undone when it goes back to the pool
                with connection.begin():
                    return read(connection)
        except sa.exc.DBAPIError as exc:
            if exc.connection_invalidated and attempt == 0:
                continue
            raise optuna.exceptions.StorageInternalError(str(exc.orig or exc)) from exc
        except sa.exc.SQLAlchemyError as exc:
            raise optuna.exceptions.StorageInternalError(str(exc)) from exc
    raise AssertionError("unreachable")


def rdb(study: optuna.Study) -> RDBStorage | None:
    """The study's RDB storage when its tables can be read directly (current schema), else None."""
    storage = backend(study)
    if not isinstance(storage, RDBStorage) or not _current_schema(storage):
        return None
    return storage


def _current_schema(storage: RDBStorage) -> bool:
    try:
        return storage.get_current_version() == storage.get_head_version()
    except Exception:  # an unexpected layout: let Optuna read it
        return False


def _trials_where(
    storage: RDBStorage,
    study_id: int,
    states: Container[TrialState] | None,
    included_trial_ids: set[int],
    trial_id_greater_than: int,
) -> list[FrozenTrial]:
    """Optuna's trial read (see :data:`sweeper.store._compat.TrialReader`) as plain rows."""
    table = models.TrialModel.__table__
    where = [table.c.study_id == study_id]
    if states is not None:
        assert isinstance(states, Iterable)
        where.append(table.c.state.in_([TrialState(state) for state in states]))
    if trial_id_greater_than > -1:
        included = [i for i in included_trial_ids if i <= trial_id_greater_than]
        newer = table.c.trial_id > trial_id_greater_than
        where.append(sa.or_(table.c.trial_id.in_(included), newer) if included else newer)

    def read(connection: sa.Connection) -> list[FrozenTrial]:
        found = _read(connection, sa.and_(*where))
        studies = models.StudyModel.__table__
        if (
            not found
            and not connection.execute(
                sa.select(studies.c.study_id).where(studies.c.study_id == study_id)
            ).first()
        ):
            raise KeyError(f"No study with study_id {study_id} exists.")
        return found

    return _connected(storage, read)


def _trial(storage: RDBStorage, trial_id: int) -> FrozenTrial:
    """Optuna's read of one trial by its storage id, as plain rows.

    Optuna also reads a trial inside its own write (to name a finished trial it
    refuses to change): then the read joins that transaction, as a second one
    would wait for its lock.
    """
    which = models.TrialModel.__table__.c.trial_id == trial_id
    session = storage.scoped_session()
    if session.in_transaction():
        found = _read(session.connection(), which)
    else:
        found = _connected(storage, lambda connection: _read(connection, which))
    if not found:
        raise KeyError(f"No trial with trial-id {trial_id} exists.")
    return found[0]


FastRDBStorage = rdb_storage_reading(_trials_where, _trial, _connected)
"""Optuna's RDB storage, reading trials as plain rows (Optuna's cache reads through it)."""


def _read(connection: sa.Connection, which: int | sa.ColumnElement[bool]) -> list[FrozenTrial]:
    """The trials of study ``which`` (an id), or those a condition on the trials table picks."""
    trial_table = models.TrialModel.__table__
    picked = trial_table.c.study_id == which if isinstance(which, int) else which
    rows = connection.execute(
        sa.select(
            trial_table.c.trial_id,
            trial_table.c.number,
            trial_table.c.state,
            trial_table.c.datetime_start,
            trial_table.c.datetime_complete,
        )
        .where(picked)
        .order_by(trial_table.c.trial_id)
    ).all()
    if not rows:
        return []

    if len(rows) <= SMALL_READ:
        # the very trials read: picked again, one that changed state since would be left out
        found = _children_at_once(connection, [row[0] for row in rows])
    else:
        found = _children_apart(connection, sa.select(trial_table.c.trial_id).where(picked))
    params, values, steps, user, system = found
    distribution = functools.lru_cache(maxsize=None)(json_to_distribution)
    value_of = models.TrialValueModel.stored_repr_to_value
    step_value_of = models.TrialIntermediateValueModel.stored_repr_to_intermediate_value

    trials = []
    for trial_id, number, state, start, complete in rows:
        dists: dict[str, BaseDistribution] = {
            name: distribution(text) for name, _, text in params.get(trial_id, ())
        }
        objective_values: list[float] | None = None
        if trial_id in values:
            objective_values = [0.0] * len(values[trial_id])
            for objective, value, kind in values[trial_id]:
                objective_values[objective] = value_of(value, kind)
        trials.append(
            FrozenTrial(
                number=number,
                state=state,
                value=None,
                values=objective_values,
                datetime_start=_local(start),
                datetime_complete=_local(complete),
                params={
                    name: dists[name].to_external_repr(value)
                    for name, value, _ in params.get(trial_id, ())
                },
                distributions=dists,
                user_attrs={key: json.loads(text) for key, text in user.get(trial_id, ())},
                system_attrs={key: json.loads(text) for key, text in system.get(trial_id, ())},
                intermediate_values={
                    step: step_value_of(value, kind)
                    for step, value, kind in steps.get(trial_id, ())
                },
                trial_id=trial_id,
            )
        )
    return trials


Rows = dict[int, list[tuple[Any, ...]]]
"""A child table's rows by trial id, in the order they were written."""

SMALL_READ = 64
"""Trials up to which their child rows are read in one query: the reads of a claim and a tell
(a few trials each) save four round trips; a large read sorts faster table by table."""

CHILDREN: tuple[tuple[Any, tuple[str, ...]], ...] = (
    (models.TrialParamModel, ("param_name", "param_value", "distribution_json")),
    (models.TrialValueModel, ("objective", "value", "value_type")),
    (
        models.TrialIntermediateValueModel,
        ("step", "intermediate_value", "intermediate_value_type"),
    ),
    (models.TrialUserAttributeModel, ("key", "value_json")),
    (models.TrialSystemAttributeModel, ("key", "value_json")),
)
"""The tables of a trial's params, values, intermediate values, user and system attributes,
and the columns read of each."""


def _children_apart(connection: sa.Connection, in_study: Any) -> tuple[Rows, ...]:
    """The child rows (see :data:`CHILDREN`) of the trials ``in_study`` (a query of their ids)
    selects, by table."""
    found: list[Rows] = []
    for model, columns in CHILDREN:
        table = model.__table__
        rows: Rows = defaultdict(list)
        query = (
            sa.select(table.c.trial_id, *(table.c[name] for name in columns))
            .where(table.c.trial_id.in_(in_study))
            .order_by(table.primary_key.columns.values()[0])
        )
        for row in connection.execute(query):
            rows[row[0]].append(tuple(row[1:]))
        found.append(rows)
    return tuple(found)


SLOTS = ("name", "whole", "real", "text")
"""The columns of the one shape the child tables share in a union, named by what they hold."""


def _slot(column: Any) -> str:
    """Where a child column sits in the union's shape, by its type (a kind, an enum on
    PostgreSQL, sits with names, cast to its name)."""
    kind = column.type
    if isinstance(kind, sa.Text):
        return "text"
    if isinstance(kind, sa.String):  # Enum is a String too
        return "name"
    return "whole" if isinstance(kind, sa.Integer) else "real"


def _children_at_once(connection: sa.Connection, trial_ids: list[int]) -> tuple[Rows, ...]:
    """The child rows (see :data:`CHILDREN`) of the trials ``trial_ids``, in one query (see
    :func:`_union`); rows come back as :func:`_children_apart` gives them."""
    union, layouts = _union()
    found: tuple[Rows, ...] = tuple(defaultdict(list) for _ in CHILDREN)
    for part, trial_id, _, *cells in connection.execute(union, {"ids": trial_ids}):
        found[part][trial_id].append(
            tuple(cells[at] if kinds is None else kinds[cells[at]] for at, kinds in layouts[part])
        )
    return found


Layout = list[tuple[int, Any]]
"""Where each column of a child table sits in the union's row, and its enum class if any."""


@functools.cache
def _union() -> tuple[sa.Select[Any], list[Layout]]:
    """A union of the child tables for the trials of the expanding parameter ``ids``, each
    column in the slot its type gives it, and each table's layout in the union's rows.

    Built once: building the statement costs several times what SQLite takes to run it.
    """
    ids: sa.BindParameter[list[int]] = sa.bindparam("ids", expanding=True)
    parts = []
    layouts = []
    for index, (model, names) in enumerate(CHILDREN):
        table = model.__table__
        columns = [table.c[name] for name in names]
        placed = {_slot(column): column for column in columns}
        parts.append(
            sa.select(
                sa.literal(index, sa.Integer).label("part"),
                table.c.trial_id.label("trial_id"),
                table.primary_key.columns.values()[0].label("row_id"),
                *(
                    (sa.null() if slot not in placed else _in_slot(placed[slot])).label(slot)
                    for slot in SLOTS
                ),
            ).where(table.c.trial_id.in_(ids))
        )
        layouts.append(
            [(SLOTS.index(_slot(c)), getattr(c.type, "enum_class", None)) for c in columns]
        )
    union = sa.union_all(*parts).subquery()
    return sa.select(union).order_by(union.c.part, union.c.row_id), layouts


def _in_slot(column: Any) -> Any:
    """A column as the union holds it: an enum as its name."""
    return sa.cast(column, sa.String(512)) if isinstance(column.type, sa.Enum) else column


def _local(utc: dt.datetime | None) -> dt.datetime | None:
    """Stored naive UTC to naive local time, as Optuna's storage returns it."""
    if utc is None:
        return None
    return utc.replace(tzinfo=dt.UTC).astimezone().replace(tzinfo=None)
