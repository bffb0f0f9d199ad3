"""Stopping a sweep from any shell or machine: a request kept on the study itself.

``sweeper stop`` writes the request; every worker reads it before it claims
a trial (so no new trial starts), and every ``sweeper start`` running the
study reads it between its checks (``now``: its running trials are failed
and enqueued again). The next ``sweeper start`` withdraws it and resumes.
"""

from __future__ import annotations

import datetime as dt
import socket
from dataclasses import dataclass
from typing import Any

import optuna

from sweeper.store.rows import study_user_attr

STOP_KEY = "stop_requested"
"""The study user attribute holding the request (None once withdrawn)."""


@dataclass(frozen=True)
class StopRequest:
    """Who asked a sweep to stop, when, and whether running trials end now."""

    at: str
    host: str
    now: bool

    def describe(self) -> str:
        how = "now" if self.now else "after its running trials"
        return f"stopped {how} by `sweeper stop` from {self.host} at {self.at}"


def request_stop(study: optuna.Study, now: bool) -> StopRequest:
    """Ask every sweep of the study to stop; ``now`` also ends its running trials."""
    request = StopRequest(
        at=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        host=socket.gethostname(),
        now=now,
    )
    study.set_user_attr(STOP_KEY, {"at": request.at, "host": request.host, "now": now})
    return request


def stop_request(study: optuna.Study) -> StopRequest | None:
    """The standing request to stop, if any (one read of the study's attributes)."""
    stored: Any = study_user_attr(study, STOP_KEY)
    if not isinstance(stored, dict):
        return None
    return StopRequest(
        at=str(stored.get("at", "")), host=str(stored.get("host", "")), now=bool(stored.get("now"))
    )


def withdraw_stop(study: optuna.Study) -> StopRequest | None:
    """Withdraw a standing request (a new ``sweeper start`` resumes); the one withdrawn."""
    request = stop_request(study)
    if request is not None:
        study.set_user_attr(STOP_KEY, None)
    return request
