"""The built-in ``text-classification`` task: fine-tune a local transformer encoder.

Everything that does not depend on params happens once per worker, in
:func:`prepare`: the options are checked, the rows read, the tokenizer loaded
and the texts tokenized into NumPy arrays (no torch operation, so trial
processes can be forked safely). Each trial loads the model and trains it.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal, get_args

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from sweeper.config import StudyConfig, shown, utf8_text
from sweeper.errors import ConfigError, DataError
from sweeper.run.folds import stratified_folds


class TextParams(BaseModel):
    """The searchable parameters of the task, each with its default and its valid values."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)
    learning_rate: float = Field(default=5e-5, gt=0.0)
    batch_size: int = Field(default=32, ge=1, le=65_536)
    weight_decay: float = Field(default=0.0, ge=0.0)
    warmup_ratio: float = Field(default=0.0, ge=0.0, le=1.0)
    dropout: float | None = Field(default=None, ge=0.0, lt=1.0)
    freeze_layers: int = Field(default=0, ge=0)
    layer_lr_decay: float = Field(default=1.0, gt=0.0, le=1.0)
    max_epochs: int | None = Field(default=None, ge=1)
    lora_r: int = Field(default=0, ge=0, le=4096)
    lora_alpha: int = Field(default=16, ge=1)
    lora_dropout: float = Field(default=0.1, ge=0.0, lt=1.0)
    lora_target: Literal["attention", "all-linear"] = "attention"


DEFAULTS: dict[str, Any] = TextParams().model_dump()
"""Searchable parameters and their defaults (None: the model's own, or [trainer]'s)."""
_WHOLE = {
    name
    for name, field in TextParams.model_fields.items()
    if field.annotation is int or int in get_args(field.annotation)
}
"""Parameters that take whole numbers only."""

_REFERENCE = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")


class TextOptions(BaseModel):
    """``[task]`` of the text-classification task."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)
    name: str
    model: str = Field(min_length=1)
    train: str = Field(min_length=1)
    val: str = Field(min_length=1)
    text_column: str = Field(default="text", min_length=1)
    label_column: str = Field(default="label", min_length=1)
    max_length: int = Field(default=128, ge=2, le=4096)
    labels: list[str] | None = Field(default=None, min_length=1)


class TextData:
    """Tokenized splits as NumPy arrays, and the label names."""

    def __init__(
        self,
        model_dir: Path,
        labels: list[str],
        train: dict[str, np.ndarray],
        val: dict[str, np.ndarray],
        val_rows: list[tuple[str, str]] | None = None,
    ) -> None:
        self.model_dir = model_dir
        self.labels = labels
        self.train = train
        self.val = val
        self.val_rows = val_rows or []
        """(where, text) of each val example, in order."""

    def pooled(self, train_rows: list[tuple[str, str]]) -> TextData:
        """Train and val as one train split for k-fold; ``val_rows`` names all of them."""
        both = {k: np.concatenate([self.train[k], self.val[k]]) for k in self.train}
        empty = {k: v[:0] for k, v in both.items()}
        return TextData(self.model_dir, self.labels, both, empty, train_rows + self.val_rows)

    def fold(self, folds: list[np.ndarray], index: int) -> TextData:
        """Of pooled data: validate on fold ``index``, train on the others."""
        held = folds[index]
        rest = np.concatenate([f for i, f in enumerate(folds) if i != index])
        return TextData(
            self.model_dir,
            self.labels,
            {k: v[rest] for k, v in self.train.items()},
            {k: v[held] for k, v in self.train.items()},
            [self.val_rows[i] for i in held],
        )


def prepare(config: StudyConfig) -> Callable[[dict[str, Any]], tuple[Any, Any]]:
    """Check options, read and tokenize the data once; return the task's ``build``."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    options = _options(config)
    _check_params(config)
    model_dir = _model_dir(config, options.model)
    tokenizer = _tokenizer(config, model_dir)
    train_located = _located_rows(config, "train", options.train)
    val_located = _located_rows(config, "val", options.val)
    train_rows = [row for _, row in train_located]
    val_rows = [row for _, row in val_located]
    labels = options.labels or sorted(
        {_label(config, "train", r, i, options) for i, r in enumerate(train_rows, 1)}
    )
    data = TextData(
        model_dir,
        labels,
        _encode(config, "train", train_rows, tokenizer, labels, options),
        _encode(config, "val", val_rows, tokenizer, labels, options),
        [(where, str(row[options.text_column])) for where, row in val_located],
    )
    folds = config.validation.folds
    if folds > 1:
        pooled = data.pooled([(w, str(r[options.text_column])) for w, r in train_located])
        splits = stratified_folds(pooled.train["labels"], folds, config.study.seed)

    def build(params: dict[str, Any]) -> tuple[Any, Any]:
        from sweeper.tasks._text_model import build_text_task

        params = {**DEFAULTS, **params}
        fold = params.pop("fold", None)
        params.pop("folds", None)
        view = data if fold is None else pooled.fold(splits, int(fold))
        module, datamodule = build_text_task(view, params)
        if int(params["lora_r"]) > 0:
            with_lora(module, params)
        return module, datamodule

    return build


