"""The pipe from a trial process to its worker: the trial's number (when the trial process
claimed it), then its outcome, a line each. Imports no torch: the storage benchmark uses it."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any

from optuna.trial import TrialState


def send(channel: int, line: str) -> None:
    """Write one line to the worker, whole."""
    data = line.encode() + b"\n"
    while data:
        data = data[os.write(channel, data) :]


def send_outcome(
    channel: int, state: TrialState, values: Sequence[float] | None, attrs: dict[str, Any]
) -> None:
    """Send how the trial ended: its state, values and attributes (what is not JSON, as text)."""
    values = None if values is None else list(values)
    send(channel, json.dumps({"state": state.name, "values": values, "attrs": attrs}, default=str))


def outcome(line: bytes) -> tuple[TrialState, list[float] | None, dict[str, Any]]:
    """The outcome a trial process sent: its state, values and attributes."""
    sent = json.loads(line)
    return TrialState[sent["state"]], sent["values"], sent["attrs"]
