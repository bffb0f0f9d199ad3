"""MkDocs hook: the study-file and command references, generated from the code at build time.

A page asks for a reference with a marker on a line of its own:

- ``<!-- generate: study-file -->``: every section of the study file, from the pydantic
  models of :mod:`sweeper.config` (keys, types, defaults, constraints, descriptions);
- ``<!-- generate: text-task -->``: the built-in text-classification task's options
  and searchable parameters, from its own models;
- ``<!-- generate: commands -->``: every command of the typer app the ``sweeper``
  script runs, with its help, arguments and options;
- ``<!-- generate: layout -->``: every module of the package with the first
  paragraph of its docstring.

Descriptions come from the code (``Field(description=...)``, the docstring under an
attribute, a field validator's docstring, a section's class docstring). ``notes.toml``
beside this file describes what the code does not describe yet, and is used only
then; a note for a key the code no longer has is a warning, which fails a strict
build. Keys described nowhere are listed at INFO level.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import logging
import re
import sys
import textwrap
import tomllib
import types
import typing
from collections.abc import Callable, Iterator
from functools import cache
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
NOTES = Path(__file__).with_name("notes.toml")
MARKER = re.compile(r"^<!-- generate: ([a-z-]+) -->$", re.MULTILINE)
log = logging.getLogger("mkdocs.plugins.sweeper")

# The package of this checkout, not an installed copy (an editable install may point
# at another checkout). Imported now: MkDocs restores sys.path once hooks are loaded.
if sys.path[:1] != [str(ROOT)]:
    sys.path.insert(0, str(ROOT))
importlib.import_module("sweeper")


def on_page_markdown(markdown: str, page: Any, **_: Any) -> str:
    """Replace each ``<!-- generate: NAME -->`` marker with its reference."""

    def generated(match: re.Match[str]) -> str:
        name = match[1]
        if name not in GENERATORS:
            raise ValueError(f"{page.file.src_uri}: unknown reference {name!r}")
        return GENERATORS[name]()

    return MARKER.sub(generated, markdown)


def on_post_build(**_: Any) -> None:
    """Report what has no description in the code, and notes that describe nothing."""
    sections, keys = _notes()
    known = set(_documented())
    for stale in sorted((set(sections) | set(keys)) - known):
        log.warning("docs/hooks/notes.toml: %s is no longer in the code; remove its note", stale)
    bare = [key for key, described in _documented().items() if not described]
    if bare:
        log.info("keys without a description in the code: %s", ", ".join(bare))
    superseded = sorted((set(sections) | set(keys)) & {k for k, d in _documented().items() if d})
    if superseded:
        log.info(
            "notes.toml: the code now describes %s; their notes are unused", ", ".join(superseded)
        )


# --- the study file ---------------------------------------------------------------------


def study_file_reference() -> str:
    """One section per top-level key of the study file, in the order of the model."""
    from sweeper import config

    internal = set(getattr(config, "INTERNAL", ()))
    out: list[str] = []
    for name, field in config.StudyConfig.model_fields.items():
        if name in internal:
            continue
        required = "required" if field.is_required() else "optional"
        out.append(f"### `[{name}]`\n\n*{required} section*\n")
        models = _models_of(field.annotation)
        described = _join(field.description, _attribute_docs(config.StudyConfig).get(name))
        if not models:  # a free-form table, such as [trainer] or [search]
            out.append(_paragraph(described or _note(name) or _type(field.annotation)))
            continue
        if len(models) == 1:
            out.append(_paragraph(_join(described, _class_doc(models[0])) or _note(name)))
            out.append(_model_table(models[0], name))
            continue
        out.append(_paragraph(described or _note(name)))
        out.append("One of these forms:\n")
        for model in models:  # a union of forms, such as one per backend
            out.append(f"#### {model.__name__}\n")
            out.append(_paragraph(_class_doc(model)))
            out.append(_model_table(model, name))
    return "\n".join(out)


def text_task_reference() -> str:
    """The text-classification task's ``[task]`` options and ``[search]`` parameters."""
    from sweeper.tasks import text_classification as text

    options = getattr(text, "TextOptions", None)
    params = getattr(text, "TextParams", None)
    out = []
    if options is not None:
        out += ['### `[task]` options of `"text-classification"`\n', _model_table(options, "task")]
    if params is not None:
        out += ["### Searchable parameters\n", _paragraph(_class_doc(params))]
        out.append(_model_table(params, "search", value_word="default"))
    return "\n".join(out)


