# The README's two commands: `make demo` and `make test`. Each sets up everything on a fresh machine first:
# a .venv, the CPU build of torch when there is no GPU, and tilefuse itself with its hf, plot, dev and zoo extras.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := .tilefuse-installed
# With no GPU, pin the CPU wheel: an unpinned torch would pull a CUDA build of several GB.
TORCH_CPU := torch==2.13.0
# mypy reaches the repository root as package `tilefuse` through a symlink (the root is the package).
MYPY_ROOT := build/mypy
MYPY_EXCLUDE := /tilefuse/(\.venv|build|tests|docs|tilefuse\.egg-info)(/|$$)

.PHONY: demo test lint typecheck unit setup clean

demo: $(STAMP)
	$(BIN)/tilefuse demo

test: lint typecheck unit

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports

typecheck: $(STAMP)
	mkdir -p $(MYPY_ROOT)
	ln -sfn "$(CURDIR)" $(MYPY_ROOT)/tilefuse
	MYPYPATH=$(MYPY_ROOT) $(BIN)/mypy --exclude '$(MYPY_EXCLUDE)' -p tilefuse

# pytest exits 5 when it collects no test; make treats that as a failure like any other non-zero exit.
unit: $(STAMP)
	$(BIN)/pytest -q tests

setup: $(STAMP)

$(VENV)/pyvenv.cfg:
	$(PYTHON) -m venv $(VENV)

$(STAMP): $(VENV)/pyvenv.cfg pyproject.toml
	if command -v nvidia-smi >/dev/null 2>&1; then \
		$(BIN)/python -m pip install --quiet 'torch>=2.11'; \
	else \
		$(BIN)/python -m pip install --quiet '$(TORCH_CPU)'; \
	fi
	$(BIN)/python -m pip install --quiet -e '.[hf,plot,dev,zoo]'
	touch $(STAMP)

clean:
	rm -rf build $(STAMP) .pytest_cache .mypy_cache .ruff_cache .import_linter_cache
