"""Commands that run and manage one study: start, check, stop, status, best, trials, delete."""

from __future__ import annotations

import shutil
import sys
from typing import Annotated, Any

import typer

from sweeper.cli.common import (
    AsJson,
    Debug,
    IgnoreAudit,
    Night,
    StudyFile,
    app,
    handles_errors,
    out,
    print_json,
    renamed,
    say,
    study_config,
    warn,
    wide_console,
)
from sweeper.config import load_config
from sweeper.errors import ConfigError, StorageError


@app.command()
@handles_errors
def start(
    study_file: StudyFile,
    n_trials: Annotated[
        int | None, typer.Option("--n-trials", help="Override [study] n_trials.")
    ] = None,
    ignore_audit: IgnoreAudit = False,
    _force: Annotated[bool, renamed("--force", "--ignore-audit")] = False,
    debug: Debug = False,
) -> None:
    """Run the study until n_trials trials are finished, then show the best.

    A study stopped by `sweeper stop` or interrupted is resumed where it was.
    """
    from sweeper.sweep import LiveView
    from sweeper.sweep import start as run

    config = load_config(study_file, n_trials=n_trials)
    if out.is_terminal:
        from rich.live import Live

        # redrawn at each tick, with no thread of its own: workers are forked from here
        with Live(console=out, auto_refresh=False, transient=True) as view:
            observers = [LiveView(config, lambda table: view.update(table, refresh=True))]
            outcome = run(config, say, observers=observers, ignore_audit=ignore_audit)
    else:
        outcome = run(config, say, ignore_audit=ignore_audit)
    print_best(outcome.summary)
    if outcome.best_file is not None:
        say(f"best configuration written to {outcome.best_file}")
    say(f"report written to {outcome.report_file}")


@app.command()
@handles_errors
def check(study_file: StudyFile, as_json: AsJson = False, debug: Debug = False) -> None:
    """Validate the study file and its task, and audit its data, without running anything."""
    from sweeper.audit import audit, enforce
    from sweeper.sweep import validate

    config = load_config(study_file)
    findings = audit(config)
    data: dict[str, Any] = {"file": str(config.path), "audit": findings.to_dict()}
    if not as_json:
        for line in findings.lines():
            say(line)
    elif findings.errors:
        print_json(data)
    enforce(findings, config, ignore_audit=False)
    _, planned = validate(config)
    for warning in planned.warnings:
        warn(f"warning: {warning}")
    slots = planned.slots
    devices = ", ".join(sorted({slot.device for slot in slots}))
    if as_json:
        print_json({**data, "slots": len(slots), "devices": devices})
    else:
        say(f"{config.path}: ok; {len(slots)} slot(s) on {devices}")


@app.command()
@handles_errors
def stop(
    study_file: StudyFile,
    now: Annotated[
        bool,
        typer.Option(
            "--now", help="Fail the running trials now and enqueue them again, not let them end."
        ),
    ] = False,
    night: Night = None,
    debug: Debug = False,
) -> None:
    """Stop the study's sweeps, on this machine or any other: no new trial starts.

    Running trials finish first, unless --now. `sweeper start` resumes the study.
    """
    from sweeper.results.best import running
    from sweeper.store import load, request_stop

    config = study_config(study_file, night)
    study = load(config)
    request_stop(study, now)
    busy = running(study)
    resume = f"`sweeper start {config.path}` resumes it"
    if not busy:
        say(f"stop requested for study {config.study.name!r}; no trial is running; {resume}")
    elif now:
        say(
            f"stop requested for study {config.study.name!r}: its {len(busy)} running trial(s) "
            f"are failed and enqueued again within seconds; {resume}"
        )
    else:
        say(
            f"stop requested for study {config.study.name!r}: no new trial starts, its "
            f"{len(busy)} running trial(s) finish (--now ends them); {resume}"
        )


@app.command()
@handles_errors
def status(
    study_file: StudyFile, as_json: AsJson = False, night: Night = None, debug: Debug = False
) -> None:
    """Show counts, running trials and the best so far, also of a sweep running elsewhere."""
    from sweeper.results.best import running, summary
    from sweeper.store import load, stop_request

    config = study_config(study_file, night)
    study = load(config, read_only=True)
    data = summary(config, study)
    busy = running(study)
    request = stop_request(study)
    if as_json:
        stopped = None if request is None else request.__dict__
        print_json({**data, "running": busy, "stop_requested": stopped})
        return
    say(counts_line(data))
    for row in busy:
        last = row["last"]
        first = config.study.metrics[0]
        where = f"step {last['step']}, {first}={last.get(first)}" if last else "starting"
        say(
            f"  running: trial {row['trial']} on {row['device']} at {row['host']}, "
            f"{row['elapsed_s']} s, {where}"
        )
    if request is not None:
        say(f"{request.describe()}; `sweeper start {config.path}` resumes it")
    best_row = data["best"]
    if best_row is not None:
        say(f"best so far: trial {best_row['trial']}, {best_values(data, best_row)}")


