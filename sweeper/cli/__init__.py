"""The command line: parse, call one function, map errors to exit codes.

``common`` holds the app, the options and flags every command shares; each
other module adds the commands of one part of sweeper to the app.
"""

from __future__ import annotations

import importlib
from typing import Annotated

import typer

from sweeper.cli.common import app, flags

for _part in ("study", "views", "nightly"):  # each adds its commands, in the order of --help
    importlib.import_module(f"sweeper.cli.{_part}")


def _version(value: bool) -> None:
    if value:
        from sweeper import __version__

        typer.echo(f"sweeper {__version__}")
        raise typer.Exit()


@app.callback()
def main_options(
    debug: Annotated[
        bool, typer.Option("--debug", help="Show tracebacks (any command; also after it).")
    ] = False,
    as_json: Annotated[
        bool,
        typer.Option("--json", help="Print JSON, for the commands that have it (also after)."),
    ] = False,
    version: Annotated[
        bool,
        typer.Option("--version", callback=_version, is_eager=True, help="Print the version."),
    ] = False,
) -> None:
    """Hyperparameter sweeps for fine-tuning: one TOML file, every device busy."""
    flags.debug = debug
    flags.json = as_json


def main() -> None:
    app()


__all__ = ["app", "main"]
