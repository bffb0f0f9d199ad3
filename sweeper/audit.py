"""The data audit: what is wrong with the examples before any GPU-hour is spent on them.

Checks empty inputs and labels, duplicates, inputs with conflicting labels,
leakage of val into train (exact and after normalising case, white space and
punctuation), class balance, classes missing from a split, and whether there
is enough data to learn and to measure. Each finding has a severity: errors
stop ``sweeper start`` unless ``--ignore-audit``; warnings are printed and stored on
the study.

A task offers its examples through :func:`examples_of`: the built-in tasks
read their own files; a ``module:function`` task may define ``examples()`` in
the same module, returning ``{"train": [...], "val": [...]}`` where each item
is a mapping with ``text`` and ``label`` (and optionally ``where``, shown in
findings; default ``<split> row N``).
"""

from __future__ import annotations

import importlib
import re
import unicodedata
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from sweeper.config import StudyConfig
from sweeper.errors import DataError, TaskError

Severity = Literal["error", "warning", "info"]
SHOWN = 5
"""Offending rows printed per finding; ``--json`` gives all of them."""
STORED = 50
"""Offending rows per finding kept on the study."""


@dataclass(frozen=True)
class Example:
    """One example: where it comes from, its input as text, its label."""

    where: str
    text: str
    label: str


@dataclass
class Finding:
    severity: Severity
    check: str
    message: str
    rows: list[str] = field(default_factory=list)


@dataclass
class Audit:
    """The findings of one audit, errors first."""

    findings: list[Finding]
    skipped: str | None = None

    @property
    def errors(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == "error"]

    @property
    def warnings(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == "warning"]

    def to_dict(self, rows: int | None = None) -> dict[str, Any]:
        return {
            "errors": len(self.errors),
            "warnings": len(self.warnings),
            "skipped": self.skipped,
            "findings": [
                {**asdict(f), "count": len(f.rows), "rows": f.rows[:rows]} for f in self.findings
            ],
        }

    def lines(self) -> list[str]:
        """The audit for people: counts, each finding, its first offending rows."""
        if self.skipped:
            return [f"data audit skipped: {self.skipped}"]
        head = f"data audit: {len(self.errors)} error(s), {len(self.warnings)} warning(s)"
        lines = [head]
        for finding in self.findings:
            lines.append(f"  {finding.severity:<7} {finding.check}: {finding.message}")
            for row in finding.rows[:SHOWN]:
                lines.append(f"            {row}")
            if len(finding.rows) > SHOWN:
                lines.append(f"            … {len(finding.rows) - SHOWN} more (--json lists all)")
        return lines


def examples_of(config: StudyConfig) -> dict[str, list[Example]] | None:
    """The task's examples by split, or None when the task offers none."""
    from sweeper.tasks import BUILTIN, import_near, load_task

    name = config.task.name
    if name in BUILTIN:
        module = importlib.import_module(BUILTIN[name].split(":")[0])
        hook = getattr(module, "examples", None)
        return None if hook is None else hook(config)
    load_task(config)  # a clear error for a task that cannot be imported
    module = import_near(config, name.split(":")[0])
    hook = getattr(module, "examples", None)
    if hook is None:
        return None
    try:
        raw = hook()
    except Exception as exc:  # a user's hook can raise anything
        raise TaskError(
            f"{config.path}: task.name: {name.split(':')[0]}.examples() failed: "
            f"{type(exc).__name__}: {exc}"
        ) from None
    return from_mappings(config, raw)


def from_mappings(config: StudyConfig, raw: Any) -> dict[str, list[Example]]:
    """``{"train": [{"text": ..., "label": ...}], ...}`` from a task's hook, checked."""
    where = f"{config.path}: task.name: examples()"
    if not isinstance(raw, Mapping) or "train" not in raw:
        raise TaskError(f"{where} must return a mapping with a 'train' split (and 'val')")
    splits = {}
    for split, items in raw.items():
        examples = []
        for number, item in enumerate(items, 1):
            if not isinstance(item, Mapping) or "text" not in item or "label" not in item:
                raise TaskError(f"{where}: {split} row {number} needs 'text' and 'label'")
            examples.append(
                Example(
                    str(item.get("where", f"{split} row {number}")),
                    _text(item["text"]),
                    _text(item["label"]),
                )
            )
        splits[str(split)] = examples
    return splits


