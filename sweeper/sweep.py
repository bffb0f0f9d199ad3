"""``sweeper start``: plan, create or resume the study, run it, summarise.

Features that watch or prepare a sweep (the event log, the live view, the
dashboard's charts, the nightly warm start) join through :class:`Observer`
hooks instead of editing :func:`start`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sweeper.config import StudyConfig
from sweeper.errors import DeviceError, SweepFailed
from sweeper.run.devices import Plan, Slot, count_cpus, count_gpus, plan
from sweeper.tasks import Build

PUBLISH_EVERY = 10.0
"""Seconds between refreshes of the charts the dashboard shows, while trials finish."""


@dataclass(frozen=True)
class Outcome:
    """What a finished ``sweeper start`` hands back to the CLI."""

    summary: dict[str, Any]
    best_file: Path | None
    report_file: Path
    recovered: list[int]
    study: Any
    stopped: Any = None
    """The ``sweeper stop`` request that ended the run short, if one did."""


class StopNow(Exception):
    """``sweeper stop --now`` was asked: end the running trials."""


def validate(config: StudyConfig) -> tuple[Build, Plan]:
    """Every check that needs no storage: task import, trainer options, plugins, devices.

    Nothing is created or written; the task (imported, its data prepared) and
    the slots the sweep would use are returned, with warnings about what was
    asked for but not planned.
    """
    from sweeper.plugins import check_plugins
    from sweeper.tasks import load_task

    build = load_task(config)
    from sweeper.run.trainer import check_trainer_options

    check_plugins(config)
    check_trainer_options(config)
    resources = config.resources
    try:
        planned = plan(
            resources.devices,
            gpu_count=count_gpus(),
            cpu_count=count_cpus(),
            trials_per_device=resources.trials_per_device,
            cpu_workers=resources.cpu_workers,
            n_trials=config.study.n_trials,
        )
    except DeviceError as exc:
        raise DeviceError(f"{config.path}: {exc}") from None
    planned.warnings[:] = [f"{config.path}: {warning}" for warning in planned.warnings]
    return build, planned


@dataclass(frozen=True)
class Checked:
    """A study that passed its data audit and validation: the findings, the slots, and
    the task, imported, for the workers to inherit."""

    findings: Any
    slots: list[Slot]
    build: Build


def check(config: StudyConfig, emit: Callable[[str], None], ignore_audit: bool = False) -> Checked:
    """Audit the data (printing the findings) and validate; nothing is written.

    Errors of the data audit stop here unless ``ignore_audit``.
    """
    from sweeper.audit import audit, enforce

    findings = audit(config)
    for line in findings.lines():
        emit(line)
    enforce(findings, config, ignore_audit)
    build, planned = validate(config)
    for warning in planned.warnings:
        emit(f"warning: {warning}")
    return Checked(findings, planned.slots, build)


class Observer:
    """Hooks into a sweep; each is a no-op unless overridden.

    ``created`` gets the study once it is created or resumed, before any
    worker starts; ``tick`` a fresh snapshot of its trials at every check
    while workers run; ``ended`` the last snapshot once they have all ended.
    """

    def created(self, study: Any) -> None:
        """The study exists; no trial of this run has started."""

    def tick(self, study: Any, snapshot: Any) -> None:
        """A fresh snapshot while the sweep runs."""

    def ended(self, study: Any, snapshot: Any) -> None:
        """Every worker has ended (also when the sweep failed or was stopped)."""


class EventLines(Observer):
    """One line per trial that started or finished."""

    def __init__(self, config: StudyConfig, emit: Callable[[str], None]) -> None:
        from sweeper.results.progress import EventLog

        self.log = EventLog(config.study.metrics, config.study.maximize, emit)

    def created(self, study: Any) -> None:
        from sweeper.store import read_trials

        self.log.seen(read_trials(study))  # earlier runs' trials are history, not news

    def tick(self, study: Any, snapshot: Any) -> None:
        self.log.update(snapshot.trials)

    ended = tick


class LiveView(Observer):
    """A table of the sweep redrawn in place (a terminal)."""

    def __init__(self, config: StudyConfig, show: Callable[[Any], None]) -> None:
        self.config = config
        self.show = show
        self.began = time.monotonic()

    def tick(self, study: Any, snapshot: Any) -> None:
        from sweeper.results.progress import study_view

        study = self.config.study
        self.show(
            study_view(
                snapshot,
                study.metrics[0],
                study.maximize,
                time.monotonic() - self.began,
            )
        )


class ChartPublisher(Observer):
    """Names the objective and keeps sweeper's charts in the dashboard fresh."""

    def __init__(self, config: StudyConfig) -> None:
        self.config = config
        self.at = 0.0
        self.finished = 0

    def created(self, study: Any) -> None:
        from sweeper.results.dashboard import name_objective

        name_objective(self.config, study)

    def tick(self, study: Any, snapshot: Any) -> None:
        from sweeper.results.dashboard import publish
        from sweeper.store import has_ended

        finished = sum(has_ended(t) for t in snapshot.trials)  # a failure changes charts too
        if finished != self.finished and time.monotonic() - self.at > PUBLISH_EVERY:
            publish(self.config, study)
            self.at, self.finished = time.monotonic(), finished

    def ended(self, study: Any, snapshot: Any) -> None:
        from sweeper.results.dashboard import publish

        publish(self.config, study)


