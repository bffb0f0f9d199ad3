"""Chaos: kill -9 at random moments of real sweeps, inject faults, and count every trial.

    python bench/chaos.py [--kills 60] [--storages sqlite postgres] [--seed 0] [--no-faults]

Rounds of ``kill -9`` of a random process of a running ``sweeper start`` (the
supervisor, the warm parent that forks workers, a worker or a trial),
restarting ``sweeper start`` whenever it is gone, on SQLite and on the
PostgreSQL server on loopback (``SWEEPER_TEST_POSTGRES``, default postgresql://postgres@127.0.0.1:5432).
Then one sweep for each injected fault: a trial that hangs (``trial_timeout``),
one that crashes the interpreter (``os.abort()``), one that runs out of memory
under a memory limit, every database connection terminated mid-sweep
(PostgreSQL), the SQLite file's folder turned read-only mid-sweep (in a mount
namespace of the sweep's own; needs root and util-linux). Each study is then
run to its end and checked: trials finished (exactly ``n_trials``), lost,
duplicated, stuck RUNNING, ``PRAGMA integrity_check``, and the longest time
from a fault to the next trial running. Prints one table.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import os
import random
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
import tomlkit
from optuna.trial import TrialState

ROOT = Path(__file__).resolve().parent.parent
TASK = ROOT / "tests" / "fixtures" / "tiny_task.py"
SERVER = os.environ.get("SWEEPER_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432")
N_TRIALS = 30
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)

optuna.logging.set_verbosity(optuna.logging.ERROR)


@dataclass
class Row:
    """One line of the table: a storage and what was done to it."""

    storage: str
    fault: str
    faults: int = 0
    restarts: int = 0
    studies: int = 0
    exact: int = 0
    lost: int = 0
    duplicated: int = 0
    stuck: int = 0
    integrity: str = "-"
    worst_gap_s: float = 0.0
    exit_codes: set[int] = field(default_factory=set)
    message: str = ""


def study_file(folder: Path, name: str, storage: str | None, **extra: Any) -> Path:
    search: dict[str, Any] = {"lr": {"low": 0.01, "high": 0.1, "log": True}, "sleep": 0.04}
    search.update(extra.pop("search", {}))
    data: dict[str, Any] = {
        "study": {
            "name": name,
            "direction": "maximize",
            "metric": "val_acc",
            "n_trials": N_TRIALS,
            "seed": 1,
            "max_failures": 1000,
            **({"storage": storage} if storage else {}),
        },
        "task": {"name": "tiny_task:build"},
        "trainer": {"max_epochs": 2},
        "search": search,
        "sampler": {"name": "random"},
        "resources": {"devices": "cpu", "cpu_workers": 2, **extra.pop("resources", {})},
    }
    path = folder / f"{name}.toml"
    path.write_text(tomlkit.dumps(data))
    return path


def sweeper(path: Path, prefix: list[str] | None = None) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [*(prefix or []), sys.executable, "-m", "sweeper.cli", "start", str(path)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def descendants(pid: int) -> dict[int, int]:
    """Every process below ``pid`` with its depth (1: warm parent, 2: worker, 3: trial)."""
    parents: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, IndexError):
                stat = (entry / "stat").read_text()
                parents.setdefault(int(stat.rsplit(")", 1)[1].split()[1]), []).append(
                    int(entry.name)
                )
    found: dict[int, int] = {}
    todo = [(pid, 0)]
    while todo:
        parent, depth = todo.pop()
        for child in parents.get(parent, []):
            found[child] = depth + 1
            todo.append((child, depth + 1))
    return found


def trials_of(url: str, name: str) -> list[optuna.trial.FrozenTrial]:
    try:
        return optuna.load_study(study_name=name, storage=url).get_trials(deepcopy=False)
    except KeyError:
        return []


def last_start(url: str, name: str) -> dt.datetime | None:
    starts = [t.datetime_start for t in trials_of(url, name) if t.datetime_start is not None]
    return max(starts) if starts else None


def finish(row: Row, path: Path, url: str, name: str, db: Path | None) -> Row:
    """Run the study to its end without faults, then count every trial."""
    for _ in range(3):
        done = sweeper(path)
        _, err = done.communicate(timeout=900)
        row.exit_codes.add(done.returncode)
        if done.returncode == 0:
            break
        row.restarts += 1
        if err.strip() and not row.message:
            row.message = err.strip().splitlines()[-1][:160]
    trials = trials_of(url, name)
    finished = [t for t in trials if t.state in FINISHED]
    row.studies += 1
    row.exact += len(finished) == N_TRIALS
    row.stuck += sum(t.state == TrialState.RUNNING for t in trials)
    row.lost += max(0, N_TRIALS - len(finished))
    done_numbers = {t.number for t in finished}
    retried_done = [
        t
        for t in finished
        if t.system_attrs.get("failed_trial") in done_numbers
        and t.system_attrs.get("failed_trial") != t.number
    ]
    row.duplicated += max(0, len(finished) - N_TRIALS) + len(retried_done)
    if db is not None:
        with sqlite3.connect(db) as connection:
            integrity = connection.execute("PRAGMA integrity_check").fetchone()[0]
        row.integrity = integrity if row.integrity in ("-", "ok") else row.integrity
    row.worst_gap_s = max(row.worst_gap_s, worst_gap_after_failures(trials))
    return row


def worst_gap_after_failures(trials: list[optuna.trial.FrozenTrial]) -> float:
    """The longest wait from a failed trial's end to the next trial starting."""
    starts = sorted(t.datetime_start for t in trials if t.datetime_start is not None)
    worst = 0.0
    for failed in trials:
        if failed.state != TrialState.FAIL or failed.datetime_complete is None:
            continue
        after = [s for s in starts if s >= failed.datetime_complete]
        if after:
            worst = max(worst, (after[0] - failed.datetime_complete).total_seconds())
    return worst


