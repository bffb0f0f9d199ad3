"""Plain events from snapshots of a study's trials, as a log file would show them."""

from __future__ import annotations

import optuna
from optuna.trial import TrialState

from sweeper.results.progress import EventLog


def snapshot(number: int, state: TrialState, value: float | None = None, **attrs):
    trial = optuna.trial.create_trial(
        state=state,
        value=value,
        params={"lr": 0.01},
        distributions={"lr": optuna.distributions.FloatDistribution(1e-3, 1.0)},
        user_attrs=attrs,
    )
    trial.number = number
    return trial


def test_events_for_start_finish_prune_fail_and_new_best() -> None:
    lines: list[str] = []
    log = EventLog(("val_acc",), maximize=True, emit=lines.append, clock=lambda: 0.0)
    log.update([snapshot(0, TrialState.RUNNING)])  # no slot recorded yet: not reported
    log.update([snapshot(0, TrialState.RUNNING, device="cpu")])
    log.update(
        [
            snapshot(0, TrialState.COMPLETE, 0.8, stop_reason="completed"),
            snapshot(1, TrialState.PRUNED, stop_reason="pruned by median at step 40"),
            snapshot(2, TrialState.COMPLETE, 0.7, stop_reason="completed"),
            snapshot(3, TrialState.FAIL, stop_reason="killed by signal 9 (SIGKILL)"),
            snapshot(4, TrialState.COMPLETE, 0.9, stop_reason="completed"),
        ]
    )
    log.update([snapshot(4, TrialState.COMPLETE, 0.9)])  # nothing new
    text = [line.split(" ", 1)[1] for line in lines]
    assert text == [
        "trial 0 started on cpu lr=0.01",
        "trial 0 completed: val_acc=0.8000 (new best)",
        "trial 1 pruned: pruned by median at step 40",
        "trial 2 completed: val_acc=0.7000",
        "trial 3 failed: killed by signal 9 (SIGKILL)",
        "trial 4 completed: val_acc=0.9000 (new best)",
    ]


def test_study_view_shows_slots_and_the_study_line() -> None:
    from rich.console import Console

    from sweeper.results.progress import study_view
    from sweeper.store import Snapshot

    running = snapshot(
        3,
        TrialState.RUNNING,
        slot=1,
        device="cuda:1",
        history=[{"step": 40, "epoch": 1, "val_acc": 0.75}],
    )
    running.datetime_start = None
    trials = [
        snapshot(0, TrialState.COMPLETE, 0.8),
        snapshot(1, TrialState.PRUNED),
        snapshot(2, TrialState.FAIL),
        running,
        snapshot(4, TrialState.COMPLETE, 0.95, confirms=0, confirm_seed=1),  # a lucky seed
    ]
    console = Console(record=True, width=120)
    console.print(study_view(Snapshot(trials, 10), "val_acc", True, elapsed=60.0))
    text = " ".join(console.export_text().split())
    assert "cuda:1" in text and "1/40" in text and "0.7500" in text
    assert "2/10 finished (1 pruned), 1 failed, 1 running; best val_acc=0.8000" in text, (
        "the best of the search: a confirmation's lucky seed is not a new best"
    )
    assert "about 240 s left" in text
