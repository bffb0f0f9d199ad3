"""Commands that show a study: its report and the dashboard."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from sweeper.cli.common import (
    Debug,
    Night,
    StudyFile,
    app,
    handles_errors,
    say,
    study_config,
    warn,
)
from sweeper.config import load_config


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

    config = study_config(study_file, night)
    earlier: list[tuple[str, str]] = []
    if config.night is not None:
        from sweeper.nightly.night import earlier_reports

        earlier = earlier_reports(load_config(study_file), config.night)
    say(f"report written to {write_report(config, load(config, read_only=True), output, earlier)}")


@app.command()
@handles_errors
def dashboard(
    study_file: StudyFile,
    host: Annotated[str, typer.Option(help="Address to bind; loopback by default.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to serve on (0: a free one).")] = 8080,
    night: Night = None,
    debug: Debug = False,
) -> None:
    """Serve optuna-dashboard on the study's storage (Ctrl-C stops it)."""
    from sweeper.results.dashboard import serve
    from sweeper.store import load

    config = study_config(study_file, night)
    load(config, read_only=True)  # a clear error when there is no study yet
    serve(config, host, port, warn)
