"""The loop of one device slot: fork a trial from a warm parent, watch it, record its end.

The worker imports torch, Lightning and the task once, and runs no torch
operation itself: a forked child of a parent that did would hang in OpenMP.
Every trial runs in a child forked from it, so the trial starts in
milliseconds and all it allocates dies with it.
"""

from __future__ import annotations

import argparse
import ctypes
import datetime as dt
import os
import select
import signal
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

from sweeper.config import StudyConfig, load_config
from sweeper.devices import Slot
from sweeper.errors import SweeperError
from sweeper.storage import HEARTBEAT_INTERVAL, backend

EXIT_SYSTEMATIC = 3
"""The worker stopped because the first trials all failed the same way."""

EXIT_BAD_INPUT = 2


@dataclass
class TrialProcess:
    """A forked trial: its process, its channel, and the trial once it is known."""

    pid: int
    channel: int
    started: float
    trial_id: int | None = None
    number: int | None = None


OTHER_HOSTS_POLL = 5.0
"""Seconds between looks at other machines' trials once this one has no place left."""


class Worker:
    """Runs trials of one study on one slot until none is left to claim."""

    def __init__(self, config: StudyConfig, slot: Slot) -> None:
        from sweeper import study as studies
        from sweeper.tasks import load_task

        self.config = config
        self.slot = slot
        self.build = load_task(config)
        import sweeper.trial  # noqa: F401 - warm: torch and Lightning imported once

        _quiet()  # after the imports: Lightning sets its loggers' levels on import
        self.study = studies.load(config)
        self.stopping = False

    def run(self) -> int:
        """Fork trials until the study has ``n_trials``; returns the exit code."""
        from sweeper.study import systematic_failure

        while not self.stopping:
            if systematic_failure(self.study) is not None:
                return EXIT_SYSTEMATIC
            if not self._run_one() and not self._await_other_hosts():
                break
        return 0

    def _await_other_hosts(self) -> bool:
        """With no place left, wait while trials run on other machines.

        A machine that dies leaves its trials RUNNING; once their heartbeat has
        been silent for the grace period they are failed and enqueued again,
        for this worker to take. True when a trial failed since (a place may
        have opened), False when no other machine has a trial running.
        """
        import socket

        from optuna.trial import TrialState

        from sweeper.study import fail_stale

        def failed() -> int:
            return len(self.study.get_trials(deepcopy=False, states=(TrialState.FAIL,)))

        host = socket.gethostname()
        before = failed()
        while not self.stopping:
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
        from sweeper.trial import EXIT_NO_TRIAL

        child = self._fork()
        status = self._watch(child)
        os.close(child.channel)
        if os.WIFEXITED(status) and os.WEXITSTATUS(status) == EXIT_NO_TRIAL:
            return False
        if child.trial_id is not None and not (
            os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
        ):
            self._record_death(child, status)
        return True

    def _fork(self) -> TrialProcess:
        read_end, write_end = os.pipe()
        pid = os.fork()
        if pid == 0:  # the trial process
            os.close(read_end)
            code = 70
            try:
                code = self._child(write_end)
            except BaseException:
                import traceback

                traceback.print_exc()
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        os.close(write_end)
        return TrialProcess(pid=pid, channel=read_end, started=time.monotonic())

    def _child(self, channel: int) -> int:
        from sweeper.trial import run_trial

        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        _die_with_parent(signal.SIGKILL)
        # The parent's connections belong to the parent: drop them unclosed.
        backend(self.study).engine.dispose(close=False)
        return run_trial(self.config, self.slot, self.build, self.study, channel)

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
                    if b"\n" in buffer and child.trial_id is None:
                        trial_id, number = buffer.split(b"\n", 1)[0].split()
                        child.trial_id, child.number = int(trial_id), int(number)
            else:
                time.sleep(0.05)
            now = time.monotonic()
            if child.trial_id is not None and now - last_beat >= HEARTBEAT_INTERVAL:
                backend(self.study).record_heartbeat(child.trial_id)
                last_beat = now
            if self.stopping or (limit is not None and now - child.started > limit):
                os.kill(child.pid, signal.SIGKILL)
                _, status = os.waitpid(child.pid, 0)
                if not self.stopping:
                    self._time_out(child, limit)
                return status

    def _record_death(self, child: TrialProcess, status: int) -> None:
        from sweeper.study import fail_and_retry

        if self.stopping:
            reason = "interrupted: the sweep was stopped"
        elif os.WIFSIGNALED(status):
            sig = signal.Signals(os.WTERMSIG(status))
            reason = f"killed by signal {sig.value} ({sig.name})"
            if sig == signal.SIGKILL:
                reason += "; out of memory is the usual cause"
        else:
            reason = f"the trial process exited with code {os.WEXITSTATUS(status)}"
        assert child.trial_id is not None
        trial = self.study._storage.get_trial(child.trial_id)
        if trial.state.is_finished():
            return
        fail_and_retry(self.study, trial, reason)

    def _time_out(self, child: TrialProcess, limit: float | None) -> None:
        from optuna.trial import TrialState

        if child.trial_id is None:
            return
        storage = self.study._storage
        storage.set_trial_user_attr(child.trial_id, "stop_reason", f"timed out after {limit:g} s")
        storage.set_trial_state_values(child.trial_id, state=TrialState.FAIL)
        child.trial_id = None  # recorded; nothing more to do

    def stop(self, *_: object) -> None:
        """Finish now: the running trial is killed, failed and enqueued again."""
        self.stopping = True


def _die_with_parent(sig: signal.Signals) -> None:
    """Ask Linux to send ``sig`` to this process when its parent dies."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, int(sig))  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux: the parent's checks still apply
        pass


def _quiet() -> None:
    """Silence Lightning's console output; the study records what matters."""
    from sweeper.trial import quiet_lightning

    quiet_lightning()
    warnings.filterwarnings("ignore")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def main(argv: list[str] | None = None) -> int:
    """``python -m sweeper.worker STUDY.toml --slot I [--gpu G] [--threads T] [--n-trials N]
    [--night YYYY-MM-DD]``."""
    parser = argparse.ArgumentParser(prog="sweeper-worker")
    parser.add_argument("study_file", type=Path)
    parser.add_argument("--slot", type=int, required=True)
    parser.add_argument("--gpu", type=int, default=None)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--n-trials", type=int, default=None)
    parser.add_argument("--night", type=dt.date.fromisoformat, default=None)
    args = parser.parse_args(argv)
    _die_with_parent(signal.SIGTERM)
    slot = Slot(index=args.slot, gpu=args.gpu, threads=args.threads)
    try:
        config = load_config(args.study_file, n_trials=args.n_trials)
        worker = Worker(config if args.night is None else config.for_night(args.night), slot)
    except SweeperError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    signal.signal(signal.SIGTERM, worker.stop)
    signal.signal(signal.SIGINT, worker.stop)
    return worker.run()


if __name__ == "__main__":
    sys.exit(main())
