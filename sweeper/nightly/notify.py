"""POST a night's summary to a webhook: bounded in time, its token never shown."""

from __future__ import annotations

import contextlib
import http.client
import json
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Callable
from typing import Any

NOTIFY_ATTEMPTS = 3
NOTIFY_BACKOFF = 1.0
"""Seconds before the first retry of a failed webhook; doubled for each further retry."""
NOTIFY_TIMEOUT = 10.0
"""Seconds one webhook attempt may take in all: connecting, sending, reading the answer."""
NOTIFY_DEADLINE = 30.0
"""Seconds every attempt and every wait between them may take together: the lock is held."""


def notify(url: str, summary: dict[str, Any], emit: Callable[[str], None]) -> bool:
    """POST the summary as JSON; retried with back-off, never raises. True when delivered.

    Every attempt is bounded as a whole, and all of them together by
    NOTIFY_DEADLINE: a hook that answers a byte at a time cannot keep the night
    (and its lock) alive. The URL is shown without its path and query, which
    often carry a token.
    """
    body = json.dumps(summary).encode()
    shown = masked_url(url)
    deadline = time.monotonic() + NOTIFY_DEADLINE
    for attempt in range(1, NOTIFY_ATTEMPTS + 1):
        if attempt > 1:
            backoff = NOTIFY_BACKOFF * 2 ** (attempt - 2)
            time.sleep(max(0.0, min(backoff, deadline - time.monotonic())))
        limit = min(NOTIFY_TIMEOUT, deadline - time.monotonic())
        if limit < 1:
            break
        try:
            status = _post(url, body, limit)
        except (OSError, ValueError, http.client.HTTPException) as exc:
            reason = _scrub(str(getattr(exc, "reason", exc)), url)
            emit(f"notify {shown}: attempt {attempt} of {NOTIFY_ATTEMPTS} failed: {reason}")
        else:
            emit(f"notified {shown} (HTTP {status})")
            return True
    emit(f"notify {shown}: gave up; the night's result stands")
    return False


def _post(url: str, body: bytes, limit: float) -> int:
    """POST ``body``: the HTTP status, or the error; TimeoutError after ``limit`` s in all."""
    outcome: list[int | Exception] = []

    def send() -> None:
        request = urllib.request.Request(
            url, data=body, method="POST", headers={"Content-Type": "application/json"}
        )
        try:
            with urllib.request.urlopen(request, timeout=limit) as response:
                outcome.append(response.status)
        except Exception as exc:
            outcome.append(exc)

    # The socket timeout bounds each read, not the answer: the thread bounds it all.
    sender = threading.Thread(target=send, name="notify", daemon=True)
    sender.start()
    sender.join(limit)
    if not outcome:
        raise TimeoutError(f"no complete answer within {limit:.0f} s")
    if isinstance(outcome[0], Exception):
        raise outcome[0]
    return outcome[0]


def masked_url(url: str) -> str:
    """``scheme://host[:port]/...``: no credentials, no path, no query."""
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname or "?"
    if ":" in host:
        host = f"[{host}]"
    with contextlib.suppress(ValueError):
        if parts.port is not None:
            host += f":{parts.port}"
    hidden = parts.path not in {"", "/"} or parts.query or parts.fragment
    return f"{parts.scheme}://{host}/{'...' if hidden else ''}"


def _scrub(text: str, url: str) -> str:
    """An error message without the parts of ``url`` that ``masked_url`` hides."""
    parts = urllib.parse.urlsplit(url)
    hidden = [url, parts.path, parts.query, parts.fragment, parts.username, parts.password]
    for secret in sorted((h for h in hidden if h and len(h) > 1), key=len, reverse=True):
        text = text.replace(secret, "...")
    return text
