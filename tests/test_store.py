"""Claiming, retrying and recovering trials on a real SQLite study."""

from __future__ import annotations

import contextlib
import os
import socket
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import optuna
from optuna.trial import TrialState

from sweeper.config import parse_config
from sweeper.plugins import trial_seed
from sweeper.store import (
    Owner,
    Snapshot,
    claim,
    create_or_resume,
    fail_trial,
    recover,
    request_stop,
    withdraw_stop,
)
from tests.conftest import StudyDir, study


def make(study_dir: StudyDir, **sections):
    path = study_dir.write(study(**sections))
    import tomllib

    return parse_config(tomllib.loads(path.read_text()), path)


def take(created: optuna.Study, config, owner: Owner | None = None):
    return claim(created, config, owner or Owner.me(), {})


@contextlib.contextmanager
def listening(created: optuna.Study, event: str, listener: Any) -> Iterator[None]:
    """``listener`` hears the study's storage engine's ``event`` inside."""
    import sqlalchemy as sa

    from sweeper.store._compat import backend

    engine = backend(created).engine
    sa.event.listen(engine, event, listener)
    try:
        yield
    finally:
        sa.event.remove(engine, event, listener)


@contextlib.contextmanager
def seen_before_each_commit(
    created: optuna.Study, study_dir: StudyDir, query: str
) -> Iterator[list[tuple[Any, ...]]]:
    """What another process reads with ``query`` just before each of the study's commits: the
    writes committed until then."""
    seen: list[tuple[Any, ...]] = []

    def look(*_: object) -> None:
        with sqlite3.connect(study_dir.db) as other:
            seen.append(other.execute(query).fetchone())

    with listening(created, "commit", look):
        yield seen


def test_claim_stops_at_n_trials_counting_running_ones(study_dir: StudyDir) -> None:
    config = make(study_dir, study={"n_trials": 3})
    created = create_or_resume(config)
    first, second, third = (take(created, config) for _ in range(3))
    assert take(created, config) is None, "three trials under way fill a study of three"
    created.tell(first, 0.5)
    created.tell(second, state=TrialState.FAIL)
    replacement = take(created, config)
    assert replacement is not None and replacement.number == 3
    assert take(created, config) is None
    assert third is not None


def test_no_trial_is_claimed_while_a_stop_is_requested(study_dir: StudyDir) -> None:
    config = make(study_dir, study={"n_trials": 3})
    created = create_or_resume(config)
    request_stop(created, now=False)
    assert take(created, config) is None, "stopped: no new trial"
    assert created.trials == []
    assert withdraw_stop(created) is not None
    assert take(created, config) is not None, "resumed"


def test_a_claim_writes_its_owner_and_a_first_heartbeat(study_dir: StudyDir) -> None:
    config = make(study_dir)
    created = create_or_resume(config)
    trial = take(created, config)
    stored = created.trials[trial.number]
    assert stored.user_attrs["host"] == socket.gethostname()
    assert stored.user_attrs["pid"] == os.getpid()
    assert stored.user_attrs["pid_start"] == Owner.me().start is not None
    assert trial.user_attrs["pid"] == os.getpid(), "the claimed trial object sees its owner"
    with sqlite3.connect(study_dir.db) as db:
        beats = db.execute("SELECT COUNT(*) FROM trial_heartbeats").fetchone()[0]
    assert beats == 1


def test_failed_trial_is_retried_once_with_its_params(study_dir: StudyDir) -> None:
    config = make(study_dir, study={"n_trials": 5})
    created = create_or_resume(config)
    trial = take(created, config)
    assert fail_trial(created, config, trial.number, "killed by signal 9 (SIGKILL)", retries=1)
    retry = take(created, config)
    assert retry.params == trial.params
    assert created.trials[retry.number].user_attrs["pid"] == os.getpid(), "a retry has an owner"
    assert created.trials[trial.number].user_attrs["stop_reason"] == "killed by signal 9 (SIGKILL)"
    fail_trial(created, config, retry.number, "killed again", retries=1)
    fresh = take(created, config)
    stored = created.trials[fresh.number]
    assert stored.system_attrs.get("failed_trial") is None, "a retry is not retried again"


