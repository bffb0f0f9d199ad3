"""The loop of one device slot: fork a trial, watch it, record its end.

The worker is forked from the warm parent (:mod:`sweeper.run.warm`) with
torch, Lightning and the task imported and the task's data prepared, and runs
no torch operation itself: a forked child of a parent that did would hang in
OpenMP. Every trial runs in a child forked from it, so the trial starts in
milliseconds and all it allocates dies with it.
"""

from __future__ import annotations

import os
import select
import signal
import sys
import time
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from sweeper.config import StudyConfig
from sweeper.errors import SweeperError
from sweeper.plugins import RUNS_TORCH
from sweeper.run.devices import Slot
from sweeper.run.warm import die_with_parent, run_child
from sweeper.store import HEARTBEAT_INTERVAL
from sweeper.tasks import Build

if TYPE_CHECKING:
    import optuna

EXIT_BAD_INPUT = 2


@dataclass
class TrialProcess:
    """A forked trial: its process, its channel, and the trial once it is known."""

    pid: int
    channel: int
    started: float
    number: int | None = None
    trial: optuna.Trial | None = None
    """The trial, where the worker claimed it (else the trial process did, for it)."""
    timed_out: bool = False
    told: bool = False
    """Its outcome is recorded."""
    trouble: str | None = None
    """Why its outcome, sent, could not be recorded."""


TELL_ATTEMPTS = 3
"""Tries to record an outcome while the storage fails (1 s, then 2 s apart)."""

UNCLAIMED_LIMIT = 3
"""Trial processes in a row that die before their claim is done stop the worker."""

CLAIM_GRACE = 5.0
"""Seconds a stopping worker lets its trial process finish a claim under way (well within
the supervisor's grace for its workers)."""

OTHER_HOSTS_POLL = 5.0
"""Seconds between looks at other machines' trials once this one has no place left."""


