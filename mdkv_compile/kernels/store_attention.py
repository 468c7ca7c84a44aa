"""Decode attention over the packed store (docs/packed_store.md) in Triton.

One query token per sequence. A small product and two launches:

0. ``q_rot = q @ basis_k[o]`` for every owner (``torch.matmul``, ``[owners, G, r_max]``): the query is
   rotated once, never a key.
1. ``_packed_decode_split``: grid ``(B * H_kv, S, 1 + T_red)``. Program ``(o, s, t)`` serves owner ``o``
   (one KV head of one sequence) for *all* query heads of its GQA group (rows of a ``[GP, d]`` tile,
   ``GP`` the group padded to 16 so ``tl.dot`` can use the tensor cores), the ``s``-th of ``S`` equal
   slices of one region: ``t = 0`` the full tier plus the decoded region ``k_new[:, :, :n_new]``
   (both full width, merged in-program), ``t >= 1`` reduced tier ``t``, attended in its own
   coefficient space with ``q_rot[:, :r_t]``. Each program writes one online-softmax partial
   ``(m, l, acc)``; for a reduced tier ``acc`` is in coefficient space, ``[G, r_t]``.
2. ``_packed_decode_merge``: grid ``(B * H_kv, G)``, one query head per program. Log-sum-exp merge of
   the ``S x (1 + T_red)`` partials (no atomics, deterministic), reading splits in chunks; the value
   coefficients of all reduced tiers are summed in one ``[r_max]`` vector (zero-padded) and rotated
   back once with ``basis_v[o]``, then normalised and written.

Precision: inputs bf16 / fp16 / fp32; every dot product accumulates in fp32 (``ieee`` for fp32 inputs,
so fp32 results match a float64 reference to ~1e-6); probabilities and ``q_rot`` are rounded to the
input dtype before their products, as in FlashAttention.

The op ``mdkv::packed_decode_attention`` is a ``torch.library.triton_op`` (Inductor sees both kernels
through ``wrap_triton``: verified on an H200, docs/notes/kernel_notes.md) taking the tiers as ``Tensor[]``
lists: the full tier first, then at most ``MAX_REDUCED_TIERS`` reduced ones, largest first. On a CPU
tensor (and no ``TRITON_INTERPRET=1``) it runs ``packed_attention_torch``, a vectorised
pure-torch version that is also traceable. Versions and measurements: docs/notes/kernel_notes.md.

Chunked prefill (``mdkv::packed_chunk_attention``, ``packed_chunk_attention``): the same two kernels
generalised to ``L`` query tokens per sequence (the last ``L`` of the new tokens, causal among them),
the ``G * L`` query rows of an owner cut into blocks of ``BLOCK_M`` rows on grid axis 2. Checked
against float64 references under Triton's interpreter and compiled on an H200 (tests pass there); timing:
``mdkv bench --chunks`` (docs/notes/kernel_notes.md). ``MixedDimLayer.attend`` runs it for chunks on CUDA.

Launch parameters (split count policy, rows per block, warps, stages): ``Tuning``; every caller gets
``DEFAULT_TUNING``, the ``*_triton`` entry points take ``tuning=`` so ``mdkv bench --sweep`` can vary them.
"""

from __future__ import annotations

import dataclasses
import os

import torch
from torch import Tensor

from mdkv_compile.kernels._triton import HAS_TRITON, identity, next_pow2, sm_count, use_triton

if HAS_TRITON:
    import triton
    import triton.language as tl

    from mdkv_compile.kernels._triton import dot

MAX_REDUCED_TIERS = 4
_NEG_INF = float("-inf")


# ------------------------------------------------------------------------------------------------
# Pure torch version: CPU fallback (traceable: no data-dependent Python control flow)
# ------------------------------------------------------------------------------------------------


def _segment_ids(offsets: Tensor, n_rows: int) -> Tensor:
    """Owner of each row of a CSR-packed tier."""
    rows = torch.arange(n_rows, device=offsets.device, dtype=offsets.dtype)
    return torch.searchsorted(offsets[1:].contiguous(), rows, right=True)


