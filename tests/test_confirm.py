"""[confirm]: the best configurations of a finished search run again with new seeds."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import statistics
import subprocess
import tomllib
from pathlib import Path

import optuna
import pytest
from optuna.distributions import FloatDistribution
from optuna.trial import TrialState, create_trial

from sweeper.config import load_config
from sweeper.plugins import diverged_as_worst, pruner_for
from sweeper.store import top_configurations
from tests.conftest import StudyDir, one_line_error, run_sweeper, study, sweeper_cmd
from tests.test_sweep import descendants, load, wait_for

optuna.logging.set_verbosity(optuna.logging.WARNING)

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)


def confirming(top_k: int, seeds: int, **sections: object) -> dict:
    return study(sampler={"name": "random"}, confirm={"top_k": top_k, "seeds": seeds}, **sections)


def split(trials: list) -> tuple[list, list]:
    """(search trials, confirmations)."""
    search = [t for t in trials if "confirms" not in t.user_attrs]
    return search, [t for t in trials if "confirms" in t.user_attrs]


def best_of(search: list, k: int, maximize: bool = True) -> list[int]:
    """The numbers of the k best COMPLETE search trials with distinct params."""
    complete = sorted(
        (t for t in search if t.state == TrialState.COMPLETE),
        key=lambda t: (-t.value if maximize else t.value, t.number),
    )
    chosen: list[int] = []
    seen: list[dict] = []
    for trial in complete:
        if trial.params not in seen:
            seen.append(trial.params)
            chosen.append(trial.number)
    return chosen[:k]


def test_a_sweep_confirms_its_best_with_new_seeds_and_chooses_by_the_mean(
    study_dir: StudyDir,
) -> None:
    path = study_dir.write(confirming(2, 2, study={"n_trials": 4}))
    result = run_sweeper("start", str(path))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "confirming the best 2 configuration(s) with 2 new seed(s) each: 4 trial(s)" in (
        result.stdout
    )
    trials = load(study_dir).get_trials()
    search, confirmations = split(trials)
    assert len(search) == 4 and all(t.state in FINISHED for t in search)
    assert len(confirmations) == 4
    assert all(t.state == TrialState.COMPLETE for t in confirmations)  # never pruned
    top = best_of(search, 2)
    marks = sorted((t.user_attrs["confirms"], t.user_attrs["confirm_seed"]) for t in confirmations)
    assert marks == sorted((n, s) for n in top for s in (1, 2))
    for trial in confirmations:
        assert trial.params == trials[trial.user_attrs["confirms"]].params
        assert trial.number > max(t.number for t in search)  # after the search
    seeds = [t.user_attrs["seed"] for t in trials]
    assert len(set(seeds)) == len(seeds), "every run has a seed of its own"
    assert "(confirms trial" in result.stdout
    kept = {f.name for f in (study_dir.root / "tiny" / "weights").glob("trial-*.pt")}
    assert kept and kept <= {f"trial-{t.number}.pt" for t in search}, "a seed's luck keeps none"
    assert not any("weights" in t.user_attrs for t in confirmations)

    shown = run_sweeper("best", str(path), "--json")
    assert shown.returncode == 0, shown.stderr
    data = json.loads(shown.stdout)
    entries = data["confirmed"]
    assert sorted(e["trial"] for e in entries) == sorted(top)
    for entry in entries:
        mine = [t for t in confirmations if t.user_attrs["confirms"] == entry["trial"]]
        runs = [trials[entry["trial"]], *sorted(mine, key=lambda t: t.user_attrs["confirm_seed"])]
        values = [t.value for t in runs]
        assert [r["value"] for r in entry["runs"]] == values
        assert [r["trial"] for r in entry["runs"]] == [t.number for t in runs]
        assert [r["seed"] for r in entry["runs"]] == [t.user_attrs["seed"] for t in runs]
        assert entry["mean"] == pytest.approx(statistics.fmean(values))
        assert entry["std"] == pytest.approx(statistics.stdev(values))
    means = [e["mean"] for e in entries]
    assert means == sorted(means, reverse=True)
    assert data["best"]["trial"] == entries[0]["trial"], "the best is the best mean"
    assert data["best"]["confirmed"] == entries[0]
    assert data["counts"]["complete"] + data["counts"]["pruned"] == 8

    text = run_sweeper("best", str(path))
    assert f"best: trial {entries[0]['trial']}" in text.stdout
    assert f"{entries[0]['mean']:.4f} ± {entries[0]['std']:.4f} over 3 runs" in text.stdout
    assert "4/4 finished and 4 confirmation trial(s)" in text.stdout

    best = tomllib.loads((study_dir.root / "tiny" / "best.toml").read_text())
    assert best["best"]["trial"] == entries[0]["trial"]
    assert best["confirmed"]["mean"] == pytest.approx(entries[0]["mean"])
    assert best["confirmed"]["std"] == pytest.approx(entries[0]["std"])
    assert [r["value"] for r in best["confirmed"]["runs"]] == [
        r["value"] for r in entries[0]["runs"]
    ]
    assert [r["trial"] for r in best["confirmed"]["runs"]] == [
        r["trial"] for r in entries[0]["runs"]
    ]
    assert Path(best["best"]["weights"]).is_file(), "the chosen configuration's weights"
    report = (study_dir.root / "tiny" / "report.html").read_text()
    assert "Confirmed configurations" in report
    assert f"{entries[0]['mean']:.6g} ± {entries[0]['std']:.3g}" in report

    again = run_sweeper("start", str(path))  # complete: nothing more runs
    assert again.returncode == 0, again.stdout + again.stderr
    assert len(load(study_dir).get_trials()) == 8


def test_a_sweep_killed_while_confirming_resumes_and_finishes(study_dir: StudyDir) -> None:
    path = study_dir.write(
        confirming(
            1,
            3,
            study={"n_trials": 2},
            search={"lr": {"low": 0.01, "high": 0.1}, "sleep": 0.15},
            pruner={"name": "none"},
        )
    )
    sweep = subprocess.Popen(
        sweeper_cmd("start", str(path)), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )

    def confirming_now() -> bool:
        with contextlib.suppress(KeyError):
            trials = load(study_dir).get_trials()
            return any(
                t.state == TrialState.RUNNING
                and "confirms" in t.user_attrs
                and "pid" in t.user_attrs
                for t in trials
            )
        return False

    wait_for(confirming_now, what="a running confirmation")
    for pid in [sweep.pid, *descendants(sweep.pid)]:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    sweep.wait()
    before = {t.number: t for t in load(study_dir).get_trials()}
    killed = [t.number for t in before.values() if t.state == TrialState.RUNNING]
    assert killed

    result = run_sweeper("start", str(path))
    assert result.returncode == 0, result.stdout + result.stderr
    trials = load(study_dir).get_trials()
    search, confirmations = split(trials)
    assert len(search) == 2 and all(t.state in FINISHED for t in search), "no search trial again"
    done = [t for t in confirmations if t.state in FINISHED]
    top = best_of(search, 1)
    assert sorted((t.user_attrs["confirms"], t.user_attrs["confirm_seed"]) for t in done) == [
        (top[0], 1),
        (top[0], 2),
        (top[0], 3),
    ]
    assert not [t for t in trials if t.state in (TrialState.RUNNING, TrialState.WAITING)]
    for number, trial in before.items():  # finished runs are kept, not run again
        if trial.state in FINISHED:
            assert trials[number].state == trial.state and trials[number].value == trial.value
    for number in killed:
        assert trials[number].state == TrialState.FAIL
        assert trials[number].user_attrs["stop_reason"].startswith("interrupted")
        retry = [t for t in trials if t.system_attrs.get("failed_trial") == number]
        assert len(retry) == 1
        assert retry[0].user_attrs["confirms"] == trials[number].user_attrs["confirms"]
        assert retry[0].user_attrs["confirm_seed"] == trials[number].user_attrs["confirm_seed"]


@pytest.mark.parametrize(
    ("confirm", "expected"),
    [
        ({"top_k": 0}, "confirm.top_k"),
        ({"seeds": 0}, "confirm.seeds"),
        ({"top_k": -2}, "confirm.top_k"),
        ({"top_k": "3"}, "confirm.top_k"),
        ({"seeds": 1.5}, "confirm.seeds"),
        ({"seeds": True}, "confirm.seeds"),
        ({"top": 3}, "confirm.top: unknown key; did you mean 'top_k'?"),
    ],
)
def test_bad_confirm_is_refused_with_nothing_written(
    study_dir: StudyDir, confirm: dict, expected: str
) -> None:
    path = study_dir.write(study(confirm=confirm))
    result = run_sweeper("start", str(path))
    one_line_error(result, str(path), expected)
    assert study_dir.created() == []


def test_confirm_that_is_not_a_table_is_refused(study_dir: StudyDir) -> None:
    text = study_dir.write().read_text() + "\nconfirm = 3\n"
    path = study_dir.write(text=text)
    result = run_sweeper("check", str(path))
    one_line_error(result, str(path), "confirm")
    assert study_dir.created() == []


def test_top_configurations_are_distinct_and_stable() -> None:
    distributions = {"lr": FloatDistribution(0.0, 1.0)}

    def trial(lr: float, value: float, **attrs: object) -> optuna.trial.FrozenTrial:
        return create_trial(
            params={"lr": lr}, distributions=distributions, value=value, user_attrs=dict(attrs)
        )

    found = optuna.create_study(direction="maximize")
    for lr, value in [(0.1, 0.5), (0.2, 0.9), (0.2, 0.8), (0.3, 0.9), (0.4, 0.7)]:
        found.add_trial(trial(lr, value))
    found.add_trial(trial(0.4, 0.99, confirms=4, confirm_seed=1))  # never a candidate
    top = top_configurations(found.get_trials(), maximize=True, k=3)
    assert [t.number for t in top] == [1, 3, 4]  # one trial per configuration, ties: earlier
    assert [t.number for t in top_configurations(found.get_trials(), False, 2)] == [0, 4]


def test_the_pruner_spares_confirmations_and_the_gp_model_leaves_them_out(
    study_dir: StudyDir,
) -> None:
    path = study_dir.write(confirming(2, 2, pruner={"name": "hyperband"}))
    assert isinstance(pruner_for(load_config(path)), optuna.pruners.HyperbandPruner)
    plain = pruner_for(load_config(study_dir.write(study(pruner={"name": "hyperband"}))))
    assert type(plain) is optuna.pruners.HyperbandPruner  # without [confirm]: as it was

    distributions = {"lr": FloatDistribution(0.0, 1.0)}
    found = optuna.create_study(direction="maximize")
    for lr in (0.1, 0.2):
        found.add_trial(
            create_trial(
                params={"lr": lr},
                distributions=distributions,
                value=1.0,
                intermediate_values={step: 1.0 for step in range(5)},
            )
        )
    running = found.ask()
    running.report(0.0, 4)  # far below the median: a search trial is pruned
    search_trial = found.get_trials()[-1]
    running.set_user_attr("confirms", 0)
    confirmation = found.get_trials()[-1]
    median = {"name": "median", "n_startup_trials": 0}
    sparing = pruner_for(load_config(study_dir.write(confirming(2, 2, pruner=median))))
    assert isinstance(sparing, optuna.pruners.MedianPruner)
    assert sparing.prune(found, search_trial)
    assert not sparing.prune(found, confirmation)

    completed = [t for t in found.get_trials() if t.state == TrialState.COMPLETE]
    marked = create_trial(
        params={"lr": 0.9}, distributions=distributions, value=0.2, user_attrs={"confirms": 0}
    )
    seen = diverged_as_worst(found, [*completed, marked], distributions)
    assert seen == completed


def test_without_confirm_the_file_has_none() -> None:
    assert load_config(Path(__file__).parents[1] / "studies" / "digits.toml").confirm is None


def test_each_confirmation_is_a_full_k_fold_trial(study_dir: StudyDir) -> None:
    from tests.test_folds import scripted

    path = scripted(study_dir, confirm={"top_k": 1, "seeds": 2})
    result = run_sweeper("start", str(path))
    assert result.returncode == 0, result.stdout + result.stderr
    search, confirmations = split(load(study_dir).get_trials())
    assert len(search) == 2 and all(t.state in FINISHED for t in search)
    (good,) = [t for t in search if t.params["scale"] == 1.0]
    assert sorted(t.user_attrs["confirm_seed"] for t in confirmations) == [1, 2]
    for trial in confirmations:
        assert trial.state == TrialState.COMPLETE
        assert trial.user_attrs["confirms"] == good.number
        assert trial.user_attrs["fold_values"] == pytest.approx([0.9, 0.9, 0.9])
        assert sorted({r["fold"] for r in trial.user_attrs["history"]}) == [0, 1, 2]


def confirmed_study(
    tmp_path: Path, runs: dict[int, list[float | str | None]], first: dict | None = None
) -> optuna.Study:
    """A real study of search trials 0, 1, ... (each value the first of its runs; trial 0
    with user attributes ``first``) and, after them, the confirmations of each: ``None``
    is a run that diverged, ``"waiting"`` one not run yet."""
    db = f"sqlite:///{tmp_path / 'tiny.db'}"
    made = optuna.create_study(study_name="tiny", storage=db, direction="maximize")
    space = {"lr": FloatDistribution(0.0, 10.0)}
    for number, values in sorted(runs.items()):
        made.add_trial(
            create_trial(
                value=values[0],
                params={"lr": float(number)},
                distributions=space,
                user_attrs=(first or {}) if number == 0 else {},
            )
        )
    for number, values in sorted(runs.items()):
        for seed, value in enumerate(values[1:], start=1):
            attrs = {"confirms": number, "confirm_seed": seed, "seed": 100 * number + seed}
            if value == "waiting":
                made.enqueue_trial({"lr": float(number)}, user_attrs=attrs)
            elif value is None:
                made.add_trial(
                    create_trial(
                        state=TrialState.PRUNED,
                        params={"lr": float(number)},
                        distributions=space,
                        user_attrs={**attrs, "diverged": True},
                    )
                )
            else:
                made.add_trial(
                    create_trial(
                        value=float(value),
                        params={"lr": float(number)},
                        distributions=space,
                        user_attrs=attrs,
                    )
                )
    return made


def test_a_run_that_diverged_counts_as_the_worst(tmp_path: Path) -> None:
    from sweeper.results.best import best_trial, confirmed

    # trial 0's two finished runs average 0.95, but its third diverged: unstable
    made = confirmed_study(tmp_path, {0: [0.96, 0.94, None], 1: [0.90, 0.89, 0.88]})
    found = confirmed(made)
    assert [e["trial"] for e in found] == [1, 0]
    assert found[1]["diverged"] == 1 and found[1]["mean"] == pytest.approx(0.95)
    assert best_trial(made).number == 1


def test_a_half_confirmed_configuration_is_not_chosen_over_a_confirmed_one(
    tmp_path: Path,
) -> None:
    from sweeper.results.best import best_trial, confirmed

    # trial 1's first confirmation was lucky; its second has not run yet
    made = confirmed_study(tmp_path, {0: [0.90, 0.91, 0.89], 1: [0.92, 0.99, "waiting"]})
    assert [e["trial"] for e in confirmed(made)] == [0, 1]
    assert best_trial(made).number == 0


def test_once_every_confirmation_ran_the_best_mean_wins_whatever_its_number_of_runs(
    tmp_path: Path,
) -> None:
    """Run counts differ for good when [confirm] seeds was lowered or a run failed for good."""
    from sweeper.results.best import best_trial

    made = confirmed_study(tmp_path, {0: [0.80, 0.80, 0.80, 0.80], 1: [0.95, 0.94, 0.96]})
    assert best_trial(made).number == 1


def test_best_toml_lists_each_run_with_its_own_seed_and_value(study_dir: StudyDir) -> None:
    from sweeper.results.best import summary, write_best_toml

    path = study_dir.write(confirming(1, 2, study={"n_trials": 1}))
    config = load_config(path)
    made = confirmed_study(study_dir.root, {0: [0.9, None, 0.8]})
    data = summary(config, made)
    written = write_best_toml(config, data)
    assert written is not None
    runs = tomllib.loads(written.read_text())["confirmed"]["runs"]
    assert runs[1:] == [
        {"trial": 1, "seed": 1, "outcome": "diverged"},
        {"trial": 2, "seed": 2, "value": 0.8, "outcome": "complete"},
    ]


def test_best_names_weights_only_when_their_file_is_there(study_dir: StudyDir) -> None:
    from sweeper.results.best import summary

    path = study_dir.write(confirming(1, 1, study={"n_trials": 1}))
    config = load_config(path)
    kept = study_dir.root / "trial-0.pt"
    made = confirmed_study(study_dir.root, {0: [0.9, 0.8]}, first={"weights": str(kept)})
    assert summary(config, made)["best"]["weights"] is None, "a file pushed out of the kept"
    kept.write_bytes(b"weights")
    assert summary(config, made)["best"]["weights"] == str(kept)
    (study_dir.root / "other").mkdir()
    elsewhere = confirmed_study(
        study_dir.root / "other",
        {0: [0.9, 0.8]},
        first={"weights": "/elsewhere/trial-0.pt", "host": "another-machine"},
    )
    assert summary(config, elsewhere)["best"]["weights"] == "/elsewhere/trial-0.pt", (
        "the weights of a trial another machine ran stay named"
    )


def test_the_weights_of_every_configuration_to_confirm_are_kept(study_dir: StudyDir) -> None:
    import torch

    from sweeper.run.weights import keep

    config = load_config(study_dir.write(confirming(2, 1, study={"keep_weights": 1})))
    for number, value in enumerate((0.5, 0.9, 0.7, 0.1)):
        keep(config, number, value, {"w": torch.zeros(1)})
    kept = sorted(f.name for f in (study_dir.root / "tiny" / "weights").glob("trial-*.pt"))
    assert kept == ["trial-1.pt", "trial-2.pt"], "the top_k, though keep_weights is 1"
