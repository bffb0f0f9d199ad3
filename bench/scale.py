"""Storage at scale: sweeper's claim and tell against plain Optuna, on SQLite and PostgreSQL.

    python bench/scale.py [--storages sqlite postgres] [--processes 8 32 64] [--seconds 20]
                          [--paths sweeper sweeper-inline optuna] [--sizes 10000 100000]
                          [--reads-only]
    python bench/scale.py --quick    # 8 and 32 processes for 6 s, 10,000 trials: about a minute
    python bench/scale.py --storages sqlite --reads-only    # the read table alone

Each claimer does what sweeper's worker does: it claims under the study's
claim lock (owner record, first heartbeat), forks a process for the trial,
which sends a trivial outcome back (no torch: the point is the storage), and
tells it. The ``sweeper-inline`` rows make the same claims and tells with the
outcome made in the claimer itself: the storage's share, without the process
a real trial runs in. A dashboard-like reader polls the study
throughout. Plain Optuna workers run ``study.optimize`` on a study of the same
storage kind for comparison. Both use the random sampler, so the sampler's own
cost stays out of the figures. PostgreSQL is the server on loopback
(``SWEEPER_TEST_POSTGRES``, default postgresql://postgres@127.0.0.1:5432); each
row gets a fresh database, dropped afterwards, whose sessions are counted in
``pg_stat_activity`` every 50 ms.

Then, for each size, a study of that many finished trials (each with its
params, value, owner record, stop reason and a two-validation history) is
written in bulk and read: sweeper's fast read (``sweeper.store.read_trials``),
``study.get_trials()`` on a study sweeper opened (Optuna's cache over the
same fast read), and ``sweeper status`` as a user runs it (a new process: its
start-up is in the figure).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import multiprocessing
import os
import random
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
import tomlkit
from optuna.trial import TrialState

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from sweeper import store  # noqa: E402
from sweeper.config import StudyConfig, load_config  # noqa: E402
from sweeper.run.channel import outcome, send_outcome  # noqa: E402

SERVER = os.environ.get("SWEEPER_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432")
NAME = "scale"

optuna.logging.set_verbosity(optuna.logging.ERROR)


@dataclass
class Row:
    """One line of the throughput table."""

    storage: str
    path: str
    processes: int
    seconds: float
    trials: int = 0
    latencies: list[float] = field(default_factory=list)
    errors: int = 0
    first_error: str = ""
    connections: int | None = None
    reads: int = 0
    read_errors: int = 0
    worst_read_s: float = 0.0
    finished: int = 0
    stuck: int = 0

    def cells(self) -> list[str]:
        lat = sorted(self.latencies) or [float("nan")]
        p50 = lat[len(lat) // 2] * 1000
        p99 = lat[min(len(lat) - 1, int(len(lat) * 0.99))] * 1000
        per = "-" if self.connections is None else f"{self.connections / self.processes:.2f}"
        return [
            self.storage,
            self.path,
            str(self.processes),
            f"{self.trials / self.seconds:.1f}",
            f"{p50:.0f}",
            f"{p99:.0f}",
            str(self.errors),
            "-" if self.connections is None else str(self.connections),
            per,
            f"{self.reads} / {self.read_errors}",
            f"{self.worst_read_s:.2f}",
            f"{self.finished} / {self.stuck}",
        ]


HEAD = [
    "storage",
    "path",
    "processes",
    "trials/s",
    "claim p50 ms",
    "claim p99 ms",
    "errors",
    "server connections (most)",
    "per process",
    "reader polls / errors",
    "worst poll s",
    "finished / stuck",
]


def study_file(folder: Path, storage: str, n_trials: int = 10_000_000) -> Path:
    """A study file whose trials the claimers never run out of."""
    data = {
        "study": {
            "name": NAME,
            "direction": "maximize",
            "metric": "val_acc",
            "n_trials": n_trials,
            "seed": 1,
            "max_failures": 1_000_000,
            "storage": storage,
        },
        "task": {"name": "scale_task:build"},
        "search": {
            "lr": {"low": 1e-4, "high": 1.0, "log": True},
            "hidden": {"low": 4, "high": 64, "step": 4},
        },
        "sampler": {"name": "random"},
    }
    path = folder / "study.toml"
    path.write_text(tomlkit.dumps(data))
    return path


@contextlib.contextmanager
def storage_url(kind: str, folder: Path) -> Iterator[str]:
    """A fresh storage of ``kind``: a SQLite file in ``folder`` or a new PostgreSQL database."""
    if kind == "sqlite":
        yield f"sqlite:///{folder / f'{uuid.uuid4().hex[:8]}.db'}"
        return
    import psycopg

    name = f"sweeper_scale_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(f"{SERVER}/postgres", autocommit=True) as admin:
        admin.execute(f"CREATE DATABASE {name}")
    try:
        yield f"{SERVER}/{name}"
    finally:
        with psycopg.connect(f"{SERVER}/postgres", autocommit=True) as admin:
            admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


class Connections(threading.Thread):
    """The most sessions the server held on one database, sampled every 50 ms."""

    def __init__(self, url: str) -> None:
        super().__init__(daemon=True)
        self.database = url.rsplit("/", 1)[1]
        self.most = 0
        self.done = threading.Event()

    def run(self) -> None:
        import psycopg

        with psycopg.connect(f"{SERVER}/postgres", autocommit=True) as monitor:
            while not self.done.is_set():
                row = monitor.execute(
                    "SELECT count(*) FROM pg_stat_activity WHERE datname = %s", (self.database,)
                ).fetchone()
                self.most = max(self.most, int(row[0]) if row else 0)
                time.sleep(0.05)


CONNECTIONS_PER_PROCESS = 4
"""Server sessions of one claimer, at most: its two pooled ones, the claim lock's, and one to
spare (a real trial process opens one to report to the pruner; these trivial ones do not)."""


def room_on_server() -> int:
    """Sessions the PostgreSQL server can still open: max_connections less those in use."""
    import psycopg

    with psycopg.connect(f"{SERVER}/postgres", autocommit=True) as admin:
        row = admin.execute(
            "SELECT current_setting('max_connections')::int "
            "- current_setting('superuser_reserved_connections')::int "
            "- (SELECT count(*) FROM pg_stat_activity)"
        ).fetchone()
    return int(row[0]) if row else 0


def one_trial(study: optuna.Study, channel: int) -> None:
    """In a forked process: run a trivial trial and send its outcome, as a trial process does."""
    store.forget_connections(study)
    send_trivial(channel)


def send_trivial(channel: int) -> None:
    """Send a trivial trial's outcome, as a trial process does at its end."""
    send_outcome(channel, TrialState.COMPLETE, [random.random()], {"stop_reason": "completed"})


