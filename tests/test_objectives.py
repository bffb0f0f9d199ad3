"""Several objectives: a Pareto front, still pruned on the first metric; what they refuse."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from sweeper.store.pruning import REPORTED, FirstObjective, report, with_reported
from tests.browser import page, screenshot
from tests.conftest import StudyDir, one_line_error, run_sweeper, study
from tests.test_folds import scripted
from tests.test_views import dashboard

TWO = {"metric": ["val_acc", "val_size"], "direction": ["maximize", "minimize"]}


SEARCH = {
    "lr": {"low": 1e-3, "high": 1.0, "log": True},
    "hidden": {"low": 4, "high": 32, "step": 4},
    "size": "params",
}


def two_metrics(study_dir: StudyDir, n_trials: int = 10, **sections: object) -> Path:
    data = study(
        **{
            "study": {**TWO, "n_trials": n_trials},
            "trainer": {"max_epochs": 3, "val_check_interval": 0.5},
            "search": SEARCH,
            "sampler": {"name": "tpe", "n_startup_trials": 3},
            "pruner": {"name": "median", "n_startup_trials": 2},
            **sections,
        }
    )
    return study_dir.write(data)


def dominated(values: list[float], other: list[float]) -> bool:
    """``other`` is at least as good on both metrics (acc up, size down) and better on one."""
    return (
        other[0] >= values[0]
        and other[1] <= values[1]
        and (other[0] > values[0] or other[1] < values[1])
    )


def test_a_sweep_of_two_metrics_is_pruned_and_ends_with_its_pareto_front(
    study_dir: StudyDir,
) -> None:
    path = two_metrics(study_dir)
    result = run_sweeper("start", str(path))
    assert result.returncode == 0, result.stdout + result.stderr
    loaded = optuna.load_study(study_name="tiny", storage=f"sqlite:///{study_dir.db}")
    assert [d.name for d in loaded.directions] == ["MAXIMIZE", "MINIMIZE"]
    assert loaded.metric_names == ["val_acc", "val_size"]
    trials = loaded.trials
    assert sum(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in trials) == 10
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    pruned = [t for t in trials if t.state == TrialState.PRUNED]
    # the median pruner watched val_acc, although Optuna's report refuses such a study
    assert pruned, [t.user_attrs["stop_reason"] for t in trials]
    assert all(t.user_attrs["stop_reason"].startswith("pruned by median at step") for t in pruned)
    for trial in trials:
        kept = trial.user_attrs[REPORTED]
        acc = [r["val_acc"] for r in trial.user_attrs["history"]]
        assert [value for _, value in kept] == pytest.approx(acc)
        assert trial.intermediate_values == {}  # TPE would rank pruned trials by these
    for trial in complete:
        hidden = trial.params["hidden"]
        assert trial.values[1] == 8 * hidden + hidden + 2 * hidden + 2  # the model's size
    front = [t for t in complete if not any(dominated(t.values, o.values) for o in complete)]

    shown = json.loads(run_sweeper("best", str(path), "--json").stdout)
    assert sorted(entry["number"] for entry in shown["pareto"]) == sorted(t.number for t in front)
    by_number = {t.number: t for t in complete}
    for entry in shown["pareto"]:
        assert list(entry["values"].values()) == by_number[entry["number"]].values
    best_acc = max(t.values[0] for t in front)
    assert shown["best"]["values"]["val_acc"] == best_acc
    assert shown["best"]["value"] == best_acc

    text = run_sweeper("best", str(path)).stdout
    assert "Pareto front (val_acc maximize, val_size minimize)" in text
    for trial in front:
        assert f"  trial {trial.number}: val_acc={trial.values[0]:.4f} " in text

    written = tomllib.loads((study_dir.root / "tiny" / "best.toml").read_text())
    assert sorted(row["trial"] for row in written["pareto"]) == sorted(t.number for t in front)
    assert all(row["params"]["size"] == "params" for row in written["pareto"])
    assert written["best"]["values"]["val_acc"] == best_acc
    report = (study_dir.root / "tiny" / "report.html").read_text()
    assert "<h2>Pareto front</h2>" in report
    rows = json.loads(run_sweeper("trials", str(path), "--json").stdout)
    assert {r["number"]: list(r["values"].values()) for r in rows if r["values"]} == {
        t.number: t.values for t in complete
    }
    assert all(r["values"] is None for r in rows if r["state"] != "complete")
    csv_head = run_sweeper("trials", str(path), "--csv").stdout.splitlines()[0]
    assert "value_val_acc,value_val_size" in csv_head

    with dashboard(path) as served, page() as (tab, errors):
        assert served.get("/api/studies/1")["objective_names"] == ["val_acc", "val_size"]
        tab.goto(f"{served.url}/dashboard/studies/1")
        tab.get_by_text("Pareto Front").first.wait_for(timeout=30_000)
        shown_page = tab.inner_text("body")
        screenshot(tab, "dashboard-pareto-front")
    assert errors == []
    assert "Objective X:\nval_acc" in shown_page and "val_size" in shown_page


def test_a_second_metric_never_logged_fails_the_trial_naming_it(study_dir: StudyDir) -> None:
    path = two_metrics(study_dir, n_trials=2, search={"lr": {"low": 1e-3, "high": 1e-1}})
    result = run_sweeper("start", str(path))
    assert result.returncode != 0
    trials = optuna.load_study(study_name="tiny", storage=f"sqlite:///{study_dir.db}").trials
    assert trials and all(t.state == TrialState.FAIL for t in trials)
    assert "the study metric 'val_size' was not logged" in trials[0].user_attrs["stop_reason"]


def test_a_second_metric_that_is_nan_fails_the_trial(study_dir: StudyDir) -> None:
    path = two_metrics(
        study_dir, n_trials=1, search={"lr": {"low": 1e-2, "high": 1e-1}, "size": "nan"}
    )
    run_sweeper("start", str(path))
    trials = optuna.load_study(study_name="tiny", storage=f"sqlite:///{study_dir.db}").trials
    assert trials[0].state == TrialState.FAIL
    assert (
        "the study metric 'val_size' is nan at the best validation"
        in (trials[0].user_attrs["stop_reason"])
    )


def test_folds_average_each_metric_and_prune_on_the_first(study_dir: StudyDir) -> None:
    path = scripted(
        study_dir, {"metric": ["val_acc", "val_loss"], "direction": ["maximize", "minimize"]}
    )
    result = run_sweeper("start", str(path))
    assert result.returncode == 0, result.stdout + result.stderr
    trials = optuna.load_study(study_name="tiny", storage=f"sqlite:///{study_dir.db}").trials
    by_scale = {t.params["scale"]: t for t in trials}
    good, bad = by_scale[1.0], by_scale[0.5]
    assert good.state == TrialState.COMPLETE
    # val_loss at each fold's best val_acc (1 - 0.9), averaged like val_acc
    assert good.values == pytest.approx([0.9, 0.1])
    assert [step for step, _ in good.user_attrs[REPORTED]] == [0, 1, 2]
    assert [mean for _, mean in good.user_attrs[REPORTED]] == pytest.approx([0.9] * 3)
    assert bad.state == TrialState.PRUNED
    assert bad.user_attrs["stop_reason"] == "pruned by threshold after fold 1 of 3"


def test_the_pruner_sees_the_first_metric_of_a_study_of_several() -> None:
    """The seam itself: Optuna's median pruner, on a multi-objective study in memory."""
    pruned = optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=0)
    multi = optuna.create_study(directions=["maximize", "minimize"], pruner=pruned)
    for good in (0.8, 0.9):
        trial = multi.ask()
        assert not report(multi, trial, good, 1)
        multi.tell(trial, [good, 1.0])
    worse, better = multi.ask(), multi.ask()
    assert report(multi, worse, 0.5, 1)  # below the median of 0.8 and 0.9
    assert not report(multi, better, 0.95, 1)
    view = FirstObjective(multi)
    assert view.direction == optuna.study.StudyDirection.MAXIMIZE
    seen = view.get_trials(states=(TrialState.COMPLETE,))
    assert [t.intermediate_values for t in seen] == [{1: 0.8}, {1: 0.9}]
    first = multi.get_trials(deepcopy=False)[0]
    seen = with_reported(first)
    assert seen is not first and seen.intermediate_values == {1: 0.8}
    assert first.intermediate_values == {}  # the study's own trial is left as it is


