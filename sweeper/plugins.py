"""The sampler and pruner of a study, built from ``[sampler]`` and ``[pruner]``; trial seeds.

Optuna's GPSampler models COMPLETE trials only: pruned trials, diverged or
not, are invisible to it, so after trials diverge at large learning rates it
keeps proposing them (the region looks unexplored). sweeper's ``gp`` sampler
also sees each diverged trial, as a complete trial at the worst value any
complete trial reached. (TPE ranks a diverged trial below every feasible one
through the constraint sweeper sets on it.)
"""

from __future__ import annotations

import contextlib
import difflib
import inspect
import warnings
from collections.abc import Iterator
from typing import Any

import optuna
from optuna.distributions import BaseDistribution
from optuna.study import StudyDirection
from optuna.trial import FrozenTrial, TrialState, create_trial

from sweeper.config import StudyConfig
from sweeper.errors import ConfigError
from sweeper.space import grid_space
from sweeper.store._compat import gp_sampler_seeing


def diverged_as_worst(
    study: optuna.Study, completed: list[FrozenTrial], search_space: dict[str, BaseDistribution]
) -> list[FrozenTrial]:
    """The complete trials, and each diverged trial as a complete one at the worst value."""
    if not completed:
        return completed
    diverged = [
        t
        for t in study.get_trials(deepcopy=False, states=(TrialState.PRUNED,))
        if t.user_attrs.get("diverged") and search_space.keys() <= t.params.keys()
    ]
    if not diverged:
        return completed
    values = [t.value for t in completed if t.value is not None]
    worst = min(values) if study.direction == StudyDirection.MAXIMIZE else max(values)
    return completed + [
        create_trial(
            state=TrialState.COMPLETE,
            value=worst,
            params={name: t.params[name] for name in search_space},
            distributions={name: t.distributions[name] for name in search_space},
        )
        for t in diverged
    ]


DivergenceAwareGPSampler = gp_sampler_seeing(diverged_as_worst)
"""GPSampler whose model also sees diverged trials, at the worst value (see module)."""


def sampler_for(config: StudyConfig, seed: int | None = None) -> optuna.samplers.BaseSampler:
    """The configured sampler; ``seed`` defaults to the study seed."""
    seed = config.study.seed if seed is None else seed
    name, options = config.sampler.name, config.sampler.options
    samplers = optuna.samplers
    if name == "grid":
        return _build(
            config,
            "sampler",
            samplers.GridSampler,
            {"seed": seed, **options},
            grid_space(config.search, config.path),
        )
    factory = {
        "tpe": samplers.TPESampler,
        "random": samplers.RandomSampler,
        "gp": DivergenceAwareGPSampler,
        "cmaes": samplers.CmaEsSampler,
        "qmc": samplers.QMCSampler,
    }[name]
    return _build(config, "sampler", factory, {"seed": seed, **options})


def pruner_for(config: StudyConfig) -> optuna.pruners.BasePruner:
    """The configured pruner (``[pruner]``), with its options."""
    pruners = optuna.pruners
    factory = {
        "median": pruners.MedianPruner,
        "percentile": pruners.PercentilePruner,
        "hyperband": pruners.HyperbandPruner,
        "asha": pruners.SuccessiveHalvingPruner,
        "threshold": pruners.ThresholdPruner,
        "none": pruners.NopPruner,
    }[config.pruner.name]
    return _build(config, "pruner", factory, config.pruner.options)


def _build(
    config: StudyConfig,
    section: str,
    factory: Any,
    options: dict[str, Any],
    *args: Any,
) -> Any:
    known = [p for p in inspect.signature(factory).parameters if p not in {"search_space", "self"}]
    for key in options:
        if key not in known:
            close = difflib.get_close_matches(key, known, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigError(
                f"{config.path}: {section}.{key}: not an option of {factory.__name__}{hint}"
            )
    try:
        with _quiet_experimental():
            return factory(*args, **options)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{config.path}: {section}: {exc}") from None


@contextlib.contextmanager
def _quiet_experimental() -> Iterator[None]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        yield


def check_plugins(config: StudyConfig) -> None:
    """Build sampler and pruner once so that bad options fail before anything is written."""
    sampler_for(config)
    pruner_for(config)


def trial_seed(study_seed: int, number: int) -> int:
    """The seed of trial ``number``: reproducible from the study seed alone.

    Mixed through NumPy's SeedSequence: neighbouring integer seeds give
    correlated first draws in Mersenne Twister, and samplers draw few numbers.
    """
    import numpy as np

    return int(np.random.SeedSequence([study_seed, number]).generate_state(1)[0])