def wait_gap(url: str, name: str, fault_at: dt.datetime, poll: Any = None) -> float:
    """Seconds from a fault until a trial started after it (the sweep running again).

    ``poll`` is called while waiting (it restarts a sweep that is gone); it
    returns False once the study has nothing left to run.
    """
    began = time.monotonic()
    while time.monotonic() - began < 300:
        latest = last_start(url, name)
        if latest is not None and latest > fault_at:
            return (latest - fault_at).total_seconds()
        if poll is not None and not poll():
            return 0.0
        time.sleep(0.2)
    return float("inf")


class Rounds:
    """Studies run one after another on one storage while the kills go on."""

    def __init__(self, storage: str, url: str, folder: Path, row: Row) -> None:
        self.storage, self.server, self.folder, self.row = storage, url, folder, row
        self.count = 0
        self.sweep: subprocess.Popen[str] | None = None
        self.next_study()

    def next_study(self) -> None:
        self.name = f"chaos-{self.storage}-{self.count}"
        self.count += 1
        server = self.storage != "sqlite"
        self.db = None if server else self.folder / f"{self.name}.db"
        self.url = self.server if server else f"sqlite:///{self.db}"
        self.path = study_file(self.folder, self.name, self.server if server else None)
        self.sweep = sweeper(self.path)

    def done(self) -> bool:
        return len([t for t in trials_of(self.url, self.name) if t.state in FINISHED]) >= N_TRIALS

    def poll(self) -> bool:
        """Restart the sweep when it is gone; False when its study is done."""
        assert self.sweep is not None
        if self.sweep.poll() is None:
            return True
        self.row.exit_codes.add(self.sweep.returncode)
        if self.done():
            return False
        self.row.restarts += 1
        self.sweep = sweeper(self.path)
        return True


