"""Sweeps on every GPU: idle time between trials, memory per trial, bf16, the GPU each slot ran on.

    python bench/gpu.py [--workloads digits text] [--trials-per-gpu 6]

On a machine with NVIDIA GPUs (and ``nvidia-smi``), runs a real ``sweeper
start`` of each workload of ``bench/pruning.py`` (the digits MLP and the text
task on the packaged MiniLM) with one slot per GPU, no pruning and the
divergence guard off, so every trial runs in full. It prints, per GPU:

- trials run, and the idle time between trials (from one trial's end to the
  next one's claim on the same slot) as a share of the slot's wall time
  (target: below 2 %), with the time outside training (the trial's process,
  its task built, Lightning started) beside it;
- the precision the trials ran in (``bf16-mixed`` where the GPU has it);
- the most memory a trial's tensors held (``gpu_peak_mb``), the most a trial
  process held as nvidia-smi saw it, and the memory in use on the GPU while no
  trial ran on it, against the GPU's memory before the sweep (it must return
  to that baseline: nothing kept between trials);
- the GPU each slot planned and the one its trials really ran on, by PCI bus id
  (slots are planned from nvidia-smi's numbering, PCI bus order; CUDA's own
  order puts the fastest first).

Sampled every 0.2 s with ``nvidia-smi``. Finishes within a few minutes on one
GPU; each GPU more adds its trials, not time.
"""

from __future__ import annotations

import argparse
import itertools
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import optuna
from optuna.trial import FrozenTrial

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pruning import WORKLOADS, pruner_sections, write_study  # noqa: E402  (beside this script)
from sweeps import start  # noqa: E402

IDLE_TARGET = 0.02
"""Most idle time between trials, as a share of a slot's wall time."""
SAMPLE_EVERY = 0.2


@dataclass(frozen=True)
class Gpu:
    """One GPU as nvidia-smi lists it."""

    index: int
    bus: str
    name: str
    total_mb: int


@dataclass
class Samples:
    """What nvidia-smi showed during a sweep: memory used per GPU, and per process."""

    times: list[float] = field(default_factory=list)
    used: list[dict[str, int]] = field(default_factory=list)
    """Per sample: bus id -> MiB in use on that GPU."""
    apps: list[dict[str, int]] = field(default_factory=list)
    """Per sample: bus id -> MiB held by processes on it (0 or missing: no process)."""
    per_pid: dict[int, int] = field(default_factory=dict)
    """The most MiB each process was seen to hold."""
    failed: int = 0
    """Samples nvidia-smi did not answer."""


def smi(*query: str) -> list[list[str]]:
    """nvidia-smi's CSV answer to ``query``, as rows of stripped cells."""
    out = subprocess.run(
        ["nvidia-smi", *query, "--format=csv,noheader,nounits"],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    ).stdout
    lines = [line for line in out.splitlines() if line.strip()]
    return [[cell.strip() for cell in line.split(",")] for line in lines]


def bus_id(text: str) -> str | None:
    """A PCI bus id found in ``text``, as nvidia-smi writes it (8-digit domain, upper case)."""
    found = re.search(r"([0-9A-Fa-f]{4,8}):([0-9A-Fa-f]{2}:[0-9A-Fa-f]{2}\.[0-7])", text)
    return f"{int(found[1], 16):08X}:{found[2].upper()}" if found else None


def mib(cell: str) -> int:
    """A memory cell of nvidia-smi in MiB; 0 for ``[N/A]`` and ``[Not Supported]``."""
    try:
        return int(float(cell))
    except ValueError:
        return 0


def list_gpus() -> list[Gpu]:
    rows = smi("--query-gpu=index,pci.bus_id,name,memory.total")
    return [Gpu(int(i), bus_id(b) or b, n, mib(t)) for i, b, n, t in rows]


