"""Stratified k-fold splits, the same for the same labels, k and seed."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np


def stratified_folds(labels: Iterable[Any], k: int, seed: int) -> list[np.ndarray]:
    """``k`` disjoint index arrays covering every example, each class spread evenly.

    Within each class the examples are shuffled with ``seed`` and dealt to the
    folds in turn, continuing where the previous class stopped, so fold sizes
    differ by at most one and each class's count per fold by at most one.
    """
    if k < 2:
        raise ValueError("k-fold needs k >= 2")
    rng = np.random.default_rng(seed)
    folds: list[list[int]] = [[] for _ in range(k)]
    at = 0
    by_class: dict[object, list[int]] = {}
    for index, label in enumerate(labels):
        by_class.setdefault(label, []).append(index)
    for label in sorted(by_class, key=str):
        members = np.asarray(by_class[label])
        for index in members[rng.permutation(len(members))]:
            folds[at % k].append(int(index))
            at += 1
    return [np.sort(np.asarray(fold, dtype=np.int64)) for fold in folds]
