"""``sweeper schedule``: crontab entries and systemd units, written for hostile paths too.

Systemd tests write units under a temporary XDG_CONFIG_HOME and put a stand-in
``systemctl`` first on PATH, which records its arguments: the real one is
never called.
"""

from __future__ import annotations

import datetime as dt
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest

from sweeper.config import load_config
from sweeper.nightly.schedule import ScheduleError, on_calendar, systemd_units
from tests.conftest import StudyDir, one_line_error, run_sweeper, study, sweeper_cmd
from tests.test_hostile_paths import needs_mounts, read_only

CRONTAB = "MAILTO=ops@example.org\n# nightly backups\n30 1 * * * /usr/local/bin/backup --all\n"
UNIT = re.compile(r"sweeper-nightly-tiny-[0-9a-f]{8}\.(service|timer)")


class Systemd:
    """A unit folder under XDG_CONFIG_HOME and a ``systemctl`` that only records its calls."""

    def __init__(self, root: Path, fails_with: str | None = None) -> None:
        self.config = root / "config"
        self.units = self.config / "systemd" / "user"
        self.log = root / "systemctl.log"
        bin_dir = root / "bin"
        bin_dir.mkdir()
        fake = bin_dir / "systemctl"
        record = f'echo "$*" >> {shlex.quote(str(self.log))}'
        fail = f"echo {shlex.quote(fails_with)} >&2; exit 1" if fails_with else "exit 0"
        fake.write_text(f"#!/bin/sh\n{record}\n{fail}\n")
        fake.chmod(0o755)
        self.env = {
            **os.environ,
            "XDG_CONFIG_HOME": str(self.config),
            "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
        }

    def run(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            sweeper_cmd(*args), capture_output=True, text=True, env=self.env, timeout=120
        )

    def calls(self) -> list[str]:
        return self.log.read_text().splitlines() if self.log.exists() else []

    def files(self) -> list[str]:
        return sorted(p.name for p in self.units.iterdir()) if self.units.exists() else []

    def of(self, study_file: Path) -> dict[str, str]:
        """Suffix to text of the units whose marker names ``study_file``."""
        found = {}
        for name in self.files():
            text = (self.units / name).read_text()
            if text.splitlines()[0] == f"# sweeper nightly: {study_file}":
                found[Path(name).suffix] = text
        return found


@pytest.fixture
def systemd(tmp_path_factory: pytest.TempPathFactory) -> Systemd:
    return Systemd(tmp_path_factory.mktemp("systemd"))


def test_crontab_install_show_remove_keep_other_lines(study_dir: StudyDir) -> None:
    path = study_dir.write(study(schedule={"cron": "15 3 * * 1-5"}))
    crontab = study_dir.root / "crontab"
    crontab.write_text(CRONTAB)
    args = ("--crontab-file", str(crontab))

    installed = run_sweeper("schedule", "install", str(path), *args)
    assert installed.returncode == 0, installed.stderr
    text = crontab.read_text()
    assert text.startswith(CRONTAB)
    marker, entry = text[len(CRONTAB) :].splitlines()
    assert marker == f"# sweeper nightly: {path}"
    assert entry.startswith("15 3 * * 1-5 cd ")
    assert f"{sys.executable} -m sweeper.cli nightly {path}" in entry
    assert entry.endswith(f">> {study_dir.root / 'tiny' / 'nightly.log'} 2>&1")
    assert (study_dir.root / "tiny").is_dir(), "the log's folder exists for cron"

    again = run_sweeper("schedule", "install", str(path), *args)
    assert "nothing changed" in again.stdout and crontab.read_text() == text

    shown = run_sweeper("schedule", "show", str(path), *args)
    assert shown.returncode == 0 and entry in shown.stdout and "next runs (UTC)" in shown.stdout

    removed = run_sweeper("schedule", "remove", str(path), *args)
    assert removed.returncode == 0
    assert crontab.read_bytes() == CRONTAB.encode()
    shown = run_sweeper("schedule", "show", str(path), *args)
    assert shown.returncode == 1 and "no schedule installed" in shown.stdout


