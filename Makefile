# Two commands do all the set-up on a fresh clone (see README):
#   make pretrain   # .venv + install + pretrain the tiny RoFormer on the built-in corpus
#   make test       # .venv + install with test extras + pytest (slow tests excluded)
#   make lint       # ruff check + ruff format --check (configured in pyproject.toml)
# Both are idempotent: the install re-runs only when setup.cfg changes.

SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
CONFIG ?= launch/configs/roformer.py:tiny
WORKDIR ?= runs/roformer_tiny
ARGS ?=
PYTEST_ARGS ?=
# pytest-xdist workers of `make test` (0: in this process, one test at a time).
TEST_WORKERS ?= 2
# jax >= 0.11 and flax >= 0.12.9 need Python >= 3.12: prefer 3.12, then the newest >= 3.11.
PYTHON ?= $(shell for v in 3.12 3.14 3.13 3.11; do \
	  for p in python$$v $$HOME/.pyenv/versions/$$v*/bin/python$$v /usr/local/bin/python$$v /usr/bin/python$$v; do \
	    if command -v $$p >/dev/null 2>&1 && $$p -c 'import sys, venv; assert sys.version_info >= (3, 11)' 2>/dev/null; then echo $$p; exit 0; fi; \
	  done; done)
export JAX_COMPILATION_CACHE_DIR ?= $(CURDIR)/.cache/jax
export PYTHONDONTWRITEBYTECODE := 1

.PHONY: pretrain test test-slow lint venv clean

$(VENV)/.created:
	@if [ -z "$(PYTHON)" ]; then echo "error: no Python >= 3.11 found; install python3.12 (e.g. pyenv install 3.12) and re-run, or pass PYTHON=/path/to/python3.12" >&2; exit 2; fi
	@echo "creating $(VENV) with $(PYTHON) ($$($(PYTHON) --version))"
	$(PYTHON) -m venv $(VENV)
	touch $@

$(VENV)/.installed: $(VENV)/.created setup.cfg pyproject.toml
	$(PY) -m pip install -q -e '.[test]'
	touch $@

venv: $(VENV)/.installed

pretrain: $(VENV)/.installed
	$(PY) -m launch.pretrain --config=$(CONFIG) --workdir=$(WORKDIR) $(ARGS)

test: $(VENV)/.installed
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadgroup --no-loadscope-reorder --durations=20 $(PYTEST_ARGS)

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

test-slow: $(VENV)/.installed
	$(PY) -m pytest -q -m slow $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) .cache runs
