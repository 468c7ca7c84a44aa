# Every target sets up first (scripts/setup.sh is idempotent and quick once done).
SHELL := /bin/bash
VENV := .venv
PYTEST_ARGS ?=

.PHONY: setup demo test lint

setup:
	bash scripts/setup.sh

demo: setup
	$(VENV)/bin/mdkv demo

# TRITON_INTERPRET=1 runs the Triton kernels on the CPU, so kernel tests run without a GPU.
test: export TRITON_INTERPRET := 1
test: setup
	$(VENV)/bin/python -m pytest -q -x --durations=15 $(PYTEST_ARGS)

lint: setup
	$(VENV)/bin/ruff check .