def _model_table(model: Any, prefix: str, value_word: str = "default") -> str:
    rows = [f"| key | type | {value_word} | description |", "| --- | --- | --- | --- |"]
    attribute_docs = _attribute_docs(model)
    validators = _validator_docs(model)
    for key, field in model.model_fields.items():
        if prefix == "task" and key == "name" and model.__name__ != "TaskSection":
            continue  # the task's own models repeat `name`, documented with [task]
        default = "**required**" if field.is_required() else _default(field)
        described = _join(
            field.description, attribute_docs.get(key), validators.get(key)
        ) or _note(f"{prefix}.{key}")
        kind = _type(field.annotation, field.metadata)
        rows.append(f"| `{key}` | {kind} | {default} | {_cell(described)} |")
    if model.model_config.get("extra") == "allow":
        other = _note(f"{prefix}.*") or "allowed"
        rows.append(f"| *any other key* | | | {_cell(other)} |")
    return "\n".join(rows) + "\n"


def _models_of(annotation: Any) -> list[Any]:
    """The pydantic models an annotation allows: ``X``, ``X | None``, ``X | Y``."""
    from pydantic import BaseModel

    if typing.get_origin(annotation) is typing.Annotated:
        return _models_of(typing.get_args(annotation)[0])
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return [m for arg in typing.get_args(annotation) for m in _models_of(arg)]
    return []


def _model_of(annotation: Any) -> Any:
    """The one pydantic model of an annotation, else None."""
    models = _models_of(annotation)
    return models[0] if len(models) == 1 else None


def _type(annotation: Any, metadata: list[Any] | None = None) -> str:
    """A TOML reader's name for a type, with its constraints: ``integer > 0``."""
    text = _type_name(annotation)
    limits = _limits(metadata or [])
    return f"{text} ({limits})" if limits else text


def _type_name(annotation: Any) -> str:
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is typing.Annotated:
        return _type(args[0], [*args[1:], *_nested_metadata(args[1:])])
    if origin is typing.Literal:
        return " \\| ".join(f"`{_toml(value)}`" for value in args)
    if origin in (typing.Union, types.UnionType):
        shown = [_type_name(arg) for arg in args if arg is not type(None)]
        return " \\| ".join(shown) + (" or not set" if type(None) in args else "")
    if origin in (list, tuple, set) or annotation in (list, tuple, set):
        inner = f" of {_type_name(args[0])}" if args else ""
        return f"array{inner}"
    if origin is dict or annotation is dict:
        return "table"
    if _models_of(annotation):
        return "table"
    names = {bool: "boolean", int: "integer", float: "float", str: "string"}
    return names.get(annotation, getattr(annotation, "__name__", str(annotation)))


def _nested_metadata(items: tuple[Any, ...]) -> list[Any]:
    """Constraints of a ``Field(...)`` used inside ``Annotated``."""
    return [m for item in items for m in getattr(item, "metadata", [])]


def _limits(metadata: list[Any]) -> str:
    words = {
        "gt": "> {}",
        "ge": "≥ {}",
        "lt": "< {}",
        "le": "≤ {}",
        "min_length": "length ≥ {}",
        "max_length": "length ≤ {}",
        "multiple_of": "multiple of {}",
    }
    shown = []
    for item in metadata:
        for attribute, word in words.items():
            value = getattr(item, attribute, None)
            if value is not None and not isinstance(value, type):
                shown.append(word.format(_number(value)))
    return ", ".join(dict.fromkeys(shown))


def _number(value: Any) -> str:
    if isinstance(value, int) and value > 10**6 and (value + 1) & value == 0:
        return f"2^{(value + 1).bit_length() - 1} - 1"
    return str(value)


def _default(field: Any) -> str:
    from pydantic import BaseModel

    value = field.default_factory() if field.default_factory else field.default
    if isinstance(value, BaseModel):
        return "see below"
    if value is None:
        return "not set"
    return f"`{_toml(value)}`"


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return f'"{value}"'
    if isinstance(value, dict):
        return "{}" if not value else str(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml(item) for item in value) + "]"
    return str(value)


