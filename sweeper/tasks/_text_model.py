"""The LightningModule and data of the text-classification task; imported in trials."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, TensorDataset
from torchmetrics.classification import (
    MulticlassAccuracy,
    MulticlassF1Score,
    MulticlassPrecision,
    MulticlassRecall,
)

from sweeper.tasks.text_classification import TextData

_DROPOUT_KEYS = (
    "hidden_dropout_prob",
    "attention_probs_dropout_prob",
    "dropout",
    "attention_dropout",
)
_LAYER_PATHS = ("encoder.layer", "transformer.layer", "encoder.layers", "layers")


def build_text_task(data: TextData, params: dict[str, Any]) -> tuple[Any, Any]:
    """A classifier on the local model with params applied, and its data."""
    module = TextClassifier(data, params)
    return module, TextDataModule(data, int(params["batch_size"]))


def encoder_parts(model: Any) -> tuple[Any, list[Any]]:
    """The embeddings and the encoder layers, bottom first, of a BERT-like model."""
    base = model.base_model
    for path in _LAYER_PATHS:
        layers: Any = base
        for name in path.split("."):
            layers = getattr(layers, name, None)
        if layers is not None:
            return getattr(base, "embeddings", None), list(layers)
    raise ValueError(f"cannot find the encoder layers of {type(base).__name__}")


class TextDataModule(pl.LightningDataModule):
    def __init__(self, data: TextData, batch_size: int) -> None:
        super().__init__()
        self.data = data
        self.batch_size = batch_size

    @staticmethod
    def _dataset(split: dict[str, Any]) -> TensorDataset:
        return TensorDataset(
            *(torch.from_numpy(split[k]) for k in ("input_ids", "attention_mask", "labels"))
        )

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self._dataset(self.data.train), batch_size=self.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self._dataset(self.data.val), batch_size=max(64, self.batch_size))

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """The batch without the padding columns none of its rows uses: rows are padded to
        ``max_length``, and the model's compute grows with the columns while masked padding
        changes no output (on the quickstart's data a batch's longest row is half of it)."""
        input_ids, attention_mask, labels = batch
        used = attention_mask.any(dim=0)
        return input_ids[:, used], attention_mask[:, used], labels


class TextClassifier(pl.LightningModule):
    """Sequence classification with layer freezing, layer-wise LR decay and warm-up."""

    def __init__(self, data: TextData, params: dict[str, Any]) -> None:
        super().__init__()
        from transformers import AutoConfig, AutoModelForSequenceClassification

        self.params = params
        self.labels = data.labels
        self.val_rows = data.val_rows
        self.validation_errors: list[dict[str, Any]] = []
        """The val examples predicted wrong at the last validation, most confident first."""
        self._val_probs: list[torch.Tensor] = []
        self._val_labels: list[torch.Tensor] = []
        self._train_seen = False
        config = AutoConfig.from_pretrained(data.model_dir, local_files_only=True)
        overrides: dict[str, Any] = {}
        if params["dropout"] is not None:
            overrides = {k: float(params["dropout"]) for k in _DROPOUT_KEYS if hasattr(config, k)}
        self.model = AutoModelForSequenceClassification.from_pretrained(
            data.model_dir,
            local_files_only=True,
            num_labels=len(data.labels),
            id2label=dict(enumerate(data.labels)),
            label2id={label: i for i, label in enumerate(data.labels)},
            **overrides,
        )
        self.model.train()  # from_pretrained returns it in eval mode, dropout off
        self.freeze_bottom(int(params["freeze_layers"]))
        n = len(data.labels)
        self.metrics = torch.nn.ModuleDict(
            {
                "acc": MulticlassAccuracy(n, average="micro"),
                "f1": MulticlassF1Score(n, average="macro"),
                "precision": MulticlassPrecision(n, average="macro"),
                "recall": MulticlassRecall(n, average="macro"),
                "precision_per_class": MulticlassPrecision(n, average=None),
                "recall_per_class": MulticlassRecall(n, average=None),
            }
        )
        self.train_metrics = torch.nn.ModuleDict(
            {
                "acc": MulticlassAccuracy(n, average="micro"),
                "f1": MulticlassF1Score(n, average="macro"),
            }
        )

    def freeze_bottom(self, n_layers: int) -> None:
        """Freeze the embeddings and the bottom ``n_layers`` encoder layers (0: none)."""
        if n_layers <= 0:
            return
        embeddings, layers = encoder_parts(self.model)
        frozen = ([embeddings] if embeddings is not None else []) + layers[:n_layers]
        for part in frozen:
            for parameter in part.parameters():
                parameter.requires_grad_(False)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask).logits

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        input_ids, attention_mask, labels = batch
        logits = self(input_ids, attention_mask)
        loss = torch.nn.functional.cross_entropy(logits, labels)
        self.log("train_loss", loss)
        for metric in self.train_metrics.values():
            metric.update(logits.detach(), labels)  # type: ignore[operator]
        self._train_seen = True
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        input_ids, attention_mask, labels = batch
        logits = self(input_ids, attention_mask)
        self.log("val_loss", torch.nn.functional.cross_entropy(logits, labels))
        for metric in self.metrics.values():
            metric.update(logits, labels)  # type: ignore[operator]
        self._val_probs.append(torch.softmax(logits.detach().float(), dim=-1).cpu())
        self._val_labels.append(labels.detach().cpu())

    def on_validation_epoch_end(self) -> None:
        metrics: dict[str, Any] = dict(self.metrics.items())
        for name in ("acc", "f1", "precision", "recall"):
            self.log(f"val_{name}", metrics[name].compute())
        for kind in ("precision", "recall"):
            values = metrics[f"{kind}_per_class"].compute()
            for label, value in zip(self.labels, values, strict=True):
                self.log(f"val_{kind}_{label}", value)
        for metric in metrics.values():
            metric.reset()
        if self._train_seen:  # the training metrics since the previous validation
            for name, metric in self.train_metrics.items():
                self.log(f"train_{name}", metric.compute())  # type: ignore[operator]
                metric.reset()  # type: ignore[operator]
            self._train_seen = False
        self.validation_errors = self._confident_errors()

    def _confident_errors(self, keep: int = 50) -> list[dict[str, Any]]:
        if not self._val_probs:
            return []
        probs, labels = torch.cat(self._val_probs), torch.cat(self._val_labels)
        self._val_probs, self._val_labels = [], []
        confidence, predicted = probs.max(dim=-1)
        wrong = (predicted != labels).nonzero().flatten()
        order = wrong[confidence[wrong].argsort(descending=True)][:keep]
        errors = []
        for index in order.tolist():
            where, text = (
                self.val_rows[index]
                if index < len(self.val_rows)
                else (f"val row {index + 1}", "")
            )
            errors.append(
                {
                    "where": where,
                    "text": text,
                    "label": self.labels[int(labels[index])],
                    "predicted": self.labels[int(predicted[index])],
                    "confidence": round(float(confidence[index]), 4),
                }
            )
        return errors

    def parameter_groups(self) -> list[dict[str, Any]]:
        """Per-layer groups: the head at the full rate, each layer below decayed once more.

        With ``layer_lr_decay`` d and L layers, encoder layer i (1 = bottom)
        trains at lr * d**(L + 1 - i) and the embeddings at lr * d**(L + 1).
        Biases and normalization weights get no weight decay.
        """
        lr, decay = float(self.params["learning_rate"]), float(self.params["layer_lr_decay"])
        embeddings, layers = encoder_parts(self.model)
        depth: dict[int, int] = {}
        if embeddings is not None:
            depth.update({id(p): 0 for p in embeddings.parameters()})
        for i, layer in enumerate(layers, 1):
            depth.update({id(p): i for p in layer.parameters()})
        top = len(layers) + 1
        groups: dict[tuple[int, bool], dict[str, Any]] = {}
        for name, parameter in self.model.named_parameters():
            if not parameter.requires_grad:
                continue
            level = depth.get(id(parameter), top)
            no_decay = parameter.ndim < 2 or "norm" in name.lower()
            group = groups.setdefault(
                (level, no_decay),
                {
                    "params": [],
                    "lr": lr * decay ** (top - level),
                    "weight_decay": 0.0 if no_decay else float(self.params["weight_decay"]),
                },
            )
            group["params"].append(parameter)
        return list(groups.values())

    def configure_optimizers(self) -> Any:
        from transformers import get_linear_schedule_with_warmup

        groups = self.parameter_groups()
        devices = {parameter.device.type for group in groups for parameter in group["params"]}
        # PyTorch's fused AdamW makes the same update in one kernel, not a loop over the
        # parameters: on the CPU the loop took a quarter of a MiniLM training step.
        fused = True if devices <= {"cpu", "cuda"} else None
        optimizer = torch.optim.AdamW(groups, fused=fused)
        total = max(1, int(self.trainer.estimated_stepping_batches))
        warmup = int(float(self.params["warmup_ratio"]) * total)
        schedule = get_linear_schedule_with_warmup(optimizer, warmup, total)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": schedule, "interval": "step"},
        }
