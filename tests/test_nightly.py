"""Nightly sweeps end to end: real processes, a real webhook server, the night's lock."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import optuna
import pytest
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

from sweeper.nightly.lock import NightLock
from sweeper.nightly.night import EXIT_REGRESSION, fit_to_space
from sweeper.nightly.notify import NOTIFY_DEADLINE
from sweeper.space import SearchSpace
from sweeper.store import process_start
from tests.conftest import (
    StudyDir,
    free_port,
    one_line_error,
    run_sweeper,
    study,
    sweeper_cmd,
)
from tests.test_hostile_paths import needs_mounts, read_only

optuna.logging.set_verbosity(optuna.logging.WARNING)


class Hook:
    """A local HTTP server that records POSTed JSON; it answers 500 to the first ``fail``."""

    def __init__(self, fail: int = 0) -> None:
        self.received: list[dict[str, Any]] = []
        self.attempts = 0
        hook = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                hook.attempts += 1
                if hook.attempts <= fail:
                    self.send_response(500)
                else:
                    hook.received.append(json.loads(body))
                    self.send_response(200)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


@pytest.fixture
def hook() -> Iterator[Hook]:
    server = Hook(fail=1)
    yield server
    server.server.shutdown()


def nightly_study(hook_url: str, **search: Any) -> dict[str, Any]:
    return study(
        study={"n_trials": 4},
        search={
            "lr": {"low": 1e-3, "high": 1.0, "log": True},
            "hidden": {"low": 4, "high": 32, "step": 4},
            **search,
        },
        schedule={"warm_start_top_k": 2, "regression_tolerance": 0.01, "notify": hook_url},
    )


def night_study(study_dir: StudyDir, date: str) -> optuna.Study:
    return optuna.load_study(study_name=f"tiny@{date}", storage=f"sqlite:///{study_dir.db}")


def test_three_nights_warm_start_lock_regression_and_webhook(
    study_dir: StudyDir, hook: Hook
) -> None:
    path = study_dir.write(nightly_study(hook.url, sleep=0.2))
    night_dir = study_dir.root / "tiny" / "nights"

    first = subprocess.Popen(
        [*sweeper_cmd("nightly", str(path), "--night", "2026-11-20")],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert first.stdout is not None
    lines = []
    for line in first.stdout:
        lines.append(line)
        if line.startswith("warm start:"):
            break
    started = time.monotonic()
    second = run_sweeper("nightly", str(path), "--night", "2026-11-20")
    assert second.returncode == 0, second.stderr
    assert "another `sweeper nightly` of study 'tiny' is running" in second.stdout
    assert f"(process {first.pid} on {socket.gethostname()} holds" in second.stdout
    assert time.monotonic() - started < 15, "the second run answers without running trials"
    rest, _ = first.communicate(timeout=300)
    output = "".join(lines) + rest
    assert first.returncode == 0, output
    assert "warm start: no earlier night" in output
    assert "night 2026-11-20: best val_acc=" in output and ": first" in output
    assert "attempt 1 of 3 failed" in output, "the webhook's first 500 is retried"
    assert f"notified {hook.url.removesuffix('/hook')}/... (HTTP 200)" in output
    assert "/hook" not in output, "the webhook's path is not shown"
    assert [body["night"] for body in hook.received] == ["2026-11-20"]
    night1 = night_study(study_dir, "2026-11-20")
    assert len(night1.trials) == 4, "the second run added nothing"

    path = study_dir.write(nightly_study(hook.url))
    result = run_sweeper("nightly", str(path), "--night", "2026-11-21")
    assert result.returncode == 0, result.stdout + result.stderr
    top = sorted(
        (t for t in night1.trials if t.value is not None), key=lambda t: t.value, reverse=True
    )[:2]
    night2 = night_study(study_dir, "2026-11-21")
    first_two = sorted(night2.trials, key=lambda t: t.number)[:2]
    assert [t.params for t in first_two] == [t.params for t in top]
    assert first_two[0].user_attrs["warm_start_from"] == f"night 2026-11-20 trial {top[0].number}"

    again = run_sweeper("nightly", str(path), "--night", "2026-11-21")
    assert again.returncode == 0 and "already finished" in again.stdout
    assert len(night_study(study_dir, "2026-11-21").trials) == 4

    # Night 3 searches only learning rates far too small to learn: worse on purpose.
    path = study_dir.write(
        nightly_study(hook.url)
        | {
            "search": {
                "lr": {"low": 1e-7, "high": 2e-7, "log": True},
                "hidden": {"low": 4, "high": 32, "step": 4},
            }
        }
    )
    result = run_sweeper("nightly", str(path), "--night", "2026-11-22")
    assert result.returncode == EXIT_REGRESSION, result.stdout + result.stderr
    assert "clipped to 2e-07" in result.stdout
    assert "regression: worse than night 2026-11-21" in result.stdout
    summary = json.loads((night_dir / "2026-11-22" / "summary.json").read_text())
    assert summary["status"] == "regression" and summary["previous_night"] == "2026-11-21"
    assert summary["delta"] < -0.01 and "lr" in summary["changed_params"]
    assert [body["status"] for body in hook.received][-1] == "regression"
    report = (night_dir / "2026-11-22" / "report.html").read_text()
    assert '<a href="../2026-11-21/report.html">' in report
    assert '<a href="../2026-11-20/report.html">' in report

    history = run_sweeper("history", str(path), "--json")
    rows = json.loads(history.stdout)
    assert [(r["night"], r["status"]) for r in rows] == [
        ("2026-11-20", "first"),
        ("2026-11-21", rows[1]["status"]),
        ("2026-11-22", "regression"),
    ]
    assert rows[1]["status"] in {"improved", "steady", "regression"}
    table = run_sweeper("history", str(path))
    assert "2026-11-22" in table.stdout and "regression" in table.stdout
    (night_dir / "2026-11-22" / "report.html").unlink()
    again = run_sweeper("report", str(path), "--night", "2026-11-22")
    assert again.returncode == 0, again.stderr
    assert (
        '<a href="../2026-11-21/report.html">'
        in (night_dir / "2026-11-22" / "report.html").read_text()
    )
    best = json.loads(run_sweeper("best", str(path), "--night", "2026-11-21", "--json").stdout)
    assert best["study"] == "tiny@2026-11-21" and best["counts"]["complete"] == 4
    missing = run_sweeper("status", str(path), "--night", "2026-11-19")
    assert missing.returncode == 2
    assert "no night 2026-11-19 of study 'tiny' in its storage" in missing.stderr


def test_a_dead_webhook_never_fails_the_night_nor_shows_its_token(study_dir: StudyDir) -> None:
    port = free_port()
    path = study_dir.write(nightly_study(f"http://127.0.0.1:{port}/hook/T0KEN-1?key=K3Y-2#F-3"))
    result = run_sweeper("nightly", str(path), "--night", "2026-11-20")
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"notify http://127.0.0.1:{port}/...: attempt 3 of 3 failed" in result.stdout
    assert "gave up; the night's result stands" in result.stdout
    for secret in ("T0KEN-1", "K3Y-2", "F-3", "/hook"):
        assert secret not in result.stdout + result.stderr


class Trickle:
    """A webhook that answers a byte a second: a status line, then a header that never ends.

    Each answer stops by itself after ``seconds``; the server stops when closed.
    """

    def __init__(self, seconds: int = 90) -> None:
        self.seconds = seconds
        self.connections = 0
        self.stop = threading.Event()
        self.server = socket.create_server(("127.0.0.1", 0))
        self.server.settimeout(0.5)
        self.port = self.server.getsockname()[1]
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while not self.stop.is_set():
            try:
                connection, _ = self.server.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=self._answer, args=(connection,), daemon=True).start()

    def _answer(self, connection: socket.socket) -> None:
        with connection, contextlib.suppress(OSError):
            connection.settimeout(5)
            connection.recv(65536)
            connection.sendall(b"HTTP/1.1 200 OK\r\nX-Slow: ")
            for _ in range(self.seconds):
                if self.stop.wait(1):
                    return
                connection.sendall(b"a")

    def close(self) -> None:
        self.stop.set()
        self.server.close()


@pytest.fixture
def trickle() -> Iterator[Trickle]:
    server = Trickle()
    yield server
    server.close()


def test_a_webhook_that_answers_a_byte_a_second_cannot_keep_the_night_alive(
    study_dir: StudyDir, trickle: Trickle
) -> None:
    url = f"http://127.0.0.1:{trickle.port}/hooks/T0KEN-abc?key=K3Y-def"
    path = study_dir.write(study(study={"n_trials": 2}, schedule={"notify": url}))
    night = subprocess.Popen(
        sweeper_cmd("nightly", str(path), "--night", "2026-11-20"),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert night.stdout is not None
    lines = []
    try:
        for line in night.stdout:
            lines.append(line)
            if line.startswith("night 2026-11-20:"):  # the summary, just before notifying
                break
        summarized = time.monotonic()
        night.wait(timeout=NOTIFY_DEADLINE + 15)
        waited = time.monotonic() - summarized
    finally:
        if night.poll() is None:
            night.kill()
            night.wait()
    output = "".join(lines) + night.stdout.read()
    assert night.returncode == 0, output
    assert waited < NOTIFY_DEADLINE + 5, output
    assert "attempt 1 of 3 failed: no complete answer within 10 s" in output
    assert "gave up; the night's result stands" in output
    assert trickle.connections == 3
    assert f"notify http://127.0.0.1:{trickle.port}/...: attempt" in output
    for secret in ("T0KEN-abc", "K3Y-def", "/hooks"):
        assert secret not in output


HOLDER = """
import fcntl, json, os, socket, sys, time
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)
fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
start = int(open(f"/proc/{os.getpid()}/stat").read().rsplit(")", 1)[1].split()[19])
record = {"pid": os.getpid(), "start": start, "host": socket.gethostname(),
          "pid_namespace": os.readlink("/proc/self/ns/pid")}