class Worker:
    """Runs trials of one study on one slot until none is left to claim."""

    def __init__(
        self, config: StudyConfig, slot: Slot, build: Build, since: int | None = None
    ) -> None:
        from sweeper import store

        self.config = config
        self.slot = slot
        self.since = since
        self.build = build
        import sweeper.run.trial  # noqa: F401 - warm: imported once, not once per trial

        _quiet()  # after the imports: Lightning sets its loggers' levels on import
        self.study = store.load(config)
        self.claims = config.sampler.name not in RUNS_TORCH
        """This process claims each trial before the fork; else the trial process does."""
        self.stopping = False
        self.stopped_at = 0.0
        self.code = 0
        self.unclaimed = 0

    def run(self) -> int:
        """Fork trials until the study has ``n_trials`` or is stopped; returns the exit code.

        A claim gives no trial once `sweeper stop` was asked, and waiting for
        other machines ends then too.
        """
        while not self.stopping:
            if not self._run_one() and not self._await_other_hosts():
                break
        return self.code

    def _await_other_hosts(self) -> bool:
        """With no place left, wait while trials run on other machines.

        A machine that dies leaves its trials RUNNING; once their heartbeat has
        been silent for the grace period they are failed and enqueued again,
        for this worker to take. True when a trial failed since (a place may
        have opened), False when no other machine has a trial running.
        """
        import socket

        from optuna.trial import TrialState

        from sweeper.store import fail_stale, stop_request

        def failed() -> int:
            return len(self.study.get_trials(deepcopy=False, states=(TrialState.FAIL,)))

        host = socket.gethostname()
        before = failed()
        while not self.stopping and stop_request(self.study) is None:
            if failed() > before:
                return True  # a place opened: claim again
            running = self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
            if not any(t.user_attrs.get("host") != host for t in running):
                return False
            fail_stale(self.study)
            time.sleep(OTHER_HOSTS_POLL)
        return False

    def _run_one(self) -> bool:
        """Claim, fork and watch one trial; False when there was nothing left to claim."""
        from sweeper.run.trial import claim_next
        from sweeper.store import Owner, before_fork

        trial = None
        if self.claims:
            owner = Owner.me()
            claimed = claim_next(self.config, self.slot, self.study, owner, self.since, again=True)
            if isinstance(claimed, int):
                return self._unclaimed(claimed)
            trial = claimed
        else:
            before_fork(self.study)
        child = self._fork(trial)
        status = self._watch(child)
        os.close(child.channel)
        if child.told or child.timed_out:  # its outcome is recorded, whatever its exit
            self.unclaimed = 0
            return True
        if child.number is None:  # it claimed for this worker, and got no trial
            return self._unclaimed(os.WEXITSTATUS(status) if os.WIFEXITED(status) else None)
        self.unclaimed = 0
        self._record_death(child, status)
        return True

    def _unclaimed(self, code: int | None) -> bool:
        """After a claim that gave no trial, ``code`` saying why: whether to claim again."""
        from sweeper.run.trial import EXIT_NO_TRIAL, EXIT_SAMPLER

        if code == EXIT_NO_TRIAL:
            return False
        if code == EXIT_SAMPLER:  # the trial is failed; the sweep cannot go on
            self.code = EXIT_BAD_INPUT
            return False
        if self.stopping:
            return True
        # The claim failed (the storage failing, a kill): the next claim recovers
        # its trial; claims that keep failing stop this worker.
        self.unclaimed += 1
        if self.unclaimed >= UNCLAIMED_LIMIT:  # the last one's own message says why
            self.code = 1
            return False
        return True

    def _fork(self, trial: optuna.Trial | None) -> TrialProcess:
        read_end, write_end = os.pipe()
        worker = os.getpid()
        pid = os.fork()
        if pid == 0:  # the trial process
            os.close(read_end)
            run_child(lambda: self._child(write_end, trial, worker))
        os.close(write_end)
        number = None if trial is None else trial.number
        return TrialProcess(pid, read_end, time.monotonic(), number, trial)

    def _child(self, channel: int, trial: optuna.Trial | None, worker: int) -> int:
        from sweeper.run.trial import run_trial
        from sweeper.store import forget_connections

        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        die_with_parent(signal.SIGKILL, "sweeper-trial")
        if os.getppid() != worker:  # it died before the request took hold: its trial is orphaned
            return 1
        forget_connections(self.study)
        config, slot, since = self.config, self.slot, self.since
        return run_trial(config, slot, self.build, self.study, channel, trial, since)

    def _watch(self, child: TrialProcess) -> int:
        """Wait for the child, beating the trial's heartbeat, recording the outcome it sends
        and enforcing the time limit."""
        buffer = b""
        limit = self.config.resources.trial_timeout
        last_beat = time.monotonic()  # a claim writes the first heartbeat
        open_channel = True
        while True:
            pid, status = os.waitpid(child.pid, os.WNOHANG)
            if pid:
                self._heard(child, buffer + _written(child.channel))  # sent just before it ended
                return status
            if open_channel:
                ready, _, _ = select.select([child.channel], [], [], 0.2)
                if ready:
                    data = os.read(child.channel, 1 << 16)
                    open_channel = bool(data)
                    buffer = self._heard(child, buffer + data)
            else:
                time.sleep(0.05)
            now = time.monotonic()
            if child.number is None:
                last_beat = now
            elif not child.told and now - last_beat >= HEARTBEAT_INTERVAL:
                from sweeper.store import heartbeat

                heartbeat(self.study, child.number)
                last_beat = now
            # A trial still being claimed is let finish its claim (briefly): killed inside
            # it, it would leave a trial with no owner RUNNING until the next claim.
            claiming = child.number is None and now - self.stopped_at < CLAIM_GRACE
            stopped = self.stopping and not claiming
            if stopped or (limit is not None and now - child.started > limit):
                os.kill(child.pid, signal.SIGKILL)
                _, status = os.waitpid(child.pid, 0)
                self._heard(child, buffer + _written(child.channel))  # an outcome stands
                if not self.stopping and limit is not None and not child.told:
                    self._time_out(child, limit)
                return status

    def _heard(self, child: TrialProcess, buffer: bytes) -> bytes:
        """Act on the whole lines of ``buffer`` (the trial's number, then its outcome); the
        rest, for later."""
        *lines, rest = buffer.split(b"\n")
        for line in filter(None, lines):
            if child.number is None:
                child.number = int(line)
            elif not child.told:
                self._tell(child, line)
        return rest

    def _tell(self, child: TrialProcess, line: bytes) -> None:
        """Record the outcome the trial process sent (a trial failed meanwhile stays failed).

        The storage failing is tried again a few times; an outcome that still
        cannot be recorded leaves the trial to be failed and retried as one
        whose process died, with the reason.
        """
        import optuna

        from sweeper.run.channel import outcome
        from sweeper.store import running_trial, storage_failure, tell

        assert child.number is not None
        try:
            state, values, attrs = outcome(line)
        except (ValueError, KeyError, TypeError) as exc:  # a line that is no outcome
            child.trouble = f"its outcome could not be read: {type(exc).__name__}: {exc}"
            print(f"error: trial {child.number}: {child.trouble}", file=sys.stderr)
            return
        for attempt in range(TELL_ATTEMPTS):
            try:
                trial = child.trial or running_trial(self.study, child.number)
                tell(self.study, trial, state, values, attrs)
                child.told = True
                return
            except optuna.exceptions.StorageInternalError as exc:
                child.trouble = f"its outcome could not be recorded: {storage_failure(exc)}"
                if attempt + 1 < TELL_ATTEMPTS:
                    time.sleep(attempt + 1)
            except Exception as exc:  # an outcome Optuna refuses
                child.trouble = f"its outcome could not be recorded: {type(exc).__name__}: {exc}"
                break
        print(f"error: trial {child.number}: {child.trouble}", file=sys.stderr)

    def _record_death(self, child: TrialProcess, status: int) -> None:
        from sweeper.store import INTERRUPTED, fail_trial

        if self.stopping:
            reason = f"{INTERRUPTED}: the sweep was stopped"
        elif os.WIFSIGNALED(status):
            sig = signal.Signals(os.WTERMSIG(status))
            reason = f"killed by signal {sig.value} ({sig.name})"
            if sig == signal.SIGKILL:
                reason += "; out of memory is the usual cause"
        elif child.trouble is not None:
            reason = child.trouble
        else:
            reason = f"the trial process exited with code {os.WEXITSTATUS(status)}"
        assert child.number is not None
        retries = None if self.stopping else 1  # a kill may be out of memory: retry once
        fail_trial(self.study, self.config, child.number, reason, retries=retries)

    def _time_out(self, child: TrialProcess, limit: float) -> None:
        """Fail the trial that ran past its limit (not retried: it would hang again).

        The trial may have told its outcome just before it was killed; then
        that outcome stands (failing is idempotent).
        """
        from sweeper.store import fail_trial

        if child.number is not None:  # else it was still claiming: the next claim recovers it
            fail_trial(
                self.study, self.config, child.number, f"timed out after {limit:g} s", retries=0
            )
            child.timed_out = True

    def stop(self, *_: object) -> None:
        """Finish now: the running trial is killed, failed and enqueued again."""
        self.stopping = True
        self.stopped_at = time.monotonic()


