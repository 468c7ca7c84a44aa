"""Running the store-attention kernel: workspace, arrival counts and output, then one launch (splits
and merge). `packed_decode_attention_triton` and `packed_chunk_attention_triton` are the direct entry
points (tests, benchmarks; ``wrap=identity``) and what the registered ops call with
``wrap=wrap_triton``. Decode is the chunk of one query token: the two differ in their work split and
in where the count of new tokens comes from."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from mdkv_compile.kernels._triton import LOG2E, identity, interpreting
from mdkv_compile.kernels.store_attention import jit
from mdkv_compile.kernels.store_attention.plan import StorePlan, Tuning, WorkSplit

Wrap = Callable  # identity (direct calls) or torch.library.wrap_triton (inside the op: Inductor sees the kernels)


def packed_decode_attention_triton(
    q: Tensor,
    tier_keys: list[Tensor],
    tier_values: list[Tensor],
    tier_offsets: list[Tensor],
    basis_k: Tensor | None,
    basis_v: Tensor | None,
    k_new: Tensor,
    v_new: Tensor,
    n_new: int,
    scale: float,
    softcap: float | None = None,
    n_decoded: Tensor | None = None,
    arrival_counts: Tensor | None = None,
    *,
    out: Tensor | None = None,
    poison_workspace: bool = False,
    tuning: Tuning | None = None,
    trace: Tensor | None = None,
    wrap: Wrap = identity,
) -> Tensor:
    """The decode kernels called directly (no op dispatch); arguments as ``packed_decode_attention``.
    ``n_decoded`` (int64 ``[1]`` on the device), when given, is the number of decoded tokens the kernel
    reads, and ``n_new`` only sizes the splits (pass the region's capacity). ``out`` and
    ``poison_workspace`` let tests check that every output element is written and no unwritten
    workspace element is read; ``tuning`` replaces the launch parameters (benchmarks; None:
    ``DEFAULT_TUNING``). ``trace`` (GPU only): an int64 ``[n, TRACE_FIELDS]``
    buffer, ``n`` at least the launch's programs, whose row ``p`` program ``p`` fills with its timestamps
    (benchmarks/gpu/trace_store_kernel.py reads them; a separately compiled variant)."""
    _check_devices(q, *tier_keys, *tier_values, *tier_offsets, basis_k, basis_v, k_new, v_new, n_decoded, out,
                   arrival_counts, trace)
    plan = StorePlan.from_tiers(tier_keys, tier_values, tier_offsets, basis_k, basis_v, tuning)
    B, Hq, Lq, d = q.shape
    assert Lq == 1, "decode kernel: one query token per sequence"
    _check_new_tokens(plan, q, k_new, v_new)
    Hkv = k_new.shape[1]
    split = plan.decode_split(B * Hkv, Hq // Hkv, n_new, q.device)
    q = q.contiguous()
    return _launch(wrap, plan, split, q, k_new, v_new, n_new, n_decoded, 1, scale, softcap, out, poison_workspace,
                   arrival_counts, trace)


def packed_chunk_attention_triton(
    q: Tensor,
    tier_keys: list[Tensor],
    tier_values: list[Tensor],
    tier_offsets: list[Tensor],
    basis_k: Tensor | None,
    basis_v: Tensor | None,
    k_new: Tensor,
    v_new: Tensor,
    n_new: int,
    scale: float,
    softcap: float | None = None,
    *,
    out: Tensor | None = None,
    poison_workspace: bool = False,
    tuning: Tuning | None = None,
    arrival_counts: Tensor | None = None,
    trace: Tensor | None = None,
    wrap: Wrap = identity,
) -> Tensor:
    """The chunked-prefill kernels called directly (see ``packed_chunk_attention``): q [B, Hq, L, d]
    are the last L of the n_new new tokens (causal among them). Keywords as
    ``packed_decode_attention_triton``; ``arrival_counts`` as ``packed_decode_attention``'s, at least
    ``B x H_kv x`` the chunk's row blocks."""
    _check_devices(q, *tier_keys, *tier_values, *tier_offsets, basis_k, basis_v, k_new, v_new, out, arrival_counts,
                   trace)
    plan = StorePlan.from_tiers(tier_keys, tier_values, tier_offsets, basis_k, basis_v, tuning)
    B, Hq, L, d = q.shape
    assert 1 <= L <= n_new <= k_new.shape[2], "the queries are the last L of the n_new new tokens"
    _check_new_tokens(plan, q, k_new, v_new)
    Hkv = k_new.shape[1]
    split = plan.chunk_split(B * Hkv, (Hq // Hkv) * L, n_new, q.device)
    q = q.contiguous()
    return _launch(wrap, plan, split, q, k_new, v_new, n_new, None, L, scale, softcap, out, poison_workspace,
                   arrival_counts, trace)


def _check_devices(q: Tensor, *tensors: Tensor | None) -> None:
    """Every kernel argument on q's device: a stray CPU tensor would otherwise fail deep in the launcher."""
    for t in tensors:
        if t is not None and t.device != q.device:
            raise ValueError(f"packed attention: an argument is on {t.device}, the query on {q.device}")


def _check_new_tokens(plan: StorePlan, q: Tensor, k_new: Tensor, v_new: Tensor) -> None:
    d = q.shape[-1]
    assert q.shape[1] % k_new.shape[1] == 0
    assert plan.head_dim == d and k_new.shape[-1] == d
    # both regions of program t = 0 share one row stride
    assert k_new.stride(-1) == 1 and v_new.stride(-1) == 1 and k_new.stride(2) == v_new.stride(2)


def _launch(
    wrap: Wrap,
    plan: StorePlan,
    split: WorkSplit,
    q: Tensor,
    k_new: Tensor,
    v_new: Tensor,
    n_new: int,
    n_decoded: Tensor | None,
    L: int,
    scale: float,
    softcap: float | None,
    out: Tensor | None,
    poison_workspace: bool,
    arrival_counts: Tensor | None,
    trace: Tensor | None,
) -> Tensor:
    """One launch over every (row block, split, owner, region); the last program of each (owner, row
    block) merges its partials into `out`. `n_decoded`: the count of new tokens on the device (decode
    under CUDA graphs), read there instead of `n_new`."""
    ml, acc, coef = _workspace(plan.workspace_sizes(split), q.device, poison_workspace)
    arrivals = _arrival_counts(arrival_counts, split, q.device)
    out = _output(out, q)
    programs = split.row_blocks * split.splits * split.owners * (plan.n_reduced + 1)
    _check_trace(trace, programs)
    wrap(jit._packed_attention)[(programs,)](
        q, *plan.tier_pointers, *plan.bases,
        k_new, v_new, k_new.stride(0), k_new.stride(1), k_new.stride(2),
        v_new.stride(0), v_new.stride(1), v_new.stride(2),
        n_new, q if n_decoded is None else n_decoded, L, k_new.shape[1], split.owners, split.rows, split.splits,
        split.row_blocks,
        ml, acc, coef, arrivals, out, out if trace is None else trace,
        scale * LOG2E, scale, 1.0 if softcap is None else float(softcap),
        **kernel_constexprs(plan, split, n_from_ptr=n_decoded is not None, has_softcap=softcap is not None,
                            fp32=q.dtype == torch.float32, trace=trace is not None),
        **kernel_options(plan, split),
    )
    return out


def kernel_constexprs(plan: StorePlan, split: WorkSplit, *, n_from_ptr: bool, has_softcap: bool,
                      fp32: bool, trace: bool = False) -> dict[str, int | bool]:
    """The kernel's constexprs for one launch (each distinct set is one compiled variant)."""
    return dict(
        N_FROM_PTR=n_from_ptr, NUM_RED=plan.n_reduced, **plan.tier_constexprs, **plan.reduced_block_rows(split),
        RV_TOP=plan.rv_max, RV_MAX=plan.rv_max_padded, BLOCK_M=split.block_rows, M_P=split.rows_padded,
        D=plan.head_dim, BLOCK_D=plan.block_d, BLOCK_N=plan.block_n, REVERSE_REGIONS=plan.tuning.reverse_regions,
        MERGE_M=split.merge_rows if plan.tuning.narrow_merge else split.block_rows,
        MERGE_UNROLL=plan.tuning.chunk_merge_unroll if split.chunk else plan.tuning.merge_unroll,
        MERGE_FOR=plan.tuning.merge_for_loop,
        HAS_SOFTCAP=has_softcap, DOT_PREC=fp32, INTERP=interpreting(), TRACE=trace,
    )


def kernel_options(plan: StorePlan, split: WorkSplit) -> dict[str, int]:
    """Warps, pipeline stages and a register cap (decode only) of one launch: a chunk's warps are
    ``Tuning.chunk_num_warps``."""
    tuning = plan.tuning
    options = dict(num_warps=tuning.chunk_num_warps if split.chunk else tuning.num_warps,
                   num_stages=tuning.num_stages)
    if not split.chunk and tuning.decode_max_registers is not None:
        options["maxnreg"] = tuning.decode_max_registers
    return options


def _workspace(sizes: tuple[int, int, int], device: torch.device, poison: bool) -> tuple[Tensor, Tensor, Tensor]:
    ml, acc, coef = (torch.empty(n, device=device, dtype=torch.float32) for n in sizes)
    if poison:  # tests: any read of an unwritten workspace element shows up as NaN
        for t in (ml, acc, coef):
            t.fill_(float("nan"))
    return ml, acc, coef


def _arrival_counts(counts: Tensor | None, split: WorkSplit, device: torch.device) -> Tensor:
    """The merge's arrival counts: the caller's kept buffer (zeros, and left at zero by every launch; its
    device checked with the other arguments'), or a fresh one, zeroed by a memset so that the call never
    depends on the one before."""
    n = split.owners * split.row_blocks  # one per (owner, row block)
    if counts is None:
        return torch.zeros(n, dtype=torch.int32, device=device)
    if counts.dtype != torch.int32 or not counts.is_contiguous() or counts.numel() < n:
        raise ValueError(f"arrival_counts: a contiguous int32 buffer of at least {n} elements is needed, got "
                         f"{tuple(counts.shape)} {counts.dtype}")
    return counts


def _check_trace(trace: Tensor | None, programs: int) -> None:
    """The trace buffer's type and size (its device is checked with the other arguments')."""
    if trace is None:
        return
    if interpreting():
        raise ValueError("trace: the kernel reads the GPU's timer, which Triton's interpreter does not have")
    if (trace.dtype != torch.int64 or not trace.is_contiguous() or trace.dim() != 2 or trace.shape[0] < programs
            or trace.shape[1] != jit.TRACE_FIELDS):
        raise ValueError(f"trace: a contiguous int64 [>= {programs}, {jit.TRACE_FIELDS}] buffer is needed, got "
                         f"{tuple(trace.shape)} {trace.dtype}")


def _output(out: Tensor | None, q: Tensor) -> Tensor:
    if out is None:
        return torch.empty(q.shape, device=q.device, dtype=q.dtype)
    assert out.shape == q.shape and out.is_contiguous() and out.dtype == q.dtype
    return out
