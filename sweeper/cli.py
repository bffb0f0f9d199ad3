"""The command line: parse, call one function, map errors to exit codes."""

from __future__ import annotations

import functools
import json
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console

from sweeper.config import load_config
from sweeper.errors import SweeperError, Terminated

app = typer.Typer(
    help="Hyperparameter sweeps for fine-tuning: one TOML file, every device busy.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)

StudyFile = Annotated[Path, typer.Argument(help="The study file (study.toml).")]
Debug = Annotated[bool, typer.Option("--debug", help="Show tracebacks.")]
AsJson = Annotated[bool, typer.Option("--json", help="Print JSON (all of it).")]
Night = Annotated[
    str | None,
    typer.Option("--night", help="One night of `sweeper nightly` (YYYY-MM-DD), not the study."),
]
F = TypeVar("F", bound=Callable[..., Any])


def handles_errors(command: F) -> F:
    """Turn a SweeperError into one line on stderr and its exit code."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        # SIGTERM (docker stop, Kubernetes, systemd) stops as Ctrl-C does; an
        # explicit handler also makes it reach sweeper when it runs as PID 1.
        previous = signal.signal(signal.SIGTERM, _terminate)
        try:
            return command(*args, **kwargs)
        except SweeperError as exc:
            if kwargs.get("debug"):
                raise
            err.print(f"error: {exc}", markup=False)
            raise typer.Exit(exc.exit_code) from None
        except optuna.exceptions.StorageInternalError as exc:
            from sweeper.store import storage_failure

            if kwargs.get("debug"):
                raise
            failure = storage_failure(exc)
            err.print(f"error: {failure}", markup=False)
            raise typer.Exit(failure.exit_code) from None
        except Terminated:
            err.print("terminated", markup=False)
            raise typer.Exit(Terminated.exit_code) from None
        except KeyboardInterrupt:
            err.print("interrupted", markup=False)
            raise typer.Exit(130) from None
        finally:
            signal.signal(signal.SIGTERM, previous)  # the command ran in-process (tests)

    return wrapper  # type: ignore[return-value]


def _terminate(signum: int, frame: object) -> None:
    raise Terminated


def _say(line: str) -> None:
    out.print(line, markup=False)


@app.command()
@handles_errors
def start(
    study_file: StudyFile,
    n_trials: Annotated[
        int | None, typer.Option("--n-trials", help="Override [study] n_trials.")
    ] = None,
    force: Annotated[
        bool, typer.Option("--force", help="Run even when the data audit finds errors.")
    ] = False,
    debug: Debug = False,
) -> None:
    """Run the study until n_trials trials are finished, then show the best."""
    from sweeper.sweep import LiveView
    from sweeper.sweep import start as run

    config = load_config(study_file, n_trials=n_trials)
    if out.is_terminal:
        from rich.live import Live

        with Live(console=out, refresh_per_second=2, transient=True) as view:
            outcome = run(
                config,
                _say,
                n_trials=n_trials,
                observers=[LiveView(config, view.update)],
                force=force,
            )
    else:
        outcome = run(config, _say, n_trials=n_trials, force=force)
    _print_best(outcome.summary)
    if outcome.best_file is not None:
        _say(f"best configuration written to {outcome.best_file}")
    _say(f"report written to {outcome.report_file}")


@app.command()
@handles_errors
def check(
    study_file: StudyFile,
    as_json: AsJson = False,
    debug: Debug = False,
) -> None:
    """Validate the study file and its task, and audit its data, without running anything."""
    from sweeper.audit import audit, enforce
    from sweeper.sweep import validate

    config = load_config(study_file)
    findings = audit(config)
    data: dict[str, Any] = {"file": str(config.path), "audit": findings.to_dict()}
    if not as_json:
        for line in findings.lines():
            _say(line)
    elif findings.errors:
        sys.stdout.write(json.dumps(data, indent=2) + "\n")
    enforce(findings, config, force=False)
    planned = validate(config)
    for warning in planned.warnings:
        err.print(f"warning: {warning}", markup=False)
    slots = planned.slots
    devices = ", ".join(sorted({slot.device for slot in slots}))
    if as_json:
        sys.stdout.write(json.dumps({**data, "slots": len(slots), "devices": devices}, indent=2))
        sys.stdout.write("\n")
    else:
        _say(f"{config.path}: ok; {len(slots)} slot(s) on {devices}")


@app.command()
@handles_errors
def report(
    study_file: StudyFile,
    output: Annotated[
        Path | None, typer.Option("-o", "--output", help="Default: <folder>/<name>/report.html.")
    ] = None,
    night: Night = None,
    debug: Debug = False,
) -> None:
    """Write the study's report: one self-contained HTML file of charts."""
    from sweeper.results.report import write_report
    from sweeper.store import load

    config = _config(study_file, night)
    earlier: list[tuple[str, str]] = []
    if config.night is not None:
        from sweeper.nightly.night import earlier_reports

        earlier = earlier_reports(load_config(study_file), config.night)
    _say(
        f"report written to {write_report(config, load(config, read_only=True), output, earlier)}"
    )


@app.command()
@handles_errors
def dashboard(
    study_file: StudyFile,
    host: Annotated[str, typer.Option(help="Address to bind; loopback by default.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to serve on.")] = 8080,
    debug: Debug = False,
) -> None:
    """Serve optuna-dashboard on the study's storage."""
    from sweeper.results.dashboard import serve
    from sweeper.store import load

    config = load_config(study_file)
    load(config, read_only=True)  # a clear error when there is no study yet
    serve(config, host, port, lambda line: err.print(line, markup=False))


@app.command("lr-find")
@handles_errors
def lr_find(
    study_file: StudyFile,
    write: Annotated[
        bool, typer.Option("--write", help="Put the suggested range into the study file.")
    ] = False,
    steps: Annotated[int, typer.Option("--steps", min=10, help="Training steps to test.")] = 100,
    debug: Debug = False,
) -> None:
    """Run a learning-rate range test and suggest the learning-rate range to search."""
    from sweeper.lrfind import run_range_test, table, write_range

    config = load_config(study_file)
    test = run_range_test(config, steps)
    _say(f"{'learning rate':>14}  loss")
    for lr, loss in table(test):
        _say(f"{lr:>14.3g}  {loss:.4g}")
    if test.diverges_at is not None:
        _say(f"the loss diverges from {test.name} = {test.diverges_at:.3g}")
    else:
        _say(f"the loss did not diverge up to {test.name} = {test.lrs[-1]:.3g}")
    if test.steepest is not None:
        _say(f"steepest descent at {test.name} = {test.steepest:.3g}")
    suggestion = f"{test.name} = {{ low = {test.low:g}, high = {test.high:g}, log = true }}"
    if write:
        write_range(config.path, test.name, test.low, test.high)
        _say(f"{config.path}: [search] {suggestion}")
    else:
        _say(f"suggested: {suggestion}  (--write puts it into {config.path})")


@app.command()
@handles_errors
def best(
    study_file: StudyFile,
    as_json: AsJson = False,
    night: Night = None,
    debug: Debug = False,
) -> None:
    """Show the best trial: value, params, metrics, counts."""
    from sweeper.results.best import summary
    from sweeper.store import load

    config = _config(study_file, night)
    data = summary(config, load(config, read_only=True))
    if as_json:
        sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")
    else:
        _print_best(data)
    if data["best"] is None:
        raise typer.Exit(1)


@app.command()
@handles_errors
def status(study_file: StudyFile, night: Night = None, debug: Debug = False) -> None:
    """Show counts, running trials and the best so far, also of a sweep running elsewhere."""
    from sweeper.results.best import running, summary
    from sweeper.store import load

    config = _config(study_file, night)
    study = load(config, read_only=True)
    data = summary(config, study)
    _say(_counts_line(data))
    for row in running(study):
        last = row["last"]
        where = (
            f"step {last['step']}, {config.study.metric}={last.get(config.study.metric)}"
            if last
            else "starting"
        )
        _say(
            f"  running: trial {row['trial']} on {row['device']} at {row['host']}, "
            f"{row['elapsed_s']} s, {where}"
        )
    best_row = data["best"]
    if best_row is not None:
        _say(f"best so far: trial {best_row['trial']}, {data['metric']}={best_row['value']:.4f}")


@app.command()
@handles_errors
def nightly(
    study_file: StudyFile,
    date: Annotated[
        str | None,
        typer.Option(
            "--date",
            help="The night to run, YYYY-MM-DD; default today in the [schedule] time zone.",
        ),
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="Run a finished night again.")] = False,
    debug: Debug = False,
) -> None:
    """Run tonight's sweep, warm-started from last night; exit 3 on a regression."""
    from sweeper.nightly.night import run_night, today

    config = load_config(study_file)
    night = _night(date) if date is not None else today(config)
    code = run_night(config, night, force=force, emit=_say)
    if code:
        raise typer.Exit(code)


