"""Claiming, retrying and recovering trials on a real SQLite study."""

from __future__ import annotations

import socket
import subprocess
import sys

import optuna
from optuna.trial import TrialState

from sweeper.config import parse_config
from sweeper.study import (
    claim,
    create_or_resume,
    fail_and_retry,
    recover_orphans,
    systematic_failure,
    trial_seed,
)
from tests.conftest import StudyDir, study


def make(study_dir: StudyDir, **sections):
    path = study_dir.write(study(**sections))
    import tomllib

    return parse_config(tomllib.loads(path.read_text()), path)


def test_claim_stops_at_n_trials_counting_running_ones(study_dir: StudyDir) -> None:
    config = make(study_dir, study={"n_trials": 3})
    created = create_or_resume(config)
    first, second, third = (claim(created, config) for _ in range(3))
    assert claim(created, config) is None, "three trials under way fill a study of three"
    created.tell(first, 0.5)
    created.tell(second, state=TrialState.FAIL)
    replacement = claim(created, config)
    assert replacement is not None and replacement.number == 3
    assert claim(created, config) is None
    assert third is not None


def test_failed_trial_is_retried_once_with_its_params(study_dir: StudyDir) -> None:
    config = make(study_dir, study={"n_trials": 5})
    created = create_or_resume(config)
    trial = claim(created, config)
    fail_and_retry(created, created.trials[trial.number], "killed by signal 9 (SIGKILL)")
    retry = claim(created, config)
    assert retry.params == trial.params
    assert created.trials[trial.number].user_attrs["stop_reason"] == "killed by signal 9 (SIGKILL)"
    fail_and_retry(created, created.trials[retry.number], "killed again")
    fresh = claim(created, config)
    stored = created.trials[fresh.number]
    assert stored.system_attrs.get("failed_trial") is None, "a retry is not retried again"


def test_orphans_of_dead_processes_on_this_host_are_recovered(study_dir: StudyDir) -> None:
    config = make(study_dir)
    created = create_or_resume(config)
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
    )
    orphan, alive, elsewhere = (claim(created, config) for _ in range(3))
    for trial, host, pid in (
        (orphan, socket.gethostname(), int(dead.stdout)),
        (alive, socket.gethostname(), subprocess.os.getpid()),
        (elsewhere, "another-host", int(dead.stdout)),
    ):
        trial.set_user_attr("host", host)
        trial.set_user_attr("pid", pid)
    assert recover_orphans(created) == [orphan.number]
    states = {t.number: t.state for t in created.get_trials()}
    assert states[orphan.number] == TrialState.FAIL
    assert states[alive.number] == states[elsewhere.number] == TrialState.RUNNING
    assert [t.params for t in created.get_trials(states=(TrialState.WAITING,))] == [orphan.params]


def test_systematic_failure_needs_the_first_three_to_fail_alike() -> None:
    created = optuna.create_study()

    def add(state: TrialState, reason: str) -> None:
        created.add_trial(
            optuna.trial.create_trial(
                state=state,
                value=1.0 if state == TrialState.COMPLETE else None,
                user_attrs={"stop_reason": reason},
            )
        )

    add(TrialState.FAIL, "error: OOM")
    add(TrialState.FAIL, "error: OOM")
    assert systematic_failure(created) is None
    add(TrialState.FAIL, "error: OOM")
    assert systematic_failure(created) == "error: OOM"
    other = optuna.create_study()
    created = other
    add(TrialState.FAIL, "error: OOM")
    add(TrialState.COMPLETE, "completed")
    add(TrialState.FAIL, "error: OOM")
    assert systematic_failure(created) is None


def test_trial_seeds_are_reproducible_and_distinct() -> None:
    seeds = [trial_seed(7, n) for n in range(100)]
    assert seeds == [trial_seed(7, n) for n in range(100)]
    assert len(set(seeds)) == 100
    assert trial_seed(8, 0) != trial_seed(7, 0)