def test_failing_is_idempotent_and_never_touches_a_finished_trial(study_dir: StudyDir) -> None:
    """The timeout race: the trial told its outcome just before the time limit fired."""
    config = make(study_dir, study={"n_trials": 5})
    created = create_or_resume(config)
    done, running = take(created, config), take(created, config)
    created.tell(done, 0.75)
    assert not fail_trial(created, config, done.number, "timed out after 5 s", retries=0)
    finished = created.trials[done.number]
    assert finished.state == TrialState.COMPLETE and finished.value == 0.75
    assert "stop_reason" not in finished.user_attrs
    assert fail_trial(created, config, running.number, "killed", retries=1)
    assert not fail_trial(created, config, running.number, "killed", retries=1)
    waiting = created.get_trials(states=(TrialState.WAITING,))
    assert len(waiting) == 1, "failing twice enqueues one retry"


def test_orphans_are_recovered_whatever_moment_their_process_died(study_dir: StudyDir) -> None:
    config = make(study_dir, study={"n_trials": 10})
    created = create_or_resume(config)
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
    )
    me = Owner.me()
    gone = int(dead.stdout)
    orphan, alive, reused, elsewhere, watched = (take(created, config) for _ in range(5))
    for trial, owner in (
        (orphan, Owner(me.host, gone, None, gone, None)),
        # the pids now run other processes: the start times differ
        (reused, Owner(me.host, me.pid, (me.start or 0) + 1, me.pid, (me.start or 0) + 1)),
        (elsewhere, Owner("another-host", gone, None, gone, None)),
        # the trial process died, its worker lives: the worker records it
        (watched, Owner(me.host, gone, None, me.pid, me.start)),
    ):
        for key, value in owner.record().items():
            trial.set_user_attr(key, value)
    ownerless = created.ask()  # its process died inside the claim, before the owner record
    recovered = recover(created, config)
    assert sorted(recovered) == sorted([orphan.number, reused.number, ownerless.number])
    states = {t.number: t.state for t in created.get_trials()}
    assert states[alive.number] == states[elsewhere.number] == TrialState.RUNNING
    assert states[watched.number] == TrialState.RUNNING
    assert states[orphan.number] == states[reused.number] == TrialState.FAIL
    reasons = {t.number: t.user_attrs.get("stop_reason") for t in created.get_trials()}
    assert reasons[ownerless.number] == "interrupted: its process died while claiming it"
    assert reasons[orphan.number] == "interrupted: its process ended before the trial did"
    assert len(created.get_trials(states=(TrialState.WAITING,))) == 3


def _trials(*specs: tuple[TrialState, str]) -> list:
    return [
        optuna.trial.create_trial(
            state=state,
            value=1.0 if state == TrialState.COMPLETE else None,
            user_attrs={"stop_reason": reason},
        )
        for state, reason in specs
    ]


def _numbered(trials: list) -> list:
    for number, trial in enumerate(trials):
        trial.number = number
    return trials


def test_systematic_failure_needs_the_first_three_of_this_run_to_fail_alike() -> None:
    fail = (TrialState.FAIL, "error: OOM")
    ok = (TrialState.COMPLETE, "completed")
    assert Snapshot(_numbered(_trials(fail, fail)), 10).systematic() is None
    assert Snapshot(_numbered(_trials(fail, fail, fail)), 10).systematic() is not None
    assert Snapshot(_numbered(_trials(fail, ok, fail)), 10).systematic() is None
    earlier = _numbered(_trials(fail, fail, fail, ok, fail, fail))
    assert Snapshot(earlier, 10, since=3).systematic() is None, "an earlier run's failures"
    killed = (TrialState.FAIL, "killed by signal 9 (SIGKILL); out of memory is the usual cause")
    interrupted = (TrialState.FAIL, "interrupted: the sweep was stopped")
    timed_out = (TrialState.FAIL, "timed out after 5 s")
    outside = _numbered(_trials(interrupted, killed, timed_out, fail, ok))
    assert Snapshot(outside, 10).systematic() is None, "failures from outside say nothing"


