"""Helpers shared by the Triton kernel modules: the optional triton import, sizes, the device's
SM count, the split-count policy, when a kernel can run, the `dot` every kernel uses, and
`register_kernel_op`, which turns a launch function and its PyTorch fallback into a torch op."""

from __future__ import annotations

import functools
import inspect
import json
import os
import subprocess
import sys
import types
import typing
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torch.library import triton_op, wrap_triton

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # the PyTorch references still work
    HAS_TRITON = False

LOG2E = 1.4426950408889634  # the kernels take logits in log2 units (exp2): scale * LOG2E


def next_pow2(x: int) -> int:
    return 1 << max(0, (int(x) - 1).bit_length())


@functools.cache
def _cuda_sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return _cuda_sm_count(device.index if device.index is not None else torch.cuda.current_device())
    return 4  # interpreter: a few splits exercise the merge without slowing CPU tests


def split_count(programs: int, rows: int, min_rows_per_split: int, programs_per_sm: int, max_splits: int,
                n_sm: int) -> int:
    """Slices to cut `rows` into for each of `programs` programs: about `programs_per_sm` programs per
    SM in all, at least `min_rows_per_split` rows per slice, at most `max_splits`, at least 1. From
    shapes only, so the count needs no device sync and (a runtime kernel argument) no recompile."""
    want = -(-programs_per_sm * n_sm // max(programs, 1))
    cap = rows // min_rows_per_split
    return int(max(1, min(want, cap, max_splits)))


def interpreting() -> bool:
    """Triton's CPU interpreter is on (read at launch, as the kernels' INTERP constexpr)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def call_uninterpreted(module: str, function: str, *args: Any) -> Any:
    """`module.function(*args)` in a child process without TRITON_INTERPRET, its result through JSON.
    Under the interpreter every @triton.jit function is replaced by one that cannot be compiled; a
    kernel compiled ahead of time (for a GPU this machine may not have) needs the real ones."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = (f"import json; from {module} import {function}; "
            f"print(json.dumps({function}(*json.loads({json.dumps(json.dumps(args))}))))")
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{module}.{function} failed in its child process:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def use_triton(q: Tensor) -> bool:
    return HAS_TRITON and (q.is_cuda or interpreting())


def identity(kernel):
    """The launch wrapper of direct (non-traced) calls; traced ops pass `wrap_triton` instead."""
    return kernel


def register_kernel_op(name: str, launch: Callable[..., Tensor]) -> Callable[[Callable[..., Tensor]], Callable]:
    """Decorator registering the torch op `name` ("mdkv::...") over Triton kernels; the decorated
    function is the op's PyTorch fallback. Returns the function that calls the op.

    * Schema: the fallback's signature (type hints, names, defaults), so the fallback takes exactly
      the op's arguments. Compiled and exported graphs name the op by it: keep it stable.
    * Implementation (`torch.library.triton_op`): where `use_triton` says the kernels can run (the
      first argument on CUDA, or the interpreter on), `launch(*args, wrap=wrap_triton)`, so Inductor
      sees the kernels themselves, not an opaque call (torch.export keeps the op as one node);
      elsewhere the fallback.
    * Fake / meta: triton_op registers the same implementation as the fake kernel: under
      FakeTensorMode the kernels go through `wrap_triton`, and the fallback traces as long as it has
      no data-dependent Python control flow (the references have none; a host count read from a
      device tensor cannot trace).
    * The returned function converts its arguments to the schema's Python types (`int`, `float`,
      `bool`, lists) before calling `torch.ops`, as a caller may pass a tuple of tiers or a numpy int.

    `launch` takes the op's arguments positionally plus the keyword `wrap`; called directly (with
    `identity`), it is the kernels' direct entry point for tests and benchmarks."""

    def register(fallback: Callable[..., Tensor]) -> Callable:
        hints = typing.get_type_hints(fallback)
        signature = inspect.signature(fallback)
        params = [p.replace(annotation=hints[p.name]) for p in signature.parameters.values()]

        def run(*args: Any) -> Tensor:
            if use_triton(args[0]):
                return launch(*args, wrap=wrap_triton)
            return fallback(*args)

        # the schema is inferred from this signature, with the hints resolved in the fallback's module
        run.__signature__ = signature.replace(parameters=params, return_annotation=hints["return"])
        triton_op(name, run, mutates_args=())
        namespace, op_name = name.split("::")
        op = getattr(getattr(torch.ops, namespace), op_name)
        names = [p.name for p in params]
        defaults = [p.default for p in params]
        converters = [_to_schema_type(p.annotation) for p in params]

        @functools.wraps(fallback)
        def call(*args: Any, **kwargs: Any) -> Tensor:
            values = list(args)
            for i in range(len(args), len(names)):
                values.append(kwargs.pop(names[i], defaults[i]))
            missing = [n for n, v in zip(names, values, strict=False) if v is inspect.Parameter.empty]
            if kwargs or missing or len(values) > len(names):
                raise TypeError(f"{name}{signature}: missing {missing}, unexpected keywords {sorted(kwargs)} "
                                f"or more than {len(names)} arguments")
            return op(*[convert(v) for convert, v in zip(converters, values, strict=True)])

        return call

    return register


def _same(value: Any) -> Any:
    return value


def _to_schema_type(hint: Any) -> Callable[[Any], Any]:
    """The conversion of an argument to the Python type of its schema entry (tensors pass as they are)."""
    if hint in (int, float, bool):
        return hint
    args = typing.get_args(hint)
    if typing.get_origin(hint) is list:
        item = _to_schema_type(args[0])
        return lambda value: [item(v) for v in value]
    if typing.get_origin(hint) in (types.UnionType, typing.Union) and type(None) in args:
        (inner,) = [a for a in args if a is not type(None)]
        convert = _to_schema_type(inner)
        return lambda value: None if value is None else convert(value)
    return _same


if HAS_TRITON:

    @triton.jit
    def dot(a, b, DOT_PREC: tl.constexpr, INTERP: tl.constexpr):
        """DOT_PREC: True = exact fp32 products ("ieee") for fp32 inputs; False = the default (tf32
        for fp32, irrelevant for 16-bit inputs). A bool, not a string, so Inductor's codegen of the
        wrapped kernel only sees plain constexprs."""
        if INTERP:
            # Triton 3.6's interpreter multiplies bf16 operands as raw 16-bit integers; fp32 operands
            # holding the same (already rounded) values give the product the GPU computes
            return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
        elif DOT_PREC:
            return tl.dot(a, b, input_precision="ieee")
        else:
            return tl.dot(a, b)
