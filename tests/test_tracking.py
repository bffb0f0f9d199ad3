"""``[tracking]``: real sweeps of the tiny task read back from TensorBoard's event files,
MLflow's store and W&B's offline run files, each with the tracker's own library; and the
study files it refuses.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import time
from pathlib import Path
from typing import Any

import optuna
import pytest
from optuna.trial import FrozenTrial, TrialState
from typer.testing import CliRunner

from sweeper.cli import app
from sweeper.config import load_config
from sweeper.run.tracking import outcome, trial_run
from tests.conftest import StudyDir, one_line_error, run_sweeper, study, sweeper_cmd
from tests.test_folds import scripted
from tests.test_fuzz import FULL, assert_refused, bad_values

runner = CliRunner()

SWEEP = study(
    study={"n_trials": 6, "seed": 3},
    search={
        "lr": {"low": 0.01, "high": 1000.0, "log": True},
        "hidden": {"low": 4, "high": 32, "step": 4},
    },
    sampler={"name": "random"},
    pruner={"name": "threshold", "lower": 0.6},
    divergence={"patience": 2},
)
"""Six trials of the tiny task: high learning rates diverge, low ones stay below the
threshold pruner's 0.6 at their first validation and are pruned, the rest complete."""


def expected_outcome(trial: FrozenTrial) -> str:
    """The outcome a tracker should show, read from the stop reason the study keeps."""
    reason = trial.user_attrs["stop_reason"]
    if reason == "completed":
        return "complete"
    if reason == "early-stopped":
        return "early-stopped"
    if reason.startswith("diverged:"):
        return "diverged"
    if reason.startswith("pruned by "):
        return "pruned"
    return "failed"


def swept(root: Path, tracking: dict[str, Any]) -> list[FrozenTrial]:
    """Run the sweep with ``tracking`` for real; the study's finished trials."""
    study_dir = StudyDir(root)
    path = study_dir.write({**SWEEP, "tracking": tracking})
    result = run_sweeper("start", str(path))
    assert result.returncode == 0, result.stdout + result.stderr
    trials = optuna.load_study(study_name="tiny", storage=f"sqlite:///{study_dir.db}").get_trials()
    outcomes = {expected_outcome(t) for t in trials}
    assert {"complete", "pruned", "diverged"} <= outcomes, [
        t.user_attrs["stop_reason"] for t in trials
    ]
    return trials


def stop_step(trial: FrozenTrial) -> int:
    return int(trial.user_attrs.get("stop_step", trial.user_attrs["steps"]))


# TensorBoard


@pytest.fixture(scope="module")
def tensorboard_sweep(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[FrozenTrial]]:
    root = tmp_path_factory.mktemp("tensorboard")
    return root, swept(root, {"backend": "tensorboard"})


def test_tensorboard_has_a_run_per_trial_with_params_and_outcome(
    tensorboard_sweep: tuple[Path, list[FrozenTrial]],
) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    root, trials = tensorboard_sweep
    runs = root / "tensorboard" / "tiny"
    assert sorted(p.name for p in runs.iterdir()) == sorted(f"trial-{t.number}" for t in trials)
    for trial in trials:
        events = EventAccumulator(str(runs / f"trial-{trial.number}"))
        events.Reload()
        texts = {
            tag.removesuffix("/text_summary"): events.Tensors(tag)[-1]
            for tag in events.Tags()["tensors"]
            if tag.endswith("/text_summary")
        }
        shown = texts["sweeper/outcome"]
        assert shown.tensor_proto.string_val == [expected_outcome(trial).encode()]
        assert shown.step == stop_step(trial)
        reason = texts["sweeper/stop_reason"].tensor_proto.string_val[0].decode()
        assert reason == trial.user_attrs["stop_reason"]
        if "divergence_onset" in trial.user_attrs:
            assert texts["sweeper/divergence_onset"].step == trial.user_attrs["divergence_onset"]
        hparams = [
            plugin_data_pb2.HParamsPluginData.FromString(content)
            for content in events.PluginTagToContent("hparams").values()
        ]
        (started,) = [h.session_start_info for h in hparams if h.HasField("session_start_info")]
        assert {k: v.number_value for k, v in started.hparams.items()} == pytest.approx(
            trial.params
        )
        logged = events.Tags()["scalars"]
        if trial.user_attrs.get("history", []):
            assert "val_acc" in logged
        if trial.state == TrialState.COMPLETE:
            (value,) = events.Scalars("sweeper/value")
            assert value.value == pytest.approx(trial.value)
            assert value.step == trial.user_attrs["best_step"]


# MLflow


@pytest.fixture(scope="module")
def mlflow_sweep(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[FrozenTrial]]:
    root = tmp_path_factory.mktemp("mlflow")
    return root, swept(root, {"backend": "mlflow", "tracking_uri": "sqlite:///runs.db"})


