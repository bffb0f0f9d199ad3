"""The data audit: planted problems in real CSV files, found through the command line."""

from __future__ import annotations

import json
from pathlib import Path

import optuna
import pytest

from sweeper.audit import Example, check_examples, normalise
from tests.conftest import StudyDir, run_sweeper
from tests.test_text_task import text_study, tiny_bert, write_csv

PLANTED_TRAIN = [
    {"text": "good film", "label": "positive"},  # line 2
    {"text": "bad food", "label": "negative"},  # line 3
    {"text": "good film", "label": "positive"},  # line 4: duplicate of line 2
    {"text": "the day", "label": "positive"},  # line 5
    {"text": "the day", "label": "negative"},  # line 6: conflicts with line 5
    {"text": "a nice day", "label": "positive"},  # line 7
    {"text": "sad food", "label": "negative"},  # line 8
]
PLANTED_VAL = [
    {"text": "bad food", "label": "negative"},  # line 2: also train line 3
    {"text": "Good  FILM!", "label": "positive"},  # line 3: train line 2 once folded
    {"text": "the film was fine", "label": "neutral"},  # line 4: a class train lacks
    {"text": "love the food", "label": "positive"},  # line 5
]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_bert(tmp_path_factory.mktemp("tiny-bert"))


def planted(study_dir: StudyDir, model_dir: Path) -> Path:
    data = text_study(study_dir.root, model_dir)
    write_csv(study_dir.root / "train.csv", PLANTED_TRAIN)
    write_csv(study_dir.root / "val.csv", PLANTED_VAL)
    return study_dir.write(data)


def test_planted_problems_are_found_with_their_rows(study_dir: StudyDir, model_dir: Path) -> None:
    path = planted(study_dir, model_dir)
    result = run_sweeper("start", str(path))
    assert result.returncode == 2, result.stdout + result.stderr
    assert "the data audit found 3 error(s)" in result.stderr
    assert "fix the data, or run with --ignore-audit" in result.stderr
    out = result.stdout
    assert "conflicting labels: 1 input(s) appear with different labels" in out
    assert "'the day': train.csv:5 (positive), train.csv:6 (negative)" in out
    assert "leakage: 1 of 4 val example(s) are also in train, exactly" in out
    assert "val.csv:2 = train.csv:3: 'bad food'" in out
    assert "missing class: train has no example of 'neutral'" in out
    assert "train.csv:4 repeats train.csv:2: 'good film'" in out
    assert "val.csv:3 ~ train.csv:2: 'Good  FILM!' ~ 'good film'" in out
    assert "too little data: train has fewer than 20 examples of" in out
    assert "small val split: val has 4 examples" in out
    assert study_dir.created() == ["train.csv", "val.csv"], "the audit stopped it: nothing written"

    checked = run_sweeper("check", str(path), "--json")
    assert checked.returncode == 2
    report = json.loads(checked.stdout)["audit"]
    assert report["errors"] == 3
    by_check = {f["check"]: f for f in report["findings"]}
    assert by_check["duplicates"]["rows"] == ["train.csv:4 repeats train.csv:2: 'good film'"]
    assert by_check["leakage"]["severity"] == "error"
    assert by_check["near leakage"]["severity"] == "warning"
    assert study_dir.created() == ["train.csv", "val.csv"]


def test_force_runs_and_stores_the_audit_on_the_study(
    study_dir: StudyDir, model_dir: Path
) -> None:
    data = text_study(study_dir.root, model_dir)
    path = study_dir.write({**data, "study": {**data["study"], "n_trials": 1}})
    write_csv(study_dir.root / "val.csv", [*PLANTED_VAL[:2], PLANTED_VAL[3]] * 4)
    write_csv(study_dir.root / "train.csv", PLANTED_TRAIN * 4)
    result = run_sweeper("start", str(path), "--ignore-audit")
    assert result.returncode == 0, result.stdout + result.stderr
    study = optuna.load_study(study_name="text", storage=f"sqlite:///{study_dir.root / 'text.db'}")
    stored = study.user_attrs["data_audit"]
    assert stored["errors"] == 2 and stored["warnings"] >= 2
    assert {"conflicting labels", "leakage"} <= {f["check"] for f in stored["findings"]}