def test_failures_of_this_run_leave_out_trials_interrupted_from_outside() -> None:
    trials = _numbered(
        _trials(
            (TrialState.FAIL, "error: disk full"),
            (TrialState.FAIL, "error: disk full"),
            (TrialState.FAIL, "interrupted: the sweep was stopped"),
            (TrialState.FAIL, "killed by signal 9 (SIGKILL)"),
            (TrialState.FAIL, "interrupted: its machine went silent (no heartbeat for 120 s)"),
            (TrialState.FAIL, "interrupted: its process ended before the trial did"),
            (TrialState.FAIL, "timed out after 5 s"),
        )
    )
    assert [t.number for t in Snapshot(trials, 10, since=1).failures()] == [1, 3, 6]


def test_trial_seeds_are_reproducible_and_distinct() -> None:
    seeds = [trial_seed(7, n) for n in range(100)]
    assert seeds == [trial_seed(7, n) for n in range(100)]
    assert len(set(seeds)) == 100
    assert trial_seed(8, 0) != trial_seed(7, 0)


def test_a_sampler_that_raises_fails_its_trial_and_stops_with_its_message(
    study_dir: StudyDir, monkeypatch
) -> None:
    import pytest

    import sweeper.plugins
    from sweeper.store import SamplerFailed

    class Broken(optuna.samplers.RandomSampler):
        def sample_independent(self, *args, **kwargs):  # type: ignore[no-untyped-def]
            raise ValueError("n_startup_trials must be an int")

    config = make(study_dir)
    created = create_or_resume(config)
    monkeypatch.setattr(sweeper.plugins, "sampler_for", lambda *a, **k: Broken())
    with pytest.raises(SamplerFailed, match="n_startup_trials must be an int"):
        take(created, config)
    (trial,) = created.get_trials()
    assert trial.state == TrialState.FAIL, "no trial is left RUNNING without an owner"
    assert trial.user_attrs["stop_reason"].startswith("error: the sampler failed: ValueError")
    assert created.get_trials(states=(TrialState.WAITING,)) == [], "not retried"


def test_passwords_are_masked_wherever_they_are_in_a_url() -> None:
    from sweeper.store import mask_url

    assert mask_url("postgresql://user:secret@db/study") == "postgresql://user:***@db/study"
    assert mask_url("postgresql://:secret@db/study") == "postgresql://:***@db/study"
    assert "secret" not in mask_url("postgresql://db/study?password=secret&sslmode=require")
    assert "sslmode=require" in mask_url("postgresql://db/study?password=secret&sslmode=require")
    assert mask_url("sqlite:////tmp/x.db") == "sqlite:////tmp/x.db"


def test_a_retry_left_waiting_is_not_run_once_the_search_is_done(study_dir: StudyDir) -> None:
    from sweeper.store import enqueue_confirmations

    config = make(study_dir, study={"n_trials": 2}, confirm={"top_k": 1, "seeds": 1})
    wider = make(study_dir, study={"n_trials": 3})
    created = create_or_resume(config)
    for value in (0.5, 0.6):
        created.tell(take(created, config), value)
    lost = take(created, wider)  # a third trial, interrupted: its retry waits
    assert fail_trial(created, wider, lost.number, "interrupted: gone", retries=None)
    assert enqueue_confirmations(created, config) == 1
    confirmation = take(created, config)
    assert confirmation is not None and confirmation.user_attrs.get("confirms") == 1
    retry = created.trials[3]
    assert retry.state == TrialState.FAIL
    assert retry.user_attrs["stop_reason"] == (
        "interrupted: not run: the search already had its 2 finished trials"
    )
    created.tell(confirmation, 0.55)
    created.enqueue_trial({"lr": 0.1, "hidden": 8})  # on purpose: kept for a later run
    assert take(created, config) is None
    assert created.trials[-1].state == TrialState.WAITING
    assert Snapshot(created.trials, 2, since=0).failures() == [], "not the task's failure"


