"""The report and the dashboard, opened in a real headless Chromium."""

from __future__ import annotations

import contextlib
import json
import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from optuna.trial import TrialState, create_trial

from sweeper.results.report import compute
from sweeper.store import outcome
from tests.browser import page, screenshot
from tests.conftest import StudyDir, free_port, run_sweeper, study, sweeper_cmd

SECTIONS = [
    "Optimization history",
    "Learning curves",
    "Parameter importances",
    "Parallel coordinates",
    "lr against outcome",
    "hidden against outcome",
    "Train and validation loss of the top trials (overfitting)",
]


@pytest.fixture(scope="module")
def swept(tmp_path_factory: pytest.TempPathFactory) -> StudyDir:
    """A study made by a real small sweep, some of whose trials diverge."""
    study_dir = StudyDir(tmp_path_factory.mktemp("views"))
    study_dir.write(
        study(
            study={"n_trials": 8},
            search={
                "lr": {"low": 0.01, "high": 1000.0, "log": True},
                "hidden": {"low": 4, "high": 32, "step": 4},
            },
            sampler={"name": "random"},
            pruner={"name": "none"},
        )
    )
    result = run_sweeper("start", str(study_dir.root / "study.toml"))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "report written to" in result.stdout
    return study_dir


def test_report_is_self_contained_and_renders(swept: StudyDir) -> None:
    report = swept.root / "tiny" / "report.html"
    text = report.read_text()
    assert "<script src=" not in text, "plotly.js must be inlined"
    for title in ("Summary", *SECTIONS):
        assert title in text, title
    with page() as (tab, errors):
        tab.goto(report.as_uri())
        tab.wait_for_function(
            f"document.querySelectorAll('.js-plotly-plot .main-svg').length >= {len(SECTIONS)}",
            timeout=30_000,
        )
        charts = tab.eval_on_selector_all("section.chart", "els => els.length")
        rendered = tab.eval_on_selector_all("section.chart .js-plotly-plot", "els => els.length")
        summary = tab.inner_text("#summary")
        screenshot(tab, "report")
    assert errors == []
    assert rendered == charts >= len(SECTIONS) + 1
    assert "diverged" in summary and "saved by stopping early" in summary


def test_report_command_writes_where_asked(swept: StudyDir, tmp_path: Path) -> None:
    target = tmp_path / "out.html"
    result = run_sweeper("report", str(swept.root / "study.toml"), "-o", str(target))
    assert result.returncode == 0, result.stderr
    assert target.stat().st_size > 1_000_000  # plotly.js itself is over 3 MB


