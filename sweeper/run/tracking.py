"""Experiment trackers: each trial a run of TensorBoard, MLflow or W&B, by Lightning's loggers.

A trial gets a :class:`TrialRun` from :func:`trial_run`. Its :meth:`~TrialRun.logger`
is handed to the Trainer; :meth:`~TrialRun.ended` records how the trial ended (outcome,
stop reason, the step of the guard's or the pruner's decision) and closes the run.
Without ``[tracking]`` the run records nothing and the Trainer gets no logger.

The backends' packages are extras, imported only here and only in the trial process.
"""

from __future__ import annotations

import importlib
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from optuna.trial import TrialState

from sweeper.config import FROM_ENV, StudyConfig, TrackingSection, environment_value
from sweeper.errors import ConfigError

if TYPE_CHECKING:
    from lightning.pytorch.loggers import Logger

__all__ = ["TrialRun", "check_tracking", "mlflow_uri", "outcome", "trial_run"]

log = logging.getLogger(__name__)

MODULES = {"tensorboard": "tensorboard", "mlflow": "mlflow", "wandb": "wandb"}
"""The module each backend needs; the extra of the same name installs it."""

MLFLOW_STATUS = {"complete": "FINISHED", "early-stopped": "FINISHED", "failed": "FAILED"}
"""MLflow's status of a trial's run by outcome; pruned and diverged runs are KILLED."""

RECORDED = ("stop_step", "divergence_onset", "best_step", "steps")
"""Attributes of a trial recorded with its outcome, when it has them."""


def check_tracking(config: StudyConfig) -> None:
    """Refuse a backend that is not installed, or an ``env:`` tracking URI that is unset.

    Writes nothing: it imports the backend's package and reads the environment.
    """
    tracking = config.tracking
    if tracking is None:
        return
    backend = tracking.backend
    try:
        importlib.import_module(MODULES[backend])
    except Exception as exc:  # ImportError, or a broken install raising anything else
        problem = "is not installed" if isinstance(exc, ImportError) else f"fails ({exc})"
        raise ConfigError(
            f"{config.path}: tracking.backend: {backend} {problem}; "
            f"pip install 'sweeper[{backend}]'"
        ) from exc
    if backend == "mlflow":
        mlflow_uri(config)


def mlflow_uri(config: StudyConfig) -> str:
    """The MLflow tracking URI: ``env:NAME`` read now, a relative SQLite path made absolute."""
    tracking = _section(config)
    uri = tracking.tracking_uri or "sqlite:///mlflow.db"
    if uri.startswith(FROM_ENV):
        name = uri.removeprefix(FROM_ENV)
        value = environment_value(
            config.path,
            "tracking.tracking_uri",
            name,
            "the MLflow tracking URI",
            "https://mlflow.example.org",
        )
        uri = value  # never shown in a message: it may hold a password
    if uri.startswith("sqlite:"):
        from sweeper.store.open import relative_to

        uri = relative_to(uri, config.folder)
    return uri


def outcome(state: TrialState, attrs: dict[str, Any]) -> str:
    """How a trial ended, in one word: complete, early-stopped, pruned, diverged or failed."""
    from sweeper.store import outcome_of

    if state == TrialState.COMPLETE and attrs.get("stop_reason") == "early-stopped":
        return "early-stopped"
    return outcome_of(state, attrs)


def trial_run(config: StudyConfig, number: int, params: dict[str, Any]) -> TrialRun:
    """The run of trial ``number`` in the study's tracker; opens nothing yet."""
    if config.tracking is None:
        return TrialRun()
    kinds: dict[str, type[_TrackedRun]] = {
        "tensorboard": TensorBoardRun,
        "mlflow": MLflowRun,
        "wandb": WandbRun,
    }
    return kinds[config.tracking.backend](config, number, params)