_HEADS = ("classifier", "score")
"""Names of the classification heads of transformers' sequence classifiers."""
_ATTENTION = re.compile(r"(^|\.)(attention|attn|self_attn)(\.|$)")


def with_lora(module: Any, params: dict[str, Any]) -> None:
    """Put LoRA adapters into the module's encoder (``lora_r`` > 0); the head stays trained.

    peft changes the transformers model in place (adapters in its linear layers,
    the head wrapped to be trained and saved, everything else frozen), so the
    module keeps training ``module.model`` and its per-layer groups still apply:
    ``layer_lr_decay`` decays each layer's adapters, and ``freeze_layers`` N
    leaves the adapters of the bottom N layers untrained (they start as the identity).
    """
    import torch
    from peft import LoraConfig, get_peft_model

    linear = [
        name
        for name, part in module.model.named_modules()
        if isinstance(part, torch.nn.Linear) and name.split(".")[0] not in _HEADS
    ]
    if params["lora_target"] == "attention":
        linear = [name for name in linear if _ATTENTION.search(name)]
    if not linear:
        raise ValueError(f"lora_target={params['lora_target']!r}: the model has no such layers")
    config = LoraConfig(
        task_type="SEQ_CLS",  # peft adds the head to modules_to_save
        r=int(params["lora_r"]),
        lora_alpha=int(params["lora_alpha"]),
        lora_dropout=float(params["lora_dropout"]),
        target_modules=linear,
    )
    get_peft_model(module.model, config)  # the wrapper is not needed: the model changed in place
    module.freeze_bottom(int(params["freeze_layers"]))


def _options(config: StudyConfig) -> TextOptions:
    try:
        return TextOptions.model_validate({"name": config.task.name, **config.task.options})
    except ValidationError as exc:
        error = exc.errors()[0]
        key = ".".join(str(p) for p in error["loc"])
        if error["type"] == "extra_forbidden":
            known = ", ".join(f for f in TextOptions.model_fields if f != "name")
            raise ConfigError(f"{config.path}: task.{key}: unknown key; known: {known}") from None
        if error["type"] == "missing":
            raise ConfigError(f"{config.path}: task.{key}: required key is missing") from None
        raise ConfigError(
            f"{config.path}: task.{key}: {error['msg']} (got {shown(error.get('input'))})"
        ) from None


def _check_params(config: StudyConfig) -> None:
    """Every value a parameter can take, fixed or sampled, is one the task can train with."""
    for name, entry in config.search.items():
        if name not in DEFAULTS:
            raise ConfigError(
                f"{config.path}: search.{name}: not a parameter of text-classification; "
                f"known: {', '.join(DEFAULTS)}"
            )
        key = f"search.{name}"
        if not isinstance(entry, dict):
            _check_value(config, key, name, entry)
        elif "choices" in entry:
            for choice in entry["choices"]:
                _check_value(config, f"{key}.choices", name, choice)
        else:  # a range: both bounds, and for a whole-number parameter a whole step
            for bound in ("low", "high"):
                _check_value(config, f"{key}.{bound}", name, entry[bound])
            step = entry.get("step")
            if name in _WHOLE and step is not None and type(step) is not int:
                raise ConfigError(
                    f"{config.path}: {key}.step: {name} takes whole numbers, so the step "
                    f"must be one (got {shown(step)})"
                )


def _check_value(config: StudyConfig, key: str, name: str, value: Any) -> None:
    try:
        TextParams.model_validate({name: value})
    except ValidationError as exc:
        message = exc.errors()[0]["msg"]
        raise ConfigError(f"{config.path}: {key}: {message} (got {shown(value)})") from None


def _resolve(config: StudyConfig, key: str, value: str) -> Any:
    """A ``module:function`` reference is called; anything else is a path."""
    if not _REFERENCE.match(value):
        path = Path(value)
        return path if path.is_absolute() else config.folder / path
    from sweeper.tasks import import_near

    module_name, function_name = value.split(":")
    try:
        return getattr(import_near(config, module_name), function_name)()
    except Exception as exc:  # a user's function can raise anything
        raise DataError(
            f"{config.path}: task.{key}: {value} failed: {type(exc).__name__}: {exc}"
        ) from None


