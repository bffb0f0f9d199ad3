"""``sweeper lr-find``: a learning-rate range test that suggests the ``[search]`` range.

Lightning's tuner raises the learning rate exponentially, step by step, at
the centre of the search space for every other parameter, and stops once the
loss is four times its best: that is where the loss diverges.
"""

from __future__ import annotations

import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tomlkit
from optuna.distributions import (
    BaseDistribution,
    CategoricalDistribution,
    FloatDistribution,
    IntDistribution,
)

from sweeper.atomic import write_text
from sweeper.config import StudyConfig
from sweeper.errors import ConfigError
from sweeper.space import SearchSpace, parse_space

LR_NAMES = ("lr", "learning_rate")
DIVERGENCE_THRESHOLD = 4.0


@dataclass(frozen=True)
class RangeTest:
    """The curve and what it suggests."""

    name: str
    lrs: list[float]
    losses: list[float]
    steepest: float | None
    diverges_at: float | None
    low: float
    high: float


def lr_entry(config: StudyConfig, space: SearchSpace) -> tuple[str, FloatDistribution]:
    """The learning-rate entry of ``[search]``: a float range named lr or learning_rate."""
    for name in LR_NAMES:
        dist = space.distributions.get(name)
        if isinstance(dist, FloatDistribution):
            return name, dist
    raise ConfigError(
        f"{config.path}: search: lr-find needs a float range named "
        f"{' or '.join(LR_NAMES)}, e.g. lr = {{ low = 1e-5, high = 1.0, log = true }}"
    )


def centre(dist: BaseDistribution) -> Any:
    """The middle of a range (geometric for log ranges); the first choice of a list."""
    if isinstance(dist, CategoricalDistribution):
        return dist.choices[0]
    if isinstance(dist, IntDistribution):
        middle = math.sqrt(dist.low * dist.high) if dist.log else (dist.low + dist.high) / 2
        return dist.low + round((middle - dist.low) / dist.step) * dist.step
    assert isinstance(dist, FloatDistribution)
    return math.sqrt(dist.low * dist.high) if dist.log else (dist.low + dist.high) / 2


def centre_params(space: SearchSpace) -> dict[str, Any]:
    """The fixed values and the centre of every range; a parameter whose condition fails
    there (``when``) is absent, as in a trial."""
    params = dict(space.fixed)
    for key in space.order():  # parents first
        if space.holds(key, params):
            params[key] = centre(space.distributions[key])
    return params


def run_range_test(config: StudyConfig, steps: int = 100) -> RangeTest:
    """Train from the centre of the space while the learning rate grows from low/10 to high*10."""
    import lightning.pytorch as pl
    from lightning.pytorch.tuner import Tuner

    from sweeper.run.devices import Slot
    from sweeper.run.trainer import quiet_lightning, trainer_options
    from sweeper.run.trial import build_task
    from sweeper.tasks import load_task

    space = parse_space(config.search, config.path)
    name, dist = lr_entry(config, space)
    params = centre_params(space)
    params[name] = dist.low
    pl.seed_everything(config.study.seed, verbose=False)
    module, datamodule = build_task(load_task(config), params)
    options = trainer_options(config, Slot(0, None, os.cpu_count() or 1))
    options.pop("max_epochs", None)
    with tempfile.TemporaryDirectory() as scratch:  # the tuner checkpoints the model there
        trainer = pl.Trainer(**options, max_epochs=max(1, steps), default_root_dir=scratch)
        quiet_lightning()
        finder = Tuner(trainer).lr_find(
            module,
            datamodule=datamodule,
            min_lr=dist.low / 10,
            max_lr=dist.high * 10,
            num_training=steps,
            early_stop_threshold=DIVERGENCE_THRESHOLD,
            update_attr=False,
        )
    if finder is None:
        raise ConfigError(f"{config.path}: the range test ran no training step")
    lrs = [float(v) for v in finder.results["lr"]]
    losses = [float(v) for v in finder.results["loss"]]
    steepest = finder.suggestion() if len(lrs) > 12 else None
    diverges_at = _divergence(lrs, losses)
    low, high = suggest(dist, steepest, diverges_at)
    return RangeTest(name, lrs, losses, steepest, diverges_at, low, high)


def _divergence(lrs: list[float], losses: list[float]) -> float | None:
    """The first learning rate whose loss is non-finite or above 4x the best so far."""
    best = math.inf
    for lr, loss in zip(lrs, losses, strict=True):
        if not math.isfinite(loss) or loss > DIVERGENCE_THRESHOLD * best:
            return lr
        best = min(best, loss)
    return None


def suggest(
    dist: FloatDistribution, steepest: float | None, diverges_at: float | None
) -> tuple[float, float]:
    """A log range: up to a third of the diverging rate, down 100 times below that."""
    high = diverges_at / 3 if diverges_at is not None else dist.high
    low = min(steepest / 10, high / 100) if steepest is not None else high / 100
    return _round(low), _round(high)


def _round(value: float) -> float:
    return float(f"{value:.1g}")


def write_range(path: Path, name: str, low: float, high: float) -> None:
    """Set ``[search] name`` to the range in place, keeping comments and layout."""
    document = tomlkit.parse(path.read_text(encoding="utf-8"))
    entry: Any = document["search"][name]
    entry["low"] = low
    entry["high"] = high
    entry["log"] = True
    if "step" in entry:
        del entry["step"]
    write_text(path, tomlkit.dumps(document))


def table(test: RangeTest, rows: int = 12) -> list[tuple[float, float]]:
    """About ``rows`` points of the curve, evenly spread, the last one included."""
    if not test.lrs:
        return []
    stride = max(1, len(test.lrs) // rows)
    picked = list(range(0, len(test.lrs), stride))
    if picked[-1] != len(test.lrs) - 1:
        picked.append(len(test.lrs) - 1)
    return [(test.lrs[i], test.losses[i]) for i in picked]
