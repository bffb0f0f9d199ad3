"""The divergence guard's decision, step by step, apart from any training loop.

``DivergenceGuard.step(step, loss)`` answers one question: should this trial
stop now, and why. It is fed the training loss at every optimizer step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

SMOOTHING = 0.9
"""Weight of the past in the smoothed loss (an exponential moving average)."""


@dataclass
class DivergenceGuard:
    """Stops a trial whose training loss is non-finite or explodes.

    - A NaN or infinite loss stops the trial at that step.
    - A loss that is ``factor`` times above the reference (the best smoothed
      loss so far in this trial) and above the loss the trial started with
      counts as exploding; more than ``patience`` consecutive exploding steps
      stop the trial, at step onset + ``patience``. The second condition keeps
      a converged, noisy loss near zero from looking like an explosion.
    - During the first ``warmup_steps`` only non-finite losses stop a trial.
    """

    factor: float = 4.0
    patience: int = 5
    warmup_steps: int = 0
    smoothed: float | None = None
    reference: float | None = None
    initial: float | None = None
    onset: int | None = None
    exploding_steps: int = 0

    def step(self, step: int, loss: float) -> str | None:
        """Feed one step's loss; returns the stop reason, or None to go on."""
        if not math.isfinite(loss):
            return f"diverged: loss={_fmt(loss)} at step {step}"
        if self.initial is None:
            self.initial = loss
        exploding = (
            self.reference is not None
            and loss > self.factor * self.reference
            and loss > self.initial
            and step >= self.warmup_steps
        )
        if exploding:
            if self.onset is None:
                self.onset = step
            self.exploding_steps += 1
            if self.exploding_steps > self.patience:
                assert self.reference is not None
                return (
                    f"diverged: loss={_fmt(loss)} above {self.factor:g} x best smoothed loss "
                    f"{_fmt(self.reference)} since step {self.onset}, at step {step}"
                )
            return None
        self.onset, self.exploding_steps = None, 0
        if self.smoothed is None:
            self.smoothed = loss
        else:
            self.smoothed = SMOOTHING * self.smoothed + (1 - SMOOTHING) * loss
        if self.reference is None or self.smoothed < self.reference:
            self.reference = self.smoothed
        return None


def _fmt(value: float) -> str:
    if math.isnan(value):
        return "nan"
    if math.isinf(value):
        return "inf" if value > 0 else "-inf"
    return f"{value:.4g}"
