"""Conditional search spaces: ``when`` in [search], end to end and in the warm start."""

from __future__ import annotations

import csv
import datetime as dt
import io
import json
import shutil
from pathlib import Path
from typing import Any

import optuna
import pytest
from optuna.distributions import CategoricalDistribution, FloatDistribution
from optuna.trial import TrialState, create_trial
from typer.testing import CliRunner

from sweeper.cli import app
from sweeper.config import parse_config
from sweeper.nightly.night import EarlierNight, fit_to_space, warm_start
from sweeper.plugins import sampler_for
from sweeper.space import ask, parse_space
from tests.conftest import FIXTURES, StudyDir, one_line_error, run_sweeper, study

optuna.logging.set_verbosity(optuna.logging.WARNING)

runner = CliRunner()
OPTIMIZER = {"choices": ["sgd", "adam"]}
MOMENTUM = {"low": 0.0, "high": 0.99, "when": {"optimizer": "sgd"}}
LR = {"low": 1e-3, "high": 1.0, "log": True}


def conditional(**search: Any) -> dict[str, Any]:
    """The tiny study over lr, optimizer and momentum (only for sgd), with ``search`` laid over."""
    return study(search={"lr": LR, "optimizer": OPTIMIZER, "momentum": MOMENTUM, **search})


BAD_WHEN = {
    "not a table": (
        {"momentum": {**MOMENTUM, "when": "sgd"}},
        "search.momentum.when: must be a table naming a parameter with 'choices'",
    ),
    "an empty table": (
        {"momentum": {**MOMENTUM, "when": {}}},
        "search.momentum.when: must be a table",
    ),
    "an unknown parameter": (
        {"momentum": {**MOMENTUM, "when": {"optimiser": "sgd"}}},
        "search.momentum.when.optimiser: no parameter 'optimiser' in [search]; "
        "did you mean 'optimizer'?",
    ),
    "a range": (
        {"momentum": {**MOMENTUM, "when": {"lr": 0.1}}},
        "search.momentum.when.lr: lr is a range; a condition names a parameter with 'choices'",
    ),
    "a fixed value": (
        {"batch_size": 32, "momentum": {**MOMENTUM, "when": {"batch_size": 32}}},
        "search.momentum.when.batch_size: batch_size is a fixed value",
    ),
    "a value not among the choices": (
        {"momentum": {**MOMENTUM, "when": {"optimizer": ["sgd", "rmsprop"]}}},
        "search.momentum.when.optimizer: 'rmsprop' is not one of the choices of optimizer "
        "('sgd', 'adam')",
    ),
    "a value of another type": (
        {"layers": {"choices": [1, 2]}, "momentum": {**MOMENTUM, "when": {"layers": "1"}}},
        "search.momentum.when.layers: '1' is not one of the choices of layers (1, 2)",
    ),
    "an empty list": (
        {"momentum": {**MOMENTUM, "when": {"optimizer": []}}},
        "search.momentum.when.optimizer: an empty list",
    ),
    "itself": (
        {"optimizer": {**OPTIMIZER, "when": {"optimizer": "sgd"}}},
        "search.optimizer.when.optimizer: a parameter cannot depend on itself",
    ),
    "a loop": (
        {
            "a": {"choices": [1, 2], "when": {"b": 1}},
            "b": {"choices": [1, 2], "when": {"c": 2}},
            "c": {"choices": [1, 2], "when": {"a": 1}},
        },
        "search.a.when: the conditions form a loop (a -> b -> c -> a)",
    ),
    "a misspelt when": (
        {"momentum": {"low": 0.0, "high": 0.99, "wehn": {"optimizer": "sgd"}}},
        "search.momentum.wehn: unknown key; did you mean 'when'?",
    ),
}


@pytest.mark.parametrize("name", list(BAD_WHEN))
def test_a_bad_when_is_refused_and_nothing_written(study_dir: StudyDir, name: str) -> None:
    search, message = BAD_WHEN[name]
    path = study_dir.write(conditional(**search))
    result = runner.invoke(app, ["start", str(path)])
    assert result.exit_code == 2, result.output
    assert f"{path}: {message}" in " ".join(result.output.split())
    assert study_dir.created() == []


def test_the_grid_sampler_refuses_conditions_in_one_line(study_dir: StudyDir) -> None:
    data = conditional(
        lr={"low": 0.1, "high": 0.5, "step": 0.2}, momentum={**MOMENTUM, "step": 0.33}
    )
    data["sampler"] = {"name": "grid"}
    result = run_sweeper("start", str(study_dir.write(data)))
    one_line_error(
        result,
        "search.momentum.when: the grid sampler cannot search a parameter only under a condition",
        "use another sampler (tpe, random) or remove the condition",
    )
    assert study_dir.created() == []


