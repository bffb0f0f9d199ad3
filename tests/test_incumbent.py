"""The incumbent pruner: a trial against the best complete trial's curve at the same steps."""

from __future__ import annotations

import shutil
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from sweeper.incumbent import IncumbentPruner
from sweeper.store import report
from tests.conftest import FIXTURES, StudyDir, one_line_error, run_sweeper, study


def on_sqlite(tmp_path: Path, pruner: IncumbentPruner, *directions: str):
    """A study in a SQLite file judged by ``pruner``; it maximizes unless told otherwise."""
    return optuna.create_study(
        storage=f"sqlite:///{tmp_path / 'study.db'}",
        directions=list(directions) or ["maximize"],
        pruner=pruner,
    )


def finished(study: optuna.Study, curve: dict[int, float]) -> None:
    """A complete trial that reported ``curve`` and ended at its last value."""
    trial = study.ask()
    for step, value in curve.items():
        assert not report(study, trial, value, step)
    study.tell(trial, list(curve.values())[-1])


def judged(study: optuna.Study, curve: dict[int, float]) -> list[bool]:
    """What the pruner said after each of a new trial's values (the trial is then told
    pruned, so the incumbent stays)."""
    trial = study.ask()
    said = [report(study, trial, value, step) for step, value in curve.items()]
    study.tell(trial, state=TrialState.PRUNED)
    return said


def test_nothing_is_pruned_before_a_trial_completes(tmp_path: Path) -> None:
    study = on_sqlite(tmp_path, IncumbentPruner())
    assert judged(study, {10: 0.1, 20: 0.2}) == [False, False]


def test_a_trial_behind_the_best_at_the_same_step_is_pruned(tmp_path: Path) -> None:
    study = on_sqlite(tmp_path, IncumbentPruner(margin=0.0))
    finished(study, {10: 0.5, 20: 0.6, 30: 0.7})  # the incumbent for now
    finished(study, {10: 0.6, 20: 0.7, 30: 0.8})  # the best: every trial meets its curve
    assert judged(study, {10: 0.55}) == [True]  # behind 0.6, ahead of the first trial
    assert judged(study, {10: 0.6, 20: 0.75, 30: 0.79}) == [False, False, True]
    # between validations of the incumbent, its last value before counts
    assert judged(study, {15: 0.61, 25: 0.69}) == [False, True]


def test_the_margin_and_the_patience(tmp_path: Path) -> None:
    study = on_sqlite(tmp_path, IncumbentPruner(margin=0.05, patience=1))
    finished(study, {10: 0.6, 20: 0.7, 30: 0.8})
    assert judged(study, {10: 0.56, 20: 0.66, 30: 0.76}) == [False, False, False]  # within
    assert judged(study, {10: 0.5, 20: 0.7, 30: 0.5}) == [False, False, False]  # not in a row
    assert judged(study, {10: 0.5, 20: 0.6}) == [False, True]


def test_a_margin_from_the_incumbents_own_noise(tmp_path: Path) -> None:
    study = on_sqlite(tmp_path, IncumbentPruner())  # margin = "noise"
    finished(study, {10: 0.5, 20: 0.7, 30: 0.62, 40: 0.8})  # it fell by 0.08 once
    assert judged(study, {10: 0.43, 20: 0.63}) == [False, False]  # within 0.08
    assert judged(study, {10: 0.5, 20: 0.61}) == [False, True]


def test_the_noise_of_a_study_that_minimizes_and_after_the_warm_up(tmp_path: Path) -> None:
    study = on_sqlite(tmp_path, IncumbentPruner(n_warmup_steps=20), "minimize")
    finished(study, {10: 0.5, 20: 0.9, 30: 0.4, 40: 0.46, 50: 0.3})  # rose by 0.4 in warm-up
    assert judged(study, {20: 0.8, 30: 0.45}) == [False, False]  # within 0.06 of 0.4
    assert judged(study, {20: 0.8, 30: 0.47}) == [False, True]


def test_a_study_that_minimizes_and_a_warm_up(tmp_path: Path) -> None:
    pruner = IncumbentPruner(margin=0.0, n_warmup_steps=15)
    study = on_sqlite(tmp_path, pruner, "minimize")
    finished(study, {10: 1.0, 20: 0.5})
    assert judged(study, {10: 2.0, 20: 0.4}) == [False, False]  # judged from step 15 on
    assert judged(study, {10: 0.1, 20: 0.6}) == [False, True]
    assert judged(study, {10: 0.1, 20: float("nan")}) == [False, True]


def scripted_sweep(study_dir: StudyDir, **pruner: object) -> Path:
    """Two trials of the scripted task, the better first: scale 1.0 then 0.5 of one curve."""
    shutil.copy(FIXTURES / "scripted_task.py", study_dir.root / "scripted_task.py")
    data = study(
        study={"n_trials": 2, "seed": 1},
        task={"name": "scripted_task:build"},
        trainer={"max_epochs": 3},
        search={"scale": {"choices": [1.0, 0.5]}, "curve": "0.5,0.9,0.8"},
        sampler={"name": "grid"},
        pruner={"name": "incumbent", **pruner},
        resources={"devices": "cpu", "cpu_workers": 1},
    )
    return study_dir.write(data)


def test_a_sweep_prunes_the_trial_behind_the_first_at_its_first_validation(
    study_dir: StudyDir,
) -> None:
    result = run_sweeper("start", str(scripted_sweep(study_dir)))
    assert result.returncode == 0, result.stdout + result.stderr
    first, second = optuna.load_study(
        study_name="tiny", storage=f"sqlite:///{study_dir.db}"
    ).trials
    assert first.params["scale"] == 1.0, "the grid's order changed: pick another seed"
    assert first.state == TrialState.COMPLETE and first.value == pytest.approx(0.9)
    assert second.state == TrialState.PRUNED
    assert len(second.intermediate_values) == 1
    step = next(iter(second.intermediate_values))
    assert second.user_attrs["stop_reason"] == f"pruned by incumbent at step {step}"


def test_a_bad_option_is_named(study_dir: StudyDir) -> None:
    result = run_sweeper("check", str(scripted_sweep(study_dir, margin=-0.1)))
    one_line_error(
        result, 'pruner.margin: margin must be a number, 0 or more, or "noise", got -0.1'
    )
    assert study_dir.created() == []


def test_a_study_of_two_metrics_is_judged_by_the_first(tmp_path: Path) -> None:
    study = on_sqlite(tmp_path, IncumbentPruner(margin=0.0), "maximize", "minimize")
    for first, second in ((0.7, 1.0), (0.9, 5.0)):  # the best first metric is 0.9
        trial = study.ask()
        assert not report(study, trial, first, 10)
        study.tell(trial, [first, second])
    trial = study.ask()
    assert not report(study, trial, 0.9, 10)
    assert report(study, trial, 0.8, 20)  # behind 0.9, the incumbent's last value before
