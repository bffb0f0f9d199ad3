"""The storage boundary: only sweeper.store touches Optuna's storage and SQLAlchemy,
and only its compatibility module touches Optuna's private parts."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
STORE = ROOT / "sweeper" / "store"
COMPAT = STORE / "_compat.py"

PRIVATE_OPTUNA = {
    "_trial_id",
    "_study_id",
    "_storage",
    "_backend",
    "_get_trials",
    "_get_stale_trial_ids",
    "_sample_relative_impl",
}
"""The private Optuna attributes sweeper relies on (see sweeper/store/_compat.py)."""


def imported(tree: ast.AST) -> list[str]:
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.extend(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.append(node.module)
    return names


def sources(*folders: str) -> list[Path]:
    return sorted(p for folder in folders for p in (ROOT / folder).rglob("*.py"))


def test_only_the_store_imports_optunas_storage_and_sqlalchemy() -> None:
    leaks = [
        f"{path.relative_to(ROOT)} imports {name}"
        for path in sources("sweeper")
        if STORE not in path.parents
        for name in imported(ast.parse(path.read_text()))
        if name.split(".")[0] == "sqlalchemy" or name.startswith("optuna.storages")
    ]
    assert leaks == []


def test_private_optuna_is_reached_only_through_the_compatibility_module() -> None:
    leaks = []
    for path in sources("sweeper", "bench", "tests", "studies"):
        if path == COMPAT:
            continue
        tree = ast.parse(path.read_text())
        leaks += [
            f"{path.relative_to(ROOT)} imports {name}"
            for name in imported(tree)
            if name.startswith("optuna") and any(p.startswith("_") for p in name.split("."))
        ]
        for node in ast.walk(tree):
            name = getattr(node, "attr", None) or getattr(node, "name", None)
            if name in PRIVATE_OPTUNA and isinstance(node, ast.Attribute | ast.FunctionDef):
                leaks.append(f"{path.relative_to(ROOT)}:{node.lineno} uses {name}")
    assert leaks == []
