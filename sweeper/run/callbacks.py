"""Lightning callbacks of a trial: record metrics, report to Optuna, prune."""

from __future__ import annotations

import math
from typing import Any

import lightning.pytorch as pl
import optuna

from sweeper.errors import TaskError
from sweeper.run.divergence import DivergenceGuard
from sweeper.store import report


class TrialStopped(Exception):
    """Raised inside training to end a trial early; ``reason`` is its stop reason."""

    def __init__(self, reason: str, step: int, pruned: bool, diverged: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.step = step
        self.pruned = pruned
        self.diverged = diverged


def step_loss(outputs: Any) -> float | None:
    """The training loss of one step, from what ``training_step`` returned."""
    loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
    if loss is None or not hasattr(loss, "detach"):
        return None
    return float(loss.detach())


class DivergenceCallback(pl.Callback):
    """Feeds the guard the loss of every optimizer step and stops a diverging trial.

    With ``stop`` off it only watches: ``onset`` still tells where the loss
    diverged, so a sweep without the guard can be compared with one that has it.
    """

    def __init__(self, guard: DivergenceGuard, stop: bool = True) -> None:
        self.guard = guard
        self.stop = stop
        self.onset: int | None = None

    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        loss = step_loss(outputs)
        if loss is None or self.onset is not None:
            return
        step = trainer.global_step
        reason = self.guard.step(step, loss)
        if reason is None:
            return
        self.onset = step if self.guard.onset is None else self.guard.onset
        if self.stop:
            raise TrialStopped(reason, step, pruned=True, diverged=True)


class TrialRecorder(pl.Callback):
    """Records every validation on the trial and lets the study's pruner decide.

    At each validation: the study metric (the first, of several) is reported
    as an intermediate value at the global step; every ``val_*`` and
    ``train_*`` metric, with the mean training loss since the previous
    validation as ``train_loss``, is appended to ``user_attrs["history"]``;
    the best value so far and its step are kept for the objective, with every
    study metric at that validation (``best_values``). In a fold of a
    cross-validated trial (``fold``) the records are tagged with it and
    appended to the trial's shared ``history``, and nothing is reported (the
    trial reports each fold's best). At each new best the module's
    ``validation_errors`` (if it has them) are kept, and with
    ``keep_weights`` a CPU copy of its weights.
    """

    def __init__(
        self,
        trial: optuna.Trial,
        metrics: tuple[str, ...],
        direction: str,
        pruner: str,
        guard: bool = True,
        keep_weights: bool = False,
        fold: int | None = None,
        history: list[dict[str, float | int]] | None = None,
    ) -> None:
        self.trial = trial
        self.guard = guard
        self.metrics = metrics
        self.metric = metrics[0]
        self.maximize = direction == "maximize"
        self.pruner = pruner
        self.keep_weights = keep_weights
        self.fold = fold
        self.history: list[dict[str, float | int]] = [] if history is None else history
        self.best: float | None = None
        self.best_values: list[float] = []
        self.best_step: int | None = None
        self.best_epoch: int | None = None
        self.best_errors: list[dict[str, Any]] = []
        self.best_weights: dict[str, Any] | None = None
        self._losses: list[float] = []

    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        loss = step_loss(outputs)
        if loss is not None:
            self._losses.append(loss)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        step, epoch = trainer.global_step, trainer.current_epoch
        metrics = {
            name: float(value)
            for name, value in trainer.callback_metrics.items()
            if getattr(value, "numel", lambda: 1)() == 1
        }
        for metric in self.metrics:
            if metric not in metrics:
                logged = ", ".join(sorted(metrics)) or "nothing"
                raise TaskError(
                    f"the study metric {metric!r} was not logged during validation "
                    f"(logged: {logged}); log it with self.log({metric!r}, ...)"
                )
        value = metrics[self.metric]
        record: dict[str, float | int] = {"step": step, "epoch": epoch}
        if self.fold is not None:
            record["fold"] = self.fold
        record.update(
            {
                k: v
                for k, v in metrics.items()
                if k.startswith("val") or (k.startswith("train_") and k != "train_loss")
            }
        )
        if self._losses:
            record["train_loss"] = sum(self._losses) / len(self._losses)
        elif "train_loss" in metrics:
            record["train_loss"] = metrics["train_loss"]
        self._losses.clear()
        self.history.append(record)
        self.trial.set_user_attr("history", self.history)
        if not math.isfinite(value):
            if self.guard:
                reason = f"diverged: {self.metric}={value} at step {step}"
                raise TrialStopped(reason, step, pruned=True, diverged=True)
            raise ValueError(f"the study metric {self.metric} is {value} at step {step}")
        if self.best is None or (value > self.best if self.maximize else value < self.best):
            self.best, self.best_step, self.best_epoch = value, step, epoch
            self.best_values = [metrics[metric] for metric in self.metrics]
            self.best_errors = list(getattr(pl_module, "validation_errors", None) or [])
            if self.keep_weights:
                self.best_weights = {
                    name: tensor.detach().to("cpu", copy=True)
                    for name, tensor in pl_module.state_dict().items()
                }
        if self.fold is not None:
            return  # folds are reported whole, one value per fold
        if report(self.trial.study, self.trial, value, step):
            raise TrialStopped(f"pruned by {self.pruner} at step {step}", step, pruned=True)
