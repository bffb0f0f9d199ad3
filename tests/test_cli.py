"""The command line as a user meets it: study management, global flags, exit codes."""

from __future__ import annotations

import csv
import io
import json
import subprocess
import time
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from tests.conftest import BASE, StudyDir, one_line_error, run_sweeper, study, sweeper_cmd


@pytest.fixture(scope="module")
def swept(tmp_path_factory: pytest.TempPathFactory) -> StudyDir:
    """A real small sweep: some trials complete, some diverge (pruned)."""
    study_dir = StudyDir(tmp_path_factory.mktemp("cli"))
    study_dir.write(
        study(
            study={"n_trials": 6},
            search={
                "lr": {"low": 0.01, "high": 1000.0, "log": True},
                "hidden": {"low": 4, "high": 32, "step": 4},
            },
            sampler={"name": "random"},
        )
    )
    result = run_sweeper("start", str(study_dir.root / "study.toml"))
    assert result.returncode == 0, result.stdout + result.stderr
    return study_dir


DONE = (TrialState.COMPLETE, TrialState.PRUNED)


def trials_of(study_dir: StudyDir, name: str = "tiny") -> list[optuna.trial.FrozenTrial]:
    return optuna.load_study(study_name=name, storage=f"sqlite:///{study_dir.db}").trials


def test_trials_lists_every_trial_as_a_table_json_and_csv(swept: StudyDir) -> None:
    path = str(swept.root / "study.toml")
    stored = trials_of(swept)

    listed = json.loads(run_sweeper("trials", path, "--json").stdout)
    assert [t["number"] for t in listed] == [t.number for t in stored]
    assert [t["state"] for t in listed] == [t.state.name.lower() for t in stored]
    assert [t["params"] for t in listed] == [t.params for t in stored]
    assert [t["stop_reason"] for t in listed] == [t.user_attrs.get("stop_reason") for t in stored]
    assert any(t["stop_reason"].startswith("diverged") for t in listed), "the sweep diverged"

    table = run_sweeper("trials", path)
    assert table.returncode == 0, table.stderr
    for t in stored:
        assert any(
            line.split()[:2] == [str(t.number), t.state.name.lower()]
            for line in table.stdout.splitlines()
        ), table.stdout
    assert "diverged: loss=" in table.stdout

    rows = list(csv.DictReader(io.StringIO(run_sweeper("trials", path, "--csv").stdout)))
    assert [int(r["number"]) for r in rows] == [t.number for t in stored]
    assert [float(r["param_lr"]) for r in rows] == [t.params["lr"] for t in stored]

    complete = json.loads(run_sweeper("trials", path, "--state", "COMPLETE", "--json").stdout)
    assert {t["number"] for t in complete} == {
        t.number for t in stored if t.state == TrialState.COMPLETE
    }


def test_trials_refuses_an_unknown_state_and_two_formats(swept: StudyDir) -> None:
    path = str(swept.root / "study.toml")
    one_line_error(
        run_sweeper("trials", path, "--state", "done"),
        "--state: expected one of complete, pruned, fail, running, waiting, got 'done'",
    )
    one_line_error(run_sweeper("trials", path, "--json", "--csv"), "--json and --csv: choose one")


def test_json_and_debug_work_before_or_after_the_command(swept: StudyDir) -> None:
    path = str(swept.root / "study.toml")
    after = run_sweeper("best", path, "--json")
    before = run_sweeper("--json", "best", path)
    assert after.returncode == before.returncode == 0
    assert json.loads(after.stdout) == json.loads(before.stdout)
    status = json.loads(run_sweeper("--json", "status", path).stdout)
    assert status["counts"]["complete"] + status["counts"]["pruned"] == 6
    assert status["running"] == [] and status["stop_requested"] is None
    one_line_error(
        run_sweeper("--json", "report", path), "--json: `sweeper report` has no JSON output"
    )

    missing = str(swept.root / "missing.toml")
    quiet = run_sweeper("status", missing)
    assert quiet.returncode == 2 and "Traceback" not in quiet.stderr
    for args in (("--debug", "status", missing), ("status", missing, "--debug")):
        loud = run_sweeper(*args)
        assert loud.returncode != 0 and "Traceback" in loud.stderr, args


def test_version_and_exit_codes_in_help() -> None:
    version = run_sweeper("--version")
    assert version.returncode == 0
    assert version.stdout.strip().startswith("sweeper 0.")
    shown = run_sweeper("--help").stdout
    for code in ("0:", "1:", "2: bad input", "3: nightly", "130: interrupted", "143: terminated"):
        assert code in shown, shown
    assert "[schedule] tolerance" in shown, "square brackets are shown as written"
    assert "--install-completion" in shown


def test_retired_flags_say_which_flag_took_their_place(study_dir: StudyDir) -> None:
    path = str(study_dir.write(study()))
    start = run_sweeper("start", path, "--force")
    assert start.returncode == 2
    assert "--force is gone: use --ignore-audit" in start.stderr
    night = run_sweeper("nightly", path, "--date", "2026-11-20")
    assert night.returncode == 2
    assert "--date is gone: use --night" in night.stderr
    assert study_dir.created() == [], "nothing written"


