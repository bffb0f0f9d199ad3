"""``sweeper schedule``: run ``sweeper nightly`` from the user's crontab or a systemd timer.

A crontab entry is two lines, a marker comment naming the study file and the
entry itself; install, show and remove find it by the marker and leave every
other line as it was, byte for byte.
"""

from __future__ import annotations

import datetime as dt
import os
import shlex
import shutil
import subprocess
import sys
import zoneinfo
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from sweeper.atomic import write_text
from sweeper.config import StudyConfig
from sweeper.errors import ConfigError, SweeperError

MARKER = "# sweeper nightly: "
NICKNAMES = {
    "@yearly": "0 0 1 1 *",
    "@annually": "0 0 1 1 *",
    "@monthly": "0 0 1 * *",
    "@weekly": "0 0 * * 0",
    "@daily": "0 0 * * *",
    "@midnight": "0 0 * * *",
    "@hourly": "0 * * * *",
}
WEEKDAYS = ("Sun", "Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")


class ScheduleError(SweeperError):
    """The schedule cannot be installed here as asked."""

    exit_code = 2


def cron_expression(config: StudyConfig) -> str:
    """``[schedule] cron``, which installing requires."""
    if config.schedule.cron is None:
        raise ConfigError(f"{config.path}: schedule.cron: required to install a schedule")
    return config.schedule.cron


def nightly_command(config: StudyConfig, python: str = sys.executable) -> list[str]:
    """The command the scheduler runs: this Python, this sweeper, the absolute study file."""
    return [python, "-m", "sweeper.cli", "nightly", str(config.path)]


def log_file(config: StudyConfig) -> Path:
    return config.output_dir / "nightly.log"


def search_path(python: str = sys.executable) -> str:
    """PATH for the scheduled run: the environment's scripts first, then the system's."""
    return os.pathsep.join([str(Path(python).parent), "/usr/local/bin", "/usr/bin", "/bin"])


# crontab


def crontab_block(config: StudyConfig, python: str = sys.executable) -> list[str]:
    """The marker line and the entry line of this study."""
    command = (
        f"cd {shlex.quote(str(config.folder))} && PATH={shlex.quote(search_path(python))} "
        f"{shlex.join(nightly_command(config, python))} "
        f">> {shlex.quote(str(log_file(config)))} 2>&1"
    )
    # In a crontab an unescaped % ends the command.
    entry = f"{cron_expression(config)} {command.replace('%', chr(92) + '%')}"
    return [f"{MARKER}{config.path}", entry]


def install_crontab(text: str, block: list[str], marker: str) -> str:
    """The crontab with this study's block added, or replaced where it was."""
    lines = text.splitlines(keepends=True)
    at = _find(lines, marker)
    new = [line + "\n" for line in block]
    if at is None:
        if lines and not lines[-1].endswith("\n"):
            lines[-1] += "\n"
        return "".join(lines + new)
    return "".join(lines[:at] + new + lines[at + 2 :])


def remove_crontab(text: str, marker: str) -> str:
    """The crontab without this study's block."""
    lines = text.splitlines(keepends=True)
    at = _find(lines, marker)
    if at is None:
        return text
    return "".join(lines[:at] + lines[at + 2 :])


def find_block(text: str, marker: str) -> list[str] | None:
    lines = text.splitlines()
    at = _find(lines, marker)
    return None if at is None else lines[at : at + 2]


def _find(lines: list[str], marker: str) -> int | None:
    for index, line in enumerate(lines):
        if line.rstrip("\n") == marker:
            return index
    return None


@dataclass(frozen=True)
class Crontab:
    """The user's crontab (through the ``crontab`` command) or a file standing in for it."""

    file: Path | None = None

    def read(self) -> str:
        if self.file is not None:
            return self.file.read_text() if self.file.exists() else ""
        result = subprocess.run(
            [self._command(), "-l"], capture_output=True, text=True, check=False
        )
        if result.returncode != 0:
            if "no crontab" in result.stderr.lower():
                return ""
            raise SweeperError(f"crontab -l failed: {result.stderr.strip()}")
        return result.stdout

    def write(self, text: str) -> None:
        if self.file is not None:
            write_text(self.file, text)
            return
        result = subprocess.run(
            [self._command(), "-"], input=text, capture_output=True, text=True, check=False
        )
        if result.returncode != 0:
            raise SweeperError(f"crontab - failed: {result.stderr.strip()}")

    @staticmethod
    def _command() -> str:
        found = shutil.which("crontab")
        if found is None:
            raise ScheduleError(
                "no `crontab` command on this machine: install cron (Debian: apt-get install "
                "cron), or use --systemd"
            )
        return found


def zone_warning(config: StudyConfig) -> str | None:
    """A warning when cron's clock (the machine's zone) differs from ``[schedule] timezone``."""
    now = dt.datetime.now(dt.UTC)
    wanted = now.astimezone(zoneinfo.ZoneInfo(config.schedule.timezone)).utcoffset()
    if now.astimezone().utcoffset() == wanted:
        return None
    return (
        f"cron reads {cron_expression(config)!r} in this machine's time zone, not in "
        f"{config.schedule.timezone} ([schedule] timezone); use --systemd for a timer in "
        f"{config.schedule.timezone}"
    )


def next_runs(config: StudyConfig, count: int = 3) -> list[dt.datetime]:
    """The next times the schedule fires, in ``[schedule] timezone``."""
    from croniter import croniter

    now = dt.datetime.now(zoneinfo.ZoneInfo(config.schedule.timezone))
    runs = croniter(cron_expression(config), now)
    return [runs.get_next(dt.datetime) for _ in range(count)]


