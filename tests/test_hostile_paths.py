"""Paths and addresses a hostile but fair user gives: one line, exit 2, nothing written."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import threading
from pathlib import Path

import pytest

from tests.conftest import StudyDir, free_port, one_line_error, run_sweeper, study, sweeper_cmd


@pytest.mark.parametrize(
    ("storage", "expected"),
    [
        ("sqlite:////proc/sweeper-test/x.db", "cannot create the claim lock"),
        ("sqlite:////sys/sweeper-test.db", "cannot create the claim lock"),
        ("sqlite:///{root}/study.toml/x.db", "is a file, not a folder"),
        ("sqlite:///{root}", "is a folder; name a database file in it"),
    ],
)
def test_storage_that_cannot_be_written_is_one_line(
    study_dir: StudyDir, storage: str, expected: str
) -> None:
    path = study_dir.write(study(study={"storage": storage.format(root=study_dir.root)}))
    result = run_sweeper("start", str(path), timeout=120)
    one_line_error(result, expected)
    assert study_dir.created() == []


def test_unreachable_postgresql_is_one_line_for_start_too(study_dir: StudyDir) -> None:
    url = f"postgresql+psycopg://nobody@127.0.0.1:{free_port()}/none"
    path = study_dir.write(study(study={"storage": url}))
    for command in ("start", "status"):
        result = run_sweeper(command, str(path), timeout=120)
        one_line_error(result, "127.0.0.1")
    assert study_dir.created() == []


def test_report_into_a_folder_or_proc_is_one_line_and_leaves_nothing(
    study_dir: StudyDir,
) -> None:
    path = study_dir.write(study(study={"n_trials": 1}))
    assert run_sweeper("start", str(path)).returncode == 0
    folder = study_dir.root / "out"
    folder.mkdir()
    one_line_error(run_sweeper("report", str(path), "-o", str(folder)), "is a folder")
    assert list(folder.iterdir()) == []
    one_line_error(
        run_sweeper("report", str(path), "-o", "/proc/sweeper-report.html"), "cannot write"
    )


def test_report_follows_a_symlink_and_writes_a_fifo_in_place(study_dir: StudyDir) -> None:
    path = study_dir.write(study(study={"n_trials": 1}))
    assert run_sweeper("start", str(path)).returncode == 0
    (study_dir.root / "reports").mkdir()
    target = study_dir.root / "reports" / "tiny.html"
    target.write_text("last week's report")
    link = study_dir.root / "link.html"
    link.symlink_to(Path("reports") / "tiny.html")
    result = run_sweeper("report", str(path), "-o", str(link))
    assert result.returncode == 0, result.stdout + result.stderr
    assert link.is_symlink() and os.readlink(link) == str(Path("reports") / "tiny.html")
    assert "<html" in target.read_text()
    assert sorted(p.name for p in target.parent.iterdir()) == ["tiny.html"], "no temporary file"

    fifo = study_dir.root / "report.fifo"
    os.mkfifo(fifo)
    received: list[bytes] = []
    # A writer of our own lets the reader open at once and never hang on a replaced FIFO.
    keep_open = os.open(fifo, os.O_RDWR)
    reader = threading.Thread(target=lambda: received.append(fifo.read_bytes()), daemon=True)
    reader.start()
    try:
        result = run_sweeper("report", str(path), "-o", str(fifo))
    finally:
        os.close(keep_open)
    reader.join(timeout=30)
    assert result.returncode == 0, result.stdout + result.stderr
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode), "the FIFO is still a FIFO"
    assert received and b"<html" in received[0]
    assert not [p for p in study_dir.root.iterdir() if p.name.endswith(".partial")]


@pytest.mark.parametrize("port", ["70000", "-1"])
def test_dashboard_on_an_impossible_port_is_one_line(study_dir: StudyDir, port: str) -> None:
    path = study_dir.write(study(study={"n_trials": 1}))
    assert run_sweeper("start", str(path)).returncode == 0
    one_line_error(run_sweeper("dashboard", str(path), f"--port={port}"), "--port")


def test_dashboard_on_port_0_says_which_port_it_bound(study_dir: StudyDir) -> None:
    path = study_dir.write(study(study={"n_trials": 1}))
    assert run_sweeper("start", str(path)).returncode == 0
    server = subprocess.Popen(
        sweeper_cmd("dashboard", str(path), "--port", "0"),
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert server.stderr is not None
        line = server.stderr.readline()
    finally:
        server.terminate()
        server.wait(timeout=30)
    assert "on http://127.0.0.1:" in line and ":0/" not in line, line


def read_only(
    folder: Path, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run sweeper with ``folder`` mounted read-only, in a mount namespace of its own."""
    command = " ".join(f"'{part}'" for part in sweeper_cmd(*args))
    script = f"mount --bind '{folder}' '{folder}' && mount -o remount,bind,ro '{folder}' && "
    return subprocess.run(
        ["unshare", "--mount", "sh", "-c", script + command],
        capture_output=True,
        text=True,
        timeout=300,
        env={**(env or os.environ), "PYTHONUNBUFFERED": "1"},
    )


