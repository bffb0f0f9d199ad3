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
    "_cached_frozen_trial",
    "_get_best_trial_id",
    "_version_manager",
    "_fill_storage_url_template",
    "_set_default_engine_kwargs_for_mysql",
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


def test_the_read_commands_never_import_torch(tmp_path: Path) -> None:
    """status, best, trials and history answer in well under a second: no torch, no
    Lightning (a fresh Python, as a user runs them)."""
    import subprocess
    import sys

    from sweeper.config import load_config
    from sweeper.store import create_or_resume
    from tests.conftest import study, toml_text

    path = tmp_path / "study.toml"
    path.write_text(toml_text(study()))
    create_or_resume(load_config(path))
    script = f"""
import sys
from typer.testing import CliRunner
from sweeper.cli import app
study = {str(path)!r}
for command in (["status", study], ["best", study], ["trials", study], ["history", study]):
    result = CliRunner().invoke(app, command)
    assert result.exception is None or isinstance(result.exception, SystemExit), command
assert CliRunner().invoke(app, ["--help"]).exit_code == 0
heavy = sorted(m for m in ("torch", "lightning", "transformers", "plotly") if m in sys.modules)
print(heavy)
"""
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