@app.command()
@handles_errors
def best(
    study_file: StudyFile, as_json: AsJson = False, night: Night = None, debug: Debug = False
) -> None:
    """Show the best trial: value, params, metrics, counts (exit 0 while none has completed)."""
    from sweeper.results.best import summary
    from sweeper.store import load

    config = study_config(study_file, night)
    data = summary(config, load(config, read_only=True))
    if as_json:
        print_json(data)
    else:
        print_best(data)


@app.command()
@handles_errors
def trials(
    study_file: StudyFile,
    state: Annotated[
        list[str] | None,
        typer.Option(
            "--state",
            help="Only trials in this state: complete, pruned, fail, running or waiting "
            "(repeat for several).",
        ),
    ] = None,
    as_json: AsJson = False,
    as_csv: Annotated[bool, typer.Option("--csv", help="Print CSV, a column per param.")] = False,
    night: Night = None,
    debug: Debug = False,
) -> None:
    """List the study's trials: number, state, value, params, stop reason, duration."""
    from rich import box
    from rich.table import Table

    from sweeper.results.trials import params_text, rows, states_named, to_csv
    from sweeper.store import load

    if as_json and as_csv:
        raise ConfigError("--json and --csv: choose one")
    chosen = states_named(state) if state else None
    config = study_config(study_file, night)
    found = rows(load(config, read_only=True), chosen, config.study.metrics)
    if as_json:
        print_json(found)
        return
    if as_csv:
        sys.stdout.write(to_csv(found, config.study.metrics))
        return
    table = Table(
        title=f"trials of {config.study.name} ({', '.join(config.study.metrics)})",
        box=box.SIMPLE_HEAD,
        pad_edge=False,
    )
    for column in ("#", "state", "value", "params", "stop reason", "duration"):
        table.add_column(column, justify="right" if column in {"#", "value"} else "left")
    for r in found:
        table.add_row(
            str(r["number"]),
            r["state"],
            " / ".join(f"{v:.4f}" for v in (r.get("values") or {}).values())
            or ("" if r["value"] is None else f"{r['value']:.4f}"),
            params_text(r["params"]),
            r["stop_reason"] or "",
            "" if r["duration_s"] is None else f"{r['duration_s']:.1f} s",
        )
    wide_console().print(table)
    if not found:
        say("no trials" + (f" in state {', '.join(state)}" if state else ""))


@app.command()
@handles_errors
def delete(
    study_file: StudyFile,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask.")] = False,
    results: Annotated[
        bool, typer.Option("--results", help="Also delete its folder of results <folder>/<name>/.")
    ] = False,
    night: Night = None,
    debug: Debug = False,
) -> None:
    """Delete the study from its storage (only that study; its nights stay)."""
    from sweeper.results.best import running
    from sweeper.store import counts, load, mask_url
    from sweeper.store import delete as delete_study

    config = study_config(study_file, night)
    study = load(config, read_only=True)
    busy = running(study)
    if busy:
        hosts = ", ".join(sorted({str(r["host"]) for r in busy}))
        raise StorageError(
            f"study {config.study.name!r} has {len(busy)} trial(s) running (on {hosts}); "
            f"stop it first with `sweeper stop --now {config.path}`"
        )
    where = mask_url(config.storage_url)
    what = f"study {config.study.name!r} ({sum(counts(study).values())} trials) in {where}"
    if results and config.output_dir.exists():
        what += f", and its results folder {config.output_dir}"
    if not yes:
        if not sys.stdin.isatty():
            raise ConfigError(f"delete {what}: nothing deleted; confirm with --yes")
        if not typer.confirm(f"delete {what}?", default=False):
            say("nothing deleted")
            raise typer.Exit(1)
    delete_study(config)
    if results and config.output_dir.exists():
        shutil.rmtree(config.output_dir)
    say(f"deleted {what}")


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
    say(f"{'learning rate':>14}  loss")
    for lr, loss in table(test):
        say(f"{lr:>14.3g}  {loss:.4g}")
    if test.diverges_at is not None:
        say(f"the loss diverges from {test.name} = {test.diverges_at:.3g}")
    else:
        say(f"the loss did not diverge up to {test.name} = {test.lrs[-1]:.3g}")
    if test.steepest is not None:
        say(f"steepest descent at {test.name} = {test.steepest:.3g}")
    suggestion = f"{test.name} = {{ low = {test.low:g}, high = {test.high:g}, log = true }}"
    if write:
        write_range(config.path, test.name, test.low, test.high)
        say(f"{config.path}: [search] {suggestion}")
    else:
        say(f"suggested: {suggestion}  (--write puts it into {config.path})")


