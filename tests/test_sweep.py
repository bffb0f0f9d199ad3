"""`sweeper start` end to end: real processes, real SQLite files, real kills."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import threading
import time
import tomllib
import urllib.error
import urllib.request
from pathlib import Path

import optuna
from optuna.trial import TrialState

from sweeper.store._compat import trial_id
from tests.conftest import BASE, StudyDir, free_port, run_sweeper, study, sweeper_cmd

optuna.logging.set_verbosity(optuna.logging.WARNING)


def load(study_dir: StudyDir, name: str = "tiny") -> optuna.Study:
    return optuna.load_study(study_name=name, storage=f"sqlite:///{study_dir.db}")


def states(trials: list) -> dict[str, int]:
    result: dict[str, int] = {}
    for trial in trials:
        result[trial.state.name] = result.get(trial.state.name, 0) + 1
    return result


def finished(trials: list) -> int:
    return sum(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in trials)


def parent_of(pid: int) -> int:
    """The parent process of ``pid``, read from /proc."""
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def descendants(pid: int) -> list[int]:
    """Every process below ``pid``, read from /proc."""
    parents: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        parents.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        for child in parents.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def trial_process(study_dir: StudyDir, trial) -> int:
    """The process that runs ``trial``, once it is forked: the child of the worker its owner
    record names (the trial's own process claims, and is named, only with the gp sampler)."""
    if trial.user_attrs.get("worker_pid"):
        return trial.user_attrs["pid"]
    worker = trial.user_attrs["pid"]

    def forked() -> int | None:
        return next((pid for pid in descendants(worker) if parent_of(pid) == worker), None)

    pid = wait_for(forked, what=f"the process of trial {trial.number}")
    still = load(study_dir).trials[trial.number]
    assert still.state == TrialState.RUNNING, "the trial ended before it could be killed"
    return pid


def wait_for(condition, timeout: float = 120.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def load_or_none(study_dir: StudyDir) -> optuna.Study | None:
    try:
        return load(study_dir)
    except KeyError:
        return None


def running_with_pid(study_dir: StudyDir) -> list:
    if not study_dir.db.exists():
        return []
    try:
        trials = load(study_dir).get_trials(states=(TrialState.RUNNING,))
    except KeyError:
        return []
    return [t for t in trials if "device" in t.user_attrs]


def start_slow_sweep(study_dir: StudyDir) -> subprocess.Popen[str]:
    """`sweeper start` in the background on 4 trials of a few seconds each.

    SIGINT gets its default action back first: a shell starts background jobs
    with SIGINT ignored, and a terminal's Ctrl-C must reach the sweep here.
    """
    path = study_dir.write(
        study(study={"n_trials": 4}, search={"lr": {"low": 0.01, "high": 0.1}, "sleep": 0.2})
    )
    return subprocess.Popen(
        sweeper_cmd("start", str(path)),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )


def test_sweep_runs_to_n_trials_and_reports_the_best(study_dir: StudyDir) -> None:
    path = study_dir.write(
        study(
            search={
                "lr": {"low": 1e-3, "high": 1.0, "log": True},
                "hidden": {"low": 4, "high": 32, "step": 4},
                "batch_size": 32,
            }
        )
    )
    result = run_sweeper("start", str(path))
    assert result.returncode == 0, result.stderr + result.stdout
    trials = load(study_dir).get_trials()
    assert finished(trials) == 6 and len(trials) == 6
    assert {t.user_attrs["stop_reason"].split(" ")[0] for t in trials} <= {"completed", "pruned"}
    devices = {t.user_attrs["device"] for t in trials}
    assert devices == {"cpu"}
    assert {t.user_attrs["precision"] for t in trials} == {"32-true"}
    assert not any("gpu" in t.user_attrs for t in trials)
    assert len({t.user_attrs["slot"] for t in trials}) == 2, "both CPU slots must run trials"
    for trial in trials:
        history = trial.user_attrs["history"]
        assert [r["step"] for r in history] == sorted(trial.intermediate_values)
        assert all("val_acc" in r and "val_loss" in r and "train_loss" in r for r in history)
        if trial.state == TrialState.COMPLETE:
            assert trial.value == max(r["val_acc"] for r in history)
            assert trial.user_attrs["best_step"] in trial.intermediate_values
    best = max((t for t in trials if t.state == TrialState.COMPLETE), key=lambda t: t.value)
    assert f"best: trial {best.number}, val_acc={best.value:.4f}" in result.stdout
    written = tomllib.loads((study_dir.root / "tiny" / "best.toml").read_text())
    assert written["best"]["value"] == best.value
    assert written["params"] == {"batch_size": 32, **best.params}
    assert written["reproduce"]["trial_number"] == best.number
    assert "torch" in written["reproduce"]["versions"]

    shown = run_sweeper("best", str(path), "--json")
    assert shown.returncode == 0, shown.stderr
    data = json.loads(shown.stdout)
    assert data["best"]["trial"] == best.number
    assert data["counts"]["complete"] + data["counts"]["pruned"] == 6
    assert "val_acc" in data["best"]["metrics"]

    status = run_sweeper("status", str(path))
    assert status.returncode == 0, status.stderr
    assert "6/6 finished" in status.stdout

    again = run_sweeper("start", str(path))
    assert again.returncode == 0, again.stderr
    assert len(load(study_dir).get_trials()) == 6, "a finished study runs no more trials"

    more = run_sweeper("start", str(path), "--n-trials", "8")
    assert more.returncode == 0, more.stderr
    assert finished(load(study_dir).get_trials()) == 8


def test_changed_search_space_is_refused(study_dir: StudyDir) -> None:
    path = study_dir.write(study(study={"n_trials": 2}))
    assert run_sweeper("start", str(path)).returncode == 0
    before = study_dir.db.read_bytes()
    study_dir.write(study(study={"n_trials": 2}, search={"lr": {"low": 1e-4, "high": 1.0}}))
    result = run_sweeper("start", str(path))
    assert result.returncode == 2, result.stdout + result.stderr
    assert "search: the search space changed since the study 'tiny' was created: " in result.stderr
    assert (
        "hidden removed, lr changed (high=1.0 log=true low=0.001 -> high=1.0 log=false "
        "low=0.0001)" in result.stderr
    )
    assert "new name" in result.stderr
    assert study_dir.db.read_bytes() == before


def test_failing_trials_do_not_stop_the_sweep(study_dir: StudyDir) -> None:
    path = study_dir.write(
        study(
            study={"n_trials": 5},
            search={"lr": {"low": 1e-3, "high": 1.0, "log": True}, "fail_above": 0.05},
            sampler={"name": "random"},
        )
    )
    result = run_sweeper("start", str(path))
    assert result.returncode == 0, result.stderr + result.stdout
    trials = load(study_dir).get_trials()
    failed = [t for t in trials if t.state == TrialState.FAIL]
    assert failed, "the seeded random sampler draws some lr above 0.05"
    for trial in failed:
        assert trial.params["lr"] > 0.05
        assert trial.user_attrs["stop_reason"].startswith("error: ValueError: lr ")
        assert "Traceback" in trial.user_attrs["error"]
    assert finished(trials) == 5


def test_systematic_failure_stops_the_sweep(study_dir: StudyDir) -> None:
    path = study_dir.write(study(search={"lr": {"low": 0.01, "high": 0.1}, "fail": "always"}))
    result = run_sweeper("start", str(path))
    assert result.returncode == 1, result.stdout + result.stderr
    assert (
        "the first 3 trials of this run all failed the same way: error: ValueError: this task "
        "always fails; the traceback is in " in result.stderr
    )
    assert result.stderr.count("\n") == 1, "one line"
    trials = load(study_dir).get_trials()
    failed = [t for t in trials if t.state == TrialState.FAIL]
    assert 3 <= len(failed) <= 5
    # Trials running when the sweep stopped are enqueued again for the next start.
    assert all(t.state in (TrialState.FAIL, TrialState.WAITING) for t in trials)


def test_killed_trial_is_failed_and_retried_with_its_params(study_dir: StudyDir) -> None:
    sweep = start_slow_sweep(study_dir)
    victim = wait_for(lambda: running_with_pid(study_dir), what="a running trial")[0]
    os.kill(trial_process(study_dir, victim), signal.SIGKILL)
    out, err = sweep.communicate(timeout=300)
    assert sweep.returncode == 0, out + err
    trials = load(study_dir).get_trials()
    killed = trials[victim.number]
    assert killed.state == TrialState.FAIL
    assert killed.user_attrs["stop_reason"].startswith("killed by signal 9 (SIGKILL)")
    retries = [t for t in trials if t.system_attrs.get("failed_trial") == victim.number]
    assert killed.params, "claimed with its params"
    assert len(retries) == 1 and retries[0].params == killed.params
    assert retries[0].state in (TrialState.COMPLETE, TrialState.PRUNED)
    assert finished(trials) == 4
    assert f"trial {victim.number} failed: killed by signal 9" in out


def test_resume_after_kill_9_of_the_whole_run(study_dir: StudyDir) -> None:
    path = study_dir.write(
        study(
            study={"n_trials": 6},
            search={"lr": {"low": 0.01, "high": 0.1}, "sleep": 0.1},
        )
    )
    sweep = subprocess.Popen(
        sweeper_cmd("start", str(path)), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )

    def busy() -> bool:
        running = running_with_pid(study_dir)
        return len(running) == 2 and finished(load(study_dir).get_trials()) >= 1

    wait_for(busy, what="one finished and two running trials")
    for pid in [sweep.pid, *descendants(sweep.pid)]:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    sweep.wait()
    orphans = load(study_dir).get_trials(states=(TrialState.RUNNING,))
    assert orphans, "the kill left trials RUNNING"

    result = run_sweeper("start", str(path))
    assert result.returncode == 0, result.stdout + result.stderr
    trials = load(study_dir).get_trials()
    assert finished(trials) == 6
    assert not [t for t in trials if t.state == TrialState.RUNNING]
    for orphan in orphans:
        again = trials[orphan.number]
        assert again.state == TrialState.FAIL
        assert again.user_attrs["stop_reason"].startswith("interrupted")
        retries = [t for t in trials if t.system_attrs.get("failed_trial") == orphan.number]
        assert len(retries) == 1 and retries[0].params == orphan.params
        assert f"trial {orphan.number} was left running by a stopped sweep" in result.stdout


def test_ctrl_c_stops_cleanly_and_a_rerun_finishes(study_dir: StudyDir) -> None:
    sweep = start_slow_sweep(study_dir)
    path = study_dir.root / "study.toml"
    wait_for(lambda: running_with_pid(study_dir), what="a running trial")
    sweep.send_signal(signal.SIGINT)
    out, err = sweep.communicate(timeout=120)
    assert sweep.returncode == 130, out + err
    trials = load(study_dir).get_trials()
    assert not [t for t in trials if t.state == TrialState.RUNNING]
    interrupted = [t for t in trials if t.state == TrialState.FAIL]
    assert interrupted
    assert all(t.user_attrs["stop_reason"].startswith("interrupted") for t in interrupted)
    result = run_sweeper("start", str(path))
    assert result.returncode == 0, result.stdout + result.stderr
    assert finished(load(study_dir).get_trials()) == 4


def test_eight_writers_and_a_reader_on_one_sqlite_file(study_dir: StudyDir) -> None:
    path = study_dir.write(
        study(
            study={"n_trials": 40},
            trainer={"max_epochs": 1},
            resources={"devices": "cpu", "cpu_workers": 8},
            sampler={"name": "random"},
            search={**BASE["search"], "sleep": 0.1},
        )
    )
    errors: list[str] = []
    reads = {"optuna": 0, "dashboard": 0}
    done = threading.Event()
    port = free_port()

    def reader() -> None:
        """Polls the study directly and through the dashboard's API, as people watching do."""
        while not done.is_set():
            try:
                load(study_dir).get_trials()
                reads["optuna"] += 1
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/studies/1") as answer:
                    assert answer.status == 200
                reads["dashboard"] += 1
            except urllib.error.HTTPError as exc:
                errors.append(f"dashboard answered {exc.code}")
            except urllib.error.URLError as exc:
                if not isinstance(exc.reason, ConnectionRefusedError):
                    errors.append(repr(exc))  # else the dashboard is still starting
            except Exception as exc:
                errors.append(repr(exc))
            time.sleep(0.05)

    sweep = subprocess.Popen(
        sweeper_cmd("start", str(path)),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "SWEEPER_CPUS": "8"},  # 8 workers, whatever the cores
    )
    wait_for(lambda: study_dir.db.exists() and load_or_none(study_dir), what="the study")
    dashboard = subprocess.Popen(
        sweeper_cmd("dashboard", str(path), "--port", str(port)),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    thread = threading.Thread(target=reader)
    thread.start()
    try:
        out, err = sweep.communicate(timeout=600)
    finally:
        done.set()
        thread.join()
        dashboard.terminate()
        dashboard.wait(timeout=30)
    result = subprocess.CompletedProcess(sweep.args, sweep.returncode, out, err)
    assert result.returncode == 0, result.stdout + result.stderr
    assert errors == []
    assert reads["optuna"] > 10 and reads["dashboard"] > 5, reads
    trials = load(study_dir).get_trials()
    assert "FAIL" not in states(trials)
    assert finished(trials) == 40 and len(trials) == 40
    assert sorted(t.number for t in trials) == list(range(40))
    # Workers start as fast as their imports allow; on a loaded machine the
    # first ones may have taken every trial before the last one got going.
    assert len({t.user_attrs["slot"] for t in trials}) >= 6
    logs = "".join(p.read_text() for p in (study_dir.root / "tiny" / "logs").glob("*.log"))
    assert "database is locked" not in logs


def test_diverging_trials_are_pruned_within_a_few_steps(study_dir: StudyDir) -> None:
    search = {"lr": {"low": 0.01, "high": 1000.0, "log": True}}
    common = {
        "study": {"n_trials": 8},
        "search": search,
        "pruner": {"name": "none"},
        "sampler": {"name": "random"},
        "trainer": {"max_epochs": 3},
    }
    path = study_dir.write(study(**common))
    result = run_sweeper("start", str(path))
    assert result.returncode == 0, result.stdout + result.stderr
    trials = load(study_dir).get_trials()
    diverged = [t for t in trials if t.user_attrs.get("diverged")]
    assert diverged, "lr up to 1000 with SGD diverges"
    for trial in diverged:
        assert trial.state == TrialState.PRUNED
        assert trial.user_attrs["stop_reason"].startswith("diverged: loss=")
        assert trial.user_attrs["stop_step"] <= 12
        assert trial.constraints == {"diverged": 1.0}
        assert f"trial {trial.number} pruned: diverged: loss=" in result.stdout
    assert not [t for t in trials if t.state == TrialState.FAIL]
    assert finished(trials) == 8
    full = max(t.user_attrs["steps"] for t in trials)
    assert all(t.user_attrs["steps"] == full for t in trials if not t.user_attrs.get("diverged"))

    off = study_dir.write(
        study(
            **{**common, "study": {"name": "off", "n_trials": 8}}, divergence={"enabled": False}
        ),
        name="off.toml",
    )
    result = run_sweeper("start", str(off))
    assert result.returncode == 0, result.stdout + result.stderr
    unguarded = optuna.load_study(
        study_name="off", storage=f"sqlite:///{study_dir.root / 'off.db'}"
    )
    assert [t.params for t in unguarded.trials] == [t.params for t in trials], (
        "same seed, same lrs"
    )
    assert not [t for t in unguarded.trials if t.user_attrs.get("diverged")]
    assert all(
        t.user_attrs["steps"] == full for t in unguarded.trials if t.state == TrialState.COMPLETE
    )


def test_a_trial_of_a_machine_lost_mid_sweep_is_retried_here(study_dir: StudyDir) -> None:
    path = study_dir.write(
        study(
            study={"n_trials": 4},
            search={**BASE["search"], "sleep": 0.02},
            resources={"devices": "cpu", "cpu_workers": 1},
        )
    )
    created = run_sweeper("start", str(path), "--n-trials", "1")
    assert created.returncode == 0, created.stdout + created.stderr
    storage = optuna.storages.RDBStorage(
        f"sqlite:///{study_dir.db}", heartbeat_interval=1, grace_period=4
    )
    other = optuna.load_study(study_name="tiny", storage=storage)
    lost = other.ask({"lr": optuna.distributions.FloatDistribution(1e-3, 1.0, log=True)})
    lost.set_user_attr("host", "machine-lost")
    alive = threading.Event()
    alive.set()

    def beat() -> None:  # the other machine is alive until this machine has no place left
        while alive.is_set():
            storage.record_heartbeat(trial_id(lost))
            time.sleep(0.5)

    beating = threading.Thread(target=beat)
    beating.start()
    env = {**os.environ, "SWEEPER_HEARTBEAT_GRACE": "4", "PYTHONUNBUFFERED": "1"}
    sweep = subprocess.Popen(
        sweeper_cmd("start", str(path)),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        wait_for(lambda: finished(load(study_dir).get_trials()) >= 3, what="three trials")
    finally:
        alive.clear()
        beating.join()
    out, err = sweep.communicate(timeout=300)
    assert sweep.returncode == 0, out + err
    trials = load(study_dir).get_trials()
    assert finished(trials) == 4, "the lost machine's place was taken here"
    failed = [t for t in trials if t.state == TrialState.FAIL]
    assert [t.number for t in failed] == [lost.number]
    retried = [t for t in trials if t.system_attrs.get("failed_trial") == lost.number]
    assert len(retried) == 1 and retried[0].state.is_finished()
    assert retried[0].params["lr"] == lost.params["lr"]


def test_a_gp_sweep_claims_in_its_trial_processes_and_ends_with_every_trial_told(
    study_dir: StudyDir,
) -> None:
    """The gp sampler runs torch to sample, which a worker (a process that forks) must not:
    its trial processes claim for it, name themselves and their worker as the trial's owner,
    and send the worker their outcome like any other."""
    path = study_dir.write(
        study(study={"n_trials": 5}, sampler={"name": "gp", "n_startup_trials": 2})
    )
    result = run_sweeper("start", str(path))
    assert result.returncode == 0, result.stdout + result.stderr
    trials = load(study_dir).get_trials()
    assert finished(trials) == 5 and len(trials) == 5
    assert all(t.user_attrs["worker_pid"] != t.user_attrs["pid"] for t in trials)
    told = {t.user_attrs["stop_reason"].split(" at ")[0] for t in trials}
    assert told <= {"completed", "pruned by median"}, told
