"""optuna-dashboard on the study's storage, and what sweeper shows in it.

The dashboard reads the same storage as running sweeps. On SQLite it opens
its own connections in WAL mode, where readers never block writers, so a
sweep does not fail because someone watches it.
"""

from __future__ import annotations

import errno
import ipaddress
import socket
import threading
from collections.abc import Callable
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer

import optuna

from sweeper.config import StudyConfig
from sweeper.errors import SweeperError
from sweeper.store import open_storage

LOOPBACK_NAMES = {"localhost", "ip6-localhost"}


def is_loopback(host: str) -> bool:
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def bind(host: str, port: int) -> WSGIServer:
    """A server bound to host and port (a free one for 0); a clear message when it cannot be."""
    if not 0 <= port <= 65535:
        raise DashboardError(f"--port: a port number from 0 to 65535, got {port}")
    server_class = _IPv6Server if ":" in host else _Server
    try:
        return server_class((host, port), _QuietHandler)
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            raise DashboardError(
                f"port {port} on {host} is in use; pick another with --port"
            ) from None
        if isinstance(exc, socket.gaierror):
            raise DashboardError(f"--host: cannot serve on {host!r}: {exc}") from None
        raise DashboardError(f"cannot serve on {host}:{port}: {exc.strerror}") from None
    except (OverflowError, UnicodeError) as exc:
        raise DashboardError(f"--host: cannot serve on {host!r}: {exc}") from None


class _Server(ThreadingMixIn, WSGIServer):
    """One thread per request, so a slow page does not hold up the others."""

    daemon_threads = True


class _IPv6Server(_Server):
    address_family = socket.AF_INET6


class _QuietHandler(WSGIRequestHandler):
    """No access log: the terminal keeps sweeper's own lines."""

    def log_message(self, format: str, *args: Any) -> None:
        pass


def address(host: str, port: int) -> str:
    """The dashboard's URL; an IPv6 address in brackets."""
    return f"http://[{host}]:{port}/" if ":" in host else f"http://{host}:{port}/"


class DashboardError(SweeperError):
    """The dashboard cannot be served as asked."""

    exit_code = 2


def serve(config: StudyConfig, host: str, port: int, warn: Callable[[str], None]) -> None:
    """Serve optuna-dashboard until interrupted.

    Requests are answered on other threads while this one only waits, so Ctrl-C
    or SIGTERM always lands here and stops the server, never inside a request
    (where wsgiref would take it for the request's own error and go on serving).
    """
    import optuna_dashboard

    server = bind(host, port)
    storage = open_storage(config.storage_url, writer=False)
    server.set_app(optuna_dashboard.wsgi(storage))
    if not is_loopback(host):
        warn(
            f"warning: serving on {host}, beyond this machine; the dashboard has no "
            "authentication, so anyone who can reach the port can read and change the study"
        )
    port = server.server_address[1]
    warn(f"dashboard of {config.study.name!r} on {address(host, port)} (Ctrl-C stops it)")
    serving = threading.Thread(target=server.serve_forever, name="dashboard", daemon=True)
    serving.start()
    try:
        serving.join()
    finally:
        server.shutdown()
        server.server_close()


def name_objective(config: StudyConfig, study: optuna.Study) -> None:
    """Name the objectives after the study's metrics: the dashboard shows them, not
    "Objective 0" (and, for several, plots its Pareto front with them)."""
    import warnings

    names = list(config.study.metrics)
    if study.metric_names != names:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            study.set_metric_names(names)


def publish(config: StudyConfig, study: optuna.Study) -> None:
    """Save sweeper's charts into the study, where optuna-dashboard shows them.

    The curves of accuracy, precision, recall and F1 of the best trial, and the
    learning curves of all trials coloured by outcome. Each has a fixed id, so
    publishing again replaces it.
    """
    import optuna_dashboard

    from sweeper.results.report import best_curves, learning_curves

    trials = study.get_trials(deepcopy=False)
    figures = {"sweeper-learning-curves": learning_curves(config, trials)}
    best = best_curves(config, study)
    if best is not None:
        figures["sweeper-best-metrics"] = best
    for graph_id, figure in figures.items():
        optuna_dashboard.save_plotly_graph_object(study, figure, graph_object_id=graph_id)
