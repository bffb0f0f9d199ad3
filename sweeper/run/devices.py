"""Which devices exist and how they split into slots; planning is pure."""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass, field
from typing import Literal

from sweeper.errors import DeviceError


@dataclass(frozen=True)
class Slot:
    """One place a trial runs: a GPU (``gpu`` is its index) or a share of the CPU."""

    index: int
    gpu: int | None
    threads: int

    @property
    def device(self) -> str:
        return "cpu" if self.gpu is None else f"cuda:{self.gpu}"


@dataclass(frozen=True)
class Plan:
    """The slots of a sweep, and warnings about what was asked for but not planned."""

    slots: list[Slot]
    warnings: list[str] = field(default_factory=list)


def plan(
    devices: Literal["auto", "cpu"] | list[int],
    gpu_count: int,
    cpu_count: int,
    trials_per_device: int = 1,
    cpu_workers: int = 1,
    n_trials: int | None = None,
) -> Plan:
    """Split the requested devices into slots.

    ``"auto"`` takes every GPU, or the CPU when there is none. Each GPU gets
    ``trials_per_device`` slots; the CPU gets ``cpu_workers`` slots sharing its
    cores evenly, never more than there are cores (with a warning). GPU slots
    get an even share of the cores for data loading. No more slots are planned
    than ``n_trials``: a slot beyond them would never run a trial.
    """
    cpu_count = max(1, cpu_count)
    limit = n_trials if n_trials is not None and n_trials >= 1 else None
    if devices == "cpu" or (devices == "auto" and gpu_count == 0):
        warnings = []
        workers = cpu_workers
        if cpu_workers > cpu_count:
            workers = cpu_count
            warnings.append(
                f"resources.cpu_workers = {cpu_workers} is more than the {cpu_count} cores "
                f"this process may use; running {cpu_count} CPU workers"
            )
        if limit is not None:
            workers = min(workers, limit)
        threads = max(1, cpu_count // workers)
        return Plan([Slot(index=i, gpu=None, threads=threads) for i in range(workers)], warnings)
    gpus = list(range(gpu_count)) if devices == "auto" else list(devices)
    missing = [gpu for gpu in gpus if gpu < 0 or gpu >= gpu_count]
    if missing:
        seen = f"GPUs 0-{gpu_count - 1}" if gpu_count else "no GPU"
        raise DeviceError(
            f"resources.devices: GPU {missing[0]} does not exist; this machine has {seen}"
        )
    if len(set(gpus)) != len(gpus):
        raise DeviceError(f"resources.devices: a GPU is listed twice: {gpus}")
    if not gpus:
        raise DeviceError("resources.devices: the list of GPUs is empty")
    n_slots = len(gpus) * trials_per_device
    if limit is not None:
        n_slots = min(n_slots, limit)
    threads = max(1, cpu_count // n_slots)
    # Round robin over the GPUs, so that fewer trials than slots still spread out.
    taken = sorted(k % len(gpus) for k in range(n_slots))
    return Plan([Slot(index=i, gpu=gpus[k], threads=threads) for i, k in enumerate(taken)])


def plan_slots(
    devices: Literal["auto", "cpu"] | list[int],
    gpu_count: int,
    cpu_count: int,
    trials_per_device: int = 1,
    cpu_workers: int = 1,
    n_trials: int | None = None,
) -> list[Slot]:
    """The slots of :func:`plan`, without its warnings."""
    return plan(devices, gpu_count, cpu_count, trials_per_device, cpu_workers, n_trials).slots


def count_gpus() -> int:
    """GPUs visible to this process, asked of the driver without initializing CUDA here."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and visible.strip() in {"", "-1"}:
        return 0
    if shutil.which("nvidia-smi") is None:
        return 0
    try:
        listing = subprocess.run(
            ["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30, check=True
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return 0
    found = sum(line.startswith("GPU ") for line in listing.splitlines())
    if visible is not None:
        return min(found, len([v for v in visible.split(",") if v.strip()]))
    return found


def count_cpus() -> int:
    """Cores this process may use; ``SWEEPER_CPUS`` overrides (a container whose quota
    is smaller than the cores it sees, or trials that mostly wait)."""
    given = os.environ.get("SWEEPER_CPUS", "")
    if given.isdigit() and int(given) > 0:
        return int(given)
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1