def test_a_study_of_one_metric_cannot_go_on_with_two(study_dir: StudyDir) -> None:
    result = run_sweeper("start", str(study_dir.write(study(study={"n_trials": 1}))))
    assert result.returncode == 0, result.stdout + result.stderr
    before = study_dir.db.read_bytes()
    result = run_sweeper("start", str(two_metrics(study_dir)))
    one_line_error(
        result,
        "study.direction: the study 'tiny' was created to maximize;",
        "maximize and minimize",
    )
    assert study_dir.db.read_bytes() == before


@pytest.mark.parametrize("command", [["nightly"], ["history"], ["schedule", "install"]])
def test_nightly_refuses_several_metrics(study_dir: StudyDir, command: list[str]) -> None:
    crontab = study_dir.root / "crontab.txt"
    extra = ["--crontab-file", str(crontab)] if command[0] == "schedule" else []
    result = run_sweeper(*command, str(two_metrics(study_dir)), *extra)
    one_line_error(result, "study.metric: nightly sweeps judge each night by its best value")
    assert study_dir.created() == []
    assert not crontab.exists()


def test_a_retry_reports_anew_not_after_the_failed_run(study_dir: StudyDir) -> None:
    """A retry is enqueued with the failed run's user attributes, ``reported`` among them."""
    from sweeper import store
    from sweeper.config import load_config

    config = load_config(two_metrics(study_dir))
    study = store.create_or_resume(config)
    study.enqueue_trial({"lr": 0.01, "hidden": 8}, user_attrs={REPORTED: [[3, 0.9], [24, 0.95]]})
    with store.claim_lock(config):
        trial = store.claim(study, config, store.Owner.me(), {"slot": 0, "device": "cpu"})
    assert trial is not None and trial.params == {"lr": 0.01, "hidden": 8}
    assert not report(study, trial, 0.5, 3)
    stored = study.get_trials(deepcopy=False)[trial.number]
    assert stored.user_attrs[REPORTED] == [[3, 0.5]]


