"""What every command shares: consoles, options, global flags, errors to exit codes."""

from __future__ import annotations

import functools
import inspect
import signal
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console

from sweeper.errors import ConfigError, SweeperError, Terminated

out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)

EXIT_CODES = {
    0: "done (also: a sweep stopped by `sweeper stop`, a night already finished or running)",
    1: "the sweep failed at run time (trials failing, ended short, storage lost); "
    "a night with no completed trial",
    2: "bad input: study file, data, task, storage, devices or flags; nothing was written",
    3: "nightly: the night's best regressed beyond [schedule] tolerance",
    130: "interrupted (Ctrl-C); running trials are retried by the next start",
    143: "terminated (SIGTERM); as 130",
}
EXIT_CODES_HELP = "Exit codes:\n\n" + "\n\n".join(
    f"{code}: {meaning}" for code, meaning in EXIT_CODES.items()
)

app = typer.Typer(
    help="Hyperparameter sweeps for fine-tuning: one TOML file, every device busy.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    epilog=EXIT_CODES_HELP,
    rich_markup_mode=None,  # help text shows [study] and [schedule] as written
)
"""The ``sweeper`` command; each module of this package adds its commands to it."""
StudyFile = Annotated[Path, typer.Argument(help="The study file (study.toml).")]
Debug = Annotated[bool, typer.Option("--debug", help="Show tracebacks.")]
AsJson = Annotated[bool, typer.Option("--json", help="Print JSON (all of it).")]
Night = Annotated[
    str | None,
    typer.Option("--night", help="One night of `sweeper nightly` (YYYY-MM-DD), not the study."),
]
IgnoreAudit = Annotated[
    bool, typer.Option("--ignore-audit", help="Run even when the data audit finds errors.")
]
F = TypeVar("F", bound=Callable[..., Any])


@dataclass
class GlobalFlags:
    """``--debug`` and ``--json`` given before the command (``sweeper --json best ...``)."""

    debug: bool = False
    json: bool = False


flags = GlobalFlags()


def say(line: str) -> None:
    out.print(line, markup=False)


def warn(line: str) -> None:
    err.print(line, markup=False)


def handles_errors(command: F) -> F:
    """Apply the global flags; turn a SweeperError into one line on stderr and its exit code."""
    takes_json = "as_json" in inspect.signature(command).parameters

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        import optuna

        debug = bool(kwargs.get("debug")) or flags.debug
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        # SIGTERM (docker stop, Kubernetes, systemd) stops as Ctrl-C does; an
        # explicit handler also makes it reach sweeper when it runs as PID 1.
        previous = signal.signal(signal.SIGTERM, _terminate)
        try:
            if takes_json:
                kwargs["as_json"] = bool(kwargs["as_json"]) or flags.json
            elif flags.json:
                name = command.__name__.replace("schedule_", "schedule ").replace("_", "-")
                raise ConfigError(f"--json: `sweeper {name}` has no JSON output")
            return command(*args, **kwargs)
        except SweeperError as exc:
            if debug:
                raise
            warn(f"error: {exc}")
            raise typer.Exit(exc.exit_code) from None
        except optuna.exceptions.StorageInternalError as exc:
            from sweeper.store import storage_failure

            if debug:
                raise
            failure = storage_failure(exc)
            warn(f"error: {failure}")
            raise typer.Exit(failure.exit_code) from None
        except Terminated:
            warn("terminated")
            raise typer.Exit(Terminated.exit_code) from None
        except KeyboardInterrupt:
            warn("interrupted")
            raise typer.Exit(130) from None
        finally:
            signal.signal(signal.SIGTERM, previous)  # the command ran in-process (tests)

    return wrapper  # type: ignore[return-value]


def _terminate(signum: int, frame: object) -> None:
    raise Terminated


def renamed(old: str, new: str) -> Any:
    """A hidden option under a retired name that says which flag took its place."""

    def refuse(value: Any) -> Any:
        if value:
            raise typer.BadParameter(f"{old} is gone: use {new}", param_hint=old)
        return value

    return typer.Option(old, hidden=True, callback=refuse, expose_value=False, is_eager=True)


def night_date(text: str, flag: str = "--night") -> Any:
    """A night's date from the command line; a bad one names the flag."""
    import datetime as dt

    try:
        return dt.date.fromisoformat(text)
    except ValueError:
        raise ConfigError(f"{flag}: expected YYYY-MM-DD, got {text!r}") from None


def study_config(study_file: Path, night: str | None) -> Any:
    """The study file's config, or that of one of its nights."""
    from sweeper.config import load_config

    config = load_config(study_file)
    return config if night is None else config.for_night(night_date(night))


def print_json(data: Any) -> None:
    """All of ``data`` as JSON on stdout (dates and paths as strings)."""
    import json
    import sys

    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")


def wide_console() -> Console:
    """The terminal, or 100 columns when the output goes to a file or a pipe."""
    return out if out.is_terminal else Console(highlight=False, width=100)
