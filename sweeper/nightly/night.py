"""``sweeper nightly``: one dated study a night, warm-started from the last, compared with it.

A night is the study ``<name>@<YYYY-MM-DD>`` in the study's storage. Its first
trials are the best configurations of the most recent earlier night, fitted to
tonight's search space. When it ends, its best is compared with that night's:
the summary is stored on the night's study (the history), written to
``<folder>/<name>/nights/<date>/summary.json`` and optionally POSTed.
One night of a study runs at a time: see :class:`NightLock`.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import http.client
import json
import math
import os
import re
import socket
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
from optuna.distributions import BaseDistribution, CategoricalDistribution
from optuna.trial import FrozenTrial, TrialState

from sweeper import store
from sweeper.atomic import write_text
from sweeper.config import StudyConfig
from sweeper.errors import SweeperError
from sweeper.space import SearchSpace, parse_space
from sweeper.sweep import LiveView, Observer

EXIT_REGRESSION = 3
"""Exit code of a night whose best is worse than the night before by more than the tolerance."""

SUMMARY_ATTR = "night_summary"
WARM_START_ATTR = "warm_start"
NOTIFY_ATTEMPTS = 3
NOTIFY_BACKOFF = 1.0
"""Seconds before the first retry of a failed webhook; doubled for each further retry."""
NOTIFY_TIMEOUT = 10.0
"""Seconds one webhook attempt may take in all: connecting, sending, reading the answer."""
NOTIFY_DEADLINE = 30.0
"""Seconds every attempt and every wait between them may take together: the lock is held."""


@dataclass(frozen=True)
class EarlierNight:
    """A finished earlier night: its date and its complete trials, best first."""

    date: dt.date
    best: list[FrozenTrial]


def today(config: StudyConfig) -> dt.date:
    """The date now in the schedule's time zone: the night ``sweeper nightly`` runs."""
    import zoneinfo

    return dt.datetime.now(zoneinfo.ZoneInfo(config.schedule.timezone)).date()


def run_night(
    config: StudyConfig,
    night: dt.date,
    *,
    force: bool,
    emit: Callable[[str], None],
    live: Callable[[Any], None] | None = None,
) -> int:
    """Run or resume one night; exit code 0, EXIT_REGRESSION, or 1 when nothing completed."""
    from sweeper.sweep import check, start

    tonight = config.for_night(night)
    lock = NightLock(config.output_dir / "nightly.lock")
    if lock.path.exists():  # answer at once, before importing the task
        holder = lock.acquire(emit)
        if holder is not None:
            emit(_busy(config, lock.path, holder))
            return 0
        lock.release()
    checked = check(tonight, emit)  # bad data or input stops the night before any write
    lock.path.parent.mkdir(parents=True, exist_ok=True)
    holder = lock.acquire(emit)
    if holder is not None:
        emit(_busy(config, lock.path, holder))
        return 0
    try:
        finished = stored_summary(config, night)
        if finished is not None and not force:
            emit(
                f"night {night} of study {config.study.name!r} already finished "
                f"({finished['status']}); --force runs it again"
            )
            return 0
        if finished is not None:
            store.delete(tonight)
            emit(f"--force: night {night} deleted, running it again")
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
    finally:
        lock.release()


def _busy(config: StudyConfig, path: Path, holder: dict[str, Any]) -> str:
    held = f"process {holder['pid']} on {holder.get('host')} holds" if holder else "it holds"
    return (
        f"another `sweeper nightly` of study {config.study.name!r} is running "
        f"({held} {path}); nothing to do"
    )


class NightLock:
    """``nightly.lock``: an flock that one ``sweeper nightly`` of a study holds at a time.

    The holder writes its pid, its process's start time and its host into the
    file. When the flock is held but that process is gone from this host (a
    child forked from it can keep the flock alive), the lock is taken over.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None

    def acquire(self, emit: Callable[[str], None]) -> dict[str, Any] | None:
        """None once held; otherwise the holder's record (empty when it left none)."""
        try:
            with _gate(self.path.parent):
                holder = self._try()
                if holder is not None and _gone(holder):
                    # Whatever still holds the old file keeps it; nothing reads it again.
                    os.unlink(self.path)
                    emit(
                        f"took over {self.path}: its holder, process {holder['pid']} on "
                        f"{holder['host']}, is gone"
                    )
                    holder = self._try()
                return holder
        except OSError as exc:
            raise SweeperError(f"cannot lock {self.path}: {exc.strerror or exc}") from exc

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # the record stays: it names the last holder
            self._fd = None

    def _try(self) -> dict[str, Any] | None:
        """Take the flock and write this process's record (None), or read the holder's."""
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            os.ftruncate(fd, 0)
            os.pwrite(fd, (json.dumps(_this_process()) + "\n").encode(), 0)
        except BlockingIOError:
            holder = _holder(fd)
            os.close(fd)
            return holder
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        return None


