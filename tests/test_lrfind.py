"""`sweeper lr-find`: the range test, its suggestion, and --write keeping the file's layout."""

from __future__ import annotations

import math

import pytest
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from typer.testing import CliRunner

from sweeper.cli import app
from sweeper.config import load_config
from sweeper.lrfind import _divergence, centre, suggest
from tests.conftest import StudyDir, study

runner = CliRunner()
COMMENTED = """# a study with comments that must survive --write
[study]
name = "tiny"
direction = "maximize"
metric = "val_acc"
n_trials = 4

[task]
name = "tiny_task:build"   # next to this file

[search]
lr = { low = 0.01, high = 1000.0, log = true }   # SGD diverges far below 1000
hidden = { low = 4, high = 32, step = 4 }
"""


def test_range_test_finds_divergence_and_writes_the_range(study_dir: StudyDir) -> None:
    path = study_dir.write(text=COMMENTED)
    result = runner.invoke(app, ["lr-find", str(path), "--write"])
    assert result.exit_code == 0, result.output
    assert "learning rate  loss" in result.output
    diverges = float(result.output.split("the loss diverges from lr = ")[1].split()[0])
    config = load_config(path)
    lr = config.search["lr"]
    assert lr["log"] is True
    assert lr["high"] <= diverges / 3 * 1.5 and lr["low"] < lr["high"]
    text = path.read_text()
    assert text.startswith("# a study with comments that must survive --write")
    assert "# next to this file" in text and "# SGD diverges far below 1000" in text
    before, after = COMMENTED.splitlines(), text.splitlines()
    changed = [a for a, b in zip(before, after, strict=True) if a != b]
    assert changed == [line for line in before if line.startswith("lr = ")]
    assert study_dir.created() == [], "lr-find writes no study storage"


def test_without_write_the_file_is_untouched(study_dir: StudyDir) -> None:
    path = study_dir.write(text=COMMENTED)
    result = runner.invoke(app, ["lr-find", str(path), "--steps", "30"])
    assert result.exit_code == 0, result.output
    assert "suggested: lr = { low = " in result.output
    assert path.read_text() == COMMENTED


def test_a_study_without_a_learning_rate_is_refused(study_dir: StudyDir) -> None:
    path = study_dir.write(study(search={"rate": {"low": 0.01, "high": 1.0}}))
    before = path.read_text()
    result = runner.invoke(app, ["lr-find", str(path)])
    assert result.exit_code == 2
    assert "search: lr-find needs a float range named lr or learning_rate" in result.output
    assert path.read_text() == before


def test_divergence_is_the_first_rate_four_times_above_the_best() -> None:
    lrs = [10.0**e for e in range(-5, 2)]
    assert _divergence(lrs, [2.0, 1.5, 0.8, 0.5, 0.9, 2.1, 9.0]) == 1.0
    assert _divergence(lrs, [2.0, 1.5, math.nan, 0.5, 0.9, 2.1, 9.0]) == 1e-3
    assert _divergence(lrs, [2.0, 1.5, 1.0, 0.9, 0.8, 0.7, 0.6]) is None


def test_suggestion_stays_below_divergence() -> None:
    dist = FloatDistribution(1e-5, 10.0, log=True)
    assert suggest(dist, steepest=0.01, diverges_at=3.0) == (0.001, 1.0)
    assert suggest(dist, steepest=None, diverges_at=None) == (0.1, 10.0)


@pytest.mark.parametrize(
    ("dist", "expected"),
    [
        (FloatDistribution(1e-4, 1.0, log=True), 0.01),
        (FloatDistribution(0.0, 0.5), 0.25),
        (IntDistribution(16, 128, step=16), 80),
        (CategoricalDistribution(["adam", "sgd"]), "adam"),
    ],
)
def test_centre_of_each_kind_of_range(dist, expected) -> None:
    assert centre(dist) == pytest.approx(expected)


def test_the_range_test_leaves_out_a_parameter_whose_condition_fails_at_the_centre() -> None:
    from pathlib import Path

    from sweeper.lrfind import centre_params
    from sweeper.space import parse_space

    space = parse_space(
        {
            "lr": {"low": 1e-4, "high": 1.0, "log": True},
            "momentum": {"low": 0.0, "high": 0.9, "when": {"optimizer": "sgd"}},
            "optimizer": {"choices": ["adam", "sgd"]},
            "warmup": {"low": 0.0, "high": 0.2, "when": {"optimizer": "adam"}},
            "batch_size": 32,
        },
        Path("study.toml"),
    )
    params = centre_params(space)
    assert params["optimizer"] == "adam" and params["batch_size"] == 32
    assert params["warmup"] == pytest.approx(0.1)
    assert "momentum" not in params