def test_crontab_without_cron_installed_or_configured(study_dir: StudyDir) -> None:
    path = study_dir.write(study(schedule={"timezone": "UTC"}))
    result = run_sweeper("schedule", "install", str(path), "--crontab-file", "crontab")
    assert result.returncode == 2
    assert f"{path}: schedule.cron: required to install a schedule" in result.stderr

    path = study_dir.write(study(schedule={"cron": "0 2 * * *"}))
    env = {**os.environ, "PATH": str(Path(sys.executable).parent)}
    result = subprocess.run(
        sweeper_cmd("schedule", "install", str(path)), capture_output=True, text=True, env=env
    )
    assert result.returncode == 2
    assert "no `crontab` command on this machine" in result.stderr


def test_crontab_install_warns_when_cron_reads_another_time_zone(study_dir: StudyDir) -> None:
    local = dt.datetime.now().astimezone().utcoffset()
    zone = next(
        z
        for z in ("Asia/Tokyo", "America/New_York")
        if dt.datetime.now(ZoneInfo(z)).utcoffset() != local
    )
    path = study_dir.write(study(schedule={"cron": "0 2 * * *", "timezone": zone}))
    crontab = study_dir.root / "crontab"
    result = run_sweeper("schedule", "install", str(path), "--crontab-file", str(crontab))
    assert result.returncode == 0, result.stderr
    assert f"cron reads '0 2 * * *' in this machine's time zone, not in {zone}" in result.stderr
    assert "use --systemd for a timer in" in result.stderr


@pytest.mark.parametrize("char", ["\n", "\r", "\x1b", "\t"])
@pytest.mark.parametrize("scheduler", ["crontab", "systemd"])
def test_a_control_character_in_the_study_path_is_refused_and_nothing_written(
    tmp_path: Path, systemd: Systemd, char: str, scheduler: str
) -> None:
    folder = tmp_path / f"nightly{char}* * * * * touch sweeper-pwned #"
    folder.mkdir()
    study_dir = StudyDir(folder)
    path = study_dir.write(study(schedule={"cron": "0 2 * * *"}))
    crontab = tmp_path / "crontab"
    crontab.write_text(CRONTAB)
    where = ["--systemd"] if scheduler == "systemd" else ["--crontab-file", str(crontab)]
    refused = f"{str(path)!r}: holds the control character {char!r}"

    for command in ("install", "show", "remove"):
        result = systemd.run("schedule", command, str(path), *where)
        if scheduler == "systemd" and command != "install":
            assert result.returncode in {0, 1}, result.stderr  # only unit names are looked up
            continue
        one_line_error(result, refused, "rename or move it")
    assert crontab.read_bytes() == CRONTAB.encode()
    assert systemd.files() == [] and not systemd.config.exists() and systemd.calls() == []
    assert study_dir.created() == [], "not even the log's folder"


def test_a_cron_expression_of_more_than_one_line_is_refused(study_dir: StudyDir) -> None:
    path = study_dir.write(study(schedule={"cron": "* * * * *\n*"}))
    crontab = study_dir.root / "crontab"
    result = run_sweeper("schedule", "install", str(path), "--crontab-file", str(crontab))
    one_line_error(result, f"{path}: schedule.cron: cron reads five fields", r"'* * * * *\n*'")
    assert not crontab.exists() and study_dir.created() == []


@pytest.mark.parametrize("end", [" ", "\\"])
def test_a_folder_systemd_cannot_name_as_it_is_is_refused(
    tmp_path: Path, systemd: Systemd, end: str
) -> None:
    folder = tmp_path / f"nightly{end}"
    folder.mkdir()
    path = StudyDir(folder).write(study(schedule={"cron": "0 2 * * *"}))
    result = systemd.run("schedule", "install", str(path), "--systemd", "--no-enable")
    one_line_error(result, f"{str(folder)!r}: systemd cannot take a path that ends in a space")
    assert not systemd.config.exists()


