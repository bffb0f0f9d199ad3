"""Overfitting: scripted curves flagged, early stopping, the best value kept, top-k weights."""

from __future__ import annotations

import json
import shutil
import tomllib

import optuna
from optuna.trial import TrialState

from sweeper.run.overfitting import gap, overfit
from tests.conftest import FIXTURES, StudyDir, run_sweeper

PEAKED = "0.5,0.7,0.9,0.8,0.7,0.6"


def history(values: list[float], train_losses: list[float]) -> list[dict[str, float]]:
    return [
        {"step": 10 * (i + 1), "val_acc": v, "train_loss": t}
        for i, (v, t) in enumerate(zip(values, train_losses, strict=True))
    ]


def test_a_metric_that_peaks_and_falls_while_train_loss_falls_is_flagged() -> None:
    found = overfit(
        history([0.5, 0.8, 0.9, 0.85, 0.8], [1.0, 0.7, 0.5, 0.3, 0.2]), "val_acc", True
    )
    assert found is not None
    assert found["peak_step"] == 30 and found["peak_value"] == 0.9
    assert abs(found["drop"] - 0.1) < 1e-9 and abs(found["train_loss_fall"] - 0.3) < 1e-9


def test_converging_noisy_or_diverging_curves_are_not_flagged() -> None:
    falling = [1.0, 0.7, 0.5, 0.3, 0.2]
    assert overfit(history([0.5, 0.7, 0.8, 0.85, 0.9], falling), "val_acc", True) is None
    assert overfit(history([0.5, 0.8, 0.9, 0.898, 0.899], falling), "val_acc", True) is None
    rising = [1.0, 0.7, 0.5, 0.9, 1.5]
    assert overfit(history([0.5, 0.8, 0.9, 0.7, 0.6], rising), "val_acc", True) is None
    assert overfit(history([0.5], [1.0]), "val_acc", True) is None


def test_minimized_metric_and_the_gap() -> None:
    losses = [
        {"step": s, "val_loss": v, "train_loss": t}
        for s, v, t in [(1, 0.9, 1.0), (2, 0.5, 0.6), (3, 0.7, 0.3)]
    ]
    assert overfit(losses, "val_loss", False)["peak_value"] == 0.5
    record = {"val_loss": 0.5, "train_loss": 0.3, "val_f1": 0.8, "train_f1": 0.95}
    found = gap(record, "val_f1")
    assert abs(found["loss"] - 0.2) < 1e-9 and abs(found["f1"] - 0.15) < 1e-9


def scripted_study(study_dir: StudyDir, **trainer: object) -> object:
    shutil.copy(FIXTURES / "scripted_task.py", study_dir.root / "scripted_task.py")
    from tests.conftest import study

    data = study(
        study={"n_trials": 3, "keep_weights": 1},
        task={"name": "scripted_task:build"},
        trainer={"max_epochs": 6, **trainer},
        search={"scale": {"low": 0.5, "high": 1.0}, "curve": PEAKED},
        pruner={"name": "none"},
        resources={"devices": "cpu", "cpu_workers": 1},
    )
    return study_dir.write(data)


def test_early_stopping_keeps_the_best_value_and_only_the_top_weights(
    study_dir: StudyDir,
) -> None:
    path = scripted_study(study_dir, early_stopping_patience=2)
    result = run_sweeper("start", str(path))
    assert result.returncode == 0, result.stdout + result.stderr
    study = optuna.load_study(study_name="tiny", storage=f"sqlite:///{study_dir.db}")
    trials = study.get_trials()
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 3
    for trial in trials:
        scale = trial.params["scale"]
        assert trial.user_attrs["stop_reason"] == "early-stopped"
        assert abs(trial.value - 0.9 * scale) < 1e-6, "the value is the best, not the last"
        assert trial.user_attrs["best_epoch"] == 2
        assert [r["epoch"] for r in trial.user_attrs["history"]] == [0, 1, 2, 3, 4]
        assert trial.user_attrs["overfit"]["peak_value"] == trial.value
        assert "loss" in trial.user_attrs["gap"]
    weights = study_dir.root / "tiny" / "weights"
    assert sorted(p.name for p in weights.glob("*.pt")) == [f"trial-{study.best_trial.number}.pt"]
    assert json.loads((weights / "index.json").read_text()) == {
        str(study.best_trial.number): study.best_value
    }
    assert study.best_trial.user_attrs["weights"] == str(
        weights / f"trial-{study.best_trial.number}.pt"
    )
    best = tomllib.loads((study_dir.root / "tiny" / "best.toml").read_text())
    assert best["best"]["stop_reason"] == "early-stopped"
    assert best["best"]["epoch"] == 2
    assert best["overfitting"]["overfit"] is True
    assert "peaked at" in best["overfitting"]["overfit_detail"]
    shown = run_sweeper("best", str(path))
    assert "overfitting: val_acc peaked at" in shown.stdout
    assert "trials that overfit (metric peaked, then fell as the train loss fell): 0, 1, 2" in (
        shown.stdout
    )
    report = (study_dir.root / "tiny" / "report.html").read_text()
    assert "trials that overfit</th><td>3:" in report


def test_early_stopping_patience_must_be_a_count(study_dir: StudyDir) -> None:
    path = scripted_study(study_dir, early_stopping_patience=0)
    result = run_sweeper("check", str(path))
    assert result.returncode == 2
    assert (
        "trainer.early_stopping_patience: a whole number of validations, 1 or more"
        in result.stderr
    )
