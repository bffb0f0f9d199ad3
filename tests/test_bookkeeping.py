"""Every trial accounted for: real sweeps on real SQLite files, faults injected on purpose."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from sweeper.atomic import write_text
from tests.conftest import StudyDir, run_sweeper, study, sweeper_cmd
from tests.test_sweep import (
    finished,
    load,
    parent_of,
    running_with_pid,
    start_slow_sweep,
    wait_for,
)


def test_a_study_is_not_poisoned_by_the_failures_of_an_earlier_run(study_dir: StudyDir) -> None:
    (study_dir.root / "broken.flag").write_text("")
    path = study_dir.write(
        study(study={"n_trials": 4}, search={**study()["search"], "fail_while": "broken.flag"})
    )
    broken = run_sweeper("start", str(path))
    assert broken.returncode == 1, broken.stdout + broken.stderr
    assert "failed the same way: error: RuntimeError: broken.flag is there" in broken.stderr
    assert "failures of earlier runs do not count" in broken.stderr
    (study_dir.root / "broken.flag").unlink()
    fixed = run_sweeper("start", str(path))
    assert fixed.returncode == 0, fixed.stdout + fixed.stderr
    assert finished(load(study_dir).get_trials()) == 4


def test_failures_without_end_stop_at_max_failures(study_dir: StudyDir) -> None:
    path = study_dir.write(
        study(
            study={"n_trials": 30, "max_failures": 3},
            search={"lr": {"low": 1e-3, "high": 1.0, "log": True}, "fail_above": 0.01},
            sampler={"name": "random"},
            resources={"devices": "cpu", "cpu_workers": 1},
        )
    )
    result = run_sweeper("start", str(path))
    assert result.returncode == 1, result.stdout + result.stderr
    assert "3 trials failed in this run ([study] max_failures = 3); the last, trial " in (
        result.stderr
    )
    assert "error: ValueError: lr " in result.stderr
    trials = load(study_dir).get_trials()
    assert sum(t.state == TrialState.FAIL for t in trials) == 3
    assert not [t for t in trials if t.state == TrialState.RUNNING]


def test_a_trial_whose_process_died_inside_its_claim_is_taken_over(study_dir: StudyDir) -> None:
    """The claim window: a trial row exists, its process dies before anything else."""
    path = study_dir.write(study(study={"n_trials": 3}))
    assert run_sweeper("start", str(path), "--n-trials", "1").returncode == 0
    died = subprocess.run(
        [
            sys.executable,
            "-c",
            "import os, optuna; s = optuna.load_study(study_name='tiny', "
            f"storage='sqlite:///{study_dir.db}'); s.ask(); os._exit(0)",
        ],
        capture_output=True,
        text=True,
    )
    assert died.returncode == 0, died.stderr
    (left,) = load(study_dir).get_trials(states=(TrialState.RUNNING,))
    result = run_sweeper("start", str(path))
    assert result.returncode == 0, result.stdout + result.stderr
    trials = load(study_dir).get_trials()
    assert finished(trials) == 3
    assert not [t for t in trials if t.state == TrialState.RUNNING]
    assert trials[left.number].state == TrialState.FAIL
    assert trials[left.number].user_attrs["stop_reason"].startswith("interrupted")


def test_a_sweep_that_ends_short_says_so(study_dir: StudyDir) -> None:
    """A trial held by another live process on this machine is not this sweep's to finish."""
    path = study_dir.write(study(study={"n_trials": 3}))
    assert run_sweeper("start", str(path), "--n-trials", "1").returncode == 0
    holder = load(study_dir)
    held = holder.ask()
    held.set_user_attr("host", __import__("socket").gethostname())
    held.set_user_attr("pid", os.getpid())  # this test process: alive
    result = run_sweeper("start", str(path))
    assert result.returncode == 1, result.stdout + result.stderr
    assert "the sweep ended short: 2 of 3 trials finished (0 failed, 1 running, 0 waiting)" in (
        result.stderr
    )