def wait_http(url: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(0.3)
    raise AssertionError(f"{url} did not answer")


class Served:
    """A running ``sweeper dashboard``: its address; once stopped, what it printed."""

    def __init__(self, url: str, process: subprocess.Popen[str]) -> None:
        self.url, self.process, self.stderr = url, process, ""

    def get(self, path: str) -> Any:
        with urllib.request.urlopen(self.url + path) as answer:
            return json.loads(answer.read())


@contextlib.contextmanager
def dashboard(study_file: Path, *options: str) -> Iterator[Served]:
    """``sweeper dashboard`` on a free port, once it answers; stopped afterwards."""
    port = free_port()
    process = subprocess.Popen(
        sweeper_cmd("dashboard", str(study_file), "--port", str(port), *options),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    served = Served(f"http://127.0.0.1:{port}", process)
    try:
        wait_http(f"{served.url}/api/studies")
        yield served
    finally:
        process.terminate()
        served.stderr = process.communicate(timeout=30)[1]


def test_dashboard_shows_the_study_in_chromium(swept: StudyDir) -> None:
    with dashboard(swept.root / "study.toml") as served, page() as (tab, errors):
        tab.goto(f"{served.url}/dashboard/")
        tab.get_by_text("1. tiny").wait_for(timeout=30_000)
        tab.goto(f"{served.url}/dashboard/studies/1")
        tab.wait_for_selector(".js-plotly-plot .main-svg", timeout=30_000)
        tab.get_by_text("Learning curves by outcome").first.wait_for(timeout=30_000)
        tab.get_by_text("Validation metrics of the best trial").first.wait_for()
        screenshot(tab, "dashboard")
        tab.goto(f"{served.url}/dashboard/studies/1/trials")
        tab.get_by_text("8 Trials").wait_for(timeout=30_000)
        tab.get_by_text("stop_reason").first.wait_for()
        trials_text = tab.inner_text("body")
        screenshot(tab, "dashboard-trials")
    assert errors == []
    assert "diverged: loss=" in trials_text
    assert "dashboard of 'tiny' on http://127.0.0.1:" in served.stderr


def test_dashboard_port_in_use_is_a_clear_error(swept: StudyDir) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_sweeper("dashboard", str(swept.root / "study.toml"), "--port", str(port))
    assert result.returncode == 2
    assert f"port {port} on 127.0.0.1 is in use; pick another with --port" in result.stderr


def test_dashboard_beyond_loopback_warns(swept: StudyDir) -> None:
    with dashboard(swept.root / "study.toml", "--host", "0.0.0.0") as served:
        pass
    assert "the dashboard has no authentication" in served.stderr


def test_the_dashboard_names_the_objective_after_the_metric(swept: StudyDir) -> None:
    with dashboard(swept.root / "study.toml") as served:
        shown = served.get("/api/studies/1")
    assert shown["objective_names"] == ["val_acc"], "not 'Objective 0'"


def test_sigterm_stops_the_dashboard_even_while_it_answers(swept: StudyDir) -> None:
    """A signal that lands while a page is being sent stops the server, as Kubernetes expects."""
    port = free_port()
    server = subprocess.Popen(
        sweeper_cmd("dashboard", str(swept.root / "study.toml"), "--port", str(port)),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_http(f"http://127.0.0.1:{port}/dashboard/")
        with socket.create_connection(("127.0.0.1", port)) as reader:
            # Ask for the 6 MB script and read none of it: the server blocks sending it.
            reader.sendall(b"GET /static/bundle.js HTTP/1.1\r\nHost: localhost\r\n\r\n")
            time.sleep(2)
            server.terminate()
            _, stderr = server.communicate(timeout=30)
    finally:
        server.kill()
    assert server.returncode == 143, stderr
    assert stderr.rstrip().endswith("terminated"), stderr


def test_outcomes_and_compute_saved() -> None:
    def trial(state: TrialState, steps: int, **attrs):
        return create_trial(
            state=state,
            value=1.0 if state == TrialState.COMPLETE else None,
            user_attrs={"steps": steps, "fit_seconds": steps / 10, **attrs},
        )

    trials = [
        trial(TrialState.COMPLETE, 100),
        trial(TrialState.COMPLETE, 100),
        trial(TrialState.PRUNED, 40),
        trial(TrialState.PRUNED, 5, divergence_onset=2, diverged=True),
        trial(TrialState.FAIL, 0),
    ]
    assert [outcome(t) for t in trials] == ["complete", "complete", "pruned", "diverged", "failed"]
    spent = compute(trials)
    assert spent["steps"] == 245 and spent["saved_steps"] == 60 + 95
    assert spent["device_seconds"] == pytest.approx(24.5)


def test_no_study_yet_is_a_clear_error(study_dir: StudyDir) -> None:
    path = study_dir.write(study())
    result = run_sweeper("report", str(path))
    assert result.returncode == 2
    assert "no study storage at" in result.stderr


def test_live_view_in_a_terminal(study_dir: StudyDir) -> None:
    """In a real terminal (tmux), `sweeper start` shows the slots and the study line."""
    path = study_dir.write(
        study(study={"n_trials": 6}, search={"lr": {"low": 0.01, "high": 0.1}, "sleep": 0.1})
    )
    session = f"sweeper-{free_port()}"
    command = " ".join([*sweeper_cmd("start", str(path)), ";", "sleep", "60"])
    subprocess.run(
        ["tmux", "new-session", "-d", "-s", session, "-x", "160", "-y", "40", command], check=True
    )
    try:
        seen = ""
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and "running;" not in seen:
            seen = subprocess.run(
                ["tmux", "capture-pane", "-p", "-t", session], capture_output=True, text=True
            ).stdout
            time.sleep(0.3)
        assert "slot  device  trial" in seen, seen
        assert "/6 finished" in seen and "elapsed" in seen, seen
        assert "GPU available" not in seen, "Lightning's own output stays in the worker logs"
    finally:
        subprocess.run(["tmux", "kill-session", "-t", session], check=False)