def _class_doc(model: Any) -> str | None:
    """The class's own docstring (not one inherited from BaseModel)."""
    doc = model.__dict__.get("__doc__")
    return inspect.cleandoc(doc) if doc else None


@cache
def _attribute_docs(model: Any) -> dict[str, str]:
    """The string literal under each annotated attribute of a class and its bases."""
    docs: dict[str, str] = {}
    for cls in reversed(model.__mro__):
        if cls.__module__ in {"builtins", "pydantic.main"} or cls.__module__.startswith(
            "pydantic."
        ):
            continue
        try:
            source = textwrap.dedent(inspect.getsource(cls))
        except (OSError, TypeError):
            continue
        body = ast.parse(source).body[0]
        if not isinstance(body, ast.ClassDef):
            continue
        for node, after in zip(body.body, body.body[1:], strict=False):
            if (
                isinstance(node, ast.AnnAssign)
                and isinstance(node.target, ast.Name)
                and isinstance(after, ast.Expr)
                and isinstance(after.value, ast.Constant)
                and isinstance(after.value.value, str)
            ):
                docs[node.target.id] = inspect.cleandoc(after.value.value)
    return docs


def _validator_docs(model: Any) -> dict[str, str]:
    """The first line of each field validator's docstring, by field."""
    docs: dict[str, str] = {}
    decorators = getattr(model, "__pydantic_decorators__", None)
    for decorator in getattr(decorators, "field_validators", {}).values():
        doc = inspect.getdoc(decorator.func)
        if doc:
            for name in decorator.info.fields:
                docs[name] = doc.splitlines()[0]
    return docs


@cache
def _notes() -> tuple[dict[str, str], dict[str, str]]:
    data = tomllib.loads(NOTES.read_text(encoding="utf-8")) if NOTES.exists() else {}
    return dict(data.get("sections", {})), dict(data.get("keys", {}))


def _note(key: str) -> str | None:
    sections, keys = _notes()
    return keys.get(key) if "." in key else sections.get(key)


@cache
def _documented() -> dict[str, bool]:
    """Every section and key the references show, and whether the code describes it."""
    from sweeper import config

    seen: dict[str, bool] = {}
    internal = set(getattr(config, "INTERNAL", ()))
    models: list[tuple[str, Any]] = []
    for name, field in config.StudyConfig.model_fields.items():
        if name in internal:
            continue
        forms = _models_of(field.annotation)
        own = _join(field.description, _attribute_docs(config.StudyConfig).get(name))
        seen[name] = bool(own or (len(forms) == 1 and _class_doc(forms[0])))
        for model in forms:
            models.append((name, model))
            if model.model_config.get("extra") == "allow":
                seen[f"{name}.*"] = False
    try:
        from sweeper.tasks import text_classification as text

        models += [("task", getattr(text, "TextOptions", None)), ("search", text.TextParams)]
    except (ImportError, AttributeError):
        pass
    for prefix, model in models:
        if model is None:
            continue
        docs = {**_attribute_docs(model), **_validator_docs(model)}
        for key, field in model.model_fields.items():
            seen.setdefault(f"{prefix}.{key}", False)
            if field.description or key in docs:
                seen[f"{prefix}.{key}"] = True
    return seen


# --- the command line -------------------------------------------------------------------


def commands_reference() -> str:
    """Every command of the ``sweeper`` script: usage, help, arguments and options."""
    command = _cli_command()
    root = _context(command, "sweeper", None)
    out = [_paragraph(_help_text(command))]
    options = _parameter_table(command, root, skip_help=True)
    if options:
        out += ["### Options of `sweeper`\n", options]
    for path, sub, context in _walk(command, root, ["sweeper"]):
        out.append(f"### `{' '.join(path)}`\n")
        out.append(f"```text\n{_usage(sub, context)}\n```\n")
        out.append(_paragraph(_help_text(sub)))
        table = _parameter_table(sub, context, skip_help=True)
        if table:
            out.append(table)
    return "\n".join(out)


