"""Several machines on one study through real PostgreSQL and MariaDB servers (loopback)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import time
import tomllib
import uuid
from collections.abc import Iterator
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from tests.conftest import (
    BASE,
    FIXTURES,
    SERVER,
    run_sweeper,
    study,
    sweeper_cmd,
    toml_text,
)
from tests.test_sweep import descendants, wait_for
from tests.test_views import dashboard

MARIADB = os.environ.get("SWEEPER_TEST_MYSQL", "mysql+pymysql://root@127.0.0.1:3306")


@pytest.fixture
def mariadb() -> Iterator[str]:
    """A new, empty MariaDB/MySQL database, dropped afterwards."""
    import pymysql

    name = f"sweeper_{uuid.uuid4().hex[:12]}"
    try:
        admin = pymysql.connect(host="127.0.0.1", port=3306, user="root", connect_timeout=5)
    except pymysql.err.OperationalError as exc:
        pytest.skip(f"no MariaDB server at {MARIADB} ({exc}); set SWEEPER_TEST_MYSQL")
    with admin.cursor() as cursor:
        cursor.execute(f"CREATE DATABASE {name}")
    try:
        yield f"{MARIADB}/{name}"
    finally:
        with admin.cursor() as cursor:
            cursor.execute(f"DROP DATABASE IF EXISTS {name}")
        admin.close()


def machine(
    root: Path, name: str, url: str, n_trials: int, sleep: float = 0.02, workers: int = 2
) -> Path:
    """A folder standing for one machine: its own copy of the study file and task."""
    folder = root / name
    folder.mkdir()
    shutil.copy(FIXTURES / "tiny_task.py", folder / "tiny_task.py")
    data = study(
        study={"n_trials": n_trials, "storage": url},
        search={**BASE["search"], "sleep": sleep},
        resources={"devices": "cpu", "cpu_workers": workers},
    )
    path = folder / "study.toml"
    path.write_text(toml_text(data))
    return path


def start(path: Path) -> list[str]:
    return sweeper_cmd("start", str(path))


def join(name: str, path: Path, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    """`sweeper start` on a machine of its own: its own host name (a UTS namespace) and its
    own process group, as a pod has."""
    return subprocess.Popen(
        ["unshare", "--uts", "sh", "-c", 'hostname "$0" && exec "$@"', name, *start(path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        start_new_session=True,
    )


def signal_groups(groups: set[int], sig: int) -> None:
    for group in groups:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(group, sig)


def freeze(sweep: subprocess.Popen[str]) -> set[int]:
    """Every process of a machine's sweep stopped at once; their process groups."""
    groups = {os.getpgid(pid) for pid in [sweep.pid, *descendants(sweep.pid)]}
    signal_groups(groups, signal.SIGSTOP)
    return groups


def test_two_machines_share_one_study_and_run_exactly_n_trials(
    tmp_path: Path, database: str
) -> None:
    first = machine(tmp_path, "machine-a", database, 12)
    second = machine(tmp_path, "machine-b", database, 12)
    created = run_sweeper("start", str(first), "--n-trials", "2")
    assert created.returncode == 0, created.stdout + created.stderr

    # Each machine gets a host name of its own (a UTS namespace), as trials record it.
    sweeps = [join(name, path) for name, path in (("machine-a", first), ("machine-b", second))]
    outputs = [sweep.communicate(timeout=600)[0] for sweep in sweeps]
    assert [sweep.returncode for sweep in sweeps] == [0, 0], outputs

    trials = optuna.load_study(study_name="tiny", storage=database).trials
    assert len(trials) == 12, "the advisory lock keeps both machines to n_trials"
    assert sorted(t.number for t in trials) == list(range(12))
    assert all(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in trials)
    hosts = {t.user_attrs["host"] for t in trials[2:]}
    assert hosts == {"machine-a", "machine-b"}, "both machines ran trials"
    for name in ("machine-a", "machine-b"):
        best = tmp_path / name / "tiny" / "best.toml"
        assert best.exists(), f"{name} wrote the study's best configuration"

    status = run_sweeper("status", str(second))
    assert status.returncode == 0
    assert "12/12 finished" in status.stdout
    shown = json.loads(run_sweeper("best", str(first), "--json").stdout)
    assert shown["best"]["trial"] in range(12)

    with dashboard(second) as served:
        study = served.get("/api/studies/1")
    assert study["name"] == "tiny" and len(study["trials"]) == 12


