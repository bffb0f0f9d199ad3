"""``nightly.lock``: one ``sweeper nightly`` of a study at a time; a gone holder is replaced."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from sweeper.errors import SweeperError
from sweeper.store import process_start


class NightLock:
    """``nightly.lock``: an flock that one ``sweeper nightly`` of a study holds at a time.

    The holder writes its pid, its process's start time and its host into the
    file. When the flock is held but that process is gone from this host (a
    child forked from it can keep the flock alive), the lock is taken over.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None

    def acquire(self, emit: Callable[[str], None]) -> dict[str, Any] | None:
        """None once held; otherwise the holder's record (empty when it left none)."""
        try:
            with _gate(self.path.parent):
                holder = self._try()
                if holder is not None and _gone(holder):
                    # Whatever still holds the old file keeps it; nothing reads it again.
                    os.unlink(self.path)
                    emit(
                        f"took over {self.path}: its holder, process {holder['pid']} on "
                        f"{holder['host']}, is gone"
                    )
                    holder = self._try()
                return holder
        except OSError as exc:
            raise SweeperError(f"cannot lock {self.path}: {exc.strerror or exc}") from exc

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # the record stays: it names the last holder
            self._fd = None

    def discard(self) -> None:
        """Release the lock, and remove its file and folder when nothing else is in it."""
        try:
            with _gate(self.path.parent):
                self.release()
                if [p.name for p in self.path.parent.iterdir()] == [self.path.name]:
                    os.unlink(self.path)
                    os.rmdir(self.path.parent)
        except OSError:
            pass  # what is left names the last holder, as after any night

    def _try(self) -> dict[str, Any] | None:
        """Take the flock and write this process's record (None), or read the holder's."""
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            os.ftruncate(fd, 0)
            os.pwrite(fd, (json.dumps(_this_process()) + "\n").encode(), 0)
        except BlockingIOError:
            holder = _holder(fd)
            os.close(fd)
            return holder
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        return None


@contextlib.contextmanager
def _gate(folder: Path) -> Iterator[None]:
    """One nightly at a time takes or takes over the lock: a brief flock on its folder."""
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _this_process() -> dict[str, Any]:
    pid = os.getpid()
    return {
        "pid": pid,
        "start": process_start(pid),
        "host": socket.gethostname(),
        "pid_namespace": _pid_namespace(),
    }


def _pid_namespace() -> str | None:
    """Containers sharing a host name and a folder still see different pids."""
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return None


def _holder(fd: int) -> dict[str, Any]:
    try:
        record = json.loads(os.pread(fd, 4096, 0) or b"{}")
    except (OSError, ValueError):
        return {}
    if not isinstance(record, dict) or not isinstance(record.get("pid"), int):
        return {}
    return record


def _gone(holder: dict[str, Any]) -> bool:
    """Whether the process in ``holder`` has ended (only known for one whose pids we see)."""
    if not holder or holder["pid"] <= 0:
        return False
    if (holder.get("host"), holder.get("pid_namespace")) != (
        socket.gethostname(),
        _pid_namespace(),
    ):
        return False
    start = process_start(holder["pid"])
    if start is not None:  # a pid in use again is another process
        return holder.get("start") is not None and start != holder["start"]
    try:
        os.kill(holder["pid"], 0)
    except ProcessLookupError:
        return True
    except OSError:
        return False
    return False