class AuditRecord(Observer):
    """Stores the data audit's findings on the study."""

    def __init__(self, findings: Any) -> None:
        self.findings = findings

    def created(self, study: Any) -> None:
        from sweeper.audit import STORED

        study.set_user_attr("data_audit", self.findings.to_dict(rows=STORED))


def start(
    config: StudyConfig,
    emit: Callable[[str], None],
    observers: Iterable[Observer] = (),
    earlier: Sequence[tuple[str, str]] = (),
    ignore_audit: bool = False,
    checked: Checked | None = None,
) -> Outcome:
    """Run the study to ``n_trials`` finished trials on every slot; return the best.

    Plan (audit and validate, unless ``checked`` says it was done), create or
    resume, run, summarise. ``emit`` gets one line per event; ``observers``
    join the sweep's hooks; ``earlier`` links the report to the reports of
    earlier nights. Errors of the data audit stop the sweep before anything
    is written, unless ``ignore_audit``. A run that ends with fewer than
    ``n_trials`` finished raises :class:`SweepFailed`, saying what is missing.
    """
    from functools import partial

    from sweeper.run.warm import WarmParent
    from sweeper.run.worker import serve

    checked = checked or check(config, emit, ignore_audit)
    # forked before the storage is opened: workers inherit the task, never a connection
    parent = WarmParent.fork(partial(serve, config, checked.build))
    try:
        return _run(config, emit, checked, parent, observers, earlier)
    finally:
        parent.close()


