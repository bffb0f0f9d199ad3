"""README.md and the documentation site (docs/): every example is valid and every link resolves.

A ```toml block titled with a file name (```toml title="study.toml") is a complete
study file, validated by sweeper's own parser. Any other ```toml block is a fragment
of one: each of its tables must be a section of the study file, and laid over a small
valid study it must validate too. A block may include a repository file through
pymdownx.snippets (``--8<-- "path"``), as the site does. The site itself is built
strictly by ``make docs`` (part of ``make test``).
"""

from __future__ import annotations

import importlib.util
import re
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from markdown.extensions.toc import slugify

from sweeper.config import StudyConfig, parse_config
from sweeper.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>`{3,}|~{3,})(?P<info>[^`]*)$")
CALL = re.compile(r"\bsweeper ((?:[a-z][a-z-]*(?:\\?\|[a-z-]+)*)(?: [a-z]+)?)(.*)")
"""``sweeper COMMAND [SUBCOMMAND] rest``; COMMAND may be ``best\\|status``, as in a table."""
SNIPPET = re.compile(r'^--8<-- "(?P<path>[^"]+)"$')
BASE: dict[str, Any] = {
    "study": {"name": "docs-example", "direction": "maximize", "metric": "val_acc", "n_trials": 4},
    "task": {"name": "digits_task:build"},
    "search": {"lr": {"low": 1e-4, "high": 1.0, "log": True}},
}
"""The valid study a fragment is laid over."""


