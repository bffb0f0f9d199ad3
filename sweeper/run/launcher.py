"""Starts a worker per slot, watches them, starts again one a signal killed, stops them.

``worker_environment`` and ``worker_args`` are pure; ``Sweep`` is the thin
layer that touches processes (forked by the warm parent).
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sweeper.errors import SweeperError, SweepFailed
from sweeper.run.devices import Slot
from sweeper.run.warm import WarmParent, WorkerProcess
from sweeper.run.worker import EXIT_BAD_INPUT

STOP_GRACE = 30.0
"""Seconds workers get to record their trials after a stop before they are killed."""

RESPAWNS = 5
"""Times one slot's worker is started again after a signal killed it (OOM killer, kill -9)."""


def worker_environment(slot: Slot, environ: Mapping[str, str]) -> dict[str, str]:
    """The environment of the worker for ``slot``.

    A GPU slot sees only its GPU (CUDA_VISIBLE_DEVICES, mapped through any
    CUDA_VISIBLE_DEVICES the sweep itself was given); a CPU slot sees none.
    GPUs are numbered as nvidia-smi numbers them, from which the slots are
    planned: PCI bus order (CUDA_DEVICE_ORDER, unless the sweep was given one;
    CUDA's own order puts the fastest first, which differs on mixed GPUs).
    Thread counts are capped at the slot's share of the cores.
    """
    env = dict(environ)
    if slot.gpu is None:
        env["CUDA_VISIBLE_DEVICES"] = ""
    else:
        visible = [
            v.strip() for v in environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()
        ]
        env["CUDA_VISIBLE_DEVICES"] = visible[slot.gpu] if visible else str(slot.gpu)
        env.setdefault("CUDA_DEVICE_ORDER", "PCI_BUS_ID")
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[name] = str(slot.threads)
    env["TOKENIZERS_PARALLELISM"] = "false"
    env["PYTHONUNBUFFERED"] = "1"
    return env


def worker_args(slot: Slot, since: int | None) -> dict[str, Any]:
    """What :func:`sweeper.run.worker.serve` is given: the slot (the worker sees its GPU as
    0) and the first trial number of this run."""
    gpu = None if slot.gpu is None else 0
    return {"slot": [slot.index, gpu, slot.threads], "since": since}


@dataclass
class Sweep:
    """The running workers of one ``sweeper start``."""

    parent: WarmParent
    slots: list[Slot]
    log_dir: Path
    since: int | None = None
    processes: dict[int, WorkerProcess] = field(default_factory=dict)
    respawned: dict[int, int] = field(default_factory=dict)
    stopping: bool = False

    def start(self) -> None:
        """Start one worker per slot, each in its own session, logging to a file."""
        self.log_dir.mkdir(parents=True, exist_ok=True)
        for slot in self.slots:
            self._spawn(slot)

    def _spawn(self, slot: Slot) -> None:
        env = worker_environment(slot, os.environ)
        args = worker_args(slot, self.since)
        name = f"sweeper-slot-{slot.index}"
        self.processes[slot.index] = self.parent.spawn(args, env, self.log_path(slot), name)

    def log_path(self, slot: Slot) -> Path:
        return self.log_dir / f"slot-{slot.index}.log"

    def wait(self, tick: Callable[[], str | None], interval: float = 0.5) -> None:
        """Wait for every worker, calling ``tick`` between checks.

        ``tick`` returns a reason to stop the sweep (trials failing
        systematically or too often) or None. A worker killed by a signal is
        started again (its trial is then found orphaned and retried), up to
        ``RESPAWNS`` times a slot; a worker that fails otherwise makes the
        others stop.
        """
        while self.processes:
            reason = tick()
            if reason is not None:
                self.stop()
                raise SweepFailed(reason)
            for index, process in list(self.processes.items()):
                code = process.poll()
                if code is None:
                    continue
                del self.processes[index]
                killed = code < 0 and self.respawned.get(index, 0) < RESPAWNS
                if killed and not self.stopping:
                    self.respawned[index] = self.respawned.get(index, 0) + 1
                    self._spawn(self.slots[index])
                    continue
                if code != 0 and not self.stopping:
                    self.stop()
                    log = self.log_path(self.slots[index])
                    error = SweeperError(
                        f"worker of slot {index} exited with code {code}: {_last_line(log)} "
                        f"(log: {log})"
                    )
                    error.exit_code = 2 if code == EXIT_BAD_INPUT else 1
                    raise error
            time.sleep(interval)
        reason = tick()
        if reason is not None:
            raise SweepFailed(reason)

    def stop(self) -> None:
        """Ask every worker to stop (they fail and re-enqueue their trials), then wait."""
        self.stopping = True
        for process in self.processes.values():
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + STOP_GRACE
        for process in self.processes.values():
            try:
                process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        self.processes.clear()


def _last_line(path: Path) -> str:
    try:
        lines = [line for line in path.read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        return "no log"
    return lines[-1] if lines else "no output"