def kill_rounds(storage: str, url: str, folder: Path, kills: int, rng: random.Random) -> Row:
    """kill -9 of a random process of the sweep, again and again, restarting it when gone."""
    row = Row(storage, "kill -9 (supervisor, warm parent, worker or trial)")
    rounds = Rounds(storage, url, folder, row)
    while row.faults < kills:
        if not rounds.poll():
            finish(row, rounds.path, rounds.url, rounds.name, rounds.db)
            rounds.next_study()
        time.sleep(rng.uniform(1.0, 6.0))
        assert rounds.sweep is not None
        family = descendants(rounds.sweep.pid)
        role = rng.choice(["supervisor", "warm parent", "worker", "trial"])
        pool = {
            "supervisor": [rounds.sweep.pid],
            "warm parent": [p for p, d in family.items() if d == 1],
            "worker": [p for p, d in family.items() if d == 2],
            "trial": [p for p, d in family.items() if d == 3],
        }[role] or [rounds.sweep.pid]
        fault_at = dt.datetime.now()
        try:
            os.kill(rng.choice(pool), signal.SIGKILL)
        except ProcessLookupError:  # it ended on its own a moment ago: not a kill
            continue
        row.faults += 1
        row.worst_gap_s = max(
            row.worst_gap_s, wait_gap(rounds.url, rounds.name, fault_at, rounds.poll)
        )
    assert rounds.sweep is not None
    with contextlib.suppress(ProcessLookupError):
        os.killpg(rounds.sweep.pid, signal.SIGKILL)
    rounds.sweep.wait()
    row.restarts += 1
    finish(row, rounds.path, rounds.url, rounds.name, rounds.db)
    return row


def fault_sweep(
    storage: str,
    url: str,
    folder: Path,
    label: str,
    inject: Any = None,
    prefix: list[str] | None = None,
    **study: Any,
) -> Row:
    """One sweep with a fault built into its trials or injected mid-sweep."""
    name = f"fault-{storage}-{uuid.uuid4().hex[:6]}"
    db = folder / name / f"{name}.db" if storage == "sqlite" else None
    sub = folder / name
    sub.mkdir()
    shutil.copy(TASK, sub / "tiny_task.py")
    path = study_file(sub, name, url if storage != "sqlite" else None, **study)
    url = url if storage != "sqlite" else f"sqlite:///{db}"
    row = Row(storage, label, faults=1)
    sweep = sweeper(path, prefix)
    if inject is not None:
        while len([t for t in trials_of(url, name) if t.state in FINISHED]) < 3:
            if sweep.poll() is not None:
                _, early = sweep.communicate()
                raise RuntimeError(f"the sweep ended before the fault: {early.strip()[-120:]}")
            time.sleep(0.2)
        fault_at = dt.datetime.now()
        inject(sweep, sub)
        _, err = sweep.communicate(timeout=900)
        if inject is read_only_storage:
            writable_again(sub)
        row.exit_codes.add(sweep.returncode)
        if sweep.returncode != 0:
            row.message = err.strip().splitlines()[-1][:160] if err.strip() else ""
            row.restarts += 1
        finish(row, path, url, name, db)
        starts = [
            t.datetime_start
            for t in trials_of(url, name)
            if t.datetime_start is not None and t.datetime_start > fault_at
        ]
        row.worst_gap_s = (min(starts) - fault_at).total_seconds() if starts else 0.0
        return row
    else:
        _, err = sweep.communicate(timeout=900)
        row.exit_codes.add(sweep.returncode)
        reasons = {
            str(t.user_attrs.get("stop_reason"))
            for t in trials_of(url, name)
            if t.state == TrialState.FAIL
        }
        row.message = "; ".join(sorted(r[:70] for r in reasons))[:160]
        if sweep.returncode != 0 and err.strip():  # the sweep's own words first
            row.message = f"{err.strip().splitlines()[-1][:100]} / {row.message}"[:160]
    return finish(row, path, url, name, db)


def terminate_connections(url: str) -> Any:
    def inject(sweep: subprocess.Popen[str], folder: Path) -> None:
        import psycopg

        database = url.rsplit("/", 1)[1]
        with psycopg.connect(f"{SERVER}/postgres", autocommit=True) as admin:
            admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE datname = %s AND pid <> pg_backend_pid()",
                (database,),
            )

    return inject


def read_only_storage(sweep: subprocess.Popen[str], folder: Path) -> None:
    """Turn the study's folder and its database files read-only under the running sweep."""
    for path in folder.iterdir():
        if path.suffix in {".db", ".db-wal", ".db-shm", ".lock"} or ".db" in path.name:
            path.chmod(0o444)
    folder.chmod(0o555)


def writable_again(folder: Path) -> None:
    folder.chmod(0o755)
    for path in folder.iterdir():
        path.chmod(0o644)