@contextlib.contextmanager
def _gate(folder: Path) -> Iterator[None]:
    """One nightly at a time takes or takes over the lock: a brief flock on its folder."""
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _this_process() -> dict[str, Any]:
    pid = os.getpid()
    return {
        "pid": pid,
        "start": process_start(pid),
        "host": socket.gethostname(),
        "pid_namespace": _pid_namespace(),
    }


def _pid_namespace() -> str | None:
    """Containers sharing a host name and a folder still see different pids."""
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return None


def process_start(pid: int) -> int | None:
    """When process ``pid`` started (field 22 of /proc/<pid>/stat), or None where unknown."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return int(stat.rsplit(")", 1)[1].split()[19])  # the name in (...) may hold spaces
    except (OSError, IndexError, ValueError):
        return None


def _holder(fd: int) -> dict[str, Any]:
    try:
        record = json.loads(os.pread(fd, 4096, 0) or b"{}")
    except (OSError, ValueError):
        return {}
    if not isinstance(record, dict) or not isinstance(record.get("pid"), int):
        return {}
    return record


def _gone(holder: dict[str, Any]) -> bool:
    """Whether the process in ``holder`` has ended (only known for one whose pids we see)."""
    if not holder or holder["pid"] <= 0:
        return False
    if (holder.get("host"), holder.get("pid_namespace")) != (
        socket.gethostname(),
        _pid_namespace(),
    ):
        return False
    start = process_start(holder["pid"])
    if start is not None:  # a pid in use again is another process
        return holder.get("start") is not None and start != holder["start"]
    try:
        os.kill(holder["pid"], 0)
    except ProcessLookupError:
        return True
    except OSError:
        return False
    return False


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
        complete = _load(config, name).get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        if complete:
            maximize = config.study.direction == "maximize"
            return EarlierNight(date, sorted(complete, key=_value, reverse=maximize))
    return None


def _value(trial: FrozenTrial) -> float:
    return trial.value if trial.value is not None else math.nan


def fit_to_space(
    params: dict[str, Any], space: SearchSpace
) -> tuple[dict[str, Any] | None, list[str]]:
    """A configuration fitted to today's search space, and what had to change.

    A parameter no longer searched is dropped; a number outside its range is
    clipped (and put on the step); a new parameter is left to the sampler. A
    choice that no longer exists makes the configuration unusable (None).
    """
    fitted: dict[str, Any] = {}
    notes = []
    for name, value in params.items():
        distribution = space.distributions.get(name)
        if distribution is None:
            notes.append(f"{name} is no longer searched: dropped")
        elif isinstance(distribution, CategoricalDistribution):
            if value not in distribution.choices:
                return None, [f"{name} = {value!r} is no longer a choice: skipped"]
            fitted[name] = value
        else:
            fitted[name] = _clip(value, distribution)
            if fitted[name] != value:
                notes.append(f"{name} = {value:.6g} clipped to {fitted[name]:.6g}")
    new = sorted(set(space.distributions) - set(params))
    if new:
        notes.append(f"{', '.join(new)} not searched last night: left to the sampler")
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
        for trial in previous.best:
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
    from sweeper.results.best import best_trial
    from sweeper.results.report import duration
    from sweeper.store import counts

    best = best_trial(study)
    count = counts(study)
    maximize = tonight.study.direction == "maximize"
    summary: dict[str, Any] = {
        "study": tonight.base_name,
        "night": tonight.night.isoformat() if tonight.night else None,
        "metric": tonight.study.metric,
        "direction": tonight.study.direction,
        "best_value": best.value if best else None,
        "best_trial": best.number if best else None,
        "best_params": best.params if best else {},
        "previous_night": previous.date.isoformat() if previous else None,
        "previous_best_value": previous.best[0].value if previous else None,
        "delta": None,
        "changed_params": {},
        "trials": count["complete"] + count["pruned"],
        "complete": count["complete"],
        "pruned": count["pruned"],
        "failed": count["fail"],
        "duration_s": round(duration(study.get_trials(deepcopy=False)).total_seconds(), 1),
        "tolerance": tonight.schedule.regression_tolerance,
        "warm_start": study.user_attrs.get(WARM_START_ATTR, []),
    }
    if best is None:
        summary["status"] = "no-result" if previous is None else "regression"
        return summary
    if previous is None:
        summary["status"] = "first"
        return summary
    before = previous.best[0]
    assert best.value is not None and before.value is not None
    delta = best.value - before.value
    worse = -delta if maximize else delta
    summary["delta"] = delta
    summary["changed_params"] = {
        name: {"before": before.params.get(name), "after": best.params.get(name)}
        for name in sorted(set(before.params) | set(best.params))
        if before.params.get(name) != best.params.get(name)
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
        lines.append(f"  {name}: {change['before']!r} -> {change['after']!r}")
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
            from sweeper.store import counts

            count = counts(study)
            summary = {
                "night": date.isoformat(),
                "best_value": None,
                "delta": None,
                "trials": count["complete"] + count["pruned"],
                "pruned": count["pruned"],
                "failed": count["fail"],
                "duration_s": None,
                "status": "unfinished",
            }
        rows.append(summary)
    return rows


def notify(url: str, summary: dict[str, Any], emit: Callable[[str], None]) -> bool:
    """POST the summary as JSON; retried with back-off, never raises. True when delivered.

    Every attempt is bounded as a whole, and all of them together by
    NOTIFY_DEADLINE: a hook that answers a byte at a time cannot keep the night
    (and its lock) alive. The URL is shown without its path and query, which
    often carry a token.
    """
    body = json.dumps(summary).encode()
    shown = masked_url(url)
    deadline = time.monotonic() + NOTIFY_DEADLINE
    for attempt in range(1, NOTIFY_ATTEMPTS + 1):
        if attempt > 1:
            backoff = NOTIFY_BACKOFF * 2 ** (attempt - 2)
            time.sleep(max(0.0, min(backoff, deadline - time.monotonic())))
        limit = min(NOTIFY_TIMEOUT, deadline - time.monotonic())
        if limit < 1:
            break
        try:
            status = _post(url, body, limit)
        except (OSError, ValueError, http.client.HTTPException) as exc:
            reason = _scrub(str(getattr(exc, "reason", exc)), url)
            emit(f"notify {shown}: attempt {attempt} of {NOTIFY_ATTEMPTS} failed: {reason}")
        else:
            emit(f"notified {shown} (HTTP {status})")
            return True
    emit(f"notify {shown}: gave up; the night's result stands")
    return False


def _post(url: str, body: bytes, limit: float) -> int:
    """POST ``body``: the HTTP status, or the error; TimeoutError after ``limit`` s in all."""
    outcome: list[int | Exception] = []

    def send() -> None:
        request = urllib.request.Request(
            url, data=body, method="POST", headers={"Content-Type": "application/json"}
        )
        try:
            with urllib.request.urlopen(request, timeout=limit) as response:
                outcome.append(response.status)
        except Exception as exc:
            outcome.append(exc)

    # The socket timeout bounds each read, not the answer: the thread bounds it all.
    sender = threading.Thread(target=send, name="notify", daemon=True)
    sender.start()
    sender.join(limit)
    if not outcome:
        raise TimeoutError(f"no complete answer within {limit:.0f} s")
    if isinstance(outcome[0], Exception):
        raise outcome[0]
    return outcome[0]


def masked_url(url: str) -> str:
    """``scheme://host[:port]/...``: no credentials, no path, no query."""
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname or "?"
    if ":" in host:
        host = f"[{host}]"
    with contextlib.suppress(ValueError):
        if parts.port is not None:
            host += f":{parts.port}"
    hidden = parts.path not in {"", "/"} or parts.query or parts.fragment
    return f"{parts.scheme}://{host}/{'...' if hidden else ''}"


def _scrub(text: str, url: str) -> str:
    """An error message without the parts of ``url`` that ``masked_url`` hides."""
    parts = urllib.parse.urlsplit(url)
    hidden = [url, parts.path, parts.query, parts.fragment, parts.username, parts.password]
    for secret in sorted((h for h in hidden if h and len(h) > 1), key=len, reverse=True):
        text = text.replace(secret, "...")
    return text


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
