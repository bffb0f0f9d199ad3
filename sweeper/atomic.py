"""Write a file whole or not at all: a reader never sees half of it."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any


@contextlib.contextmanager
def replacing(path: Path, mode: str = "w") -> Iterator[IO[Any]]:
    """A file to write that replaces ``path`` (its folder made if missing) when closed.

    Each writer gets a temporary file of its own beside ``path``, so two
    writers of one file (two machines sharing a folder) never collide: the
    last rename wins, whole. On any error the temporary file is removed.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
    try:
        encoding = None if "b" in mode else "utf-8"
        with open(handle, mode, encoding=encoding) as file:
            yield file
        os.chmod(name, 0o644)
        os.replace(name, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(name)
        raise


def write_text(path: Path, text: str) -> Path:
    """Write ``text`` to ``path`` through a rename."""
    with replacing(path) as file:
        file.write(text)
    return path
