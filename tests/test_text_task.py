"""The built-in text-classification task on a tiny BERT built here, offline."""

from __future__ import annotations

import csv
import random
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from typer.testing import CliRunner

from sweeper.cli import app
from sweeper.config import load_config
from sweeper.tasks import load_task
from tests.conftest import StudyDir, run_sweeper, toml_text

runner = CliRunner()
POSITIVE = ["good", "great", "nice", "fine", "happy", "love"]
NEGATIVE = ["bad", "awful", "sad", "hate", "poor", "ugly"]
FILLER = ["the", "a", "film", "day", "food", "was", "is", "very"]


def tiny_bert(folder: Path) -> Path:
    """A 2-layer BERT (hidden 32) and a word-level tokenizer, saved to a folder."""
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast

    folder.mkdir(parents=True, exist_ok=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *POSITIVE, *NEGATIVE, *FILLER]
    BertTokenizerFast(vocab={word: i for i, word in enumerate(vocab)}).save_pretrained(folder)
    config = BertConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=32,
    )
    torch.manual_seed(0)
    BertForSequenceClassification(config).save_pretrained(folder)
    return folder


def sentences(n: int, seed: int) -> list[dict[str, str]]:
    """``n`` different sentences (so no split repeats or leaks into another)."""
    rng = random.Random(seed)
    rows: dict[str, str] = {}
    while len(rows) < n:
        label = rng.choice(["positive", "negative"])
        words = [*rng.sample(FILLER, 3), rng.choice(POSITIVE if label == "positive" else NEGATIVE)]
        rng.shuffle(words)
        rows.setdefault(" ".join(words), label)
    return [{"text": text, "label": label} for text, label in rows.items()]


def write_csv(path: Path, rows: list[dict[str, str]], fields=("text", "label")) -> Path:
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(fields), extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    return path


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_bert(tmp_path_factory.mktemp("tiny-bert"))


def text_study(root: Path, model: Path, search: dict | None = None, **task) -> dict:
    rows = sentences(208, 1)
    write_csv(root / "train.csv", rows[:160])
    write_csv(root / "val.csv", rows[160:])
    return {
        "study": {
            "name": "text",
            "direction": "maximize",
            "metric": "val_f1",
            "n_trials": 2,
            "seed": 0,
        },
        "task": {
            "name": "text-classification",
            "model": str(model),
            "train": "train.csv",
            "val": "val.csv",
            "max_length": 8,
            **task,
        },
        "trainer": {"max_epochs": 3},
        "search": search
        or {"learning_rate": {"low": 3e-3, "high": 8e-3, "log": True}, "batch_size": 16},
        "pruner": {"name": "none"},
        "resources": {"devices": "cpu", "cpu_workers": 1},
    }


def build(study_dir: StudyDir, model_dir: Path, params: dict, **task):
    path = study_dir.write(text_study(study_dir.root, model_dir, **task))
    from sweeper.tasks.text_classification import DEFAULTS

    return load_task(load_config(path))({**DEFAULTS, **params})


class Record(pl.Callback):
    def __init__(self) -> None:
        self.losses: list[float] = []
        self.metrics: list[dict[str, float]] = []
        self.with_grad: set[int] = set()
        self.widths: set[int] = set()

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self.with_grad |= {id(p) for p in pl_module.parameters() if p.grad is not None}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(outputs["loss"]))
        self.widths.add(batch[0].shape[1])

    def on_validation_end(self, trainer, pl_module) -> None:
        self.metrics.append({k: float(v) for k, v in trainer.callback_metrics.items()})


def fit(module, data, epochs: int = 4) -> Record:
    record = Record()
    pl.seed_everything(0, verbose=False)
    trainer = pl.Trainer(
        max_epochs=epochs,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=[record],
        accelerator="cpu",
    )
    trainer.fit(module, datamodule=data)
    return record


