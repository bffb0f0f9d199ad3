"""The storage of a read command: opened without alembic, it reads what Optuna's own reads."""

from __future__ import annotations

import copy
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import optuna
import pytest
from optuna.storages import RDBStorage
from optuna.study import StudyDirection
from optuna.trial import TrialState

from sweeper.errors import StorageError
from sweeper.store import open_storage, study_names
from sweeper.store._compat import newest_schema_revision
from tests.conftest import study, toml_text

ROOT = Path(__file__).resolve().parent.parent

optuna.logging.set_verbosity(optuna.logging.WARNING)


def fill(url: str) -> None:
    """Studies written by Optuna itself: a maximizing one whose values include infinities,
    a minimizing one, one with two objectives, and one without a complete trial."""
    storage = RDBStorage(url)
    up = optuna.create_study(study_name="up", storage=storage, direction="maximize")
    up.set_user_attr("metric", "val_acc")
    up.set_user_attr("space", {"lr": [1e-4, 1.0]})
    storage.set_study_system_attr(storage.get_study_id_from_name("up"), "note", [1, 2])
    for value in (0.5, -math.inf, 0.9, math.inf, 0.7):
        up.add_trial(optuna.trial.create_trial(value=value))
    up.add_trial(optuna.trial.create_trial(state=TrialState.PRUNED, value=None))
    down = optuna.create_study(study_name="down", storage=storage, direction="minimize")
    for value in (0.5, -math.inf, 0.1):
        down.add_trial(optuna.trial.create_trial(value=value))
    for name, direction in (("finite up", "maximize"), ("finite down", "minimize")):
        finite = optuna.create_study(study_name=name, storage=storage, direction=direction)
        for value in (0.5, 0.9, 0.1, 0.7):
            finite.add_trial(optuna.trial.create_trial(value=value))
    both = optuna.create_study(
        study_name="both", storage=storage, directions=["minimize", "maximize"]
    )
    both.add_trial(optuna.trial.create_trial(values=[1.0, 2.0]))
    optuna.create_study(study_name="empty", storage=storage)
    storage.engine.dispose()


def reads(storage: Any) -> dict[str, Any]:
    """What Optuna's study-level reads give on ``storage``, errors named."""
    found: dict[str, Any] = {}
    for name in ("up", "down", "finite up", "finite down", "both", "empty", "missing"):
        try:
            study_id = storage.get_study_id_from_name(name)
        except KeyError:
            found[name] = "KeyError"
            continue
        found[name] = [
            storage.get_study_directions(study_id),
            storage.get_study_user_attrs(study_id),
            storage.get_study_system_attrs(study_id),
        ]
        try:
            best = storage.get_best_trial(study_id)
            found[name].append((best.number, best.values))
        except (ValueError, RuntimeError) as exc:
            found[name].append(type(exc).__name__)
    for method in ("get_study_directions", "get_study_user_attrs", "get_study_system_attrs"):
        with pytest.raises(KeyError):
            getattr(storage, method)(999)
    found["names"] = optuna.get_all_study_names(storage)
    for name in (
        "up",
        "down",
        "finite down",
        "both",
    ):  # as a study sees them (through Optuna's cache)
        seen = optuna.load_study(study_name=name, storage=storage)
        best = seen.best_trials[0] if len(seen.directions) > 1 else seen.best_trial
        found[f"study {name}"] = [seen.directions, seen.user_attrs, best]
    return found


@pytest.mark.parametrize("kind", ["sqlite", "postgres"])
def test_a_sweeper_storage_reads_what_optunas_own_reads(
    kind: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    url = f"sqlite:///{tmp_path / 's.db'}"
    if kind == "postgres":
        url = request.getfixturevalue("database")
    fill(url)
    expected = reads(RDBStorage(url))
    assert expected["up"][3] == (3, [math.inf])  # the fill is what the test means
    assert expected["down"][3] == (1, [-math.inf])
    assert expected["both"][0] == [StudyDirection.MINIMIZE, StudyDirection.MAXIMIZE]
    assert expected["finite up"][3] == (1, [0.9])
    assert expected["finite down"][3] == (2, [0.1])
    assert expected["empty"][3] == "ValueError"
    names = ["up", "down", "finite up", "finite down", "both", "empty"]
    assert study_names(url) == expected["names"] == names
    for read_only in (True, False):
        storage = open_storage(url, read_only=read_only)
        assert reads(storage) == expected, read_only
        storage.engine.dispose()


def test_the_newest_schema_revision_is_the_one_optuna_names(tmp_path: Path) -> None:
    storage = RDBStorage(f"sqlite:///{tmp_path / 's.db'}")
    assert newest_schema_revision() == storage.get_head_version()


def test_a_reader_holds_what_optunas_storage_holds(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 's.db'}"
    fill(url)
    reader = open_storage(url, read_only=True)
    assert reader.get_all_versions()  # made on demand: the schema manager Optuna's has
    assert set(vars(RDBStorage(url))) <= set(vars(reader))
    again = copy.deepcopy(open_storage(url, read_only=True))  # as Optuna copies a storage
    assert again.get_study_id_from_name("down") == 2


def test_a_reader_refuses_a_heartbeat_optuna_refuses(tmp_path: Path) -> None:
    from sweeper.store.rows import FastRDBStorage

    url = f"sqlite:///{tmp_path / 's.db'}"
    fill(url)
    for setting in ("heartbeat_interval", "grace_period"):
        with pytest.raises(ValueError, match=setting):
            FastRDBStorage(url, reader=True, **{setting: 0})


def test_a_reader_checks_an_unreadable_chain_of_migrations_with_optuna(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where the migration scripts do not give one newest revision, Optuna's own check
    decides, an older schema included."""
    import sqlite3

    from sweeper.store import _compat

    monkeypatch.setattr(_compat, "newest_schema_revision", lambda: None)
    monkeypatch.setattr(_compat, "_HEAD_VERSION", {})
    path = tmp_path / "s.db"
    fill(f"sqlite:///{path}")
    reader = open_storage(f"sqlite:///{path}", read_only=True)
    assert reader.get_study_id_from_name("up") == 1
    with sqlite3.connect(path) as db:
        db.execute("UPDATE alembic_version SET version_num = 'v3.0.0.d'")
    db.close()
    with pytest.raises(StorageError, match="made by an older Optuna"):
        open_storage(f"sqlite:///{path}", read_only=True)


def test_a_read_command_opens_its_storage_without_alembic(tmp_path: Path) -> None:
    """Alembic, which Optuna's storage imports to check its schema, was a third of a read
    command's second; the newest schema revision is read once a process (a fresh Python, as
    a user runs it)."""
    from sweeper.config import load_config
    from sweeper.store import create_or_resume

    path = tmp_path / "study.toml"
    path.write_text(toml_text(study()))
    create_or_resume(load_config(path))
    script = f"""
import sys
from typer.testing import CliRunner
from sweeper.cli import app
from sweeper.store import _compat
named = []
newest = _compat.newest_schema_revision
def counted():
    named.append(None)
    return newest()
_compat.newest_schema_revision = counted
for command in ("status", "best", "trials", "history"):
    result = CliRunner().invoke(app, [command, {str(path)!r}])
    assert result.exit_code == 0, (command, result.output)
print(sorted(m for m in sys.modules if m.split(".")[0] == "alembic"), len(named))
"""
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[] 1"  # no alembic; the migration scripts read once