def test_crontab_escapes_a_percent_sign_in_the_study_path(tmp_path: Path) -> None:
    folder = tmp_path / "100% tiny"
    folder.mkdir()
    path = StudyDir(folder).write(study(schedule={"cron": "0 2 * * *"}))
    crontab = tmp_path / "crontab"
    result = run_sweeper("schedule", "install", str(path), "--crontab-file", str(crontab))
    assert result.returncode == 0, result.stderr
    _, entry = crontab.read_text().splitlines()
    assert re.search(r"(?<!\\)%", entry) is None, f"an unescaped % ends cron's command: {entry}"
    assert f" cd {shlex.quote(str(folder))} && ".replace("%", "\\%") in entry
    assert f" nightly {shlex.quote(str(path))} ".replace("%", "\\%") in entry
    log = shlex.quote(str(folder / "tiny" / "nightly.log")).replace("%", "\\%")
    assert entry.endswith(f">> {log} 2>&1")


@pytest.mark.parametrize("scheduler", ["crontab", "systemd"])
def test_a_log_folder_that_is_a_file_is_one_line_and_nothing_written(
    study_dir: StudyDir, systemd: Systemd, scheduler: str
) -> None:
    path = study_dir.write(study(schedule={"cron": "0 2 * * *"}))
    (study_dir.root / "tiny").write_text("not a folder")
    crontab = study_dir.root / "crontab"
    crontab.write_text(CRONTAB)
    where = ["--systemd"] if scheduler == "systemd" else ["--crontab-file", str(crontab)]
    result = systemd.run("schedule", "install", str(path), *where)
    one_line_error(result, f"{study_dir.root / 'tiny'} is a file, not a folder")
    assert crontab.read_bytes() == CRONTAB.encode()
    assert not systemd.config.exists() and systemd.calls() == []
    assert (study_dir.root / "tiny").read_text() == "not a folder"


@pytest.mark.parametrize("scheduler", ["crontab", "systemd"])
def test_a_read_only_study_folder_is_one_line_and_nothing_written(
    study_dir: StudyDir, systemd: Systemd, tmp_path_factory: pytest.TempPathFactory, scheduler: str
) -> None:
    needs_mounts()
    path = study_dir.write(study(schedule={"cron": "0 2 * * *"}))
    crontab = tmp_path_factory.mktemp("cron") / "crontab"
    crontab.write_text(CRONTAB)
    where = ["--systemd"] if scheduler == "systemd" else ["--crontab-file", str(crontab)]
    result = read_only(study_dir.root, "schedule", "install", str(path), *where, env=systemd.env)
    one_line_error(result, f"cannot write into {study_dir.root / 'tiny'}", "Read-only")
    assert crontab.read_bytes() == CRONTAB.encode()
    assert not systemd.config.exists() and systemd.calls() == []
    assert study_dir.created() == []


WEIRD = 'x %d %h $HOME ${USER} "q" b\\c'
"""A folder name full of what systemd reads as specifiers, variables, quotes and escapes."""


def test_systemd_units_escape_specifiers_dollars_quotes_and_backslashes(
    tmp_path: Path, systemd: Systemd
) -> None:
    folder = tmp_path / WEIRD
    folder.mkdir()
    path = StudyDir(folder).write(study(schedule={"cron": "0 2 * * *"}))
    result = systemd.run("schedule", "install", str(path), "--systemd", "--no-enable")
    assert result.returncode == 0, result.stderr
    service = systemd.of(path)[".service"]
    quoted = str(path).replace("\\", "\\\\").replace('"', '\\"')
    quoted = quoted.replace("%", "%%").replace("$", "$$")
    assert f' -m sweeper.cli nightly "{quoted}"\n' in service
    plain = str(folder).replace("%", "%%")
    assert f"\nWorkingDirectory={plain}\n" in service
    assert f"\nStandardOutput=append:{plain}/tiny/nightly.log\n" in service
    assert f"\nStandardError=append:{plain}/tiny/nightly.log\n" in service


