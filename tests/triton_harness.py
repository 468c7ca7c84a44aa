"""Set-up shared by the Triton kernel test modules (test_triton_attention, test_triton_compress).

Kernels are compiled on a GPU and run by Triton's CPU interpreter elsewhere. The interpreter must be
chosen before triton is imported anywhere in the process (conftest sets TRITON_INTERPRET=1 when
there is no GPU); `triton.jit` reads the variable when a kernel is defined. In a full-suite run
another module may have imported triton first: the kernels are then not interpreted in this
process, so the module's tests skip and one test reruns the module in a fresh process.

    DEVICE = kernel_device()  # skips the whole module where the kernels cannot run
    STALE, _needs_interpreter, test_module_in_fresh_process = interpreter_guard(__file__, kernels)
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable

import pytest
import torch


def kernel_device() -> str:
    """"cuda" with a GPU, "cpu" under the interpreter; skips the calling module otherwise."""
    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed", allow_module_level=True)
    if os.environ.get("TRITON_INTERPRET") == "1":
        return "cpu"
    if not torch.cuda.is_available():
        pytest.skip("TRITON_INTERPRET was set to something else before this module, and no GPU",
                    allow_module_level=True)
    return "cuda"


def interpreter_guard(module_file: str, kernels: Callable[[], list]) -> tuple[bool, Callable, Callable]:
    """(stale, autouse fixture, fresh-process test) for a kernel test module. `kernels()` returns
    some of the module's `triton.jit` functions; they, and triton's own jitted standard library
    (imported with triton, possibly before the variable was set), must be interpreted when the
    device is the CPU."""

    def interpreted() -> bool:
        import triton.language as tl

        return all(type(f).__name__ == "InterpretedFunction" for f in (tl.standard.max, *kernels()))

    stale = kernel_device() == "cpu" and not interpreted()

    @pytest.fixture(autouse=True)
    def _needs_interpreter(request: pytest.FixtureRequest) -> None:
        if stale and request.node.name != "test_module_in_fresh_process":
            pytest.skip("triton was imported before TRITON_INTERPRET=1 in this process: "
                        "test_module_in_fresh_process runs these tests in a new one")

    def test_module_in_fresh_process() -> None:
        """When another test module imported triton first (full-suite runs), run this module in a new
        process where TRITON_INTERPRET=1 is set before triton loads; otherwise nothing to do."""
        if not stale:
            pytest.skip("this process already runs the kernels in Triton's interpreter or on a GPU")
        import subprocess
        import sys

        env = {**os.environ, "TRITON_INTERPRET": "1"}
        res = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", module_file],
                             env=env, capture_output=True, text=True, timeout=600)
        assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-2000:]

    return stale, _needs_interpreter, test_module_in_fresh_process
