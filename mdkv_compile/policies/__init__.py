"""Compression policies by name: one interface (`LayerContext -> Selection`), one budget."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch

from mdkv_compile.policies import eviction, mixeddim
from mdkv_compile.policies.base import LayerContext, Selection

Policy = Callable[[LayerContext], Selection]

# pyramidkv and headkv are snapkv selection under other per-layer / per-head budgets, which
# `owner_budget` applies from the config's method and the head shares.
POLICIES: dict[str, Policy] = {
    "full": eviction.full,
    "streamingllm": eviction.streamingllm,
    "snapkv": eviction.snapkv,
    "pyramidkv": eviction.snapkv,
    "ada-snapkv": eviction.ada_snapkv,
    "headkv": eviction.snapkv,
    "lowrank": mixeddim.lowrank,
    "mixeddimkv": mixeddim.mixeddimkv,
    "mixeddimkv-h": mixeddim.mixeddimkv,
}



@contextlib.contextmanager
def _tf32_matmuls(x: torch.Tensor) -> Iterator[None]:
    """On CUDA with a bf16/fp16 model, run the policy's float32 matmuls (second moments, basis
    projections, logit errors) on TF32 tensor cores: plain fp32 uses FFMA kernels, the largest
    cost of compression on an H200 (docs/gpu_notes.md), and TF32's 10-bit mantissa is finer than
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


__all__ = ["POLICIES", "LayerContext", "Policy", "Selection", "select"]
