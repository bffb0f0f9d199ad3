"""Storages a hostile but fair user names: one line, exit 2, nothing left behind; readers
that read wherever the study is."""

from __future__ import annotations

import os

import optuna
import pytest

from sweeper.store import open_storage
from tests.conftest import StudyDir, free_port, one_line_error, run_sweeper, study
from tests.test_hostile_paths import needs_mounts, read_only

READERS = ("status", "best", "trials")


def test_a_file_that_is_not_a_database_is_refused_and_left_as_it_was(
    study_dir: StudyDir,
) -> None:
    task = study_dir.root / "tiny_task.py"
    before = task.read_bytes()
    path = study_dir.write(study(study={"storage": "sqlite:///tiny_task.py"}))
    for command in ("start", "status"):
        one_line_error(run_sweeper(command, str(path), timeout=120), "is not a SQLite database")
    assert task.read_bytes() == before
    assert study_dir.created() == []


def test_a_pipe_as_storage_is_refused_without_hanging(study_dir: StudyDir) -> None:
    os.mkfifo(study_dir.root / "pipe.db")
    path = study_dir.write(study(study={"storage": "sqlite:///pipe.db"}))
    for command in ("start", *READERS):
        one_line_error(run_sweeper(command, str(path), timeout=60), "is not a regular file")
    assert study_dir.created() == ["pipe.db"]


def test_an_unreachable_server_says_what_happened_to_every_reader(study_dir: StudyDir) -> None:
    url = f"postgresql+psycopg://nobody@127.0.0.1:{free_port()}/none"
    path = study_dir.write(study(study={"storage": url}))
    for command in (*READERS, "report"):
        result = run_sweeper(command, str(path), timeout=120)
        one_line_error(result, "Connection refused")
        assert "invalid data" not in result.stderr
    assert study_dir.created() == []


def test_readers_read_a_study_on_a_read_only_mount(
    study_dir: StudyDir, tmp_path_factory: pytest.TempPathFactory
) -> None:
    needs_mounts()
    folder = tmp_path_factory.mktemp("archive")
    url = f"sqlite:///{folder}/tiny.db"
    storage = open_storage(url, create=True)  # as sweeper keeps it: WAL
    kept = optuna.create_study(study_name="tiny", storage=storage, direction="maximize")
    kept.optimize(lambda trial: trial.suggest_float("lr", 1e-3, 1.0, log=True), n_trials=3)
    storage.engine.dispose()
    assert sorted(p.name for p in folder.iterdir()) == ["tiny.db"], "no -wal, no -shm left"
    path = study_dir.write(study(study={"storage": url}))
    for command in READERS:
        result = read_only(folder, command, str(path))
        assert result.returncode == 0, result.stdout + result.stderr
        assert "Traceback" not in result.stderr
    assert "3/6 finished" in read_only(folder, "status", str(path)).stdout
