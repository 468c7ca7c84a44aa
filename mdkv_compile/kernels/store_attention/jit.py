"""The store-attention kernels (``@triton.jit``; the design is in the package docstring, the launches
in launch.py): decode ``_packed_decode_split`` and ``_packed_decode_merge``, chunked prefill
``_packed_chunk_split`` (it shares the decode merge). The chunk kernels are near copies of the decode
ones, kept apart so the decode kernels measured on the H200 (docs/notes/kernel_notes.md) stay as they
were; merging them (decode = chunk with L = 1) needs a GPU re-time.

The entry kernels keep their leading underscore: it is the name that profiles, Inductor's generated
code and the recorded results (benchmarks/results) show.

The reduced tiers come in ``MAX_REDUCED_TIERS`` spelled-out slots (``k1_ptr..k4_ptr``, key widths
``R1..R4``, value widths ``RV1..RV4``, ``if NUM_RED >= t`` ladders): a Triton signature is a fixed list
of pointers and constexprs, and a slot that the ``NUM_RED`` constexpr leaves out is not compiled at
all. A slot whose key and value widths are equal loads both with the same offsets (``_step``).
"""

from __future__ import annotations

from mdkv_compile.kernels._triton import HAS_TRITON

if HAS_TRITON:
    import triton
    import triton.language as tl

    from mdkv_compile.kernels._triton import dot

MAX_REDUCED_TIERS = 4  # reduced-tier slots in the split kernels' signatures