def sample(samples: Samples, stop: threading.Event) -> None:
    """Sample memory in use per GPU and per process until ``stop``; a process whose memory
    nvidia-smi does not show (in some containers) still counts as on its GPU."""
    while not stop.is_set():
        try:
            gpus = smi("--query-gpu=pci.bus_id,memory.used")
            apps = smi("--query-compute-apps=pid,gpu_bus_id,used_memory")
        except (OSError, subprocess.SubprocessError):
            samples.failed += 1
        else:
            used = {bus_id(b) or b: mib(u) for b, u in gpus}
            held: dict[str, int] = {}
            for pid, bus, mb in apps:
                where = bus_id(bus) or bus
                held[where] = held.get(where, 0) + max(mib(mb), 1)
                if pid.isdigit():
                    samples.per_pid[int(pid)] = max(samples.per_pid.get(int(pid), 0), mib(mb))
            samples.times.append(time.time())
            samples.used.append(used)
            samples.apps.append(held)
        stop.wait(SAMPLE_EVERY)


def sweep(name: str, trials_per_gpu: int, gpus: list[Gpu]) -> tuple[list[FrozenTrial], Samples]:
    """One ``sweeper start`` of workload ``name`` on every GPU, sampled throughout."""
    workload = WORKLOADS[name]
    samples = Samples()
    stop = threading.Event()
    with tempfile.TemporaryDirectory(prefix="sweeper-gpu-") as tmp:
        folder = Path(tmp)
        study_file = write_study(
            folder,
            workload,
            trials_per_gpu * len(gpus),
            0,
            pruner_sections("none", 0),  # every trial in full: no pruner, no guard
            'devices = "auto"\ntrials_per_device = 1',
        )
        sampler = threading.Thread(target=sample, args=(samples, stop), daemon=True)
        sampler.start()
        try:
            start(study_file, name)
        finally:
            stop.set()
            sampler.join()
        study = optuna.load_study(study_name="bench", storage=f"sqlite:///{folder}/bench.db")
        return study.get_trials(deepcopy=False), samples


def slot_times(trials: list[FrozenTrial]) -> dict[int, list[FrozenTrial]]:
    """Each slot's trials, in the order they ran."""
    by_slot: dict[int, list[FrozenTrial]] = {}
    for trial in trials:
        if trial.datetime_start and trial.datetime_complete and "slot" in trial.user_attrs:
            by_slot.setdefault(int(trial.user_attrs["slot"]), []).append(trial)
    for ran in by_slot.values():
        ran.sort(key=lambda t: t.datetime_start)  # type: ignore[arg-type,return-value]
    return by_slot


def between(before: FrozenTrial, after: FrozenTrial) -> float:
    """Seconds from one trial's end to the next one's claim on the same slot."""
    assert before.datetime_complete is not None and after.datetime_start is not None
    return (after.datetime_start - before.datetime_complete).total_seconds()