def test_mlflow_nests_a_run_per_trial_under_the_study_run(
    mlflow_sweep: tuple[Path, list[FrozenTrial]],
) -> None:
    from mlflow import MlflowClient

    root, trials = mlflow_sweep
    client = MlflowClient(f"sqlite:///{root / 'runs.db'}")
    experiment = client.get_experiment_by_name("tiny")
    assert experiment is not None
    runs = client.search_runs([experiment.experiment_id])
    (parent,) = [r for r in runs if r.data.tags.get("sweeper.role") == "study"]
    assert parent.info.run_name == "tiny"
    assert parent.data.params["metric"] == "val_acc"
    children = {r.info.run_name: r for r in runs if r is not parent}
    assert sorted(children) == sorted(f"tiny/trial-{t.number}" for t in trials)
    statuses = {"complete": "FINISHED", "pruned": "KILLED", "diverged": "KILLED"}
    for trial in trials:
        run = children[f"tiny/trial-{trial.number}"]
        tags = run.data.tags
        assert tags["mlflow.parentRunId"] == parent.info.run_id
        assert run.data.params == {k: str(v) for k, v in trial.params.items()}
        assert tags["sweeper.outcome"] == expected_outcome(trial)
        assert tags["sweeper.stop_reason"] == trial.user_attrs["stop_reason"]
        assert run.info.status == statuses[expected_outcome(trial)]
        if trial.state != TrialState.COMPLETE:
            assert tags["sweeper.stop_step"] == str(trial.user_attrs["stop_step"])
        if "divergence_onset" in trial.user_attrs:
            assert tags["sweeper.divergence_onset"] == str(trial.user_attrs["divergence_onset"])
        history = client.get_metric_history(run.info.run_id, "val_acc")
        assert [m.value for m in history] == pytest.approx(
            [r["val_acc"] for r in trial.user_attrs.get("history", [])]
        )
        if trial.state == TrialState.COMPLETE:
            assert run.data.metrics["sweeper.value"] == pytest.approx(trial.value)


