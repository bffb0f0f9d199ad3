"""Compute saved by the divergence guard, against no pruning and Optuna's pruners.

The same sweep (digits MLP with tanh, SGD with momentum, lr up to 10, TPE with the same
seed) runs under five settings, over several seeds. Every trial records where
its loss diverged (``divergence_onset``), also when the guard only watches.

    python bench/divergence.py [--seeds 3] [--trials 60] [--epochs 5]
"""

from __future__ import annotations

import argparse
import math
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

ROOT = Path(__file__).resolve().parent.parent
SETTINGS = {
    "no pruning": ('name = "none"', False),
    "median pruner": ('name = "median"', False),
    "guard": ('name = "none"', True),
    "guard + median": ('name = "median"', True),
    "guard + hyperband": ('name = "hyperband"\nmin_resource = 22\nreduction_factor = 3', True),
}
STUDY = """
[study]
name = "bench"
direction = "maximize"
metric = "val_acc"
n_trials = {trials}
seed = {seed}

[task]
name = "digits_task:build"

[trainer]
max_epochs = {epochs}

[search]
lr = {{ low = 1e-3, high = 10.0, log = true }}
hidden = {{ low = 16, high = 128, step = 16 }}
dropout = {{ low = 0.0, high = 0.5 }}
optimizer = "sgd"
activation = "tanh"
batch_size = 64

[sampler]
name = "tpe"

[pruner]
{pruner}

[divergence]
enabled = {guard}

[resources]
devices = "cpu"
cpu_workers = 2
"""


def run(folder: Path, pruner: str, guard: bool, seed: int, trials: int, epochs: int) -> Any:
    study_file = folder / "bench.toml"
    study_file.write_text(
        STUDY.format(
            trials=trials, seed=seed, epochs=epochs, pruner=pruner, guard=str(guard).lower()
        )
    )
    subprocess.run(
        [sys.executable, "-m", "sweeper.cli", "start", str(study_file)],
        check=True,
        capture_output=True,
    )
    study = optuna.load_study(study_name="bench", storage=f"sqlite:///{folder}/bench.db")
    return [t for t in study.get_trials() if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]


def position(trial: FrozenTrial) -> list[float]:
    """The trial's params scaled to [0, 1], log scale where the space is."""
    point = []
    for name, dist in sorted(trial.distributions.items()):
        value = trial.params[name]
        low, high = dist.low, dist.high  # type: ignore[attr-defined]
        if getattr(dist, "log", False):
            value, low, high = math.log(value), math.log(low), math.log(high)
        point.append((value - low) / (high - low))
    return point


def lands_where_diverged(trials: list[FrozenTrial]) -> float:
    """Share of second-half trials whose nearest earlier trial diverged."""
    ordered = sorted(trials, key=lambda t: t.number)
    half = len(ordered) // 2
    hits = 0
    for i in range(half, len(ordered)):
        here = position(ordered[i])
        nearest = min(ordered[:i], key=lambda t: math.dist(position(t), here))
        hits += "divergence_onset" in nearest.user_attrs
    return hits / (len(ordered) - half)


def measure(trials: list[FrozenTrial]) -> dict[str, float]:
    steps = [t.user_attrs.get("steps", 0) for t in trials]
    diverged = [t for t in trials if "divergence_onset" in t.user_attrs]
    lags = [t.user_attrs.get("steps", 0) - t.user_attrs["divergence_onset"] for t in diverged]
    values = [t.value for t in trials if t.state == TrialState.COMPLETE and t.value is not None]
    return {
        "steps": sum(steps),
        "diverged_share": sum(t.user_attrs.get("steps", 0) for t in diverged) / max(1, sum(steps)),
        "lag_median": statistics.median(lags) if lags else 0.0,
        "lag_max": max(lags) if lags else 0.0,
        "best": max(values) if values else float("nan"),
        "revisit": lands_where_diverged(trials),
        "diverged": len(diverged),
    }


def spread(values: list[float], fmt: str) -> str:
    mean = statistics.mean(values)
    if len(values) == 1:
        return format(mean, fmt)
    return f"{format(mean, fmt)} [{format(min(values), fmt)}-{format(max(values), fmt)}]"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--trials", type=int, default=60)
    parser.add_argument("--epochs", type=int, default=5)
    args = parser.parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    results: dict[str, list[dict[str, float]]] = {name: [] for name in SETTINGS}
    for seed in range(args.seeds):
        for name, (pruner, guard) in SETTINGS.items():
            with tempfile.TemporaryDirectory() as tmp:
                folder = Path(tmp)
                task = (ROOT / "studies" / "digits_task.py").read_text()
                (folder / "digits_task.py").write_text(task)
                trials = run(folder, pruner, guard, seed, args.trials, args.epochs)
                results[name].append(measure(trials))
                print(f"seed {seed}: {name} done", file=sys.stderr)
    print(
        f"{args.trials} trials x {args.seeds} seeds, digits MLP, SGD, lr in [1e-3, 10], "
        f"{args.epochs} epochs; mean [min-max] over seeds"
    )
    header = (
        "setting",
        "total steps",
        "steps in diverged trials",
        "onset to stop (median/max)",
        "best val_acc",
        "2nd half near a diverged trial",
        "diverged trials",
    )
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join("---" for _ in header) + "|")
    for name, rows in results.items():
        cells = [
            name,
            spread([r["steps"] for r in rows], ".0f"),
            spread([100 * r["diverged_share"] for r in rows], ".1f") + " %",
            f"{statistics.median(r['lag_median'] for r in rows):.0f} / "
            f"{max(r['lag_max'] for r in rows):.0f}",
            spread([r["best"] for r in rows], ".4f"),
            spread([100 * r["revisit"] for r in rows], ".0f") + " %",
            spread([r["diverged"] for r in rows], ".1f"),
        ]
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