def test_a_trial_past_its_time_limit_is_failed_and_the_sweep_goes_on(
    study_dir: StudyDir,
) -> None:
    path = study_dir.write(
        study(
            study={"n_trials": 4},
            search={"lr": {"low": 1e-3, "high": 1.0, "log": True}, "hang_above": 0.3},
            sampler={"name": "random"},
            resources={"devices": "cpu", "cpu_workers": 2, "trial_timeout": 8},
        )
    )
    result = run_sweeper("start", str(path))
    assert result.returncode == 0, result.stdout + result.stderr
    trials = load(study_dir).get_trials()
    timed_out = [t for t in trials if t.state == TrialState.FAIL]
    assert timed_out, "the seeded random sampler draws some lr above 0.3"
    for trial in timed_out:
        assert trial.params["lr"] > 0.3
        assert trial.user_attrs["stop_reason"] == "timed out after 8 s"
    assert not [t for t in trials if t.system_attrs.get("failed_trial") is not None]
    assert finished(trials) == 4


def test_timeouts_in_a_row_are_failed_trials_not_a_broken_worker(study_dir: StudyDir) -> None:
    path = study_dir.write(
        study(
            study={"n_trials": 4, "max_failures": 4},
            search={"lr": {"low": 1e-3, "high": 1.0, "log": True}, "hang_above": 0.0},
            sampler={"name": "random"},
            resources={"devices": "cpu", "cpu_workers": 1, "trial_timeout": 2},
        )
    )
    result = run_sweeper("start", str(path))
    assert result.returncode == 1, result.stdout + result.stderr
    assert "4 trials failed in this run ([study] max_failures = 4)" in result.stderr
    assert "timed out after 2 s" in result.stderr
    assert "worker of slot" not in result.stderr
    trials = load(study_dir).get_trials()
    assert [t.user_attrs["stop_reason"] for t in trials] == ["timed out after 2 s"] * 4


def test_a_crashed_interpreter_fails_its_trial_and_it_is_retried(study_dir: StudyDir) -> None:
    path = study_dir.write(
        study(
            study={"n_trials": 4, "max_failures": 20},
            search={"lr": {"low": 1e-3, "high": 1.0, "log": True}, "abort_above": 0.3},
            sampler={"name": "random"},
        )
    )
    result = run_sweeper("start", str(path))
    assert result.returncode == 0, result.stdout + result.stderr
    trials = load(study_dir).get_trials()
    crashed = [t for t in trials if t.state == TrialState.FAIL]
    assert crashed, "the seeded random sampler draws some lr above 0.3"
    assert all("SIGABRT" in t.user_attrs["stop_reason"] for t in crashed)
    assert finished(trials) == 4


def test_readers_never_take_the_write_lock(tmp_path: Path) -> None:
    # A folder name with URI characters: readers open the file as a SQLite URI.
    folder = tmp_path / "runs #1 ?50%"
    folder.mkdir()
    study_dir = StudyDir(folder)
    path = study_dir.write(study(study={"n_trials": 1}))
    assert run_sweeper("start", str(path)).returncode == 0
    writer = sqlite3.connect(study_dir.db, timeout=1, isolation_level=None)
    writer.execute("BEGIN IMMEDIATE")  # a sweep in the middle of a write
    try:
        for command in ("status", "best"):
            began = time.monotonic()
            result = run_sweeper(command, str(path), timeout=60)
            assert result.returncode == 0, result.stdout + result.stderr
            assert time.monotonic() - began < 30
        report = run_sweeper("report", str(path), "-o", str(study_dir.root / "r.html"))
        assert report.returncode == 0, report.stdout + report.stderr
    finally:
        writer.execute("ROLLBACK")
        writer.close()


def test_two_writers_of_one_file_never_collide(tmp_path: Path) -> None:
    target = tmp_path / "best.toml"
    errors: list[str] = []

    def write(text: str) -> None:
        for _ in range(300):
            try:
                write_text(target, text)
            except OSError as exc:
                errors.append(repr(exc))

    threads = [threading.Thread(target=write, args=(c * 1000,)) for c in "ab"]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert target.read_text() in ("a" * 1000, "b" * 1000)
    assert [p.name for p in tmp_path.iterdir()] == ["best.toml"]


def test_a_storage_made_by_an_older_optuna_names_the_upgrade(study_dir: StudyDir) -> None:
    path = study_dir.write(study(study={"n_trials": 1}))
    assert run_sweeper("start", str(path)).returncode == 0
    with sqlite3.connect(study_dir.db) as db:
        db.execute("UPDATE alembic_version SET version_num = 'v3.0.0.d'")
    for command in ("status", "start"):
        result = run_sweeper(command, str(path))
        assert result.returncode == 2, result.stdout + result.stderr
        assert "was made by an older Optuna; upgrade it with `optuna storage upgrade" in (
            result.stderr
        )
        assert result.stderr.count("\n") == 1