def _text(value: Any) -> str:
    return "" if value is None else str(value)


def normalise(text: str) -> str:
    """Case, white space and punctuation folded.

    Text with no letter or digit left once punctuation is gone (an emoticon
    such as ``>:(``) is compared with only case and white space folded.
    """
    folded = re.sub(r"\s+", " ", unicodedata.normalize("NFKC", text).casefold()).strip()
    bare = "".join(c for c in folded if not unicodedata.category(c).startswith("P"))
    bare = re.sub(r"\s+", " ", bare).strip()
    return bare if any(c.isalnum() for c in bare) else folded


def audit(config: StudyConfig) -> Audit:
    """Run every check on the task's examples."""
    splits = examples_of(config)
    if splits is None:
        return Audit([], skipped="the task offers no examples() hook")
    return check_examples(
        splits,
        min_per_class=config.audit.min_examples_per_class,
        max_metric_step=config.audit.max_metric_step,
        folds=config.validation.folds,
    )


def check_examples(
    splits: Mapping[str, list[Example]],
    *,
    min_per_class: int,
    max_metric_step: float,
    folds: int = 1,
) -> Audit:
    """The checks, on examples already read; ``folds`` > 1 when k-fold validation is on."""
    findings: list[Finding] = []
    train, val = splits.get("train", []), splits.get("val", [])
    for split, examples in splits.items():
        findings += _empty(split, examples)
        findings += _duplicates(split, examples)
    findings += _conflicts([e for examples in splits.values() for e in examples])
    if val:
        findings += _leakage(train, val)
    findings += _balance(splits, min_per_class, max_metric_step, folds)
    order = {"error": 0, "warning": 1, "info": 2}
    return Audit(sorted(findings, key=lambda f: order[f.severity]))


def _quote(text: str, width: int = 60) -> str:
    shown = text if len(text) <= width else text[: width - 1] + "…"
    return repr(shown)


def _empty(split: str, examples: list[Example]) -> list[Finding]:
    found = []
    no_text = [e for e in examples if not e.text.strip()]
    if no_text:
        found.append(
            Finding(
                "error",
                "empty input",
                f"{len(no_text)} {split} example(s) have no text",
                [e.where for e in no_text],
            )
        )
    no_label = [e for e in examples if not e.label.strip()]
    if no_label:
        found.append(
            Finding(
                "error",
                "missing label",
                f"{len(no_label)} {split} example(s) have no label",
                [f"{e.where} {_quote(e.text)}" for e in no_label],
            )
        )
    return found


def _duplicates(split: str, examples: list[Example]) -> list[Finding]:
    first: dict[tuple[str, str], Example] = {}
    rows = []
    for example in examples:
        if not example.text.strip():
            continue
        key = (example.text, example.label)
        if key in first:
            rows.append(f"{example.where} repeats {first[key].where}: {_quote(example.text)}")
        else:
            first[key] = example
    if not rows:
        return []
    return [
        Finding(
            "warning",
            "duplicates",
            f"{len(rows)} {split} example(s) repeat an earlier one (same text, same label)",
            rows,
        )
    ]


def _conflicts(examples: Iterable[Example]) -> list[Finding]:
    by_text: dict[str, list[Example]] = defaultdict(list)
    for example in examples:
        if example.text.strip() and example.label.strip():
            by_text[example.text].append(example)
    rows = []
    for text, group in by_text.items():
        labels = sorted({e.label for e in group})
        if len(labels) > 1:
            places = ", ".join(f"{e.where} ({e.label})" for e in group)
            rows.append(f"{_quote(text)}: {places}")
    if not rows:
        return []
    return [
        Finding(
            "error",
            "conflicting labels",
            f"{len(rows)} input(s) appear with different labels",
            rows,
        )
    ]