def test_the_last_point_of_a_grid_is_told_and_failed_without_an_error(study_dir: StudyDir) -> None:
    """Optuna's grid sampler asks the study to stop once every point is visited, which Optuna
    refuses outside ``study.optimize``: a worker telling that trial must not crash."""
    from sweeper.plugins import sampler_for
    from sweeper.store import tell

    config = make(
        study_dir,
        study={"n_trials": 3},
        sampler={"name": "grid"},
        search={"lr": {"choices": [0.1, 0.2]}, "hidden": 8},
    )
    created = create_or_resume(config)
    created.sampler = sampler_for(config)
    first, last = take(created, config), take(created, config)
    assert tell(created, first, TrialState.COMPLETE, 0.5, {"stop_reason": "completed"})
    assert tell(created, last, TrialState.COMPLETE, 0.6, {"stop_reason": "completed"})
    again = take(created, config)
    assert fail_trial(created, config, again.number, "killed", retries=0)
    states = [t.state for t in created.get_trials()]
    assert states == [TrialState.COMPLETE, TrialState.COMPLETE, TrialState.FAIL]


def test_a_claimed_trial_is_written_whole_or_not_at_all(study_dir: StudyDir) -> None:
    """Its params and its owner record are one write: a reader never meets a claimed trial
    without its params, and a claim that fails between them leaves no params behind."""
    import pytest

    config = make(study_dir)
    created = create_or_resume(config)
    query = (
        "SELECT (SELECT COUNT(*) FROM trial_params),"
        " (SELECT COUNT(*) FROM trial_user_attributes WHERE key = 'host')"
    )
    with seen_before_each_commit(created, study_dir, query) as seen:
        trial = take(created, config)
    assert trial is not None and trial.params.keys() == {"lr", "hidden"}
    assert seen and all(params in (0, 2) for params, _ in seen), "both params in one write"
    assert (2, 0) not in seen, "params are never seen without their owner"
    assert created.get_trials()[0].params == trial.params

    def refuse(*_: object, **__: object) -> None:
        raise OSError("disk full")

    import sweeper.store.claims

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(sweeper.store.claims, "write_user_attrs", refuse)
        with pytest.raises(OSError):
            take(created, config)
    half = created.get_trials()[1]
    assert half.state == TrialState.RUNNING and half.params == {}, "nothing of it but its row"
    assert take(created, config) is not None
    assert created.get_trials()[1].state == TrialState.FAIL, "the ownerless trial is failed"


def test_a_param_stored_with_another_kind_fails_the_claim_with_optunas_words(
    study_dir: StudyDir,
) -> None:
    """A study written by other code, where ``lr`` is a choice: the sampler's float for it is
    refused as Optuna refuses it, and no trial is left RUNNING."""
    import pytest

    from sweeper.store import SamplerFailed, load

    config = make(study_dir)
    created = create_or_resume(config)
    other = created.ask({"lr": optuna.distributions.CategoricalDistribution([0.1, 0.2])})
    created.tell(other, 0.5)
    for worker in (created, load(config)):  # one that wrote the choice, one that knows nothing
        with pytest.raises(SamplerFailed, match="Cannot set different distribution kind"):
            take(worker, config)
    states = [t.state for t in created.get_trials()]
    assert states == [TrialState.COMPLETE, TrialState.FAIL, TrialState.FAIL]


def test_a_silent_machines_trial_is_taken_over_within_a_heartbeat_interval(
    study_dir: StudyDir, monkeypatch
) -> None:
    """A claim looks for machines gone silent (a heartbeat older than the grace period) the
    first time, then once per heartbeat interval: not in every claim of a busy study."""
    import time

    config = make(study_dir, study={"n_trials": 10})
    created = create_or_resume(config)
    far = Owner("machine-lost", 1, None)

    def silence() -> None:
        with sqlite3.connect(study_dir.db) as db:
            db.execute("UPDATE trial_heartbeats SET heartbeat = '2000-01-01 00:00:00'")

    lost = take(created, config, far)  # this process's first claim looked
    silence()
    take(created, config)
    assert created.get_trials()[lost.number].state == TrialState.RUNNING, "looked just now"
    monkeypatch.setattr(time, "monotonic", lambda: 1e12)  # an interval on
    take(created, config)
    taken = created.get_trials()[lost.number]
    assert taken.state == TrialState.FAIL
    assert "its machine went silent" in taken.user_attrs["stop_reason"]
    retry = created.get_trials()[-1]
    assert retry.params == lost.params and retry.state == TrialState.RUNNING