os.write(fd, json.dumps(record).encode())
child = os.fork()
if child == 0:  # keeps the inherited lock after its parent is gone, for a while
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    os.dup2(devnull, 2)
    time.sleep(120)
    os._exit(0)
print(os.getpid(), child, flush=True)
"""


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc")
def test_a_lock_whose_holder_is_gone_is_taken_over(study_dir: StudyDir) -> None:
    path = study_dir.write(study(study={"n_trials": 2}))
    lock = study_dir.root / "tiny" / "nightly.lock"
    lock.parent.mkdir()
    holder = subprocess.run(
        [sys.executable, "-c", HOLDER, str(lock)], capture_output=True, text=True, timeout=30
    )
    assert holder.returncode == 0, holder.stderr
    gone, child = (int(pid) for pid in holder.stdout.split())
    try:
        result = run_sweeper("nightly", str(path), "--night", "2026-11-20")
    finally:
        os.kill(child, signal.SIGKILL)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "another `sweeper nightly`" not in result.stdout
    host = socket.gethostname()
    assert f"took over {lock}: its holder, process {gone} on {host}, is gone" in result.stdout
    assert "night 2026-11-20: best val_acc=" in result.stdout
    assert json.loads(lock.read_text())["pid"] not in {gone, child}


def test_a_live_holder_keeps_the_lock_and_a_reused_pid_does_not(tmp_path: Path) -> None:
    said: list[str] = []
    path = tmp_path / "nightly.lock"
    first, second = NightLock(path), NightLock(path)
    assert first.acquire(said.append) is None
    me = json.loads(path.read_text())
    assert me["pid"] == os.getpid() and me["start"] == process_start(os.getpid())
    assert second.acquire(said.append) == me and said == []
    for other in ({"host": "elsewhere"}, {"pid_namespace": "pid:[1]"}):
        unseen = me | other | {"pid": 2**22 + 1}  # a pid this process cannot judge
        path.write_text(json.dumps(unseen))
        assert second.acquire(said.append) == unseen and said == [], "kept: it may be alive"
    if me["start"] is not None:  # the pid is in use again, by a process started later
        path.write_text(json.dumps(me | {"start": me["start"] - 1}))
        assert second.acquire(said.append) is None
        assert said == [
            f"took over {path}: its holder, process {os.getpid()} on {me['host']}, is gone"
        ]
    second.release()
    first.release()


def test_a_night_with_no_completed_trial_after_an_earlier_night_exits_1(
    study_dir: StudyDir,
) -> None:
    path = study_dir.write(nightly_study("http://127.0.0.1:9/hook"))
    first = run_sweeper("nightly", str(path), "--night", "2026-11-20")
    assert first.returncode == 0, first.stdout + first.stderr
    # Tonight searches only learning rates that diverge: every trial is pruned.
    diverging = nightly_study("http://127.0.0.1:9/hook", lr={"low": 1e4, "high": 1e5, "log": True})
    path = study_dir.write(diverging)
    night = run_sweeper("nightly", str(path), "--night", "2026-11-21")
    assert night.returncode == 1, night.stdout + night.stderr
    summary = night_study(study_dir, "2026-11-21").user_attrs["night_summary"]
    assert summary["status"] == "no-result" and summary["best_value"] is None
    assert "no-result" in run_sweeper("history", str(path)).stdout


def test_bad_date_is_refused_and_nothing_written(study_dir: StudyDir) -> None:
    path = study_dir.write(nightly_study("http://127.0.0.1:9/hook"))
    result = run_sweeper("nightly", str(path), "--night", "2026-13-01")
    assert result.returncode == 2
    assert "--night: expected YYYY-MM-DD, got '2026-13-01'" in result.stderr
    assert study_dir.created() == []


def test_fit_to_space_clips_drops_and_skips() -> None:
    space = SearchSpace(
        {
            "lr": FloatDistribution(1e-4, 1e-1, log=True),
            "hidden": IntDistribution(16, 64, step=16),
            "optimizer": CategoricalDistribution(["adam", "sgd"]),
            "dropout": FloatDistribution(0.0, 0.5),
        },
        {},
    )
    fitted, notes = fit_to_space(
        {"lr": 0.5, "hidden": 100, "optimizer": "sgd", "warmup": 3}, space
    )
    assert fitted == {"lr": 0.1, "hidden": 64, "optimizer": "sgd"}
    assert notes == [
        "lr = 0.5 clipped to 0.1",
        "hidden = 100 clipped to 64",
        "warmup is no longer searched: dropped",
        "dropout not searched last night: left to the sampler",
    ]
    fitted, notes = fit_to_space({"lr": 0.01, "hidden": 32, "optimizer": "lion"}, space)
    assert fitted is None and notes == ["optimizer = 'lion' is no longer a choice: skipped"]


def test_an_interrupted_night_resumes_and_rerun_runs_a_finished_one_again(
    study_dir: StudyDir,
) -> None:
    import signal

    from optuna.trial import TrialState

    path = study_dir.write(
        nightly_study("http://127.0.0.1:9/hook", sleep=0.2) | {"schedule": {"warm_start_top_k": 2}}
    )
    night = subprocess.Popen(
        sweeper_cmd("nightly", str(path), "--night", "2026-11-20"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )

    def running() -> bool:
        try:
            trials = night_study(study_dir, "2026-11-20").get_trials()
        except KeyError:
            return False
        return any(t.state == TrialState.RUNNING and "device" in t.user_attrs for t in trials)

    deadline = time.monotonic() + 120
    while not running():
        assert time.monotonic() < deadline, "no trial started"
        time.sleep(0.2)
    night.send_signal(signal.SIGINT)
    out, err = night.communicate(timeout=120)
    assert night.returncode == 130, out + err
    assert not (study_dir.root / "tiny" / "nights" / "2026-11-20" / "summary.json").exists()

    resumed = run_sweeper("nightly", str(path), "--night", "2026-11-20")
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "resuming night 2026-11-20" in resumed.stdout
    assert "warm start:" not in resumed.stdout, "the warm start is enqueued once"
    first = night_study(study_dir, "2026-11-20").get_trials()
    assert sum(t.state.is_finished() and t.state != TrialState.FAIL for t in first) == 4
    assert (
        json.loads(
            (study_dir.root / "tiny" / "nights" / "2026-11-20" / "summary.json").read_text()
        )["status"]
        == "first"
    )

    forced = run_sweeper("nightly", str(path), "--night", "2026-11-20", "--rerun")
    assert forced.returncode == 0, forced.stdout + forced.stderr
    assert "--rerun: night 2026-11-20 deleted, running it again" in forced.stdout
    again = night_study(study_dir, "2026-11-20").get_trials()
    assert len(again) == 4 and all(t.state == TrialState.COMPLETE for t in again)


def test_bad_data_stops_a_night_before_anything_is_written(study_dir: StudyDir) -> None:
    task = study_dir.root / "tiny_task.py"
    task.write_text(
        task.read_text() + "\n\ndef examples():\n"
        "    return {'train': [{'text': 'x', 'label': 'a'}, {'text': 'x', 'label': 'b'}],\n"
        "            'val': [{'text': 'y', 'label': 'a'}, {'text': 'z', 'label': 'b'}]}\n"
    )
    path = study_dir.write(nightly_study("http://127.0.0.1:9/hook"))
    result = run_sweeper("nightly", str(path), "--night", "2026-11-20")
    assert result.returncode == 2, result.stdout + result.stderr
    assert "conflicting labels" in result.stdout
    assert "'x': train row 1 (a), train row 2 (b)" in result.stdout
    assert "the data audit found 1 error(s)" in result.stderr
    assert study_dir.created() == [], "no storage, no night folder, no lock file"


def test_an_output_folder_that_is_a_file_is_one_line_and_nothing_written(
    study_dir: StudyDir,
) -> None:
    path = study_dir.write(study(study={"n_trials": 1}))
    (study_dir.root / "tiny").write_text("not a folder")
    result = run_sweeper("nightly", str(path), "--night", "2026-11-20")
    one_line_error(result, f"{study_dir.root / 'tiny'} is a file, not a folder")
    assert study_dir.created() == ["tiny"], "no storage, so no night study"
    assert (study_dir.root / "tiny").read_text() == "not a folder"


def test_a_read_only_study_folder_is_one_line_and_nothing_written(
    study_dir: StudyDir, tmp_path_factory: pytest.TempPathFactory
) -> None:
    needs_mounts()
    storage = tmp_path_factory.mktemp("storage") / "tiny.db"
    path = study_dir.write(study(study={"n_trials": 1, "storage": f"sqlite:///{storage}"}))
    result = read_only(study_dir.root, "nightly", str(path), "--night", "2026-11-20")
    one_line_error(result, f"cannot write into {study_dir.root / 'tiny'}", "Read-only")
    assert not storage.exists(), "no night study"
    assert study_dir.created() == []


def test_an_unreachable_postgresql_is_one_line_and_leaves_no_lock(study_dir: StudyDir) -> None:
    url = f"postgresql+psycopg://nobody@127.0.0.1:{free_port()}/none"
    path = study_dir.write(study(study={"n_trials": 1, "storage": url}))
    result = run_sweeper("nightly", str(path), "--night", "2026-11-20", timeout=120)
    one_line_error(result, "cannot open study storage", "127.0.0.1")
    assert study_dir.created() == [], "no night folder, no lock file"


def test_a_storage_refused_once_the_night_holds_its_lock_leaves_no_lock(
    study_dir: StudyDir,
) -> None:
    path = study_dir.write(study(study={"n_trials": 1, "storage": "sqlite:////proc/sweeper/x.db"}))
    result = run_sweeper("nightly", str(path), "--night", "2026-11-20", timeout=120)
    one_line_error(result, "cannot create the claim lock")
    assert study_dir.created() == [], "no night folder, no lock file"


def test_a_parameter_only_one_night_has_is_shown_absent_on_the_other() -> None:
    from sweeper.nightly.night import describe

    summary = {
        "night": "2026-11-30",
        "metric": "val_acc",
        "best_value": 0.9,
        "previous_night": "2026-11-29",
        "previous_best_value": 0.8,
        "delta": 0.1,
        "status": "improved",
        "changed_params": {"momentum": {"before": 0.9}, "warmup": {"after": None}},
    }
    assert describe(summary)[1:] == ["  momentum: 0.9 -> absent", "  warmup: absent -> None"]


def add_night(study_dir: StudyDir, date: str, search: list[float], runs: list[float]) -> None:
    """A finished night: search trials of these values, then confirmations of its first."""
    made = optuna.create_study(
        study_name=f"tiny@{date}", storage=f"sqlite:///{study_dir.db}", direction="maximize"
    )
    space = {"lr": FloatDistribution(1e-3, 1.0)}
    for number, value in enumerate(search):
        params = {"lr": 0.01 * (number + 1)}
        made.add_trial(optuna.trial.create_trial(value=value, params=params, distributions=space))
    for seed, value in enumerate(runs, start=1):
        made.add_trial(
            optuna.trial.create_trial(
                value=value,
                params={"lr": 0.01},
                distributions=space,
                user_attrs={"confirms": 0, "confirm_seed": seed},
            )
        )


def test_with_confirm_a_night_is_judged_by_its_mean_not_by_a_lucky_seed(
    study_dir: StudyDir,
) -> None:
    import datetime as dt

    from sweeper.config import load_config
    from sweeper.nightly.night import earlier_night, summarize
    from sweeper.store import load_named

    data = nightly_study("http://127.0.0.1:9/hook")
    data["confirm"] = {"top_k": 1, "seeds": 2}
    config = load_config(study_dir.write(data))
    add_night(study_dir, "2026-11-20", [0.80, 0.70], [0.99, 0.81])  # mean 0.8667, a lucky 0.99
    add_night(study_dir, "2026-11-21", [0.85, 0.60], [0.86, 0.87])  # mean 0.86
    tonight = config.for_night(dt.date(2026, 11, 21))
    previous = earlier_night(config, dt.date(2026, 11, 21))
    assert previous is not None
    assert [t.number for t in previous.best] == [0, 1], "warm start: search trials only"
    summary = summarize(tonight, load_named(config, "tiny@2026-11-21"), previous)
    assert summary["best_value"] == pytest.approx(0.86)
    assert summary["previous_best_value"] == pytest.approx((0.80 + 0.99 + 0.81) / 3)
    assert summary["status"] == "steady", summary
    assert (summary["trials"], summary["confirmations"]) == (2, 2)


def test_the_warm_start_queues_last_nights_chosen_configuration_first() -> None:
    import datetime as dt

    from sweeper.nightly.night import EarlierNight

    space = {"lr": FloatDistribution(1e-3, 1.0)}
    made = [
        optuna.trial.create_trial(value=v, params={"lr": lr}, distributions=space)
        for v, lr in ((0.9, 0.1), (0.8, 0.2), (0.7, 0.3))
    ]
    for number, trial in enumerate(made):
        trial.number = number
    night = EarlierNight(dt.date(2026, 11, 20), made, chosen=made[1], score=0.85)
    assert [t.number for t in night.ranked] == [1, 0, 2], "chosen by its mean: first"
    assert night.judged == (made[1], 0.85)
    assert [t.number for t in EarlierNight(night.date, made).ranked] == [0, 1, 2]