def _config(study_file: Path, night: str | None) -> Any:
    """The study file's config, or that of one of its nights."""
    config = load_config(study_file)
    return config if night is None else config.for_night(_night(night))


def _night(text: str) -> Any:
    import datetime as dt

    from sweeper.errors import ConfigError

    try:
        return dt.date.fromisoformat(text)
    except ValueError:
        raise ConfigError(f"--date: expected YYYY-MM-DD, got {text!r}") from None


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

    config = load_config(study_file)
    rows = rows_of(config)
    if as_json:
        sys.stdout.write(json.dumps(rows, indent=2, default=str) + "\n")
        return
    if not rows:
        _say(f"no nights of study {config.study.name!r} yet; run `sweeper nightly {study_file}`")
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
    wide = out if out.is_terminal else Console(highlight=False, width=100)
    wide.print(table)


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
    from sweeper.nightly import schedule

    config = load_config(study_file)
    if systemd:
        schedule.systemd_units(config)  # refuses what systemd cannot express
        schedule.log_file(config).parent.mkdir(parents=True, exist_ok=True)
        schedule.install_systemd(config, enable, _say)
        return
    crontab = schedule.Crontab(crontab_file)
    block = schedule.crontab_block(config)
    schedule.log_file(config).parent.mkdir(parents=True, exist_ok=True)
    before = crontab.read()
    after = schedule.install_crontab(before, block, block[0])
    if after == before:
        _say(f"already installed for {config.path}; nothing changed")
    else:
        crontab.write(after)
        _say(f"installed: {block[1]}")
    warning = schedule.zone_warning(config)
    if warning:
        err.print(f"warning: {warning}", markup=False)


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
        _say(line)
    if not lines:
        _say(f"no schedule installed for {config.path}")
        raise typer.Exit(1)
    runs = ", ".join(run.isoformat(timespec="minutes") for run in schedule.next_runs(config))
    _say(f"next runs ({config.schedule.timezone}): {runs}")


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
        if not schedule.remove_systemd(config, _say):
            _say(f"no systemd units for {config.path}; nothing changed")
        return
    crontab = schedule.Crontab(crontab_file)
    before = crontab.read()
    after = schedule.remove_crontab(before, schedule.marker(config))
    if after == before:
        _say(f"no schedule installed for {config.path}; nothing changed")
        return
    crontab.write(after)
    _say(f"removed the schedule of {config.path}")


