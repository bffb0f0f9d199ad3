"""The overfitting view of a trial: its train/validation gap, and whether it overfit.

Both read a trial's history (one record per validation: ``step``, ``epoch``,
``train_loss``, every ``val_*`` metric and any ``train_*`` metric).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

MIN_DROP = 0.005
"""How far the metric must fall after its peak (in its own units) to count as overfitting."""


def gap(record: Mapping[str, Any], metric: str) -> dict[str, float]:
    """Train against validation at one validation: loss (val - train), metric (train - val)."""
    found: dict[str, float] = {}
    if "val_loss" in record and "train_loss" in record:
        found["loss"] = float(record["val_loss"]) - float(record["train_loss"])
    twin = "train_" + metric.removeprefix("val_")
    if metric.startswith("val_") and twin in record and metric in record:
        found[metric.removeprefix("val_")] = float(record[twin]) - float(record[metric])
    return found


def overfit(
    history: Sequence[Mapping[str, Any]], metric: str, maximize: bool, min_drop: float = MIN_DROP
) -> dict[str, Any] | None:
    """How the trial overfit, or None: its metric peaked and then fell while its train loss fell.

    The fall is from the peak to the last validation; the train loss must be
    lower at the last validation than at the peak.
    """
    records = [r for r in history if metric in r]
    if len(records) < 2:
        return None
    sign = 1.0 if maximize else -1.0
    peak = max(range(len(records)), key=lambda i: sign * float(records[i][metric]))
    last = records[-1]
    if peak == len(records) - 1:
        return None
    drop = sign * (float(records[peak][metric]) - float(last[metric]))
    if drop < min_drop or "train_loss" not in last or "train_loss" not in records[peak]:
        return None
    train_fall = float(records[peak]["train_loss"]) - float(last["train_loss"])
    if train_fall <= 0:
        return None
    return {
        "peak_step": records[peak].get("step"),
        "peak_value": float(records[peak][metric]),
        "last_value": float(last[metric]),
        "drop": drop,
        "train_loss_fall": train_fall,
    }


def describe(found: Mapping[str, Any], metric: str) -> str:
    return (
        f"{metric} peaked at {found['peak_value']:.4g} (step {found['peak_step']}) and fell "
        f"to {found['last_value']:.4g} while the training loss fell by "
        f"{found['train_loss_fall']:.3g}"
    )