def _written(channel: int) -> bytes:
    """What a trial process that has ended left in its pipe, without waiting: processes it
    forked (data loader workers) may hold the pipe open after it."""
    os.set_blocking(channel, False)
    chunks = []
    try:
        while chunk := os.read(channel, 1 << 16):
            chunks.append(chunk)
    except BlockingIOError:
        pass  # nothing more now
    return b"".join(chunks)


def _quiet() -> None:
    """Silence Lightning's console output; the study records what matters."""
    from sweeper.run.trainer import quiet_lightning

    quiet_lightning()
    warnings.filterwarnings("ignore")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def serve(config: StudyConfig, build: Build, args: dict[str, Any]) -> int:
    """A worker forked by the warm parent: run trials on ``args["slot"]`` until none is left.

    ``args["since"]`` is the first trial number of this run. Returns the exit code.
    """
    import optuna

    index, gpu, threads = args["slot"]
    try:
        worker = Worker(config, Slot(index, gpu, threads), build, args.get("since"))
    except SweeperError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    signal.signal(signal.SIGTERM, worker.stop)
    signal.signal(signal.SIGINT, worker.stop)
    try:
        return worker.run()
    except optuna.exceptions.StorageInternalError as exc:
        from sweeper.store import storage_failure

        print(f"error: {storage_failure(exc)}", file=sys.stderr)
        return 1
