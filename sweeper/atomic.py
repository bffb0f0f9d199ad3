"""Write a file whole or not at all: a reader never sees half of it."""

from __future__ import annotations

import contextlib
import os
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from sweeper.errors import SweeperError


class OutputError(SweeperError):
    """A file sweeper was asked to write cannot be written there."""

    exit_code = 2


@contextlib.contextmanager
def replacing(path: Path, mode: str = "w") -> Iterator[IO[Any]]:
    """A file to write that replaces ``path`` (its folder made if missing) when closed.

    Each writer gets a temporary file of its own beside ``path``, so two
    writers of one file (two machines sharing a folder) never collide: the
    last rename wins, whole. On any error the temporary file is removed.
    A symlink is followed: its target is replaced, from beside the target. A
    FIFO or a device is not replaced but written in place.
    """
    encoding = None if "b" in mode else "utf-8"
    try:
        found = path.stat()
    except FileNotFoundError:
        found = None
    except OSError as exc:
        raise OutputError(f"cannot write {path}: {exc.strerror or exc}") from exc
    if found is not None and stat.S_ISDIR(found.st_mode):
        raise OutputError(f"{path}: is a folder; give a file name, e.g. {path / 'report.html'}")
    if found is not None and not stat.S_ISREG(found.st_mode):
        try:
            with open(path, mode, encoding=encoding) as file:
                yield file
        except OSError as exc:
            raise OutputError(f"cannot write {path}: {exc.strerror or exc}") from exc
        return
    target = Path(os.path.realpath(path)) if path.is_symlink() else path
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        handle, name = tempfile.mkstemp(
            prefix=f".{target.name}.", suffix=".partial", dir=target.parent
        )
    except OSError as exc:
        raise OutputError(f"cannot write {path}: {exc.strerror or exc}") from exc
    try:
        with open(handle, mode, encoding=encoding) as file:
            yield file
        os.chmod(name, 0o644)
        os.replace(name, target)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            os.unlink(name)
        if isinstance(exc, OSError):
            raise OutputError(f"cannot write {path}: {exc.strerror or exc}") from exc
        raise


def write_text(path: Path, text: str) -> Path:
    """Write ``text`` to ``path`` through a rename."""
    with replacing(path) as file:
        file.write(text)
    return path


def check_writable(folder: Path) -> None:
    """Fail now, with the reason, when files cannot be written into ``folder``.

    Nothing is left behind: a missing folder is not made, its nearest existing
    parent is tried instead.
    """
    existing = next((p for p in (folder, *folder.parents) if p.exists()), folder)
    if not existing.is_dir():
        raise OutputError(f"cannot write into {folder}: {existing} is a file, not a folder")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as exc:
        raise OutputError(f"cannot write into {folder}: {exc.strerror or exc}") from exc


def make_folder(folder: Path) -> Path:
    """``folder``, made with its parents; checked first, so a refusal makes nothing."""
    check_writable(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"cannot make the folder {folder}: {exc.strerror or exc}") from exc
    return folder