def test_loss_falls_and_metrics_are_logged(study_dir: StudyDir, model_dir: Path) -> None:
    module, data = build(
        study_dir, model_dir, {"learning_rate": 5e-3, "batch_size": 16, "warmup_ratio": 0.1}
    )
    record = fit(module, data, epochs=8)
    first, last = record.losses[:5], record.losses[-5:]
    assert sum(last) / 5 < 0.7 * sum(first) / 5
    final = record.metrics[-1]
    for name in (
        "val_loss",
        "val_acc",
        "val_f1",
        "val_precision",
        "val_recall",
        "val_precision_positive",
        "val_recall_negative",
        "train_loss",
    ):
        assert name in final, name
    assert final["val_f1"] > 0.8
    assert module.model.training, "dropout must be on while training"


def test_a_batch_loses_the_padding_no_row_uses_and_trains_the_same(
    study_dir: StudyDir, model_dir: Path
) -> None:
    """The model's compute grows with a batch's columns: a batch is cut to its longest row
    (here 6 tokens of max_length 16), and trains as the padded batch does."""
    records = []
    for cut in (True, False):
        torch.manual_seed(0)
        params = {"batch_size": 16, "dropout": 0.0}  # dropout draws per column
        module, data = build(study_dir, model_dir, params, max_length=16)
        if not cut:
            data.on_before_batch_transfer = lambda batch, dataloader_idx: batch
        records.append(fit(module, data, epochs=2))
    cut_record, padded = records
    assert cut_record.widths == {6} and padded.widths == {16}
    assert cut_record.losses == pytest.approx(padded.losses, abs=1e-5)
    assert len(cut_record.metrics) == len(padded.metrics) == 2
    for seen, expected in zip(cut_record.metrics, padded.metrics, strict=True):
        assert seen == pytest.approx(expected, abs=1e-5)


def test_freezing_freezes_embeddings_and_bottom_layers(
    study_dir: StudyDir, model_dir: Path
) -> None:
    module, data = build(study_dir, model_dir, {"freeze_layers": 1, "batch_size": 16})
    record = fit(module, data, epochs=1)
    bert = module.model.bert
    frozen = [*bert.embeddings.parameters(), *bert.encoder.layer[0].parameters()]
    trained = [*bert.encoder.layer[1].parameters(), *module.model.classifier.parameters()]
    assert not any(p.requires_grad or id(p) in record.with_grad for p in frozen)
    assert all(id(p) in record.with_grad for p in trained)


def test_layer_wise_decay_sets_each_groups_rate(study_dir: StudyDir, model_dir: Path) -> None:
    module, _ = build(
        study_dir, model_dir, {"learning_rate": 1e-3, "layer_lr_decay": 0.5, "weight_decay": 0.01}
    )
    rate = {}
    decay = {}
    for group in module.parameter_groups():
        for parameter in group["params"]:
            rate[id(parameter)] = group["lr"]
            decay[id(parameter)] = group["weight_decay"]
    bert = module.model.bert
    word_embeddings = bert.embeddings.word_embeddings.weight
    assert rate[id(word_embeddings)] == pytest.approx(1e-3 * 0.5**3)
    assert rate[id(bert.encoder.layer[0].attention.self.query.weight)] == pytest.approx(
        1e-3 * 0.25
    )
    assert rate[id(bert.encoder.layer[1].output.dense.weight)] == pytest.approx(1e-3 * 0.5)
    assert rate[id(module.model.classifier.weight)] == pytest.approx(1e-3)
    assert decay[id(module.model.classifier.weight)] == 0.01
    assert decay[id(module.model.classifier.bias)] == 0.0
    assert decay[id(bert.embeddings.LayerNorm.weight)] == 0.0


