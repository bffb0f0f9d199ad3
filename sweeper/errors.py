"""The one family of errors sweeper raises; the CLI maps them to exit codes."""

from __future__ import annotations


class SweeperError(Exception):
    """An error with a message a user can act on.

    ``exit_code`` is 2 for bad input (the user must change something before
    running again) and 1 for a failure at run time.
    """

    exit_code = 1


class ConfigError(SweeperError):
    """The study file is missing, malformed or inconsistent."""

    exit_code = 2


class DataError(SweeperError):
    """The task's data cannot be used as it is."""

    exit_code = 2


class TaskError(SweeperError):
    """The task cannot be loaded or does not keep the task contract."""

    exit_code = 2


class StorageError(SweeperError):
    """The study storage cannot be reached or holds a different study."""

    exit_code = 2


class DeviceError(SweeperError):
    """The requested devices do not exist on this machine."""

    exit_code = 2


class SweepFailed(SweeperError):
    """The sweep stopped because trials fail systematically."""

    exit_code = 1


class Terminated(KeyboardInterrupt):
    """SIGTERM arrived (Docker, Kubernetes, systemd): stop as Ctrl-C does, exit 143."""

    exit_code = 143
