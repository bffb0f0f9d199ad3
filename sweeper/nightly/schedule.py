"""``sweeper schedule``: run ``sweeper nightly`` from the user's crontab or a systemd timer.

A crontab entry is two lines, a marker comment naming the study file and the
entry itself; install, show and remove find it by the marker and leave every
other line as it was, byte for byte. A systemd service and timer are named
after the study and a hash of the study file's path, so that two study files
with one study name never share units. Every path written into either is
refused when a control character in it would end a line early, and escaped
for the reader it goes to.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import os
import re
import shlex
import shutil
import subprocess
import sys
import unicodedata
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


class EnableFailed(SweeperError):
    """The units are written but systemd did not enable them."""

    exit_code = 1


def cron_expression(config: StudyConfig) -> str:
    """``[schedule] cron``, which installing requires, as five fields or a nickname on one line."""
    if config.schedule.cron is None:
        raise ConfigError(f"{config.path}: schedule.cron: required to install a schedule")
    cron = " ".join(config.schedule.cron.split())
    if cron not in NICKNAMES and len(cron.split()) != 5:
        raise ConfigError(
            f"{config.path}: schedule.cron: cron reads five fields (minute hour day month "
            f"weekday) or a nickname such as @daily, got {config.schedule.cron!r}"
        )
    return cron


def checked_path(path: Path | str) -> str:
    """``path`` as text for a crontab or a unit file; refused unless it is one line of text."""
    text = str(path)
    for char in text:
        category = unicodedata.category(char)
        if category == "Cc":
            raise ScheduleError(
                f"{text!r}: holds the control character {char!r}, which would break the line "
                "it is written on in a crontab or a systemd unit; rename or move it to schedule it"
            )
        if category == "Cs":
            raise ScheduleError(
                f"{text!r}: is not valid UTF-8, which crontabs and systemd units must be; "
                "rename or move it to schedule it"
            )
    return text


def marker(config: StudyConfig) -> str:
    """The comment that names this study file in a crontab and in its units."""
    return MARKER + checked_path(config.path)


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
    for path in (config.path, log_file(config), python):
        if "\\%" in checked_path(path):
            raise ScheduleError(f"{str(path)!r}: cron cannot run a path holding '\\%'")
    command = (
        f"cd {shlex.quote(str(config.folder))} && PATH={shlex.quote(search_path(python))} "
        f"{shlex.join(nightly_command(config, python))} "
        f">> {shlex.quote(str(log_file(config)))} 2>&1"
    )
    # In a crontab an unescaped % ends the command.
    entry = f"{cron_expression(config)} {command.replace('%', chr(92) + '%')}"
    return [marker(config), entry]


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
    """The study's name and a hash of its file's path: one study file, one pair of units."""
    digest = hashlib.sha256(os.fsencode(config.path)).hexdigest()[:8]
    return f"sweeper-nightly-{config.study.name.replace('@', '_')}-{digest}"


def unit_files(config: StudyConfig) -> list[str]:
    """The file names of the service and the timer."""
    return [f"{unit_name(config)}.service", f"{unit_name(config)}.timer"]


def older_units(config: StudyConfig) -> list[Path]:
    """Units an earlier sweeper named after the study alone, for this same study file."""
    found = []
    for suffix in (".service", ".timer"):
        path = unit_dir() / f"sweeper-nightly-{config.study.name}{suffix}"
        if path.is_file() and path.read_text(errors="replace").split("\n", 1)[0] == (
            MARKER + str(config.path)
        ):
            found.append(path)
    return found


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


SYSTEMD_BARE = re.compile(r"[A-Za-z0-9_@+=:,./-]+")


def _specifiers(text: str) -> str:
    """``text`` with systemd's ``%`` specifiers escaped."""
    return text.replace("%", "%%")


def _systemd_path(path: Path) -> str:
    """A path as the whole value of a setting that takes it as it stands (no quoting)."""
    text = checked_path(path)
    if text != text.strip() or text.endswith("\\"):
        raise ScheduleError(
            f"{text!r}: systemd cannot take a path that ends in a space or a backslash; "
            "rename or move it, or use crontab"
        )
    return _specifiers(text)