def _leakage(train: list[Example], val: list[Example]) -> list[Finding]:
    exact: dict[str, Example] = {}
    loose: dict[str, Example] = {}
    for example in train:
        if example.text.strip():
            exact.setdefault(example.text, example)
            loose.setdefault(normalise(example.text), example)
    same, near = [], []
    for example in val:
        if not example.text.strip():
            continue
        if example.text in exact:
            same.append(f"{example.where} = {exact[example.text].where}: {_quote(example.text)}")
        elif normalise(example.text) in loose:
            twin = loose[normalise(example.text)]
            near.append(
                f"{example.where} ~ {twin.where}: {_quote(example.text)} ~ {_quote(twin.text)}"
            )
    found = []
    if same:
        found.append(
            Finding(
                "error",
                "leakage",
                f"{len(same)} of {len(val)} val example(s) are also in train, exactly",
                same,
            )
        )
    if near:
        found.append(
            Finding(
                "warning",
                "near leakage",
                f"{len(near)} val example(s) match a train example once case, white space "
                "and punctuation are folded",
                near,
            )
        )
    return found


def _balance(
    splits: Mapping[str, list[Example]], min_per_class: int, max_metric_step: float, folds: int
) -> list[Finding]:
    counts = {
        split: Counter(e.label for e in examples if e.label.strip())
        for split, examples in splits.items()
    }
    classes = sorted(set().union(*counts.values())) if counts else []
    found = []
    for split, count in counts.items():
        total = sum(count.values())
        if not total:
            found.append(Finding("error", "empty split", f"{split} has no labelled example"))
            continue
        shares = ", ".join(f"{c} {100 * count[c] / total:.0f} % ({count[c]})" for c in classes)
        found.append(Finding("info", "classes", f"{split}: {shares}"))
        missing = [c for c in classes if count[c] == 0]
        if missing:
            severity: Severity = "error" if split == "train" else "warning"
            consequence = "the model never learns" if split == "train" else "nothing measures"
            found.append(
                Finding(
                    severity,
                    "missing class",
                    f"{split} has no example of {', '.join(map(repr, missing))}: {consequence} "
                    f"{'it' if len(missing) == 1 else 'them'}",
                    [
                        f"{e.where} ({e.label}): {_quote(e.text)}"
                        for other, examples in splits.items()
                        if other != split
                        for e in examples
                        if e.label in missing
                    ],
                )
            )
    train = counts.get("train", Counter())
    few = [c for c in classes if 0 < train[c] < min_per_class]
    if few:
        found.append(
            Finding(
                "warning",
                "too little data",
                f"train has fewer than {min_per_class} examples of "
                + ", ".join(f"{c!r} ({train[c]})" for c in few)
                + ("; [validation] folds = 5 trains on val's examples too" if folds == 1 else ""),
            )
        )
    val_total = sum(counts.get("val", Counter()).values())
    if folds > 1:
        val_total = sum(sum(count.values()) for count in counts.values()) // folds
    if val_total and 1 / val_total > max_metric_step:
        found.append(
            Finding(
                "warning",
                "small val split",
                f"val has {val_total} examples: one example moves accuracy by "
                f"{100 / val_total:.1f} points, more than max_metric_step = {max_metric_step:g}; "
                f"{_needed(max_metric_step)} or more are needed to trust differences that small"
                + (
                    f" (a fold holds about {val_total})"
                    if folds > 1
                    else "; [validation] folds = 5 validates on every example instead"
                ),
            )
        )
    return found


def _needed(step: float) -> int:
    import math

    return math.ceil(1 / step)


def enforce(result: Audit, config: StudyConfig, ignore_audit: bool) -> None:
    """Raise a DataError naming the first error, unless ``ignore_audit``."""
    if result.errors and not ignore_audit:
        first = result.errors[0]
        raise DataError(
            f"{config.path}: the data audit found {len(result.errors)} error(s), first: "
            f"{first.check}: {first.message}; fix the data, or run with --ignore-audit"
        )
