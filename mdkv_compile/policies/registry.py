"""The selection function of every method record (`mdkv_compile.methods`), and `select`, the one
entry point the eager cache and the compiled site ops call.

A record names its function as "module:function" of this package (the records sit on the config
floor, below the policies); it is resolved here once, at import.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch

from mdkv_compile.methods import RECORDS
from mdkv_compile.policies import eviction, mixeddim
from mdkv_compile.policies.base import LayerContext, Selection

Policy = Callable[[LayerContext], Selection]

_MODULES = {"eviction": eviction, "mixeddim": mixeddim}


def _resolve(spec: str) -> Policy:
    module, _, name = spec.partition(":")
    return getattr(_MODULES[module], name)


POLICIES: dict[str, Policy] = {name: _resolve(record.select) for name, record in RECORDS.items()}


@contextlib.contextmanager
def _tf32_matmuls(x: torch.Tensor) -> Iterator[None]:
    """On CUDA with a bf16/fp16 model, run the policy's float32 matmuls (second moments, basis
    projections, logit errors) on TF32 tensor cores: plain fp32 uses FFMA kernels, the largest
    cost of compression on an H200 (docs/notes/gpu_notes.md), and TF32's 10-bit mantissa is finer than
    the 7/10 bits the cache is stored with. The flag is process-wide, so it is restored at once."""
    if not (x.is_cuda and x.dtype in (torch.bfloat16, torch.float16)):
        yield
        return
    matmul = torch.backends.cuda.matmul
    # torch >= 2.9 names the setting fp32_precision; older versions allow_tf32
    name, value = ("fp32_precision", "tf32") if hasattr(matmul, "fp32_precision") else ("allow_tf32", True)
    saved = getattr(matmul, name)
    setattr(matmul, name, value)
    try:
        yield
    finally:
        setattr(matmul, name, saved)


def select(ctx: LayerContext) -> Selection:
    """Run the config's policy on one layer (the one entry point: eager cache and compiled ops)."""
    with _tf32_matmuls(ctx.key):
        return POLICIES[ctx.cfg.method](ctx)