def needs_mounts() -> None:
    if shutil.which("unshare") is None or os.geteuid() != 0:
        pytest.skip("needs root and util-linux's unshare for a read-only mount")


def test_a_read_only_study_folder_is_refused_before_the_study_is_created(
    study_dir: StudyDir, tmp_path_factory: pytest.TempPathFactory
) -> None:
    needs_mounts()
    storage = tmp_path_factory.mktemp("storage") / "tiny.db"
    path = study_dir.write(study(study={"n_trials": 1, "storage": f"sqlite:///{storage}"}))
    result = read_only(study_dir.root, "start", str(path))
    one_line_error(result, "cannot write into", "Read-only file system")
    assert not storage.exists(), "the study was not created"


def test_storage_on_a_read_only_mount_is_one_line(
    study_dir: StudyDir, tmp_path_factory: pytest.TempPathFactory
) -> None:
    needs_mounts()
    folder = tmp_path_factory.mktemp("ro")
    path = study_dir.write(study(study={"storage": f"sqlite:///{folder}/tiny.db"}))
    one_line_error(read_only(folder, "start", str(path)), "Read-only file system")
    assert list(folder.iterdir()) == []


def test_start_does_not_replay_old_trials_as_new_events(study_dir: StudyDir) -> None:
    path = study_dir.write(study(study={"n_trials": 2}))
    assert run_sweeper("start", str(path)).returncode == 0
    again = run_sweeper("start", str(path), "--n-trials", "3")
    assert again.returncode == 0, again.stdout + again.stderr
    assert "trial 0 completed" not in again.stdout and "trial 1 " not in again.stdout
    assert "trial 2 " in again.stdout


def test_more_cpu_workers_than_cores_is_a_warning_and_capped(study_dir: StudyDir) -> None:
    path = study_dir.write(study(resources={"devices": "cpu", "cpu_workers": 10000}))
    result = run_sweeper("check", str(path))
    assert result.returncode == 0, result.stdout + result.stderr
    cores = len(os.sched_getaffinity(0))
    assert f"resources.cpu_workers = 10000 is more than the {cores} cores" in result.stderr
    assert f"ok; {min(cores, 6)} slot(s) on cpu" in result.stdout


def test_dashboard_addresses_put_ipv6_in_brackets() -> None:
    from sweeper.results.dashboard import address

    assert address("::1", 8080) == "http://[::1]:8080/"
    assert address("127.0.0.1", 8080) == "http://127.0.0.1:8080/"


def test_never_more_workers_than_trials_left(study_dir: StudyDir) -> None:
    path = study_dir.write(study(study={"n_trials": 2}))
    assert run_sweeper("start", str(path)).returncode == 0
    again = run_sweeper("start", str(path), "--n-trials", "3")
    assert again.returncode == 0, again.stdout + again.stderr
    assert "1 slot(s) on cpu, 3 trials" in again.stdout
