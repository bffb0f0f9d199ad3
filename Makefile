# Two entry points, both safe on a fresh machine:
#   make quickstart   install into .venv, then run the quickstart study
#   make test         install into .venv, then lint, type-check, build the docs and test
#   make docs         build the documentation site strictly into site/
# TORCH picks the PyTorch build; the default is the CPU build of 2.13.0.
# On a GPU machine: make quickstart TORCH="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH ?= torch==2.13.0
QUICKSTART ?= studies/quickstart.toml
# Test workers (pytest-xdist), a test file to each: most tests wait on real sweeps
# in other processes, so two workers halve the suite's time even on two cores.
TEST_WORKERS ?= 2

.PHONY: install quickstart test lint browser docs

$(BIN)/sweeper: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet $(TORCH)
	$(BIN)/pip install --quiet -e '.[dev,demo]'
	touch $@

install: $(BIN)/sweeper

quickstart: install
	$(BIN)/sweeper start $(QUICKSTART)

lint: install
	$(BIN)/ruff check sweeper tests bench studies docs/hooks
	$(BIN)/ruff format --check sweeper tests bench studies docs/hooks
	$(BIN)/mypy
	$(BIN)/mypy docs/hooks

# The documentation site (mkdocs.yml, docs/): strict, so a broken link, a missing
# anchor or any warning fails; the references are generated from the code.
docs: install
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict

# Page tests drive Debian's Chromium through Playwright (its own browser
# download is not used), the terminal test runs in tmux; installing needs root.
browser:
	@command -v chromium >/dev/null && command -v tmux >/dev/null || { apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium tmux >/dev/null; }

test: lint browser docs
	$(BIN)/pytest -n $(TEST_WORKERS) --dist loadfile