def test_a_claim_waits_for_the_claim_lock_then_takes_it_or_says_who_holds_it(
    study_dir: StudyDir, monkeypatch
) -> None:
    """Another process holds a SQLite study's claim lock: a claim waits, takes the lock once
    it is let go, and, past ``SWEEPER_LOCK_WAIT``, gives up with one line naming it."""
    import time

    import pytest

    import sweeper.store.claims
    from sweeper.errors import StorageError
    from sweeper.store import claim_lock

    config = make(study_dir)
    create_or_resume(config)
    lock_file = f"{study_dir.db}.lock"
    hold = (
        "import fcntl, sys, time; f = open(sys.argv[1], 'a'); fcntl.flock(f, fcntl.LOCK_EX);"
        "print('held', flush=True); time.sleep(float(sys.argv[2]))"
    )
    holder = subprocess.Popen(
        [sys.executable, "-c", hold, lock_file, "30"], stdout=subprocess.PIPE, text=True
    )
    assert holder.stdout is not None and holder.stdout.readline() == "held\n"
    monkeypatch.setattr(sweeper.store.claims, "LOCK_WAIT", 0.5)
    refused = r"could not take the claim lock .*\.lock in 0\.5 s"
    gives_up = pytest.raises(StorageError, match=refused)
    with gives_up, claim_lock(config):
        pass
    holder.kill()
    holder.wait()

    brief = subprocess.Popen(
        [sys.executable, "-c", hold, lock_file, "1"], stdout=subprocess.PIPE, text=True
    )
    assert brief.stdout is not None and brief.stdout.readline() == "held\n"
    monkeypatch.setattr(sweeper.store.claims, "LOCK_WAIT", 30)
    began = time.monotonic()
    with claim_lock(config):
        waited = time.monotonic() - began
    assert waited > 0.5, "it waited for the holder"
    assert brief.wait(timeout=30) == 0


def test_a_trial_ends_with_its_outcome_in_one_write_and_a_failure_from_outside_stands(
    study_dir: StudyDir,
) -> None:
    """Its state, value and outcome attributes are one write: a reader never meets a trial
    still RUNNING with a stop reason, or ended without one. A trial failed from outside
    first (its time limit) keeps that failure: the outcome told later is not written."""

    from sweeper.store import tell

    config = make(study_dir, study={"n_trials": 4})
    created = create_or_resume(config)
    trial = take(created, config)
    query = (
        "SELECT state, (SELECT COUNT(*) FROM trial_user_attributes"
        " WHERE key = 'stop_reason') FROM trials"
    )
    with seen_before_each_commit(created, study_dir, query) as seen:
        assert tell(created, trial, TrialState.COMPLETE, 0.5, {"stop_reason": "completed", "x": 1})
    with sqlite3.connect(study_dir.db) as other:
        seen.append(other.execute(query).fetchone())
    assert ("RUNNING", 1) not in seen, "no stop reason while it runs"
    assert ("COMPLETE", 0) not in seen and seen[-1] == ("COMPLETE", 1)
    ended = created.get_trials()[0]
    assert ended.value == 0.5 and ended.user_attrs["x"] == 1

    late = take(created, config)
    assert fail_trial(created, config, late.number, "timed out after 5 s", retries=0)
    assert not tell(created, late, TrialState.COMPLETE, 0.9, {"stop_reason": "completed", "x": 2})
    failed = created.get_trials()[late.number]
    assert failed.state == TrialState.FAIL and failed.user_attrs["stop_reason"] == (
        "timed out after 5 s"
    )
    assert "x" not in failed.user_attrs


