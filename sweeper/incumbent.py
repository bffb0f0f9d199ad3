"""The incumbent pruner: each trial against the best complete trial's curve, step by step.

Optuna's median pruner waits for five complete trials and then stops only
the worse half; successive halving needs a population at each rung. A
fine-tuning sweep has 8 to 60 trials, and the trials it runs share one
schedule (the same epochs, warm-up and decay over the same steps), so the
curve of the best complete trial so far (the incumbent) is a yardstick from
the second trial on: a trial that is behind it at the same step, by more
than ``margin`` (by default the incumbent's own noise: the largest fall
between two of its successive validations), for ``patience + 1``
validations in a row, is stopped.
"""

from __future__ import annotations

import bisect
import itertools
import math

import optuna
from optuna.study import StudyDirection
from optuna.trial import FrozenTrial, TrialState

NOISE = "noise"
"""``margin = "noise"``: the incumbent's own noise is the margin."""


class IncumbentPruner(optuna.pruners.BasePruner):
    """Prune a trial that trails the incumbent's curve at the same steps.

    ``margin``: how far behind the incumbent (in the metric's units) a value
    may be and still count as level; ``"noise"`` (the default): the largest
    fall between two successive validations of the incumbent, its own noise.
    ``patience``: validations in a row a trial may trail before it is stopped
    (0: at the first). ``n_warmup_steps``: steps before which no trial is
    judged. ``n_startup_trials``: complete trials before any is judged. The
    incumbent is the complete trial with the best value (of the first metric);
    its value at a step is the last one it reported at or before that step.
    """

    def __init__(
        self,
        margin: float | str = "noise",
        patience: int = 0,
        n_warmup_steps: int = 0,
        n_startup_trials: int = 1,
    ) -> None:
        if margin != NOISE and (isinstance(margin, str) or margin < 0 or math.isnan(margin)):
            raise ValueError(f'margin must be a number, 0 or more, or "{NOISE}", got {margin!r}')
        if patience < 0:
            raise ValueError(f"patience must be 0 or more, got {patience}")
        if n_warmup_steps < 0:
            raise ValueError(f"n_warmup_steps must be 0 or more, got {n_warmup_steps}")
        if n_startup_trials < 1:
            raise ValueError(f"n_startup_trials must be 1 or more, got {n_startup_trials}")
        self._margin = margin
        self._patience = patience
        self._n_warmup_steps = n_warmup_steps
        self._n_startup_trials = n_startup_trials

    def prune(self, study: optuna.Study, trial: FrozenTrial) -> bool:
        step = trial.last_step
        if step is None or step < self._n_warmup_steps:
            return False
        complete = [
            t
            for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
            if t.values and not math.isnan(t.values[0]) and t.intermediate_values
        ]
        if len(complete) < self._n_startup_trials:
            return False
        maximize = study.direction == StudyDirection.MAXIMIZE
        incumbent = (max if maximize else min)(complete, key=lambda t: t.values[0])
        judged = sorted(s for s in trial.intermediate_values if s >= self._n_warmup_steps)
        behind = judged[-(self._patience + 1) :]
        if len(behind) < self._patience + 1:
            return False
        margin = self._margin
        if isinstance(margin, str):
            margin = noise(incumbent, maximize, since=self._n_warmup_steps)
        return all(self._trails(trial, incumbent, s, maximize, margin) for s in behind)

    @staticmethod
    def _trails(
        trial: FrozenTrial, incumbent: FrozenTrial, step: int, maximize: bool, margin: float
    ) -> bool:
        """Whether ``trial`` at ``step`` is behind the incumbent there by more than the margin."""
        ours = trial.intermediate_values[step]
        if math.isnan(ours):
            return True
        theirs = value_at(incumbent, step)
        if theirs is None or math.isnan(theirs):
            return False
        return ours < theirs - margin if maximize else ours > theirs + margin


def value_at(trial: FrozenTrial, step: int) -> float | None:
    """The last value ``trial`` reported at or before ``step``, or None."""
    steps = sorted(trial.intermediate_values)
    at = bisect.bisect_right(steps, step)
    return trial.intermediate_values[steps[at - 1]] if at else None


def noise(trial: FrozenTrial, maximize: bool, since: int = 0) -> float:
    """The largest fall (a worse value) between two successive validations of ``trial``,
    from step ``since`` on (before it, trials are not judged)."""
    steps = [s for s in sorted(trial.intermediate_values) if s >= since]
    values = [trial.intermediate_values[s] for s in steps]
    falls = [(a - b if maximize else b - a) for a, b in itertools.pairwise(values)]
    return max([f for f in falls if not math.isnan(f)] + [0.0])