def test_sweep_with_the_text_task(study_dir: StudyDir, model_dir: Path) -> None:
    path = study_dir.write(text_study(study_dir.root, model_dir))
    val = list(csv.DictReader((study_dir.root / "val.csv").open()))
    flip = {"positive": "negative", "negative": "positive"}
    for row in val[:4]:  # file lines 2 to 5: labelled wrong on purpose
        row["label"] = flip[row["label"]]
    write_csv(study_dir.root / "val.csv", val)
    result = run_sweeper("start", str(path))
    assert result.returncode == 0, result.stdout + result.stderr
    import optuna

    study = optuna.load_study(study_name="text", storage=f"sqlite:///{study_dir.root / 'text.db'}")
    trials = study.trials
    assert len(trials) == 2 and all(t.state.name == "COMPLETE" for t in trials)
    history = trials[0].user_attrs["history"]
    assert len(history) == 3 and "val_recall_positive" in history[-1]
    assert {"train_acc", "train_f1", "train_loss"} <= set(history[-1])
    assert set(trials[0].user_attrs["gap"]) == {"loss", "f1"}
    errors = study.best_trial.user_attrs["confident_errors"]
    top = {e["where"] for e in errors[:6]}
    assert {"val.csv:2", "val.csv:3", "val.csv:4", "val.csv:5"} <= top, errors
    planted = next(e for e in errors if e["where"] == "val.csv:2")
    assert planted["text"] == val[0]["text"] and planted["label"] == val[0]["label"]
    assert planted["predicted"] == flip[val[0]["label"]]
    shown = run_sweeper("best", str(path))
    assert "most confidently (likely label errors)" in shown.stdout
    assert f"val.csv:2: {val[0]['text']!r} labelled {val[0]['label']!r}" in shown.stdout
    report = (study_dir.root / "text" / "report.html").read_text()
    assert 'id="label-suspects"' in report and "val.csv:2" in report