# systemd


def unit_name(config: StudyConfig) -> str:
    return f"sweeper-nightly-{config.study.name}"


def unit_dir() -> Path:
    """Where systemd looks for a user's units."""
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "systemd" / "user"


def on_calendar(cron: str, timezone: str) -> str:
    """A cron expression as a systemd ``OnCalendar=`` value in ``timezone``."""
    fields = NICKNAMES.get(cron.strip(), cron).split()
    if len(fields) != 5:
        raise ScheduleError(f"cannot express {cron!r} as a systemd timer: five fields expected")
    minute, hour, day, month, weekday = fields
    if day != "*" and weekday != "*":
        raise ScheduleError(
            f"cannot express {cron!r} as a systemd timer: cron runs it when the day of the "
            "month OR the weekday matches, systemd only when both do"
        )
    date = f"*-{_field(month, cron, 1)}-{_field(day, cron, 1)}"
    time_of_day = f"{_field(hour, cron, 0)}:{_field(minute, cron, 0)}:00"
    days = "" if weekday == "*" else _weekdays(weekday, cron) + " "
    return f"{days}{date} {time_of_day} {timezone}"


def _field(text: str, cron: str, first: int) -> str:
    parts = []
    for part in text.split(","):
        base, _, step = part.partition("/")
        if base == "*":
            base = f"{first:02d}" if step else "*"
        elif "-" in base:
            low, high = base.split("-")
            if step:
                raise ScheduleError(f"cannot express {part!r} of {cron!r} as a systemd timer")
            base = f"{int(low):02d}..{int(high):02d}"
        elif base.isdigit():
            base = f"{int(base):02d}"
        else:
            raise ScheduleError(f"cannot express {part!r} of {cron!r} as a systemd timer")
        parts.append(f"{base}/{step}" if step else base)
    return ",".join(parts)


def _weekdays(text: str, cron: str) -> str:
    names = {name.lower(): index for index, name in enumerate(WEEKDAYS[:7])}

    def day(token: str) -> str:
        index = names.get(token.lower()[:3]) if not token.isdigit() else int(token)
        if index is None or not 0 <= index <= 7:
            raise ScheduleError(f"cannot read weekday {token!r} of {cron!r}")
        return WEEKDAYS[index]

    parts = []
    for part in text.split(","):
        if "/" in part:
            raise ScheduleError(f"cannot express {part!r} of {cron!r} as a systemd timer")
        low, _, high = part.partition("-")
        parts.append(f"{day(low)}..{day(high)}" if high else day(low))
    return ",".join(parts)


def systemd_units(config: StudyConfig, python: str = sys.executable) -> dict[str, str]:
    """File name to text of the service and the timer."""
    name = unit_name(config)
    log = log_file(config)
    service = "\n".join(
        [
            MARKER + str(config.path),
            "[Unit]",
            f"Description=sweeper nightly sweep of {config.study.name}",
            "",
            "[Service]",
            "Type=oneshot",
            f"WorkingDirectory={config.folder}",
            f"Environment=PATH={search_path(python)}",
            f"ExecStart={shlex.join(nightly_command(config, python))}",
            f"StandardOutput=append:{log}",
            f"StandardError=append:{log}",
            "",
        ]
    )
    timer = "\n".join(
        [
            MARKER + str(config.path),
            "[Unit]",
            f"Description=Run {name}.service on [schedule] cron = {cron_expression(config)}",
            "",
            "[Timer]",
            f"OnCalendar={on_calendar(cron_expression(config), config.schedule.timezone)}",
            "Persistent=true",
            "",
            "[Install]",
            "WantedBy=timers.target",
            "",
        ]
    )
    return {f"{name}.service": service, f"{name}.timer": timer}


def install_systemd(config: StudyConfig, enable: bool, emit: Callable[[str], None]) -> list[Path]:
    """Write the units (unchanged files are left alone) and enable the timer if asked."""
    units = systemd_units(config)  # refuses what systemd cannot express, before writing
    folder = unit_dir()
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for file_name, text in units.items():
        path = folder / file_name
        if not path.exists() or path.read_text() != text:
            path.write_text(text)
            emit(f"wrote {path}")
        written.append(path)
    timer = f"{unit_name(config)}.timer"
    commands = [
        ["systemctl", "--user", "daemon-reload"],
        ["systemctl", "--user", "enable", "--now", timer],
    ]
    if not enable:
        emit("to enable it: " + "; ".join(shlex.join(c) for c in commands))
        return written
    for command in commands:
        result = subprocess.run(command, capture_output=True, text=True, check=False)
        if result.returncode != 0:
            emit(f"{shlex.join(command)} failed: {result.stderr.strip()}")
            emit("to enable it: " + "; ".join(shlex.join(c) for c in commands))
            break
    return written


def remove_systemd(config: StudyConfig, emit: Callable[[str], None]) -> list[Path]:
    """Stop the timer where systemd runs, and delete the units."""
    name = unit_name(config)
    removed = []
    if shutil.which("systemctl"):
        subprocess.run(
            ["systemctl", "--user", "disable", "--now", f"{name}.timer"],
            capture_output=True,
            check=False,
        )
    for suffix in (".service", ".timer"):
        path = unit_dir() / f"{name}{suffix}"
        if path.exists():
            path.unlink()
            emit(f"removed {path}")
            removed.append(path)
    return removed
