"""Time to build the report of a large study (synthetic trials written straight to storage).

The report reads the trials as plain rows (sweeper.store); Optuna's own read of
the same trials is timed beside it for comparison.

python bench/report.py [--trials 10000]
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time
from pathlib import Path

import numpy as np
import optuna
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import TrialState, create_trial

from sweeper.config import parse_config
from sweeper.results.report import build_report
from sweeper.store import open_storage, read_trials

STUDY = {
    "study": {"name": "big", "direction": "maximize", "metric": "val_acc", "n_trials": 10},
    "task": {"name": "unused:build"},
    "search": {
        "lr": {"low": 1e-5, "high": 10.0, "log": True},
        "hidden": {"low": 16, "high": 256, "step": 16},
        "optimizer": {"choices": ["sgd", "adam"]},
    },
}
DISTRIBUTIONS = {
    "lr": FloatDistribution(1e-5, 10.0, log=True),
    "hidden": IntDistribution(16, 256, step=16),
    "optimizer": CategoricalDistribution(["sgd", "adam"]),
}


def synthetic(n: int, seed: int = 0) -> list[optuna.trial.FrozenTrial]:
    """Trials like a real sweep's: curves of 10 validations, some pruned or diverged."""
    rng = np.random.default_rng(seed)
    trials = []
    for _ in range(n):
        lr = float(math.exp(rng.uniform(math.log(1e-5), math.log(10.0))))
        params = {
            "lr": lr,
            "hidden": int(rng.integers(1, 17)) * 16,
            "optimizer": str(rng.choice(["sgd", "adam"])),
        }
        quality = 0.95 - 0.1 * abs(math.log10(lr) + 2.5)
        kind = "diverged" if lr > 1.0 else str(rng.choice(["complete", "pruned"], p=[0.6, 0.4]))
        steps = 3 if kind == "diverged" else (10 if kind == "complete" else 4)
        curve = {
            100 * (s + 1): float(quality * (1 - math.exp(-(s + 1) / 3))) for s in range(steps)
        }
        history = [
            {"step": s, "epoch": i, "val_acc": v, "val_loss": 1 - v, "train_loss": 0.9 - v}
            for i, (s, v) in enumerate(curve.items())
        ]
        attrs = {
            "history": history,
            "steps": max(curve),
            "fit_seconds": 0.01 * max(curve),
            "best_step": max(curve, key=curve.get),
        }
        if kind == "diverged":
            attrs.update(divergence_onset=250, stop_reason="diverged: loss=nan at step 255")
        trials.append(
            create_trial(
                state=TrialState.COMPLETE if kind == "complete" else TrialState.PRUNED,
                value=max(curve.values()) if kind == "complete" else None,
                params=params,
                distributions=DISTRIBUTIONS,
                user_attrs=attrs,
                intermediate_values=curve,
            )
        )
    return trials


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=10_000)
    args = parser.parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "big.toml"
        config = parse_config(STUDY, path)
        write_fast(config.storage_url, synthetic(args.trials))
        started = time.perf_counter()
        loaded = optuna.load_study(study_name="big", storage=config.storage_url)
        text = build_report(config, loaded)
        total = time.perf_counter() - started
        started = time.perf_counter()
        read_trials(loaded)
        read = time.perf_counter() - started
        started = time.perf_counter()
        loaded.get_trials(deepcopy=False)
        optuna_read = time.perf_counter() - started
    print("| trials | report total s | of which storage read s | Optuna's own read s | HTML MB |")
    print("|---|---|---|---|---|")
    print(
        f"| {args.trials:,} | {total:.2f} | {read:.2f} | {optuna_read:.2f} | "
        f"{len(text) / 1e6:.1f} |"
    )


def write_fast(url: str, trials: list[optuna.trial.FrozenTrial]) -> None:
    """Add the trials in one storage as sweeper opens it (WAL, no wait for the disk per commit)."""
    storage = open_storage(url, create=True)
    study = optuna.create_study(study_name="big", storage=storage, direction="maximize")
    study.add_trials(trials)
    storage.engine.dispose()


if __name__ == "__main__":
    main()