def test_a_conditional_sweep_samples_momentum_for_sgd_only(study_dir: StudyDir) -> None:
    path = study_dir.write(conditional() | {"study": {**study()["study"], "n_trials": 8}})
    result = run_sweeper("start", str(path))
    assert result.returncode == 0, result.stdout + result.stderr
    trials = optuna.load_study(study_name="tiny", storage=f"sqlite:///{study_dir.db}").trials
    assert len(trials) == 8
    assert all(t.state in {TrialState.COMPLETE, TrialState.PRUNED} for t in trials)
    by_optimizer = {o: [t for t in trials if t.params["optimizer"] == o] for o in ("sgd", "adam")}
    assert by_optimizer["sgd"] and by_optimizer["adam"], [t.params for t in trials]
    assert all(0.0 <= t.params["momentum"] <= 0.99 for t in by_optimizer["sgd"])
    assert all(set(t.params) == {"lr", "optimizer"} for t in by_optimizer["adam"])

    rows = list(csv.DictReader(io.StringIO(run_sweeper("trials", str(path), "--csv").stdout)))
    assert {r["param_momentum"] for r in rows if r["param_optimizer"] == "adam"} == {""}
    best = json.loads(run_sweeper("best", str(path), "--json").stdout)["best"]
    assert ("momentum" in best["params"]) == (best["params"]["optimizer"] == "sgd")
    report = (study_dir.root / "tiny" / "report.html").read_text()
    assert "Parallel coordinates (momentum: conditional, charted below)" in report
    assert "momentum against outcome (trials where optimizer = &quot;sgd&quot;)" in report

    # A changed condition is a changed search space, as a changed range is.
    changed = conditional(momentum={**MOMENTUM, "when": {"optimizer": ["sgd", "adam"]}})
    again = run_sweeper("start", str(study_dir.write(changed)))
    one_line_error(
        again,
        "search: the search space changed since the study 'tiny' was created: momentum changed",
        'when={"optimizer": ["sgd"]} -> ',
        'when={"optimizer": ["adam", "sgd"]}',
    )


def test_chained_conditions_run_with_k_fold_cross_validation(study_dir: StudyDir) -> None:
    shutil.copy(FIXTURES / "scripted_task.py", study_dir.root / "scripted_task.py")
    data = study(
        study={"n_trials": 6, "keep_weights": 0},
        task={"name": "scripted_task:build"},
        trainer={"max_epochs": 2},
        search={
            "scale": {"choices": [0.5, 1.0]},
            "width": {"choices": [1, 2], "when": {"scale": 1.0}},
            "depth": {"low": 1, "high": 3, "when": {"width": 2}},
            "curve": "0.5,0.9",
        },
        pruner={"name": "none"},
        validation={"folds": 2},
        resources={"devices": "cpu", "cpu_workers": 1},
    )
    result = run_sweeper("start", str(study_dir.write(data)))
    assert result.returncode == 0, result.stdout + result.stderr
    trials = optuna.load_study(study_name="tiny", storage=f"sqlite:///{study_dir.db}").trials
    assert len(trials) == 6 and all(t.state == TrialState.COMPLETE for t in trials)
    for t in trials:
        assert len(t.user_attrs["fold_values"]) == 2
        assert ("width" in t.params) == (t.params["scale"] == 1.0), t.params
        assert ("depth" in t.params) == (t.params.get("width") == 2), t.params


def test_tpe_models_a_conditional_space_jointly_unless_the_file_says_otherwise(
    tmp_path: Path,
) -> None:
    def sampler(search: dict[str, Any], **options: Any) -> Any:
        raw = study(search=search, sampler={"name": "tpe", **options})
        return sampler_for(parse_config(raw, tmp_path / "study.toml"))

    plain = sampler({"lr": LR, "optimizer": OPTIMIZER})
    assert (plain._multivariate, plain._group) == (None, False), "Optuna's defaults, as before"
    joint = sampler({"lr": LR, "optimizer": OPTIMIZER, "momentum": MOMENTUM})
    assert (joint._multivariate, joint._group) == (True, True)
    apart = sampler({"optimizer": OPTIMIZER, "momentum": MOMENTUM}, multivariate=False)
    assert (apart._multivariate, apart._group) == (False, False)
    ungrouped = sampler({"optimizer": OPTIMIZER, "momentum": MOMENTUM}, group=False)
    assert (ungrouped._multivariate, ungrouped._group) == (True, False)


