"""Nightly sweeps: run one night, its history, and the schedule that runs it."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from sweeper.cli.common import (
    AsJson,
    Debug,
    IgnoreAudit,
    StudyFile,
    app,
    handles_errors,
    night_date,
    print_json,
    renamed,
    say,
    warn,
    wide_console,
)
from sweeper.config import load_config


@app.command()
@handles_errors
def nightly(
    study_file: StudyFile,
    night: Annotated[
        str | None,
        typer.Option(
            "--night",
            help="The night to run, YYYY-MM-DD; default today in the [schedule] time zone.",
        ),
    ] = None,
    rerun: Annotated[
        bool, typer.Option("--rerun", help="Delete a finished night and run it again.")
    ] = False,
    ignore_audit: IgnoreAudit = False,
    _date: Annotated[str | None, renamed("--date", "--night")] = None,
    _force: Annotated[bool, renamed("--force", "--rerun (or --ignore-audit)")] = False,
    debug: Debug = False,
) -> None:
    """Run tonight's sweep, warm-started from last night; exit 3 on a regression."""
    from sweeper.nightly.night import run_night, today

    config = load_config(study_file)
    date = night_date(night) if night is not None else today(config)
    code = run_night(config, date, rerun=rerun, ignore_audit=ignore_audit, emit=say)
    if code:
        raise typer.Exit(code)


@app.command()
@handles_errors
def history(
    study_file: StudyFile,
    as_json: AsJson = False,
    debug: Debug = False,
) -> None:
    """One row per night: best value, change, trials, duration, status."""
    from rich import box
    from rich.table import Table

    from sweeper.nightly.night import history as rows_of
    from sweeper.nightly.night import one_metric

    config = load_config(study_file)
    one_metric(config)
    rows = rows_of(config)
    if as_json:
        print_json(rows)
        return
    if not rows:
        say(f"no nights of study {config.study.name!r} yet; run `sweeper nightly {study_file}`")
        return
    table = Table(
        title=f"nights of {config.study.name} ({config.study.metric})",
        box=box.SIMPLE_HEAD,
        pad_edge=False,
    )
    for column in ("date", "best", "delta", "trials", "pruned", "failed", "duration", "status"):
        justify: Any = "left" if column in {"date", "status"} else "right"
        table.add_column(column, justify=justify, no_wrap=True)
    for row in rows:
        table.add_row(
            row["night"],
            _number(row["best_value"]),
            "" if row["delta"] is None else f"{row['delta']:+.4g}",
            str(row["trials"]),
            str(row["pruned"]),
            str(row["failed"]),
            "" if row["duration_s"] is None else f"{row['duration_s']:.0f} s",
            row["status"],
        )
    wide_console().print(table)


def _number(value: float | None) -> str:
    return "" if value is None else f"{value:.4f}"


schedule_app = typer.Typer(
    help="Run `sweeper nightly` on [schedule] cron, from crontab or a systemd timer.",
    no_args_is_help=True,
)
app.add_typer(schedule_app, name="schedule")
CrontabFile = Annotated[
    Path | None,
    typer.Option("--crontab-file", help="Edit this file instead of the user's crontab."),
]
Systemd = Annotated[bool, typer.Option("--systemd", help="A systemd user timer, not crontab.")]


@schedule_app.command("install")
@handles_errors
def schedule_install(
    study_file: StudyFile,
    systemd: Systemd = False,
    enable: Annotated[
        bool, typer.Option("--enable/--no-enable", help="Enable the systemd timer now.")
    ] = True,
    crontab_file: CrontabFile = None,
    debug: Debug = False,
) -> None:
    """Install the nightly run; installing again changes nothing."""
    from sweeper.atomic import make_folder
    from sweeper.nightly import schedule
    from sweeper.nightly.night import one_metric

    config = load_config(study_file)
    one_metric(config)
    if systemd:
        schedule.systemd_units(config)  # refuses what systemd cannot express
        make_folder(schedule.log_file(config).parent)
        schedule.install_systemd(config, enable, say)
        return
    crontab = schedule.Crontab(crontab_file)
    block = schedule.crontab_block(config)
    make_folder(schedule.log_file(config).parent)
    before = crontab.read()
    after = schedule.install_crontab(before, block, block[0])
    if after == before:
        say(f"already installed for {config.path}; nothing changed")
    else:
        crontab.write(after)
        say(f"installed: {block[1]}")
    warning = schedule.zone_warning(config)
    if warning:
        warn(f"warning: {warning}")


@schedule_app.command("show")
@handles_errors
def schedule_show(
    study_file: StudyFile,
    systemd: Systemd = False,
    crontab_file: CrontabFile = None,
    debug: Debug = False,
) -> None:
    """Show the installed entry and the next runs."""
    from sweeper.nightly import schedule

    config = load_config(study_file)
    lines: list[str] = []
    if systemd:
        paths = [schedule.unit_dir() / name for name in schedule.unit_files(config)]
        for path in [p for p in paths if p.exists()] + schedule.older_units(config):
            lines.append(f"{path}:\n{path.read_text()}")
    else:
        marker = schedule.marker(config)
        lines = schedule.find_block(schedule.Crontab(crontab_file).read(), marker) or []
    for line in lines:
        say(line)
    if not lines:
        say(f"no schedule installed for {config.path}")
        raise typer.Exit(1)
    runs = ", ".join(run.isoformat(timespec="minutes") for run in schedule.next_runs(config))
    say(f"next runs ({config.schedule.timezone}): {runs}")


@schedule_app.command("remove")
@handles_errors
def schedule_remove(
    study_file: StudyFile,
    systemd: Systemd = False,
    crontab_file: CrontabFile = None,
    debug: Debug = False,
) -> None:
    """Remove the entry; every other line of the crontab stays as it was."""
    from sweeper.nightly import schedule

    config = load_config(study_file)
    if systemd:
        if not schedule.remove_systemd(config, say):
            say(f"no systemd units for {config.path}; nothing changed")
        return
    crontab = schedule.Crontab(crontab_file)
    before = crontab.read()
    after = schedule.remove_crontab(before, schedule.marker(config))
    if after == before:
        say(f"no schedule installed for {config.path}; nothing changed")
        return
    crontab.write(after)
    say(f"removed the schedule of {config.path}")