def test_best_of_a_study_with_nothing_complete_is_not_an_error(study_dir: StudyDir) -> None:
    path = str(
        study_dir.write(
            study(
                study={"n_trials": 2, "max_failures": 2},
                search={**BASE["search"], "fail": "always"},
            )
        )
    )
    failed = run_sweeper("start", path)
    assert failed.returncode == 1
    shown = run_sweeper("best", path)
    assert shown.returncode == 0, shown.stderr
    assert "no trial has completed yet" in shown.stdout
    assert json.loads(run_sweeper("best", path, "--json").stdout)["best"] is None


def test_delete_asks_and_removes_only_that_study(study_dir: StudyDir) -> None:
    path = study_dir.write(study(study={"n_trials": 2}))
    other = study_dir.write(
        study(study={"name": "other", "n_trials": 1, "storage": "sqlite:///tiny.db"}),
        name="other.toml",
    )
    for file in (path, other):
        assert run_sweeper("start", str(file)).returncode == 0

    refused = run_sweeper("delete", str(path))  # stdin is not a terminal: no one to ask
    one_line_error(refused, "nothing deleted; confirm with --yes")
    assert {"tiny", "other"} <= set(optuna.get_all_study_names(f"sqlite:///{study_dir.db}"))

    deleted = run_sweeper("delete", str(path), "--yes", "--results")
    assert deleted.returncode == 0, deleted.stderr
    assert "deleted study 'tiny' (2 trials)" in deleted.stdout
    assert optuna.get_all_study_names(f"sqlite:///{study_dir.db}") == ["other"]
    assert not (study_dir.root / "tiny").exists()
    assert (study_dir.root / "other" / "best.toml").exists()
    assert run_sweeper("start", str(path)).returncode == 0, "a deleted study starts afresh"
    assert len(trials_of(study_dir)) == 2


def slow_sweep(study_dir: StudyDir, n_trials: int = 6) -> tuple[Path, subprocess.Popen[str]]:
    """A sweep whose trials take seconds each (12 steps of 0.4 s)."""
    path = study_dir.write(
        study(study={"n_trials": n_trials}, search={**BASE["search"], "sleep": 0.4})
    )
    sweep = subprocess.Popen(
        sweeper_cmd("start", str(path)),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if study_dir.db.exists() and running_now(study_dir):
            return path, sweep
        time.sleep(0.3)
    sweep.kill()
    raise AssertionError("no trial started")


def running_now(study_dir: StudyDir) -> list[optuna.trial.FrozenTrial]:
    try:
        return [t for t in trials_of(study_dir) if t.state == TrialState.RUNNING]
    except KeyError:
        return []


def test_stop_lets_running_trials_finish_starts_none_and_start_resumes(
    study_dir: StudyDir,
) -> None:
    path, sweep = slow_sweep(study_dir)
    stopping = running_now(study_dir)
    stop = run_sweeper("stop", str(path))
    asked = time.time()
    assert stop.returncode == 0, stop.stderr
    assert "no new trial starts" in stop.stdout
    out, err = sweep.communicate(timeout=120)
    assert sweep.returncode == 0, out + err
    assert "the sweep was stopped after its running trials by `sweeper stop`" in out
    after = trials_of(study_dir)
    assert all(t.state in DONE for t in after), after
    assert {t.number for t in stopping} <= {t.number for t in after}
    assert all(t.datetime_start.timestamp() < asked for t in after), "none started after stop"
    assert len(after) < 6

    resumed = run_sweeper("start", str(path))
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "resuming the study, stopped after its running trials" in resumed.stdout
    finished = [t for t in trials_of(study_dir) if t.state in DONE]
    assert len(finished) == 6


def test_stop_now_fails_running_trials_and_enqueues_them_again(study_dir: StudyDir) -> None:
    path, sweep = slow_sweep(study_dir)
    stop = run_sweeper("stop", str(path), "--now")
    assert stop.returncode == 0, stop.stderr
    out, err = sweep.communicate(timeout=60)
    assert sweep.returncode == 0, out + err
    assert "stopping now" in out
    after = trials_of(study_dir)
    stopped = [t for t in after if t.state == TrialState.FAIL]
    assert stopped, "the running trials were failed"
    assert all(t.user_attrs["stop_reason"].startswith("interrupted") for t in stopped)
    waiting = [t for t in after if t.state == TrialState.WAITING]
    assert sorted(t.params["lr"] for t in waiting) == sorted(t.params["lr"] for t in stopped)
    status = run_sweeper("status", str(path))
    assert "stopped now by `sweeper stop`" in status.stdout

    resumed = run_sweeper("start", str(path))
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    finished = [t for t in trials_of(study_dir) if t.state in DONE]
    assert len(finished) == 6
    assert {t.params["lr"] for t in stopped} <= {t.params["lr"] for t in finished}
