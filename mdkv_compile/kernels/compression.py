"""Triton kernels for prefill compression: window importance without the fp32
``[B, H, G, W, N]`` logits tensor. Semantics are those of ``core.scoring.window_importance``, the
reference (and the fallback where Triton cannot run).

Three launches, no host synchronisation (every size comes from shapes):

1. ``_score_stats``: grid ``(B * H * NMB, S)``. The ``M = G * W`` window query rows of one owner (KV head
   of one sequence; row ``g * W + i`` is query head ``h * G + g`` at position ``N - W + i``) are cut into
   ``NMB`` blocks of ``BLOCK_M``; program ``(o, mb, s)`` runs an online softmax of its row block over the
   ``s``-th of ``S`` slices of the keys and writes the partial ``(max, sum of exp)`` per row.
2. ``_score_columns``: grid ``(B * H, cdiv(N, BLOCK_N))``. Each program holds one key block, merges the
   ``S`` partials of every row into the row's log-sum-exp, recomputes the logits block by block of rows,
   and sums the probabilities over all ``M`` rows: the mean over the window and the GQA group.
3. ``_max_pool``: the centred max-pool (``F.max_pool1d``, padding ``k // 2``, stride 1, first ``N``
   outputs) and the zero at padding positions; skipped for ``pool_kernel == 1`` (a padding column's
   probabilities are all masked, so step 2 already writes +0 there).

Masking is the reference's: key ``n`` is visible to a row at position ``p`` iff ``n <= p`` and
``valid[b, n]``; a row that sees no key contributes 0 (the reference's ``nan_to_num``) and still
counts in the mean. Logits in log2 units (``exp2``), fp32 accumulation, bf16 / fp16 operands on the
tensor cores; fp32 operands use exact ("ieee") products. Design and floors: docs/notes/kernel_notes.md.

``_logit_errors`` (one launch): the attention loss's per-tier logit errors (``core.losses.logit_errors``)
without the ``[..., W, N]`` fp32 product per tier. The ops ``mdkv::window_importance`` and
``mdkv::logit_errors`` run the kernels where ``use_triton`` says they can, the references elsewhere;
launch parameters: ``CompressTuning``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import torch
from torch import Tensor

from mdkv_compile.core.losses import logit_errors as logit_errors_torch
from mdkv_compile.core.scoring import window_importance as window_importance_torch
from mdkv_compile.kernels._triton import (
    HAS_TRITON,
    LOG2E,
    identity,
    interpreting,
    next_pow2,
    register_kernel_op,
    sm_count,
    split_count,
)

if HAS_TRITON:
    import triton
    import triton.language as tl

    from mdkv_compile.kernels._triton import dot


@dataclasses.dataclass(frozen=True)
class CompressTuning:
    """Launch parameters of the compression kernels (values: docs/notes/kernel_notes.md). The defaults are
    what every caller gets; the ``*_triton`` entry points take ``tuning=`` to vary them."""

    block_m: int = 64  # window rows per tile (G * W = 128 at Llama-3-8B shapes: two tiles)
    block_n: int = 64  # keys per tile
    pool_block: int = 1024  # positions per max-pool program
    programs_per_sm: int = 4  # pass 1 splits the keys until about this many programs per SM
    min_keys_per_split: int = 512
    max_splits: int = 32
    num_warps: int = 4
    num_stages: int = 2


DEFAULT_COMPRESS_TUNING = CompressTuning()


if HAS_TRITON:

    @triton.jit
    def _window_rows(q_ptr, b, h, mb, G, W, N, sqb, sqh, sqn, D: tl.constexpr, BLOCK_M: tl.constexpr,
                     BLOCK_D: tl.constexpr):
        """Row block `mb` of an owner's window queries: (q [BLOCK_M, BLOCK_D], position, in range)."""
        rows = mb * BLOCK_M + tl.arange(0, BLOCK_M)
        rmask = rows < G * W
        g = rows // W
        pos = N - W + rows % W
        offs_d = tl.arange(0, BLOCK_D)
        ptrs = (q_ptr + b.to(tl.int64) * sqb + (h * G + g).to(tl.int64)[:, None] * sqh
                + pos.to(tl.int64)[:, None] * sqn + offs_d[None, :])
        q = tl.load(ptrs, mask=rmask[:, None] & (offs_d < D)[None, :], other=0.0)
        return q, pos, rmask

    @triton.jit
    def _logits(q, k_ptr, vld_ptr, b, h, start, hi, pos, rmask, N, skb, skh, skn, qk_scale, scale, softcap,
                D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
                DOT_PREC: tl.constexpr, INTERP: tl.constexpr):
        """Logits (log2 units) of a row block against keys [start, start + BLOCK_N) (< hi), and which are
        visible (the reference's causal and padding mask)."""
        cols = start + tl.arange(0, BLOCK_N)
        cmask = cols < hi
        offs_d = tl.arange(0, BLOCK_D)
        k = tl.load(k_ptr + b.to(tl.int64) * skb + h.to(tl.int64) * skh + cols.to(tl.int64)[:, None] * skn
                    + offs_d[None, :], mask=cmask[:, None] & (offs_d < D)[None, :], other=0.0)
        vld = tl.load(vld_ptr + b.to(tl.int64) * N + cols, mask=cmask, other=0)
        s = dot(q, tl.trans(k), DOT_PREC, INTERP)  # [BLOCK_M, BLOCK_N] fp32
        if HAS_SOFTCAP:
            x = s * (scale / softcap)
            # tanh through exp2 (the interpreter has no tanh); saturates cleanly at +-1
            th = 1.0 - 2.0 / (tl.exp2(x * (2.0 * 1.4426950408889634)) + 1.0)
            s = th * (softcap * 1.4426950408889634)
        else:
            s = s * qk_scale
        seen = rmask[:, None] & (cmask & (vld != 0))[None, :] & (cols[None, :] <= pos[:, None])
        return s, seen

    @triton.jit
    def _stats_step(q, k_ptr, vld_ptr, b, h, start, hi, pos, rmask, m_i, l_i, N, skb, skh, skn, qk_scale, scale,
                    softcap, D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
                    HAS_SOFTCAP: tl.constexpr, DOT_PREC: tl.constexpr, INTERP: tl.constexpr):
        s, seen = _logits(q, k_ptr, vld_ptr, b, h, start, hi, pos, rmask, N, skb, skh, skn, qk_scale, scale,
                          softcap, D, BLOCK_D, BLOCK_N, HAS_SOFTCAP, DOT_PREC, INTERP)
        s = tl.where(seen, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # a row that has seen nothing yet keeps m = -inf: a finite stand-in avoids -inf - -inf
        m_safe = tl.where(m_new > float("-inf"), m_new, 0.0)
        l_i = l_i * tl.exp2(m_i - m_safe) + tl.sum(tl.exp2(s - m_safe[:, None]), 1)
        return m_new, l_i

    @triton.jit
    def _score_stats(
        q_ptr, k_ptr, vld_ptr, ws_ptr,
        H, G, W, N, S, NMB, M_P,
        sqb, sqh, sqn, skb, skh, skn,
        qk_scale, scale, softcap,
        D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        HAS_SOFTCAP: tl.constexpr, DOT_PREC: tl.constexpr, INTERP: tl.constexpr,
    ):
        pid = tl.program_id(0)
        s_idx = tl.program_id(1)
        o = pid // NMB
        mb = pid % NMB
        b = o // H
        h = o % H
        # Inductor passes Python floats as fp64 scalars: keep the softmax state fp32
        qk_scale = tl.cast(qk_scale, tl.float32)
        scale = tl.cast(scale, tl.float32)
        softcap = tl.cast(softcap, tl.float32)
        q, pos, rmask = _window_rows(q_ptr, b, h, mb, G, W, N, sqb, sqh, sqn, D, BLOCK_M, BLOCK_D)
        per = tl.cdiv(N, S)
        lo = s_idx * per
        hi = tl.minimum(lo + per, N)
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        if INTERP:
            # Triton 3.6's interpreter cannot run range() over a runtime bound under numpy >= 2.4
            # (see store_attention.jit._region); a while loop is the same arithmetic
            start = lo
            while start < hi:
                m_i, l_i = _stats_step(q, k_ptr, vld_ptr, b, h, start, hi, pos, rmask, m_i, l_i, N, skb, skh, skn,
                                       qk_scale, scale, softcap, D, BLOCK_D, BLOCK_N, HAS_SOFTCAP, DOT_PREC, INTERP)
                start += BLOCK_N
        else:
            for start in range(lo, hi, BLOCK_N):
                m_i, l_i = _stats_step(q, k_ptr, vld_ptr, b, h, start, hi, pos, rmask, m_i, l_i, N, skb, skh, skn,
                                       qk_scale, scale, softcap, D, BLOCK_D, BLOCK_N, HAS_SOFTCAP, DOT_PREC, INTERP)
        rows = mb * BLOCK_M + tl.arange(0, BLOCK_M)
        base = (o * S + s_idx).to(tl.int64) * 2 * M_P
        tl.store(ws_ptr + base + rows, m_i)
        tl.store(ws_ptr + base + M_P + rows, l_i)

    @triton.jit
    def _score_columns(
        q_ptr, k_ptr, vld_ptr, ws_ptr, out_ptr,
        H, G, W, N, S, M_P, inv_rows,
        sqb, sqh, sqn, skb, skh, skn,
        qk_scale, scale, softcap,
        NMB: tl.constexpr, S_P: tl.constexpr,
        D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        HAS_SOFTCAP: tl.constexpr, DOT_PREC: tl.constexpr, INTERP: tl.constexpr,
    ):
        o = tl.program_id(0)
        start = tl.program_id(1) * BLOCK_N
        b = o // H
        h = o % H
        qk_scale = tl.cast(qk_scale, tl.float32)
        scale = tl.cast(scale, tl.float32)
        softcap = tl.cast(softcap, tl.float32)
        inv_rows = tl.cast(inv_rows, tl.float32)
        offs_s = tl.arange(0, S_P)
        smask = offs_s < S
        acc = tl.zeros([BLOCK_N], tl.float32)
        for mb in range(NMB):  # a constexpr bound: fine in the interpreter
            q, pos, rmask = _window_rows(q_ptr, b, h, mb, G, W, N, sqb, sqh, sqn, D, BLOCK_M, BLOCK_D)
            # the row's log-sum-exp from the S partials of pass 1
            rows = mb * BLOCK_M + tl.arange(0, BLOCK_M)
            part = ws_ptr + (o * S + offs_s).to(tl.int64)[:, None] * 2 * M_P + rows[None, :]
            m_s = tl.load(part, mask=smask[:, None], other=float("-inf"))  # [S_P, BLOCK_M]
            l_s = tl.load(part + M_P, mask=smask[:, None], other=0.0)
            m = tl.max(m_s, 0)
            m_safe = tl.where(m > float("-inf"), m, 0.0)
            l_row = tl.sum(l_s * tl.exp2(m_s - m_safe[None, :]), 0)
            # a row that sees no key: lse = +inf makes every probability exp2(-inf) = 0
            lse = tl.where(l_row > 0.0, m_safe + tl.log2(tl.maximum(l_row, 1e-30)), float("inf"))
            s, seen = _logits(q, k_ptr, vld_ptr, b, h, start, N, pos, rmask, N, skb, skh, skn, qk_scale, scale,
                              softcap, D, BLOCK_D, BLOCK_N, HAS_SOFTCAP, DOT_PREC, INTERP)
            p = tl.where(seen, tl.exp2(s - lse[:, None]), 0.0)
            acc += tl.sum(p, 0)
        cols = start + tl.arange(0, BLOCK_N)
        tl.store(out_ptr + o.to(tl.int64) * N + cols, acc * inv_rows, mask=cols < N)

    @triton.jit
    def _max_pool(src_ptr, vld_ptr, out_ptr, H, N, K: tl.constexpr, BLOCK: tl.constexpr):
        o = tl.program_id(0)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        row = src_ptr + o.to(tl.int64) * N
        res = tl.full([BLOCK], float("-inf"), tl.float32)
        for t in tl.static_range(K):
            j = cols - K // 2 + t  # F.max_pool1d's window, padding K // 2 (outputs past N dropped)
            res = tl.maximum(res, tl.load(row + j, mask=(j >= 0) & (j < N), other=float("-inf")))
        vld = tl.load(vld_ptr + (o // H).to(tl.int64) * N + cols, mask=cols < N, other=0)
        tl.store(out_ptr + o.to(tl.int64) * N + cols, tl.where(vld != 0, res, 0.0), mask=cols < N)


    @triton.jit
    def _logit_errors(
        qr_ptr, kc_ptr, dims_ptr, out_ptr, M, N, sq_o, sq_m, sk_o, sk_n, scale, inv_rows,
        T: tl.constexpr, NMB: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr, DOT_PREC: tl.constexpr, INTERP: tl.constexpr,
    ):
        """Program (o, key block): for each tier r, scale * rms over the M rows of q_rot[:, r:] . kc[n, r:]."""
        o = tl.program_id(0)
        cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        cmask = cols < N
        scale = tl.cast(scale, tl.float32)
        inv_rows = tl.cast(inv_rows, tl.float32)
        offs_d = tl.arange(0, BLOCK_D)
        k = tl.load(kc_ptr + o.to(tl.int64) * sk_o + cols.to(tl.int64)[:, None] * sk_n + offs_d[None, :],
                    mask=cmask[:, None] & (offs_d < D)[None, :], other=0.0)
        for t in tl.static_range(T):
            r = tl.load(dims_ptr + t)
            k_tail = tl.where((offs_d >= r)[None, :], k, 0.0)  # the coordinates past the tier's first r
            acc = tl.zeros([BLOCK_N], tl.float32)
            for mb in range(NMB):
                rows = mb * BLOCK_M + tl.arange(0, BLOCK_M)
                q = tl.load(qr_ptr + o.to(tl.int64) * sq_o + rows.to(tl.int64)[:, None] * sq_m + offs_d[None, :],
                            mask=(rows < M)[:, None] & (offs_d < D)[None, :], other=0.0)
                e = dot(q, tl.trans(k_tail), DOT_PREC, INTERP)  # [BLOCK_M, BLOCK_N] logit errors
                acc += tl.sum(e * e, 0)
            tl.store(out_ptr + (o.to(tl.int64) * N + cols) * T + t, scale * tl.sqrt(acc * inv_rows), mask=cmask)


def window_importance_triton(
    query: Tensor,
    key: Tensor,
    valid: Tensor,
    window: int,
    pool_kernel: int,
    scale: float | None = None,
    softcap: float | None = None,
    *,
    out: Tensor | None = None,
    tuning: CompressTuning | None = None,
    wrap: Callable = identity,
) -> Tensor:
    """The window-importance kernels called directly (no op dispatch), and by the op with
    ``wrap=wrap_triton``. ``out`` lets tests check every element is written; ``tuning`` replaces the
    launch parameters (None: ``DEFAULT_COMPRESS_TUNING``)."""
    tuning = tuning or DEFAULT_COMPRESS_TUNING
    scale = 1.0 / math.sqrt(query.shape[-1]) if scale is None else float(scale)
    bsz, n_q_heads, n_tokens, d = query.shape
    n_heads = key.shape[1]
    if key.shape != (bsz, n_heads, n_tokens, d) or n_q_heads % n_heads or valid.shape != (bsz, n_tokens):
        raise ValueError(f"window_importance: shapes q {tuple(query.shape)}, k {tuple(key.shape)}, "
                         f"valid {tuple(valid.shape)} do not fit")
    if pool_kernel < 1:
        raise ValueError(f"window_importance: pool_kernel must be >= 1, got {pool_kernel}")
    group = n_q_heads // n_heads
    w = min(window, n_tokens)
    n_own, n_rows = bsz * n_heads, group * w
    # the innermost stride must be 1 (tile loads); other strides are passed, so views of q/k are fine
    if key.dtype != query.dtype:  # e.g. a float32 copy of bf16 keys: compute in the wider type, as the reference
        query, key = query.float(), key.float()
    q = query if query.stride(-1) == 1 else query.contiguous()
    k = key if key.stride(-1) == 1 else key.contiguous()
    vld = valid.to(torch.int8).contiguous()
    block_m = max(16, min(tuning.block_m, next_pow2(n_rows)))
    block_n = tuning.block_n
    block_d = max(16, next_pow2(d))
    nmb = -(-n_rows // block_m)
    m_p = nmb * block_m
    # key slices per row block in pass 1
    splits = split_count(n_own * nmb, n_tokens, tuning.min_keys_per_split, tuning.programs_per_sm, tuning.max_splits,
                         sm_count(query.device))
    if out is None:
        out = torch.empty(bsz, n_heads, n_tokens, device=query.device, dtype=torch.float32)
    elif out.shape != (bsz, n_heads, n_tokens) or out.dtype != torch.float32 or not out.is_contiguous():
        raise ValueError("window_importance: out must be a contiguous float32 [B, H, N] tensor")
    ws = torch.empty(n_own * splits * 2 * m_p, device=query.device, dtype=torch.float32)
    has_cap = softcap is not None
    common = dict(
        D=d, BLOCK_D=block_d, BLOCK_M=block_m, BLOCK_N=block_n, HAS_SOFTCAP=has_cap,
        DOT_PREC=query.dtype == torch.float32, INTERP=interpreting(),
        num_warps=tuning.num_warps, num_stages=tuning.num_stages,
    )
    strides = (q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2))
    scalars = (scale * LOG2E, scale, float(softcap) if has_cap else 1.0)
    wrap(_score_stats)[(n_own * nmb, splits)](
        q, k, vld, ws, n_heads, group, w, n_tokens, splits, nmb, m_p, *strides, *scalars, **common,
    )
    # pooled: the column sums go to a scratch row first, the pool writes `out`
    raw = out if pool_kernel == 1 else torch.empty_like(out)
    wrap(_score_columns)[(n_own, triton.cdiv(n_tokens, block_n))](
        q, k, vld, ws, raw, n_heads, group, w, n_tokens, splits, m_p, 1.0 / n_rows, *strides, *scalars,
        NMB=nmb, S_P=max(2, next_pow2(splits)), **common,
    )
    if pool_kernel > 1:
        block = min(tuning.pool_block, max(16, next_pow2(n_tokens)))
        wrap(_max_pool)[(n_own, triton.cdiv(n_tokens, block))](raw, vld, out, n_heads, n_tokens, K=pool_kernel,
                                                                BLOCK=block)
    return out


@register_kernel_op("mdkv::window_importance", window_importance_triton)
def _window_importance_op(query: Tensor, key: Tensor, valid: Tensor, window: int, pool_kernel: int, scale: float,
                          softcap: float | None = None) -> Tensor:
    """The op (its schema: this signature) and its fallback, the reference."""
    return window_importance_torch(query, key, valid, window, pool_kernel, scale, softcap)


def window_importance(query: Tensor, key: Tensor, valid: Tensor, window: int, pool_kernel: int,
                      scale: float | None = None, softcap: float | None = None) -> Tensor:
    """``core.scoring.window_importance`` as the op ``mdkv::window_importance``: the fused kernels on CUDA
    (or under ``TRITON_INTERPRET=1``), the reference elsewhere. Same arguments and result ([B, H, N] fp32)."""
    scale = 1.0 / math.sqrt(query.shape[-1]) if scale is None else float(scale)
    return _window_importance_op(query, key, valid, window, pool_kernel, scale, softcap)


def logit_errors_triton(
    window_queries: Tensor,
    key_coef_full: Tensor,
    dims: tuple[int, ...] | list[int],
    scale: float,
    exact: bool = True,
    *,
    out: Tensor | None = None,
    tuning: CompressTuning | None = None,
    wrap: Callable = identity,
) -> Tensor:
    """The logit-error kernel called directly (no op dispatch), and by the op with ``wrap=wrap_triton``
    (``out``: tests check every element is written; ``tuning`` as ``window_importance_triton``)."""
    tuning = tuning or DEFAULT_COMPRESS_TUNING
    dims, scale = list(dims), float(scale)
    *lead, n_rows, d = window_queries.shape
    n_tokens = key_coef_full.shape[-2]
    if tuple(key_coef_full.shape) != (*lead, n_tokens, d) or not all(0 < r < d for r in dims):
        raise ValueError(f"logit_errors: q {tuple(window_queries.shape)}, coefficients "
                         f"{tuple(key_coef_full.shape)}, dims {dims} do not fit")
    n_own = math.prod(lead)
    q = window_queries.float().reshape(n_own, n_rows, d).contiguous()
    kc = key_coef_full.float().reshape(n_own, n_tokens, d).contiguous()
    if out is None:
        out = torch.empty(*lead, n_tokens, len(dims), device=q.device, dtype=torch.float32)
    elif tuple(out.shape) != (*lead, n_tokens, len(dims)) or out.dtype != torch.float32 or not out.is_contiguous():
        raise ValueError("logit_errors: out must be a contiguous float32 [..., N, len(dims)] tensor")
    # the tiers as a device tensor written by fills (a host copy would synchronise)
    tiers = torch.empty(len(dims), device=q.device, dtype=torch.int32)
    for i, r in enumerate(dims):
        tiers[i : i + 1].fill_(r)
    block_m = max(16, min(tuning.block_m, next_pow2(n_rows)))
    block_n = tuning.block_n
    wrap(_logit_errors)[(n_own, triton.cdiv(n_tokens, block_n))](
        q, kc, tiers, out, n_rows, n_tokens, q.stride(0), q.stride(1), kc.stride(0), kc.stride(1),
        scale, 1.0 / n_rows,
        T=len(dims), NMB=-(-n_rows // block_m), D=d, BLOCK_D=max(16, next_pow2(d)), BLOCK_M=block_m,
        BLOCK_N=block_n, DOT_PREC=exact, INTERP=interpreting(),
        num_warps=tuning.num_warps, num_stages=tuning.num_stages,
    )
    return out


@register_kernel_op("mdkv::logit_errors", logit_errors_triton)
def _logit_errors_op(window_queries: Tensor, key_coef_full: Tensor, dims: list[int], scale: float,
                     exact: bool) -> Tensor:
    """The op (its schema: this signature) and its fallback, the reference; ``exact`` concerns the
    kernels only (the reference follows PyTorch's matmul precision)."""
    return logit_errors_torch(window_queries, key_coef_full, tuple(dims), scale)


def logit_errors(window_queries: Tensor, key_coef_full: Tensor, dims: tuple[int, ...], scale: float,
                 exact: bool = True) -> Tensor:
    """``core.losses.logit_errors`` as the op ``mdkv::logit_errors``: [..., N, len(dims)] fp32 without the
    [..., W, N] fp32 product per tier. ``exact``: fp32 products ("ieee"); False lets the GPU use TF32
    (what the reference gets under ``policies._tf32_matmuls`` for a bf16 / fp16 model)."""
    return _logit_errors_op(window_queries, key_coef_full, dims, scale, exact)
