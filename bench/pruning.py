"""What each pruner saves, against no pruning, over workloads of different shapes and seeds.

    python bench/pruning.py [--workloads digits text cnn] [--seeds 3] [--trials 16]
                            [--settings none default median incumbent asha hyperband]
                            [--workers 1]
    python bench/pruning.py --quick    # digits, 1 seed, 6 trials, 2 workers: about 3 minutes
    python bench/pruning.py --workloads text --seeds 1 --trials 6 --settings none default

Every run is a real ``sweeper start`` on a study file generated in a temporary
folder (removed afterwards), TPE seeded with the seed, ``cpu_workers = 1`` by
default: one trial at a time, so the pruner always sees every earlier trial and
the runs of one seed differ only by what pruning changed. Workloads:

- ``digits``: the MLP of ``studies/digits_task.py`` with the space of
  ``studies/digits.toml`` (lr 1e-4..3, SGD or Adam), 4 epochs.
- ``text``: the built-in text-classification task on the packaged MiniLM, 128
  rows a class of the quickstart's VADER data (48 a class to validate),
  max_length 12, 2 epochs, the quickstart's space.
- ``cnn``: ``bench/pruning_tasks.py``, a small CNN on noisy 8x8 digits with
  warm-up then cosine decay to zero, whose curves cross late.

Every workload validates 8 to 12 times a trial (digits twice an epoch, text and
cnn four times), so a pruner can act within the first epoch. Settings: ``none``
(no pruner, divergence guard off: the baseline), ``default`` (no ``[pruner]``
and no ``[divergence]``: what a study file without them gets), ``median`` and
``percentile`` (25: only the top quarter is kept) with 2 start-up trials,
``incumbent`` (sweeper's incumbent pruner as it comes: a trial behind the best
complete trial's curve at the same step by more than that curve's own noise is
stopped), ``incumbent-strict`` (the same with no margin),
``asha`` (successive halving, reduction factor 3, rungs in optimizer steps at
1/27, 1/9, 1/3 of a full trial), ``asha-auto`` (Optuna's successive halving as it
comes: reduction factor 4, the first rung at 1/100 of the first finished trial's
steps, nothing known in advance) and ``hyperband`` (the rungs of ``asha``, 4
brackets).
All but ``none`` keep the divergence guard at its default.

Steps are the optimizer steps each trial ran (``user_attrs["steps"]``, the
trainer's global step when it stopped), summed over the study and divided by
the sum of the ``none`` run of the same seed. Best is the best complete
trial's value; the target of issue 12 is met by a setting that runs at most
25 % of the steps of no pruning on every workload (mean over seeds) with a
mean best within (or above) the seed spread of no pruning.
"""

from __future__ import annotations

import argparse
import dataclasses
import shutil
import signal
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import optuna
from optuna.trial import FrozenTrial, TrialState

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from sweeps import start  # noqa: E402  (bench/sweeps.py, beside this script)

from sweeper.config import DivergenceSection, StudyConfig  # noqa: E402

TARGET = 0.25
"""Most steps, as a share of no pruning's, that issue 12 allows the default."""


@dataclass(frozen=True)
class Workload:
    """One sweep to run under every setting: its study file's sections and its files."""

    description: str
    metric: str
    task: str
    trainer: str
    search: str
    files: tuple[Path, ...]


TEXT = Workload(
    "text-classification, MiniLM, 384 VADER rows, max_length 12, 2 epochs of 24 steps",
    "val_f1",
    """name = "text-classification"
model = "pruning_tasks:text_model"
train = "pruning_tasks:text_train"
val = "pruning_tasks:text_val"
max_length = 12""",
    "max_epochs = 2\nval_check_interval = 0.25",
    """learning_rate = { low = 3e-5, high = 1e-3, log = true }
freeze_layers = { choices = [0, 2] }
warmup_ratio = { low = 0.0, high = 0.2 }
batch_size = 16""",
    (
        ROOT / "bench" / "pruning_tasks.py",
        ROOT / "studies" / "vader_sentiment.py",
    ),
)

WORKLOADS = {
    "digits": Workload(
        "digits MLP (studies/digits_task.py), 4 epochs of 22 steps",
        "val_acc",
        'name = "digits_task:build"',
        "max_epochs = 4\nval_check_interval = 0.5",
        """lr = { low = 1e-4, high = 3.0, log = true }
hidden = { low = 16, high = 128, step = 16 }
dropout = { low = 0.0, high = 0.5 }
optimizer = { choices = ["sgd", "adam"] }
batch_size = 64""",
        (ROOT / "studies" / "digits_task.py",),
    ),
    "text": TEXT,
    "text-480": dataclasses.replace(
        TEXT,
        description="the text workload validated on 480 rows (160 a class): a less noisy F1",
        task=TEXT.task.replace("pruning_tasks:text_val", "pruning_tasks:text_val_large"),
    ),
    "cnn": Workload(
        "CNN on noisy 8x8 digits (bench/pruning_tasks.py), warm-up + cosine, 3 epochs of 43 steps",
        "val_acc",
        'name = "pruning_tasks:build"',
        "max_epochs = 3\nval_check_interval = 0.25",
        """lr = { low = 1e-3, high = 1.0, log = true }
warmup = { low = 0.0, high = 0.6 }
channels = { low = 8, high = 32, step = 8 }
weight_decay = { low = 1e-5, high = 1e-2, log = true }
batch_size = 32""",
        (ROOT / "bench" / "pruning_tasks.py",),
    ),
}
SETTINGS = (
    "none",
    "default",
    "median",
    "percentile",
    "incumbent",
    "incumbent-strict",
    "asha",
    "asha-auto",
    "hyperband",
)
STUDY = """
[study]
name = "bench"
direction = "maximize"
metric = "{metric}"
n_trials = {trials}
seed = {seed}

[task]
{task}

[trainer]
{trainer}

[search]
{search}
{pruner}
[resources]
{resources}
"""


