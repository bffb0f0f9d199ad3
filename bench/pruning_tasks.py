"""Workloads of ``bench/pruning.py`` that ``studies/`` lacks; nothing is downloaded.

``build`` (``pruning_tasks:build``): a small CNN on scikit-learn's 8x8 digits
with Gaussian pixel noise (fresh noise every training batch, fixed noise on
val), trained with SGD and momentum under a linear warm-up then a cosine decay
to zero. A run with a high peak learning rate and a long warm-up looks poor
for most of its budget and gains most in its last steps, when the rate
anneals; a low rate learns early and plateaus: the learning curves cross late,
which is what an early-stopping pruner gets wrong.

``text_model``, ``text_train``, ``text_val``: the quickstart's encoder and a
small balanced subset of its VADER rows (``studies/vader_sentiment.py``, copied
next to the study file by the bench), for the built-in text-classification task.

The data is prepared once, at import, as NumPy arrays; tensors are made per trial.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

NOISE = 0.5
"""Standard deviation of the pixel noise; pixels are scaled to [0, 1]."""
TEXT_TRAIN_PER_CLASS = 128
TEXT_VAL_PER_CLASS = 48
TEXT_VAL_LARGE_PER_CLASS = 160

_digits = load_digits()
X_TRAIN, X_VAL, Y_TRAIN, Y_VAL = train_test_split(
    (_digits.images / 16.0).astype(np.float32)[:, None],
    _digits.target.astype(np.int64),
    test_size=0.25,
    random_state=0,
    stratify=_digits.target,
)
X_VAL = (X_VAL + np.random.default_rng(0).normal(0.0, NOISE, X_VAL.shape)).astype(np.float32)


class NoisyDigits(pl.LightningDataModule):
    def __init__(self, batch_size: int) -> None:
        super().__init__()
        self.batch_size = batch_size

    def train_dataloader(self) -> DataLoader:
        data = TensorDataset(torch.from_numpy(X_TRAIN), torch.from_numpy(Y_TRAIN))
        return DataLoader(data, batch_size=self.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        data = TensorDataset(torch.from_numpy(X_VAL), torch.from_numpy(Y_VAL))
        return DataLoader(data, batch_size=512)


class DigitsCNN(pl.LightningModule):
    def __init__(self, lr: float, warmup: float, channels: int, weight_decay: float) -> None:
        super().__init__()
        self.lr, self.warmup, self.weight_decay = lr, warmup, weight_decay
        self.net = nn.Sequential(
            nn.Conv2d(1, channels, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(channels, 2 * channels, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(2 * channels * 16, 10),
        )

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        x = x + NOISE * torch.randn_like(x)
        loss = nn.functional.cross_entropy(self.net(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        logits = self.net(x)
        self.log("val_loss", nn.functional.cross_entropy(logits, y))
        self.log("val_acc", (logits.argmax(dim=1) == y).float().mean())

    def configure_optimizers(self) -> Any:
        optimizer = torch.optim.SGD(
            self.parameters(), lr=self.lr, momentum=0.9, weight_decay=self.weight_decay
        )
        total = max(1, int(self.trainer.estimated_stepping_batches))
        warm = max(1, round(self.warmup * total))

        def factor(step: int) -> float:
            if step < warm:
                return (step + 1) / warm
            return 0.5 * (1.0 + math.cos(math.pi * (step - warm) / max(1, total - warm)))

        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        step = {"scheduler": schedule, "interval": "step"}
        return {"optimizer": optimizer, "lr_scheduler": step}


def build(params: dict[str, Any]) -> tuple[DigitsCNN, NoisyDigits]:
    """The task contract: params in, (LightningModule, LightningDataModule) out."""
    model = DigitsCNN(params["lr"], params["warmup"], params["channels"], params["weight_decay"])
    return model, NoisyDigits(params["batch_size"])


def text_model() -> Path:
    """The packaged all-MiniLM-L6-v2 encoder, as the quickstart uses it."""
    import vader_sentiment

    return vader_sentiment.model()


def _balanced(rows: list[dict[str, str]], per_class: int) -> list[dict[str, str]]:
    """``per_class`` rows of each label, drawn with a fixed seed."""
    rng = np.random.default_rng(0)
    kept: list[dict[str, str]] = []
    for label in sorted({row["label"] for row in rows}):
        members = [row for row in rows if row["label"] == label]
        kept += [members[i] for i in rng.permutation(len(members))[:per_class]]
    return kept


def text_train() -> list[dict[str, str]]:
    """128 rows of each class from the quickstart's train split."""
    import vader_sentiment

    return _balanced(vader_sentiment.train(), TEXT_TRAIN_PER_CLASS)


def text_val() -> list[dict[str, str]]:
    """48 rows of each class from the quickstart's val split."""
    import vader_sentiment

    return _balanced(vader_sentiment.val(), TEXT_VAL_PER_CLASS)


def text_val_large() -> list[dict[str, str]]:
    """160 rows of each class from the quickstart's val split: a less noisy metric."""
    import vader_sentiment

    return _balanced(vader_sentiment.val(), TEXT_VAL_LARGE_PER_CLASS)