def postgres_database() -> str | None:
    try:
        import psycopg

        name = f"sweeper_chaos_{uuid.uuid4().hex[:8]}"
        with psycopg.connect(f"{SERVER}/postgres", autocommit=True, connect_timeout=5) as admin:
            admin.execute(f"CREATE DATABASE {name}")
        return f"{SERVER}/{name}"
    except Exception as exc:  # no server: say so in the table, run SQLite only
        print(f"no PostgreSQL at {SERVER}: {exc}", file=sys.stderr)
        return None


def drop(url: str) -> None:
    import psycopg

    with psycopg.connect(f"{SERVER}/postgres", autocommit=True) as admin:
        admin.execute(f"DROP DATABASE IF EXISTS {url.rsplit('/', 1)[1]} WITH (FORCE)")


def faults_of(storage: str, url: str, folder: Path) -> list[tuple[str, dict[str, Any]]]:
    """The injected faults for one storage: a label and how to inject it."""
    faults: list[tuple[str, dict[str, Any]]] = [
        (
            "a trial hangs (trial_timeout = 6)",
            {"search": {"hang_above": 0.07}, "resources": {"trial_timeout": 6}},
        ),
        ("a trial calls os.abort()", {"search": {"abort_above": 0.07}}),
        ("a trial runs out of memory (RLIMIT_AS)", {"search": {"oom_above": 0.07}}),
    ]
    if storage == "postgres":
        faults.append(("every connection terminated", {"inject": terminate_connections(url)}))
    elif shutil.which("setpriv"):
        # Root writes read-only files: this sweep runs without that capability.
        unprivileged = ["setpriv", "--bounding-set=-dac_override,-dac_read_search"]
        faults.append(
            (
                "the study's folder and database turned read-only",
                {"inject": read_only_storage, "prefix": unprivileged},
            )
        )
    return faults


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=60, help="kill -9 in all, over storages")
    parser.add_argument("--storages", nargs="+", default=["sqlite", "postgres"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-faults", action="store_true")
    args = parser.parse_args()
    rng = random.Random(args.seed)
    rows: list[Row] = []
    began = time.monotonic()

    def add(row: Row) -> None:
        rows.append(row)
        print_table([row], time.monotonic() - began, file=sys.stderr)

    with tempfile.TemporaryDirectory(prefix="sweeper-chaos-") as tmp:
        folder = Path(tmp)
        shutil.copy(TASK, folder / "tiny_task.py")
        for storage in args.storages:
            url = postgres_database() if storage == "postgres" else "sqlite"
            if url is None:
                continue
            try:
                add(kill_rounds(storage, url, folder, args.kills // len(args.storages), rng))
                for label, how in [] if args.no_faults else faults_of(storage, url, folder):
                    try:
                        add(fault_sweep(storage, url, folder, label, **how))
                    except Exception as exc:  # the table says what broke the bench itself
                        add(Row(storage, label, message=f"bench error: {exc!r}"[:160]))
            finally:
                if storage == "postgres":
                    drop(url)
    print_table(rows, time.monotonic() - began)


def print_table(rows: list[Row], seconds: float, file: Any = None) -> None:
    head = (
        f"| storage | fault | faults | restarts | studies with exactly {N_TRIALS} finished | "
        "lost | duplicated | stuck | "
        "integrity | worst fault-to-trial s | exit codes | message |"
    )
    print(head, file=file)
    print("|" + " --- |" * head.count(" | ") + " --- |", file=file)
    for r in rows:
        print(
            f"| {r.storage} | {r.fault} | {r.faults} | {r.restarts} | {r.exact} of {r.studies} | "
            f"{r.lost} | {r.duplicated} | {r.stuck} | {r.integrity} | {r.worst_gap_s:.1f} | "
            f"{','.join(map(str, sorted(r.exit_codes)))} | {r.message.replace('|', '/')} |",
            file=file,
        )
    kills = sum(r.faults for r in rows if r.fault.startswith("kill"))
    print(f"\n{kills} kills, {len(rows)} rows, {seconds / 60:.1f} min", file=file)


if __name__ == "__main__":
    main()
