"""One trial, in a process forked for it: train it and send the worker its outcome, with a stop
reason (claiming it first, for the worker, where the sampler runs torch)."""

from __future__ import annotations

import math
import sys
import time
import traceback
from dataclasses import dataclass
from typing import Any

import lightning.pytorch as pl
import optuna
import torch
from lightning.pytorch.callbacks import EarlyStopping
from optuna.trial import TrialState

from sweeper.config import StudyConfig
from sweeper.errors import StorageError, TaskError
from sweeper.plugins import trial_seed
from sweeper.run.callbacks import DivergenceCallback, TrialRecorder, TrialStopped
from sweeper.run.channel import send, send_outcome
from sweeper.run.devices import Slot
from sweeper.run.divergence import DivergenceGuard
from sweeper.run.tracking import TrialRun, trial_run
from sweeper.run.trainer import trainer_options
from sweeper.space import parse_space
from sweeper.store import (
    Owner,
    SamplerFailed,
    claim,
    claim_lock,
    is_confirmation,
    report,
)
from sweeper.tasks import Build

EXIT_TOLD = 0
"""The trial ran and its outcome was sent to the worker, whatever that outcome."""

EXIT_NO_TRIAL = 3
"""Nothing left to claim: ``n_trials`` are finished or under way."""

EXIT_SAMPLER = 4
"""The sampler failed to give a trial; the trial is failed and the sweep must stop."""

EXIT_STORAGE = 5
"""The storage failed while claiming a trial."""

CONFIDENT_ERRORS = 20
"""Validation examples the best model gets wrong most confidently, kept per trial."""


def claim_next(
    config: StudyConfig,
    slot: Slot,
    study: optuna.Study,
    owner: Owner,
    since: int | None,
    again: bool = False,
) -> optuna.Trial | int:
    """Claim the next trial for ``owner`` under the study's claim lock: the trial, or the exit
    code that says why there is none (its message printed). ``again``: this process claims
    trial after trial (a worker), so the lock's server session is kept between claims."""
    try:
        with claim_lock(config, keep_session=again):
            attrs = {"slot": slot.index, "device": slot.device}
            trial = claim(study, config, owner, attrs, since)
    except SamplerFailed as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_SAMPLER
    except StorageError as exc:  # the claim lock cannot be taken
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_STORAGE
    except optuna.exceptions.StorageInternalError as exc:
        from sweeper.store import storage_failure

        print(f"error: {storage_failure(exc)}", file=sys.stderr)
        return EXIT_STORAGE
    return EXIT_NO_TRIAL if trial is None else trial


def run_trial(
    config: StudyConfig,
    slot: Slot,
    build: Build,
    study: optuna.Study,
    channel: int,
    trial: optuna.Trial | None = None,
    since: int | None = None,
) -> int:
    """Train ``trial`` and send its outcome to the worker; returns an exit code.

    Runs in the process forked for the trial: ``study`` is the worker's,
    its engine disposed of without closing the worker's connections, so this
    process opens its own (for the pruner's reports) and keeps the engine's
    compiled statements. The worker claims the trial before the fork and records the
    outcome this process writes to ``channel``. Where the sampler runs torch
    (which the worker must not), ``trial`` is None: this process claims it for
    the worker and writes its number first, so the worker can record its end
    if this process dies.
    """
    limit_threads(slot.threads)
    if trial is None:
        claimed = claim_next(config, slot, study, Owner.forked(), since)
        if isinstance(claimed, int):
            return claimed
        trial = claimed
        send(channel, f"{trial.number}")
    run = trial_run(config, trial.number, trial_params(config, trial))
    state, values, attrs = _train(config, slot, build, study, trial, run)
    run.ended(state, values[0] if values else None, attrs)
    if "error" in attrs:
        print(f"trial {trial.number} failed:\n{attrs['error']}", file=sys.stderr)
    send_outcome(channel, state, values, attrs)
    return EXIT_TOLD


def limit_threads(threads: int) -> None:
    """Cap this trial's threads at its slot's share: torch's, and those of numpy's BLAS and
    any OpenMP runtime, which sized their pools when the supervisor loaded them (the
    environment a worker is given comes too late for a library already loaded)."""
    from threadpoolctl import threadpool_limits

    torch.set_num_threads(threads)
    threadpool_limits(threads)


def trial_params(config: StudyConfig, trial: optuna.Trial) -> dict[str, Any]:
    """What the task is built with: the fixed values of ``[search]`` and the sampled ones."""
    return {**parse_space(config.search, config.path).fixed, **trial.params}


