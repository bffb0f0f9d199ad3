"""Read every trial of a large study fast: plain rows instead of ORM objects.

Optuna's RDB storage builds one ORM object per row (trial, param, value,
attribute, intermediate value) before it builds the FrozenTrials: reading
10,000 trials that way takes seconds. Here the same tables are read as plain
rows through Optuna's own table definitions and value conversions, which is
several times faster. Anything that is not an RDB storage at the current
schema goes through Optuna as usual.
"""

from __future__ import annotations

import datetime as dt
import functools
import json
from collections import defaultdict
from typing import Any

import optuna
import sqlalchemy as sa
from optuna.distributions import BaseDistribution, json_to_distribution
from optuna.storages import RDBStorage
from optuna.trial import FrozenTrial

from sweeper.store._compat import backend, models, study_id


def read_trials(study: optuna.Study) -> list[FrozenTrial]:
    """All trials of the study in number order (not copies: do not modify them)."""
    storage = backend(study)
    if not isinstance(storage, RDBStorage) or not _current_schema(storage):
        return study.get_trials(deepcopy=False)
    with storage.engine.connect() as connection:
        return _read(connection, study_id(study))


def _current_schema(storage: RDBStorage) -> bool:
    try:
        return storage.get_current_version() == storage.get_head_version()
    except Exception:  # an unexpected layout: let Optuna read it
        return False


def _read(connection: sa.Connection, study_id: int) -> list[FrozenTrial]:
    trial_table = models.TrialModel.__table__
    in_study = sa.select(trial_table.c.trial_id).where(trial_table.c.study_id == study_id)
    rows = connection.execute(
        sa.select(
            trial_table.c.trial_id,
            trial_table.c.number,
            trial_table.c.state,
            trial_table.c.datetime_start,
            trial_table.c.datetime_complete,
        )
        .where(trial_table.c.study_id == study_id)
        .order_by(trial_table.c.trial_id)
    ).all()

    def children(model: Any, *columns: str) -> dict[int, list[Any]]:
        table = model.__table__
        found: dict[int, list[Any]] = defaultdict(list)
        query = (
            sa.select(table.c.trial_id, *(table.c[name] for name in columns))
            .where(table.c.trial_id.in_(in_study))
            .order_by(table.c[table.primary_key.columns.keys()[0]])
        )
        for row in connection.execute(query):
            found[row[0]].append(row[1:])
        return found

    params = children(models.TrialParamModel, "param_name", "param_value", "distribution_json")
    values = children(models.TrialValueModel, "objective", "value", "value_type")
    steps = children(
        models.TrialIntermediateValueModel,
        "step",
        "intermediate_value",
        "intermediate_value_type",
    )
    user = children(models.TrialUserAttributeModel, "key", "value_json")
    system = children(models.TrialSystemAttributeModel, "key", "value_json")
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


def _local(utc: dt.datetime | None) -> dt.datetime | None:
    """Stored naive UTC to naive local time, as Optuna's storage returns it."""
    if utc is None:
        return None
    return utc.replace(tzinfo=dt.UTC).astimezone().replace(tzinfo=None)
