"""Shared helpers: study files in a temporary folder, and running sweeper for real."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

FIXTURES = Path(__file__).parent / "fixtures"
SERVER = os.environ.get("SWEEPER_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432")
"""The PostgreSQL server the tests create their databases on."""

BASE: dict[str, Any] = {
    "study": {
        "name": "tiny",
        "direction": "maximize",
        "metric": "val_acc",
        "n_trials": 6,
        "seed": 3,
    },
    "task": {"name": "tiny_task:build"},
    "trainer": {"max_epochs": 2},
    "search": {
        "lr": {"low": 1e-3, "high": 1.0, "log": True},
        "hidden": {"low": 4, "high": 32, "step": 4},
    },
    "resources": {"devices": "cpu", "cpu_workers": 2},
}


def toml_text(data: dict[str, Any]) -> str:
    import tomlkit

    return tomlkit.dumps(data)


class StudyDir:
    """A folder holding a study file and the tiny task next to it."""

    def __init__(self, root: Path) -> None:
        self.root = root
        shutil.copy(FIXTURES / "tiny_task.py", root / "tiny_task.py")

    def write(
        self, data: dict[str, Any] | None = None, text: str | None = None, name: str = "study.toml"
    ) -> Path:
        path = self.root / name
        path.write_text(text if text is not None else toml_text(data or BASE))
        return path

    @property
    def db(self) -> Path:
        return self.root / "tiny.db"

    def created(self) -> list[str]:
        """Files other than the study files and the task module."""
        return sorted(
            p.name
            for p in self.root.iterdir()
            if p.suffix not in {".toml", ".py"} and p.name != "__pycache__"
        )


@pytest.fixture
def study_dir(tmp_path: Path) -> StudyDir:
    return StudyDir(tmp_path)


def study(**sections: Any) -> dict[str, Any]:
    """BASE with sections replaced or merged: study(search={...}), study(study={"n_trials": 4})."""
    data = {key: dict(value) for key, value in BASE.items()}
    for key, value in sections.items():
        if value is None:
            data.pop(key, None)
        elif key in {"search"}:
            data[key] = value
        else:
            data.setdefault(key, {}).update(value)
    return data


def free_port() -> int:
    """A TCP port on loopback that nothing listens on now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def sweeper_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "sweeper.cli", *args]


def run_sweeper(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """Run the real command line in a new process."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run(
        sweeper_cmd(*args), capture_output=True, text=True, timeout=timeout, env=env
    )


def one_line_error(result: subprocess.CompletedProcess[str], *expected: str) -> None:
    """Bad input as a user sees it: exit 2, one line on stderr, no traceback."""
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    assert result.stderr.count("\n") == 1, result.stderr
    for text in expected:
        assert text in result.stderr, result.stderr


@pytest.fixture
def database() -> Iterator[str]:
    """A new, empty database on the server, dropped afterwards."""
    import psycopg

    name = f"sweeper_{uuid.uuid4().hex[:12]}"
    try:
        admin = psycopg.connect(f"{SERVER}/postgres", connect_timeout=5, autocommit=True)
    except psycopg.OperationalError as exc:
        pytest.skip(f"no PostgreSQL server at {SERVER} ({exc}); set SWEEPER_TEST_POSTGRES")
    admin.execute(f"CREATE DATABASE {name}")
    try:
        yield f"{SERVER}/{name}"
    finally:
        admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        admin.close()
