"""k-fold cross-validation: the same folds for the same seed, fold-by-fold reports, pruning."""

from __future__ import annotations

import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import optuna
import pytest
from optuna.trial import TrialState

from sweeper.run.folds import stratified_folds
from tests.conftest import FIXTURES, StudyDir, run_sweeper, study
from tests.test_text_task import text_study, tiny_bert

LABELS = ["a"] * 50 + ["b"] * 30 + ["c"] * 7


def test_same_seed_same_folds_and_every_example_once() -> None:
    first = stratified_folds(LABELS, 5, seed=3)
    again = stratified_folds(LABELS, 5, seed=3)
    other = stratified_folds(LABELS, 5, seed=4)
    assert all(np.array_equal(x, y) for x, y in zip(first, again, strict=True))
    assert not all(np.array_equal(x, y) for x, y in zip(first, other, strict=True))
    assert sorted(np.concatenate(first).tolist()) == list(range(len(LABELS)))
    sizes = [len(f) for f in first]
    assert max(sizes) - min(sizes) <= 1
    for label, total in Counter(LABELS).items():
        per_fold = [sum(LABELS[i] == label for i in fold) for fold in first]
        assert max(per_fold) - min(per_fold) <= 1, (label, per_fold)
        assert sum(per_fold) == total


def test_a_fold_count_below_two_is_refused() -> None:
    with pytest.raises(ValueError):
        stratified_folds(LABELS, 1, seed=0)


def scripted(study_dir: StudyDir, keys: dict | None = None, **sections: object) -> Path:
    """A 3-fold study of the scripted task, beside it; ``keys`` go into ``[study]``."""
    shutil.copy(FIXTURES / "scripted_task.py", study_dir.root / "scripted_task.py")
    data = study(
        study={"n_trials": 2, "keep_weights": 0, **(keys or {})},
        task={"name": "scripted_task:build"},
        trainer={"max_epochs": 3},
        search={"scale": {"low": 0.5, "high": 1.0, "step": 0.5}, "curve": "0.5,0.9,0.8"},
        sampler={"name": "grid"},
        pruner={"name": "threshold", "lower": 0.6},
        validation={"folds": 3},
        resources={"devices": "cpu", "cpu_workers": 1},
        **sections,
    )
    return study_dir.write(data)


def test_folds_are_reported_one_by_one_and_a_bad_configuration_is_pruned_after_the_first(
    study_dir: StudyDir,
) -> None:
    result = run_sweeper("start", str(scripted(study_dir)))
    assert result.returncode == 0, result.stdout + result.stderr
    trials = optuna.load_study(study_name="tiny", storage=f"sqlite:///{study_dir.db}").trials
    by_scale = {t.params["scale"]: t for t in trials}
    good, bad = by_scale[1.0], by_scale[0.5]
    assert good.state == TrialState.COMPLETE and good.value == pytest.approx(0.9)
    assert good.intermediate_values == pytest.approx({0: 0.9, 1: 0.9, 2: 0.9})
    assert good.user_attrs["fold_values"] == pytest.approx([0.9, 0.9, 0.9])
    assert sorted({r["fold"] for r in good.user_attrs["history"]}) == [0, 1, 2]
    assert bad.state == TrialState.PRUNED
    assert bad.user_attrs["stop_reason"] == "pruned by threshold after fold 1 of 3"
    assert list(bad.intermediate_values) == [0]


def test_a_custom_task_must_say_it_splits_folds(study_dir: StudyDir) -> None:
    result = run_sweeper("check", str(study_dir.write(study(validation={"folds": 5}))))
    assert result.returncode == 2
    assert "validation.folds: task 'tiny_task:build' does not split folds itself" in result.stderr


def test_text_task_cross_validates_over_train_and_val(study_dir: StudyDir, tmp_path: Path) -> None:
    """Full fine-tuning and LoRA alike: each fold a full run, its value the mean of the folds."""
    search = {"learning_rate": 5e-3, "batch_size": 16, "lora_r": {"choices": [0, 4]}}
    data = text_study(study_dir.root, tiny_bert(tmp_path / "bert"), search=search)
    data["validation"] = {"folds": 3}
    data["sampler"] = {"name": "grid"}
    result = run_sweeper("start", str(study_dir.write(data)))
    assert result.returncode == 0, result.stdout + result.stderr
    trials = optuna.load_study(
        study_name="text", storage=f"sqlite:///{study_dir.root / 'text.db'}"
    ).trials
    assert sorted(t.params["lora_r"] for t in trials) == [0, 4]
    for trial in trials:
        assert trial.state == TrialState.COMPLETE
        assert len(trial.user_attrs["fold_values"]) == 3
        assert trial.value == pytest.approx(sum(trial.user_attrs["fold_values"]) / 3)
        assert sorted(trial.intermediate_values) == [0, 1, 2]
        # Each fold validates on a third of the 208 pooled examples.
        assert trial.user_attrs["steps"] == 3 * 3 * 9  # 3 folds x 3 epochs x ceil(139 / 16)
    lora = next(t for t in trials if t.params["lora_r"] == 4)
    assert lora.user_attrs["trainable_params"] * 5 < lora.user_attrs["total_params"]
