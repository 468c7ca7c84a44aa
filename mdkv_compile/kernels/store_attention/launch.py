"""Running the store-attention kernels: the query rotation, workspace and output, one split launch
and the merge. `packed_decode_attention_triton` and `packed_chunk_attention_triton` are the direct
entry points (tests, benchmarks; ``wrap=identity``) and what the registered ops call with
``wrap=wrap_triton``. Decode and chunk share everything here but their split kernel, its grid's row
blocks and the counts they pass."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from mdkv_compile.kernels._triton import LOG2E, identity, interpreting, next_pow2
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
    *,
    out: Tensor | None = None,
    poison_workspace: bool = False,
    tuning: Tuning | None = None,
    wrap: Wrap = identity,
) -> Tensor:
    """The decode kernels called directly (no op dispatch); arguments as ``packed_decode_attention``.
    ``n_decoded`` (int64 ``[1]`` on the device), when given, is the number of decoded tokens the kernel
    reads, and ``n_new`` only sizes the splits (pass the region's capacity). ``out`` and
    ``poison_workspace`` let tests check that every output element is written and no unwritten
    workspace element is read; ``tuning`` replaces the launch parameters (benchmarks; None:
    ``DEFAULT_TUNING``)."""
    _check_devices(q, *tier_keys, *tier_values, *tier_offsets, basis_k, basis_v, k_new, v_new, n_decoded, out)
    plan = StorePlan.from_tiers(tier_keys, tier_values, tier_offsets, basis_k, basis_v, tuning)
    B, Hq, Lq, d = q.shape
    assert Lq == 1, "decode kernel: one query token per sequence"
    _check_new_tokens(plan, q, k_new, v_new)
    Hkv = k_new.shape[1]
    split = plan.decode_split(B * Hkv, Hq // Hkv, n_new, q.device)
    q = q.contiguous()
    counts = (n_new, q if n_decoded is None else n_decoded, Hkv, split.rows, split.splits)
    return _launch(wrap, jit._packed_decode_split, plan, split, q, k_new, v_new, counts, scale, softcap, out,
                   poison_workspace, N_FROM_PTR=n_decoded is not None, GP=split.block_rows)


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
    wrap: Wrap = identity,
) -> Tensor:
    """The chunked-prefill kernels called directly (see ``packed_chunk_attention``): q [B, Hq, L, d]
    are the last L of the n_new new tokens (causal among them). Keywords as
    ``packed_decode_attention_triton``."""
    _check_devices(q, *tier_keys, *tier_values, *tier_offsets, basis_k, basis_v, k_new, v_new, out)
    plan = StorePlan.from_tiers(tier_keys, tier_values, tier_offsets, basis_k, basis_v, tuning)
    B, Hq, L, d = q.shape
    assert 1 <= L <= n_new <= k_new.shape[2], "the queries are the last L of the n_new new tokens"
    _check_new_tokens(plan, q, k_new, v_new)
    Hkv = k_new.shape[1]
    split = plan.chunk_split(B * Hkv, (Hq // Hkv) * L, n_new, q.device)
    q = q.contiguous()
    counts = (n_new, L, Hkv, split.rows, split.splits, split.row_blocks)
    return _launch(wrap, jit._packed_chunk_split, plan, split, q, k_new, v_new, counts, scale, softcap, out,
                   poison_workspace, BLOCK_M=split.block_rows, M_P=split.rows_padded)


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
    split_kernel: Callable,
    plan: StorePlan,
    split: WorkSplit,
    q: Tensor,
    k_new: Tensor,
    v_new: Tensor,
    counts: tuple,
    scale: float,
    softcap: float | None,
    out: Tensor | None,
    poison_workspace: bool,
    **row_constexprs: int | bool,
) -> Tensor:
    """The split kernel over every (owner, slice, region x row block), then the merge into `out`.
    `counts`: the split kernel's own scalars between the new tokens' strides and the workspace
    (decode and chunk differ there); `row_constexprs`: its own constexprs."""
    tuning = plan.tuning
    ml, acc, coef = _workspace(plan.workspace_sizes(split), q.device, poison_workspace)
    out = _output(out, q)
    q_rot = _rotated_query(plan, q, split)
    has_cap = softcap is not None
    wrap(split_kernel)[(split.owners, split.splits, (plan.n_reduced + 1) * split.row_blocks)](
        q, *plan.tier_pointers,
        q_rot, q_rot.stride(1),
        k_new, v_new, k_new.stride(0), k_new.stride(1), k_new.stride(2),
        v_new.stride(0), v_new.stride(1), v_new.stride(2),
        *counts,
        ml, acc, coef,
        scale * LOG2E, scale, float(softcap) if has_cap else 1.0,
        NUM_RED=plan.n_reduced, **plan.tier_constexprs,
        RV_MAX=plan.rv_max_padded, D=plan.head_dim, BLOCK_D=plan.block_d, BLOCK_N=plan.block_n,
        HAS_SOFTCAP=has_cap, DOT_PREC=q.dtype == torch.float32, INTERP=interpreting(),
        num_warps=tuning.num_warps, num_stages=tuning.num_stages,
        **row_constexprs,
    )
    # the decode merge serves any number of rows per owner: rows = G (decode) or G * L (chunk)
    basis_v, stride_bo, stride_bd = plan.merge_basis
    value_widths = {f"RV{t}": plan.tier_constexprs[f"RV{t}"] for t in range(1, jit.MAX_REDUCED_TIERS + 1)}
    wrap(jit._packed_decode_merge)[(split.owners, split.rows)](
        ml, acc, coef, basis_v, stride_bo, stride_bd, out, split.rows, split.splits,
        NUM_RED=plan.n_reduced, **value_widths, RV_TOP=plan.rv_max, RV_MAX=plan.rv_max_padded,
        GP=split.rows_padded, D=plan.head_dim, BLOCK_D=plan.block_d,
        BLOCK_REG=next_pow2(max(2, plan.n_reduced + 1)), BLOCK_S=tuning.merge_block_s,
        num_warps=4,
    )
    return out


def _workspace(sizes: tuple[int, int, int], device: torch.device, poison: bool) -> tuple[Tensor, Tensor, Tensor]:
    ml, acc, coef = (torch.empty(n, device=device, dtype=torch.float32) for n in sizes)
    if poison:  # tests: any read of an unwritten workspace element shows up as NaN
        for t in (ml, acc, coef):
            t.fill_(float("nan"))
    return ml, acc, coef


def _output(out: Tensor | None, q: Tensor) -> Tensor:
    if out is None:
        return torch.empty(q.shape, device=q.device, dtype=q.dtype)
    assert out.shape == q.shape and out.is_contiguous() and out.dtype == q.dtype
    return out


def _rotated_query(plan: StorePlan, q: Tensor, split: WorkSplit) -> Tensor:
    """basis_k[o].T @ q for every query row of owner o, once: [owners, rows, rk_max] (q itself without
    a reduced tier)."""
    flat = q.view(split.owners, split.rows, plan.head_dim)
    return torch.matmul(flat, plan.basis_k).contiguous() if plan.n_reduced else flat