def test_a_claimed_trials_params_are_stored_in_the_order_they_were_sampled(
    study_dir: StudyDir,
) -> None:
    """A conditional space: a parameter this worker meets for the first time, after ones it
    knows, is stored after them, so every reader lists a trial's params as it was sampled."""
    search = {
        "optimizer": {"choices": ["sgd", "adam"]},
        "lr": {"low": 1e-3, "high": 1.0, "log": True},
        "momentum": {"low": 0.0, "high": 0.99, "when": {"optimizer": "sgd"}},
    }
    config = make(study_dir, search=search)
    created = create_or_resume(config)
    created.enqueue_trial({"optimizer": "adam", "lr": 0.1})  # no momentum
    created.enqueue_trial({"optimizer": "sgd", "lr": 0.2})
    created.tell(take(created, config), 0.5)
    trial = take(created, config)
    assert list(trial.params) == ["optimizer", "lr", "momentum"]
    with sqlite3.connect(study_dir.db) as other:
        stored = [
            name
            for (name,) in other.execute(
                "SELECT param_name FROM trial_params WHERE trial_id = 2 ORDER BY param_id"
            )
        ]
    assert stored == list(trial.params)


def test_an_outcome_optuna_refuses_keeps_what_the_trial_reported(study_dir: StudyDir) -> None:
    """A value Optuna does not take (NaN) is refused before the trial ends: the outcome's
    attributes are still written, for the failure that follows to show them."""
    import math

    import pytest

    from sweeper.store import tell

    config = make(study_dir)
    created = create_or_resume(config)
    trial = take(created, config)
    with pytest.raises(ValueError, match="nan"):
        tell(created, trial, TrialState.COMPLETE, math.nan, {"seed": 3, "fit_seconds": 1.5})
    reason = "its outcome could not be recorded"
    assert fail_trial(created, config, trial.number, reason, retries=0)
    failed = created.get_trials()[trial.number]
    assert failed.state == TrialState.FAIL
    assert failed.user_attrs["seed"] == 3 and failed.user_attrs["fit_seconds"] == 1.5


@contextlib.contextmanager
def statements(created: optuna.Study) -> Iterator[list[str]]:
    """The SQL statements the study's storage sends inside, one line each."""
    sent: list[str] = []

    def record(_conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        sent.append(" ".join(statement.split()))

    with listening(created, "before_cursor_execute", record):
        yield sent


def test_a_claim_reads_the_trials_once_and_writes_twice(study_dir: StudyDir) -> None:
    """Under the claim lock every statement makes the next claim wait: the trials are read
    once (not again for Optuna's queue, its sampler, or the trial it has just made), and
    the claim writes the new trial, then its params and owner record."""
    config = make(study_dir, study={"n_trials": 10}, sampler={"name": "tpe"})
    created = create_or_resume(config)
    for _ in range(3):
        created.tell(take(created, config), 0.5)
    running = take(created, config)
    with statements(created) as sent:
        trial = take(created, config)
    assert trial is not None and running is not None
    trial_reads = [s for s in sent if s.startswith("SELECT trials.trial_id, trials.number")]
    assert len(trial_reads) == 1, "\n".join(trial_reads)
    writes = [s for s in sent if s.startswith("BEGIN IMMEDIATE")]
    assert len(writes) == 2, "\n".join(sent)
    assert trial.params.keys() == {"lr", "hidden"}


def test_a_claimed_trial_is_what_another_process_reads(
    study_dir: StudyDir, monkeypatch: Any
) -> None:
    """The trial a claim hands back is not read back from the storage: its number and start
    time are what a reader finds there (in a time zone other than UTC, which is stored)."""
    import time

    config = make(study_dir, study={"n_trials": 10})
    created = create_or_resume(config)
    monkeypatch.setenv("TZ", "America/New_York")
    time.tzset()
    try:
        claimed = [take(created, config) for _ in range(3)]
        other = optuna.load_study(study_name=config.study.name, storage=config.storage_url)
        stored_trials = other.get_trials()
    finally:
        monkeypatch.undo()
        time.tzset()
    for trial, stored in zip(claimed, stored_trials, strict=True):
        assert trial is not None
        assert (trial.number, trial.datetime_start) == (stored.number, stored.datetime_start)
        assert stored.state == TrialState.RUNNING and stored.params == trial.params
    assert [t.number for t in claimed] == [0, 1, 2]
