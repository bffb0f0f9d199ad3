"""How often a trial validates when a pruner watches it: often enough to be judged early."""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest

from sweeper.config import parse_config
from sweeper.run.trainer import validation_cadence
from tests.conftest import StudyDir, run_sweeper, study


def cadence(epochs: int | None = 2, **sections: object) -> dict:
    data = study(**sections)
    config = parse_config(data, Path("/studies/study.toml"))
    return validation_cadence(config, epochs)


@pytest.mark.parametrize(("epochs", "interval"), [(1, 0.25), (2, 0.5), (3, 0.5)])
def test_a_short_trial_validates_at_least_four_times(epochs: int, interval: float) -> None:
    assert cadence(epochs) == {"val_check_interval": interval}


@pytest.mark.parametrize(
    ("epochs", "sections"),
    [
        (4, {}),  # once an epoch is four times already
        (None, {}),  # no epoch count: nothing to divide
        (2, {"pruner": {"name": "none"}}),
        (2, {"trainer": {"max_epochs": 2, "val_check_interval": 1.0}}),
        (2, {"trainer": {"max_epochs": 2, "check_val_every_n_epoch": 1}}),
    ],
    ids=["four epochs", "no max_epochs", "no pruner", "val_check_interval", "check_val_every"],
)
def test_the_cadence_is_left_to_lightning(epochs: int | None, sections: dict) -> None:
    assert cadence(epochs, **sections) == {}


def test_a_pruned_sweep_of_two_epochs_validates_four_times_a_trial(study_dir: StudyDir) -> None:
    path = study_dir.write(study(study={"n_trials": 1}))
    result = run_sweeper("start", str(path))
    assert result.returncode == 0, result.stdout + result.stderr
    (trial,) = optuna.load_study(study_name="tiny", storage=f"sqlite:///{study_dir.db}").trials
    steps = [record["step"] for record in trial.user_attrs["history"]]
    assert steps == [3, 6, 9, 12]  # 6 steps an epoch, validated every half epoch
    assert list(trial.intermediate_values) == steps