def write_study(
    folder: Path, workload: Workload, trials: int, seed: int, pruner: str, resources: str
) -> Path:
    """``folder/bench.toml``, a sweep of ``workload`` (study "bench") with its ``[pruner]``
    (and ``[divergence]``) sections and the lines of its ``[resources]``, its files beside it."""
    for path in workload.files:
        shutil.copy(path, folder / path.name)
    study_file = folder / "bench.toml"
    study_file.write_text(
        STUDY.format(
            metric=workload.metric,
            trials=trials,
            seed=seed,
            task=workload.task,
            trainer=workload.trainer,
            search=workload.search,
            pruner=pruner,
            resources=resources,
        )
    )
    return study_file


def pruner_sections(setting: str, steps: int) -> str:
    """The ``[pruner]`` (and ``[divergence]``) of a setting; ``steps``: a full trial's steps."""
    rung = max(1, round(steps / 27))
    return {
        "none": '[pruner]\nname = "none"\n\n[divergence]\nenabled = false\n',
        "default": "",
        "median": '[pruner]\nname = "median"\nn_startup_trials = 2\n',
        "percentile": '[pruner]\nname = "percentile"\npercentile = 25.0\nn_startup_trials = 2\n',
        "incumbent": '[pruner]\nname = "incumbent"\n',
        "incumbent-strict": '[pruner]\nname = "incumbent"\nmargin = 0.0\n',
        "asha": f'[pruner]\nname = "asha"\nmin_resource = {rung}\nreduction_factor = 3\n',
        "asha-auto": '[pruner]\nname = "asha"\n',
        "hyperband": (
            f'[pruner]\nname = "hyperband"\nmin_resource = {rung}\nmax_resource = {steps}\n'
            "reduction_factor = 3\n"
        ),
    }[setting]


def default_words() -> str:
    """What a study file without ``[pruner]`` and ``[divergence]`` gets, in words."""
    pruner = StudyConfig.model_fields["pruner"].default
    options = ", ".join(f"{k} = {v!r}" for k, v in pruner.options.items()) or "Optuna's defaults"
    guard = "on" if DivergenceSection().enabled else "off"
    return f"{pruner.name} ({options}), divergence guard {guard}"


@dataclass
class Run:
    """One sweep's outcome."""

    steps: int
    best: float
    pruned: int
    wall: float
    trials: list[FrozenTrial]


def run(workload: Workload, setting: str, seed: int, trials: int, workers: int, steps: int) -> Run:
    """One ``sweeper start`` in a temporary folder, removed afterwards."""
    with tempfile.TemporaryDirectory(prefix="sweeper-pruning-") as tmp:
        folder = Path(tmp)
        study_file = write_study(
            folder,
            workload,
            trials,
            seed,
            pruner_sections(setting, steps),
            f'devices = "cpu"\ncpu_workers = {workers}',
        )
        wall = start(study_file, setting)
        study = optuna.load_study(study_name="bench", storage=f"sqlite:///{folder}/bench.db")
        finished = study.get_trials(deepcopy=False)
    values = [t.value for t in finished if t.state == TrialState.COMPLETE and t.value is not None]
    return Run(
        steps=sum(int(t.user_attrs.get("steps", 0)) for t in finished),
        best=max(values) if values else float("nan"),
        pruned=sum(t.state == TrialState.PRUNED for t in finished),
        wall=wall,
        trials=finished,
    )


def full_steps(baseline: Run) -> int:
    """The steps of a full trial: the longest trial of the run without pruning."""
    return max(int(t.user_attrs.get("steps", 0)) for t in baseline.trials)


def validations(baseline: Run) -> int:
    """The validations of a full trial: the most any trial of the run without pruning had."""
    return max(len(t.intermediate_values) for t in baseline.trials)