def test_an_optuna_without_what_sweeper_relies_on_is_one_clear_message(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from sweeper.store import _compat

    monkeypatch.setattr(optuna, "__version__", "6.0.0")
    with pytest.raises(_compat.OptunaMismatch, match=r"Optuna 6.0.0 is installed.*pip install"):
        _compat._check()


def test_sigterm_stops_the_sweep_as_ctrl_c_does_and_exits_143(study_dir: StudyDir) -> None:
    sweep = start_slow_sweep(study_dir)
    wait_for(lambda: running_with_pid(study_dir), what="a running trial")
    sweep.send_signal(signal.SIGTERM)
    out, err = sweep.communicate(timeout=120)
    assert sweep.returncode == 143, out + err
    trials = load(study_dir).get_trials()
    assert not [t for t in trials if t.state == TrialState.RUNNING]
    assert all(
        t.user_attrs["stop_reason"] == "interrupted: the sweep was stopped"
        for t in trials
        if t.state == TrialState.FAIL
    )
    again = run_sweeper("start", str(study_dir.root / "study.toml"))
    assert again.returncode == 0, again.stdout + again.stderr
    assert finished(load(study_dir).get_trials()) == 4


def test_sigterm_reaches_sweeper_running_as_pid_1(study_dir: StudyDir) -> None:
    unshare = shutil.which("unshare")
    if unshare is None or os.geteuid() != 0:
        pytest.skip("needs root and util-linux's unshare to run sweeper as PID 1")
    path = study_dir.write(
        study(study={"n_trials": 4}, search={"lr": {"low": 0.01, "high": 0.1}, "sleep": 0.2})
    )
    sweep = subprocess.Popen(
        [unshare, "--pid", "--fork", "--kill-child", *sweeper_cmd("start", str(path))],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    wait_for(lambda: running_with_pid(study_dir), what="a running trial")
    (init,) = [
        int(p.name)
        for p in Path("/proc").iterdir()
        if p.name.isdigit() and _parent(int(p.name)) == sweep.pid
    ]
    os.kill(init, signal.SIGTERM)  # PID 1 of its namespace: only a handled signal arrives
    out, err = sweep.communicate(timeout=120)
    assert "terminated" in err, out + err
    assert sweep.returncode == 143, out + err
    assert not load(study_dir).get_trials(states=(TrialState.RUNNING,))


def _parent(pid: int) -> int | None:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except OSError:
        return None


def test_debug_shows_the_users_own_traceback(study_dir: StudyDir) -> None:
    (study_dir.root / "broken_task.py").write_text("import json\n\nVALUE = 1 / 0\n")
    path = study_dir.write(study(task={"name": "broken_task:build"}))
    plain = run_sweeper("check", str(path))
    assert plain.returncode == 2 and "Traceback" not in plain.stderr
    debug = run_sweeper("check", str(path), "--debug")
    assert "broken_task.py" in debug.stderr and "ZeroDivisionError" in debug.stderr


def test_a_task_that_exits_at_import_is_an_error_not_a_success(study_dir: StudyDir) -> None:
    (study_dir.root / "quitter.py").write_text("import sys\n\nsys.exit(0)\n")
    path = study_dir.write(study(task={"name": "quitter:build"}))
    for command in ("check", "start"):
        result = run_sweeper(command, str(path))
        assert result.returncode == 2, result.stdout + result.stderr
        assert "importing 'quitter' called sys.exit(0)" in result.stderr
    assert study_dir.created() == []


def test_a_worker_killed_mid_sweep_is_started_again_and_its_trial_retried(
    study_dir: StudyDir,
) -> None:
    sweep = start_slow_sweep(study_dir)
    victim = wait_for(lambda: running_with_pid(study_dir), what="a running trial")[0]
    os.kill(victim.user_attrs["pid"], signal.SIGKILL)  # the trial's worker
    out, err = sweep.communicate(timeout=300)
    assert sweep.returncode == 0, out + err
    trials = load(study_dir).get_trials()
    assert finished(trials) == 4
    lost = trials[victim.number]
    assert lost.state == TrialState.FAIL
    assert lost.user_attrs["stop_reason"] == "interrupted: its process ended before the trial did"
    assert lost.params, "claimed with its params"
    assert [t.params for t in trials if t.system_attrs.get("failed_trial") == victim.number] == [
        lost.params
    ]


def test_the_workers_parent_killed_mid_sweep_ends_the_run_with_nothing_left_running(
    study_dir: StudyDir,
) -> None:
    sweep = start_slow_sweep(study_dir)
    victim = wait_for(lambda: running_with_pid(study_dir), what="a running trial")[0]
    warm = parent_of(victim.user_attrs["pid"])  # worker < warm parent
    assert parent_of(warm) == sweep.pid
    os.kill(warm, signal.SIGKILL)
    out, err = sweep.communicate(timeout=120)
    assert sweep.returncode == 1, out + err
    assert f"the workers' parent process (pid {warm}) was killed by signal 9" in err
    assert "`sweeper start` again resumes the study" in err
    trials = load(study_dir).get_trials()
    assert [t.number for t in trials if t.state == TrialState.RUNNING] == []
    assert trials[victim.number].state == TrialState.FAIL
    assert trials[victim.number].user_attrs["stop_reason"].startswith("interrupted")
    again = run_sweeper("start", str(study_dir.root / "study.toml"))
    assert again.returncode == 0, again.stdout + again.stderr
    assert finished(load(study_dir).get_trials()) == 4


def test_a_trial_out_of_memory_fails_alone_and_the_sweep_goes_on(study_dir: StudyDir) -> None:
    path = study_dir.write(
        study(
            study={"n_trials": 4},
            search={"lr": {"low": 1e-3, "high": 1.0, "log": True}, "oom_above": 0.3},
            sampler={"name": "random"},
        )
    )
    result = run_sweeper("start", str(path))
    assert result.returncode == 0, result.stdout + result.stderr
    trials = load(study_dir).get_trials()
    failed = [t for t in trials if t.state == TrialState.FAIL]
    assert failed, "the seeded random sampler draws some lr above 0.3"
    assert all(t.user_attrs["stop_reason"].startswith("error: MemoryError") for t in failed)
    assert finished(trials) == 4


def test_storage_turned_read_only_mid_sweep_is_one_line_and_resumes(study_dir: StudyDir) -> None:
    """Root writes read-only files: the sweep runs without that capability (setpriv)."""
    setpriv = shutil.which("setpriv")
    if setpriv is None or os.geteuid() != 0:
        pytest.skip("needs root and util-linux's setpriv to drop the capability")
    path = study_dir.write(
        study(study={"n_trials": 12}, search={**study()["search"], "sleep": 0.05})
    )
    sweep = subprocess.Popen(
        [
            setpriv,
            "--bounding-set=-dac_override,-dac_read_search",
            *sweeper_cmd("start", str(path)),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    wait_for(lambda: study_dir.db.exists() and finished(load(study_dir).get_trials()) >= 2)
    locked = [p for p in study_dir.root.iterdir() if p.name.startswith("tiny.db")]
    for file in locked:
        file.chmod(0o444)
    try:
        out, err = sweep.communicate(timeout=300)
    finally:
        for file in locked:
            file.chmod(0o644)
    assert sweep.returncode == 1, out + err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert "readonly database" in err or "claim lock" in err, err
    again = run_sweeper("start", str(path))
    assert again.returncode == 0, again.stdout + again.stderr
    trials = load(study_dir).get_trials()
    assert finished(trials) == 12
    assert not [t for t in trials if t.state == TrialState.RUNNING]


def test_a_process_the_trial_leaves_behind_does_not_hold_up_its_worker(
    study_dir: StudyDir,
) -> None:
    """A trial's data loader workers may outlive it for a while, holding its pipe to the
    worker open: the worker records the outcome and goes on without waiting for them."""
    path = study_dir.write(
        study(
            study={"n_trials": 2},
            search={"lr": {"low": 0.01, "high": 0.1}, "linger": 600},
            resources={"cpu_workers": 1},
        )
    )
    try:
        result = run_sweeper("start", str(path), timeout=240)
    finally:
        pids = study_dir.root / "lingering.pids"
        for pid in pids.read_text().split() if pids.exists() else []:
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid), signal.SIGKILL)
    assert result.returncode == 0, result.stdout + result.stderr
    trials = load(study_dir).get_trials()
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 2