def sweeper_claimer(
    path: str, seconds: float, barrier: Any, results: Any, fork: bool = True
) -> None:  # pragma: no cover - runs in a child
    """A worker: claim under the study's claim lock, fork a process per trial (or, without
    ``fork``, make its outcome here), tell what it sent, until the time is up."""

    config = load_config(path)
    study = store.load(config)
    store.forget_connections(study)
    latencies: list[float] = []
    errors: list[str] = []
    barrier.wait()
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        began = time.perf_counter()
        try:
            with store.claim_lock(config, keep_session=True):
                trial = store.claim(study, config, store.Owner.me(), {"slot": 0, "device": "cpu"})
        except Exception as exc:  # counted as an error of this row
            errors.append(f"error: {type(exc).__name__}: {str(exc).strip()[:200]}")
            continue
        if trial is None:
            continue
        latencies.append(time.perf_counter() - began)
        read_end, write_end = os.pipe()
        pid = os.fork() if fork else None
        if pid is None:  # the trial's outcome made here, sent through the same pipe
            send_trivial(write_end)
        elif pid == 0:
            os.close(read_end)
            try:
                one_trial(study, write_end)
            finally:
                os._exit(0)
        os.close(write_end)
        chunks = []
        while chunk := os.read(read_end, 4096):
            chunks.append(chunk)
        os.close(read_end)
        status = 0 if pid is None else os.waitpid(pid, 0)[1]
        try:
            told = store.tell(study, trial, *outcome(b"".join(chunks)))
        except Exception as exc:  # counted as an error of this row
            errors.append(f"error: {type(exc).__name__}: {str(exc).strip()[:200]}")
            continue
        if status != 0 or not told:
            errors.append(f"trial process ended with status {status}, told: {told}")
    results.put((latencies, errors))


