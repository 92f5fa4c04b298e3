# Every target bootstraps its own virtualenv, so a fresh clone needs only Python 3.11.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: run test lint bench dist clean

$(STAMP): pyproject.toml setup.py pipeline/marketdata/_ticks.c pipeline/ipc/_futex.c \
		pipeline/binance/_sbe.c
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test,dev,postgres]'
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/pipeline run $(ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/mypy

test: lint
	$(BIN)/python -m pytest $(PYTEST_ARGS)

bench: $(STAMP)
	$(BIN)/python -m pip install --quiet -e '.[test,dev,postgres,bench,peers]'
	$(BIN)/python -m pytest benchmarks -p no:randomly --benchmark-only --benchmark-columns=min,median,mean,ops,rounds $(PYTEST_ARGS)

# An sdist and a wheel in dist/. The wheel carries the compiled fast path (_ticks.c); built from
# the sdist, so a missing source file fails here rather than on a user's machine. Without a C
# compiler the package still builds without the extension (ingest then runs the Python path), but
# `make dist` refuses to call that a release wheel.
dist: $(STAMP)
	rm -rf dist
	$(BIN)/python -m build --no-isolation --outdir dist .
	$(BIN)/python -m zipfile -l dist/*.whl | grep 'pipeline/marketdata/_ticks\..*\.so' >/dev/null \
	    || { echo "dist: the wheel has no compiled fast path (no C compiler?)" >&2; exit 1; }
	$(BIN)/python -m zipfile -l dist/*.whl | grep 'pipeline/ipc/_futex\..*\.so' >/dev/null \
	    || { echo "dist: the wheel has no futex wake-ups (no C compiler?)" >&2; exit 1; }
	$(BIN)/python -m zipfile -l dist/*.whl | grep 'pipeline/binance/_sbe\..*\.so' >/dev/null \
	    || { echo "dist: the wheel has no compiled SBE decoder (no C compiler?)" >&2; exit 1; }

clean:
	rm -rf $(VENV) build dist *.egg-info