def counts_line(data: dict[str, Any]) -> str:
    c = data["counts"]
    confirmations = data.get("confirmation_trials", 0)
    finished = c["complete"] + c["pruned"] - confirmations
    also = f" and {confirmations} confirmation trial(s)" if confirmations else ""
    return (
        f"study {data['study']!r}: {finished}/{data['n_trials']} finished{also} "
        f"({c['complete']} complete, {c['pruned']} pruned), {c['fail']} failed, "
        f"{c['running']} running, {c['waiting']} waiting"
    )


def print_best(data: dict[str, Any]) -> None:
    say(counts_line(data))
    overfit = data.get("overfit_trials") or []
    if overfit:
        numbers = ", ".join(map(str, overfit[:20])) + (" …" if len(overfit) > 20 else "")
        say(f"trials that overfit (metric peaked, then fell as the train loss fell): {numbers}")
    best_row = data["best"]
    if best_row is None:
        say("no trial has completed yet")
        return
    if "pareto" in data:
        print_front(data)
    first = "best" if "pareto" not in data else f"best {data['metric'][0]} on the front"
    say(
        f"{first}: trial {best_row['trial']}, {best_values(data, best_row)} "
        f"at step {best_row['step']} (epoch {best_row['epoch']})"
    )
    if best_row.get("confirmed"):
        say(f"  chosen by its mean over seeds: {confirmed_line(best_row['confirmed'])}")
    for name, value in {**best_row["fixed"], **best_row["params"]}.items():
        say(f"  {name} = {value!r}")
    metrics = ", ".join(f"{k}={v:.4f}" for k, v in best_row["metrics"].items())
    if metrics:
        say(f"  metrics: {metrics}")
    if best_row.get("gap"):
        gaps = ", ".join(f"{k} {v:+.4f}" for k, v in best_row["gap"].items())
        say(f"  train/val gap at its best validation: {gaps}")
    if best_row.get("overfit"):
        from sweeper.run.overfitting import describe

        metric = data["metric"][0] if "pareto" in data else data["metric"]
        say(f"  overfitting: {describe(best_row['overfit'], metric)}")
    if best_row.get("weights"):
        say(f"  weights: {best_row['weights']}")
    errors = best_row.get("confident_errors") or []
    if errors:
        say("  val examples it gets wrong most confidently (likely label errors):")
        for error in errors[:10]:
            say(
                f"    {error['where']}: {error['text']!r} labelled {error['label']!r}, "
                f"predicted {error['predicted']!r} ({error['confidence']:.2f})"
            )
    if data.get("confirmed"):
        say(
            f"confirmed configurations, best first ({data['metric']}, mean ± std; "
            "a configuration with diverged runs ranks below those without):"
        )
        for entry in data["confirmed"]:
            params = ", ".join(f"{k}={v!r}" for k, v in entry["params"].items())
            say(f"  trial {entry['trial']}: {confirmed_line(entry)}; {params}")


def best_values(data: dict[str, Any], best_row: dict[str, Any]) -> str:
    """``val_f1=0.8123``, or each metric's value in a study of several."""
    from sweeper.results.progress import describe_named, describe_value

    if "values" in best_row:
        return describe_named(best_row["values"])
    return describe_value(data["metric"], best_row["value"])


def print_front(data: dict[str, Any]) -> None:
    """The Pareto front of a study of several metrics: one line per trial, values and params."""
    from sweeper.results.progress import describe_named

    directions = ", ".join(
        f"{m} {d}" for m, d in zip(data["metric"], data["direction"], strict=True)
    )
    say(
        f"Pareto front ({directions}): {len(data['pareto'])} trial(s), "
        f"best {data['metric'][0]} first"
    )
    for entry in data["pareto"]:
        values = describe_named(entry["values"])
        params = ", ".join(f"{k}={v!r}" for k, v in entry["params"].items())
        say(f"  trial {entry['number']}: {values}; {params}")


def confirmed_line(entry: dict[str, Any]) -> str:
    """``0.8123 ± 0.0100 over 3 runs (trial 3 seed 1234: 0.8200, ...)``."""
    runs = ", ".join(
        f"trial {run['trial']} seed {run['seed']}: "
        + (f"{run['value']:.4f}" if run["value"] is not None else run["outcome"])
        for run in entry["runs"]
    )
    from sweeper.results.best import runs_counted

    return f"{entry['mean']:.4f} ± {entry['std']:.4f} over {runs_counted(entry)} ({runs})"
