# The two commands of the README: `make demo` and `make test`.
# Both create .venv when missing and (re)install the project when pyproject.toml changes.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# Downloads and DeepSpeed's compiled CPU op are cached outside the checkout so a second run is fast.
CACHE ?= $(HOME)/.cache/schedulefree-parity
export PIP_CACHE_DIR ?= $(HOME)/.cache/pip
export TORCH_EXTENSIONS_DIR ?= $(CACHE)/torch_extensions
export DS_ACCELERATOR ?= cpu
export PYTHONDONTWRITEBYTECODE := 1
# pytest-xdist workers; test files are kept whole on one worker (module fixtures run once).
TEST_WORKERS ?= 2
LINT_PATHS := sf_optax sf_torch sf_schedules parity examples bench tests

.PHONY: setup demo test lint clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch==2.13.0 resolves to the local CPU build here; the extra's range accepts it as installed.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[jax,torch,deepspeed,hf,trainers,dev]'
	touch $(STAMP)

lint: $(STAMP)
	$(PY) -m ruff check $(LINT_PATHS)
	$(PY) -m ruff format --check $(LINT_PATHS)

test: $(STAMP) lint
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile tests

demo: $(STAMP)
	$(PY) -m parity run

clean:
	rm -rf $(VENV)