def crossing(baseline: Run, steps: int) -> float:
    """Rank correlation of each full trial's value at 1/4 of its steps with its best value.

    1 means the early ranking is the final one; lower, the curves cross.
    """
    early, final = [], []
    for trial in baseline.trials:
        if trial.state != TrialState.COMPLETE or trial.value is None:
            continue
        reached = [s for s in sorted(trial.intermediate_values) if s >= steps / 4]
        if reached:
            early.append(trial.intermediate_values[reached[0]])
            final.append(trial.value)
    if len(early) < 3 or len(set(early)) < 2 or len(set(final)) < 2:
        return float("nan")
    return _spearman(early, final)


def _ranks(values: list[float]) -> list[float]:
    order = sorted(range(len(values)), key=lambda i: values[i])
    ranks = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2
        i = j + 1
    return ranks


def _spearman(a: list[float], b: list[float]) -> float:
    return statistics.correlation(_ranks(a), _ranks(b))


def spread(values: list[float], fmt: str) -> str:
    mean = statistics.mean(values)
    if len(values) == 1:
        return format(mean, fmt)
    return f"{format(mean, fmt)} [{format(min(values), fmt)}-{format(max(values), fmt)}]"


def table(
    results: dict[str, dict[str, list[Run]]], settings: list[str]
) -> tuple[list[str], dict[str, list[str]]]:
    """The markdown table's lines, and for each setting what misses the target."""
    head = (
        "workload",
        "setting",
        "steps run",
        "of no pruning",
        "best",
        "within no pruning's spread",
        "pruned trials",
        "wall s",
    )
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    misses: dict[str, list[str]] = {s: [] for s in settings if s != "none"}
    for name, by_setting in results.items():
        baseline = by_setting["none"]
        low = min(r.best for r in baseline)
        for setting in settings:
            runs = by_setting[setting]
            shares = [r.steps / b.steps for r, b in zip(runs, baseline, strict=True)]
            best = statistics.mean(r.best for r in runs)
            within = best >= low
            cells = [
                name,
                setting,
                spread([r.steps for r in runs], ".0f"),
                spread([100 * s for s in shares], ".0f") + " %",
                spread([r.best for r in runs], ".4f"),
                "-" if setting == "none" else ("yes" if within else f"no (< {low:.4f})"),
                spread([r.pruned for r in runs], ".1f"),
                spread([r.wall for r in runs], ".0f"),
            ]
            lines.append("| " + " | ".join(cells) + " |")
            if setting == "none":
                continue
            share = statistics.mean(shares)
            if share > TARGET:
                misses[setting].append(f"{name} runs {100 * share:.0f} % of the steps")
            if not within:
                misses[setting].append(f"{name} best {best:.4f} below {low:.4f}")
    return lines, misses


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workloads", nargs="+", choices=list(WORKLOADS), default=list(WORKLOADS))
    parser.add_argument("--settings", nargs="+", choices=SETTINGS, default=list(SETTINGS))
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--trials", type=int, default=16)
    parser.add_argument("--workers", type=int, default=1, help="cpu_workers of every sweep")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="digits only, 1 seed, 6 trials, cpu_workers = 2: about 3 minutes",
    )
    args = parser.parse_args()
    if args.quick:
        args.workloads, args.seeds, args.trials, args.workers = ["digits"], 1, 6, 2
    settings = ["none"] + [s for s in SETTINGS if s in args.settings and s != "none"]
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    # On SIGTERM too, the running sweep is stopped and its temporary folder removed.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    began = time.perf_counter()
    results: dict[str, dict[str, list[Run]]] = {}
    notes: list[str] = []
    for name in args.workloads:
        workload = WORKLOADS[name]
        results[name] = {s: [] for s in settings}
        correlations = []
        for seed in range(args.seeds):
            steps = 0
            for setting in settings:
                outcome = run(workload, setting, seed, args.trials, args.workers, steps)
                if setting == "none":
                    steps = full_steps(outcome)
                    correlations.append(crossing(outcome, steps))
                results[name][setting].append(outcome)
                print(
                    f"{name} seed {seed}: {setting}: {outcome.steps} steps, best "
                    f"{outcome.best:.4f}, {outcome.wall:.0f} s",
                    file=sys.stderr,
                )
        notes.append(
            f"- {name}: {workload.description}; {workload.metric}; a full trial {steps} steps "
            f"and {validations(results[name]['none'][-1])} validations; "
            "rank correlation of no pruning's values at 1/4 of the steps with the best: "
            + spread(correlations, ".2f")
            + " (1: the early ranking is the final one)"
        )
    lines, misses = table(results, settings)
    print(
        f"{args.trials} trials x {args.seeds} seeds, cpu_workers = {args.workers}, TPE; "
        "mean [min-max] over seeds"
    )
    print("\n".join(lines))
    print()
    print("\n".join(notes))
    print(f"- default: {default_words()}")
    print()
    for setting, missed in misses.items():
        verdict = "meets" if not missed else "misses"
        why = "" if not missed else ": " + "; ".join(missed)
        print(
            f"{setting}: {verdict} the target (at most {100 * TARGET:.0f} % of the steps of no "
            f"pruning on every workload, best within its seed spread){why}"
        )
    print(f"total {(time.perf_counter() - began) / 60:.1f} min")


if __name__ == "__main__":
    main()
