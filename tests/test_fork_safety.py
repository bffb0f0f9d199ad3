"""The process that forks the workers has run nothing that breaks a forked child's torch."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import StudyDir, study

ROOT = Path(__file__).resolve().parent.parent

FORK_AFTER_CHECK = """
import os, signal, sys
from pathlib import Path
from sweeper.config import load_config
from sweeper.sweep import check
check(load_config(Path(sys.argv[1])), lambda line: None)
pid = os.fork()
if pid == 0:  # as a trial does: its own thread count, then parallel work
    signal.alarm(60)
    import torch
    torch.set_num_threads(2)
    a = torch.randn(400, 400)
    for _ in range(20):
        a = (a @ a).clamp(-1, 1)
    os._exit(0)
_, status = os.waitpid(pid, 0)
print(status)
"""


@pytest.mark.parametrize("sampler", ["gp", "tpe"])
def test_a_child_forked_after_the_checks_runs_torch_on_several_threads(
    study_dir: StudyDir, sampler: str
) -> None:
    """The gp sampler fits its model with torch while its options are checked: done in the
    process that forks the workers, every trial hung in OpenMP."""
    path = study_dir.write(study(sampler={"name": sampler}))
    done = subprocess.run(
        [sys.executable, "-c", FORK_AFTER_CHECK, str(path)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "0", "the forked child hung (killed by its alarm)"


LIMITED = """
import os
import numpy
from threadpoolctl import threadpool_info
from sweeper.run.trial import limit_threads
pid = os.fork()
if pid == 0:
    limit_threads(1)
    print(sorted({pool["num_threads"] for pool in threadpool_info()}), flush=True)
    os._exit(0)
os.waitpid(pid, 0)
"""


def test_a_trial_caps_numpys_blas_and_openmp_at_its_slots_share() -> None:
    """numpy's BLAS sized its pool when the supervisor imported it; the slot's environment
    (OMP_NUM_THREADS and the like) comes too late for a forked trial."""
    done = subprocess.run(
        [sys.executable, "-c", LIMITED],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
        env={**os.environ, "OMP_NUM_THREADS": "2", "OPENBLAS_NUM_THREADS": "2"},
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[1]"
