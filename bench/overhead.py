"""Per-trial overhead of sweeper against plain Optuna, on the digits MLP.

Overhead of a trial = the time its slot spent on anything but the task's own
work (build, Trainer, fit): the idle gap since the slot's previous trial plus
the trial's wall time beyond that work. sweeper pays for a forked process, its
own database connection and the claim; plain ``study.optimize`` runs the same
objective in one process, with no isolation. Start-up is the time from
launching ``sweeper start`` to its first trial running (validation, the data
audit, the study's creation, the workers' fork), beside the cost of one fresh
``import lightning.pytorch``.

    python bench/overhead.py [--trials 30] [--epochs 2]
"""

from __future__ import annotations

import argparse
import datetime as dt
import itertools
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import optuna

ROOT = Path(__file__).resolve().parent.parent
STUDY = """
[study]
name = "overhead"
direction = "maximize"
metric = "val_acc"
n_trials = {trials}
seed = 1

[task]
name = "digits_task:build"

[trainer]
max_epochs = {epochs}

[search]
lr = {{ low = 1e-3, high = 0.1, log = true }}
hidden = {{ low = 16, high = 128, step = 16 }}
dropout = {{ low = 0.0, high = 0.3 }}
optimizer = {{ choices = ["adam"] }}
batch_size = 64

[pruner]
name = "none"

[resources]
devices = "cpu"
cpu_workers = 1
"""


def overheads(trials: list[optuna.trial.FrozenTrial], work: dict[int, float]) -> list[float]:
    """Gap since the previous trial's end plus wall time beyond the task's own work."""
    ordered = sorted(trials, key=lambda t: t.datetime_start)
    result = []
    for previous, trial in itertools.pairwise(ordered):
        gap = (trial.datetime_start - previous.datetime_complete).total_seconds()
        wall = (trial.datetime_complete - trial.datetime_start).total_seconds()
        result.append(gap + wall - work[trial.number])
    return result


def run_sweeper(folder: Path, trials: int, epochs: int) -> tuple[list[float], float, float]:
    """Overheads, total wall time, and the start-up: launch to the first trial running."""
    (folder / "digits_task.py").write_text((ROOT / "studies" / "digits_task.py").read_text())
    study_file = folder / "overhead.toml"
    study_file.write_text(STUDY.format(trials=trials, epochs=epochs))
    launched = dt.datetime.now()
    started = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "sweeper.cli", "start", str(study_file)],
        check=True,
        capture_output=True,
    )
    total = time.perf_counter() - started
    study = optuna.load_study(study_name="overhead", storage=f"sqlite:///{folder}/overhead.db")
    first = min(t.datetime_start for t in study.get_trials() if t.datetime_start is not None)
    done = study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))
    work = {t.number: t.user_attrs["fit_seconds"] for t in done}
    return overheads(done, work), total, (first - launched).total_seconds()


def import_seconds() -> float:
    """Wall time of a fresh Python that imports Lightning, and nothing else."""
    started = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import lightning.pytorch"], check=True)
    return time.perf_counter() - started


def run_plain(folder: Path, trials: int, epochs: int) -> tuple[list[float], float, float]:
    sys.path.insert(0, str(ROOT / "studies"))

    import lightning.pytorch as pl
    from digits_task import build

    from sweeper.run.trainer import quiet_lightning

    quiet_lightning()

    work: dict[int, float] = {}

    def objective(trial: optuna.Trial) -> float:
        params = {
            "lr": trial.suggest_float("lr", 1e-3, 0.1, log=True),
            "hidden": trial.suggest_int("hidden", 16, 128, step=16),
            "dropout": trial.suggest_float("dropout", 0.0, 0.3),
            "optimizer": trial.suggest_categorical("optimizer", ["adam"]),
            "batch_size": 64,
        }
        began = time.perf_counter()
        pl.seed_everything(trial.number, verbose=False)
        model, data = build(params)
        trainer = pl.Trainer(
            max_epochs=epochs,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            num_sanity_val_steps=0,
            accelerator="cpu",
            devices=1,
        )
        trainer.fit(model, datamodule=data)
        work[trial.number] = time.perf_counter() - began
        return float(trainer.callback_metrics["val_acc"])

    study = optuna.create_study(
        study_name="plain",
        direction="maximize",
        storage=f"sqlite:///{folder}/plain.db",
        sampler=optuna.samplers.TPESampler(seed=1),
    )
    started = time.perf_counter()
    study.optimize(objective, n_trials=trials)
    total = time.perf_counter() - started
    return overheads(study.get_trials(), work), total, float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=30)
    parser.add_argument("--epochs", type=int, default=2)
    args = parser.parse_args()
    import logging
    import warnings

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, runner in (
            ("sweeper (fork per trial)", run_sweeper),
            ("optuna study.optimize (in-process)", run_plain),
        ):
            values, total, startup = runner(Path(tmp), args.trials, args.epochs)
            values.sort()
            median, p90 = statistics.median(values), values[int(0.9 * (len(values) - 1))]
            rows.append((name, len(values) + 1, median, p90, startup, total))
    print(f"per-trial overhead, {args.trials} digits-MLP trials of {args.epochs} epochs, 1 slot")
    print(
        f"| {'runner':<36} | trials | median overhead s | p90 overhead s | start-up s "
        "| total wall s |"
    )
    print(f"|{'-' * 38}|--------|-------------------|----------------|------------|{'-' * 14}|")
    for name, count, median, p90, startup, total in rows:
        first = "-" if startup != startup else f"{startup:.1f}"
        print(
            f"| {name:<36} | {count:>6} | {median:>17.3f} | {p90:>14.3f} | {first:>10} "
            f"| {total:>12.1f} |"
        )
    print(
        "start-up: from launching `sweeper start` to its first trial running; a fresh "
        f"`import lightning.pytorch` alone takes {import_seconds():.1f} s"
    )


if __name__ == "__main__":
    main()
