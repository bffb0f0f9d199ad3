"""The fast trial read and the status queries give exactly what Optuna's own reads give."""

from __future__ import annotations

import math
from collections import Counter

import optuna
import pytest
from optuna.trial import TrialState

from sweeper.config import parse_config
from sweeper.store import (
    Snapshot,
    best_trial,
    counts,
    create_or_resume,
    load,
    numbers_with_user_attr,
    read_trials,
    running_trials,
    tell,
    trials_per_state,
)
from sweeper.store.rows import rdb
from tests.conftest import StudyDir, study


@pytest.mark.parametrize("small_read", [0, 1000], ids=["table by table", "in one query"])
def test_fast_read_equals_optunas_read_for_every_kind_of_trial(
    study_dir: StudyDir, monkeypatch: pytest.MonkeyPatch, small_read: int
) -> None:
    import tomllib

    from sweeper.store import rows

    monkeypatch.setattr(rows, "SMALL_READ", small_read)

    path = study_dir.write(study())
    config = parse_config(tomllib.loads(path.read_text()), path)
    created = create_or_resume(config)
    complete = created.ask()
    complete.report(0.5, 10)
    complete.report(float("nan"), 20)
    complete.set_user_attr("history", [{"step": 10, "val_acc": 0.5}])
    created.tell(complete, 0.75)
    infinite = created.ask()
    created.tell(infinite, float("inf"))
    pruned = created.ask()
    pruned.report(-math.inf, 5)
    pruned.set_user_attr("stop_reason", "diverged: loss=nan at step 5")
    created.tell(pruned, state=TrialState.PRUNED)
    created.tell(created.ask(), state=TrialState.FAIL)
    created.enqueue_trial({"lr": 0.01, "hidden": 8})
    running = created.ask()
    running.set_user_attr("step", 3)
    created.enqueue_trial({"lr": 0.02})

    reopened = optuna.load_study(study_name="tiny", storage=config.storage_url)
    fast = read_trials(reopened)
    slow = reopened.get_trials(deepcopy=False)
    assert [t.state for t in fast] == [
        TrialState.COMPLETE,
        TrialState.COMPLETE,
        TrialState.PRUNED,
        TrialState.FAIL,
        TrialState.RUNNING,
        TrialState.WAITING,
    ]
    assert math.isnan(fast[0].intermediate_values[20])
    fast[0].intermediate_values[20] = slow[0].intermediate_values[20] = 0.0  # nan != nan
    assert fast == slow
    for mine, optunas in zip(fast, slow, strict=True):
        assert mine.user_attrs == optunas.user_attrs
        assert mine.system_attrs == optunas.system_attrs
        assert mine.datetime_start == optunas.datetime_start
        assert mine.distributions == optunas.distributions


def test_other_storages_are_read_through_optuna() -> None:
    in_memory = optuna.create_study()
    in_memory.optimize(lambda trial: trial.suggest_float("x", 0, 1), n_trials=3)
    assert read_trials(in_memory) == in_memory.get_trials()


def _every_kind_of_trial(study: optuna.Study) -> None:
    """Complete (one overfit, one infeasible), pruned, diverged, failed, running, waiting."""
    complete = study.ask()
    complete.set_user_attr("overfit", {"gap": 0.2})
    study.tell(complete, 0.75)
    study.tell(study.ask(), 0.5)
    infeasible = study.ask()  # the highest value, but breaking a constraint
    infeasible.set_constraint("diverged", 1.0)
    study.tell(infeasible, 0.99)
    pruned = study.ask()
    pruned.report(0.9, 5)
    pruned.set_user_attr("overfit", None)
    study.tell(pruned, state=TrialState.PRUNED)
    diverged = study.ask()
    tell(study, diverged, TrialState.PRUNED, None, {"diverged": True, "stop_reason": "diverged"})
    study.tell(study.ask(), state=TrialState.FAIL)
    study.enqueue_trial({"lr": 0.01, "hidden": 8})
    running = study.ask()
    running.set_user_attr("overfit", {"gap": 0.1})
    study.ask().set_user_attr("history", [{"step": 1}])
    study.enqueue_trial({"lr": 0.02})


