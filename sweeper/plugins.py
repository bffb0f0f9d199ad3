"""The sampler and pruner of a study, built from ``[sampler]`` and ``[pruner]``; trial seeds.

Optuna's GPSampler models COMPLETE trials only: pruned trials, diverged or
not, are invisible to it, so after trials diverge at large learning rates it
keeps proposing them (the region looks unexplored). sweeper's ``gp`` sampler
also sees each diverged trial, as a complete trial at the worst value any
complete trial reached (of each metric, in a study of several). (TPE ranks a
diverged trial below every feasible one through the constraint sweeper sets
on it.) Confirmations (``[confirm]``)
run configurations the search already found again: the ``gp`` sampler's
model leaves them out, and the pruner never stops one.
"""

from __future__ import annotations

import contextlib
import difflib
import inspect
import json
import math
import os
import sys
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import optuna
from optuna.distributions import BaseDistribution
from optuna.study import StudyDirection
from optuna.trial import FrozenTrial, TrialState, create_trial

from sweeper.config import StudyConfig, shown
from sweeper.errors import ConfigError
from sweeper.incumbent import IncumbentPruner
from sweeper.space import SearchSpace, ask, grid_space, parse_space
from sweeper.store import is_diverged, report
from sweeper.store._compat import gp_sampler_seeing
from sweeper.store.confirm import is_confirmation


def diverged_as_worst(
    study: optuna.Study, completed: list[FrozenTrial], search_space: dict[str, BaseDistribution]
) -> list[FrozenTrial]:
    """The complete search trials, and each diverged one as a complete one at the worst value.

    Confirmations are left out: they are no new points of the search.
    """
    completed = [t for t in completed if not is_confirmation(t)]
    if not completed:
        return completed
    diverged = [
        t
        for t in study.get_trials(deepcopy=False, states=(TrialState.PRUNED,))
        if is_diverged(t) and not is_confirmation(t) and search_space.keys() <= t.params.keys()
    ]
    if not diverged:
        return completed
    worst = [
        min(column) if direction == StudyDirection.MAXIMIZE else max(column)
        for column, direction in zip(
            zip(*(t.values for t in completed if t.values), strict=True),
            study.directions,
            strict=True,
        )
    ]
    return completed + [
        create_trial(
            state=TrialState.COMPLETE,
            values=worst,
            params={name: t.params[name] for name in search_space},
            distributions={name: t.distributions[name] for name in search_space},
        )
        for t in diverged
    ]


DivergenceAwareGPSampler = gp_sampler_seeing(diverged_as_worst)
"""GPSampler whose model also sees diverged trials, at the worst value (see module)."""


RUNS_TORCH = ("gp",)
"""Samplers that run torch to sample (the gp sampler fits its model with it): a process that
goes on to fork must not ask them, as a fork of a process that ran torch hangs in OpenMP."""

SEQUENCES = ("grid", "qmc")
"""Samplers whose points are one sequence the study keeps: seeded with the study seed only."""


def sampler_for(config: StudyConfig, seed: int | None = None) -> optuna.samplers.BaseSampler:
    """The configured sampler; ``seed`` defaults to the study seed.

    The grid and QMC samplers always take the study seed: their points are one
    sequence kept in the study, which the seed orders (the grid's shuffle, whose
    places trials record as ``grid_id``; a scrambled QMC sequence, whose last
    index the study keeps under a key naming the seed). Seeded apart, they read
    one another's places as other points (the grid visited one twice and
    another never) or each started a sequence of its own. What QMC samples
    apart from its sequence (parameters outside the first trial's space) still
    gets ``seed``, or every trial would draw the same value.
    """
    factory, args, base = _factory(config, "sampler")
    if seed is not None and config.sampler.name not in SEQUENCES:
        base["seed"] = seed
    elif seed is not None and config.sampler.name == "qmc":
        base["independent_sampler"] = optuna.samplers.RandomSampler(seed=seed)
    return _build(config, "sampler", factory, {**base, **config.sampler.options}, *args)


def pruner_for(config: StudyConfig) -> optuna.pruners.BasePruner:
    """The configured pruner (``[pruner]``), with its options."""
    factory, args, base = _factory(config, "pruner")
    pruner = _build(config, "pruner", factory, {**base, **config.pruner.options}, *args)
    if config.confirm is not None:
        pruner.__class__ = _sparing_confirmations(type(pruner))
    return pruner


_SPARING: dict[type, type] = {}