def test_two_machines_confirm_the_best_once_each(tmp_path: Path, database: str) -> None:
    """[confirm] on two machines: both see the search end, each confirmation runs once."""
    paths = []
    for name in ("machine-a", "machine-b"):
        path = machine(tmp_path, name, database, 8, sleep=0.05)
        data = tomllib.loads(path.read_text())
        data["confirm"] = {"top_k": 2, "seeds": 2}
        data["sampler"] = {"name": "random"}
        path.write_text(toml_text(data))
        paths.append(path)
    sweeps = [
        join(name, path) for name, path in zip(("machine-a", "machine-b"), paths, strict=True)
    ]
    outputs = [sweep.communicate(timeout=600) for sweep in sweeps]
    assert [sweep.returncode for sweep in sweeps] == [0, 0], outputs

    trials = optuna.load_study(study_name="tiny", storage=database).trials
    search = [t for t in trials if "confirms" not in t.user_attrs]
    confirmations = [t for t in trials if "confirms" in t.user_attrs]
    assert len(search) == 8 and all(
        t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in search
    )
    marks = sorted((t.user_attrs["confirms"], t.user_attrs["confirm_seed"]) for t in confirmations)
    complete = sorted(
        (t for t in search if t.state == TrialState.COMPLETE), key=lambda t: (-t.value, t.number)
    )
    top = [t.number for t in complete][:2]
    assert marks == sorted((n, s) for n in top for s in (1, 2)), "each run once, on one machine"
    assert all(t.state == TrialState.COMPLETE for t in confirmations)
    for path in paths:
        shown = json.loads(run_sweeper("best", str(path), "--json").stdout)
        assert shown["best"]["trial"] == shown["confirmed"][0]["trial"]
        assert sorted(e["trial"] for e in shown["confirmed"]) == sorted(top)
        assert (
            "8/8 finished and 4 confirmation trial(s)" in run_sweeper("status", str(path)).stdout
        )