def optuna_worker(
    url: str, seconds: float, barrier: Any, results: Any
) -> None:  # pragma: no cover - runs in a child
    """Plain Optuna: ``study.optimize`` one trial at a time until the time is up."""
    study = optuna.load_study(
        study_name=NAME, storage=url, sampler=optuna.samplers.RandomSampler()
    )
    latencies: list[float] = []
    errors: list[str] = []
    barrier.wait()
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        began = time.perf_counter()

        def objective(trial: optuna.Trial, began: float = began) -> float:
            latencies.append(time.perf_counter() - began)
            trial.suggest_int("hidden", 4, 64, step=4)
            return trial.suggest_float("lr", 1e-4, 1.0, log=True)

        try:
            study.optimize(objective, n_trials=1, catch=())
        except Exception as exc:  # counted as an error of this row
            errors.append(f"error: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}")
    results.put((latencies, errors))


def reader(path: str, seconds: float, barrier: Any, results: Any) -> None:  # pragma: no cover
    """A dashboard-like reader: every half second, the study's trials and counts."""
    config = load_config(path)
    url = config.storage_url
    storage = store.open_storage(url, writer=False)
    study = optuna.load_study(study_name=NAME, storage=storage)
    polls, failures, worst = 0, 0, 0.0
    barrier.wait()
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        began = time.perf_counter()
        try:
            store.snapshot(study, config.study.n_trials)
        except Exception:  # counted: a reader must never fail while the sweep writes
            failures += 1
        worst = max(worst, time.perf_counter() - began)
        polls += 1
        time.sleep(0.5)
    results.put((polls, failures, worst))


PATHS = ("sweeper", "sweeper-inline", "optuna")


def throughput(kind: str, path_kind: str, processes: int, seconds: float, folder: Path) -> Row:
    """One row: ``processes`` claimers (sweeper's or Optuna's) and a reader on a fresh storage."""
    row = Row(kind, path_kind, processes, seconds)
    with storage_url(kind, folder) as url:
        config_path = study_file(folder, url)
        config = load_config(config_path)
        study = store.create_or_resume(config)
        store.forget_connections(study)
        context = multiprocessing.get_context("fork")
        barrier = context.Barrier(processes + 2)
        results = context.Queue()
        reads = context.Queue()
        if path_kind == "optuna":
            target: Any = optuna_worker
            arguments: tuple[Any, ...] = (url, seconds, barrier, results)
        else:
            target = sweeper_claimer
            fork = path_kind == "sweeper"
            arguments = (str(config_path), seconds, barrier, results, fork)
        workers = [context.Process(target=target, args=arguments) for _ in range(processes)]
        workers.append(
            context.Process(target=reader, args=(str(config_path), seconds, barrier, reads))
        )
        for worker in workers:
            worker.start()
        monitor = Connections(url) if kind == "postgres" else None
        barrier.wait()
        if monitor is not None:
            monitor.start()
        for _ in range(processes):
            latencies, errors = results.get(timeout=seconds + 600)
            row.latencies += latencies
            row.errors += len(errors)
            row.first_error = row.first_error or (errors[0] if errors else "")
        row.reads, row.read_errors, row.worst_read_s = reads.get(timeout=600)
        for worker in workers:
            worker.join(timeout=60)
        if monitor is not None:
            monitor.done.set()
            monitor.join()
            row.connections = monitor.most
        row.trials = len(row.latencies)
        trials = optuna.load_study(study_name=NAME, storage=url).get_trials(deepcopy=False)
        states = [t.state for t in trials]
        row.finished = sum(s.is_finished() and s.name != "FAIL" for s in states)
        row.stuck = sum(s.name == "RUNNING" for s in states)
    return row


