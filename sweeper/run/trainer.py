"""lightning.Trainer options: sweeper's defaults, then ``[trainer]``, then the device; and
checking ``[trainer]`` before any trial runs."""

from __future__ import annotations

import difflib
import inspect
import types
import warnings
from typing import Any

import lightning.pytorch as pl
import torch

from sweeper.config import StudyConfig
from sweeper.errors import ConfigError
from sweeper.run.devices import Slot
from sweeper.run.tracking import check_tracking

RESERVED_TRAINER_KEYS = {
    "accelerator": "[resources] devices",
    "devices": "[resources] devices",
    "num_nodes": "[resources]",
    "strategy": "[resources]",
    "logger": "[tracking] (TensorBoard, MLflow or W&B)",
    "callbacks": "sweeper",
    "enable_progress_bar": "sweeper",
}


SWEEPER_TRAINER_KEYS = ("early_stopping_patience",)
"""``[trainer]`` keys that sweeper reads itself instead of passing to lightning.Trainer."""


def quiet_lightning() -> None:
    """Silence Lightning's console output; call after importing it, which sets the levels."""
    import logging

    for name in list(logging.root.manager.loggerDict):
        if name.startswith(("lightning", "pytorch_lightning")):
            logging.getLogger(name).setLevel(logging.ERROR)


def check_trainer_options(config: StudyConfig) -> None:
    """Refuse ``[trainer]`` keys that lightning.Trainer lacks or that sweeper sets.

    The Trainer's logger comes from ``[tracking]``: its backend is checked here too.
    """
    known = [p for p in inspect.signature(pl.Trainer.__init__).parameters if p != "self"]
    known += SWEEPER_TRAINER_KEYS
    patience = config.trainer.get("early_stopping_patience")
    if patience is not None and (
        isinstance(patience, bool) or not isinstance(patience, int) or patience < 1
    ):
        raise ConfigError(
            f"{config.path}: trainer.early_stopping_patience: a whole number of validations, "
            f"1 or more (got {patience!r})"
        )
    for key in config.trainer:
        if key in RESERVED_TRAINER_KEYS:
            raise ConfigError(
                f"{config.path}: trainer.{key}: set by {RESERVED_TRAINER_KEYS[key]}, "
                "not in [trainer]"
            )
        if key not in known:
            close = difflib.get_close_matches(key, known, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigError(
                f"{config.path}: trainer.{key}: not an option of lightning.Trainer{hint}"
            )
    _check_trainer_values(config)
    check_tracking(config)


def _kinds(hint: Any) -> str:
    """A type hint in words: ``int | None`` is "an int", literals are listed."""
    import typing

    literals: list[str] = []
    names: list[str] = []

    def walk(part: Any) -> None:
        origin = typing.get_origin(part)
        if origin is typing.Literal:
            literals.extend(repr(v) for v in typing.get_args(part))
        elif origin in (typing.Union, types.UnionType):
            for inner in typing.get_args(part):
                walk(inner)
        elif part is not type(None):
            names.append(getattr(part, "__name__", None) or str(part).replace("typing.", ""))

    walk(hint)
    kinds = [f"a {name}" if name[0].lower() not in "aeiou" else f"an {name}" for name in names]
    if literals:
        kinds.append("one of " + ", ".join(literals))
    return " or ".join(kinds) or str(hint)


def _check_trainer_values(config: StudyConfig) -> None:
    """Each ``[trainer]`` value of the type lightning.Trainer declares, then a Trainer built
    from them (on the CPU, writing nothing), so a bad value fails here, not in every trial."""
    import tempfile
    import typing

    from pydantic import ConfigDict, TypeAdapter, ValidationError

    hints = typing.get_type_hints(pl.Trainer.__init__)
    for key, value in config.trainer.items():
        if key in SWEEPER_TRAINER_KEYS or key not in hints:
            continue
        try:
            adapter: TypeAdapter[Any] = TypeAdapter(
                hints[key], config=ConfigDict(arbitrary_types_allowed=True, allow_inf_nan=False)
            )
        except Exception:  # a type pydantic cannot check: the Trainer below will
            continue
        try:
            adapter.validate_python(value, strict=True)
        except ValidationError:
            raise ConfigError(
                f"{config.path}: trainer.{key}: {value!r} is not {_kinds(hints[key])}"
            ) from None
    options = trainer_options(config, Slot(index=0, gpu=None, threads=1))
    given = [key for key in config.trainer if key in options]
    quiet_lightning()  # a Trainer announces the devices it found
    with tempfile.TemporaryDirectory() as folder:

        def refused(chosen: dict[str, Any]) -> Exception | None:
            try:
                with warnings.catch_warnings():  # about this CPU stand-in, not the trials
                    warnings.simplefilter("ignore")
                    pl.Trainer(**{"default_root_dir": folder, **chosen})
            except Exception as exc:  # Lightning raises several kinds for a bad value
                return exc
            return None

        problem = refused(options)
        if problem is None:
            return
        alone = {k: v for k, v in options.items() if k not in given}
        blamed = next((k for k in given if refused({**alone, k: options[k]})), None)
    text = str(problem).strip().splitlines()[0] if str(problem).strip() else repr(problem)
    where = f"trainer.{blamed}" if blamed else "trainer"
    raise ConfigError(f"{config.path}: {where}: {text}") from problem


def trainer_options(
    config: StudyConfig,
    slot: Slot,
    params: dict[str, Any] | None = None,
    logger: pl.loggers.Logger | bool = False,
) -> dict[str, Any]:
    """Trainer arguments: sweeper's quiet defaults, then ``[trainer]``, then the device.

    A ``max_epochs`` param (sampled or fixed) overrides ``[trainer] max_epochs``.
    On a GPU that supports bf16, training runs in bf16 mixed precision unless
    ``[trainer] precision`` says otherwise; on the CPU, in fp32.
    """
    options: dict[str, Any] = {
        "enable_checkpointing": False,
        "enable_model_summary": False,
        "num_sanity_val_steps": 0,
        **{k: v for k, v in config.trainer.items() if k not in SWEEPER_TRAINER_KEYS},
        "accelerator": "cpu" if slot.gpu is None else "gpu",
        "devices": 1,
        "logger": logger,
        "enable_progress_bar": False,
    }
    if params and params.get("max_epochs") is not None:
        options["max_epochs"] = int(params["max_epochs"])
    if slot.gpu is not None and "precision" not in config.trainer and _bf16_supported():
        options["precision"] = "bf16-mixed"
    return options


def _bf16_supported() -> bool:
    return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())
