"""``sweeper start``: validate everything, then create or resume the study and run it."""

from __future__ import annotations

import signal
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sweeper.config import StudyConfig
from sweeper.devices import Slot, count_cpus, count_gpus, plan_slots
from sweeper.errors import DeviceError

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


def validate(config: StudyConfig) -> list[Slot]:
    """Every check that needs no storage: task import, trainer options, plugins, devices.

    Nothing is created or written; the slots the sweep would use are returned.
    """
    from sweeper.study import check_plugins
    from sweeper.tasks import load_task

    load_task(config)
    from sweeper.trial import check_trainer_options

    check_trainer_options(config)
    check_plugins(config)
    resources = config.resources
    try:
        return plan_slots(
            resources.devices,
            gpu_count=count_gpus(),
            cpu_count=count_cpus(),
            trials_per_device=resources.trials_per_device,
            cpu_workers=resources.cpu_workers,
        )
    except DeviceError as exc:
        raise DeviceError(f"{config.path}: {exc}") from None


@dataclass(frozen=True)
class Checked:
    """A study that passed its data audit and validation: the findings and the slots."""

    findings: Any
    slots: list[Slot]


def check(config: StudyConfig, emit: Callable[[str], None], force: bool = False) -> Checked:
    """Audit the data (printing the findings) and validate; nothing is written.

    Errors of the data audit stop here unless ``force``.
    """
    from sweeper.audit import audit, enforce

    findings = audit(config)
    for line in findings.lines():
        emit(line)
    enforce(findings, config, force)
    return Checked(findings, validate(config))


def start(
    config: StudyConfig,
    emit: Callable[[str], None],
    n_trials: int | None = None,
    live: Callable[[Any], None] | None = None,
    earlier: Sequence[tuple[str, str]] = (),
    force: bool = False,
    before_trials: Callable[[Any], None] | None = None,
    checked: Checked | None = None,
) -> Outcome:
    """Run the study to ``n_trials`` finished trials on every slot; return the best.

    ``emit`` gets one line per event; ``live``, when given, a fresh view of the
    study at every check (a terminal shows it in place); ``earlier`` links the
    report to the reports of earlier nights. Errors of the data audit stop the
    sweep before anything is written, unless ``force``. ``before_trials`` gets
    the created (or resumed) study before any worker starts; ``checked``, the
    result of :func:`check` when the caller ran it already.
    """
    from sweeper.audit import STORED
    from sweeper.best import summary, write_best_toml
    from sweeper.dashboard import publish
    from sweeper.launcher import Sweep
    from sweeper.progress import EventLog, study_view
    from sweeper.report import write_report
    from sweeper.storage import mask_url
    from sweeper.study import create_or_resume, recover_orphans, systematic_failure

    checked = checked or check(config, emit, force)
    slots = checked.slots
    study = create_or_resume(config)
    study.set_user_attr("data_audit", checked.findings.to_dict(rows=STORED))
    if before_trials is not None:
        before_trials(study)
    recovered = recover_orphans(study)
    for number in recovered:
        emit(f"trial {number} was left running by a stopped sweep: failed and enqueued again")
    devices = ", ".join(sorted({slot.device for slot in slots}))
    emit(
        f"study {config.study.name!r} in {mask_url(config.storage_url)}: {len(slots)} slot(s) "
        f"on {devices}, {config.study.n_trials} trials"
    )
    events = EventLog(config.study.metric, config.study.direction == "maximize", emit)
    sweep = Sweep(
        config.path, slots, config.output_dir / "logs", n_trials=n_trials, night=config.night
    )

    published = [0.0, 0]
    began = time.monotonic()

    def tick() -> str | None:
        trials = study.get_trials(deepcopy=False)
        events.update(trials)
        if live is not None:
            live(
                study_view(
                    trials,
                    config.study.metric,
                    events.maximize,
                    config.study.n_trials,
                    time.monotonic() - began,
                )
            )
        finished = sum(t.state.is_finished() for t in trials)
        if finished != published[1] and time.monotonic() - published[0] > PUBLISH_EVERY:
            publish(config, study)
            published[:] = [time.monotonic(), finished]
        return systematic_failure(study)

    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        sweep.start()
        sweep.wait(tick)
    except KeyboardInterrupt:
        emit("stopping: running trials are failed and will be retried by the next start")
        sweep.stop()
        raise
    finally:
        signal.signal(signal.SIGTERM, previous)
        if sweep.processes:
            sweep.stop()
    publish(config, study)
    data = summary(config, study)
    return Outcome(
        data,
        write_best_toml(config, data),
        write_report(config, study, earlier=earlier),
        recovered,
        study,
    )


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt
