"""The warm parent: one process, forked once the task is imported, that forks every worker.

Importing torch, Lightning and the task (and preparing its data) costs
seconds of CPU. ``sweeper start`` pays it once, to validate; right after,
before the study's storage is opened, it forks this warm parent, and each
worker (also one started again after a kill) is forked from it with all of
that done. The sweep's own process cannot fork workers itself: by then it
holds the study's database connections, and in a terminal the live view's
thread.

The same rule as for trials holds: the process that forks has run no torch
operation that starts threads, and no CUDA call (see ``DESIGN.md``).

Protocol: the sweep writes one JSON order per line (``env``, ``log``, the
process ``name`` and the worker's own ``args``); the warm parent answers ``started PID``, and
``ended PID WAITSTATUS`` once it has reaped that worker. Closing the order
pipe lets it exit when its last worker has ended; if the sweep's process dies,
the warm parent gets SIGTERM, and its workers get SIGTERM in turn.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import json
import os
import select
import signal
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, NoReturn

from sweeper.errors import SweeperError

Serve = Callable[[dict[str, Any]], int]
"""What a forked worker runs, given the order's ``args``; returns its exit code."""

REAP_EVERY = 0.1
"""Seconds between the warm parent's looks for workers that ended."""

CLOSE_GRACE = 5.0
"""Seconds the warm parent gets to exit once the sweep has no more orders."""


class WarmParent:
    """The sweep's side of the warm parent: order workers, learn how they ended."""

    def __init__(self, pid: int, orders: int, reports: int) -> None:
        self.pid = pid
        self.orders = orders
        self.reports = reports
        self.buffer = b""
        self.ended: dict[int, int] = {}
        self.gone = False
        """The warm parent died (or closed its end): no more workers, no more reports."""
        self.status: int | None = None

    @classmethod
    def fork(cls, serve: Serve) -> WarmParent:
        """Fork the warm parent; ``serve`` runs in each worker it forks."""
        order_read, order_write = os.pipe()
        report_read, report_write = os.pipe()
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
        gc.collect()  # storages read and dropped before (a night's) close here, not in a child
        pid = os.fork()
        if pid == 0:
            code = 70
            try:
                os.close(order_write)
                os.close(report_read)
                _detach(os.getppid(), "sweeper-warm", signal.SIGTERM, signal.SIGINT)
                code = _serve_orders(order_read, report_write, serve)
            finally:
                os._exit(code)
        os.close(order_read)
        os.close(report_write)
        return cls(pid, order_write, report_read)

    def spawn(
        self, args: dict[str, Any], env: Mapping[str, str], log: Path, name: str
    ) -> WorkerProcess:
        """Fork a worker named ``name``, with ``env`` as its environment, its output
        appended to ``log``."""
        order = json.dumps({"args": args, "env": dict(env), "log": str(log), "name": name})
        try:
            os.write(self.orders, order.encode() + b"\n")
        except OSError:
            self.gone = True
        while not self.gone:
            for kind, values in self._collect(timeout=None):
                if kind == "started":
                    self.ended.pop(values[0], None)  # a pid an earlier worker had
                    return WorkerProcess(values[0], self)
        error = SweeperError(
            f"the workers' parent process (pid {self.pid}) {self.death()}; "
            "`sweeper start` again resumes the study"
        )
        error.exit_code = 1
        raise error

    def _collect(self, timeout: float | None) -> list[tuple[str, list[int]]]:
        """Read the reports that came within ``timeout`` seconds (None: until one comes)."""
        ready, _, _ = select.select([self.reports], [], [], timeout)
        if not ready:
            return []
        data = os.read(self.reports, 65536)
        if not data:
            self.gone = True
            return []
        self.buffer += data
        *lines, self.buffer = self.buffer.split(b"\n")
        reports = []
        for line in lines:
            kind, *values = line.decode().split()
            numbers = [int(value) for value in values]
            if kind == "ended":
                self.ended[numbers[0]] = numbers[1]
            reports.append((kind, numbers))
        return reports

    def death(self) -> str:
        """How the warm parent ended, once it has."""
        status = self._reap(wait=False)
        if status is None:
            return "stopped answering"
        if os.WIFSIGNALED(status):
            return f"was killed by signal {os.WTERMSIG(status)}"
        return f"exited with code {os.WEXITSTATUS(status)}"

    def _reap(self, wait: bool) -> int | None:
        if self.status is None:
            try:
                pid, status = os.waitpid(self.pid, 0 if wait else os.WNOHANG)
            except ChildProcessError:
                return None
            self.status = status if pid else None
        return self.status

    def close(self) -> None:
        """No more workers: the warm parent exits once its last one has ended."""
        if self.orders < 0:
            return
        os.close(self.orders)
        self.orders = -1
        deadline = time.monotonic() + CLOSE_GRACE
        while self._reap(wait=False) is None and time.monotonic() < deadline:
            if self.gone:
                time.sleep(0.05)
            else:
                self._collect(timeout=0.05)
        if self.status is None:
            os.kill(self.pid, signal.SIGKILL)
            self._reap(wait=True)
        os.close(self.reports)


class WorkerProcess:
    """A worker forked by the warm parent, with the part of ``Popen`` the sweep uses."""

    def __init__(self, pid: int, parent: WarmParent) -> None:
        self.pid = pid
        self.parent = parent

    @property
    def returncode(self) -> int | None:
        """Its exit code, or minus the signal that killed it; None while it runs."""
        status = self.parent.ended.get(self.pid)
        if status is None:
            return -signal.SIGKILL if self.parent.gone and not self._alive() else None
        return os.waitstatus_to_exitcode(status)

    def _alive(self) -> bool:
        """Whether it still runs (a zombie nobody reaps has ended)."""
        try:
            stat = Path(f"/proc/{self.pid}/stat").read_text()
        except OSError:
            return False
        return stat.rsplit(")", 1)[-1].split()[0] != "Z"

    def poll(self) -> int | None:
        if self.returncode is None and not self.parent.gone:
            self.parent._collect(timeout=0)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll() is None:
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                raise subprocess.TimeoutExpired(f"worker {self.pid}", timeout or 0)
            if self.parent.gone:
                time.sleep(0.05)
            else:
                self.parent._collect(timeout=min(0.2, left) if left is not None else 0.2)
        code = self.returncode
        assert code is not None
        return code

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, sig)


def _detach(
    parent: int, name: str, on_parent_death: signal.Signals, *ignored: signal.Signals
) -> None:
    """A fresh session named ``name``; ``on_parent_death`` when ``parent`` dies; the
    ``ignored`` signals ignored."""
    os.setsid()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, signal.SIG_IGN if sig in ignored else signal.SIG_DFL)
    die_with_parent(on_parent_death, name)
    if os.getppid() != parent:  # it died before the request took hold
        os._exit(1)


def die_with_parent(sig: signal.Signals, name: str | None = None) -> None:
    """Ask Linux to send ``sig`` to this process when its parent dies; ``name`` it (what
    ``top`` and ``ps -o comm`` show, 15 characters at most), as a fork keeps the parent's."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, int(sig))  # PR_SET_PDEATHSIG
        if name is not None:
            libc.prctl(15, ctypes.c_char_p(name.encode()[:15]), 0, 0, 0)  # PR_SET_NAME
    except (OSError, AttributeError):  # not Linux: the parent's checks still apply
        pass


def _serve_orders(orders: int, reports: int, serve: Serve) -> int:
    """The warm parent's loop: fork a worker per order, report each one's end."""
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)
    os.close(devnull)
    me = os.getpid()
    buffer = b""
    children: set[int] = set()
    open_orders = True
    while open_orders or children:
        if open_orders:
            ready, _, _ = select.select([orders], [], [], REAP_EVERY)
            if ready:
                data = os.read(orders, 65536)
                open_orders = bool(data)
                buffer += data
                *lines, buffer = buffer.split(b"\n")
                for line in lines:
                    pid = _fork_worker(json.loads(line), serve, me, (orders, reports))
                    children.add(pid)
                    os.write(reports, f"started {pid}\n".encode())
        else:
            time.sleep(REAP_EVERY)
        for pid in list(children):
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                children.discard(pid)
                os.write(reports, f"ended {pid} {status}\n".encode())
    return 0


def _fork_worker(order: dict[str, Any], serve: Serve, parent: int, pipes: tuple[int, ...]) -> int:
    pid = os.fork()
    if pid:
        return pid
    run_child(lambda: _worker(order, serve, parent, pipes))


def _worker(order: dict[str, Any], serve: Serve, parent: int, pipes: tuple[int, ...]) -> int:
    """The forked worker: its session, environment and log, then ``serve``."""
    for fd in pipes:
        os.close(fd)
    _detach(parent, order["name"], signal.SIGTERM)
    os.environ.clear()
    os.environ.update(order["env"])
    log = os.open(order["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(log, 1)
    os.dup2(log, 2)
    os.close(log)
    # fresh streams: the inherited ones may hold locks of threads that did not fork
    sys.stdout = open(1, "w", buffering=1, closefd=False)  # noqa: SIM115
    sys.stderr = open(2, "w", buffering=1, closefd=False)  # noqa: SIM115
    return serve(order["args"])


def run_child(work: Callable[[], int]) -> NoReturn:
    """In a forked child: run ``work`` and end with its code (70 after a traceback), the
    output flushed and none of the parent's cleanup run."""
    code = 70
    try:
        code = work()
    except BaseException:
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
