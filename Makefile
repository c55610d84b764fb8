# Two commands on a fresh machine: `make demo` runs the main job, `make test` runs the test suite.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# A pinned torch: the CPU wheel where the package index serves one (the project's machines do; PyPI's Linux wheel
# bundles CUDA). Set TORCH_SPEC="torch>=2.4" (or your CUDA build) on a GPU machine.
TORCH_SPEC ?= torch==2.13.0

.PHONY: install test lint demo clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $@

lint: install
	$(BIN)/ruff check .

test: install lint
	$(BIN)/python -m pytest -q

demo: install
	$(BIN)/m2ist demo

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