def _counts_line(data: dict[str, Any]) -> str:
    c = data["counts"]
    finished = c["complete"] + c["pruned"]
    return (
        f"study {data['study']!r}: {finished}/{data['n_trials']} finished "
        f"({c['complete']} complete, {c['pruned']} pruned), {c['fail']} failed, "
        f"{c['running']} running, {c['waiting']} waiting"
    )


def _print_best(data: dict[str, Any]) -> None:
    _say(_counts_line(data))
    overfit = data.get("overfit_trials") or []
    if overfit:
        numbers = ", ".join(map(str, overfit[:20])) + (" …" if len(overfit) > 20 else "")
        _say(f"trials that overfit (metric peaked, then fell as the train loss fell): {numbers}")
    best_row = data["best"]
    if best_row is None:
        _say("no trial has completed yet")
        return
    _say(
        f"best: trial {best_row['trial']}, {data['metric']}={best_row['value']:.4f} "
        f"at step {best_row['step']} (epoch {best_row['epoch']})"
    )
    for name, value in {**best_row["fixed"], **best_row["params"]}.items():
        _say(f"  {name} = {value!r}")
    metrics = ", ".join(f"{k}={v:.4f}" for k, v in best_row["metrics"].items())
    if metrics:
        _say(f"  metrics: {metrics}")
    if best_row.get("gap"):
        gaps = ", ".join(f"{k} {v:+.4f}" for k, v in best_row["gap"].items())
        _say(f"  train/val gap at its best validation: {gaps}")
    if best_row.get("overfit"):
        from sweeper.run.overfitting import describe

        _say(f"  overfitting: {describe(best_row['overfit'], data['metric'])}")
    if best_row.get("weights"):
        _say(f"  weights: {best_row['weights']}")
    errors = best_row.get("confident_errors") or []
    if errors:
        _say("  val examples it gets wrong most confidently (likely label errors):")
        for error in errors[:10]:
            _say(
                f"    {error['where']}: {error['text']!r} labelled {error['label']!r}, "
                f"predicted {error['predicted']!r} ({error['confidence']:.2f})"
            )


def main() -> None:
    app()


if __name__ == "__main__":
    main()