def test_clean_data_passes(study_dir: StudyDir, model_dir: Path) -> None:
    path = study_dir.write(text_study(study_dir.root, model_dir))
    result = run_sweeper("check", str(path))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "data audit: 0 error(s)" in result.stdout
    assert "ok; 1 slot(s) on cpu" in result.stdout


def test_a_custom_task_offers_its_examples(study_dir: StudyDir) -> None:
    (study_dir.root / "tiny_task.py").write_text(
        (study_dir.root / "tiny_task.py").read_text() + "\n\ndef examples():\n"
        "    return {'train': [{'text': 'x', 'label': 'a'}, {'text': 'x', 'label': 'b'}],\n"
        "            'val': [{'text': 'y', 'label': 'a', 'where': 'points.npy:7'}]}\n"
    )
    path = study_dir.write()
    result = run_sweeper("check", str(path))
    assert result.returncode == 2
    assert "'x': train row 1 (a), train row 2 (b)" in result.stdout
    assert "val has no example of 'b'" in result.stdout


def test_a_task_without_examples_is_not_audited(study_dir: StudyDir) -> None:
    result = run_sweeper("check", str(study_dir.write()))
    assert result.returncode == 0
    assert "data audit skipped: the task offers no examples() hook" in result.stdout


def examples(split: str, rows: list[tuple[str, str]]) -> list[Example]:
    return [Example(f"{split}:{i}", text, label) for i, (text, label) in enumerate(rows, 2)]


def test_empty_inputs_and_labels_are_errors() -> None:
    result = check_examples(
        {"train": examples("train", [("ok", "a"), ("  ", "a"), ("fine", "")] + [("t", "a")] * 0)},
        min_per_class=1,
        max_metric_step=1.0,
    )
    found = {f.check: f for f in result.errors}
    assert found["empty input"].rows == ["train:3"]
    assert found["missing label"].rows == ["train:4 'fine'"]


def test_volume_thresholds() -> None:
    train = examples("train", [(f"t{i}", "a") for i in range(25)] + [("u", "b"), ("v", "b")])
    val = examples("val", [(f"v{i}", "a") for i in range(150)] + [("w", "b")])
    result = check_examples({"train": train, "val": val}, min_per_class=20, max_metric_step=0.01)
    messages = {f.check: f.message for f in result.warnings}
    assert messages["too little data"] == (
        "train has fewer than 20 examples of 'b' (2); [validation] folds = 5 trains on val's "
        "examples too"
    )
    assert "small val split" not in messages, "151 examples move accuracy by 0.7 points"
    small = check_examples(
        {"train": train, "val": val[:40]}, min_per_class=2, max_metric_step=0.01
    )
    assert "val has 40 examples: one example moves accuracy by 2.5 points" in " ".join(
        f.message for f in small.warnings
    )


def test_normalise_folds_case_space_and_punctuation_but_not_emoticons() -> None:
    assert normalise("  Good,  FILM! ") == normalise("good film")
    assert normalise(">:(") != normalise(">;)")
    assert normalise(":S") == normalise("s:")


def test_a_bad_examples_hook_is_a_clear_error(study_dir: StudyDir) -> None:
    task = study_dir.root / "tiny_task.py"
    task.write_text(task.read_text() + "\n\ndef examples():\n    return [1, 2]\n")
    result = run_sweeper("check", str(study_dir.write()))
    assert result.returncode == 2
    assert "task.name: examples() must return a mapping with a 'train' split" in result.stderr
    task.write_text(task.read_text().replace("return [1, 2]", "return {'train': [{'text': 'x'}]}"))
    result = run_sweeper("check", str(study_dir.write()))
    assert result.returncode == 2
    assert "examples(): train row 1 needs 'text' and 'label'" in result.stderr
