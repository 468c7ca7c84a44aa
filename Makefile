# Every target sets up first (scripts/setup.sh is idempotent and quick once done).
SHELL := /bin/bash
VENV := .venv
PYTEST_ARGS ?=

.PHONY: setup demo test test-fast lint

setup:
	bash scripts/setup.sh

demo: setup
	$(VENV)/bin/mdkv demo

# TRITON_INTERPRET=1 runs the Triton kernels on the CPU, so kernel tests run without a GPU.
test: export TRITON_INTERPRET := 1
test: setup
	$(VENV)/bin/python -m pytest -q -x --durations=15 $(PYTEST_ARGS)

# The inner loop: everything but the real-model (slow) tests and those that trace or compile through
# Dynamo or Inductor (compile: torch.compile, the ONNX export).
test-fast: export TRITON_INTERPRET := 1
test-fast: setup
	$(VENV)/bin/python -m pytest -q -x -m "not slow and not compile" --durations=10 $(PYTEST_ARGS)

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/lint-imports
