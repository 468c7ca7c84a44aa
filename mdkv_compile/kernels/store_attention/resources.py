"""What one program of the store kernel holds on an NVIDIA GPU, found on any machine: the kernel
compiled ahead of time for the target with Triton's own ptxas (in the triton wheel), then the cubin's
registers and stack per thread (a stack means spills) read back with its cuobjdump, and the shared
memory from Triton's metadata. A kernel change can be checked for spills without a GPU
(tests/test_kernel_resources.py); on an H100 the bench's ``kernels`` rows reported the same numbers for
the same variants (docs/notes/kernel_notes.md, "v4").

The variant is the one a launch would compile: constexprs and options come from launch.py, for a plan
made over meta tensors of the given tier widths. Pointer and stride arguments are taken as 16-byte
aligned (what Triton specialises a launch on for contiguous tensors of these shapes)."""

from __future__ import annotations

import inspect
import os
import re
import subprocess
import tempfile
from typing import Any

import torch

from mdkv_compile.kernels._triton import call_uninterpreted, interpreting
from mdkv_compile.kernels.store_attention import jit
from mdkv_compile.kernels.store_attention.launch import kernel_constexprs, kernel_options
from mdkv_compile.kernels.store_attention.plan import StorePlan, Tuning

_TRITON_TYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def compiled_resources(
    reduced_tiers: list[tuple[int, int]],
    head_dim: int = 128,
    group: int = 4,
    chunk_tokens: int = 0,
    dtype: str = "bf16",
    tuning: dict[str, Any] | None = None,
    capability: int = 90,
) -> dict[str, int]:
    """Registers and stack bytes per thread, shared memory bytes per program, warps, and the layout
    changes (``ttg.convert_layout`` in the TTGIR) of the merge, of the variant
    for reduced tiers ``[(key dims, value dims), ...]`` (the full tier is ``head_dim``): a decode step
    (``chunk_tokens`` 0) or a chunk of that many tokens, query group ``group``, inputs ``dtype``
    ("bf16", "fp16", "fp32"), ``tuning``: fields over ``DEFAULT_TUNING``."""
    if interpreting():  # the interpreter's @triton.jit functions cannot be compiled
        return call_uninterpreted(__name__, "compiled_resources", reduced_tiers, head_dim, group, chunk_tokens,
                                  dtype, tuning, capability)
    import triton
    from triton.backends.compiler import GPUTarget

    meta = dict(device="meta", dtype=_TRITON_TYPES[dtype])
    widths = [(head_dim, head_dim), *[tuple(t) for t in reduced_tiers]]
    rk_max = max((rk for rk, _ in widths[1:]), default=1)
    rv_max = max((rv for _, rv in widths[1:]), default=1)
    plan = StorePlan.from_tiers(
        [torch.empty(1, rk, **meta) for rk, _ in widths], [torch.empty(1, rv, **meta) for _, rv in widths],
        [torch.empty(2, device="meta", dtype=torch.int32) for _ in widths],
        torch.empty(1, head_dim, rk_max, **meta), torch.empty(1, head_dim, rv_max, **meta), Tuning(**(tuning or {})),
    )
    device = torch.device("meta")
    split = (plan.chunk_split(1, group * chunk_tokens, chunk_tokens, device) if chunk_tokens
             else plan.decode_split(1, group, 1, device))
    constexprs = kernel_constexprs(plan, split, n_from_ptr=not chunk_tokens, has_softcap=False,
                                   fp32=dtype == "fp32")
    params = list(inspect.signature(jit._packed_attention.fn).parameters)
    signature = {p: _argument_type(p, dtype, constexprs) for p in params}
    aligned = {(i,): [["tt.divisibility", 16]] for i, p in enumerate(params)
               if p not in constexprs and (p.endswith("_ptr") or p.startswith("stride"))}
    compiled = triton.compile(
        triton.compiler.ASTSource(fn=jit._packed_attention, signature=signature, constexprs=constexprs, attrs=aligned),
        target=GPUTarget("cuda", capability, 32), options=kernel_options(plan, split),
    )
    usage = _cubin_usage(compiled.asm["cubin"])
    # the merge is the code after the arrival's atomic add: each layout change there is a shared-memory
    # round trip with a barrier
    ttgir = compiled.asm["ttgir"]
    merge_layout_changes = ttgir[ttgir.index("tt.atomic_rmw"):].count("ttg.convert_layout")
    return dict(registers=usage["REG"], stack=usage["STACK"], shared=int(compiled.metadata.shared),
                num_warps=int(compiled.metadata.num_warps), merge_layout_changes=merge_layout_changes)


def _argument_type(name: str, dtype: str, constexprs: dict[str, Any]) -> str:
    """Triton's type string of one kernel argument."""
    if name in constexprs:
        return "constexpr"
    if name in ("ml_ptr", "acc_ptr", "coef_ptr"):
        return "*fp32"
    if name.startswith("off") or name == "count_ptr":
        return "*i32"
    if name == "n_new_ptr":
        return "*i64" if constexprs["N_FROM_PTR"] else f"*{dtype}"
    if name.endswith("_ptr"):
        return f"*{dtype}"
    return "fp32" if name in ("qk_scale", "scale", "softcap") else "i32"


def _cubin_usage(cubin: bytes) -> dict[str, int]:
    """REG, STACK, SHARED, ... of the cubin's one kernel, from `cuobjdump --dump-resource-usage`."""
    import triton

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        text = subprocess.run([tool, "--dump-resource-usage", path], capture_output=True, text=True,
                              check=True).stdout
    return {key: int(value) for key, value in re.findall(r"\b([A-Z_]+):(\d+)", text)}