def test_a_cross_validated_trial_is_one_run_across_its_folds(study_dir: StudyDir) -> None:
    from mlflow import MlflowClient

    path = scripted(study_dir, tracking={"backend": "mlflow"})
    result = run_sweeper("start", str(path))
    assert result.returncode == 0, result.stdout + result.stderr
    client = MlflowClient(f"sqlite:///{study_dir.root / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("tiny")
    assert experiment is not None
    runs = client.search_runs([experiment.experiment_id])
    by_scale = {r.data.params["scale"]: r for r in runs if "sweeper.trial" in r.data.tags}
    assert sorted(by_scale) == ["0.5", "1.0"]
    good, bad = by_scale["1.0"], by_scale["0.5"]
    assert good.data.params == {"scale": "1.0", "curve": "0.5,0.9,0.8"}
    assert good.data.tags["sweeper.outcome"] == "complete"
    assert good.data.metrics["sweeper.value"] == pytest.approx(0.9)
    assert len(client.get_metric_history(good.info.run_id, "val_acc")) == 3 * 3
    assert bad.data.tags["sweeper.outcome"] == "pruned"
    assert bad.data.tags["sweeper.stop_reason"] == "pruned by threshold after fold 1 of 3"


# W&B


def wandb_records(path: Path) -> list[Any]:
    """The records of a W&B run file (``run-<id>.wandb``), parsed with W&B's own protobuf.

    The file is W&B's header (``:W&B``, magic, version) then a LevelDB log: 32 KiB
    blocks of chunks, each a 7-byte header (CRC, length, type) and its bytes.
    """
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B", path
    block, position, pending, records = 32768, 7, b"", []
    while position + 7 <= len(data):
        left = block - position % block
        _, length, kind = struct.unpack("<IHB", data[position : position + 7])
        if left < 7 or (length == 0 and kind == 0):  # the rest of the block is padding
            position += left
            continue
        pending += data[position + 7 : position + 7 + length]
        position += 7 + length
        if kind in (1, 4):  # FULL or LAST: a whole record
            record = wandb_internal_pb2.Record()  # type: ignore[attr-defined]
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def wandb_run(folder: Path) -> dict[str, Any]:
    """What an offline run holds: name, group, job type, tags, config, summary, exit code."""
    (file,) = folder.glob("run-*.wandb")
    found: dict[str, Any] = {"config": {}, "summary": {}}
    for record in wandb_records(file):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            found.update(
                name=record.run.display_name,
                group=record.run.run_group,
                job_type=record.run.job_type,
                project=record.run.project,
                tags=list(record.run.tags),
            )
            for item in record.run.config.update:
                found["config"][item.key] = json.loads(item.value_json)
        elif kind == "summary":
            for item in record.summary.update:
                key = item.key or "/".join(item.nested_key)
                found["summary"][key] = json.loads(item.value_json)
        elif kind == "exit":
            found["exit_code"] = record.exit.exit_code
    return found


@pytest.fixture(scope="module")
def wandb_sweep(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[FrozenTrial]]:
    root = tmp_path_factory.mktemp("wandb")
    return root, swept(root, {"backend": "wandb", "mode": "offline", "dir": "tracked"})


def test_wandb_offline_runs_are_grouped_by_study_with_outcome_in_summary(
    wandb_sweep: tuple[Path, list[FrozenTrial]],
) -> None:
    root, trials = wandb_sweep
    folders = sorted((root / "tracked" / "wandb").glob("offline-run-*"))
    runs = {run["name"]: run for run in map(wandb_run, folders)}
    assert sorted(runs) == sorted(f"tiny/trial-{t.number}" for t in trials)
    for trial in trials:
        run = runs[f"tiny/trial-{trial.number}"]
        assert (run["project"], run["group"], run["job_type"]) == ("tiny", "tiny", "trial")
        config = {k: v for k, v in run["config"].items() if k != "_wandb"}
        assert config == pytest.approx(trial.params)
        summary = run["summary"]
        assert summary["sweeper/outcome"] == expected_outcome(trial)
        assert expected_outcome(trial) in run["tags"]
        assert summary["sweeper/stop_reason"] == trial.user_attrs["stop_reason"]
        if trial.state != TrialState.COMPLETE:
            assert summary["sweeper/stop_step"] == trial.user_attrs["stop_step"]
        else:
            assert summary["sweeper/value"] == pytest.approx(trial.value)
        if trial.user_attrs.get("history", []):
            assert "val_acc" in summary
        assert run["exit_code"] == 0


# A trial that fails before it trains still has its run, marked failed


@pytest.mark.parametrize("backend", ["tensorboard", "mlflow", "wandb"])
def test_a_trial_failing_before_training_gets_a_failed_run(
    study_dir: StudyDir, backend: str
) -> None:
    config = load_config(study_dir.write(study(tracking={"backend": backend})))
    run = trial_run(config, 7, {"lr": 0.1, "hidden": 8})
    attrs = {"stop_reason": "error: ValueError: this task always fails"}
    run.ended(TrialState.FAIL, None, attrs)
    if backend == "tensorboard":
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        events = EventAccumulator(str(study_dir.root / "tensorboard" / "tiny" / "trial-7"))
        events.Reload()
        (shown,) = events.Tensors("sweeper/outcome/text_summary")
        assert shown.tensor_proto.string_val == [b"failed"]
    elif backend == "mlflow":
        from mlflow import MlflowClient

        client = MlflowClient(f"sqlite:///{study_dir.root / 'mlflow.db'}")
        (found,) = client.search_runs(
            [client.get_experiment_by_name("tiny").experiment_id],  # type: ignore[union-attr]
            "tags.`sweeper.trial` = '7'",
        )
        assert found.info.status == "FAILED"
        assert found.data.tags["sweeper.stop_reason"] == attrs["stop_reason"]
    else:
        (folder,) = (study_dir.root / "wandb").glob("offline-run-*")
        offline = wandb_run(folder)
        assert offline["summary"]["sweeper/outcome"] == "failed"
        assert offline["exit_code"] == 1


@pytest.mark.parametrize(
    ("state", "attrs", "expected"),
    [
        (TrialState.COMPLETE, {"stop_reason": "completed"}, "complete"),
        (TrialState.COMPLETE, {"stop_reason": "early-stopped"}, "early-stopped"),
        (TrialState.PRUNED, {"stop_reason": "pruned by median at step 4"}, "pruned"),
        (
            TrialState.PRUNED,
            {"stop_reason": "diverged: loss=nan at step 3", "diverged": True},
            "diverged",
        ),
        (TrialState.FAIL, {"stop_reason": "error: ValueError: x"}, "failed"),
    ],
)
def test_outcome_names_how_a_trial_ended(
    state: TrialState, attrs: dict[str, Any], expected: str
) -> None:
    assert outcome(state, attrs) == expected


# Study files refused


def check(study_dir: StudyDir, tracking: Any) -> tuple[Path, Any]:
    path = study_dir.write({**study(), "tracking": tracking})
    return path, runner.invoke(app, ["check", str(path)])


@pytest.mark.parametrize(
    ("tracking", "named", "says"),
    [
        ({"backend": "neptune"}, "tracking.backend", "'tensorboard', 'mlflow' or 'wandb'"),
        ({"dir": "runs"}, "tracking.backend", "required key is missing"),
        ({"backend": "tensorboard", "project": "p"}, "tracking.project", "an option of wandb"),
        ({"backend": "mlflow", "dir": "runs"}, "tracking.dir", "of tensorboard and wandb"),
        (
            {"backend": "wandb", "tracking_uri": "sqlite:///m.db"},
            "tracking.tracking_uri",
            "mlflow",
        ),
        ({"backend": "mlflow", "trackinguri": "x"}, "tracking.trackinguri", "'tracking_uri'"),
        ({"backend": "mlflow", "tracking_uri": "mlruns"}, "tracking.tracking_uri", "a scheme"),
        ({"backend": "mlflow", "tracking_uri": "env:1BAD"}, "tracking.tracking_uri", "env:"),
        ({"backend": "wandb", "mode": "dryrun"}, "tracking.mode", "'offline' or 'online'"),
        ({"backend": "wandb", "project": "a/b"}, "tracking.project", "W&B names"),
        ("mlflow", "tracking", "valid dictionary"),
    ],
)
def test_a_bad_tracking_section_is_refused(
    study_dir: StudyDir, tracking: Any, named: str, says: str
) -> None:
    path, result = check(study_dir, tracking)
    assert_refused(study_dir, path, named, result.exit_code, result.stderr, 0.0)
    assert says in result.stderr


TRACKING_KEYS = {
    "backend": "mlflow",
    "dir": "runs",
    "tracking_uri": "sqlite:///mlflow.db",
    "experiment": "tiny",
    "project": "tiny",
    "entity": "team",
    "mode": "offline",
}


@pytest.mark.parametrize("key", list(TRACKING_KEYS))
def test_every_tracking_key_refuses_hostile_values(study_dir: StudyDir, key: str) -> None:
    backend = {"dir": "wandb", "project": "wandb", "entity": "wandb", "mode": "wandb"}
    base = {"backend": backend.get(key, "mlflow")}
    for value in bad_values(TRACKING_KEYS[key], in_search=False):
        path = study_dir.write({**FULL, "tracking": {**base, key: value}})
        began = time.monotonic()
        result = runner.invoke(app, ["check", str(path)])
        seconds = time.monotonic() - began
        assert_refused(
            study_dir, path, f"tracking.{key}", result.exit_code, result.stderr, seconds
        )


@pytest.mark.parametrize(
    "tracking",
    [
        {"backend": "tensorboard", "dir": "runs"},
        {"backend": "mlflow", "tracking_uri": "sqlite:///runs.db", "experiment": "e"},
        {"backend": "wandb", "project": "p", "entity": "team", "mode": "online", "dir": "runs"},
    ],
)
def test_check_accepts_each_backend_and_writes_nothing(
    study_dir: StudyDir, tracking: dict[str, Any]
) -> None:
    _, result = check(study_dir, tracking)
    assert result.exit_code == 0, result.output
    assert study_dir.created() == []


def test_trainer_logger_points_to_tracking(study_dir: StudyDir) -> None:
    path = study_dir.write(study(trainer={"logger": True}))
    result = runner.invoke(app, ["check", str(path)])
    assert_refused(study_dir, path, "trainer.logger", result.exit_code, result.stderr, 0.0)
    assert "[tracking]" in result.stderr


def test_an_unset_tracking_uri_variable_is_refused(
    study_dir: StudyDir, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("SWEEPER_TEST_MLFLOW_URI", raising=False)
    tracking = {"backend": "mlflow", "tracking_uri": "env:SWEEPER_TEST_MLFLOW_URI"}
    path, result = check(study_dir, tracking)
    assert_refused(study_dir, path, "tracking.tracking_uri", result.exit_code, result.stderr, 0.0)
    assert "SWEEPER_TEST_MLFLOW_URI is not set" in result.stderr


BLOCKER = """\
import sys


class Blocker:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == {module!r}:
            raise ModuleNotFoundError(f"No module named {{name!r}}")
        return None


sys.meta_path.insert(0, Blocker())
"""


@pytest.mark.parametrize("backend", ["tensorboard", "mlflow", "wandb"])
@pytest.mark.parametrize("command", ["check", "start"])
def test_a_backend_not_installed_is_refused_with_its_pip_install(
    study_dir: StudyDir, tmp_path_factory: pytest.TempPathFactory, backend: str, command: str
) -> None:
    blocked = tmp_path_factory.mktemp("blocked")
    (blocked / "sitecustomize.py").write_text(BLOCKER.format(module=backend))
    path = study_dir.write(study(tracking={"backend": backend}))
    env = {**os.environ, "PYTHONPATH": str(blocked)}
    result = subprocess.run(
        sweeper_cmd(command, str(path)), capture_output=True, text=True, timeout=120, env=env
    )
    one_line_error(
        result, f"{path}: tracking.backend: {backend} is not installed", f"'sweeper[{backend}]'"
    )
    assert study_dir.created() == []