BAD = {
    "missing model folder": (
        lambda root, model: {"model": str(root / "nope")},
        "task.model: no such folder",
    ),
    "folder that is not a model": (
        lambda root, model: {"model": str(root)},
        "is not a transformers model folder",
    ),
    "missing column": (
        lambda root, model: {"text_column": "sentence"},
        "task.train: row 1 has no column 'sentence'",
    ),
    "unknown option": (lambda root, model: {"max_len": 8}, "task.max_len: unknown key"),
    "missing train file": (
        lambda root, model: {"train": "missing.csv"},
        "task.train: no such file",
    ),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_task_input_is_refused(study_dir: StudyDir, model_dir: Path, case: str) -> None:
    change, message = BAD[case]
    data = text_study(study_dir.root, model_dir)
    data["task"].update(change(study_dir.root, model_dir))
    path = study_dir.write(data)
    result = runner.invoke(app, ["start", str(path)])
    assert result.exit_code == 2, result.output
    assert message in " ".join(result.output.split())
    assert not (study_dir.root / "text.db").exists()


def test_unknown_label_in_val_and_empty_file(study_dir: StudyDir, model_dir: Path) -> None:
    data = text_study(study_dir.root, model_dir)
    path = study_dir.write(data)
    write_csv(study_dir.root / "val.csv", [{"text": "good day", "label": "mixed"}])
    result = runner.invoke(app, ["start", str(path)])
    assert result.exit_code == 2
    message = " ".join(result.output.split())
    assert "missing class: train has no example of 'mixed': the model never learns it" in message
    assert "val.csv:2 (mixed): 'good day'" in message
    result = runner.invoke(app, ["start", str(path), "--ignore-audit"])
    assert result.exit_code == 2, (
        "--ignore-audit passes the audit, not a label the model cannot have"
    )
    assert "task.val: row 1 has label 'mixed', which the training data does not have" in " ".join(
        result.output.split()
    )
    write_csv(study_dir.root / "val.csv", [])
    result = runner.invoke(app, ["start", str(path)])
    assert result.exit_code == 2 and "val.csv: no rows" in result.output
    assert not (study_dir.root / "text.db").exists()


def test_unknown_parameter_lists_the_known_ones(study_dir: StudyDir, model_dir: Path) -> None:
    data = text_study(study_dir.root, model_dir, search={"lr": {"low": 1e-4, "high": 1e-3}})
    result = runner.invoke(app, ["start", str(study_dir.write(data))])
    assert result.exit_code == 2
    message = " ".join(result.output.split())
    assert "search.lr: not a parameter of text-classification; known: learning_rate," in message
    assert not (study_dir.root / "text.db").exists()


def test_jsonl_rows(study_dir: StudyDir, model_dir: Path) -> None:
    import json

    rows = sentences(40, 3)
    (study_dir.root / "train.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    _module, data = build(study_dir, model_dir, {}, train="train.jsonl")
    assert len(data.data.train["labels"]) == 40
    assert toml_text({"a": 1})


def refused_for_real(study_dir: StudyDir, path: Path, start: str, fragment: str) -> None:
    """``sweeper check`` and ``sweeper start`` in their own process: exit 2, one line, nothing
    written."""
    for command in ("check", "start"):
        result = run_sweeper(command, str(path), timeout=300)
        lines = result.stderr.splitlines()
        assert result.returncode == 2, (command, result.stdout, result.stderr)
        assert len(lines) == 1 and "Traceback" not in result.stderr, (command, result.stderr)
        assert lines[0].startswith(f"error: {start}"), lines[0]
        assert fragment in lines[0], lines[0]
        assert not (study_dir.root / "text.db").exists() and not (study_dir.root / "text").exists()


HOSTILE_PARAMS = {
    "batch size zero": (
        {"learning_rate": {"low": 1e-3, "high": 1e-2}, "batch_size": 0},
        "search.batch_size: Input should be greater than or equal to 1 (got 0)",
    ),
    "learning rate range below zero": (
        {"learning_rate": {"low": -1e-3, "high": 1e-3}},
        "search.learning_rate.low: Input should be greater than 0 (got -0.001)",
    ),
    "whole-number choice that is not whole": (
        {"learning_rate": 1e-3, "batch_size": {"choices": [16, 32.5]}},
        "search.batch_size.choices: Input should be a valid integer (got 32.5)",
    ),
    "whole-number range with a fractional step": (
        {"learning_rate": 1e-3, "freeze_layers": {"low": 0, "high": 2, "step": 0.5}},
        "search.freeze_layers.step: freeze_layers takes whole numbers",
    ),
    "dropout of one": (
        {"learning_rate": 1e-3, "dropout": {"low": 0.1, "high": 1.0}},
        "search.dropout.high: Input should be less than 1 (got 1.0)",
    ),
}


@pytest.mark.parametrize("case", list(HOSTILE_PARAMS))
def test_bad_parameter_values_are_refused_before_trials_run(
    study_dir: StudyDir, model_dir: Path, case: str
) -> None:
    search, fragment = HOSTILE_PARAMS[case]
    path = study_dir.write(text_study(study_dir.root, model_dir, search=search))
    refused_for_real(study_dir, path, f"{path}: ", fragment)


def test_task_option_of_the_wrong_type_is_refused(study_dir: StudyDir, model_dir: Path) -> None:
    path = study_dir.write(text_study(study_dir.root, model_dir, max_length=True))
    result = runner.invoke(app, ["check", str(path)])
    assert result.exit_code == 2
    assert "task.max_length: Input should be a valid integer (got True)" in result.stderr
    assert not (study_dir.root / "text.db").exists()


def test_data_file_that_is_not_utf8_names_the_file_and_line(
    study_dir: StudyDir, model_dir: Path
) -> None:
    path = study_dir.write(text_study(study_dir.root, model_dir))
    train = study_dir.root / "train.csv"
    lines = train.read_bytes().split(b"\n")
    lines[2] = (
        lines[2].replace(b"good", b"g\xf6od", 1) if b"good" in lines[2] else b"\xff" + lines[2]
    )
    train.write_bytes(b"\n".join(lines))
    refused_for_real(study_dir, path, f"{train}: not UTF-8 text (byte", "line 3:")


def test_data_file_with_a_byte_order_mark_is_read(study_dir: StudyDir, model_dir: Path) -> None:
    path = study_dir.write(text_study(study_dir.root, model_dir))
    val = study_dir.root / "val.csv"
    val.write_bytes(b"\xef\xbb\xbf" + val.read_bytes())
    result = runner.invoke(app, ["check", str(path)])
    assert result.exit_code == 0, result.output
