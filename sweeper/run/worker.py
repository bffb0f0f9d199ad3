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
from typing import Any

from sweeper.config import StudyConfig
from sweeper.errors import SweeperError
from sweeper.run.devices import Slot
from sweeper.run.warm import die_with_parent, run_child
from sweeper.store import HEARTBEAT_INTERVAL
from sweeper.tasks import Build

EXIT_BAD_INPUT = 2


@dataclass
class TrialProcess:
    """A forked trial: its process, its channel, and the trial once it is known."""

    pid: int
    channel: int
    started: float
    number: int | None = None
    timed_out: bool = False


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
        self.stopping = False
        self.stopped_at = 0.0
        self.code = 0
        self.unclaimed = 0

    def run(self) -> int:
        """Fork trials until the study has ``n_trials`` or is stopped; returns the exit code."""
        from sweeper.store import stop_request

        while not self.stopping:
            if stop_request(self.study) is not None:
                break  # `sweeper stop`: start no new trial
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
        """Fork and watch one trial; False when there was nothing left to claim."""
        from sweeper.run.trial import EXIT_NO_TRIAL, EXIT_SAMPLER
        from sweeper.store import before_fork

        before_fork(self.study)
        child = self._fork()
        status = self._watch(child)
        os.close(child.channel)
        code = os.WEXITSTATUS(status) if os.WIFEXITED(status) else None
        if child.timed_out:  # failed as timed out: a trial's outcome, not a broken claim
            self.unclaimed = 0
            return True
        if code == EXIT_NO_TRIAL:
            return False
        if code == EXIT_SAMPLER:  # the trial is failed; the sweep cannot go on
            self.code = EXIT_BAD_INPUT
            return False
        if child.number is None and code != 0 and not self.stopping:
            # It died claiming (the storage failing, a kill): the next claim
            # recovers its trial; claims that keep failing stop this worker.
            self.unclaimed += 1
            if self.unclaimed >= UNCLAIMED_LIMIT:  # the last one's own message says why
                self.code = 1
                return False
            return True
        self.unclaimed = 0
        if child.number is not None and code != 0:
            self._record_death(child, status)
        return True

    def _fork(self) -> TrialProcess:
        read_end, write_end = os.pipe()
        pid = os.fork()
        if pid == 0:  # the trial process
            os.close(read_end)
            run_child(lambda: self._child(write_end))
        os.close(write_end)
        return TrialProcess(pid=pid, channel=read_end, started=time.monotonic())

    def _child(self, channel: int) -> int:
        from sweeper.run.trial import run_trial

        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        die_with_parent(signal.SIGKILL, "sweeper-trial")
        from sweeper.store import forget_connections

        forget_connections(self.study)
        return run_trial(self.config, self.slot, self.build, self.study, channel, self.since)

    def _watch(self, child: TrialProcess) -> int:
        """Wait for the child, beating the trial's heartbeat and enforcing the time limit."""
        buffer = b""
        limit = self.config.resources.trial_timeout
        last_beat = 0.0
        open_channel = True
        while True:
            pid, status = os.waitpid(child.pid, os.WNOHANG)
            if pid:
                return status
            if open_channel:
                ready, _, _ = select.select([child.channel], [], [], 0.2)
                if ready:
                    data = os.read(child.channel, 4096)
                    open_channel = bool(data)
                    buffer += data
                    if b"\n" in buffer and child.number is None:
                        child.number = int(buffer.split(b"\n", 1)[0])
                        last_beat = time.monotonic()  # the claim wrote the first heartbeat
            else:
                time.sleep(0.05)
            now = time.monotonic()
            if child.number is not None and now - last_beat >= HEARTBEAT_INTERVAL:
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
                if not self.stopping and limit is not None:
                    self._time_out(child, limit)
                return status

    def _record_death(self, child: TrialProcess, status: int) -> None:
        from sweeper.store import INTERRUPTED, fail_trial

        if self.stopping:
            reason = f"{INTERRUPTED}: the sweep was stopped"
        elif os.WIFSIGNALED(status):
            sig = signal.Signals(os.WTERMSIG(status))
            reason = f"killed by signal {sig.value} ({sig.name})"
            if sig == signal.SIGKILL:
                reason += "; out of memory is the usual cause"
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