if HAS_TRITON:

    @triton.jit
    def _step(
        qop, k_ptr, v_ptr, start, hi, stride_kn, stride_vn, m_i, l_i, acc, qk_scale, scale, softcap,
        D_K: tl.constexpr, BLOCK_DK: tl.constexpr, D_V: tl.constexpr, BLOCK_DV: tl.constexpr,
        BLOCK_N: tl.constexpr, HAS_SOFTCAP: tl.constexpr, DOT_PREC: tl.constexpr, INTERP: tl.constexpr,
    ):
        """One block of BLOCK_N rows starting at `start` (< hi) of one region; logits in log2 units.
        Keys are D_K wide (row stride stride_kn), values D_V wide (stride_vn)."""
        LOG2E: tl.constexpr = 1.4426950408889634
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_DK)
        rows = start + offs_n
        rmask = rows < hi
        ptrs = rows[:, None].to(tl.int64) * stride_kn + offs_d[None, :]
        msk = rmask[:, None] & (offs_d < D_K)[None, :]
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
        if D_V == D_K and BLOCK_DV == BLOCK_DK:
            # keys and values of one width share the offsets (the callers pass equal strides then):
            # the loads of a tier whose keys and values keep as many dims
            v = tl.load(v_ptr + ptrs, mask=msk, other=0.0)
        else:
            offs_v = tl.arange(0, BLOCK_DV)
            v = tl.load(v_ptr + rows[:, None].to(tl.int64) * stride_vn + offs_v[None, :],
                        mask=rmask[:, None] & (offs_v < D_V)[None, :], other=0.0)
        acc = acc * alpha[:, None] + dot(p.to(v.dtype), v, DOT_PREC, INTERP)
        return m_new, l_i, acc

    @triton.jit
    def _region(
        qop,  # [GP, BLOCK_DK] in the key dtype (the query, or q_rot for a reduced tier)
        k_ptr,
        v_ptr,
        lo,
        hi,
        stride_kn,
        stride_vn,  # equal to stride_kn when D_V == D_K (see _step)
        qk_scale,  # scale * log2(e); unused with softcap
        scale,
        softcap,
        GP: tl.constexpr,
        D_K: tl.constexpr,
        BLOCK_DK: tl.constexpr,
        D_V: tl.constexpr,
        BLOCK_DV: tl.constexpr,
        BLOCK_N: tl.constexpr,
        HAS_SOFTCAP: tl.constexpr,
        DOT_PREC: tl.constexpr,
        INTERP: tl.constexpr,
    ):
        """Online softmax over rows [lo, hi) of one region, from an empty state; acc is [GP, BLOCK_DV]."""
        m_i = tl.full([GP], float("-inf"), tl.float32)
        l_i = tl.zeros([GP], tl.float32)
        acc = tl.zeros([GP, BLOCK_DV], tl.float32)
        if INTERP:
            # Triton 3.6's interpreter cannot run range() over a runtime bound under numpy >= 2.4
            # (int() of a 1-element array); a while loop only needs bool(). Same arithmetic.
            start = lo
            while start < hi:
                m_i, l_i, acc = _step(qop, k_ptr, v_ptr, start, hi, stride_kn, stride_vn, m_i, l_i, acc, qk_scale,
                                      scale, softcap, D_K, BLOCK_DK, D_V, BLOCK_DV, BLOCK_N, HAS_SOFTCAP, DOT_PREC,
                                      INTERP)
                start += BLOCK_N
        else:
            # a for loop, so the compiler software-pipelines the loads (num_stages)
            for start in range(lo, hi, BLOCK_N):
                m_i, l_i, acc = _step(qop, k_ptr, v_ptr, start, hi, stride_kn, stride_vn, m_i, l_i, acc, qk_scale,
                                      scale, softcap, D_K, BLOCK_DK, D_V, BLOCK_DV, BLOCK_N, HAS_SOFTCAP, DOT_PREC,
                                      INTERP)
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
        RV_MAX: tl.constexpr,
        GP: tl.constexpr,
        R_T: tl.constexpr,
        BLOCK_R: tl.constexpr,
        RV_T: tl.constexpr,
        BLOCK_RV: tl.constexpr,
        BLOCK_N: tl.constexpr,
        HAS_SOFTCAP: tl.constexpr,
        DOT_PREC: tl.constexpr,
        INTERP: tl.constexpr,
    ):
        """Reduced tier T_IDX (keys R_T, values RV_T coordinates) for one split of owner o: its (m, l)
        partial and its value coefficients, [G, RV_T] in a row of RV_MAX."""
        offs_r = tl.arange(0, BLOCK_R)
        offs_g = tl.arange(0, GP)
        rmask = offs_r < R_T
        # q_rot[:, :R_T] (rotated once per owner on the host side: a [G, d] x [d, rk_max] product per
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
            q_rot, k_ptr + beg.to(tl.int64) * R_T, v_ptr + beg.to(tl.int64) * RV_T, lo, hi, R_T, RV_T,
            qk_scale, scale, softcap, GP, R_T, BLOCK_R, RV_T, BLOCK_RV, BLOCK_N, HAS_SOFTCAP, DOT_PREC, INTERP,
        )
        base = (o * S + s) * NREG + T_IDX
        tl.store(ml_ptr + (base * 2) * GP + offs_g, m_i)
        tl.store(ml_ptr + (base * 2 + 1) * GP + offs_g, l_i)
        offs_v = tl.arange(0, BLOCK_RV)
        cbase = ((o * S + s) * (NREG - 1) + (T_IDX - 1)).to(tl.int64) * G * RV_MAX
        tl.store(
            coef_ptr + cbase + offs_g[:, None] * RV_MAX + offs_v[None, :],
            acc,
            mask=(offs_g[:, None] < G) & (offs_v < RV_T)[None, :],
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
        RV1: tl.constexpr, RV2: tl.constexpr, RV3: tl.constexpr, RV4: tl.constexpr,
        BRV1: tl.constexpr, BRV2: tl.constexpr, BRV3: tl.constexpr, BRV4: tl.constexpr,
        BN1: tl.constexpr, BN2: tl.constexpr, BN3: tl.constexpr, BN4: tl.constexpr,
        RV_MAX: tl.constexpr,
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
                q, k0_ptr + beg.to(tl.int64) * D, v0_ptr + beg.to(tl.int64) * D, lo, hi, D, D,
                qk_scale, scale, softcap, GP, D, BLOCK_D, D, BLOCK_D, BLOCK_N, HAS_SOFTCAP, DOT_PREC, INTERP,
            )
            # decoded region [B, H_kv, n_new, d] (full dimension)
            lo, hi = _slice(n_new, s, S)
            m_b, l_b, acc_b = _region(
                q,
                kn_ptr + b.to(tl.int64) * stride_kb + h.to(tl.int64) * stride_kh,
                vn_ptr + b.to(tl.int64) * stride_vb + h.to(tl.int64) * stride_vh,
                lo, hi, stride_kn, stride_vn,
                qk_scale, scale, softcap, GP, D, BLOCK_D, D, BLOCK_D, BLOCK_N, HAS_SOFTCAP, DOT_PREC, INTERP,
            )
            # stride_vn must equal stride_kn (checked on the host): keys and values share their offsets
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
                              qk_scale, scale, softcap, G, 1, NREG, RV_MAX, GP, R1, BR1, RV1, BRV1, BN1,
                              HAS_SOFTCAP, DOT_PREC, INTERP)
        if NUM_RED >= 2:
            if reg == 2:
                _reduced_tier(qr_ptr, k2_ptr, v2_ptr, off2_ptr, o, s, S, stride_qr, ml_ptr, coef_ptr,
                              qk_scale, scale, softcap, G, 2, NREG, RV_MAX, GP, R2, BR2, RV2, BRV2, BN2,
                              HAS_SOFTCAP, DOT_PREC, INTERP)
        if NUM_RED >= 3:
            if reg == 3:
                _reduced_tier(qr_ptr, k3_ptr, v3_ptr, off3_ptr, o, s, S, stride_qr, ml_ptr, coef_ptr,
                              qk_scale, scale, softcap, G, 3, NREG, RV_MAX, GP, R3, BR3, RV3, BRV3, BN3,
                              HAS_SOFTCAP, DOT_PREC, INTERP)
        if NUM_RED >= 4:
            if reg == 4:
                _reduced_tier(qr_ptr, k4_ptr, v4_ptr, off4_ptr, o, s, S, stride_qr, ml_ptr, coef_ptr,
                              qk_scale, scale, softcap, G, 4, NREG, RV_MAX, GP, R4, BR4, RV4, BRV4, BN4,
                              HAS_SOFTCAP, DOT_PREC, INTERP)

    @triton.jit
    def _merge_coef(
        coef_ptr, w, offs_s, smask, o, g, S, G,
        T_IDX: tl.constexpr, NREG: tl.constexpr, RV_MAX: tl.constexpr, RV_T: tl.constexpr,
        BLOCK_REG: tl.constexpr,
    ):
        """sum over a chunk of splits of weight * value coef for reduced tier T_IDX (RV_T wide),
        padded to [RV_MAX]."""
        offs_r = tl.arange(0, RV_MAX)
        offs_reg = tl.arange(0, BLOCK_REG)
        w_t = tl.sum(tl.where(offs_reg[None, :] == T_IDX, w, 0.0), 1)  # [BLOCK_S]
        rows = ((o * S + offs_s) * (NREG - 1) + (T_IDX - 1)).to(tl.int64) * G + g
        c = tl.load(coef_ptr + rows[:, None] * RV_MAX + offs_r[None, :],
                    mask=smask[:, None] & (offs_r[None, :] < RV_T), other=0.0)
        return tl.sum(w_t[:, None] * c, 0)

    @triton.jit
    def _packed_decode_merge(
        ml_ptr, acc_ptr, coef_ptr, bv_ptr, stride_bo, stride_bd, out_ptr, G, S,
        NUM_RED: tl.constexpr,
        RV1: tl.constexpr, RV2: tl.constexpr, RV3: tl.constexpr, RV4: tl.constexpr,
        RV_TOP: tl.constexpr, RV_MAX: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr,
        BLOCK_REG: tl.constexpr, BLOCK_S: tl.constexpr,
    ):
        """Grid (owners, G): one query head per program. Splits are read BLOCK_S at a time (independent
        loads, not a serial chain); the value coefficients of all reduced tiers (RV1..RV4 wide, the
        widest RV_TOP) are summed in one [RV_MAX] vector and rotated back once with basis_v[o]
        ([d, >= RV_TOP])."""
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
        coef = tl.zeros([RV_MAX], tl.float32)
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
                coef += _merge_coef(coef_ptr, w, offs_s, smask, o, g, S, G, 1, NREG, RV_MAX, RV1, BLOCK_REG)
            if NUM_RED >= 2:
                coef += _merge_coef(coef_ptr, w, offs_s, smask, o, g, S, G, 2, NREG, RV_MAX, RV2, BLOCK_REG)
            if NUM_RED >= 3:
                coef += _merge_coef(coef_ptr, w, offs_s, smask, o, g, S, G, 3, NREG, RV_MAX, RV3, BLOCK_REG)
            if NUM_RED >= 4:
                coef += _merge_coef(coef_ptr, w, offs_s, smask, o, g, S, G, 4, NREG, RV_MAX, RV4, BLOCK_REG)
            s0 += BLOCK_S
        if NUM_RED >= 1:
            # rotate back once: acc += basis_v[o] @ coef, as a broadcast-multiply-sum in fp32 (exact
            # fp32 products; a [1 x R] dot would need padding to 16 rows anyway)
            offs_r = tl.arange(0, RV_MAX)
            bv = tl.load(bv_ptr + o.to(tl.int64) * stride_bo + offs_d[:, None] * stride_bd + offs_r[None, :],
                         mask=(offs_d[:, None] < D) & (offs_r[None, :] < RV_TOP), other=0.0).to(tl.float32)
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
        T_IDX: tl.constexpr, NREG: tl.constexpr, RV_MAX: tl.constexpr, BLOCK_M: tl.constexpr,
        M_P: tl.constexpr, R_T: tl.constexpr, BLOCK_R: tl.constexpr, RV_T: tl.constexpr, BLOCK_RV: tl.constexpr,
        BLOCK_N: tl.constexpr, HAS_SOFTCAP: tl.constexpr, DOT_PREC: tl.constexpr, INTERP: tl.constexpr,
    ):
        """_reduced_tier for BLOCK_M query rows of a chunk."""
        offs_r = tl.arange(0, BLOCK_R)
        cmask = offs_r < R_T
        q_rot = tl.load(qr_ptr + (o * M + rows)[:, None].to(tl.int64) * stride_qr + offs_r[None, :],
                        mask=rmask[:, None] & cmask[None, :], other=0.0)
        beg = tl.load(off_ptr + o)
        end = tl.load(off_ptr + o + 1)
        lo, hi = _slice(end - beg, s, S)
        m_i, l_i, acc = _region(
            q_rot, k_ptr + beg.to(tl.int64) * R_T, v_ptr + beg.to(tl.int64) * RV_T, lo, hi, R_T, RV_T,
            qk_scale, scale, softcap, BLOCK_M, R_T, BLOCK_R, RV_T, BLOCK_RV, BLOCK_N, HAS_SOFTCAP, DOT_PREC, INTERP,
        )
        base = (o * S + s) * NREG + T_IDX
        tl.store(ml_ptr + (base * 2) * M_P + rows, m_i)
        tl.store(ml_ptr + (base * 2 + 1) * M_P + rows, l_i)
        offs_v = tl.arange(0, BLOCK_RV)
        crow = ((o * S + s) * (NREG - 1) + (T_IDX - 1)).to(tl.int64) * M + rows
        tl.store(coef_ptr + crow[:, None] * RV_MAX + offs_v[None, :], acc,
                 mask=rmask[:, None] & (offs_v < RV_T)[None, :])

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
        RV1: tl.constexpr, RV2: tl.constexpr, RV3: tl.constexpr, RV4: tl.constexpr,
        BRV1: tl.constexpr, BRV2: tl.constexpr, BRV3: tl.constexpr, BRV4: tl.constexpr,
        BN1: tl.constexpr, BN2: tl.constexpr, BN3: tl.constexpr, BN4: tl.constexpr,
        RV_MAX: tl.constexpr,
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
                q, k0_ptr + beg.to(tl.int64) * D, v0_ptr + beg.to(tl.int64) * D, lo, hi, D, D,
                qk_scale, scale, softcap, BLOCK_M, D, BLOCK_D, D, BLOCK_D, BLOCK_N, HAS_SOFTCAP, DOT_PREC, INTERP,
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
                                   qk_scale, scale, softcap, M, rows, rmask, 1, NREG, RV_MAX, BLOCK_M, M_P,
                                   R1, BR1, RV1, BRV1, BN1, HAS_SOFTCAP, DOT_PREC, INTERP)
        if NUM_RED >= 2:
            if reg == 2:
                _reduced_tier_rows(qr_ptr, k2_ptr, v2_ptr, off2_ptr, o, s, S, stride_qr, ml_ptr, coef_ptr,
                                   qk_scale, scale, softcap, M, rows, rmask, 2, NREG, RV_MAX, BLOCK_M, M_P,
                                   R2, BR2, RV2, BRV2, BN2, HAS_SOFTCAP, DOT_PREC, INTERP)
        if NUM_RED >= 3:
            if reg == 3:
                _reduced_tier_rows(qr_ptr, k3_ptr, v3_ptr, off3_ptr, o, s, S, stride_qr, ml_ptr, coef_ptr,
                                   qk_scale, scale, softcap, M, rows, rmask, 3, NREG, RV_MAX, BLOCK_M, M_P,
                                   R3, BR3, RV3, BRV3, BN3, HAS_SOFTCAP, DOT_PREC, INTERP)
        if NUM_RED >= 4:
            if reg == 4:
                _reduced_tier_rows(qr_ptr, k4_ptr, v4_ptr, off4_ptr, o, s, S, stride_qr, ml_ptr, coef_ptr,
                                   qk_scale, scale, softcap, M, rows, rmask, 4, NREG, RV_MAX, BLOCK_M, M_P,
                                   R4, BR4, RV4, BRV4, BN4, HAS_SOFTCAP, DOT_PREC, INTERP)