def _model_dir(config: StudyConfig, value: str) -> Path:
    folder = Path(_resolve(config, "model", value))
    if not folder.is_dir():
        raise ConfigError(f"{config.path}: task.model: no such folder: {folder}")
    if not (folder / "config.json").is_file():
        raise ConfigError(
            f"{config.path}: task.model: {folder} is not a transformers model folder "
            "(no config.json)"
        )
    try:
        from transformers import AutoConfig

        AutoConfig.from_pretrained(folder, local_files_only=True)
    except Exception as exc:  # transformers raises many kinds
        raise ConfigError(f"{config.path}: task.model: {folder}: {exc}") from None
    return folder


def _tokenizer(config: StudyConfig, folder: Path) -> Any:
    try:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except Exception as exc:  # transformers raises many kinds
        raise ConfigError(
            f"{config.path}: task.model: no usable tokenizer in {folder}: {exc}"
        ) from None


def examples(config: StudyConfig) -> dict[str, list[Any]]:
    """The examples of train and val with their file and line, for the data audit."""
    from sweeper.audit import Example

    options = _options(config)
    splits: dict[str, list[Any]] = {}
    for split in ("train", "val"):
        splits[split] = []
        for number, (where, row) in enumerate(
            _located_rows(config, split, getattr(options, split)), 1
        ):
            _label(config, split, row, number, options)  # both columns are there
            text, label = row[options.text_column], row[options.label_column]
            splits[split].append(
                Example(
                    where, "" if text is None else str(text), "" if label is None else str(label)
                )
            )
    return splits


def _rows(config: StudyConfig, key: str, value: str) -> list[dict[str, Any]]:
    return [row for _, row in _located_rows(config, key, value)]


def _located_rows(config: StudyConfig, key: str, value: str) -> list[tuple[str, dict[str, Any]]]:
    """The rows of a split, each with where it came from (``file:line`` or ``row N``)."""
    source = _resolve(config, key, value)
    if not isinstance(source, Path):
        rows = [(f"{value} row {number}", row) for number, row in enumerate(source, 1)]
        where = f"{config.path}: task.{key}: {value}"
    else:
        where = str(source)
        if not source.is_file():
            raise DataError(f"{config.path}: task.{key}: no such file: {source}")
        rows = _read_file(source)
    if not rows:
        raise DataError(f"{where}: no rows")
    if not all(isinstance(row, dict) for _, row in rows):
        raise DataError(f"{where}: rows must be mappings of column to value")
    return rows


def _read_file(path: Path) -> list[tuple[str, dict[str, Any]]]:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise DataError(f"{path}: cannot read: {exc.strerror}") from None
    text = utf8_text(data, path, DataError)
    rows = []
    if path.suffix.lower() in {".jsonl", ".json"}:
        for number, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                rows.append((f"{path.name}:{number}", json.loads(line)))
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{number}: not a JSON object: {exc.msg}") from None
            except RecursionError:
                raise DataError(f"{path}:{number}: JSON nested too deeply") from None
        return rows
    reader = csv.DictReader(io.StringIO(text, newline=""))
    try:
        for row in reader:
            rows.append((f"{path.name}:{reader.line_num}", row))
    except csv.Error as exc:
        raise DataError(f"{path}:{reader.line_num}: not CSV: {exc}") from None
    return rows


def _label(
    config: StudyConfig, split: str, row: dict[str, Any], number: int, options: TextOptions
) -> str:
    for column in (options.text_column, options.label_column):
        if column not in row:
            raise DataError(
                f"{config.path}: task.{split}: row {number} has no column {column!r} "
                f"(columns: {', '.join(map(str, row))})"
            )
    return str(row[options.label_column])


def _encode(
    config: StudyConfig,
    split: str,
    rows: list[dict[str, Any]],
    tokenizer: Any,
    labels: list[str],
    options: TextOptions,
) -> dict[str, np.ndarray]:
    index = {label: i for i, label in enumerate(labels)}
    targets = []
    for number, row in enumerate(rows, 1):
        label = _label(config, split, row, number, options)
        if label not in index:
            raise DataError(
                f"{config.path}: task.{split}: row {number} has label {label!r}, which the "
                f"training data does not have (labels: {', '.join(labels)})"
            )
        targets.append(index[label])
    encoded = tokenizer(
        [str(row[options.text_column]) for row in rows],
        max_length=options.max_length,
        truncation=True,
        padding="max_length",
        return_tensors="np",
    )
    result = {name: np.asarray(encoded[name]) for name in ("input_ids", "attention_mask")}
    result["labels"] = np.asarray(targets, dtype=np.int64)
    return result
