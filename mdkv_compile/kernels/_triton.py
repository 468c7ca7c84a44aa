"""Helpers shared by the Triton kernel modules: the optional triton import, sizes, the device's
SM count, when a kernel can run, and the `dot` every kernel uses."""

from __future__ import annotations

import functools
import os

import torch
from torch import Tensor

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # the PyTorch references still work
    HAS_TRITON = False


def next_pow2(x: int) -> int:
    return 1 << max(0, (int(x) - 1).bit_length())


@functools.cache
def _cuda_sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return _cuda_sm_count(device.index if device.index is not None else torch.cuda.current_device())
    return 4  # interpreter: a few splits exercise the merge without slowing CPU tests


def use_triton(q: Tensor) -> bool:
    return HAS_TRITON and (q.is_cuda or os.environ.get("TRITON_INTERPRET") == "1")


def identity(kernel):
    """The launch wrapper of direct (non-traced) calls; traced ops pass `wrap_triton` instead."""
    return kernel


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
