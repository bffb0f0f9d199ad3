"""The divergence guard on scripted loss curves: the step it stops at, and why."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from sweeper.run.divergence import DivergenceGuard


def run(guard: DivergenceGuard, losses: list[float]) -> tuple[int | None, str | None]:
    """Feed a curve; return the step the guard stopped at and its reason."""
    for step, loss in enumerate(losses):
        reason = guard.step(step, loss)
        if reason is not None:
            return step, reason
    return None, None


def converging(n: int = 300, noise: float = 0.3, seed: int = 0) -> list[float]:
    rng = np.random.default_rng(seed)
    base = 2.3 * np.exp(-np.arange(n) / 60) + 0.05
    return list(base * np.exp(rng.normal(0, noise, n)))


def test_nan_at_step_k_stops_at_step_k() -> None:
    curve = converging(100)
    curve[37] = math.nan
    assert run(DivergenceGuard(), curve) == (37, "diverged: loss=nan at step 37")


def test_inf_stops_even_during_warmup() -> None:
    curve = converging(50)
    curve[3] = math.inf
    assert run(DivergenceGuard(warmup_steps=10), curve) == (3, "diverged: loss=inf at step 3")


def test_explosion_stops_at_onset_plus_patience() -> None:
    curve = [2.3 - 0.04 * i for i in range(40)] + [100.0] * 20
    step, reason = run(DivergenceGuard(factor=4.0, patience=5), curve)
    assert step == 45
    assert reason == (
        "diverged: loss=100 above 4 x best smoothed loss 1.094 since step 40, at step 45"
    )


def test_gradual_explosion_stops_patience_steps_after_its_onset() -> None:
    curve = converging(60)[:40] + [0.5 * 1.3**i for i in range(60)]
    step, reason = run(DivergenceGuard(factor=4.0, patience=5), curve)
    assert step is not None and reason is not None
    onset = int(reason.split("since step ")[1].split(",")[0])
    assert step == onset + 5
    assert curve[onset] > curve[0], "an explosion must climb above the starting loss"


def test_a_short_spike_is_forgiven() -> None:
    curve = converging(200)
    for i in range(100, 104):  # four bad steps, fewer than patience + 1
        curve[i] = 50.0
    assert run(DivergenceGuard(patience=5), curve) == (None, None)


def test_noisy_converging_curves_run_to_the_end() -> None:
    for seed in range(20):
        assert run(DivergenceGuard(), converging(400, noise=0.6, seed=seed)) == (None, None)


def test_converged_noise_near_zero_is_not_an_explosion() -> None:
    rng = np.random.default_rng(1)
    curve = [2.3, *(0.001 * np.exp(rng.normal(0, 1.5, 300)))]
    assert run(DivergenceGuard(), curve) == (None, None)


def test_warmup_spike_is_not_stopped() -> None:
    curve = [2.3, 2.2, 2.1] + [30.0] * 10 + converging(100)
    assert run(DivergenceGuard(warmup_steps=20), curve) == (None, None)
    stopped, _ = run(DivergenceGuard(warmup_steps=0), curve)
    assert stopped == 3 + 5


def tpe_suggestions(mark_diverged: bool) -> list[float]:
    """lr values TPE suggests after trials pruned early at small lr and trials that
    went further at large lr before diverging; no trial has completed yet."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(
        direction="maximize", sampler=optuna.samplers.TPESampler(seed=0, n_startup_trials=5)
    )
    lr = optuna.distributions.FloatDistribution(1e-3, 10.0, log=True)
    rng = np.random.default_rng(0)
    for i in range(12):
        diverging = i % 2 == 1
        value = (
            float(np.exp(rng.uniform(np.log(2.0), np.log(10.0))))
            if diverging
            else float(np.exp(rng.uniform(np.log(1e-3), np.log(3e-2))))
        )
        study.enqueue_trial({"lr": value})
        trial = study.ask({"lr": lr})
        if diverging:  # reached step 50 with a fine metric, then the loss blew up
            trial.report(0.8, 50)
            if mark_diverged:
                trial.set_constraint("diverged", 1.0)
        else:  # stopped by the median pruner at step 20
            trial.report(0.6, 20)
        study.tell(trial, state=optuna.trial.TrialState.PRUNED)
    suggested = []
    for _ in range(20):
        trial = study.ask({"lr": lr})
        suggested.append(trial.params["lr"])
        study.tell(trial, state=optuna.trial.TrialState.FAIL)
    return suggested


def test_tpe_leaves_the_region_where_trials_diverged() -> None:
    marked = tpe_suggestions(mark_diverged=True)
    assert float(np.median(marked)) < 0.03, "marked: TPE samples where trials did not diverge"
    unmarked = tpe_suggestions(mark_diverged=False)
    assert float(np.median(unmarked)) > 0.3, "unmarked: TPE drifts toward the diverged trials"


def gp_suggestions(sampler: object) -> list[float]:
    """lr values the GP suggests after complete trials at small lr (better the larger)
    and trials that diverged at large lr."""
    import optuna
    from optuna.distributions import FloatDistribution
    from optuna.trial import TrialState, create_trial

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="maximize", sampler=sampler)
    lr = FloatDistribution(1e-3, 10.0, log=True)
    rng = np.random.default_rng(0)
    for _ in range(10):
        x = float(np.exp(rng.uniform(np.log(1e-3), np.log(0.3))))
        value = 0.6 + 0.04 * np.log10(x / 1e-3) + rng.normal(0, 0.01)
        study.add_trial(create_trial(value=value, params={"lr": x}, distributions={"lr": lr}))
    for _ in range(6):  # as sweeper records them: PRUNED, diverged, infeasible
        x = float(np.exp(rng.uniform(np.log(1.0), np.log(10.0))))
        study.add_trial(
            create_trial(
                state=TrialState.PRUNED,
                params={"lr": x},
                distributions={"lr": lr},
                user_attrs={"diverged": True},
                system_attrs={"constraints": [1.0]},
            )
        )
    suggested = []
    for _ in range(8):
        trial = study.ask({"lr": lr})
        suggested.append(trial.params["lr"])
        study.tell(trial, state=TrialState.FAIL)
    return suggested


def test_gp_leaves_the_region_where_trials_diverged() -> None:
    import optuna

    from sweeper.config import parse_config
    from sweeper.plugins import sampler_for

    config = parse_config(
        {
            "study": {"name": "s", "direction": "maximize", "metric": "m", "n_trials": 1},
            "task": {"name": "t:build"},
            "search": {"lr": {"low": 1e-3, "high": 10.0, "log": True}},
            "sampler": {"name": "gp", "n_startup_trials": 10},
        },
        Path("study.toml"),
    )
    aware = gp_suggestions(sampler_for(config))
    assert max(aware) < 1.0, f"sweeper's GP samples where trials did not diverge: {aware}"
    plain = gp_suggestions(optuna.samplers.GPSampler(seed=0, n_startup_trials=10))
    assert float(np.median(plain)) > 1.0, f"Optuna's GP drifts to the diverged trials: {plain}"
