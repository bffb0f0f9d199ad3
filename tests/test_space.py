"""Search-space entries become the Optuna distributions a user would write by hand."""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

from sweeper.errors import ConfigError
from sweeper.space import grid_space, parse_space
from sweeper.store._compat import storage_of, study_id
from tests.conftest import StudyDir, run_sweeper, study

PATH = Path("study.toml")


def test_entries_map_to_distributions_and_fixed_values() -> None:
    space = parse_space(
        {
            "lr": {"low": 1e-4, "high": 3.0, "log": True},
            "hidden": {"low": 16, "high": 128, "step": 16},
            "dropout": {"low": 0.0, "high": 0.5},
            "optimizer": {"choices": ["sgd", "adam"]},
            "batch_size": 64,
            "layers": [1, 2],
        },
        PATH,
    )
    assert space.distributions == {
        "lr": FloatDistribution(1e-4, 3.0, log=True),
        "hidden": IntDistribution(16, 128, step=16),
        "dropout": FloatDistribution(0.0, 0.5),
        "optimizer": CategoricalDistribution(["sgd", "adam"]),
    }
    assert space.fixed == {"batch_size": 64, "layers": [1, 2]}


def test_sampled_values_stay_inside_the_space() -> None:
    space = parse_space(
        {
            "lr": {"low": 1e-4, "high": 3.0, "log": True},
            "hidden": {"low": 16, "high": 128, "step": 16},
        },
        PATH,
    )
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(50):
        trial = study.ask(space.distributions)
        assert 1e-4 <= trial.params["lr"] <= 3.0
        assert trial.params["hidden"] in range(16, 129, 16)
        study.tell(trial, 0.0)


def test_float_step_and_int_log() -> None:
    space = parse_space(
        {
            "wd": {"low": 0.0, "high": 0.1, "step": 0.01},
            "units": {"low": 8, "high": 512, "log": True},
        },
        PATH,
    )
    assert space.distributions["wd"] == FloatDistribution(0.0, 0.1, step=0.01)
    assert space.distributions["units"] == IntDistribution(8, 512, log=True)


def test_fingerprint_changes_with_the_space_only() -> None:
    one = parse_space({"lr": {"low": 0.1, "high": 1.0}, "b": 2}, PATH)
    same = parse_space({"b": 2, "lr": {"low": 0.1, "high": 1.0}}, PATH)
    other = parse_space({"lr": {"low": 0.2, "high": 1.0}, "b": 2}, PATH)
    assert one.fingerprint() == same.fingerprint() != other.fingerprint()


def test_grid_lists_every_value() -> None:
    grid = grid_space(
        {
            "opt": {"choices": ["a", "b"]},
            "n": {"low": 1, "high": 3},
            "wd": {"low": 0.0, "high": 0.2, "step": 0.1},
        },
        PATH,
    )
    assert grid == {"opt": ["a", "b"], "n": [1, 2, 3], "wd": [0.0, 0.1, 0.2]}


@pytest.mark.parametrize(
    "entry",
    [
        {"choices": [1, 1]},
        {"choices": [{"a": 1}]},
        {"low": 1, "high": 2, "step": 0},
        {"low": 1, "high": 2, "log": "yes"},
        {"choices": ["a"], "low": 1},
    ],
)
def test_more_bad_entries(entry: dict) -> None:
    with pytest.raises(ConfigError, match=r"study.toml: search\.x"):
        parse_space({"x": entry}, PATH)


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ({"low": 4, "high": 32, "step": 64}, r"search\.x\.step: 64 is larger than the range"),
        ({"low": 0.0, "high": 0.1, "step": 0.5}, r"search\.x\.step: 0\.5 is larger than"),
        ({"low": 1, "high": 2, "step": float("inf")}, r"search\.x\.step: must be a positive"),
        ({"low": 1, "high": 2, "step": float("nan")}, r"search\.x\.step: must be a positive"),
        ({"low": float("nan"), "high": 1.0}, r"search\.x\.low: must be a number, got nan"),
        ({"low": 0.0, "high": float("inf")}, r"search\.x\.high: must be a number, got inf"),
        ({"choices": [1.0, float("nan")]}, r"search\.x\.choices: nan is not a choice"),
    ],
)
def test_a_range_that_collapses_or_is_not_finite_is_refused(entry: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_space({"x": entry}, PATH)


def test_a_step_as_wide_as_the_range_keeps_both_ends() -> None:
    space = parse_space({"x": {"low": 4, "high": 32, "step": 28}}, PATH)
    assert space.distributions["x"] == IntDistribution(4, 32, step=28)


def test_the_grid_visits_every_point_once_with_two_workers(study_dir: StudyDir) -> None:
    """Each claim builds its sampler anew: grid samplers seeded apart saw each other's
    ``grid_id`` as other points, ran one point twice and left another out."""
    data = study(
        study={"n_trials": 6},
        search={"lr": {"choices": [0.01, 0.1, 0.3]}, "hidden": {"choices": [8, 16]}},
        sampler={"name": "grid"},
    )
    result = run_sweeper("start", str(study_dir.write(data)))
    assert result.returncode == 0, result.stdout + result.stderr
    trials = optuna.load_study(study_name="tiny", storage=f"sqlite:///{study_dir.db}").trials
    points = sorted((t.params["lr"], t.params["hidden"]) for t in trials)
    assert points == sorted((lr, hidden) for lr in (0.01, 0.1, 0.3) for hidden in (8, 16))


def test_a_scrambled_qmc_sequence_is_one_sequence_with_two_workers(study_dir: StudyDir) -> None:
    """Optuna keeps a QMC sequence's last index under a key made from its seed: samplers
    seeded apart each began a sequence of their own, at index 0."""
    data = study(study={"n_trials": 4}, sampler={"name": "qmc", "scramble": True})
    result = run_sweeper("start", str(study_dir.write(data)))
    assert result.returncode == 0, result.stdout + result.stderr
    loaded = optuna.load_study(study_name="tiny", storage=f"sqlite:///{study_dir.db}")
    found = storage_of(loaded).get_study_system_attrs(study_id(loaded))  # where Optuna keeps it
    indices = {k: v for k, v in found.items() if k.startswith("qmc:")}
    # one sequence, at its third point: Optuna samples the first trial independently
    assert list(indices.values()) == [2], indices


def test_qmc_draws_what_is_outside_its_sequence_anew_at_each_claim() -> None:
    """A parameter the first trial lacked is drawn by QMC's independent sampler, which each
    claim builds anew: seeded alike, it drew the same value for every trial."""
    from sweeper.config import parse_config
    from sweeper.plugins import sampler_for, trial_seed

    config = parse_config(study(sampler={"name": "qmc"}), Path("/studies/study.toml"))
    qmc = optuna.create_study()
    drawn = []
    for number in range(5):
        qmc.sampler = sampler_for(config, trial_seed(config.study.seed, number))
        trial = qmc.ask()
        trial.suggest_float("x", 0.0, 1.0)
        if number:  # the first trial's space is x alone: y is outside the sequence
            drawn.append(trial.suggest_float("y", 0.0, 1.0))
        qmc.tell(trial, 0.0)
    assert len(set(drawn)) == len(drawn), drawn