def _train(
    config: StudyConfig,
    slot: Slot,
    build: Build,
    study: optuna.Study,
    trial: optuna.Trial,
    run: TrialRun,
) -> tuple[TrialState, list[float] | None, dict[str, Any]]:
    """Train the claimed trial: its state, its values (one per study metric), its attributes."""
    params = trial_params(config, trial)
    seed = trial_seed(config.study.seed, trial.number)
    pl.seed_everything(seed, workers=True, verbose=False)
    if config.validation.folds > 1:
        state, values, attrs = _cross_validate(config, slot, build, trial, params, run)
        return state, values, {"seed": seed, **attrs}
    fit = _fit(config, slot, build, trial, params, run)
    attrs = {"seed": seed, **fit.attrs}
    recorder = fit.recorder
    if recorder.best is not None:
        attrs.update(_overfitting_view(config, recorder))
    if fit.state != TrialState.COMPLETE:
        return fit.state, None, attrs
    unusable = _unusable(config, recorder)
    if unusable is not None:
        attrs["stop_reason"] = unusable
        return TrialState.FAIL, None, attrs
    if recorder.best_weights is not None and not is_confirmation(trial):
        from sweeper.run.weights import keep

        kept = keep(config, trial.number, recorder.best_values[0], recorder.best_weights)
        if kept is not None:
            attrs["weights"] = str(kept)
    return TrialState.COMPLETE, recorder.best_values, attrs


_NEVER_LOGGED = "error: the study metric {metric!r} was never logged; the trial ran no validation"


def _unusable(config: StudyConfig, recorder: TrialRecorder) -> str | None:
    """Why a fit that ended well has no values to tell, or None.

    The first metric's best is finite (or the guard stopped the trial); another
    metric of a study of several objectives can still be nan or inf there.
    """
    if recorder.best is None or not math.isfinite(recorder.best):
        return _NEVER_LOGGED.format(metric=recorder.metric)
    for metric, value in zip(config.study.metrics, recorder.best_values, strict=True):
        if not math.isfinite(value):
            return (
                f"error: the study metric {metric!r} is {value} at the best validation "
                f"(step {recorder.best_step})"
            )
    return None


@dataclass
class Fit:
    """One training run: how it ended, what to store on the trial, its recorder."""

    state: TrialState
    attrs: dict[str, Any]
    recorder: TrialRecorder


def _fit(
    config: StudyConfig,
    slot: Slot,
    build: Build,
    trial: optuna.Trial,
    params: dict[str, Any],
    run: TrialRun,
    fold: int | None = None,
    history: list[dict[str, Any]] | None = None,
) -> Fit:
    """Build the task with ``params`` and train it once, watched by sweeper's callbacks."""
    guarding = config.divergence.enabled
    recorder = TrialRecorder(
        trial,
        config.study.metrics,
        config.study.directions[0],
        config.pruner.name,
        guarding,
        keep_weights=config.study.keep_weights > 0 and fold is None,
        fold=fold,
        history=history,
    )
    settings = config.divergence
    watcher = DivergenceCallback(
        DivergenceGuard(settings.factor, settings.patience, settings.warmup_steps),
        stop=guarding,
    )
    callbacks: list[pl.Callback] = [recorder, watcher]
    early = _early_stopping(config)
    if early is not None:
        callbacks.append(early)
    attrs: dict[str, Any] = {}
    started = time.perf_counter()
    trainer: pl.Trainer | None = None
    try:
        module, datamodule = build_task(build, params)
        attrs.update(parameter_counts(module))
        options = trainer_options(config, slot, params, run.logger())
        trainer = pl.Trainer(**options, callbacks=callbacks)
        trainer.fit(module, datamodule=datamodule)
    except TrialStopped as stop:
        attrs.update(stop_reason=stop.reason, stop_step=stop.step, diverged=stop.diverged)
        state = TrialState.PRUNED if stop.pruned else TrialState.COMPLETE
    except Exception as exc:  # any error of the user's code fails this trial only
        attrs.update(
            stop_reason=f"error: {type(exc).__name__}: {exc}", error=traceback.format_exc(limit=-8)
        )
        state = TrialState.FAIL
    else:
        attrs["stop_reason"] = "completed"
        state = TrialState.COMPLETE
        if early is not None and early.stopped_epoch > 0 and trainer is not None:
            attrs.update(stop_reason="early-stopped", stop_step=trainer.global_step)
    attrs["fit_seconds"] = round(time.perf_counter() - started, 4)
    if trainer is not None:
        attrs.update(steps=trainer.global_step, precision=str(trainer.precision))
    if slot.gpu is not None and torch.cuda.is_initialized():
        attrs.update(gpu_used(slot.gpu))
    if watcher.onset is not None:
        attrs["divergence_onset"] = watcher.onset
    if recorder.best is not None:
        attrs.update(best_step=recorder.best_step, best_epoch=recorder.best_epoch)
    return Fit(state, attrs, recorder)


def gpu_used(index: int) -> dict[str, Any]:
    """The GPU a trial ran on, as nvidia-smi names it (model, PCI bus id), and the most
    memory its tensors held (``gpu_peak_mb``)."""
    props = torch.cuda.get_device_properties(index)
    bus = [getattr(props, f"pci_{part}_id", None) for part in ("domain", "bus", "device")]
    named = {"gpu": props.name}
    if None not in bus:
        named["gpu"] += f" {bus[0]:08X}:{bus[1]:02X}:{bus[2]:02X}.0"
    return {**named, "gpu_peak_mb": round(torch.cuda.max_memory_allocated(index) / 2**20, 1)}