def _cli_command() -> Any:
    """The click command behind the ``sweeper`` script named in pyproject.toml."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    target = project["project"]["scripts"]["sweeper"]
    module_name, _, attribute = target.partition(":")
    app: Any = importlib.import_module(module_name)
    for part in attribute.split("."):
        app = getattr(app, part)
    if hasattr(app, "registered_commands"):  # a typer.Typer
        import typer.main

        return typer.main.get_command(app)
    return app


def _context(command: Any, name: str, parent: Any) -> Any:
    return command.context_class(command, info_name=name, parent=parent)


def _walk(command: Any, context: Any, path: list[str]) -> Iterator[tuple[list[str], Any, Any]]:
    """Each visible command below ``command``, depth first, groups before their commands."""
    for name in sorted(getattr(command, "commands", {})):
        sub = command.get_command(context, name)
        if sub is None or getattr(sub, "hidden", False):
            continue
        sub_context = _context(sub, name, context)
        yield [*path, name], sub, sub_context
        yield from _walk(sub, sub_context, [*path, name])


def _usage(command: Any, context: Any) -> str:
    usage = " ".join(command.get_usage(context).split())
    return usage.removeprefix("Usage:").strip()


def _help_text(command: Any) -> str:
    text = inspect.cleandoc(command.help or "")
    epilog = inspect.cleandoc(getattr(command, "epilog", None) or "")
    kept = [part.replace("\b\n", "") for part in (text, epilog) if part]
    return "\n\n".join(kept)


def _parameter_table(command: Any, context: Any, *, skip_help: bool) -> str:
    rows = []
    for parameter in command.get_params(context):
        if getattr(parameter, "hidden", False):
            continue
        if skip_help and parameter.name == "help":
            continue
        record = parameter.get_help_record(context)
        if record is None:  # click shows no help line for an argument
            record = (parameter.human_readable_name, "")
        declared, described = record
        kind = "argument" if parameter.param_type_name == "argument" else "option"
        rows.append(f"| `{declared}` | {kind} | {_cell(described)} |")
    if not rows:
        return ""
    return "\n".join(["| name | kind | help |", "| --- | --- | --- |", *rows]) + "\n"


# --- the package layout -----------------------------------------------------------------


def layout_reference() -> str:
    """Each package and module of ``sweeper/`` with the first line of its docstring."""
    package = ROOT / "sweeper"
    rows = ["| module | what it is |", "| --- | --- |"]
    for path in sorted(package.rglob("*.py")):
        if "__pycache__" in path.parts:
            continue
        relative = path.relative_to(ROOT)
        shown = relative.parent if path.name == "__init__.py" else relative
        name = f"{shown.as_posix()}/" if path.name == "__init__.py" else shown.as_posix()
        try:
            doc = ast.get_docstring(ast.parse(path.read_text(encoding="utf-8")))
        except (SyntaxError, UnicodeDecodeError):  # a file being edited
            doc = None
        first = doc.strip().split("\n\n")[0] if doc else ""
        rows.append(f"| `{name}` | {_cell(first)} |")
    return "\n".join(rows) + "\n"


# --- markdown ---------------------------------------------------------------------------


def _join(*parts: str | None) -> str | None:
    kept = [part.strip() for part in parts if part and part.strip()]
    return " ".join(kept) if kept else None


def _prose(text: str, *, in_table: bool = False) -> str:
    """Sphinx roles to code spans; outside code spans ``<`` and ``>`` (and ``|`` in a table)
    escaped."""
    text = re.sub(r":[a-z]+:`~?([^`]+)`", r"`\1`", text)
    text = text.replace("``", "`")
    escapes = {"<": "&lt;", ">": "&gt;", **({"|": "\\|"} if in_table else {})}
    pieces = re.split(r"(`[^`]*`)", text)
    return "".join(
        piece
        if piece.startswith("`")
        else re.sub("[<>|]", lambda m: escapes.get(m[0], m[0]), piece)
        for piece in pieces
    )


def _paragraph(text: str | None) -> str:
    return _prose(text) + "\n" if text else ""


def _cell(text: str | None) -> str:
    return _prose(" ".join(text.split()), in_table=True) if text else ""


GENERATORS: dict[str, Callable[[], str]] = {
    "study-file": study_file_reference,
    "text-task": text_task_reference,
    "commands": commands_reference,
    "layout": layout_reference,
}