def test_systemd_analyze_verify_reads_the_escaped_paths_back(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed: the escaped units cannot be verified")
    folder = tmp_path / WEIRD
    folder.mkdir()
    path = StudyDir(folder).write(study(schedule={"cron": "0 2 * * *"}))
    # verify checks that ExecStart's program exists: one found proves that the quoting and
    # escaping read back as the path, not as a path with %h or $HOME expanded. systemd
    # refuses quotes and backslashes in a program's path (see the test below).
    python = tmp_path / "bin %d %h $HOME ${USER}" / "python"
    python.parent.mkdir()
    python.write_text("#!/bin/sh\n")
    python.chmod(0o755)
    units = tmp_path / "units"
    units.mkdir()
    for name, text in systemd_units(load_config(path), str(python)).items():
        (units / name).write_text(text)
    result = subprocess.run(
        [analyze, "verify", *sorted(str(p) for p in units.iterdir())],
        capture_output=True,
        text=True,
        env={**os.environ, "SYSTEMD_LOG_COLOR": "0"},
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stderr == "", result.stderr


def test_a_python_systemd_cannot_run_is_refused(study_dir: StudyDir) -> None:
    config = load_config(study_dir.write(study(schedule={"cron": "0 2 * * *"})))
    with pytest.raises(ScheduleError, match="systemd cannot run a program whose path holds"):
        systemd_units(config, '/opt/"py"/bin/python')


def test_systemd_units_install_and_remove(study_dir: StudyDir, systemd: Systemd) -> None:
    path = study_dir.write(study(schedule={"cron": "0 2 * * *", "timezone": "Europe/Paris"}))
    result = systemd.run("schedule", "install", str(path), "--systemd", "--no-enable")
    assert result.returncode == 0, result.stderr
    service, timer = systemd.files()
    assert UNIT.fullmatch(service) and timer == service.replace(".service", ".timer")
    units = systemd.of(path)
    assert "OnCalendar=*-*-* 02:00:00 Europe/Paris" in units[".timer"]
    assert f"ExecStart={sys.executable} -m sweeper.cli nightly {path}\n" in units[".service"]
    assert f"systemctl --user enable --now {timer}" in result.stdout
    assert systemd.calls() == [], "--no-enable leaves systemd alone"
    again = systemd.run("schedule", "install", str(path), "--systemd", "--no-enable")
    assert "wrote" not in again.stdout
    result = systemd.run("schedule", "remove", str(path), "--systemd")
    assert result.returncode == 0 and systemd.files() == []
    assert systemd.calls() == [f"--user disable --now {timer}"]


def test_install_enables_the_timer_and_fails_when_systemctl_fails(
    study_dir: StudyDir, tmp_path_factory: pytest.TempPathFactory
) -> None:
    path = study_dir.write(study(schedule={"cron": "0 2 * * *", "timezone": "Europe/Paris"}))
    working = Systemd(tmp_path_factory.mktemp("systemd"))
    result = working.run("schedule", "install", str(path), "--systemd")
    assert result.returncode == 0, result.stderr
    _, timer = working.files()
    assert working.calls() == ["--user daemon-reload", f"--user enable --now {timer}"]

    no_bus = "Failed to connect to bus: No medium found"
    broken = Systemd(tmp_path_factory.mktemp("systemd"), fails_with=no_bus)
    result = broken.run("schedule", "install", str(path), "--systemd")
    assert result.returncode == 1, result.stdout + result.stderr
    assert result.stderr.count("\n") == 1, result.stderr
    assert f"systemctl --user daemon-reload failed: {no_bus}" in result.stderr
    assert "install with --no-enable" in result.stderr
    assert len(broken.files()) == 2, "the units are written for systemd to enable later"


def test_two_study_files_of_one_study_name_keep_their_own_units(
    tmp_path: Path, systemd: Systemd
) -> None:
    paths = []
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        paths.append(StudyDir(tmp_path / name).write(study(schedule={"cron": "0 2 * * *"})))
    first, second = paths
    for path in paths:
        result = systemd.run("schedule", "install", str(path), "--systemd")
        assert result.returncode == 0, result.stderr
    assert len(systemd.files()) == 4 and all(UNIT.fullmatch(name) for name in systemd.files())
    for path in paths:
        assert f"nightly {path}\n" in systemd.of(path)[".service"]
    timers = [name for name in systemd.files() if name.endswith(".timer")]
    enabled = [c.split()[-1] for c in systemd.calls() if c.startswith("--user enable --now")]
    assert sorted(enabled) == timers

    result = systemd.run("schedule", "remove", str(first), "--systemd")
    assert result.returncode == 0, result.stderr
    assert systemd.of(first) == {} and set(systemd.of(second)) == {".service", ".timer"}
    assert f"nightly {second}\n" in systemd.of(second)[".service"]
    disabled = [c.split()[-1] for c in systemd.calls() if c.startswith("--user disable")]
    assert disabled == [name for name in timers if name not in systemd.files()]
    shown = systemd.run("schedule", "show", str(second), "--systemd")
    assert shown.returncode == 0 and f"nightly {second}" in shown.stdout
    shown = systemd.run("schedule", "show", str(first), "--systemd")
    assert shown.returncode == 1 and "no schedule installed" in shown.stdout


def test_units_named_after_the_study_alone_are_replaced_for_their_file_only(
    study_dir: StudyDir, systemd: Systemd
) -> None:
    path = study_dir.write(study(schedule={"cron": "0 2 * * *"}))
    systemd.units.mkdir(parents=True)
    older = [systemd.units / f"sweeper-nightly-tiny{suffix}" for suffix in (".service", ".timer")]
    for unit in older:
        unit.write_text("# sweeper nightly: /elsewhere/study.toml\n[Unit]\n")
    result = systemd.run("schedule", "install", str(path), "--systemd", "--no-enable")
    assert result.returncode == 0, result.stderr
    assert all(unit.exists() for unit in older), "another study file's units are left alone"

    for unit in older:
        unit.write_text(f"# sweeper nightly: {path}\n[Unit]\n")
    result = systemd.run("schedule", "install", str(path), "--systemd", "--no-enable")
    assert result.returncode == 0, result.stderr
    assert not any(unit.exists() for unit in older)
    assert f"removed {older[0]}" in result.stdout
    assert systemd.calls() == ["--user disable --now sweeper-nightly-tiny.timer"]
    assert len(systemd.of(path)) == 2


def test_a_cron_expression_systemd_cannot_express_is_refused(
    study_dir: StudyDir, systemd: Systemd
) -> None:
    path = study_dir.write(study(schedule={"cron": "0 2 1 * 1"}))
    result = systemd.run("schedule", "install", str(path), "--systemd", "--no-enable")
    assert result.returncode == 2
    assert "cannot express '0 2 1 * 1' as a systemd timer" in result.stderr
    assert "day of the month OR the weekday" in result.stderr
    assert not systemd.config.exists() and study_dir.created() == []


@pytest.mark.parametrize(
    "cron",
    [
        "0 2 * * *",
        "*/15 * * * *",
        "30 4 1 * *",
        "0 6 * * 1-5",
        "0 0 * * sun",
        "@daily",
        "5 1,13 * 2 *",
    ],
)
def test_systemd_calendar_fires_when_cron_does(cron: str) -> None:
    from croniter import croniter

    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed: the calendar cannot be checked")
    start = dt.datetime(2026, 11, 25, 12, 0, tzinfo=dt.UTC)
    calendar = on_calendar(cron, "UTC")
    result = subprocess.run(
        [analyze, "calendar", "--iterations=3", "--base-time=2026-11-25 12:00:00 UTC", calendar],
        capture_output=True,
        text=True,
        env={**os.environ, "TZ": "UTC", "SYSTEMD_COLORS": "0"},
    )
    assert result.returncode == 0, result.stderr
    expected = croniter(cron, start)
    wanted = [expected.get_next(dt.datetime).strftime("%Y-%m-%d %H:%M:%S") for _ in range(3)]
    fires = re.findall(r"(?:Next elapse|Iter\. #\d+): \w+ (\S+ \S+) UTC", result.stdout)
    assert fires == wanted, result.stdout