class TrialRun:
    """A trial's run in an experiment tracker; this one, for no ``[tracking]``, records nothing."""

    def logger(self) -> Logger | bool:
        """The Trainer's ``logger`` argument: False, or the run's Lightning logger."""
        return False

    def ended(self, state: TrialState, value: float | None, attrs: dict[str, Any]) -> None:
        """The trial's outcome is known: record it and close the run."""


class _TrackedRun(TrialRun):
    """What every backend shares: the run's name, its params, one logger, safe closing."""

    def __init__(self, config: StudyConfig, number: int, params: dict[str, Any]) -> None:
        self.config = config
        self.tracking = _section(config)
        self.number = number
        self.params = params
        self.name = f"{config.study.name}/trial-{number}"
        self._logger: Logger | None = None

    def logger(self) -> Logger:
        if self._logger is None:
            self._logger = self._open()
        return self._logger

    def ended(self, state: TrialState, value: float | None, attrs: dict[str, Any]) -> None:
        """Record the outcome; a tracker that fails here is logged, never the trial's failure."""
        record: dict[str, Any] = {
            "outcome": outcome(state, attrs),
            "stop_reason": str(attrs.get("stop_reason", "")),
        }
        record.update({key: attrs[key] for key in RECORDED if attrs.get(key) is not None})
        if value is not None:
            record["value"] = value
        try:
            self._close(self.logger(), record)
        except Exception as exc:  # the study holds the outcome; the tracker is a copy
            log.warning(
                "trial %d: %s did not record its outcome: %s: %s",
                self.number,
                self.tracking.backend,
                type(exc).__name__,
                exc,
            )

    def _folder(self, default: str) -> Path:
        folder = (self.config.folder / Path(self.tracking.dir or default).expanduser()).resolve()
        folder.mkdir(parents=True, exist_ok=True)
        return folder

    def _open(self) -> Logger:
        raise NotImplementedError

    def _close(self, logger: Any, record: dict[str, Any]) -> None:
        raise NotImplementedError


class TensorBoardRun(_TrackedRun):
    """Event files in ``<dir>/<study>/trial-<n>``: the metrics, the params as hparams, and
    text entries ``sweeper/outcome`` and ``sweeper/stop_reason`` at the step it stopped."""

    def _open(self) -> Logger:
        from lightning.pytorch.loggers import TensorBoardLogger

        return TensorBoardLogger(
            save_dir=str(self._folder("tensorboard")),
            name=self.config.study.name,
            version=f"trial-{self.number}",
            default_hp_metric=False,
        )

    def _close(self, logger: Any, record: dict[str, Any]) -> None:
        from torch.utils.tensorboard.summary import hparams

        writer = logger.experiment
        step = record.get("stop_step", record.get("steps", 0))
        writer.add_text("sweeper/outcome", record["outcome"], step)
        writer.add_text("sweeper/stop_reason", record["stop_reason"], step)
        if "divergence_onset" in record:
            onset = record["divergence_onset"]
            writer.add_text("sweeper/divergence_onset", f"step {onset}", onset)
        metrics = {}
        if "value" in record:
            metrics["sweeper/value"] = record["value"]
            writer.add_scalar("sweeper/value", record["value"], record.get("best_step", step))
        params = {
            k: v if isinstance(v, int | float | str | bool) else str(v)
            for k, v in self.params.items()
        }
        for summary in hparams(params, metrics):
            writer._get_file_writer().add_summary(summary)
        writer.flush()
        writer.close()