def test_a_machine_lost_mid_sweep_is_replaced_and_the_study_ends_exact(
    tmp_path: Path, database: str
) -> None:
    """Three machines of one slot each (pods of one GPU) share a study; one is killed whole
    (kill -9 of every process) while its trial runs, and a new one joins, as Kubernetes
    replaces a lost pod. Trials outlast the heartbeat grace period of 6 s: a live machine's
    trial must not be taken for a lost one."""
    n_trials = 10
    env = {**os.environ, "SWEEPER_HEARTBEAT_GRACE": "6", "PYTHONUNBUFFERED": "1"}
    names = ("machine-a", "machine-b", "machine-c", "machine-d")
    paths = {name: machine(tmp_path, name, database, n_trials, 0.6, workers=1) for name in names}
    sweeps = {name: join(name, paths[name], env) for name in names[:3]}

    def trials() -> list[optuna.trial.FrozenTrial]:
        return optuna.load_study(study_name="tiny", storage=database).trials

    def running_on_b() -> list[optuna.trial.FrozenTrial]:
        try:
            now = trials()
        except KeyError:  # not created yet
            return []
        busy = [t for t in now if t.state == TrialState.RUNNING and "device" in t.user_attrs]
        done = [t for t in now if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
        on_b = [t for t in busy if t.user_attrs.get("host") == "machine-b"]
        return on_b if len(done) >= 2 else []

    try:
        for _ in range(5):  # the machine goes at once, while one of its trials runs
            wait_for(running_on_b, timeout=120, what="machine-b running a trial")
            frozen = freeze(sweeps["machine-b"])
            # a trial another machine is claiming right now has no owner record yet: it
            # is written in the claim, under the claim lock, which this read does not take
            lost = [t for t in trials() if t.state == TrialState.RUNNING]
            lost = [t for t in lost if t.user_attrs.get("host") == "machine-b"]
            if lost:
                break
            signal_groups(frozen, signal.SIGCONT)  # its trial ended meanwhile: again
        assert lost, "machine-b was running trials when it was lost"
        signal_groups(frozen, signal.SIGKILL)
        sweeps.pop("machine-b").communicate(timeout=30)
        sweeps["machine-d"] = join("machine-d", paths["machine-d"], env)
        outputs = {name: sweep.communicate(timeout=180) for name, sweep in sweeps.items()}
    finally:
        for sweep in sweeps.values():
            if sweep.poll() is None:
                os.killpg(sweep.pid, signal.SIGKILL)
    codes = {name: sweep.returncode for name, sweep in sweeps.items()}
    assert codes == dict.fromkeys(("machine-a", "machine-c", "machine-d"), 0), outputs

    final = trials()
    finished = [t for t in final if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    assert len(finished) == n_trials, [(t.number, t.state.name) for t in final]
    assert not [t for t in final if t.state in (TrialState.RUNNING, TrialState.WAITING)]
    by_number = {t.number: t for t in final}
    for gone in lost:
        failed = by_number[gone.number]
        assert failed.state == TrialState.FAIL, "the lost trial failed"
        reason = failed.user_attrs.get("stop_reason", "")
        assert reason.startswith("interrupted: its machine went silent"), failed.user_attrs
        retries = [t for t in finished if t.system_attrs.get("failed_trial") == gone.number]
        assert len(retries) == 1, f"trial {gone.number} was retried once"
        assert retries[0].params == gone.params, "with the same params"
        assert retries[0].user_attrs["host"] != "machine-b", "by a machine still there"
    assert {t.user_attrs["host"] for t in finished} >= {"machine-a", "machine-c", "machine-d"}

    lines = set()
    for name in names:
        shown = run_sweeper("status", str(paths[name]))
        assert shown.returncode == 0, shown.stdout + shown.stderr
        lines.add(shown.stdout.splitlines()[0])
    assert len(lines) == 1, lines
    assert f"{n_trials}/{n_trials} finished" in lines.pop()


def claim_until_full(path: str) -> None:
    """One worker of another machine: claim trials as fast as it can until none is left."""
    import tomllib

    from sweeper.config import parse_config
    from sweeper.store import Owner, claim, claim_lock, load

    config = parse_config(tomllib.loads(Path(path).read_text()), Path(path))
    study = load(config)
    while True:
        with claim_lock(config, keep_session=True):
            trial = claim(study, config, Owner.me(), {})
        if trial is None:
            return
        study.tell(trial, 0.5)


def test_claims_from_many_processes_never_overshoot(tmp_path: Path, database: str) -> None:
    race_for_places(tmp_path, database)


def test_claims_on_mariadb_never_overshoot(tmp_path: Path, mariadb: str) -> None:
    race_for_places(tmp_path, mariadb)


def test_a_claimer_keeps_its_server_sessions_between_claims(tmp_path: Path, database: str) -> None:
    """A session costs the server a process: a worker's twenty claims and tells open a few,
    not one (for the claim lock) per claim; a process that claims once closes the lock's."""
    import psycopg
    import sqlalchemy as sa

    from sweeper.config import load_config
    from sweeper.store import claim_lock

    path = machine(tmp_path, "machine-a", database, 20)
    created = run_sweeper("start", str(path), "--n-trials", "1")
    assert created.returncode == 0, created.stdout + created.stderr
    opened: list[object] = []

    def count(*_: object) -> None:
        opened.append(None)

    sa.event.listen(sa.pool.Pool, "connect", count)
    try:
        claim_until_full(str(path))
    finally:
        sa.event.remove(sa.pool.Pool, "connect", count)
    trials = optuna.load_study(study_name="tiny", storage=database).trials
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 20
    assert len(opened) <= 4, f"{len(opened)} sessions opened for 20 claims"

    name = database.rsplit("/", 1)[1]
    with psycopg.connect(f"{SERVER}/postgres", autocommit=True) as admin:

        def sessions() -> int:
            query = "SELECT count(*) FROM pg_stat_activity WHERE datname = %s"
            row = admin.execute(query, (name,)).fetchone()
            return int(row[0]) if row else 0

        config = load_config(path)
        before = sessions()
        with claim_lock(config):
            assert sessions() == before + 1, "the lock is held by a session of its own"
        # the server's process for a closed session ends a moment after the client closes it
        wait_for(lambda: sessions() == before, 10, "a lock taken once letting its session go")
        with claim_lock(config, keep_session=True):
            assert sessions() == before, "the worker's claims above left their session for it"
        assert sessions() == before


def race_for_places(tmp_path: Path, database: str) -> None:
    """Eight processes claim as fast as they can the places of a 60-trial study."""
    import multiprocessing

    path = machine(tmp_path, "machine-a", database, 60)
    created = run_sweeper("start", str(path), "--n-trials", "1")
    assert created.returncode == 0, created.stdout + created.stderr
    context = multiprocessing.get_context("spawn")
    workers = [context.Process(target=claim_until_full, args=(str(path),)) for _ in range(8)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=300)
    assert [worker.exitcode for worker in workers] == [0] * 8
    trials = optuna.load_study(study_name="tiny", storage=database).trials
    assert len(trials) == 60, "counting and asking are one step for every process"
    assert sorted(t.number for t in trials) == list(range(60))


def test_every_connection_terminated_mid_sweep_loses_nothing(
    tmp_path: Path, database: str
) -> None:
    """The database drops every session of the sweep: it goes on, or stops in one line and
    the next start finishes the study."""
    import psycopg

    path = machine(tmp_path, "machine-a", database, 16)
    sweep = subprocess.Popen(
        start(path), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )

    def finished() -> int:
        try:
            trials = optuna.load_study(study_name="tiny", storage=database).trials
        except KeyError:
            return 0
        return sum(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in trials)

    deadline = time.monotonic() + 300
    while finished() < 3 and time.monotonic() < deadline:
        time.sleep(0.2)
    with psycopg.connect(f"{SERVER}/postgres", autocommit=True) as admin:
        cut = admin.execute(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
            "WHERE datname = %s AND pid <> pg_backend_pid()",
            (database.rsplit("/", 1)[1],),
        ).fetchone()
    assert cut and cut[0] > 0, "the sweep held connections"
    out, err = sweep.communicate(timeout=600)
    if sweep.returncode != 0:
        assert sweep.returncode == 1, out + err
        assert err.count("\n") == 1 and "the study storage failed:" in err, err
        again = run_sweeper("start", str(path))
        assert again.returncode == 0, again.stdout + again.stderr
    trials = optuna.load_study(study_name="tiny", storage=database).trials
    assert finished() == 16
    assert not [t for t in trials if t.state == TrialState.RUNNING]