def _quoted(text: str) -> str:
    """One word of ``ExecStart=`` or ``Environment=``, double-quoted unless plain."""
    if SYSTEMD_BARE.fullmatch(text) is None:
        text = '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return _specifiers(text)


def exec_start(command: list[str]) -> str:
    """A command as the value of ``ExecStart=``: quoted, ``%`` and ``$`` escaped.

    The program itself is never expanded for ``$``, and systemd refuses one
    whose path holds a quote or a backslash.
    """
    program, *arguments = (checked_path(word) for word in command)
    if any(char in program for char in "\\\"'"):
        raise ScheduleError(
            f"{program!r}: systemd cannot run a program whose path holds a quote or a "
            "backslash; use crontab, or a Python installed elsewhere"
        )
    words = [_quoted(program)] + [_quoted(word).replace("$", "$$") for word in arguments]
    return " ".join(words)


def systemd_units(config: StudyConfig, python: str = sys.executable) -> dict[str, str]:
    """File name to text of the service and the timer."""
    head = marker(config)  # names the study file when its path is refused
    name = unit_name(config)
    log = _systemd_path(log_file(config))
    cron = cron_expression(config)
    service = "\n".join(
        [
            head,
            "[Unit]",
            f"Description=sweeper nightly sweep of {config.study.name}",
            "",
            "[Service]",
            "Type=oneshot",
            f"WorkingDirectory={_systemd_path(config.folder)}",
            f"Environment={_quoted('PATH=' + checked_path(search_path(python)))}",
            f"ExecStart={exec_start(nightly_command(config, python))}",
            f"StandardOutput=append:{log}",
            f"StandardError=append:{log}",
            "",
        ]
    )
    timer = "\n".join(
        [
            head,
            "[Unit]",
            f"Description=Run {name}.service on [schedule] cron = {_specifiers(cron)}",
            "",
            "[Timer]",
            f"OnCalendar={on_calendar(cron, config.schedule.timezone)}",
            "Persistent=true",
            "",
            "[Install]",
            "WantedBy=timers.target",
            "",
        ]
    )
    return {f"{name}.service": service, f"{name}.timer": timer}


def install_systemd(config: StudyConfig, enable: bool, emit: Callable[[str], None]) -> list[Path]:
    """Write the units (unchanged files are left alone) and enable the timer if asked.

    Units an earlier sweeper named after the study alone, for this study file,
    are disabled and removed: the new ones replace them.
    """
    units = systemd_units(config)  # refuses what systemd cannot express, before writing
    folder = unit_dir()
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for file_name, text in units.items():
        path = folder / file_name
        if not path.exists() or path.read_text() != text:
            write_text(path, text)
            emit(f"wrote {path}")
        written.append(path)
    _remove_units(older_units(config), emit)
    timer = f"{unit_name(config)}.timer"
    commands = [
        ["systemctl", "--user", "daemon-reload"],
        ["systemctl", "--user", "enable", "--now", timer],
    ]
    if not enable:
        emit("to enable it: " + "; ".join(shlex.join(c) for c in commands))
        return written
    for command in commands:
        try:
            result = subprocess.run(command, capture_output=True, text=True, check=False)
        except OSError as exc:
            result = subprocess.CompletedProcess(command, 127, "", exc.strerror or str(exc))
        if result.returncode != 0:
            why = " ".join(result.stderr.split()) or f"exit code {result.returncode}"
            raise EnableFailed(
                f"{shlex.join(command)} failed: {why}; the units are written in {folder}: "
                f"enable them with `{'; '.join(shlex.join(c) for c in commands)}` where "
                "systemd runs, or install with --no-enable"
            )
    return written


def remove_systemd(config: StudyConfig, emit: Callable[[str], None]) -> list[Path]:
    """Stop the timer where systemd runs, and delete the units of this study file."""
    paths = [unit_dir() / name for name in unit_files(config)]
    return _remove_units([p for p in paths if p.exists()] + older_units(config), emit)


def _remove_units(paths: list[Path], emit: Callable[[str], None]) -> list[Path]:
    timers = [path.name for path in paths if path.suffix == ".timer"]
    if timers and shutil.which("systemctl"):
        subprocess.run(
            ["systemctl", "--user", "disable", "--now", *timers], capture_output=True, check=False
        )
    for path in paths:
        path.unlink(missing_ok=True)
        emit(f"removed {path}")
    return paths
