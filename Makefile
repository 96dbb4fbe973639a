# The two commands the README promises:
#   make demo   set everything up (virtualenv in .venv) and run the main job
#   make test   set everything up and run lint, strict type checks and the test suite
# Everything installs into .venv; nothing outside the repository is touched.

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.edgeship-installed
# torch is pinned to the CPU build; an unpinned torch would pull a multi-GB CUDA build.
TORCH  ?= torch==2.13.0
LINTED := sdk device_agent collector tests benchmarks scripts

.PHONY: setup demo test lint typecheck pytest clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH)"
	$(BIN)/python -m pip install --quiet -e ".[all]"
	@touch $(STAMP)

demo: setup
	$(BIN)/edgeship demo

lint: setup
	$(BIN)/ruff check $(LINTED)
	$(BIN)/ruff format --check $(LINTED)

typecheck: setup
	$(BIN)/mypy

# Two workers, one test file each at a time (module fixtures built once): the suite takes about
# half the time of one process on a 2-core machine. PYTEST_WORKERS=0 runs it in one process.
PYTEST_WORKERS ?= 2

pytest: setup
	$(BIN)/python -m pytest -n $(PYTEST_WORKERS) --dist loadfile

test: lint typecheck pytest

clean:
	rm -rf $(VENV) demo-out .mypy_cache .ruff_cache .pytest_cache