def write_big_study(config: StudyConfig, size: int) -> None:
    """``size`` finished trials written in bulk, with what a real trial stores."""
    import sqlalchemy as sa
    from optuna.distributions import FloatDistribution, IntDistribution, distribution_to_json
    from optuna.trial import TrialState

    from sweeper.store._compat import models

    study = store.create_or_resume(config)
    storage = store.open_storage(config.storage_url)
    study_id = storage.get_study_id_from_name(NAME)
    lr_json = distribution_to_json(FloatDistribution(1e-4, 1.0, log=True))
    hidden_json = distribution_to_json(IntDistribution(4, 64, step=4))
    finite = models.TrialValueModel.TrialValueType.FINITE
    finite_step = models.TrialIntermediateValueModel.TrialIntermediateValueType.FINITE
    start = dt.datetime(2025, 1, 1)
    rng = random.Random(0)
    del study
    with storage.engine.begin() as connection:
        first = connection.execute(sa.select(sa.func.max(models.TrialModel.trial_id))).scalar()
    base = (first or 0) + 1
    batch = 5000
    for offset in range(0, size, batch):
        trials, params, values, attrs, steps = [], [], [], [], []
        for number in range(offset, min(size, offset + batch)):
            trial_id = base + number
            value = rng.random()
            began = start + dt.timedelta(seconds=number)
            trials.append(
                {
                    "trial_id": trial_id,
                    "number": number,
                    "study_id": study_id,
                    "state": TrialState.COMPLETE,
                    "datetime_start": began,
                    "datetime_complete": began + dt.timedelta(seconds=30),
                }
            )
            lr = 10 ** rng.uniform(-4, 0)
            params += [
                {
                    "trial_id": trial_id,
                    "param_name": "lr",
                    "param_value": lr,
                    "distribution_json": lr_json,
                },
                {
                    "trial_id": trial_id,
                    "param_name": "hidden",
                    "param_value": float(rng.randrange(4, 65, 4)),
                    "distribution_json": hidden_json,
                },
            ]
            values.append(
                {"trial_id": trial_id, "objective": 0, "value": value, "value_type": finite}
            )
            history = [
                {"step": s, "epoch": e, "val_acc": value, "val_loss": 1 - value, "train_loss": 0.5}
                for e, s in enumerate((6, 12))
            ]
            record = {
                "host": "machine-a",
                "pid": 1000 + number % 97,
                "pid_start": 123456,
                "worker_pid": 999,
                "worker_start": 123400,
                "slot": number % 8,
                "device": f"cuda:{number % 8}",
                "seed": number,
                "stop_reason": "completed",
                "fit_seconds": 29.5,
                "steps": 12,
                "best_step": 12,
                "best_epoch": 1,
                "history": history,
            }
            attrs += [
                {"trial_id": trial_id, "key": key, "value_json": json.dumps(item)}
                for key, item in record.items()
            ]
            steps += [
                {
                    "trial_id": trial_id,
                    "step": s,
                    "intermediate_value": value,
                    "intermediate_value_type": finite_step,
                }
                for s in (6, 12)
            ]
        with storage.engine.begin() as connection:
            connection.execute(sa.insert(models.TrialModel.__table__), trials)
            connection.execute(sa.insert(models.TrialParamModel.__table__), params)
            connection.execute(sa.insert(models.TrialValueModel.__table__), values)
            connection.execute(sa.insert(models.TrialUserAttributeModel.__table__), attrs)
            connection.execute(sa.insert(models.TrialIntermediateValueModel.__table__), steps)
    storage.engine.dispose()


@dataclass
class ReadRow:
    storage: str
    trials: int
    fast_read_s: float
    optuna_read_s: float
    status_s: float
    status_line: str

    def cells(self) -> list[str]:
        return [
            self.storage,
            f"{self.trials:,}",
            f"{self.fast_read_s:.2f}",
            f"{self.optuna_read_s:.2f}",
            f"{self.status_s:.2f}",
            self.status_line,
        ]


