"""Write a file whole or not at all: a reader never sees half of it."""

from __future__ import annotations

import os
from pathlib import Path


def partial_path(path: Path) -> Path:
    """The hidden name a file is written under before it is renamed into place."""
    return path.with_name(f".{path.name}.partial")


def write_text(path: Path, text: str) -> Path:
    """Write ``text`` to ``path`` (its folder made if missing) through a rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = partial_path(path)
    partial.write_text(text, encoding="utf-8")
    os.replace(partial, path)
    return path