def report(name: str, trials: list[FrozenTrial], samples: Samples, gpus: list[Gpu]) -> list[str]:
    """The table rows of one workload, then a NOTE line and a MISS line for each target
    missed."""
    by_bus = {gpu.bus: gpu for gpu in gpus}
    baseline = samples.used[0] if samples.used else {}
    rows, misses = [], []
    for slot, ran in sorted(slot_times(trials).items()):
        planned = gpus[slot]  # one slot per GPU, in nvidia-smi's order
        first, last = ran[0].datetime_start, ran[-1].datetime_complete
        assert first is not None and last is not None
        wall = (last - first).total_seconds()
        gaps = sum(between(a, b) for a, b in itertools.pairwise(ran))
        fits = sum(float(t.user_attrs.get("fit_seconds", 0.0)) for t in ran)
        seen = {str(t.user_attrs["gpu"]) for t in ran if "gpu" in t.user_attrs}
        ran_on = sorted(
            {f"GPU {by_bus[b].index}" if (b := bus_id(s)) in by_bus else s for s in seen}
        )
        precision = ", ".join(sorted({str(t.user_attrs.get("precision", "?")) for t in ran}))
        peak = max(float(t.user_attrs.get("gpu_peak_mb", 0.0)) for t in ran)
        windows = [
            (t.datetime_start.timestamp(), t.datetime_complete.timestamp())
            for t in ran
            if t.datetime_start and t.datetime_complete
        ]
        idle_mb = [
            used.get(planned.bus, 0) - baseline.get(planned.bus, 0)
            for at, used, apps in zip(samples.times, samples.used, samples.apps, strict=True)
            if apps.get(planned.bus, 0) == 0 and not any(a <= at <= b for a, b in windows)
        ]
        left = f"{max(idle_mb)}" if idle_mb else "-"
        idle = gaps / wall if wall > 0 else 0.0
        rows.append(
            f"| {name} | {slot} | GPU {planned.index} {planned.name} ({planned.bus}) | "
            f"{', '.join(ran_on) or '?'} | {len(ran)} | {100 * idle:.2f} % | "
            f"{100 * (wall - fits) / wall if wall > 0 else 0.0:.1f} % | {precision} | "
            f"{peak:.0f} | {left} |"
        )
        if idle > IDLE_TARGET:
            misses.append(f"{name}: slot {slot} idle {100 * idle:.2f} % between trials")
        if ran_on != [f"GPU {planned.index}"]:
            misses.append(f"{name}: slot {slot} planned GPU {planned.index}, ran on {ran_on}")
        if idle_mb and max(idle_mb) > 64:
            misses.append(f"{name}: GPU {planned.index} kept {max(idle_mb)} MiB between trials")
    held = max(samples.per_pid.values(), default=0)
    said = (
        f"NOTE {name}: the most a trial process held, as nvidia-smi saw it: {held} MiB; "
        f"{len(samples.times)} samples, {samples.failed} unanswered"
    )
    return rows + [said] + [f"MISS {m}" for m in misses]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workloads", nargs="+", choices=["digits", "text"], default=None)
    parser.add_argument("--trials-per-gpu", type=int, default=6)
    args = parser.parse_args()
    if shutil.which("nvidia-smi") is None:
        raise SystemExit("bench/gpu.py: no nvidia-smi on this machine; it measures GPUs only")
    if os.environ.get("CUDA_VISIBLE_DEVICES") is not None:
        raise SystemExit(
            "bench/gpu.py: CUDA_VISIBLE_DEVICES is set; unset it: the bench plans every GPU "
            "nvidia-smi lists, as sweeper does without it"
        )
    gpus = list_gpus()
    if not gpus:
        raise SystemExit("bench/gpu.py: nvidia-smi lists no GPU")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    began = time.perf_counter()
    head = (
        "workload",
        "slot",
        "planned",
        "ran on",
        "trials",
        "idle between trials",
        "outside training",
        "precision",
        "tensor peak MiB",
        "MiB above baseline, no trial on it",
    )
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    notes: list[str] = []
    misses: list[str] = []
    for name in args.workloads or ["digits", "text"]:
        try:
            trials, samples = sweep(name, args.trials_per_gpu, gpus)
        except SystemExit as failed:  # the sweep failed: its last lines, and on to the next
            misses.append(f"{name}: {failed}")
            continue
        rows = report(name, trials, samples, gpus)
        lines += [row for row in rows if row.startswith("|")]
        notes += [row[5:] for row in rows if row.startswith("NOTE")]
        misses += [row[5:] for row in rows if row.startswith("MISS")]
        walls = [
            (t.datetime_complete - t.datetime_start).total_seconds()
            for t in trials
            if t.datetime_complete and t.datetime_start
        ]
        median = f"{statistics.median(walls):.1f} s" if walls else "-"
        print(f"{name}: {len(trials)} trials, median trial {median}", file=sys.stderr)
    print(f"{len(gpus)} GPU(s): " + "; ".join(f"{g.index} {g.name} {g.bus}" for g in gpus))
    print("\n".join(lines))
    print()
    print("\n".join(notes))
    print("\n".join(f"missed: {m}" for m in misses) if misses else "every target met")
    print(f"total {(time.perf_counter() - began) / 60:.1f} min")


if __name__ == "__main__":
    main()