@dataclass(frozen=True)
class Block:
    page: Path
    line: int
    lang: str
    title: str | None
    text: str

    @property
    def where(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"


def blocks(page: Path) -> Iterator[Block]:
    """The fenced code blocks of a page, indented ones (in lists) included."""
    lines = page.read_text(encoding="utf-8").splitlines()
    index = 0
    while index < len(lines):
        opening = FENCE.match(lines[index])
        index += 1
        if not opening:
            continue
        indent, fence, info = opening["indent"], opening["fence"], opening["info"].strip()
        body: list[str] = []
        while index < len(lines):
            line = lines[index]
            index += 1
            closing = line.strip()
            if closing.startswith(fence) and not closing.strip(fence[0]):
                break
            body.append(line.removeprefix(indent))
        title = re.search(r'title="([^"]+)"', info)
        yield Block(
            page,
            index - len(body) - 1,
            info.split()[0] if info.split() else "",
            title[1] if title else None,
            "\n".join(_included(body)) + "\n",
        )


def _included(body: list[str]) -> Iterator[str]:
    for line in body:
        snippet = SNIPPET.match(line.strip())
        if snippet:
            yield from (ROOT / snippet["path"]).read_text(encoding="utf-8").splitlines()
        else:
            yield line


def examples(*langs: str) -> list[Block]:
    return [block for page in PAGES for block in blocks(page) if block.lang in langs]


def sections() -> set[str]:
    from sweeper.config import INTERNAL

    return set(StudyConfig.model_fields) - set(INTERNAL)


def check_text_task(raw: dict[str, Any], where: str) -> None:
    """The built-in task's options and searchable parameters, by its own models."""
    from sweeper.tasks.text_classification import DEFAULTS, TextOptions

    task = raw.get("task", {})
    if task.get("name") != "text-classification":
        return
    if {"model", "train", "val"} <= set(task):
        TextOptions.model_validate(task)
    unknown = set(raw.get("search", {})) - set(DEFAULTS)
    assert not unknown, f"{where}: not parameters of text-classification: {unknown}"


@pytest.mark.parametrize("block", examples("toml"), ids=lambda block: block.where)
def test_toml_example_is_valid(block: Block) -> None:
    raw = tomllib.loads(block.text)
    where = block.where
    if block.title is not None:
        assert block.title.endswith(".toml"), f"{where}: a complete study file is titled *.toml"
        parse_config(raw, ROOT / "studies" / block.title)
        check_text_task(raw, where)
        return
    unknown = set(raw) - sections()
    assert not unknown, f"{where}: a fragment holds sections of the study file; not {unknown}"
    for name, table in raw.items():
        assert isinstance(table, dict), f"{where}: [{name}] is a table"
    merged = {name: dict(table) for name, table in BASE.items()}
    for name, table in raw.items():
        merged[name] = {**merged.get(name, {}), **table}
    try:
        parse_config(merged, ROOT / "studies" / "fragment.toml")
    except ConfigError as exc:
        pytest.fail(f"{where}: the fragment does not validate: {exc}")
    check_text_task(raw, where)


def test_a_fragment_that_breaks_the_rules_fails() -> None:
    """The check above is not vacuous: a bad key in a fragment is caught."""
    merged = {**BASE, "divergence": {"factor": 0.5}}
    with pytest.raises(ConfigError, match=r"divergence\.factor"):
        parse_config(merged, ROOT / "studies" / "fragment.toml")


@pytest.mark.parametrize("block", examples("python"), ids=lambda block: block.where)
def test_python_example_compiles(block: Block) -> None:
    compile(block.text, block.where, "exec")


def test_there_are_examples_of_both_kinds() -> None:
    toml = examples("toml")
    assert sum(block.title is not None for block in toml) >= 3
    assert sum(block.title is None for block in toml) >= 10


def test_readme_is_a_front_page() -> None:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    assert len(text.splitlines()) <= 160, "README stays a front page; the rest goes to docs/"
    first = next(blocks(ROOT / "README.md"))
    assert first.line <= 5, "README opens with the two commands"
    assert "make quickstart" in first.text
    assert "make test" in first.text


def anchors(page: Path) -> set[str]:
    """The ids of a page's headings, as MkDocs (toc, attr_list) makes them."""
    found = set()
    fenced = False
    for line in page.read_text(encoding="utf-8").splitlines():
        if FENCE.match(line):
            fenced = not fenced
        heading = re.match(r"^#{1,6} (.+?)\s*$", line)
        if fenced or not heading:
            continue
        explicit = re.search(r"\{\s*#([\w-]+)\s*\}$", heading[1])
        found.add(explicit[1] if explicit else slugify(heading[1].replace("`", ""), "-"))
    return found


@pytest.mark.parametrize("page", [ROOT / "README.md"], ids=["README.md"])
def test_relative_links_resolve(page: Path) -> None:
    """README is not part of the site, so its links are checked here (the site's by MkDocs)."""
    text = re.sub(r"```.*?```", "", page.read_text(encoding="utf-8"), flags=re.DOTALL)
    links = re.findall(r"\]\(([^)\s]+)\)", text)
    assert links, "README links into the docs"
    for link in links:
        if re.match(r"^[a-z]+:", link):
            continue
        target, _, anchor = link.partition("#")
        path = (page.parent / target).resolve() if target else page
        assert path.exists(), f"{page.name}: {link}: no such file"
        if anchor:
            assert anchor in anchors(path), f"{page.name}: {link}: no such heading"


@cache
def reference() -> ModuleType:
    """The MkDocs hook that generates the references."""
    path = ROOT / "docs" / "hooks" / "reference.py"
    spec = importlib.util.spec_from_file_location("docs_reference", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_study_file_reference_shows_every_section_and_key() -> None:
    from pydantic import BaseModel

    text = reference().study_file_reference()
    for name in sections():
        assert f"### `[{name}]`" in text
        annotation = StudyConfig.model_fields[name].annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            for key in annotation.model_fields:
                assert f"| `{key}` |" in text, f"[{name}] {key}"


def command_paths() -> Iterator[tuple[list[str], Any]]:
    module = reference()
    group = module._cli_command()
    root = module._context(group, "sweeper", None)
    yield ["sweeper"], group
    for path, command, _ in module._walk(group, root, ["sweeper"]):
        yield path, command


def test_the_command_reference_shows_every_command_and_option() -> None:
    text = reference().commands_reference()
    for path, command in command_paths():
        if len(path) > 1:
            assert f"### `{' '.join(path)}`" in text
        for parameter in command.params:
            if parameter.name != "help" and not getattr(parameter, "hidden", False):
                for option in parameter.opts:
                    if option.startswith("-"):
                        assert option in text, f"{' '.join(path)} {option}"


def test_flags_named_in_the_docs_exist() -> None:
    """`sweeper COMMAND ... --flag` in README and the docs names a flag COMMAND has."""
    known: dict[str, set[str]] = {}
    for path, command in command_paths():
        flags = {o for p in command.params for o in [*p.opts, *p.secondary_opts]}
        known[" ".join(path[1:])] = flags
    everywhere = known[""]
    spans = []
    for page in PAGES:
        text = page.read_text(encoding="utf-8")
        spans += re.findall(r"`([^`\n]+)`", text)
        spans += [b.text for b in blocks(page) if b.lang in {"sh", "text", ""}]
    checked = 0
    for span in spans:
        for line in span.splitlines():
            call = CALL.search(line)
            if call is None:
                continue
            line_flags = re.findall(r"(?<![\w-])(--[a-z][a-z-]*)", call[2].split("#")[0])
            words = call[1].split(" ")
            for name in re.split(r"\\?\|", words[0]):
                sub = f"{name} {words[1]}" if len(words) > 1 else name
                command = sub if sub in known else name
                if command not in known:
                    continue
                for flag in line_flags:
                    checked += 1
                    assert flag in known[command] | everywhere, f"sweeper {command}: no {flag}"
    assert checked >= 3, "the check found the flags of the examples"
