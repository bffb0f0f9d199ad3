"""An MLP on scikit-learn's handwritten digits: a small task that trains in seconds.

With ReLU a too large learning rate kills the network (the loss spikes, then
sits at chance); with ``activation = "tanh"`` it diverges (the loss explodes
and stays up), which is what the divergence benchmark needs.

The data is read once, at import, as NumPy arrays; tensors are made per trial.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

_digits = load_digits()
X_TRAIN, X_VAL, Y_TRAIN, Y_VAL = train_test_split(
    (_digits.data / 16.0).astype(np.float32),
    _digits.target.astype(np.int64),
    test_size=0.25,
    random_state=0,
    stratify=_digits.target,
)


class DigitsData(pl.LightningDataModule):
    def __init__(self, batch_size: int) -> None:
        super().__init__()
        self.batch_size = batch_size

    def train_dataloader(self) -> DataLoader:
        data = TensorDataset(torch.from_numpy(X_TRAIN), torch.from_numpy(Y_TRAIN))
        return DataLoader(data, batch_size=self.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        data = TensorDataset(torch.from_numpy(X_VAL), torch.from_numpy(Y_VAL))
        return DataLoader(data, batch_size=512)


class DigitsMLP(pl.LightningModule):
    def __init__(
        self,
        lr: float,
        hidden: int,
        dropout: float,
        optimizer: str,
        activation: str = "relu",
        log_size: bool = False,
    ) -> None:
        super().__init__()
        self.lr, self.optimizer_name, self.log_size = lr, optimizer, log_size
        act = nn.Tanh() if activation == "tanh" else nn.ReLU()
        self.net = nn.Sequential(
            nn.Linear(64, hidden), act, nn.Dropout(dropout), nn.Linear(hidden, 10)
        )

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = nn.functional.cross_entropy(self.net(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        logits = self.net(x)
        self.log("val_loss", nn.functional.cross_entropy(logits, y))
        self.log("val_acc", (logits.argmax(dim=1) == y).float().mean())
        if self.log_size:  # the model's size, a second objective (digits-tradeoff.toml)
            self.log("val_params", float(sum(p.numel() for p in self.parameters())))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        if self.optimizer_name == "sgd":
            return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)
        return torch.optim.Adam(self.parameters(), lr=self.lr)


def build(params: dict[str, Any]) -> tuple[DigitsMLP, DigitsData]:
    """The task contract: params in, (LightningModule, LightningDataModule) out."""
    model = DigitsMLP(
        params["lr"],
        params["hidden"],
        params["dropout"],
        params["optimizer"],
        params.get("activation", "relu"),
        bool(params.get("log_size", False)),
    )
    return model, DigitsData(params["batch_size"])