READ_HEAD = [
    "storage",
    "trials",
    "sweeper fast read s",
    "study.get_trials (fast read, Optuna's cache) s",
    "`sweeper status` s",
    "status says",
]


def read_times(kind: str, size: int, folder: Path) -> ReadRow:
    """Write a study of ``size`` finished trials, then time reading it three ways."""
    with storage_url(kind, folder) as url:
        config_path = study_file(folder, url, n_trials=size)
        config = load_config(config_path)
        write_big_study(config, size)
        study = store.load(config, read_only=True)
        began = time.perf_counter()
        fast = store.read_trials(study)
        fast_s = time.perf_counter() - began
        assert len(fast) == size, len(fast)
        study = store.load(config, read_only=True)
        began = time.perf_counter()
        study.get_trials(deepcopy=False)
        optuna_s = time.perf_counter() - began
        store.forget_connections(study)
        began = time.perf_counter()
        shown = subprocess.run(
            [sys.executable, "-m", "sweeper.cli", "status", str(config_path)],
            capture_output=True,
            text=True,
            cwd=ROOT,
            timeout=900,
        )
        status_s = time.perf_counter() - began
        said = (shown.stdout or shown.stderr).strip().splitlines()
        return ReadRow(kind, size, fast_s, optuna_s, status_s, said[0] if said else "")


def table(head: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "| " + " | ".join("---" for _ in head) + " |"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--storages", nargs="+", default=["sqlite", "postgres"])
    parser.add_argument("--processes", nargs="+", type=int, default=[8, 32, 64])
    parser.add_argument("--seconds", type=float, default=20.0, help="per row")
    parser.add_argument("--sizes", nargs="*", type=int, default=[10_000, 100_000])
    parser.add_argument(
        "--paths",
        nargs="+",
        choices=PATHS,
        default=list(PATHS),
        help="sweeper: a trial process per trial, as a worker; sweeper-inline: the same "
        "claims and tells without it; optuna: study.optimize",
    )
    parser.add_argument("--quick", action="store_true", help="8 and 32 processes, 6 s, 10,000")
    parser.add_argument("--reads-only", action="store_true", help="only the read table")
    args = parser.parse_args()
    if args.quick:
        args.processes, args.seconds, args.sizes = [8, 32], 6.0, [10_000]
    if args.reads_only:
        args.processes = []
    began = time.monotonic()
    rows: list[Row] = []
    reads: list[ReadRow] = []
    with tempfile.TemporaryDirectory(prefix="sweeper-scale-") as tmp:
        folder = Path(tmp)
        for kind in args.storages:
            for processes in args.processes:
                needed = CONNECTIONS_PER_PROCESS * processes + 4
                if kind == "postgres" and needed > room_on_server():
                    print(
                        f"postgres with {processes} processes skipped: it needs about {needed} "
                        f"sessions, the server has room for {room_on_server()} "
                        "(raise max_connections)",
                        flush=True,
                    )
                    continue
                for path_kind in args.paths:
                    row = throughput(kind, path_kind, processes, args.seconds, folder)
                    rows.append(row)
                    print(" | ".join(row.cells()), row.first_error, file=sys.stderr, flush=True)
            for size in args.sizes:
                read = read_times(kind, size, folder)
                reads.append(read)
                print(" | ".join(read.cells()), file=sys.stderr, flush=True)
    if rows:
        print(table(HEAD, [row.cells() for row in rows]))
        print()
    print(table(READ_HEAD, [read.cells() for read in reads]))
    errors = [f"{r.storage} {r.path} {r.processes}: {r.first_error}" for r in rows if r.errors]
    if errors:
        print("\nfirst error of each row with errors:\n" + "\n".join(errors))
    took = f"{(time.monotonic() - began) / 60:.1f} min"
    print(f"\n{len(rows)} rows, {args.seconds:g} s each, {took}" if rows else f"\n{took}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
