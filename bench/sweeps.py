"""Running a real ``sweeper start`` for a benchmark: offline, in a new process."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path


def start(study_file: Path, label: str) -> float:
    """``sweeper start STUDY_FILE`` offline; its wall seconds. A failed run ends the
    benchmark with its last lines, naming ``label``."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    began = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "sweeper.cli", "start", str(study_file)],
        capture_output=True,
        text=True,
        env=env,
    )
    wall = time.perf_counter() - began
    if done.returncode != 0:
        tail = "\n".join((done.stdout + done.stderr).splitlines()[-20:])
        raise SystemExit(f"sweeper start exited {done.returncode} ({label}):\n{tail}")
    return wall