def _sparing_confirmations(base: type[optuna.pruners.BasePruner]) -> type:
    """A subclass of the pruner's class that never prunes a confirmation.

    A confirmation's value must be a whole run's, to be averaged with the
    run it confirms. A subclass, not a wrapper: Optuna's samplers look for
    the pruner's class (TPE treats a Hyperband study's brackets apart).
    """
    found = _SPARING.get(base)
    if found is None:

        def prune(self: Any, study: optuna.Study, trial: FrozenTrial) -> bool:
            return not is_confirmation(trial) and base.prune(self, study, trial)

        found = _SPARING[base] = type(base.__name__, (base,), {"prune": prune})
    return found


def _factory(config: StudyConfig, section: str) -> tuple[Any, tuple[Any, ...], dict[str, Any]]:
    """The class of the configured sampler or pruner, its positional and default arguments."""
    if section == "pruner":
        pruners = optuna.pruners
        return (
            {
                "median": pruners.MedianPruner,
                "incumbent": IncumbentPruner,
                "percentile": pruners.PercentilePruner,
                "hyperband": pruners.HyperbandPruner,
                "asha": pruners.SuccessiveHalvingPruner,
                "threshold": pruners.ThresholdPruner,
                "none": pruners.NopPruner,
            }[config.pruner.name],
            (),
            {},
        )
    samplers = optuna.samplers
    seed: dict[str, Any] = {"seed": config.study.seed}
    if config.sampler.name == "grid":
        return samplers.GridSampler, (grid_space(config.search, config.path),), seed
    if config.sampler.name == "tpe" and parse_space(config.search, config.path).conditions:
        seed |= conditional_tpe(config.sampler.options)
    return (
        {
            "tpe": samplers.TPESampler,
            "random": samplers.RandomSampler,
            "gp": DivergenceAwareGPSampler,
            "cmaes": samplers.CmaEsSampler,
            "qmc": samplers.QMCSampler,
        }[config.sampler.name],
        (),
        seed,
    )


def conditional_tpe(options: dict[str, Any]) -> dict[str, Any]:
    """TPE's defaults for a space with conditions: ``multivariate`` and ``group``.

    Grouped multivariate TPE models the parameters that occur together jointly,
    and each conditional group apart, instead of each parameter alone. What the
    study file sets wins; ``group`` is left alone when ``multivariate`` is off,
    as TPE refuses it then.
    """
    defaults: dict[str, Any] = {"multivariate": True}
    if options.get("multivariate", True) is True:
        defaults["group"] = True
    return defaults


def _build(
    config: StudyConfig,
    section: str,
    factory: Any,
    options: dict[str, Any],
    *args: Any,
) -> Any:
    _check_known(config, section, factory, options)
    try:
        with _quiet_experimental():
            return factory(*args, **options)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{config.path}: {section}: {_one_line(exc)}") from exc