def packed_attention_torch(
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
    compute_dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Same contract as ``packed_decode_attention`` (L = 1) and ``packed_chunk_attention`` (L >= 1: the
    queries are the last L of the n_new new tokens, causal among them; every stored token visible);
    computes in ``compute_dtype`` (float64 for checks)."""
    B, Hq, L, d = q.shape
    Hkv = k_new.shape[1]
    G = Hq // Hkv
    M = G * L  # query rows per owner, row r = g * L + l (q's own memory order)
    n_own = B * Hkv
    cd = compute_dtype
    qg = q.reshape(n_own, M, d).to(cd)  # owner o = b * Hkv + h serves query heads h*G .. h*G+G-1
    logits: list[Tensor] = []  # per region: [rows, M]
    owners: list[Tensor] = []
    vals: list[Tensor] = []  # per region: [rows, d] value contributions in head space (after rotation)
    for t, (kt, vt, off) in enumerate(zip(tier_keys, tier_values, tier_offsets, strict=True)):
        r = kt.shape[1]
        seg = _segment_ids(off, kt.shape[0])
        if t == 0:
            qs = qg[seg]  # [rows, M, d]
            vals.append(vt.to(cd))
        else:
            assert basis_k is not None and basis_v is not None
            qs = torch.einsum("ogd,odr->ogr", qg, basis_k[:, :, :r].to(cd))[seg]
            # rotating each value row back is fine for a reference; the kernel rotates sums once
            vals.append(torch.einsum("nr,ndr->nd", vt.to(cd), basis_v[seg][:, :, :r].to(cd)))
        logits.append(torch.einsum("ngr,nr->ng", qs, kt.to(cd)))
        owners.append(seg)
    kn = k_new[:, :, :n_new].reshape(n_own, n_new, d).to(cd)
    s_new = torch.einsum("ogd,ond->ong", qg, kn)  # [owners, n_new, M]
    # new token j is visible to query row r (position n_new - L + r % L among the new tokens) iff j <= it
    pos = n_new - L + torch.arange(M, device=q.device) % L
    visible = torch.arange(n_new, device=q.device)[:, None] <= pos[None, :]
    logits.append(s_new.masked_fill(~visible, _NEG_INF).reshape(n_own * n_new, M))
    owners.append(torch.arange(n_own, device=q.device).repeat_interleave(n_new))
    vals.append(v_new[:, :, :n_new].reshape(n_own * n_new, d).to(cd))

    s = torch.cat(logits) * scale
    if softcap is not None:
        s = softcap * torch.tanh(s / softcap)
    seg = torch.cat(owners)
    v = torch.cat(vals)
    m = torch.full((n_own, M), _NEG_INF, dtype=cd, device=q.device)
    m = m.scatter_reduce(0, seg[:, None].expand(-1, M), s, reduce="amax")
    m = torch.where(torch.isinf(m), 0.0, m)  # rows with nothing visible: every p is exp(-inf) = 0
    p = torch.exp(s - m[seg])
    denom = torch.zeros(n_own, M, dtype=cd, device=q.device).index_add(0, seg, p)
    num = torch.zeros(n_own, M, d, dtype=cd, device=q.device).index_add(0, seg, p[:, :, None] * v[:, None, :])
    out = torch.where(denom[..., None] > 0, num / denom.clamp_min(1e-300)[..., None], 0.0)
    return out.reshape(B, Hq, L, d).to(q.dtype)


# ------------------------------------------------------------------------------------------------
# Triton kernels
# ------------------------------------------------------------------------------------------------

if HAS_TRITON:

    @triton.jit
    def _step(
        qop, k_ptr, v_ptr, start, hi, stride_n, m_i, l_i, acc, qk_scale, scale, softcap,
        D_T: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
        HAS_SOFTCAP: tl.constexpr, DOT_PREC: tl.constexpr, INTERP: tl.constexpr,
    ):
        """One block of BLOCK_N rows starting at `start` (< hi) of one region; logits in log2 units."""
        LOG2E: tl.constexpr = 1.4426950408889634
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        rows = start + offs_n
        rmask = rows < hi
        ptrs = rows[:, None].to(tl.int64) * stride_n + offs_d[None, :]
        msk = rmask[:, None] & (offs_d < D_T)[None, :]
        k = tl.load(k_ptr + ptrs, mask=msk, other=0.0)
        s = dot(qop, tl.trans(k), DOT_PREC, INTERP)  # [GP, BLOCK_N] fp32
        if HAS_SOFTCAP:
            x = s * (scale / softcap)
            # tanh through exp2 (portable to the interpreter); saturates cleanly at +-1
            th = 1.0 - 2.0 / (tl.exp2(x * (2.0 * LOG2E)) + 1.0)
            s = th * (softcap * LOG2E)
        else:
            s = s * qk_scale
        s = tl.where(rmask[None, :], s, float("-inf"))
        # every block holds >= 1 valid row, so m_new is finite and alpha never NaN
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_ptr + ptrs, mask=msk, other=0.0)
        acc = acc * alpha[:, None] + dot(p.to(v.dtype), v, DOT_PREC, INTERP)
        return m_new, l_i, acc

    @triton.jit
    def _region(
        qop,  # [GP, BLOCK_D] in the key dtype (the query, or q_rot for a reduced tier)
        k_ptr,
        v_ptr,
        lo,
        hi,
        stride_n,
        qk_scale,  # scale * log2(e); unused with softcap
        scale,
        softcap,
        GP: tl.constexpr,
        D_T: tl.constexpr,
        BLOCK_D: tl.constexpr,
        BLOCK_N: tl.constexpr,
        HAS_SOFTCAP: tl.constexpr,
        DOT_PREC: tl.constexpr,
        INTERP: tl.constexpr,
    ):
        """Online softmax over rows [lo, hi) of one region, from an empty state."""
        m_i = tl.full([GP], float("-inf"), tl.float32)
        l_i = tl.zeros([GP], tl.float32)
        acc = tl.zeros([GP, BLOCK_D], tl.float32)
        if INTERP:
            # Triton 3.6's interpreter cannot run range() over a runtime bound under numpy >= 2.4
            # (int() of a 1-element array); a while loop only needs bool(). Same arithmetic.
            start = lo
            while start < hi:
                m_i, l_i, acc = _step(qop, k_ptr, v_ptr, start, hi, stride_n, m_i, l_i, acc, qk_scale, scale,
                                      softcap, D_T, BLOCK_D, BLOCK_N, HAS_SOFTCAP, DOT_PREC, INTERP)
                start += BLOCK_N
        else:
            # a for loop, so the compiler software-pipelines the loads (num_stages)
            for start in range(lo, hi, BLOCK_N):
                m_i, l_i, acc = _step(qop, k_ptr, v_ptr, start, hi, stride_n, m_i, l_i, acc, qk_scale, scale,
                                      softcap, D_T, BLOCK_D, BLOCK_N, HAS_SOFTCAP, DOT_PREC, INTERP)
        return m_i, l_i, acc

    @triton.jit
    def _slice(n, s, S):
        """Rows [lo, hi) of split s of n rows cut into S near-equal slices."""
        per = tl.cdiv(n, S)
        lo = s * per
        hi = tl.minimum(lo + per, n)
        return lo, hi

    @triton.jit
    def _reduced_tier(
        qr_ptr,
        k_ptr,
        v_ptr,
        off_ptr,
        o,
        s,
        S,
        stride_qr,
        ml_ptr,
        coef_ptr,
        qk_scale,
        scale,
        softcap,
        G,
        T_IDX: tl.constexpr,
        NREG: tl.constexpr,
        R_MAX: tl.constexpr,
        GP: tl.constexpr,
        R_T: tl.constexpr,
        BLOCK_R: tl.constexpr,
        BLOCK_N: tl.constexpr,
        HAS_SOFTCAP: tl.constexpr,
        DOT_PREC: tl.constexpr,
        INTERP: tl.constexpr,
    ):
        offs_r = tl.arange(0, BLOCK_R)
        offs_g = tl.arange(0, GP)
        rmask = offs_r < R_T
        # q_rot[:, :R_T] (rotated once per owner on the host side: a [G, d] x [d, r_max] product per
        # owner, 8x fewer bytes per program than reading basis_k here); padded rows/columns are zero
        q_rot = tl.load(
            qr_ptr + (o * G + offs_g)[:, None].to(tl.int64) * stride_qr + offs_r[None, :],
            mask=(offs_g[:, None] < G) & rmask[None, :],
            other=0.0,
        )
        beg = tl.load(off_ptr + o)
        end = tl.load(off_ptr + o + 1)
        lo, hi = _slice(end - beg, s, S)
        m_i, l_i, acc = _region(
            q_rot, k_ptr + beg.to(tl.int64) * R_T, v_ptr + beg.to(tl.int64) * R_T, lo, hi, R_T,
            qk_scale, scale, softcap, GP, R_T, BLOCK_R, BLOCK_N, HAS_SOFTCAP, DOT_PREC, INTERP,
        )
        offs_g = tl.arange(0, GP)
        base = (o * S + s) * NREG + T_IDX
        tl.store(ml_ptr + (base * 2) * GP + offs_g, m_i)
        tl.store(ml_ptr + (base * 2 + 1) * GP + offs_g, l_i)
        cbase = ((o * S + s) * (NREG - 1) + (T_IDX - 1)).to(tl.int64) * G * R_MAX
        tl.store(
            coef_ptr + cbase + offs_g[:, None] * R_MAX + offs_r[None, :],
            acc,
            mask=(offs_g[:, None] < G) & rmask[None, :],
        )

    @triton.jit
    def _packed_decode_split(
        q_ptr,
        k0_ptr, v0_ptr, off0_ptr,
        k1_ptr, v1_ptr, off1_ptr,
        k2_ptr, v2_ptr, off2_ptr,
        k3_ptr, v3_ptr, off3_ptr,
        k4_ptr, v4_ptr, off4_ptr,
        qr_ptr, stride_qr,
        kn_ptr, vn_ptr, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
        n_new, n_new_ptr, H_KV, G, S,
        ml_ptr, acc_ptr, coef_ptr,
        qk_scale, scale, softcap,
        N_FROM_PTR: tl.constexpr,
        NUM_RED: tl.constexpr,
        R1: tl.constexpr, R2: tl.constexpr, R3: tl.constexpr, R4: tl.constexpr,
        BR1: tl.constexpr, BR2: tl.constexpr, BR3: tl.constexpr, BR4: tl.constexpr,
        BN1: tl.constexpr, BN2: tl.constexpr, BN3: tl.constexpr, BN4: tl.constexpr,
        R_MAX: tl.constexpr,
        GP: tl.constexpr,
        D: tl.constexpr,
        BLOCK_D: tl.constexpr,
        BLOCK_N: tl.constexpr,
        HAS_SOFTCAP: tl.constexpr,
        DOT_PREC: tl.constexpr,
        INTERP: tl.constexpr,
    ):
        o = tl.program_id(0)
        s = tl.program_id(1)
        reg = tl.program_id(2)  # 0: full tier + decoded region; t >= 1: reduced tier t
        NREG: tl.constexpr = NUM_RED + 1
        if N_FROM_PTR:
            # the count of decoded tokens lives on the device: a captured CUDA graph replays with
            # whatever the step wrote there, not the value seen at capture
            n_new = tl.load(n_new_ptr)
        # Inductor passes Python floats as fp64 scalars: keep the softmax state fp32
        qk_scale = tl.cast(qk_scale, tl.float32)
        scale = tl.cast(scale, tl.float32)
        softcap = tl.cast(softcap, tl.float32)
        b = o // H_KV
        h = o % H_KV
        offs_g = tl.arange(0, GP)
        offs_d = tl.arange(0, BLOCK_D)
        gmask = offs_g < G
        q = tl.load(
            q_ptr + (o * G + offs_g)[:, None].to(tl.int64) * D + offs_d[None, :],
            mask=gmask[:, None] & (offs_d[None, :] < D),
            other=0.0,
        )

        if reg == 0:
            # full tier (stored as is)
            beg = tl.load(off0_ptr + o)
            end = tl.load(off0_ptr + o + 1)
            lo, hi = _slice(end - beg, s, S)
            m_a, l_a, acc_a = _region(
                q, k0_ptr + beg.to(tl.int64) * D, v0_ptr + beg.to(tl.int64) * D, lo, hi, D,
                qk_scale, scale, softcap, GP, D, BLOCK_D, BLOCK_N, HAS_SOFTCAP, DOT_PREC, INTERP,
            )
            # decoded region [B, H_kv, n_new, d] (full dimension)
            lo, hi = _slice(n_new, s, S)
            m_b, l_b, acc_b = _region(
                q,
                kn_ptr + b.to(tl.int64) * stride_kb + h.to(tl.int64) * stride_kh,
                vn_ptr + b.to(tl.int64) * stride_vb + h.to(tl.int64) * stride_vh,
                lo, hi, stride_kn,
                qk_scale, scale, softcap, GP, D, BLOCK_D, BLOCK_N, HAS_SOFTCAP, DOT_PREC, INTERP,
            )
            # stride_vn must equal stride_kn (checked on the host); both regions share `ptrs`
            m = tl.maximum(m_a, m_b)
            # an empty region has m = -inf and weight exp2(-inf) = 0; a finite stand-in for m when both
            # are empty avoids -inf - -inf
            m_s = tl.where(m > float("-inf"), m, 0.0)
            w_a = tl.exp2(m_a - m_s)
            w_b = tl.exp2(m_b - m_s)
            l_full = l_a * w_a + l_b * w_b
            acc = acc_a * w_a[:, None] + acc_b * w_b[:, None]
            base = (o * S + s) * NREG
            tl.store(ml_ptr + (base * 2) * GP + offs_g, m)
            tl.store(ml_ptr + (base * 2 + 1) * GP + offs_g, l_full)
            abase = (o * S + s).to(tl.int64) * G * D
            tl.store(
                acc_ptr + abase + offs_g[:, None] * D + offs_d[None, :],
                acc,
                mask=gmask[:, None] & (offs_d[None, :] < D),
            )

        if NUM_RED >= 1:
            if reg == 1:
                _reduced_tier(qr_ptr, k1_ptr, v1_ptr, off1_ptr, o, s, S, stride_qr, ml_ptr, coef_ptr,
                              qk_scale, scale, softcap, G, 1, NREG, R_MAX, GP, R1, BR1, BN1,
                              HAS_SOFTCAP, DOT_PREC, INTERP)
        if NUM_RED >= 2:
            if reg == 2:
                _reduced_tier(qr_ptr, k2_ptr, v2_ptr, off2_ptr, o, s, S, stride_qr, ml_ptr, coef_ptr,
                              qk_scale, scale, softcap, G, 2, NREG, R_MAX, GP, R2, BR2, BN2,
                              HAS_SOFTCAP, DOT_PREC, INTERP)
        if NUM_RED >= 3:
            if reg == 3:
                _reduced_tier(qr_ptr, k3_ptr, v3_ptr, off3_ptr, o, s, S, stride_qr, ml_ptr, coef_ptr,
                              qk_scale, scale, softcap, G, 3, NREG, R_MAX, GP, R3, BR3, BN3,
                              HAS_SOFTCAP, DOT_PREC, INTERP)
        if NUM_RED >= 4:
            if reg == 4:
                _reduced_tier(qr_ptr, k4_ptr, v4_ptr, off4_ptr, o, s, S, stride_qr, ml_ptr, coef_ptr,
                              qk_scale, scale, softcap, G, 4, NREG, R_MAX, GP, R4, BR4, BN4,
                              HAS_SOFTCAP, DOT_PREC, INTERP)

    @triton.jit
    def _merge_coef(
        coef_ptr, w, offs_s, smask, o, g, S, G,
        T_IDX: tl.constexpr, NREG: tl.constexpr, R_MAX: tl.constexpr, R_T: tl.constexpr,
        BLOCK_REG: tl.constexpr,
    ):
        """sum over a chunk of splits of weight * coef for reduced tier T_IDX, padded to [R_MAX]."""
        offs_r = tl.arange(0, R_MAX)
        offs_reg = tl.arange(0, BLOCK_REG)
        w_t = tl.sum(tl.where(offs_reg[None, :] == T_IDX, w, 0.0), 1)  # [BLOCK_S]
        rows = ((o * S + offs_s) * (NREG - 1) + (T_IDX - 1)).to(tl.int64) * G + g
        c = tl.load(coef_ptr + rows[:, None] * R_MAX + offs_r[None, :],
                    mask=smask[:, None] & (offs_r[None, :] < R_T), other=0.0)
        return tl.sum(w_t[:, None] * c, 0)

    @triton.jit
    def _packed_decode_merge(
        ml_ptr, acc_ptr, coef_ptr, bv_ptr, stride_bo, stride_bd, out_ptr, G, S,
        NUM_RED: tl.constexpr,
        R1: tl.constexpr, R2: tl.constexpr, R3: tl.constexpr, R4: tl.constexpr,
        R_MAX: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr,
        BLOCK_REG: tl.constexpr, BLOCK_S: tl.constexpr,
    ):
        """Grid (owners, G): one query head per program. Splits are read BLOCK_S at a time (independent
        loads, not a serial chain); all reduced tiers are summed in one [R_MAX] coefficient vector and
        rotated back once with basis_v[o]."""
        o = tl.program_id(0)
        g = tl.program_id(1)
        NREG: tl.constexpr = NUM_RED + 1
        offs_d = tl.arange(0, BLOCK_D)
        offs_reg = tl.arange(0, BLOCK_REG)
        offs_sb = tl.arange(0, BLOCK_S)
        regmask = offs_reg[None, :] < NREG
        # pass 1: the largest logit over every partial of this (owner, head)
        m_vec = tl.full([BLOCK_REG], float("-inf"), tl.float32)
        s0 = 0
        while s0 < S:  # while, not range(): runs in the interpreter too (see _region)
            offs_s = s0 + offs_sb
            idx = ((o * S + offs_s[:, None]) * NREG + offs_reg[None, :]) * 2 * GP + g
            mm = tl.load(ml_ptr + idx, mask=(offs_s[:, None] < S) & regmask, other=float("-inf"))
            m_vec = tl.maximum(m_vec, tl.max(mm, 0))
            s0 += BLOCK_S
        m_max = tl.max(m_vec, 0)
        # an owner with no token at all: every m is -inf; a finite m_max keeps every weight at 0
        m_max = tl.where(m_max > float("-inf"), m_max, 0.0)
        # pass 2: weights, denominators, value sums
        l_vec = tl.zeros([BLOCK_REG], tl.float32)
        acc = tl.zeros([BLOCK_D], tl.float32)
        coef = tl.zeros([R_MAX], tl.float32)
        s0 = 0
        while s0 < S:
            offs_s = s0 + offs_sb
            smask = offs_s < S
            idx = ((o * S + offs_s[:, None]) * NREG + offs_reg[None, :]) * 2 * GP + g
            msk = smask[:, None] & regmask
            mm = tl.load(ml_ptr + idx, mask=msk, other=float("-inf"))
            ll = tl.load(ml_ptr + idx + GP, mask=msk, other=0.0)
            w = tl.exp2(mm - m_max)  # empty partials (m = -inf) weigh 0
            l_vec += tl.sum(w * ll, 0)
            w0 = tl.sum(tl.where(offs_reg[None, :] == 0, w, 0.0), 1)  # [BLOCK_S]
            arow = (o * S + offs_s).to(tl.int64) * G + g
            a = tl.load(acc_ptr + arow[:, None] * D + offs_d[None, :],
                        mask=smask[:, None] & (offs_d[None, :] < D), other=0.0)
            acc += tl.sum(w0[:, None] * a, 0)
            if NUM_RED >= 1:
                coef += _merge_coef(coef_ptr, w, offs_s, smask, o, g, S, G, 1, NREG, R_MAX, R1, BLOCK_REG)
            if NUM_RED >= 2:
                coef += _merge_coef(coef_ptr, w, offs_s, smask, o, g, S, G, 2, NREG, R_MAX, R2, BLOCK_REG)
            if NUM_RED >= 3:
                coef += _merge_coef(coef_ptr, w, offs_s, smask, o, g, S, G, 3, NREG, R_MAX, R3, BLOCK_REG)
            if NUM_RED >= 4:
                coef += _merge_coef(coef_ptr, w, offs_s, smask, o, g, S, G, 4, NREG, R_MAX, R4, BLOCK_REG)
            s0 += BLOCK_S
        if NUM_RED >= 1:
            # rotate back once: acc += basis_v[o] @ coef, as a broadcast-multiply-sum in fp32 (exact
            # fp32 products; a [1 x R] dot would need padding to 16 rows anyway)
            offs_r = tl.arange(0, R_MAX)
            bv = tl.load(bv_ptr + o.to(tl.int64) * stride_bo + offs_d[:, None] * stride_bd + offs_r[None, :],
                         mask=(offs_d[:, None] < D) & (offs_r[None, :] < R1), other=0.0).to(tl.float32)
            acc += tl.sum(bv * coef[None, :], 1)
        l_tot = tl.sum(l_vec, 0)
        out = tl.where(l_tot > 0, acc / tl.where(l_tot > 0, l_tot, 1.0), 0.0)
        tl.store(out_ptr + (o * G + g).to(tl.int64) * D + offs_d, out.to(out_ptr.dtype.element_ty),
                 mask=offs_d < D)


    # --------------------------------------------------------------------------------------------
    # Chunked prefill: L >= 1 query tokens per sequence, the last L of the n_new new tokens, causal
    # among them. Same structure as decode with the G*L query rows of an owner cut into blocks of
    # BLOCK_M rows (grid axis 2 = region x row block). Separate kernels so the decode kernels
    # measured on the H200 stay as they were; decode is the L = 1 case of these.
    # --------------------------------------------------------------------------------------------

    @triton.jit
    def _step_causal(
        qop, k_ptr, v_ptr, start, hi, stride_n, lim, m_i, l_i, acc, qk_scale, scale, softcap,
        D_T: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
        HAS_SOFTCAP: tl.constexpr, DOT_PREC: tl.constexpr, INTERP: tl.constexpr,
    ):
        """_step with a per-query-row limit: key row j is visible to query row i iff j <= lim[i]."""
        LOG2E: tl.constexpr = 1.4426950408889634
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        rows = start + offs_n
        rmask = rows < hi
        ptrs = rows[:, None].to(tl.int64) * stride_n + offs_d[None, :]
        msk = rmask[:, None] & (offs_d < D_T)[None, :]
        k = tl.load(k_ptr + ptrs, mask=msk, other=0.0)
        s = dot(qop, tl.trans(k), DOT_PREC, INTERP)
        if HAS_SOFTCAP:
            x = s * (scale / softcap)
            th = 1.0 - 2.0 / (tl.exp2(x * (2.0 * LOG2E)) + 1.0)
            s = th * (softcap * LOG2E)
        else:
            s = s * qk_scale
        s = tl.where(rmask[None, :] & (rows[None, :] <= lim[:, None]), s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # a row may see nothing in this block (and have seen nothing before): keep its state at 0
        m_use = tl.where(m_new > float("-inf"), m_new, 0.0)
        alpha = tl.exp2(m_i - m_use)
        p = tl.exp2(s - m_use[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_ptr + ptrs, mask=msk, other=0.0)
        acc = acc * alpha[:, None] + dot(p.to(v.dtype), v, DOT_PREC, INTERP)
        return m_new, l_i, acc

    @triton.jit
    def _region_causal(
        qop, k_ptr, v_ptr, lo, hi, stride_n, lim, qk_scale, scale, softcap,
        GP: tl.constexpr, D_T: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
        HAS_SOFTCAP: tl.constexpr, DOT_PREC: tl.constexpr, INTERP: tl.constexpr,
    ):
        m_i = tl.full([GP], float("-inf"), tl.float32)
        l_i = tl.zeros([GP], tl.float32)
        acc = tl.zeros([GP, BLOCK_D], tl.float32)
        hi = tl.minimum(hi, tl.max(lim, 0) + 1)  # blocks past every row's limit are skipped
        if INTERP:
            start = lo
            while start < hi:
                m_i, l_i, acc = _step_causal(qop, k_ptr, v_ptr, start, hi, stride_n, lim, m_i, l_i, acc,
                                             qk_scale, scale, softcap, D_T, BLOCK_D, BLOCK_N, HAS_SOFTCAP,
                                             DOT_PREC, INTERP)
                start += BLOCK_N
        else:
            for start in range(lo, hi, BLOCK_N):
                m_i, l_i, acc = _step_causal(qop, k_ptr, v_ptr, start, hi, stride_n, lim, m_i, l_i, acc,
                                             qk_scale, scale, softcap, D_T, BLOCK_D, BLOCK_N, HAS_SOFTCAP,
                                             DOT_PREC, INTERP)
        return m_i, l_i, acc

    @triton.jit
    def _reduced_tier_rows(
        qr_ptr, k_ptr, v_ptr, off_ptr, o, s, S, stride_qr, ml_ptr, coef_ptr, qk_scale, scale, softcap,
        M, rows, rmask,
        T_IDX: tl.constexpr, NREG: tl.constexpr, R_MAX: tl.constexpr, BLOCK_M: tl.constexpr,
        M_P: tl.constexpr, R_T: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,
        HAS_SOFTCAP: tl.constexpr, DOT_PREC: tl.constexpr, INTERP: tl.constexpr,
    ):
        offs_r = tl.arange(0, BLOCK_R)
        cmask = offs_r < R_T
        q_rot = tl.load(qr_ptr + (o * M + rows)[:, None].to(tl.int64) * stride_qr + offs_r[None, :],
                        mask=rmask[:, None] & cmask[None, :], other=0.0)
        beg = tl.load(off_ptr + o)
        end = tl.load(off_ptr + o + 1)
        lo, hi = _slice(end - beg, s, S)
        m_i, l_i, acc = _region(
            q_rot, k_ptr + beg.to(tl.int64) * R_T, v_ptr + beg.to(tl.int64) * R_T, lo, hi, R_T,
            qk_scale, scale, softcap, BLOCK_M, R_T, BLOCK_R, BLOCK_N, HAS_SOFTCAP, DOT_PREC, INTERP,
        )
        base = (o * S + s) * NREG + T_IDX
        tl.store(ml_ptr + (base * 2) * M_P + rows, m_i)
        tl.store(ml_ptr + (base * 2 + 1) * M_P + rows, l_i)
        crow = ((o * S + s) * (NREG - 1) + (T_IDX - 1)).to(tl.int64) * M + rows
        tl.store(coef_ptr + crow[:, None] * R_MAX + offs_r[None, :], acc, mask=rmask[:, None] & cmask[None, :])

    @triton.jit
    def _packed_chunk_split(
        q_ptr,
        k0_ptr, v0_ptr, off0_ptr,
        k1_ptr, v1_ptr, off1_ptr,
        k2_ptr, v2_ptr, off2_ptr,
        k3_ptr, v3_ptr, off3_ptr,
        k4_ptr, v4_ptr, off4_ptr,
        qr_ptr, stride_qr,
        kn_ptr, vn_ptr, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
        n_new, L, H_KV, M, S, NMB,
        ml_ptr, acc_ptr, coef_ptr,
        qk_scale, scale, softcap,
        NUM_RED: tl.constexpr,
        R1: tl.constexpr, R2: tl.constexpr, R3: tl.constexpr, R4: tl.constexpr,
        BR1: tl.constexpr, BR2: tl.constexpr, BR3: tl.constexpr, BR4: tl.constexpr,
        BN1: tl.constexpr, BN2: tl.constexpr, BN3: tl.constexpr, BN4: tl.constexpr,
        R_MAX: tl.constexpr,
        BLOCK_M: tl.constexpr,
        M_P: tl.constexpr,
        D: tl.constexpr,
        BLOCK_D: tl.constexpr,
        BLOCK_N: tl.constexpr,
        HAS_SOFTCAP: tl.constexpr,
        DOT_PREC: tl.constexpr,
        INTERP: tl.constexpr,
    ):
        o = tl.program_id(0)
        s = tl.program_id(1)
        reg = tl.program_id(2) // NMB  # 0: full tier + new tokens; t >= 1: reduced tier t
        mb = tl.program_id(2) % NMB  # block of BLOCK_M query rows (row r = g * L + l)
        NREG: tl.constexpr = NUM_RED + 1
        qk_scale = tl.cast(qk_scale, tl.float32)
        scale = tl.cast(scale, tl.float32)
        softcap = tl.cast(softcap, tl.float32)
        b = o // H_KV
        h = o % H_KV
        rows = mb * BLOCK_M + tl.arange(0, BLOCK_M)
        rmask = rows < M
        offs_d = tl.arange(0, BLOCK_D)
        q = tl.load(q_ptr + (o * M + rows)[:, None].to(tl.int64) * D + offs_d[None, :],
                    mask=rmask[:, None] & (offs_d[None, :] < D), other=0.0)
        if reg == 0:
            beg = tl.load(off0_ptr + o)
            end = tl.load(off0_ptr + o + 1)
            lo, hi = _slice(end - beg, s, S)
            m_a, l_a, acc_a = _region(
                q, k0_ptr + beg.to(tl.int64) * D, v0_ptr + beg.to(tl.int64) * D, lo, hi, D,
                qk_scale, scale, softcap, BLOCK_M, D, BLOCK_D, BLOCK_N, HAS_SOFTCAP, DOT_PREC, INTERP,
            )
            # query row r is new token n_new - L + r % L: it sees new tokens 0 .. that position
            lim = tl.where(rmask, n_new - L + rows % L, -1)
            lo, hi = _slice(n_new, s, S)
            m_b, l_b, acc_b = _region_causal(
                q,
                kn_ptr + b.to(tl.int64) * stride_kb + h.to(tl.int64) * stride_kh,
                vn_ptr + b.to(tl.int64) * stride_vb + h.to(tl.int64) * stride_vh,
                lo, hi, stride_kn, lim,
                qk_scale, scale, softcap, BLOCK_M, D, BLOCK_D, BLOCK_N, HAS_SOFTCAP, DOT_PREC, INTERP,
            )
            m = tl.maximum(m_a, m_b)
            m_s = tl.where(m > float("-inf"), m, 0.0)
            w_a = tl.exp2(m_a - m_s)
            w_b = tl.exp2(m_b - m_s)
            base = (o * S + s) * NREG
            tl.store(ml_ptr + (base * 2) * M_P + rows, m)
            tl.store(ml_ptr + (base * 2 + 1) * M_P + rows, l_a * w_a + l_b * w_b)
            arow = (o * S + s).to(tl.int64) * M + rows
            tl.store(acc_ptr + arow[:, None] * D + offs_d[None, :], acc_a * w_a[:, None] + acc_b * w_b[:, None],
                     mask=rmask[:, None] & (offs_d[None, :] < D))
        if NUM_RED >= 1:
            if reg == 1:
                _reduced_tier_rows(qr_ptr, k1_ptr, v1_ptr, off1_ptr, o, s, S, stride_qr, ml_ptr, coef_ptr,
                                   qk_scale, scale, softcap, M, rows, rmask, 1, NREG, R_MAX, BLOCK_M, M_P,
                                   R1, BR1, BN1, HAS_SOFTCAP, DOT_PREC, INTERP)
        if NUM_RED >= 2:
            if reg == 2:
                _reduced_tier_rows(qr_ptr, k2_ptr, v2_ptr, off2_ptr, o, s, S, stride_qr, ml_ptr, coef_ptr,
                                   qk_scale, scale, softcap, M, rows, rmask, 2, NREG, R_MAX, BLOCK_M, M_P,
                                   R2, BR2, BN2, HAS_SOFTCAP, DOT_PREC, INTERP)
        if NUM_RED >= 3:
            if reg == 3:
                _reduced_tier_rows(qr_ptr, k3_ptr, v3_ptr, off3_ptr, o, s, S, stride_qr, ml_ptr, coef_ptr,
                                   qk_scale, scale, softcap, M, rows, rmask, 3, NREG, R_MAX, BLOCK_M, M_P,
                                   R3, BR3, BN3, HAS_SOFTCAP, DOT_PREC, INTERP)
        if NUM_RED >= 4:
            if reg == 4:
                _reduced_tier_rows(qr_ptr, k4_ptr, v4_ptr, off4_ptr, o, s, S, stride_qr, ml_ptr, coef_ptr,
                                   qk_scale, scale, softcap, M, rows, rmask, 4, NREG, R_MAX, BLOCK_M, M_P,
                                   R4, BR4, BN4, HAS_SOFTCAP, DOT_PREC, INTERP)


# ------------------------------------------------------------------------------------------------
# Launch
# ------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Tuning:
    """Launch parameters of the split and merge kernels (values: docs/notes/kernel_notes.md). The defaults
    are what every caller gets; a benchmark passes its own instance (``tuning=``) to sweep them."""

    # split-K target: enough programs in flight to cover memory latency. The H200 sweep
    # (benchmarks/results/issue5_sweep_h200.json) found the best split counts 8 / 2 / 1 at
    # 128K x 8 / 32K x 32 / 8K x 64 (4 regions); 15 programs per SM gives exactly those (4 gave 3 / 1 / 1).
    programs_per_sm: int = 15
    min_rows_per_split: int = 64  # below this a split's fixed cost (q, bases, partial writes) dominates
    # At batch 1 the per-SM target asks for ~60 splits of 128K, measured slower there than ~17
    # (41.8 vs 30.1 us at 128K x 1 on the H200, docs/notes/kernel_notes.md): at most 16.
    max_splits: int = 16
    splits: int | None = None  # a fixed split count (sweeps); None: the policy of `_num_splits`
    num_warps: int = 4
    num_stages: int = 3  # sweep on H200 (docs/notes/kernel_notes.md): 3 beat 2 at B=64, tied at B=1
    block_n_full: int = 32  # rows per block, full tier and decoded region (sweep: 32 beat 64 at all 3 shapes)
    block_n_reduced_max: int = 128  # rows per block of a reduced tier (~16 KiB of keys, at most this)
    merge_block_s: int = 16  # splits read at once by the merge
    chunk_block_m: int = 64  # chunked prefill: query rows (G * L) per program; not tuned on a GPU yet


DEFAULT_TUNING = Tuning()


def _num_splits(n_owners: int, n_regions: int, avg_rows: int, n_sm: int, tuning: Tuning = DEFAULT_TUNING) -> int:
    """Splits per (owner, region) from shapes only (no device sync, no recompiles: S is a runtime
    argument). avg_rows: rows per owner over all regions."""
    if tuning.splits is not None:
        return max(1, int(tuning.splits))
    want = max(1, -(-tuning.programs_per_sm * n_sm // (n_owners * n_regions)))
    cap = max(1, avg_rows // (n_regions * tuning.min_rows_per_split))
    return int(min(want, cap, tuning.max_splits))


def _check_devices(q: Tensor, *tensors: Tensor | None) -> None:
    """Every kernel argument on q's device: a stray CPU tensor would otherwise fail deep in the launcher."""
    for t in tensors:
        if t is not None and t.device != q.device:
            raise ValueError(f"packed attention: an argument is on {t.device}, the query on {q.device}")


@dataclasses.dataclass
class _Prepared:
    """The launch arguments shared by the decode and chunk kernels (one place for both)."""

    q: Tensor  # contiguous query
    keys: list[Tensor]
    vals: list[Tensor]
    offs: list[Tensor]
    bk: Tensor
    bv: Tensor
    n_red: int
    r_max_p: int
    block_d: int
    tier_args: list  # full tier + 4 reduced slots (unused slots point at the full tier), for the split kernels
    tier_consts: dict  # R1..R4, BR1..BR4, BN1..BN4
    block_n: int
    stride_bo: int
    stride_bd: int

    def q_rot(self, n_own: int, rows: int, d: int) -> Tensor:
        """basis_k[o].T @ q for every query row of owner o, once: [owners, rows, r_max]."""
        flat = self.q.view(n_own, rows, d)
        return torch.matmul(flat, self.bk).contiguous() if self.n_red else flat


def _prepare(
    q: Tensor,
    tier_keys: list[Tensor],
    tier_values: list[Tensor],
    tier_offsets: list[Tensor],
    basis_k: Tensor | None,
    basis_v: Tensor | None,
    k_new: Tensor,
    v_new: Tensor,
    *others: Tensor | None,
    tuning: Tuning,
) -> _Prepared:
    _check_devices(q, *tier_keys, *tier_values, *tier_offsets, basis_k, basis_v, k_new, v_new, *others)
    d = q.shape[-1]
    n_red = len(tier_keys) - 1
    assert q.shape[1] % k_new.shape[1] == 0 and 0 <= n_red <= MAX_REDUCED_TIERS
    assert tier_keys[0].shape[-1] == d and k_new.shape[-1] == d
    assert k_new.stride(-1) == 1 and v_new.stride(-1) == 1 and k_new.stride(2) == v_new.stride(2)
    dims = [int(k.shape[1]) for k in tier_keys[1:]]
    assert all(0 < r <= d for r in dims)
    keys = [k.contiguous() for k in tier_keys]
    vals = [v.contiguous() for v in tier_values]
    offs = [o.to(torch.int32).contiguous() for o in tier_offsets]
    if n_red:
        assert basis_k is not None and basis_v is not None
        bk, bv = basis_k.contiguous(), basis_v.contiguous()  # one stride pair serves both
        r_max = int(max(dims))
    else:  # no reduced tier: any tensor will do as an unused pointer
        bk = bv = keys[0]
        r_max = 16
    block_d = max(16, next_pow2(d))
    # padding to 5 tiers: unused slots point at the full tier and are skipped (NUM_RED constexpr)
    pad = MAX_REDUCED_TIERS - n_red
    ks, vs, os_ = keys[1:] + [keys[0]] * pad, vals[1:] + [vals[0]] * pad, offs[1:] + [offs[0]] * pad
    rs = dims + [16] * pad
    brs = [max(16, next_pow2(r)) for r in rs]
    # larger row blocks for narrow tiers: ~16 KiB of keys per block
    bns = [int(min(tuning.block_n_reduced_max, max(64, 8192 // br))) for br in brs]
    tier_args = [keys[0], vals[0], offs[0]]
    for t in range(MAX_REDUCED_TIERS):
        tier_args += [ks[t], vs[t], os_[t]]
    consts = {}
    for t in range(MAX_REDUCED_TIERS):
        consts.update({f"R{t + 1}": rs[t], f"BR{t + 1}": brs[t], f"BN{t + 1}": bns[t]})
    return _Prepared(
        q=q.contiguous(), keys=keys, vals=vals, offs=offs, bk=bk, bv=bv, n_red=n_red,
        r_max_p=next_pow2(max(r_max, 16)), block_d=block_d, tier_args=tier_args, tier_consts=consts,
        block_n=tuning.block_n_full if block_d <= 128 else min(tuning.block_n_full, 32),
        stride_bo=bk.stride(0) if n_red else 0, stride_bd=bk.stride(1) if n_red else 0,
    )


def _workspace(
    p: _Prepared, n_own: int, splits: int, rows: int, rows_padded: int, d: int, poison: bool
) -> tuple[Tensor, Tensor, Tensor]:
    """Per-split partials: (m, l) per padded row and region, acc per row, reduced-tier coefficients."""
    nreg = p.n_red + 1
    dev = p.q.device
    ml = torch.empty(n_own * splits * nreg * 2 * rows_padded, device=dev, dtype=torch.float32)
    acc = torch.empty(n_own * splits * rows * d, device=dev, dtype=torch.float32)
    coef = torch.empty(max(1, n_own * splits * p.n_red * rows * p.r_max_p), device=dev, dtype=torch.float32)
    if poison:  # tests: any read of an unwritten workspace element shows up as NaN
        for t in (ml, acc, coef):
            t.fill_(float("nan"))
    return ml, acc, coef


def _merge(wrap, p: _Prepared, ml, acc, coef, out: Tensor, n_own: int, rows: int, rows_padded: int, splits: int,
           d: int, tuning: Tuning) -> None:
    """Log-sum-exp merge of the split partials into `out`: one program per (owner, query row)."""
    wrap(_packed_decode_merge)[(n_own, rows)](
        ml, acc, coef, p.bv, p.stride_bo, p.stride_bd, out, rows, splits,
        NUM_RED=p.n_red,
        R1=p.tier_consts["R1"], R2=p.tier_consts["R2"], R3=p.tier_consts["R3"], R4=p.tier_consts["R4"],
        R_MAX=p.r_max_p, GP=rows_padded, D=d, BLOCK_D=p.block_d, BLOCK_REG=next_pow2(max(2, p.n_red + 1)),
        BLOCK_S=tuning.merge_block_s,
        num_warps=4,
    )


def _output(out: Tensor | None, q: Tensor) -> Tensor:
    if out is None:
        return torch.empty(q.shape, device=q.device, dtype=q.dtype)
    assert out.shape == q.shape and out.is_contiguous() and out.dtype == q.dtype
    return out


def _launch(
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
    softcap: float | None,
    wrap,  # wrap_triton inside the triton_op (Inductor sees the kernels), identity otherwise
    out: Tensor | None = None,
    poison_workspace: bool = False,
    n_decoded: Tensor | None = None,
    tuning: Tuning | None = None,
) -> Tensor:
    """Decode launch. ``n_decoded`` (int64 ``[1]`` on the device), when given, is the number of decoded
    tokens the kernel reads, and ``n_new`` only sizes the splits (pass the region's capacity)."""
    tuning = tuning or DEFAULT_TUNING
    p = _prepare(q, tier_keys, tier_values, tier_offsets, basis_k, basis_v, k_new, v_new, n_decoded, out,
                 tuning=tuning)
    B, Hq, Lq, d = q.shape
    assert Lq == 1, "decode kernel: one query token per sequence"
    Hkv = k_new.shape[1]
    G, n_own, nreg = Hq // Hkv, B * Hkv, p.n_red + 1
    GP = max(16, next_pow2(G))
    avg_rows = sum(int(k.shape[0]) for k in p.keys) // max(n_own, 1) + n_new
    S = _num_splits(n_own, nreg, avg_rows, sm_count(q.device), tuning)
    ml, acc, coef = _workspace(p, n_own, S, G, GP, d, poison_workspace)
    out = _output(out, q)
    q_rot = p.q_rot(n_own, G, d)
    has_cap = softcap is not None
    wrap(_packed_decode_split)[(n_own, S, nreg)](
        p.q, *p.tier_args,
        q_rot, q_rot.stride(1),
        k_new, v_new, k_new.stride(0), k_new.stride(1), k_new.stride(2),
        v_new.stride(0), v_new.stride(1), v_new.stride(2),
        n_new, p.q if n_decoded is None else n_decoded, Hkv, G, S,
        ml, acc, coef,
        scale * 1.4426950408889634, scale, float(softcap) if has_cap else 1.0,
        N_FROM_PTR=n_decoded is not None,
        NUM_RED=p.n_red, **p.tier_consts,
        R_MAX=p.r_max_p, GP=GP, D=d, BLOCK_D=p.block_d, BLOCK_N=p.block_n,
        HAS_SOFTCAP=has_cap, DOT_PREC=q.dtype == torch.float32, INTERP=os.environ.get("TRITON_INTERPRET") == "1",
        num_warps=tuning.num_warps, num_stages=tuning.num_stages,
    )
    _merge(wrap, p, ml, acc, coef, out, n_own, G, GP, S, d, tuning)
    return out


def _launch_chunk(
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
    softcap: float | None,
    wrap,
    out: Tensor | None = None,
    poison_workspace: bool = False,
    tuning: Tuning | None = None,
) -> Tensor:
    """Chunked prefill: q [B, Hq, L, d] are the last L of the n_new new tokens (causal among them)."""
    tuning = tuning or DEFAULT_TUNING
    p = _prepare(q, tier_keys, tier_values, tier_offsets, basis_k, basis_v, k_new, v_new, out, tuning=tuning)
    B, Hq, L, d = q.shape
    assert 1 <= L <= n_new <= k_new.shape[2], "the queries are the last L of the n_new new tokens"
    Hkv = k_new.shape[1]
    M, n_own, nreg = (Hq // Hkv) * L, B * Hkv, p.n_red + 1
    BLOCK_M = max(16, min(tuning.chunk_block_m, next_pow2(M)))
    NMB = -(-M // BLOCK_M)
    M_P = NMB * BLOCK_M
    avg_rows = sum(int(k.shape[0]) for k in p.keys) // max(n_own, 1) + n_new
    S = _num_splits(n_own * NMB, nreg, avg_rows, sm_count(q.device), tuning)
    ml, acc, coef = _workspace(p, n_own, S, M, M_P, d, poison_workspace)
    out = _output(out, q)
    q_rot = p.q_rot(n_own, M, d)
    has_cap = softcap is not None
    wrap(_packed_chunk_split)[(n_own, S, nreg * NMB)](
        p.q, *p.tier_args,
        q_rot, q_rot.stride(1),
        k_new, v_new, k_new.stride(0), k_new.stride(1), k_new.stride(2),
        v_new.stride(0), v_new.stride(1), v_new.stride(2),
        n_new, L, Hkv, M, S, NMB,
        ml, acc, coef,
        scale * 1.4426950408889634, scale, float(softcap) if has_cap else 1.0,
        NUM_RED=p.n_red, **p.tier_consts,
        R_MAX=p.r_max_p, BLOCK_M=BLOCK_M, M_P=M_P, D=d, BLOCK_D=p.block_d, BLOCK_N=p.block_n,
        HAS_SOFTCAP=has_cap, DOT_PREC=q.dtype == torch.float32, INTERP=os.environ.get("TRITON_INTERPRET") == "1",
        num_warps=tuning.num_warps, num_stages=tuning.num_stages,
    )
    # the decode merge serves any number of rows per owner: rows = G * L, row stride M_P
    _merge(wrap, p, ml, acc, coef, out, n_own, M, M_P, S, d, tuning)
    return out


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
    out: Tensor | None = None,
    poison_workspace: bool = False,
    n_decoded: Tensor | None = None,
    tuning: Tuning | None = None,
) -> Tensor:
    """The Triton path called directly (no op dispatch). ``out`` and ``poison_workspace`` let tests
    check that every output element is written and no unwritten workspace element is read;
    ``tuning`` replaces the launch parameters (benchmarks; None: ``DEFAULT_TUNING``)."""
    return _launch(q, tier_keys, tier_values, tier_offsets, basis_k, basis_v, k_new, v_new, n_new, scale,
                   softcap, identity, out=out, poison_workspace=poison_workspace, n_decoded=n_decoded, tuning=tuning)


def _op_impl(
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
) -> Tensor:
    if use_triton(q):
        from torch.library import wrap_triton

        return _launch(q, tier_keys, tier_values, tier_offsets, basis_k, basis_v, k_new, v_new, n_new,
                       scale, softcap, wrap_triton, n_decoded=n_decoded)
    if n_decoded is not None:  # the reference path needs the count on the host
        n_new = int(n_decoded.reshape(-1)[0])
    return packed_attention_torch(q, tier_keys, tier_values, tier_offsets, basis_k, basis_v, k_new, v_new, n_new,
                                  scale, softcap)


# Registered once per process; the schema takes the tiers as Tensor[] (full tier first, then at most
# MAX_REDUCED_TIERS reduced ones, largest first), bases as optional tensors.
_packed_decode_op = torch.library.triton_op("mdkv::packed_decode_attention", _op_impl, mutates_args=())


def packed_decode_attention(
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
) -> Tensor:
    """Decode attention over a packed store plus the full-dimension decoded region.

    q: ``[B, Hq, 1, d]``; ``tier_keys[t]`` / ``tier_values[t]``: ``[M_t, r_t]`` (``t = 0`` the full tier,
    ``r_0 = d``, stored unrotated; ``t > 0`` coefficients in the owner's basis), ``tier_offsets[t]``:
    ``[B * H_kv + 1]`` int32 CSR offsets by owner ``o = b * H_kv + h``; ``basis_k``/``basis_v``:
    ``[B * H_kv, d, r_max]`` (``None`` with no reduced tier); ``k_new``/``v_new``:
    ``[B, H_kv, n_cap, d]`` of which the first ``n_new`` positions are attended. Returns
    ``[B, Hq, 1, d]`` in q's dtype. An owner with no token at all gets a zero output.
    ``n_decoded``: int64 ``[1]`` on q's device holding the number of decoded tokens; when given, the
    kernel reads the count there (CUDA-graph replay) and ``n_new`` only sizes the work split.
    """
    return torch.ops.mdkv.packed_decode_attention(q, list(tier_keys), list(tier_values), list(tier_offsets),
                                                  basis_k, basis_v, k_new, v_new, int(n_new), float(scale),
                                                  None if softcap is None else float(softcap), n_decoded)


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
    out: Tensor | None = None,
    poison_workspace: bool = False,
    tuning: Tuning | None = None,
) -> Tensor:
    """The chunked-prefill Triton path called directly (see ``packed_chunk_attention``)."""
    return _launch_chunk(q, tier_keys, tier_values, tier_offsets, basis_k, basis_v, k_new, v_new, n_new, scale,
                         softcap, identity, out=out, poison_workspace=poison_workspace, tuning=tuning)


def _chunk_op_impl(
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
) -> Tensor:
    if use_triton(q):
        from torch.library import wrap_triton

        return _launch_chunk(q, tier_keys, tier_values, tier_offsets, basis_k, basis_v, k_new, v_new, n_new,
                             scale, softcap, wrap_triton)
    return packed_attention_torch(q, tier_keys, tier_values, tier_offsets, basis_k, basis_v, k_new, v_new, n_new,
                                  scale, softcap)


_packed_chunk_op = torch.library.triton_op("mdkv::packed_chunk_attention", _chunk_op_impl, mutates_args=())


def packed_chunk_attention(
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
) -> Tensor:
    """Chunked prefill over a packed store: ``q`` ``[B, Hq, L, d]`` are the last ``L`` of the ``n_new``
    tokens in ``k_new``/``v_new`` (already written there), causal among the new tokens; every stored
    token is visible. Other arguments as ``packed_decode_attention``; returns ``[B, Hq, L, d]``.
    Checked against float64 under the interpreter and on an H200; not timed (docs/notes/kernel_notes.md)."""
    return torch.ops.mdkv.packed_chunk_attention(q, list(tier_keys), list(tier_values), list(tier_offsets),
                                                 basis_k, basis_v, k_new, v_new, int(n_new), float(scale),
                                                 None if softcap is None else float(softcap))


def store_arguments(store) -> tuple[list[Tensor], list[Tensor], list[Tensor], Tensor | None, Tensor | None]:
    """The op's tier arguments from a ``mdkv_compile.core.packing.PackedStore``.

    Bridges the two places where the core store is more general than docs/packed_store.md: a tier
    with a uniform count per owner may carry ``offsets[t] = None`` (materialised here as
    ``arange * n``), and bases may be shared rows selected by ``basis_index`` (gathered per owner
    here: a copy of ``owners * d * r_max`` values per call; a kernel that indexes basis rows directly
    would avoid it). A store without a full tier gets an empty one.
    """
    owners = store.owners
    d = store.head_dim
    keys, vals, offs = list(store.keys), list(store.values), []
    for t in range(len(keys)):
        off = store.offsets[t]
        if off is None:
            n = keys[t].shape[0] // max(owners, 1)
            off = torch.arange(owners + 1, device=keys[t].device, dtype=torch.int32) * n
        offs.append(off.to(torch.int32))
    if store.tier_dims[0] != d:
        ref = keys[0]
        keys.insert(0, ref.new_empty(0, d))
        vals.insert(0, ref.new_empty(0, d))
        offs.insert(0, torch.zeros(owners + 1, dtype=torch.int32, device=ref.device))
    if len(keys) - 1 > MAX_REDUCED_TIERS:
        raise ValueError(f"{len(keys) - 1} reduced tiers; the kernel takes at most {MAX_REDUCED_TIERS}")
    return keys, vals, offs, store.owner_basis("k"), store.owner_basis("v")


def packed_store_attention(
    q: Tensor,
    store,
    k_new: Tensor | None,
    v_new: Tensor | None,
    n_new: int | None = None,
    scale: float | None = None,
    softcap: float | None = None,
    n_decoded: Tensor | None = None,
    arguments: tuple | None = None,
) -> Tensor:
    """Attention over a core ``PackedStore`` plus new tokens: ``packed_decode_attention`` for one query
    token, ``packed_chunk_attention`` for ``L > 1`` (the queries are the last ``L`` of the ``n_new``
    new tokens, causal among them). Same result as
    ``mdkv_compile.core.attention.attend_packed(q, store, k_new[:, :, :n_new], v_new[:, :, :n_new])``
    (every stored token visible, new tokens causally). ``arguments``: the store's ``store_arguments``
    computed once (a caller decoding many steps over one store saves the per-step work);
    ``n_decoded``: the decoded-token count on the device (decode only, see ``packed_decode_attention``)."""
    keys, vals, offs, bk, bv = store_arguments(store) if arguments is None else arguments
    B, _, L, d = q.shape
    scale = d**-0.5 if scale is None else scale
    if L > 1:
        if k_new is None or v_new is None or n_decoded is not None:
            # the chunk kernel takes the count from the host and its queries are among the new tokens
            raise ValueError("packed_store_attention: a chunk (L > 1) needs its new tokens and a host count n_new")
        n_new = k_new.shape[2] if n_new is None else n_new
        return packed_chunk_attention(q, keys, vals, offs, bk, bv, k_new, v_new, n_new, scale, softcap)
    if k_new is None or v_new is None:
        k_new = v_new = q.new_zeros(B, store.kv_heads, 1, d)
        n_new, n_decoded = 0, None
    n_new = k_new.shape[2] if n_new is None else n_new
    return packed_decode_attention(q, keys, vals, offs, bk, bv, k_new, v_new, n_new, scale, softcap, n_decoded)


