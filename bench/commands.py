"""The read commands as a user runs them: `sweeper --help`, `status`, `best`, `history`, `trials`.

    python bench/commands.py [--storages sqlite postgres] [--trials 100] [--runs 9]

Each command is a new process, start-up and imports included, on a study of
``--trials`` finished trials written in bulk (with what a real trial stores:
params, value, owner record, history). Prints the median, the fastest and the
slowest of ``--runs`` runs of each. PostgreSQL is the server on loopback
(``SWEEPER_TEST_POSTGRES``); its database is dropped afterwards.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from scale import storage_url, study_file, table, write_big_study

from sweeper.config import load_config

COMMANDS = ("--help", "status", "best", "history", "trials")


def command_line(name: str, path: Path) -> list[str]:
    """The command as a user types it: the installed ``sweeper`` script where there is one."""
    script = shutil.which("sweeper", path=str(Path(sys.executable).parent))
    head = [script] if script else [sys.executable, "-m", "sweeper.cli"]
    return head + ([name] if name.startswith("-") else [name, str(path)])


def timed(line: list[str]) -> float:
    began = time.perf_counter()
    done = subprocess.run(line, capture_output=True, text=True, timeout=300)
    took = time.perf_counter() - began
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(line)} exited {done.returncode}: {done.stderr.strip()}")
    return took


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--storages", nargs="+", default=["sqlite", "postgres"])
    parser.add_argument("--trials", type=int, default=100)
    parser.add_argument("--runs", type=int, default=9)
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="sweeper-commands-") as tmp:
        folder = Path(tmp)
        for kind in args.storages:
            with storage_url(kind, folder) as url:
                path = study_file(folder, url, n_trials=args.trials)
                write_big_study(load_config(path), args.trials)
                for name in COMMANDS:
                    line = command_line(name, path)
                    timed(line)  # the first run fills the file system cache
                    times = [timed(line) for _ in range(args.runs)]
                    rows.append(
                        [
                            kind,
                            f"sweeper {name}",
                            f"{statistics.median(times):.2f}",
                            f"{min(times):.2f}",
                            f"{max(times):.2f}",
                        ]
                    )
                    print(" | ".join(rows[-1]), file=sys.stderr, flush=True)
    head = ["storage", "command", "median s", "fastest s", "slowest s"]
    print(table(head, rows))
    print(f"\n{args.trials} finished trials, {args.runs} runs of each command")
    return 0


if __name__ == "__main__":
    sys.exit(main())
