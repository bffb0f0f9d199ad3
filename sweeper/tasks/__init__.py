"""Built-in tasks and loading a user's ``module:function`` task."""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable
from types import ModuleType
from typing import Any

from sweeper.config import StudyConfig
from sweeper.errors import ConfigError, TaskError

Build = Callable[[dict[str, Any]], tuple[Any, Any]]
"""A task: ``build(params) -> (LightningModule, LightningDataModule)``."""

BUILTIN: dict[str, str] = {"text-classification": "sweeper.tasks.text_classification:prepare"}
"""Built-in tasks: name -> ``module:function`` that takes the config and returns ``build``."""


def import_near(config: StudyConfig, module_name: str) -> ModuleType:
    """Import a module, looking next to the study file before sys.path."""
    folder = str(config.folder)
    if folder not in sys.path:
        sys.path.insert(0, folder)
    return importlib.import_module(module_name)


def load_task(config: StudyConfig) -> Build:
    """Import the task named in ``[task]``; its folder is searched before sys.path.

    Importing is where a task prepares what does not depend on params (reading
    and tokenizing data), so a worker does it once for all its trials.
    """
    name = config.task.name
    if name in BUILTIN:
        module_name, function_name = BUILTIN[name].split(":")
        prepare = getattr(importlib.import_module(module_name), function_name)
        return prepare(config)
    target = name
    where = f"{config.path}: task.name"
    if target.count(":") != 1:
        known = ", ".join(sorted(BUILTIN)) or "none yet"
        raise ConfigError(
            f"{where}: {name!r} is neither 'module:function' nor a built-in task "
            f"(built-in: {known})"
        )
    if config.task.options:
        key = next(iter(config.task.options))
        raise ConfigError(
            f"{config.path}: task.{key}: unknown key; a 'module:function' task takes its "
            "settings from [search] (fixed values are passed through)"
        )
    module_name, function_name = target.split(":")
    try:
        module = import_near(config, module_name)
    except ModuleNotFoundError as exc:
        if exc.name == module_name or module_name.startswith(f"{exc.name}."):
            raise TaskError(
                f"{where}: no module {module_name!r} next to the study file or on sys.path"
            ) from None
        raise TaskError(f"{where}: importing {module_name!r} failed: {exc}") from exc
    except SystemExit as exc:  # sys.exit() at import must not end sweeper silently
        raise TaskError(
            f"{where}: importing {module_name!r} called sys.exit({exc.code!r}); a task module "
            "must not exit"
        ) from exc
    except Exception as exc:  # a user's module can raise anything while importing
        raise TaskError(
            f"{where}: importing {module_name!r} failed: {type(exc).__name__}: {exc}"
        ) from exc
    build = getattr(module, function_name, None)
    if not callable(build):
        raise TaskError(f"{where}: module {module_name!r} has no function {function_name!r}")
    if config.validation.folds > 1 and not getattr(module, "supports_folds", False):
        raise ConfigError(
            f"{config.path}: validation.folds: task {name!r} does not split folds itself; give "
            f"{module_name} `supports_folds = True` and make {function_name} validate on fold "
            "params['fold'] of params['folds'] (sweeper.run.folds.stratified_folds splits them)"
        )
    return build