def test_a_space_without_conditions_keeps_its_fingerprint_form() -> None:
    """Studies created before conditions existed still match their unchanged files."""
    space = parse_space({"lr": LR, "optimizer": OPTIMIZER}, Path("study.toml"))
    assert set(json.loads(space.fingerprint())) == {"distributions", "fixed"}
    listed = parse_space(
        {
            "lr": LR,
            "optimizer": OPTIMIZER,
            "momentum": {**MOMENTUM, "when": {"optimizer": ["sgd"]}},
        },
        Path("study.toml"),
    )
    assert (
        listed.fingerprint()
        == parse_space(
            {"lr": LR, "optimizer": OPTIMIZER, "momentum": MOMENTUM}, Path("study.toml")
        ).fingerprint()
    ), "a single value and a list of it are the same condition"


TONIGHT = {
    "lr": LR,
    "optimizer": OPTIMIZER,
    "momentum": MOMENTUM,
    "nesterov": {"choices": [True, False], "when": {"optimizer": "sgd"}},
    "dampening": {"low": 0.0, "high": 0.5, "when": {"nesterov": False}},
}


def test_fit_to_space_drops_what_tonight_s_conditions_leave_out() -> None:
    space = parse_space(TONIGHT, Path("study.toml"))
    fitted, notes = fit_to_space(
        {"lr": 0.1, "optimizer": "adam", "momentum": 0.9, "nesterov": False, "dampening": 0.2},
        space,
    )
    assert fitted == {"lr": 0.1, "optimizer": "adam"}
    assert notes == [
        'momentum is searched only when optimizer = "sgd": dropped',
        'nesterov is searched only when optimizer = "sgd": dropped',
        "dampening is searched only when nesterov = false: dropped",
    ]
    fitted, notes = fit_to_space({"lr": 0.1, "optimizer": "sgd", "momentum": 1.5}, space)
    assert fitted == {"lr": 0.1, "optimizer": "sgd", "momentum": 0.99}
    assert notes == [
        "momentum = 1.5 clipped to 0.99",
        "nesterov, dampening not in this configuration: left to the sampler",
    ]


def test_the_warm_start_enqueues_configurations_fitted_to_tonight_s_conditions(
    tmp_path: Path,
) -> None:
    raw = study(search=TONIGHT, schedule={"warm_start_top_k": 3})
    tonight = parse_config(raw, tmp_path / "study.toml").for_night(dt.date(2026, 11, 21))
    last_night = {
        "lr": FloatDistribution(1e-3, 1.0, log=True),
        "optimizer": CategoricalDistribution(["sgd", "adam"]),
        "momentum": FloatDistribution(0.0, 0.99),
    }
    last = optuna.create_study(direction="maximize")
    for value, params in (
        (0.9, {"lr": 0.1, "optimizer": "adam", "momentum": 0.5}),
        (0.8, {"lr": 0.2, "optimizer": "sgd", "momentum": 0.7}),
        (0.7, {"lr": 0.1, "optimizer": "adam", "momentum": 0.3}),
    ):
        last.add_trial(create_trial(params=params, distributions=last_night, value=value))
    best = last.trials
    said: list[str] = []
    night = optuna.create_study(direction="maximize")
    warm_start(tonight, night, EarlierNight(dt.date(2026, 11, 20), best), said.append)
    space = parse_space(TONIGHT, tonight.path)
    asked = [ask(night, space) for _ in range(2)]
    assert asked[0].params == {"lr": 0.1, "optimizer": "adam"}
    assert {k: asked[1].params[k] for k in ("lr", "optimizer", "momentum")} == {
        "lr": 0.2,
        "optimizer": "sgd",
        "momentum": 0.7,
    }
    assert "nesterov" in asked[1].params, "a parameter tonight's conditions ask for is sampled"
    assert said == [
        "warm start: night 2026-11-20 trial 0 queued "
        '(momentum is searched only when optimizer = "sgd": dropped)',
        "warm start: night 2026-11-20 trial 1 queued "
        "(nesterov, dampening not in this configuration: left to the sampler)",
        "warm start: night 2026-11-20 trial 2: the same as one already queued once fitted: "
        "skipped",
    ]
    assert night.get_trials(states=(TrialState.WAITING,)) == []