class MLflowRun(_TrackedRun):
    """A run per trial nested under the study's run (``mlflow.parentRunId``), params logged,
    tags ``sweeper.outcome``, ``sweeper.stop_reason`` and ``sweeper.stop_step`` at its end."""

    def _open(self) -> Logger:
        from lightning.pytorch.loggers import MLFlowLogger
        from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

        uri = mlflow_uri(self.config)
        experiment = self.tracking.experiment or self.config.base_name
        self.parent = self._study_run(uri, experiment)
        logger = MLFlowLogger(
            experiment_name=experiment,
            run_name=self.name,
            tracking_uri=uri,
            tags={
                MLFLOW_PARENT_RUN_ID: self.parent,
                "sweeper.study": self.config.study.name,
                "sweeper.trial": str(self.number),
            },
        )
        logger.log_hyperparams(self.params)
        return logger

    def _study_run(self, uri: str, experiment: str) -> str:
        """The id of the study's run, created by the first trial that needs it.

        Under the study's claim lock, so that trials starting together on any
        machine find one study run (and a new SQLite store is created once).
        """
        from mlflow import MlflowClient
        from mlflow.entities import Param
        from mlflow.utils.mlflow_tags import MLFLOW_RUN_NAME

        from sweeper.store import claim_lock

        study = self.config.study
        with claim_lock(self.config):
            client = MlflowClient(uri)
            found = client.get_experiment_by_name(experiment)
            if found is not None and found.lifecycle_stage == "deleted":
                raise ConfigError(
                    f"{self.config.path}: tracking.experiment: the MLflow experiment "
                    f"{experiment!r} is deleted; restore it or name another"
                )
            experiment_id = (
                found.experiment_id if found is not None else client.create_experiment(experiment)
            )
            runs = client.search_runs(
                [experiment_id],
                f"tags.`sweeper.study` = '{study.name}' and tags.`sweeper.role` = 'study'",
                max_results=1,
            )
            if runs:
                return str(runs[0].info.run_id)
            run = client.create_run(
                experiment_id,
                tags={
                    MLFLOW_RUN_NAME: study.name,
                    "sweeper.study": study.name,
                    "sweeper.role": "study",
                },
            )
            described = {
                "metric": ",".join(study.metrics),
                "direction": ",".join(study.directions),
                "n_trials": study.n_trials,
                "sampler": self.config.sampler.name,
                "pruner": self.config.pruner.name,
            }
            params = [Param(key, str(value)) for key, value in described.items()]
            client.log_batch(run.info.run_id, params=params)
            return str(run.info.run_id)

    def _close(self, logger: Any, record: dict[str, Any]) -> None:
        import time

        from mlflow.entities import Metric, RunTag

        client, run_id = logger.experiment, logger.run_id
        tags = [RunTag(f"sweeper.{key}", str(value)) for key, value in record.items()]
        metrics = []
        if "value" in record:
            now, step = int(time.time() * 1000), record.get("best_step", 0)
            metrics.append(Metric("sweeper.value", record["value"], now, step))
        client.log_batch(run_id, metrics=metrics, tags=tags)
        client.set_terminated(run_id, MLFLOW_STATUS.get(record["outcome"], "KILLED"))
        client.set_terminated(self.parent, "FINISHED")  # its end: the latest trial's


class WandbRun(_TrackedRun):
    """A run per trial in the group named after the study; the params are its config, the
    outcome its tag, and ``sweeper/outcome``, ``sweeper/stop_reason``, ``sweeper/stop_step``
    its summary."""

    def _open(self) -> Logger:
        import wandb
        from lightning.pytorch.loggers import WandbLogger

        if self.tracking.mode == "offline":
            os.environ.setdefault("WANDB_ERROR_REPORTING", "false")  # nothing leaves the machine
        return WandbLogger(
            name=self.name,
            save_dir=str(self._folder(".")),
            project=self.tracking.project or self.config.base_name,
            entity=self.tracking.entity,
            group=self.config.study.name,
            job_type="trial",
            mode=self.tracking.mode,
            config=self.params,
            settings=wandb.Settings(console="off", disable_git=True, save_code=False),
        )

    def _close(self, logger: Any, record: dict[str, Any]) -> None:
        run = logger.experiment
        run.summary.update({f"sweeper/{key}": value for key, value in record.items()})
        run.tags = (*run.tags, record["outcome"])
        run.finish(exit_code=1 if record["outcome"] == "failed" else 0)


def _section(config: StudyConfig) -> TrackingSection:
    if config.tracking is None:
        raise ValueError("the study has no [tracking] section")
    return config.tracking
