"""LoRA against full fine-tuning on the quickstart's data: time, macro-F1, trainable share.

    python bench/lora.py [--trials 6] [--workers 2] [--seed 0]

Two real ``sweeper start`` sweeps of ``studies/quickstart.toml`` in a temporary
folder (removed afterwards), each with ``--trials`` trials, no pruner and the
divergence guard on: ``full`` searches the quickstart's space as it is
(learning_rate 3e-5..1e-3, freeze_layers 0 or 2, warmup_ratio 0..0.2);
``lora`` puts rank-8 adapters (alpha 16) on the attention layers and searches
learning_rate 1e-4..3e-3 (adapters want a larger rate) with the same warm-up.
Prints one markdown table: trials, median seconds per trial, best and median
val macro-F1 of the complete trials, trainable parameters as a share of the
model's.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import tomllib
from pathlib import Path

import optuna
import tomlkit
from optuna.trial import FrozenTrial, TrialState
from sweeps import start  # bench/sweeps.py, beside this script

ROOT = Path(__file__).resolve().parent.parent
QUICKSTART = ROOT / "studies" / "quickstart.toml"

VARIANTS: dict[str, dict[str, object]] = {
    "full": {},
    "lora": {
        "lora_r": 8,
        "lora_alpha": 16,
        "lora_target": "attention",
        "learning_rate": {"low": 1e-4, "high": 3e-3, "log": True},
        "freeze_layers": 0,
    },
}


def sweep(variant: str, trials: int, workers: int, seed: int) -> tuple[list[FrozenTrial], float]:
    """One sweep of the quickstart with the variant's search space; its trials and wall time."""
    data = tomllib.loads(QUICKSTART.read_text())
    data["study"].update(name=f"lora-bench-{variant}", n_trials=trials, seed=seed)
    data["search"].update(VARIANTS[variant])
    data["pruner"] = {"name": "none"}
    data["resources"]["cpu_workers"] = workers
    with tempfile.TemporaryDirectory(prefix="sweeper-lora-") as tmp:
        folder = Path(tmp)
        shutil.copy(ROOT / "studies" / "vader_sentiment.py", folder / "vader_sentiment.py")
        study_file = folder / "study.toml"
        study_file.write_text(tomlkit.dumps(data))
        wall = start(study_file, variant)
        name = data["study"]["name"]
        study = optuna.load_study(study_name=name, storage=f"sqlite:///{folder / name}.db")
        return study.get_trials(deepcopy=False), wall


def row(variant: str, trials: list[FrozenTrial], wall: float) -> str:
    ended = [t for t in trials if t.datetime_start and t.datetime_complete]
    seconds = [(t.datetime_complete - t.datetime_start).total_seconds() for t in ended]  # type: ignore[operator]
    values = [t.value for t in trials if t.state == TrialState.COMPLETE and t.value is not None]
    shares = [
        t.user_attrs["trainable_params"] / t.user_attrs["total_params"]
        for t in trials
        if t.user_attrs.get("total_params")
    ]
    cells = [
        variant,
        str(len(trials)),
        f"{statistics.median(seconds):.1f}" if seconds else "-",
        f"{max(values):.4f}" if values else "-",
        f"{statistics.median(values):.4f}" if values else "-",
        f"{100 * statistics.median(shares):.2f} %" if shares else "-",
        f"{wall:.0f}",
    ]
    return "| " + " | ".join(cells) + " |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=6)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    head = (
        "variant",
        "trials",
        "s per trial (median)",
        "best val macro-F1",
        "median val macro-F1",
        "trainable share",
        "sweep wall s",
    )
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for variant in VARIANTS:
        trials, wall = sweep(variant, args.trials, args.workers, args.seed)
        lines.append(row(variant, trials, wall))
        print(f"{variant}: {len(trials)} trials in {wall:.0f} s", file=sys.stderr)
    print(
        f"quickstart data, {args.trials} trials a variant, cpu_workers = {args.workers}, no pruner"
    )
    print("\n".join(lines))


if __name__ == "__main__":
    main()