def parameter_counts(module: torch.nn.Module) -> dict[str, int]:
    """The module's parameters that train (``requires_grad``) and all of them."""
    parameters = list(module.parameters())
    return {
        "trainable_params": sum(p.numel() for p in parameters if p.requires_grad),
        "total_params": sum(p.numel() for p in parameters),
    }


def _cross_validate(
    config: StudyConfig,
    slot: Slot,
    build: Build,
    trial: optuna.Trial,
    params: dict[str, Any],
    run: TrialRun,
) -> tuple[TrialState, list[float] | None, dict[str, Any]]:
    """Train once per fold; each value is the mean over the folds of that metric at the fold's
    best validation (by the first metric).

    After each fold the first metric's mean so far is reported at step = fold
    index, so the pruner can stop a bad configuration after its first folds.
    A fold that diverges or fails ends the trial the same way.
    """
    folds = config.validation.folds
    history: list[dict[str, Any]] = []
    values: list[float] = []
    fold_bests: list[list[float]] = []
    errors: list[dict[str, Any]] = []
    totals = {"steps": 0, "fit_seconds": 0.0}
    for fold in range(folds):
        fold_params = {**params, "fold": fold, "folds": folds}
        fit = _fit(config, slot, build, trial, fold_params, run, fold, history)
        totals["steps"] += fit.attrs.get("steps", 0)
        totals["fit_seconds"] += fit.attrs["fit_seconds"]
        totals.update({k: v for k, v in fit.attrs.items() if k.endswith("_params")})
        if fit.state != TrialState.COMPLETE or _unusable(config, fit.recorder) is not None:
            ended = {**fit.attrs, **totals, "fold_values": values}
            if fit.state == TrialState.COMPLETE:
                ended["stop_reason"] = _unusable(config, fit.recorder)
                return TrialState.FAIL, None, ended
            ended["stop_reason"] = f"{ended['stop_reason']} (fold {fold + 1} of {folds})"
            return fit.state, None, ended
        fold_bests.append(fit.recorder.best_values)
        values.append(fit.recorder.best_values[0])
        errors += fit.recorder.best_errors
        mean = sum(values) / len(values)
        if report(trial.study, trial, mean, fold, judge=fold < folds - 1):
            reason = f"pruned by {config.pruner.name} after fold {fold + 1} of {folds}"
            return (
                TrialState.PRUNED,
                None,
                {**totals, "fold_values": values, "stop_reason": reason},
            )
    attrs: dict[str, Any] = {**totals, "fold_values": values, "stop_reason": "completed"}
    if errors:
        errors.sort(key=lambda e: -float(e.get("confidence", 0.0)))
        attrs["confident_errors"] = errors[:CONFIDENT_ERRORS]
    means = [sum(column) / folds for column in zip(*fold_bests, strict=True)]
    return TrialState.COMPLETE, means, attrs


def _early_stopping(config: StudyConfig) -> EarlyStopping | None:
    """Lightning's EarlyStopping on the study metric, when ``[trainer]`` asks for it."""
    patience = config.trainer.get("early_stopping_patience")
    if patience is None:
        return None
    return EarlyStopping(
        monitor=config.study.metrics[0],
        mode="max" if config.study.maximize else "min",
        patience=int(patience),
        check_finite=False,  # a non-finite metric is the divergence guard's
        check_on_train_epoch_end=False,
    )


def _overfitting_view(config: StudyConfig, recorder: TrialRecorder) -> dict[str, Any]:
    """The gap at the best validation, how the trial overfit, its confident errors."""
    from sweeper.run.overfitting import gap, overfit

    at_best = next((r for r in recorder.history if r["step"] == recorder.best_step), {})
    view: dict[str, Any] = {}
    found_gap = gap(at_best, recorder.metric)
    if found_gap:
        view["gap"] = found_gap
    found = overfit(recorder.history, recorder.metric, recorder.maximize)
    if found is not None:
        view["overfit"] = found
    if recorder.best_errors:
        view["confident_errors"] = recorder.best_errors[:CONFIDENT_ERRORS]
    return view


def build_task(build: Build, params: dict[str, Any]) -> tuple[pl.LightningModule, Any]:
    built = build(dict(params))
    if not (isinstance(built, tuple) and len(built) == 2):
        raise TaskError(
            "the task must return (LightningModule, LightningDataModule), got "
            f"{type(built).__name__}"
        )
    module, datamodule = built
    if not isinstance(module, pl.LightningModule):
        raise TaskError(
            f"the task's first return value must be a LightningModule, got {type(module).__name__}"
        )
    if not isinstance(datamodule, pl.LightningDataModule):
        raise TaskError(
            "the task's second return value must be a LightningDataModule, got "
            f"{type(datamodule).__name__}"
        )
    return module, datamodule
