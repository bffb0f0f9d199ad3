"""``sweeper nightly``: one dated study a night, warm-started from the last, compared with it.

A night is the study ``<name>@<YYYY-MM-DD>`` in the study's storage. Its first
trials are the best configurations of the most recent earlier night, fitted to
tonight's search space. When it ends, its best is compared with that night's:
the summary is stored on the night's study (the history), written to
``<folder>/<name>/nights/<date>/summary.json`` and optionally POSTed.
One night of a study runs at a time: see :class:`sweeper.nightly.lock.NightLock`.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
from optuna.distributions import BaseDistribution, CategoricalDistribution
from optuna.trial import FrozenTrial, TrialState

from sweeper import store
from sweeper.atomic import check_writable, make_folder, write_text
from sweeper.config import StudyConfig
from sweeper.errors import ConfigError, SweeperError
from sweeper.nightly.lock import NightLock
from sweeper.nightly.notify import notify
from sweeper.space import SearchSpace, parse_space
from sweeper.sweep import LiveView, Observer

EXIT_REGRESSION = 3
"""Exit code of a night whose best is worse than the night before by more than the tolerance."""

SUMMARY_ATTR = "night_summary"
WARM_START_ATTR = "warm_start"


@dataclass(frozen=True)
class EarlierNight:
    """A finished earlier night: its date, its complete search trials best first (what
    tonight's warm start takes), and its result as tonight's is judged (:func:`result`)."""

    date: dt.date
    best: list[FrozenTrial]
    chosen: FrozenTrial | None = None
    score: float | None = None

    @property
    def ranked(self) -> list[FrozenTrial]:
        """Its complete search trials best first, its chosen configuration (``[confirm]``)
        at the head: what tonight's warm start queues."""
        if self.chosen is None:
            return self.best
        return [self.chosen, *(t for t in self.best if t.number != self.chosen.number)]

    @property
    def judged(self) -> tuple[FrozenTrial, float]:
        """The night's chosen best and the figure it is compared by."""
        chosen = self.chosen or self.best[0]
        score = self.score if self.score is not None else chosen.value
        assert score is not None
        return chosen, score


def result(study: optuna.Study) -> tuple[FrozenTrial | None, float | None]:
    """A night's chosen best and the figure nights are compared by: with ``[confirm]``,
    its configuration's mean over its runs (a lucky seed is no progress); else its value."""
    from sweeper.results.best import best_trial, confirmed

    found = confirmed(study)
    best = best_trial(study, found)
    if best is None:
        return None, None
    return best, found[0]["mean"] if found else best.value


def today(config: StudyConfig) -> dt.date:
    """The date now in the schedule's time zone: the night ``sweeper nightly`` runs."""
    import zoneinfo

    return dt.datetime.now(zoneinfo.ZoneInfo(config.schedule.timezone)).date()


def one_metric(config: StudyConfig) -> None:
    """Refuse a study of several metrics: a night is judged against the last by one value."""
    if config.study.multi_objective:
        raise ConfigError(
            f"{config.path}: study.metric: nightly sweeps judge each night by its best value "
            f"against the last night's, and this study has {len(config.study.metrics)} metrics "
            "(a Pareto front, no single best); run it with `sweeper start`, or schedule a "
            "study of one metric"
        )


def run_night(
    config: StudyConfig,
    night: dt.date,
    *,
    rerun: bool = False,
    ignore_audit: bool = False,
    emit: Callable[[str], None],
    live: Callable[[Any], None] | None = None,
) -> int:
    """Run or resume one night; exit code 0, EXIT_REGRESSION, or 1 when nothing completed."""
    from sweeper.sweep import check, start

    one_metric(config)
    tonight = config.for_night(night)
    lock = NightLock(config.output_dir / "nightly.lock")
    if lock.path.exists():  # answer at once, before importing the task
        holder = lock.acquire(emit)
        if holder is not None:
            emit(_busy(config, lock.path, holder))
            return 0
        lock.release()
    # bad data or input stops the night before any write
    checked = check(tonight, emit, ignore_audit)
    # a folder that cannot be made or a storage that cannot be opened stops the night
    # before the lock file is written
    check_writable(lock.path.parent)
    nights(config)
    made = not lock.path.parent.exists()
    make_folder(lock.path.parent)
    holder = lock.acquire(emit)
    if holder is not None:
        emit(_busy(config, lock.path, holder))
        return 0
    try:
        finished = stored_summary(config, night)
        if finished is not None and not rerun:
            emit(
                f"night {night} of study {config.study.name!r} already finished "
                f"({finished['status']}); --rerun runs it again"
            )
            return 0
        if finished is not None:
            store.delete(tonight)
            emit(f"--rerun: night {night} deleted, running it again")
        previous = earlier_night(config, night)
        observers: list[Observer] = [WarmStart(tonight, previous, emit)]
        if live is not None:
            observers.append(LiveView(tonight, live))
        outcome = start(
            tonight,
            emit,
            observers=observers,
            earlier=earlier_reports(config, night),
            checked=checked,
        )
        if outcome.stopped is not None:
            return 0  # unfinished: the next `sweeper nightly` of this night resumes it
        study = outcome.study
        summary = summarize(tonight, study, previous)
        summary["report"] = str(outcome.report_file)
        study.set_user_attr(SUMMARY_ATTR, summary)
        _write_json(tonight.output_dir / "summary.json", summary)
        for line in describe(summary):
            emit(line)
        if config.schedule.notify:
            notify(config.schedule.notify, summary, emit)
        return {"regression": EXIT_REGRESSION, "no-result": 1}.get(summary["status"], 0)
    except SweeperError as exc:
        if made and exc.exit_code == 2:
            lock.discard()  # bad input found under the lock: the folder made for it goes
        raise
    finally:
        lock.release()


def _busy(config: StudyConfig, path: Path, holder: dict[str, Any]) -> str:
    held = f"process {holder['pid']} on {holder.get('host')} holds" if holder else "it holds"
    return (
        f"another `sweeper nightly` of study {config.study.name!r} is running "
        f"({held} {path}); nothing to do"
    )


def nights(config: StudyConfig) -> dict[dt.date, str]:
    """The nights of this study in its storage: date to study name."""
    pattern = re.compile(re.escape(config.study.name) + r"@(\d{4}-\d{2}-\d{2})")
    found = {}
    for name in store.study_names(config.storage_url):
        match = pattern.fullmatch(name)
        if match:
            found[dt.date.fromisoformat(match.group(1))] = name
    return dict(sorted(found.items()))


def stored_summary(config: StudyConfig, night: dt.date) -> dict[str, Any] | None:
    """The summary a finished night stored, or None for a night not run or not finished."""
    name = nights(config).get(night)
    return None if name is None else _load(config, name).user_attrs.get(SUMMARY_ATTR)


def earlier_night(config: StudyConfig, night: dt.date) -> EarlierNight | None:
    """The most recent night before ``night`` with a complete trial."""
    for date, name in sorted(nights(config).items(), reverse=True):
        if date >= night:
            continue
        study = _load(config, name)
        complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        complete = [t for t in complete if not store.is_confirmation(t)]
        if complete:
            maximize = config.study.maximize
            chosen, score = result(study)
            best = sorted(complete, key=_value, reverse=maximize)
            return EarlierNight(date, best, chosen, score)
    return None


def _value(trial: FrozenTrial) -> float:
    return trial.value if trial.value is not None else math.nan


def fit_to_space(
    params: dict[str, Any], space: SearchSpace
) -> tuple[dict[str, Any] | None, list[str]]:
    """A configuration fitted to today's search space, and what had to change.

    A parameter no longer searched is dropped, and so is one whose condition
    (``when``) does not hold for the configuration tonight; a number outside its
    range is clipped (and put on the step); a new parameter, or one the
    configuration lacks but tonight's conditions ask for, is left to the sampler
    (the trial is still enqueued and the sampler fills it). A choice that no
    longer exists makes the configuration unusable (None).
    """
    fitted: dict[str, Any] = {}
    notes = []
    kept: dict[str, Any] = {}  # parents first, so a dropped parent drops its children
    for name in space.order():
        if name in params and space.holds(name, kept) is not False:
            kept[name] = params[name]
    for name, value in params.items():
        distribution = space.distributions.get(name)
        if distribution is None:
            notes.append(f"{name} is no longer searched: dropped")
        elif name not in kept:
            notes.append(f"{name} is searched only when {space.describe(name)}: dropped")
        elif isinstance(distribution, CategoricalDistribution):
            if value not in distribution.choices:
                return None, [f"{name} = {value!r} is no longer a choice: skipped"]
            fitted[name] = value
        else:
            fitted[name] = _clip(value, distribution)
            if fitted[name] != value:
                notes.append(f"{name} = {value:.6g} clipped to {fitted[name]:.6g}")
    missing = [n for n in space.order() if n not in params and space.holds(n, fitted) is not False]
    new = sorted(n for n in missing if n not in space.conditions)
    if new:
        notes.append(f"{', '.join(new)} not searched last night: left to the sampler")
    wanted = [n for n in missing if n in space.conditions]
    if wanted:
        notes.append(f"{', '.join(wanted)} not in this configuration: left to the sampler")
    return fitted, notes


def _clip(value: float, distribution: BaseDistribution) -> float:
    low, high = distribution.low, distribution.high  # type: ignore[attr-defined]
    step = getattr(distribution, "step", None)
    clipped = min(max(value, low), high)
    if step is not None and clipped != value:
        clipped = min(high, low + round((clipped - low) / step) * step)
    return type(value)(clipped) if isinstance(value, int) else clipped


class WarmStart(Observer):
    """Enqueues the warm start into tonight's study once it exists, before any trial."""

    def __init__(
        self, tonight: StudyConfig, previous: EarlierNight | None, emit: Callable[[str], None]
    ) -> None:
        self.tonight, self.previous, self.emit = tonight, previous, emit

    def created(self, study: Any) -> None:
        warm_start(self.tonight, study, self.previous, self.emit)


def warm_start(
    tonight: StudyConfig,
    study: optuna.Study,
    previous: EarlierNight | None,
    emit: Callable[[str], None],
) -> None:
    """Enqueue the warm start into tonight's new study, once, before any trial runs."""
    if WARM_START_ATTR in study.user_attrs:
        emit(f"resuming night {tonight.night}")
        return
    notes: list[str] = []
    top_k = min(tonight.schedule.warm_start_top_k, tonight.study.n_trials)
    if previous is None:
        notes.append("no earlier night: no warm start")
    elif top_k:
        space = parse_space(tonight.search, tonight.path)
        seen: list[dict[str, Any]] = []
        for trial in previous.ranked:
            if len(seen) == top_k:
                break
            fitted, changes = fit_to_space(trial.params, space)
            origin = f"night {previous.date} trial {trial.number}"
            if fitted is None:
                notes.append(f"{origin}: {'; '.join(changes)}")
                continue
            if fitted in seen:
                notes.append(f"{origin}: the same as one already queued once fitted: skipped")
                continue
            seen.append(fitted)
            study.enqueue_trial(fitted, user_attrs={"warm_start_from": origin})
            notes.append(f"{origin} queued" + (f" ({'; '.join(changes)})" if changes else ""))
    for note in notes:
        emit(f"warm start: {note}")
    study.set_user_attr(WARM_START_ATTR, notes)


def summarize(
    tonight: StudyConfig, study: optuna.Study, previous: EarlierNight | None
) -> dict[str, Any]:
    """The night's result against the night before: best, delta, changed params, counts."""
    from sweeper.results.report import duration

    best, score = result(study)
    trials = study.get_trials(deepcopy=False)
    now = store.Snapshot(trials, tonight.study.n_trials)
    count = now.search_counts
    maximize = tonight.study.maximize
    summary: dict[str, Any] = {
        "study": tonight.base_name,
        "night": tonight.night.isoformat() if tonight.night else None,
        "metric": tonight.study.metric,
        "direction": tonight.study.direction,
        "best_value": score,
        "best_trial": best.number if best else None,
        "best_params": best.params if best else {},
        "previous_night": previous.date.isoformat() if previous else None,
        "previous_best_value": previous.judged[1] if previous else None,
        "delta": None,
        "changed_params": {},
        "trials": now.finished,
        "complete": count["complete"],
        "pruned": count["pruned"],
        "failed": count["fail"],
        "confirmations": now.confirmations_finished,
        "duration_s": round(duration(trials).total_seconds(), 1),
        "tolerance": tonight.schedule.regression_tolerance,
        "warm_start": study.user_attrs.get(WARM_START_ATTR, []),
    }
    if best is None:
        summary["status"] = "no-result"  # nothing to compare: a failure, not a regression
        return summary
    if previous is None:
        summary["status"] = "first"
        return summary
    before, before_score = previous.judged
    assert score is not None
    delta = score - before_score
    worse = -delta if maximize else delta
    summary["delta"] = delta
    summary["changed_params"] = {  # a side is left out where the best lacks the parameter
        name: {
            side: trial.params[name]
            for side, trial in (("before", before), ("after", best))
            if name in trial.params
        }
        for name in sorted(set(before.params) | set(best.params))
        if (name in before.params, before.params.get(name))
        != (name in best.params, best.params.get(name))
    }
    if worse > tonight.schedule.regression_tolerance:
        summary["status"] = "regression"
    elif worse < 0:
        summary["status"] = "improved"
    else:
        summary["status"] = "steady"
    return summary


def describe(summary: dict[str, Any]) -> list[str]:
    """The summary as a few lines for the log."""
    night, metric = summary["night"], summary["metric"]
    if summary["best_value"] is None:
        lines = [f"night {night}: no trial completed"]
    else:
        lines = [f"night {night}: best {metric}={summary['best_value']:.6g}"]
    if summary["previous_night"] is not None and summary["delta"] is not None:
        lines[0] += (
            f", {summary['delta']:+.6g} against night {summary['previous_night']} "
            f"({summary['previous_best_value']:.6g})"
        )
    lines[0] += f": {summary['status']}"
    for name, change in summary["changed_params"].items():
        was, now = (repr(change[s]) if s in change else "absent" for s in ("before", "after"))
        lines.append(f"  {name}: {was} -> {now}")
    if summary["status"] == "regression":
        lines.append(
            f"regression: worse than night {summary['previous_night']} by more than "
            f"{summary['tolerance']:g}; exit code {EXIT_REGRESSION}"
        )
    return lines


def history(config: StudyConfig) -> list[dict[str, Any]]:
    """One row per night, oldest first; a night without a summary is unfinished."""
    rows = []
    for date, name in nights(config).items():
        study = _load(config, name)
        summary = study.user_attrs.get(SUMMARY_ATTR)
        if summary is None:
            now = store.snapshot(study, config.study.n_trials)
            count = now.search_counts
            summary = {
                "night": date.isoformat(),
                "best_value": None,
                "delta": None,
                "trials": now.finished,
                "pruned": count["pruned"],
                "failed": count["fail"],
                "duration_s": None,
                "status": "unfinished",
            }
        rows.append(summary)
    return rows


def earlier_reports(config: StudyConfig, night: dt.date) -> list[tuple[str, str]]:
    """Links from tonight's report to the reports of the nights before it, latest first."""
    links = []
    for date in sorted(nights(config), reverse=True):
        report = config.for_night(date).output_dir / "report.html"
        if date < night and report.exists():
            links.append((date.isoformat(), f"../{date.isoformat()}/report.html"))
    return links


def _load(config: StudyConfig, name: str) -> optuna.Study:
    return store.load_named(config, name)


def _write_json(path: Path, data: dict[str, Any]) -> None:
    write_text(path, json.dumps(data, indent=2, default=str) + "\n")
