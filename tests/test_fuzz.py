"""Hostile study files: every key of every section given a wrong type, an empty value or a
huge one, and a file that is not UTF-8. Each is refused in one line on stderr naming the file
and the key, with exit code 2, no traceback and nothing written, quickly.

Most cases run in this process through ``sweeper check``; a handful run ``sweeper start`` in a
process of its own. ``[trainer]`` values are checked against lightning.Trainer's own types
and by building a Trainer; a huge number of epochs or steps is a valid request there.
"""

from __future__ import annotations

import time
from typing import Any

import pytest
from typer.testing import CliRunner

from sweeper.cli import app
from tests.conftest import StudyDir, run_sweeper, study

runner = CliRunner()
HUGE_INT = 10**30
HUGE_TEXT = "x" * 100_000
LIMIT_S = 60.0
"""Seconds a refusal may take: it must never hang (a FIFO, a lock), while the first import
of the task and of torch alone takes 5-15 s on a loaded 2-core machine."""

FULL = study(
    study={"storage": "sqlite:///tiny.db", "keep_weights": 1, "max_failures": 10},
    sampler={"name": "tpe", "n_startup_trials": 2},
    pruner={"name": "median", "n_warmup_steps": 1},
    divergence={"enabled": True, "factor": 4.0, "patience": 5, "warmup_steps": 0},
    resources={
        "devices": "cpu",
        "trials_per_device": 1,
        "cpu_workers": 2,
        "trial_timeout": 600.0,
    },
    validation={"folds": 1},
    trainer={
        "max_epochs": 2,
        "gradient_clip_val": 1.0,
        "deterministic": False,
        "log_every_n_steps": 10,
    },
    audit={"min_examples_per_class": 20, "max_metric_step": 0.01},
    schedule={
        "cron": "0 2 * * *",
        "timezone": "UTC",
        "warm_start_top_k": 5,
        "regression_tolerance": 0.01,
        "notify": "https://hooks.example.org/sweeps",
    },
)
"""A study file that sets every key sweeper reads; ``sweeper check`` accepts it."""

REQUIRED = ("study", "task", "search", "sampler", "pruner")
"""Sections that an empty table does not satisfy (the others have defaults for every key)."""


def bad_values(good: Any, in_search: bool) -> list[Any]:
    """Wrong types, empty values and huge values for a key whose good value is ``good``."""
    if isinstance(good, bool):
        return [1, "true", "", HUGE_INT]
    if isinstance(good, int):  # in [search] a float makes a float range: not wrong there
        return ["3", True, "", HUGE_INT, -HUGE_INT] + ([] if in_search else [1.5])
    if isinstance(good, float):
        return ["0.5", True, "", HUGE_INT, float("nan"), float("inf")]
    return [3, True, ["a"], "", HUGE_TEXT]


def cases() -> list[tuple[str, list[str], Any]]:
    """(key, path into the file, value) for every key of every section."""
    found = []
    for section, table in FULL.items():
        for value in [3, "x", []] + ([{}] if section in REQUIRED else []):
            found.append((section, [section], value))
        for key, good in table.items():
            if section == "search":
                for bound, inner in good.items():
                    for value in bad_values(inner, in_search=True):
                        found.append((f"search.{key}.{bound}", [section, key, bound], value))
                continue
            for value in bad_values(good, in_search=False):
                if section == "trainer" and value == HUGE_INT:
                    continue
                if (section, key) == ("study", "metric") and value == ["a"]:
                    value = ["a", 3]  # a list of names is several metrics: one not a name
                found.append((f"{section}.{key}", [section, key], value))
    for value in [[], [HUGE_INT], ["0"], [True], "gpu"]:
        found.append(("resources.devices", ["resources", "devices"], value))
    return found


def with_value(where: list[str], value: Any) -> dict[str, Any]:
    data = {section: dict(table) for section, table in FULL.items()}
    data["search"] = {name: dict(entry) for name, entry in FULL["search"].items()}
    table: Any = data
    for part in where[:-1]:
        table = table[part]
    table[where[-1]] = value
    return data


CASES = cases()


def case_id(case: tuple[str, list[str], Any]) -> str:
    key, _, value = case
    shown = repr(value)
    return f"{key}={shown[:20]}{'...' if len(shown) > 20 else ''}"


def assert_refused(
    study_dir: StudyDir, path: Any, named: str, code: int, stderr: str, seconds: float
) -> None:
    """Exit 2, one line naming the file and then ``named`` (a key, or what is wrong)."""
    lines = stderr.splitlines()
    assert code == 2, stderr[:1000]
    assert len(lines) == 1, stderr[:1000]
    assert "Traceback" not in stderr
    assert lines[0].startswith(f"error: {path}: "), lines[0][:300]
    rest = lines[0][len(f"error: {path}: ") :]
    assert rest.startswith(named), lines[0][:300]
    assert len(lines[0]) < 1000, "a long value is shortened, not shown whole"
    assert study_dir.created() == []
    assert seconds < LIMIT_S


def test_the_full_study_file_is_valid(study_dir: StudyDir) -> None:
    result = runner.invoke(app, ["check", str(study_dir.write(FULL))])
    assert result.exit_code == 0, result.output
    assert study_dir.created() == []


@pytest.mark.parametrize("case", CASES, ids=[case_id(c) for c in CASES])
def test_every_key_refuses_hostile_values(
    study_dir: StudyDir, case: tuple[str, list[str], Any]
) -> None:
    key, where, value = case
    path = study_dir.write(with_value(where, value))
    began = time.monotonic()
    result = runner.invoke(app, ["check", str(path)])
    seconds = time.monotonic() - began
    assert "Traceback" not in result.output
    assert_refused(study_dir, path, key, result.exit_code, result.stderr, seconds)


def not_utf8(study_dir: StudyDir) -> Any:
    path = study_dir.write(FULL)
    path.write_bytes(path.read_bytes().replace(b'metric = "val_acc"', b'metric = "val_\xe4cc"'))
    return path


def test_a_file_that_is_not_utf8(study_dir: StudyDir) -> None:
    path = not_utf8(study_dir)
    began = time.monotonic()
    result = runner.invoke(app, ["check", str(path)])
    seconds = time.monotonic() - began
    assert_refused(
        study_dir, path, "not UTF-8 text (byte", result.exit_code, result.stderr, seconds
    )


FOR_REAL = {
    "not UTF-8": (not_utf8, "not UTF-8 text (byte"),
    "n_trials true": (
        lambda d: d.write(with_value(["study", "n_trials"], True)),
        "study.n_trials",
    ),
    "huge integer": (
        lambda d: d.write(with_value(["resources", "cpu_workers"], HUGE_INT)),
        "resources.cpu_workers",
    ),
    "sampler option as text": (
        lambda d: d.write(with_value(["sampler", "n_startup_trials"], "x")),
        "sampler.n_startup_trials",
    ),
    "huge name": (lambda d: d.write(with_value(["study", "name"], HUGE_TEXT)), "study.name"),
    "no GPU listed": (
        lambda d: d.write(with_value(["resources", "devices"], [])),
        "resources.devices",
    ),
}


@pytest.mark.parametrize("name", list(FOR_REAL))
def test_start_refuses_for_real(study_dir: StudyDir, name: str) -> None:
    write, named = FOR_REAL[name]
    path = write(study_dir)
    began = time.monotonic()
    result = run_sweeper("start", str(path), timeout=60)
    seconds = time.monotonic() - began
    assert "Traceback" not in result.stdout + result.stderr
    assert_refused(study_dir, path, named, result.returncode, result.stderr, seconds)