def test_importances_of_a_maximized_first_metric_are_not_inverted(study_dir: StudyDir) -> None:
    """Optuna's importance evaluators minimize a target: a maximized metric is negated."""
    from sweeper.config import load_config
    from sweeper.results.report import _first_target

    config = load_config(two_metrics(study_dir))
    study = optuna.create_study(directions=["maximize", "minimize"])
    distributions = {
        "x": optuna.distributions.FloatDistribution(0, 1),
        "y": optuna.distributions.FloatDistribution(0, 1),
    }
    for i in range(200):
        x, y = (i * 0.618034) % 1, (i * 0.754878) % 1
        value = x if x >= 0.5 else 0.5 * y  # the top by value: x alone; the bottom: y
        study.add_trial(
            optuna.trial.create_trial(
                params={"x": x, "y": y}, distributions=distributions, values=[value, 1.0]
            )
        )
    target = _first_target(config, minimized=True)["target"]
    found = optuna.importance.get_param_importances(
        study, evaluator=optuna.importance.PedAnovaImportanceEvaluator(), target=target
    )
    assert found["x"] > found["y"], found


def test_a_list_of_one_metric_is_a_study_of_that_metric(study_dir: StudyDir) -> None:
    from sweeper.config import load_config

    path = study_dir.write(study(study={"metric": ["val_acc"], "direction": ["maximize"]}))
    config = load_config(path)
    assert (config.study.metric, config.study.direction) == ("val_acc", "maximize")
    assert not config.study.multi_objective
    assert study_dir.created() == []