def _check_known(config: StudyConfig, section: str, factory: Any, options: dict[str, Any]) -> None:
    known = [p for p in inspect.signature(factory).parameters if p not in {"search_space", "self"}]
    for key in options:
        if key not in known:
            close = difflib.get_close_matches(key, known, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigError(
                f"{config.path}: {section}.{key}: not an option of {factory.__name__}{hint}"
            )


@contextlib.contextmanager
def _quiet_experimental() -> Iterator[None]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        yield


SEEDED_MAX = 12
"""Most finished trials put into the study that exercises the sampler and pruner."""
ASKED = 2
"""Trials the exercised sampler proposes and the pruner judges, after the seeded ones."""
_STARTUP_KEYS = ("n_startup_trials", "n_min_trials")
_STEPS = 10_000
"""Options of steps (``n_warmup_steps``) up to this are reached by the reported steps."""


def check_plugins(config: StudyConfig) -> None:
    """Build the sampler and pruner and drive them through a few trials; nothing is written.

    Many options are read only while sampling or pruning (``n_startup_trials
    = "x"`` fails at the first trial after the start-up trials), so they are
    exercised on an in-memory study with the study's search space: finished
    trials are put in to get past start-up options, then a few are asked,
    report intermediate values, are judged by the pruner and told. A failure
    names the option to blame when one alone fails, else the section.
    """
    space = parse_space(config.search, config.path)
    options = {"sampler": config.sampler.options, "pruner": config.pruner.options}
    for section in ("sampler", "pruner"):
        factory = _factory(config, section)[0]
        _check_known(config, section, factory, options[section])
        _check_types(config, section, factory, options[section])
    crashed = f"{config.path}: sampler, pruner: exercising them crashed"
    problem = _apart(lambda: _exercised(config, space, options), crashed)
    if problem is not None:
        raise ConfigError(problem)


def _exercised(
    config: StudyConfig, space: SearchSpace, options: dict[str, dict[str, Any]]
) -> str | None:
    """The message for options that fail when exercised, or None."""
    try:
        _exercise(config, space, options)
    except Exception as exc:  # Optuna raises many kinds on a bad option
        return _blame(config, space, options, exc)
    return None


def _apart(work: Callable[[], str | None], crashed: str) -> str | None:
    """Run ``work`` in a forked child and return what it returns (``crashed`` and how, when
    the child died).

    Samplers may run torch (the gp sampler fits its model with it, and sets
    torch's thread count); the process that checks the study goes on to fork
    every worker, and a fork of a process that ran torch hangs in OpenMP.
    """
    read_end, write_end = os.pipe()
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.close(read_end)
            os.write(write_end, json.dumps(work()).encode())
            code = 0
        finally:
            os._exit(code)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as answer:
        said = answer.read()
    _, status = os.waitpid(pid, 0)
    if status != 0 or not said:
        return f"{crashed} ({_ended(status)})"
    result: str | None = json.loads(said)
    return result


def _ended(status: int) -> str:
    if os.WIFSIGNALED(status):
        return f"killed by signal {os.WTERMSIG(status)}"
    return f"exit code {os.WEXITSTATUS(status)}"


PLAIN_KINDS: dict[str, tuple[type, ...]] = {
    "bool": (bool,),
    "int": (int,),
    "float": (int, float),
    "str": (str,),
    "None": (type(None),),
}
"""Annotations sweeper checks an option's value against, and the values they take."""

KIND_WORDS = {"bool": "true or false", "int": "a whole number", "float": "a number", "str": "text"}


def _check_types(config: StudyConfig, section: str, factory: Any, options: dict[str, Any]) -> None:
    """An option takes the kind of value its annotation (or else its default) says; a count
    (``n_...``) is 0 or more."""
    for key, value in options.items():
        parameter = inspect.signature(factory).parameters[key]
        kinds = _plain_kinds(parameter.annotation, parameter.default)
        if kinds is None:
            continue
        ok = any(
            isinstance(value, PLAIN_KINDS[kind])
            and (kind == "bool" or not isinstance(value, bool))
            for kind in kinds
        )
        words = " or ".join(KIND_WORDS[k] for k in kinds if k != "None")
        if not ok:
            default = parameter.default
            known = (
                ""
                if default in (None, inspect.Parameter.empty)
                else f" (the default is {default!r})"
            )
            raise ConfigError(
                f"{config.path}: {section}.{key}: must be {words}{known}, got {shown(value)}"
            )
        if key.startswith("n_") and isinstance(value, int) and value < 0:
            raise ConfigError(
                f"{config.path}: {section}.{key}: a count, 0 or more, got {shown(value)}"
            )


def _plain_kinds(annotation: Any, default: Any) -> list[str] | None:
    """The plain kinds (:data:`PLAIN_KINDS`) an option takes, or None when it takes others."""
    if isinstance(annotation, str):
        parts = [part.strip() for part in annotation.split("|")]
    elif isinstance(default, bool | int | float):
        parts = [type(default).__name__]
    else:
        return None
    return parts if parts and all(part in PLAIN_KINDS for part in parts) else None


def _exercise(
    config: StudyConfig,
    space: SearchSpace,
    options: dict[str, dict[str, Any]],
    only: str | None = None,
) -> None:
    """Seed finished trials, then ask, report, prune and tell a few; raise what Optuna raises.

    With ``only``, the other section is replaced by a plain one (random sampler, no pruner).
    """
    plain: dict[str, tuple[Any, tuple[Any, ...], dict[str, Any]]] = {
        "sampler": (optuna.samplers.RandomSampler, (), {"seed": 0}),
        "pruner": (optuna.pruners.NopPruner, (), {}),
    }
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            built = {}
            seeded = 0
            marks = {0, 1, 2}
            for section in ("sampler", "pruner"):
                mine = only is None or only == section
                factory, args, base = _factory(config, section) if mine else plain[section]
                given = options.get(section, {}) if mine else {}
                seen = _defaults(factory) | given
                for key in _STARTUP_KEYS:
                    if _whole(seen.get(key)):
                        seeded = max(seeded, min(seen[key], SEEDED_MAX))
                for key, value in seen.items():
                    if key.endswith(("_steps", "_resource")) and _whole(value):
                        marks |= {value, value + 1} if 0 <= value < _STEPS else set()
                built[section] = factory(*args, **{**base, **given})
            steps = sorted(marks)
            directions = list(config.study.directions)
            seeds = optuna.create_study(
                directions=directions,
                sampler=optuna.samplers.RandomSampler(seed=0),
                pruner=optuna.pruners.NopPruner(),
            )
            for number in range(seeded):
                _run(seeds, space, steps, number)
            study = optuna.create_study(
                directions=directions, sampler=built["sampler"], pruner=built["pruner"]
            )
            study.add_trials(seeds.trials)
            for number in range(seeded, seeded + ASKED):
                try:
                    _run(study, space, steps, number)
                except RuntimeError as exc:
                    if "Study.stop" not in str(exc):
                        raise
                    break  # a grid of few points is used up: it stops the study
    finally:
        optuna.logging.set_verbosity(verbosity)


def _defaults(factory: Any) -> dict[str, Any]:
    return {
        key: param.default
        for key, param in inspect.signature(factory).parameters.items()
        if param.default is not inspect.Parameter.empty
    }


def _run(study: optuna.Study, space: SearchSpace, steps: list[int], number: int) -> None:
    """One made-up trial: ask, report at ``steps`` while the pruner lets it, tell."""
    trial = ask(study, space)
    value = 0.0
    for step in steps:
        value = 0.5 + 0.4 * math.sin(1.7 * number + 0.3 * step)
        if report(study, trial, value, step):
            study.tell(trial, state=TrialState.PRUNED)
            return
    others = [
        0.5 + 0.4 * math.cos(1.3 * number + other) for other in range(1, len(study.directions))
    ]
    study.tell(trial, [value, *others])


def _whole(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _blame(
    config: StudyConfig,
    space: SearchSpace,
    options: dict[str, dict[str, Any]],
    exc: Exception,
) -> str:
    """The message for a failed exercise, naming the option to blame when one can be found."""

    def failure(given: dict[str, Any], section: str) -> Exception | None:
        try:
            _exercise(config, space, {section: given}, only=section)
        except Exception as error:  # the same many kinds
            return error
        return None

    where = config.path
    for section in ("sampler", "pruner"):
        given = options[section]
        error = failure(given, section)
        if error is None:
            continue
        key = _culprit(given, error, _factory(config, section)[0], failure, section)
        if key is None:
            return f"{where}: {section}: {_one_line(error)}"
        text = _one_line(error)
        value = given[key]
        said = (repr(value), f"={value}", f"= {value}", f"is {value}")
        got = "" if any(form in text for form in said) else f" (got {shown(value)})"
        return f"{where}: {section}.{key}: {text}{got}"
    return f"{where}: sampler and pruner: {_one_line(exc)}"


def _culprit(
    given: dict[str, Any],
    error: Exception,
    factory: Any,
    failure: Callable[[dict[str, Any], str], Exception | None],
    section: str,
) -> str | None:
    """The one option of ``given`` to blame for ``error``, or None."""
    if isinstance(error, ImportError) or not given:
        return None
    if len(given) == 1:
        return next(iter(given))
    for key in given:  # the others work without it
        if failure({k: v for k, v in given.items() if k != key}, section) is None:
            return key
    defaults = _defaults(factory)
    required = {k: v for k, v in given.items() if k not in defaults}
    if failure(required, section) is not None:
        return next(iter(required)) if len(required) == 1 else None
    for key, value in given.items():  # it fails with the required ones alone
        if key not in required and failure({**required, key: value}, section) is not None:
            return key
    return None


def _one_line(exc: Exception) -> str:
    if isinstance(exc, ModuleNotFoundError) and exc.name:
        return f"needs the Python package {exc.name!r}, which is not installed"
    text = " ".join(str(exc).split()) or type(exc).__name__
    if isinstance(exc, TypeError | KeyError | AttributeError | ZeroDivisionError):
        text = f"{type(exc).__name__}: {text}"
    return text if len(text) <= 300 else f"{text[:299]}…"


def trial_seed(study_seed: int, number: int) -> int:
    """The seed of trial ``number``: reproducible from the study seed alone.

    Mixed through NumPy's SeedSequence: neighbouring integer seeds give
    correlated first draws in Mersenne Twister, and samplers draw few numbers.
    """
    import numpy as np

    return int(np.random.SeedSequence([study_seed, number]).generate_state(1)[0])