def _run(
    config: StudyConfig,
    emit: Callable[[str], None],
    checked: Checked,
    parent: Any,
    observers: Iterable[Observer],
    earlier: Sequence[tuple[str, str]],
) -> Outcome:
    """Create or resume the study, run its workers (forked by ``parent``), summarise."""
    from sweeper import store
    from sweeper.atomic import check_writable
    from sweeper.results.best import summary, write_best_toml
    from sweeper.results.report import write_report

    slots = checked.slots
    check_writable(config.output_dir)  # before the study exists: nothing half-made
    study = store.create_or_resume(config)
    watchers = [AuditRecord(checked.findings), EventLines(config, emit), ChartPublisher(config)]
    watchers += list(observers)
    for observer in watchers:
        observer.created(study)
    withdrawn = store.withdraw_stop(study)
    if withdrawn is not None:
        emit(f"resuming the study, {withdrawn.describe()}")
    recovered = store.recover(study, config)
    for number in recovered:
        emit(f"trial {number} was left running by a stopped sweep: failed and enqueued again")
    since = len(study.get_trials(deepcopy=False))  # trial numbers of this run start here
    left = config.study.n_trials - store.snapshot(study, config.study.n_trials).finished
    searching = left > 0 or config.confirm is None  # without [confirm] a run always starts
    shown = slots[: max(1, left)] if searching else slots
    devices = ", ".join(sorted({slot.device for slot in shown}))
    emit(
        f"study {config.study.name!r} in {store.mask_url(config.storage_url)}: {len(shown)} "
        f"slot(s) on {devices}, {config.study.n_trials} trials"
    )

    def work(phase: list[Slot]) -> bool:
        return _work(config, emit, study, parent, phase, since, watchers)

    try:
        # a worker beyond the trials left would never run one
        going = work(slots[: max(1, left)]) if searching else True
        if going and config.confirm is not None and store.stop_request(study) is None:
            pending = store.enqueue_confirmations(study, config)
            if pending:
                emit(
                    f"confirming the best {config.confirm.top_k} configuration(s) with "
                    f"{config.confirm.seeds} new seed(s) each: {pending} trial(s) to run"
                )
                work(slots[:pending])
    finally:
        ended = store.snapshot(study, config.study.n_trials, since)
        for observer in watchers:
            observer.ended(study, ended)
    missing = ended.missing() or store.confirmations_missing(ended.trials, config)
    stopped = store.stop_request(study) if missing is not None else None
    if stopped is not None:
        emit(
            f"the sweep was {stopped.describe()}: {missing}; `sweeper start {config.path}` "
            "resumes it"
        )
    elif missing is not None:
        raise SweepFailed(
            f"the sweep ended short: {missing}; run `sweeper start {config.path}` again to "
            "finish it"
        )
    data = summary(config, study)
    return Outcome(
        data,
        write_best_toml(config, data),
        write_report(config, study, earlier=earlier),
        recovered,
        study,
        stopped,
    )


def _work(
    config: StudyConfig,
    emit: Callable[[str], None],
    study: Any,
    parent: Any,
    slots: list[Slot],
    since: int,
    watchers: Sequence[Observer],
) -> bool:
    """Run one worker per slot until no trial is left to claim; False when stopped now.

    The search is one such phase; the confirmations of its best (``[confirm]``),
    enqueued once it has finished, are another.
    """
    from sweeper import store
    from sweeper.run.launcher import Sweep

    sweep = Sweep(parent, slots, config.output_dir / "logs", since=since)

    def tick() -> str | None:
        snapshot = store.snapshot(study, config.study.n_trials, since)
        for observer in watchers:
            observer.tick(study, snapshot)
        request = store.stop_request(study)
        if request is not None and request.now:
            raise StopNow
        return verdict(config, snapshot, sweep)

    try:
        sweep.start()
        sweep.wait(tick)
    except StopNow:
        emit("stopping now (`sweeper stop --now`): running trials are failed and enqueued again")
        sweep.stop()
        return False
    except KeyboardInterrupt:
        emit("stopping: running trials are failed and will be retried by the next start")
        sweep.stop()
        raise
    finally:
        if sweep.processes:
            sweep.stop()
    return True


def verdict(config: StudyConfig, snapshot: Any, sweep: Any) -> str | None:
    """Why this run must stop (its trials fail systematically or too often), else None."""
    from sweeper.store.outcomes import SYSTEMATIC_AFTER

    def where(trial: Any) -> str:
        slot = trial.user_attrs.get("slot")
        log = sweep.log_dir / f"slot-{slot}.log" if slot is not None else sweep.log_dir
        return (
            f"the traceback is in {log} and on trial {trial.number} (user attribute 'error', "
            "shown by the dashboard)"
        )

    how_on = (
        f"fix it, then run `sweeper start {config.path}` again (failures of earlier runs "
        "do not count)"
    )
    first = snapshot.systematic()
    if first is not None:
        return (
            f"the first {SYSTEMATIC_AFTER} trials of this run all failed the same way: "
            f"{first.user_attrs.get('stop_reason')}; {where(first)}; {how_on}"
        )
    failures = snapshot.failures()
    limit = config.study.max_failures
    if len(failures) >= limit:
        last = failures[-1]
        return (
            f"{len(failures)} trials failed in this run ([study] max_failures = {limit}); "
            f"the last, trial {last.number}: {last.user_attrs.get('stop_reason')}; "
            f"{where(last)}; {how_on}"
        )
    return None
