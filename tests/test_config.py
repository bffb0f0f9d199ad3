"""Every bad study file: one clear message naming the file and key, exit 2, nothing written."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from sweeper.cli import app
from tests.conftest import BASE, StudyDir, run_sweeper, study, toml_text

runner = CliRunner()


def start(study_dir: StudyDir, data: dict | None = None, text: str | None = None):
    path = study_dir.write(data, text)
    result = runner.invoke(app, ["start", str(path)])
    return path, result


def assert_refused(study_dir: StudyDir, result, *fragments: str) -> None:
    assert result.exit_code == 2, result.output
    message = " ".join(result.output.split())
    for fragment in fragments:
        assert fragment in message, message
    assert study_dir.created() == [], "a refused study file must not create anything"


CASES = {
    "a mistyped required key": (
        {
            **BASE,
            "study": {
                **{k: v for k, v in BASE["study"].items() if k != "n_trials"},
                "n_trails": 5,
            },
        },
        [
            "study.n_trails: unknown key; did you mean 'n_trials'?",
            "; also study.n_trials: required key is missing",
        ],
    ),
    "every problem at once": (
        study(study={"direction": "up", "n_trials": 0}, divergence={"patients": 3}),
        [
            "divergence.patients: unknown key; did you mean 'patience'?",
            "; also study.direction:",
            "'up'",
            "; also study.n_trials:",
            "greater than 0",
        ],
    ),
    "unknown key with a suggestion": (
        study(study={"n_trial": 5}),
        ["study.n_trial: unknown key; did you mean 'n_trials'?"],
    ),
    "unknown section": ({**BASE, "serach": {}}, ["serach: unknown key; did you mean 'search'?"]),
    "wrong type": (study(study={"n_trials": "ten"}), ["study.n_trials:", "'ten'"]),
    "zero trials": (study(study={"n_trials": 0}), ["study.n_trials:", "greater than 0"]),
    "bad direction": (study(study={"direction": "up"}), ["study.direction:", "'up'"]),
    "two metrics, one direction": (
        study(study={"metric": ["val_acc", "val_loss"]}),
        ["study.direction: one direction per metric", "a list of 2 directions", "'maximize'"],
    ),
    "two metrics, three directions": (
        study(
            study={"metric": ["val_acc", "val_loss"], "direction": ["maximize", "minimize"] * 2}
        ),
        ["study.direction: one direction per metric", "a list of 2 directions"],
    ),
    "one metric, a list of directions": (
        study(study={"direction": ["maximize", "minimize"]}),
        ["study.direction: one direction per metric: metric is one name"],
    ),
    "a metric listed twice": (
        study(study={"metric": ["val_acc", "val_acc"], "direction": ["maximize", "maximize"]}),
        ["study.metric: each metric once; 'val_acc' is listed more than once"],
    ),
    "an empty list of metrics": (
        study(study={"metric": [], "direction": []}),
        ["study.metric: a metric's name, or a list of 1 to 8", "(got [])"],
    ),
    "a metric that is no text": (
        study(study={"metric": ["val_acc", 3], "direction": ["maximize", "minimize"]}),
        ["study.metric: a metric's name", "(got ['val_acc', 3])"],
    ),
    "a direction of several that is no direction": (
        study(study={"metric": ["val_acc", "val_loss"], "direction": ["maximize", "down"]}),
        ['study.direction: "maximize" or "minimize", or a list of them', "'down'"],
    ),
    "CMA-ES with several metrics": (
        study(
            study={"metric": ["val_acc", "val_loss"], "direction": ["maximize", "minimize"]},
            sampler={"name": "cmaes"},
        ),
        ["sampler.name: cmaes cannot serve a study of several objectives", "choose one of tpe"],
    ),
    "Hyperband with several metrics": (
        study(
            study={"metric": ["val_acc", "val_loss"], "direction": ["maximize", "minimize"]},
            pruner={"name": "hyperband"},
        ),
        ["pruner.name: hyperband cannot serve a study of several objectives", "median"],
    ),
    "confirm with several metrics": (
        study(
            study={"metric": ["val_acc", "val_loss"], "direction": ["maximize", "minimize"]},
            confirm={"top_k": 2, "seeds": 2},
        ),
        ["confirm: [confirm] chooses one best configuration", "Pareto front"],
    ),
    "missing study key": (
        {**BASE, "study": {k: v for k, v in BASE["study"].items() if k != "metric"}},
        ["study.metric: required key is missing"],
    ),
    "missing section": (study(search=None), ["search: required key is missing"]),
    "low above high": (
        study(search={"lr": {"low": 1.0, "high": 0.1}}),
        ["search.lr: low must be below high, got low=1.0 and high=0.1"],
    ),
    "low equals high": (study(search={"lr": {"low": 1, "high": 1}}), ["search.lr: low must be"]),
    "log with low at zero": (
        study(search={"lr": {"low": 0.0, "high": 1.0, "log": True}}),
        ["search.lr: a log range needs low > 0, got low=0.0"],
    ),
    "empty choices": (
        study(search={"opt": {"choices": []}}),
        ["search.opt.choices: must be a non-empty list"],
    ),
    "unknown range key": (
        study(search={"lr": {"low": 0.1, "hihg": 1.0}}),
        ["search.lr.hihg: unknown key; did you mean 'high'?"],
    ),
    "missing high": (study(search={"lr": {"low": 0.1}}), ["search.lr:", "'high' is missing"]),
    "text bound": (
        study(search={"lr": {"low": "a", "high": 1.0}}),
        ["search.lr.low: must be a number"],
    ),
    "step with log": (
        study(search={"lr": {"low": 0.1, "high": 1.0, "log": True, "step": 0.1}}),
        ["search.lr: 'step' and 'log = true' cannot be used together"],
    ),
    "only fixed values": (study(search={"batch_size": 8}), ["search: nothing to search"]),
    "unknown sampler": (
        study(sampler={"name": "tpee"}),
        ["sampler.name: unknown sampler 'tpee'; did you mean 'tpe'?"],
    ),
    "unknown pruner": (
        study(pruner={"name": "medain"}),
        ["pruner.name: unknown pruner 'medain'; did you mean 'median'?"],
    ),
    "unknown sampler option": (
        study(sampler={"name": "tpe", "n_startup": 3}),
        ["sampler.n_startup: not an option of TPESampler", "did you mean 'n_startup_trials'?"],
    ),
    "bad pruner option value": (
        study(pruner={"name": "percentile", "percentile": 250.0}),
        ["pruner.percentile: Percentile must be between 0 and 100"],
    ),
    "grid without steps": (
        study(sampler={"name": "grid"}, search={"lr": {"low": 0.1, "high": 1.0}}),
        ["search.lr: the grid sampler needs a finite set of values"],
    ),
    "divergence factor too small": (
        study(divergence={"factor": 1.0}),
        ["divergence.factor:", "greater than 1"],
    ),
    "divergence key misspelt": (
        study(divergence={"patients": 3}),
        ["divergence.patients: unknown key; did you mean 'patience'?"],
    ),
    "schedule cron invalid": (
        study(schedule={"cron": "0 25 * * *"}),
        ["schedule.cron: not a valid cron expression: '0 25 * * *'"],
    ),
    "schedule time zone unknown": (
        study(schedule={"timezone": "Mars/Olympus"}),
        ["schedule.timezone: unknown time zone 'Mars/Olympus'"],
    ),
    "schedule notify not http": (
        study(schedule={"notify": "ftp://example.org/hook"}),
        ["schedule.notify: must be an http:// or https:// URL"],
    ),
    "schedule top k negative": (
        study(schedule={"warm_start_top_k": -1}),
        ["schedule.warm_start_top_k:", "greater than or equal to 0"],
    ),
    "schedule key misspelt": (
        study(schedule={"regression_tolerence": 0.1}),
        ["schedule.regression_tolerence: unknown key; did you mean 'regression_tolerance'?"],
    ),
    "audit step out of range": (
        study(audit={"max_metric_step": 0}),
        ["audit.max_metric_step:", "greater than 0"],
    ),
    "audit key misspelt": (
        study(audit={"min_examples": 5}),
        ["audit.min_examples: unknown key; did you mean 'min_examples_per_class'?"],
    ),
    "validation folds zero": (
        study(validation={"folds": 0}),
        ["validation.folds:", "greater than or equal to 1"],
    ),
    "keep_weights negative": (
        study(study={"keep_weights": -1}),
        ["study.keep_weights:", "greater than or equal to 0"],
    ),
    "internal key in the file": (study(night={"x": 1}), ["night: unknown key"]),
    "bad devices": (study(resources={"devices": "gpu"}), ["resources.devices: must be"]),
    "missing GPU": (
        study(resources={"devices": [3]}),
        ["resources.devices: GPU 3 does not exist"],
    ),
    "task without function": (
        study(task={"name": "tiny_task"}),
        ["task.name: 'tiny_task' is neither 'module:function'"],
    ),
    "task not found": (
        study(task={"name": "no_such_module:build"}),
        ["task.name: no module 'no_such_module' next to the study file"],
    ),
    "task function missing": (
        study(task={"name": "tiny_task:nothing"}),
        ["task.name: module 'tiny_task' has no function 'nothing'"],
    ),
    "custom task option": (
        study(task={"name": "tiny_task:build", "model": "x"}),
        ["task.model: unknown key"],
    ),
    "unknown trainer option": (
        study(trainer={"max_epoch": 3}),
        ["trainer.max_epoch: not an option of lightning.Trainer", "did you mean 'max_epochs'?"],
    ),
    "trainer option sweeper sets": (
        study(trainer={"devices": 2}),
        ["trainer.devices: set by [resources] devices"],
    ),
}


@pytest.mark.parametrize("name", list(CASES))
def test_bad_study_file_is_refused(study_dir: StudyDir, name: str) -> None:
    data, fragments = CASES[name]
    path, result = start(study_dir, data)
    assert_refused(study_dir, result, str(path), *fragments)


def test_toml_syntax_error_shows_its_line(study_dir: StudyDir) -> None:
    text = toml_text(BASE).replace("n_trials = 6", "n_trials = = 6")
    line = text.splitlines().index("n_trials = = 6") + 1
    path, result = start(study_dir, text=text)
    assert_refused(study_dir, result, str(path), "invalid TOML", f"line {line}")


def test_missing_study_file(study_dir: StudyDir) -> None:
    result = runner.invoke(app, ["start", str(study_dir.root / "nope.toml")])
    assert_refused(study_dir, result, "nope.toml: no such study file")


def test_task_that_fails_to_import(study_dir: StudyDir) -> None:
    (study_dir.root / "broken_task.py").write_text("raise RuntimeError('no data folder')\n")
    _, result = start(study_dir, study(task={"name": "broken_task:build"}))
    assert_refused(
        study_dir,
        result,
        "task.name: importing 'broken_task' failed",
        "RuntimeError: no data folder",
    )


def test_bad_n_trials_override(study_dir: StudyDir) -> None:
    path = study_dir.write(BASE)
    result = runner.invoke(app, ["start", str(path), "--n-trials", "0"])
    assert_refused(study_dir, result, "--n-trials must be at least 1")


def test_check_accepts_a_good_file_and_writes_nothing(study_dir: StudyDir) -> None:
    path = study_dir.write(BASE)
    result = runner.invoke(app, ["check", str(path)])
    assert result.exit_code == 0, result.output
    assert "ok; 2 slot(s) on cpu" in result.output
    assert study_dir.created() == []


def test_trainer_options_lightning_accepts_are_accepted(study_dir: StudyDir) -> None:
    trainer = {
        "max_epochs": 2,
        "default_root_dir": "runs",
        "precision": "16-mixed",
        "gradient_clip_val": 1,
        "deterministic": "warn",
    }
    path = study_dir.write(study(trainer=trainer))
    result = runner.invoke(app, ["check", str(path)])
    assert result.exit_code == 0, result.output
    assert result.stderr == "", "the stand-in Trainer of the check says nothing"
    assert study_dir.created() == []


def test_example_studies_are_valid() -> None:
    from pathlib import Path

    for path in sorted((Path(__file__).parent.parent / "studies").glob("*.toml")):
        result = runner.invoke(app, ["check", str(path)])
        assert result.exit_code == 0, f"{path}: {result.output}"


def refused_for_real(study_dir: StudyDir, path, *fragments: str) -> None:
    """``sweeper check`` and ``sweeper start`` in a process of their own: exit 2, one line on
    stderr naming the file and the key, no traceback, nothing written."""
    for command in ("check", "start"):
        result = run_sweeper(command, str(path), timeout=120)
        lines = result.stderr.splitlines()
        assert result.returncode == 2, (command, result.stdout, result.stderr)
        assert len(lines) == 1 and "Traceback" not in result.stderr, (command, result.stderr)
        assert "s3cret" not in result.stderr, "a password must not be shown"
        assert lines[0].startswith(f"error: {path}: "), lines[0]
        for fragment in fragments:
            assert fragment in lines[0], (command, lines[0])
        assert study_dir.created() == [], command


HOSTILE = {
    "n_trials true": (
        study(study={"n_trials": True}),
        ["study.n_trials: Input should be a valid integer (got True)"],
    ),
    "n_trials as text": (
        study(study={"n_trials": "3"}),
        ["study.n_trials: Input should be a valid integer (got '3')"],
    ),
    "boolean as a number": (
        study(divergence={"enabled": 1}),
        ["divergence.enabled: Input should be a valid boolean (got 1)"],
    ),
    "float as text": (
        study(divergence={"factor": "4.0"}),
        ["divergence.factor: Input should be a valid number (got '4.0')"],
    ),
    "sampler option of the wrong type": (
        study(sampler={"name": "tpe", "n_startup_trials": "x"}),
        ["sampler.n_startup_trials: must be a whole number (the default is 10), got 'x'"],
    ),
    "sampler option read only after the start-up trials": (
        study(sampler={"name": "tpe", "n_startup_trials": 2, "n_ei_candidates": 0}),
        ["sampler.n_ei_candidates:"],
    ),
    "pruner option of the wrong type": (
        study(pruner={"name": "median", "n_warmup_steps": "x"}),
        ["pruner.n_warmup_steps: must be a whole number (the default is 0), got 'x'"],
    ),
    "pruner option without a default, of the wrong type": (
        study(pruner={"name": "percentile", "percentile": "x", "n_warmup_steps": 1}),
        ["pruner.percentile: must be a number, got 'x'"],
    ),
    "sampler option annotated but defaulting to None": (
        study(sampler={"name": "tpe", "multivariate": "yes"}),
        ["sampler.multivariate: must be true or false, got 'yes'"],
    ),
    "negative count": (
        study(sampler={"name": "tpe", "n_startup_trials": -3}),
        ["sampler.n_startup_trials: a count, 0 or more, got -3"],
    ),
    "step larger than its range": (
        study(search={**BASE["search"], "hidden": {"low": 4, "high": 32, "step": 64}}),
        ["search.hidden.step: 64 is larger than the range from 4 to 32"],
    ),
    "in-memory storage": (
        study(study={"storage": "sqlite://"}),
        ["study.storage: an in-memory SQLite database cannot be shared by workers"],
    ),
    "in-memory storage by name": (
        study(study={"storage": "sqlite:///:memory:"}),
        ["study.storage: an in-memory SQLite database"],
    ),
    "storage that is no URL": (
        study(study={"storage": "postgres at db.example.org"}),
        ["study.storage: not a database URL"],
    ),
    "storage of an unknown database": (
        study(study={"storage": "oracel://db.example.org/sweeps"}),
        ["study.storage: unknown database 'oracel'"],
    ),
    "name with the nightly '@'": (
        study(study={"name": "tiny@2024-05-01"}),
        ["study.name: '@' is kept for the studies of nights"],
    ),
    "name too long for a file": (
        study(study={"name": "n" * 250}),
        ["study.name: at most 100 characters", "got 250"],
    ),
    "notify with user and password": (
        study(schedule={"notify": "https://bot:s3cret@hooks.example.org/sweeps"}),
        ["schedule.notify: a user or password in the URL", "put the token in the path or query"],
    ),
    "huge integer": (
        study(resources={"devices": "cpu", "cpu_workers": 10**30}),
        ["resources.cpu_workers: 1000000000000000000000000000000 is out of range"],
    ),
    "empty list of GPUs": (
        study(resources={"devices": []}),
        ['resources.devices: must be "auto", "cpu" or a non-empty list of GPU indices'],
    ),
    "time zone too long for a file name": (
        study(schedule={"timezone": "Z" * 300}),
        ["schedule.timezone: unknown time zone 'ZZZ"],
    ),
    "negative seed": (study(study={"seed": -1}), ["study.seed: Input should be greater"]),
    "trainer precision Lightning does not know": (
        study(trainer={"precision": "bogus"}),
        ["trainer.precision: 'bogus' is not one of", "'bf16-mixed'"],
    ),
    "trainer value Lightning refuses": (
        study(trainer={"max_epochs": -5}),
        ["trainer.max_epochs: `max_epochs` must be a non-negative integer or -1"],
    ),
    "nan bound": (
        study(search={**BASE["search"], "lr": {"low": float("nan"), "high": 1.0}}),
        ["search.lr.low: must be a number, got nan"],
    ),
}


@pytest.mark.parametrize("name", list(HOSTILE))
def test_hostile_study_file_is_refused_by_check_and_start(study_dir: StudyDir, name: str) -> None:
    data, fragments = HOSTILE[name]
    path = study_dir.write(data)
    refused_for_real(study_dir, path, *fragments)


HOSTILE_TEXT = {
    "not UTF-8": (
        toml_text(BASE).encode().replace(b'name = "tiny"', b'name = "tiny" # caf\xe9'),
        ["not UTF-8 text (byte", "line 2"],
    ),
    "integer too long to read": (
        toml_text(BASE).replace("n_trials = 6", "n_trials = " + "9" * 5000).encode(),
        ["invalid TOML: a number too long to read"],
    ),
    "arrays nested too deeply": (
        (toml_text(BASE) + "\n[trainer.x]\ny = " + "[" * 5000 + "]" * 5000 + "\n").encode(),
        ["invalid TOML: arrays or tables nested too deeply"],
    ),
}


@pytest.mark.parametrize("name", list(HOSTILE_TEXT))
def test_unreadable_study_file_is_refused(study_dir: StudyDir, name: str) -> None:
    data, fragments = HOSTILE_TEXT[name]
    path = study_dir.write(BASE)
    path.write_bytes(data)
    refused_for_real(study_dir, path, *fragments)


def test_utf8_with_a_byte_order_mark_is_read(study_dir: StudyDir) -> None:
    path = study_dir.write(BASE)
    path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())
    result = runner.invoke(app, ["check", str(path)])
    assert result.exit_code == 0, result.output


def test_a_relative_sqlite_storage_is_next_to_the_study_file(study_dir: StudyDir) -> None:
    from sweeper.config import load_config

    config = load_config(study_dir.write(study(study={"storage": "sqlite:///dbs/s.db?timeout=5"})))
    assert config.storage_url == f"sqlite:///{study_dir.root.resolve()}/dbs/s.db?timeout=5"


def test_n_trials_override_on_a_study_that_is_not_a_table(study_dir: StudyDir) -> None:
    rest = {key: value for key, value in BASE.items() if key != "study"}
    path = study_dir.write(text="study = 3\n" + toml_text(rest))
    result = runner.invoke(app, ["start", str(path), "--n-trials", "2"])
    assert_refused(study_dir, result, "study: Input should be a valid dictionary")


def test_an_endless_file_is_not_read_to_the_end() -> None:
    result = runner.invoke(app, ["check", "/dev/zero"])
    assert result.exit_code == 2
    assert result.stderr == "error: /dev/zero: larger than 1 MiB; not a study file\n"


def test_a_refused_webhook_url_never_shows_its_token(study_dir: StudyDir) -> None:
    path = study_dir.write(study(schedule={"notify": "ftp://hooks.example.org/T0KEN-s3cret"}))
    result = run_sweeper("check", str(path))
    assert result.returncode == 2, result.stdout + result.stderr
    assert "schedule.notify: must be an http:// or https:// URL, got 'ftp://'" in result.stderr
    assert "s3cret" not in result.stderr
