# The two Quickstart commands are `make demo` and `make test` (see README.md).
PYTHON ?= python3
PIP_INSTALL = $(PYTHON) -m pip install --quiet --disable-pip-version-check -c constraints.txt

.PHONY: install demo test lint typecheck

install:
	$(PIP_INSTALL) -e ".[dev]"

demo: install
	circuitscope demo

lint:
	ruff check .
	ruff format --check .

typecheck:
	mypy

test: install lint typecheck
	$(PYTHON) -m pytest -q
