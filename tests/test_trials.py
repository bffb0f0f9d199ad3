"""The fast trial read gives exactly what Optuna's own read gives."""

from __future__ import annotations

import math

import optuna
from optuna.trial import TrialState

from sweeper.config import parse_config
from sweeper.store import create_or_resume, read_trials
from tests.conftest import StudyDir, study


def test_fast_read_equals_optunas_read_for_every_kind_of_trial(study_dir: StudyDir) -> None:
    import tomllib

    path = study_dir.write(study())
    config = parse_config(tomllib.loads(path.read_text()), path)
    created = create_or_resume(config)
    complete = created.ask()
    complete.report(0.5, 10)
    complete.report(float("nan"), 20)
    complete.set_user_attr("history", [{"step": 10, "val_acc": 0.5}])
    created.tell(complete, 0.75)
    infinite = created.ask()
    created.tell(infinite, float("inf"))
    pruned = created.ask()
    pruned.report(-math.inf, 5)
    pruned.set_user_attr("stop_reason", "diverged: loss=nan at step 5")
    created.tell(pruned, state=TrialState.PRUNED)
    created.tell(created.ask(), state=TrialState.FAIL)
    created.enqueue_trial({"lr": 0.01, "hidden": 8})
    running = created.ask()
    running.set_user_attr("step", 3)
    created.enqueue_trial({"lr": 0.02})

    reopened = optuna.load_study(study_name="tiny", storage=config.storage_url)
    fast = read_trials(reopened)
    slow = reopened.get_trials(deepcopy=False)
    assert [t.state for t in fast] == [
        TrialState.COMPLETE,
        TrialState.COMPLETE,
        TrialState.PRUNED,
        TrialState.FAIL,
        TrialState.RUNNING,
        TrialState.WAITING,
    ]
    assert math.isnan(fast[0].intermediate_values[20])
    fast[0].intermediate_values[20] = slow[0].intermediate_values[20] = 0.0  # nan != nan
    assert fast == slow
    for mine, optunas in zip(fast, slow, strict=True):
        assert mine.user_attrs == optunas.user_attrs
        assert mine.system_attrs == optunas.system_attrs
        assert mine.datetime_start == optunas.datetime_start
        assert mine.distributions == optunas.distributions


def test_other_storages_are_read_through_optuna() -> None:
    in_memory = optuna.create_study()
    in_memory.optimize(lambda trial: trial.suggest_float("x", 0, 1), n_trials=3)
    assert read_trials(in_memory) == in_memory.get_trials()
