# Two entry points: `make run` (the whole chain on the built-in default) and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: run test test-fast lint install clean

install: $(STAMP)

# torch goes in FIRST: the pinned CPU wheel, so pip never resolves the CUDA build.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

run: $(STAMP)
	$(VENV)/bin/rlhf run

test: lint
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-2} $(PY) -m pytest -q $(PYTEST_ARGS)

# The habits CI holds the code to (config in pyproject.toml): ruff's lint and format, mypy on the torch-free
# packages (stages/io, stages/objectives, the registry, flows).
lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

# The developer's inner loop: the unit tier only (pure tests, no training), under a minute.
test-fast: $(STAMP)
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-2} $(PY) -m pytest -q -m unit $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) .rlhf runs