def test_status_queries_equal_optunas_reads_for_every_kind_of_trial(study_dir: StudyDir) -> None:
    import tomllib

    path = study_dir.write(study())
    config = parse_config(tomllib.loads(path.read_text()), path)
    _every_kind_of_trial(create_or_resume(config))

    mine = create_or_resume(config)
    assert rdb(mine) is not None  # the SQL is what is tested here
    optunas = optuna.load_study(study_name="tiny", storage=config.storage_url)
    every = optunas.get_trials(deepcopy=False)
    assert trials_per_state(mine) == Counter(t.state for t in every)
    assert counts(mine) == Snapshot(every, 0).counts
    assert counts(mine) == {
        "running": 2,
        "waiting": 1,
        "complete": 3,
        "pruned": 2,
        "fail": 1,
    }
    assert numbers_with_user_attr(mine, "overfit") == [
        t.number for t in every if "overfit" in t.user_attrs
    ]
    assert numbers_with_user_attr(mine, "overfit") == [0, 3, 6]
    assert running_trials(mine) == optunas.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    assert [t.user_attrs for t in running_trials(mine)] == [
        {"overfit": {"gap": 0.1}},
        {"history": [{"step": 1}]},
    ]
    best = best_trial(mine)
    assert best == optunas.best_trial
    assert best is not None and best.number == 0


def test_status_queries_on_other_storages_and_empty_studies() -> None:
    in_memory = optuna.create_study(direction="maximize")
    assert best_trial(in_memory) is None
    assert counts(in_memory) == Snapshot([], 0).counts
    _every_kind_of_trial(in_memory)
    every = in_memory.get_trials(deepcopy=False)
    assert counts(in_memory) == Snapshot(every, 0).counts
    assert numbers_with_user_attr(in_memory, "overfit") == [0, 3, 6]
    assert [t.number for t in running_trials(in_memory)] == [6, 7]
    best = best_trial(in_memory)
    assert best is not None and best.number == 0


@pytest.mark.parametrize("small_read", [64, 0], ids=["few-trials", "many-trials"])
@pytest.mark.parametrize("kind", ["sqlite", "postgresql"])
def test_a_trial_that_ends_while_running_trials_are_read_keeps_its_params(
    study_dir: StudyDir,
    monkeypatch: pytest.MonkeyPatch,
    request: pytest.FixtureRequest,
    small_read: int,
    kind: str,
) -> None:
    """The trials and their params are two statements, which a read-only reader (``sweeper
    status``, the dashboard) runs in one snapshot: a trial that finished between them is still
    read whole, as the RUNNING trial the first one found."""
    import sqlite3
    import tomllib

    import psycopg
    import sqlalchemy as sa

    from sweeper.store import rows

    monkeypatch.setattr(rows, "SMALL_READ", small_read)
    url = request.getfixturevalue("database") if kind == "postgresql" else None
    path = study_dir.write(study(study={"storage": url} if url else {}))
    config = parse_config(tomllib.loads(path.read_text()), path)
    created = create_or_resume(config)
    running = created.ask({"lr": optuna.distributions.FloatDistribution(1e-3, 1.0)})
    running.set_user_attr("slot", 0)
    reader = load(config, read_only=True)
    engine = rdb(reader).engine  # type: ignore[union-attr]

    finished: list[bool] = []

    def finish_it(conn: object, cursor: object, statement: str, *_: object) -> None:
        if "trial_params" in statement and not finished:  # between the trials and their params
            update = "UPDATE trials SET state = 'COMPLETE'"
            if url:
                with psycopg.connect(url, autocommit=True) as server:
                    server.execute(update)
            else:
                with sqlite3.connect(study_dir.db) as other:
                    other.execute(update)
            finished.append(True)

    sa.event.listen(engine, "before_cursor_execute", finish_it)
    [seen] = read_trials(reader, states=[TrialState.RUNNING])
    assert finished, "the trial finished during the read"
    assert seen.params == running.params and seen.user_attrs == {"slot": 0}


def test_a_sweeps_reads_wait_for_no_writer(
    study_dir: StudyDir, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A worker reads trials while another process writes (SQLite's write lock held): its
    reads go on from their snapshot instead of queueing for the lock behind every writer."""
    import sqlite3
    import tomllib

    from sweeper.store import open as opening
    from sweeper.store._compat import storage_of, trial_id

    monkeypatch.setattr(opening, "SQLITE_BUSY_TIMEOUT", 0.5)  # a queued read fails fast
    path = study_dir.write(study())
    config = parse_config(tomllib.loads(path.read_text()), path)
    create_or_resume(config)
    worker = load(config)
    running = worker.ask({"lr": optuna.distributions.FloatDistribution(1e-3, 1.0)})
    with sqlite3.connect(study_dir.db, isolation_level=None) as other:
        other.execute("BEGIN IMMEDIATE")  # a writer in the middle of its transaction
        other.execute("UPDATE trials SET state = state")
        [seen] = worker.get_trials(deepcopy=False)
        again = storage_of(worker).get_trial(trial_id(running))
        other.execute("COMMIT")
    assert seen.params == running.params == again.params
    assert seen.state == again.state == TrialState.RUNNING
