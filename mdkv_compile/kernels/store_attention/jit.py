"""The store-attention kernel (``@triton.jit``; the design is in the package docstring, the launch in
launch.py): ``_packed_attention`` serves decode and chunked prefill alike (decode is a chunk of one
query token), splits and merge in one launch.

The entry kernel keeps its leading underscore: it is the name that profiles, Inductor's generated code
and the recorded results (benchmarks/results) show.

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
    from triton.language.extra.cuda import globaltimer, smid

    from mdkv_compile.kernels._triton import dot

MAX_REDUCED_TIERS = 4  # reduced-tier slots in the kernel's signature
TRACE_FIELDS = 8  # int64 per program of a traced launch (see _packed_attention's TRACE)

if HAS_TRITON:
    _TRACE_FIELDS = tl.constexpr(TRACE_FIELDS)  # a kernel reads module globals only as constexprs

    @triton.jit
    def _online_softmax(
        s, visible, m_i, qk_scale, scale, softcap,
        HAS_SOFTCAP: tl.constexpr, MASKED: tl.constexpr,
    ):
        """One block's step of the online softmax over raw logits `s` [BLOCK_M, BLOCK_N] (fp32): the new
        running maximum (log2 units), the block's weights p = exp2(logit - maximum) and the factor alpha
        that rescales the state so far. `visible` (used only when MASKED) marks the (row, key) pairs
        that count. A row that has seen nothing keeps m = -inf and weights 0: its state stays empty."""
        LOG2E: tl.constexpr = 1.4426950408889634
        if HAS_SOFTCAP:
            x = s * (scale / softcap)
            # tanh through exp2 (portable to the interpreter); saturates cleanly at +-1
            th = 1.0 - 2.0 / (tl.exp2(x * (2.0 * LOG2E)) + 1.0)
            s = th * (softcap * LOG2E)
            if MASKED:
                s = tl.where(visible, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_use = tl.where(m_new > float("-inf"), m_new, 0.0)
            p = tl.exp2(s - m_use[:, None])
        else:
            if MASKED:
                s = tl.where(visible, s, float("-inf"))
            # the maximum of the raw logits, scaled once per row (the scale is positive): the scale then
            # folds into the subtraction, one FFMA per logit where a scaled copy took a multiply and a
            # subtraction. The narrow tiers' blocks are bound by these per-logit instructions, not by bytes.
            m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
            m_use = tl.where(m_new > float("-inf"), m_new, 0.0)
            p = tl.exp2(s * qk_scale - m_use[:, None])
        alpha = tl.exp2(m_i - m_use)
        return m_new, p, alpha

    @triton.jit
    def _load_rows(ptr, rows, hi, offs, stride, WIDTH: tl.constexpr, BLOCK: tl.constexpr, MASKED: tl.constexpr):
        """Rows `rows` (those < hi when MASKED) of a row-major region, WIDTH columns padded to BLOCK with 0."""
        ptrs = ptr + rows[:, None].to(tl.int64) * stride + offs[None, :]
        if MASKED:
            return tl.load(ptrs, mask=(rows < hi)[:, None] & (offs < WIDTH)[None, :], other=0.0)
        elif BLOCK == WIDTH:
            return tl.load(ptrs)
        else:
            return tl.load(ptrs, mask=(offs < WIDTH)[None, :], other=0.0)

    @triton.jit
    def _step(
        qop, k_ptr, v_ptr, start, hi, stride_kn, stride_vn, m_i, l_i, acc, qk_scale, scale, softcap,
        D_K: tl.constexpr, BLOCK_DK: tl.constexpr, D_V: tl.constexpr, BLOCK_DV: tl.constexpr,
        BLOCK_N: tl.constexpr, HAS_SOFTCAP: tl.constexpr, DOT_PREC: tl.constexpr, INTERP: tl.constexpr,
        MASKED: tl.constexpr,
    ):
        """One block of BLOCK_N rows starting at `start` of one region; logits in log2 units. Keys are D_K
        wide (row stride stride_kn), values D_V wide (stride_vn). Rows at or past `hi` are masked only
        when MASKED (the region's last block): the others skip the per-logit select and the load masks."""
        rows = start + tl.arange(0, BLOCK_N)
        offs_k = tl.arange(0, BLOCK_DK)
        k = _load_rows(k_ptr, rows, hi, offs_k, stride_kn, D_K, BLOCK_DK, MASKED)
        s = dot(qop, tl.trans(k), DOT_PREC, INTERP)  # [BLOCK_M, BLOCK_N] fp32
        # every block holds >= 1 row below hi, so the maximum is finite
        m_new, p, alpha = _online_softmax(s, (rows < hi)[None, :], m_i, qk_scale, scale, softcap, HAS_SOFTCAP,
                                          MASKED)
        l_i = l_i * alpha + tl.sum(p, 1)
        # keys and values of one width share the offsets (the callers pass equal strides then): the loads
        # of a tier whose keys and values keep as many dims
        v = _load_rows(v_ptr, rows, hi, offs_k if BLOCK_DV == BLOCK_DK else tl.arange(0, BLOCK_DV), stride_vn,
                       D_V, BLOCK_DV, MASKED)
        acc = acc * alpha[:, None] + dot(p.to(v.dtype), v, DOT_PREC, INTERP)
        return m_new, l_i, acc

    @triton.jit
    def _region(
        qop,  # [BLOCK_M, BLOCK_DK] in the key dtype (the query, or q_rot for a reduced tier)
        k_ptr,
        v_ptr,
        lo,
        hi,
        stride_kn,
        stride_vn,  # equal to stride_kn when D_V == D_K (see _step)
        qk_scale,  # scale * log2(e); unused with softcap
        scale,
        softcap,
        BLOCK_M: tl.constexpr,
        D_K: tl.constexpr,
        BLOCK_DK: tl.constexpr,
        D_V: tl.constexpr,
        BLOCK_DV: tl.constexpr,
        BLOCK_N: tl.constexpr,
        HAS_SOFTCAP: tl.constexpr,
        DOT_PREC: tl.constexpr,
        INTERP: tl.constexpr,
    ):
        """Online softmax over rows [lo, hi) of one region, from an empty state; acc is [BLOCK_M, BLOCK_DV].
        Whole blocks first, unmasked; the last, partial block (if any) masked."""
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
        whole = lo + (hi - lo) // BLOCK_N * BLOCK_N
        if INTERP:
            # Triton 3.6's interpreter cannot run range() over a runtime bound under numpy >= 2.4
            # (int() of a 1-element array); a while loop only needs bool(). Same arithmetic.
            start = lo
            while start < whole:
                m_i, l_i, acc = _step(qop, k_ptr, v_ptr, start, hi, stride_kn, stride_vn, m_i, l_i, acc, qk_scale,
                                      scale, softcap, D_K, BLOCK_DK, D_V, BLOCK_DV, BLOCK_N, HAS_SOFTCAP, DOT_PREC,
                                      INTERP, False)
                start += BLOCK_N
        else:
            # a for loop, so the compiler software-pipelines the loads (num_stages)
            for start in range(lo, whole, BLOCK_N):
                m_i, l_i, acc = _step(qop, k_ptr, v_ptr, start, hi, stride_kn, stride_vn, m_i, l_i, acc, qk_scale,
                                      scale, softcap, D_K, BLOCK_DK, D_V, BLOCK_DV, BLOCK_N, HAS_SOFTCAP, DOT_PREC,
                                      INTERP, False)
        if whole < hi:
            m_i, l_i, acc = _step(qop, k_ptr, v_ptr, whole, hi, stride_kn, stride_vn, m_i, l_i, acc, qk_scale,
                                  scale, softcap, D_K, BLOCK_DK, D_V, BLOCK_DV, BLOCK_N, HAS_SOFTCAP, DOT_PREC,
                                  INTERP, True)
        return m_i, l_i, acc

    @triton.jit
    def _slice(n, s, S):
        """Rows [lo, hi) of split s of n rows cut into S near-equal slices."""
        per = tl.cdiv(n, S)
        lo = s * per
        hi = tl.minimum(lo + per, n)
        return lo, hi

    @triton.jit
    def _step_causal(
        qop, k_ptr, v_ptr, start, hi, stride_n, lim, m_i, l_i, acc, qk_scale, scale, softcap,
        D_T: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
        HAS_SOFTCAP: tl.constexpr, DOT_PREC: tl.constexpr, INTERP: tl.constexpr,
    ):
        """_step with a per-query-row limit: key row j is visible to query row i iff j <= lim[i]. A row
        may see nothing in this block (and have seen nothing before): its state stays empty."""
        rows = start + tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        k = _load_rows(k_ptr, rows, hi, offs_d, stride_n, D_T, BLOCK_D, True)
        s = dot(qop, tl.trans(k), DOT_PREC, INTERP)
        visible = (rows < hi)[None, :] & (rows[None, :] <= lim[:, None])
        m_new, p, alpha = _online_softmax(s, visible, m_i, qk_scale, scale, softcap, HAS_SOFTCAP, True)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = _load_rows(v_ptr, rows, hi, offs_d, stride_n, D_T, BLOCK_D, True)
        acc = acc * alpha[:, None] + dot(p.to(v.dtype), v, DOT_PREC, INTERP)
        return m_new, l_i, acc

    @triton.jit
    def _region_causal(
        qop, k_ptr, v_ptr, lo, hi, stride_n, lim, qk_scale, scale, softcap,
        BLOCK_M: tl.constexpr, D_T: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
        HAS_SOFTCAP: tl.constexpr, DOT_PREC: tl.constexpr, INTERP: tl.constexpr,
    ):
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
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
    def _reduced_tier(
        q, bk_ptr, stride_bko, stride_bkd, k_ptr, v_ptr, off_ptr, o, s, S, rows, M, ml_ptr, coef_ptr,
        qk_scale, scale, softcap,
        T_IDX: tl.constexpr, NREG: tl.constexpr, RV_MAX: tl.constexpr, BLOCK_M: tl.constexpr, M_P: tl.constexpr,
        D: tl.constexpr, BLOCK_D: tl.constexpr, R_T: tl.constexpr, BLOCK_R: tl.constexpr, RV_T: tl.constexpr,
        BLOCK_RV: tl.constexpr, BLOCK_N: tl.constexpr, PART: tl.constexpr, PARTS: tl.constexpr,
        HAS_SOFTCAP: tl.constexpr, DOT_PREC: tl.constexpr, INTERP: tl.constexpr,
    ):
        """Reduced slot T_IDX (keys R_T, values RV_T coordinates; part PART of PARTS of every owner's rows)
        for one split of owner o and one block of query rows: its (m, l) partial and its value
        coefficients, [rows, RV_T] in rows of RV_MAX.
        The query is rotated here, q @ basis_k[o][:, :R_T] rounded to the key dtype: R_T columns of the
        basis per program (from L2 after the owner's first split), where a separate product would cost
        a launch."""
        offs_d = tl.arange(0, BLOCK_D)
        offs_r = tl.arange(0, BLOCK_R)
        bk = tl.load(bk_ptr + o.to(tl.int64) * stride_bko + offs_d[:, None] * stride_bkd + offs_r[None, :],
                     mask=(offs_d[:, None] < D) & (offs_r[None, :] < R_T), other=0.0)
        q_rot = dot(q, bk, DOT_PREC, INTERP).to(k_ptr.dtype.element_ty)
        beg = tl.load(off_ptr + o)
        end = tl.load(off_ptr + o + 1)
        lo, hi = _slice(end - beg, PART * S + s, PARTS * S)
        m_i, l_i, acc = _region(
            q_rot, k_ptr + beg.to(tl.int64) * R_T, v_ptr + beg.to(tl.int64) * RV_T, lo, hi, R_T, RV_T,
            qk_scale, scale, softcap, BLOCK_M, R_T, BLOCK_R, RV_T, BLOCK_RV, BLOCK_N, HAS_SOFTCAP, DOT_PREC,
            INTERP,
        )
        base = (o * S + s) * NREG + T_IDX
        tl.store(ml_ptr + (base * 2) * M_P + rows, m_i)
        tl.store(ml_ptr + (base * 2 + 1) * M_P + rows, l_i)
        offs_v = tl.arange(0, BLOCK_RV)
        crow = ((o * S + s) * (NREG - 1) + (T_IDX - 1)).to(tl.int64) * M + rows
        tl.store(coef_ptr + crow[:, None] * RV_MAX + offs_v[None, :], acc,
                 mask=(rows < M)[:, None] & (offs_v < RV_T)[None, :])

    @triton.jit
    def _tier_coef(
        ml_ptr, coef_ptr, o, s, S, rows, M, valid,
        T_IDX: tl.constexpr, NREG: tl.constexpr, RV_MAX: tl.constexpr, RV_T: tl.constexpr, M_P: tl.constexpr,
    ):
        """Reduced tier T_IDX's partial of split s: its m [rows], l [rows] and value coefficients
        [rows, RV_MAX] (zero past RV_T); an empty partial where not `valid`. Loads through L2 (.cg):
        other programs wrote them."""
        base = (((o * S + s) * NREG + T_IDX) * 2) * M_P + rows
        m = tl.load(ml_ptr + base, mask=valid, other=float("-inf"), cache_modifier=".cg")
        l_t = tl.load(ml_ptr + base + M_P, mask=valid, other=0.0, cache_modifier=".cg")
        offs_r = tl.arange(0, RV_MAX)
        crow = ((o * S + s) * (NREG - 1) + (T_IDX - 1)).to(tl.int64) * M + rows
        c = tl.load(coef_ptr + crow[:, None] * RV_MAX + offs_r[None, :],
                    mask=valid & (rows < M)[:, None] & (offs_r < RV_T)[None, :], other=0.0, cache_modifier=".cg")
        return m, l_t, c

    @triton.jit
    def _add_coef(l_i, coef, m, l_t, c, m_use):
        """A reduced tier's partial (m, l_t, coefficients c) added at the merge's running maximum m_use."""
        w = tl.exp2(m - m_use)
        return l_i + w * l_t, coef + w[:, None] * c

    @triton.jit
    def _merge_split(
        ml_ptr, acc_ptr, coef_ptr, o, s, S, rows, M, m_run, l_i, acc, coef,
        NUM_RED: tl.constexpr,
        RV1: tl.constexpr, RV2: tl.constexpr, RV3: tl.constexpr, RV4: tl.constexpr,
        RV_MAX: tl.constexpr, M_P: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        """Online log-sum-exp merge of split s's partials (every region) into the running state; nothing
        for s >= S. Its loads do not depend on the state, so unrolled splits may issue them together."""
        NREG: tl.constexpr = NUM_RED + 1
        valid = s < S
        base = ((o * S + s) * NREG * 2) * M_P + rows
        m0 = tl.load(ml_ptr + base, mask=valid, other=float("-inf"), cache_modifier=".cg")
        l0 = tl.load(ml_ptr + base + M_P, mask=valid, other=0.0, cache_modifier=".cg")
        offs_d = tl.arange(0, BLOCK_D)
        arow = (o * S + s).to(tl.int64) * M + rows
        a0 = tl.load(acc_ptr + arow[:, None] * D + offs_d[None, :],
                     mask=valid & (rows < M)[:, None] & (offs_d[None, :] < D), other=0.0, cache_modifier=".cg")
        m_new = tl.maximum(m_run, m0)
        if NUM_RED >= 1:
            m1, l1, c1 = _tier_coef(ml_ptr, coef_ptr, o, s, S, rows, M, valid, 1, NREG, RV_MAX, RV1, M_P)
            m_new = tl.maximum(m_new, m1)
        if NUM_RED >= 2:
            m2, l2, c2 = _tier_coef(ml_ptr, coef_ptr, o, s, S, rows, M, valid, 2, NREG, RV_MAX, RV2, M_P)
            m_new = tl.maximum(m_new, m2)
        if NUM_RED >= 3:
            m3, l3, c3 = _tier_coef(ml_ptr, coef_ptr, o, s, S, rows, M, valid, 3, NREG, RV_MAX, RV3, M_P)
            m_new = tl.maximum(m_new, m3)
        if NUM_RED >= 4:
            m4, l4, c4 = _tier_coef(ml_ptr, coef_ptr, o, s, S, rows, M, valid, 4, NREG, RV_MAX, RV4, M_P)
            m_new = tl.maximum(m_new, m4)
        # empty partials have m = -inf and weigh exp2(-inf) = 0; a finite stand-in while every partial
        # so far is empty avoids -inf - -inf
        m_use = tl.where(m_new > float("-inf"), m_new, 0.0)
        alpha = tl.exp2(m_run - m_use)
        w = tl.exp2(m0 - m_use)
        l_i = l_i * alpha + w * l0
        acc = acc * alpha[:, None] + w[:, None] * a0
        coef = coef * alpha[:, None]
        if NUM_RED >= 1:
            l_i, coef = _add_coef(l_i, coef, m1, l1, c1, m_use)
        if NUM_RED >= 2:
            l_i, coef = _add_coef(l_i, coef, m2, l2, c2, m_use)
        if NUM_RED >= 3:
            l_i, coef = _add_coef(l_i, coef, m3, l3, c3, m_use)
        if NUM_RED >= 4:
            l_i, coef = _add_coef(l_i, coef, m4, l4, c4, m_use)
        return m_new, l_i, acc, coef

    @triton.jit
    def _pad_rows(x, ROWS: tl.constexpr, TO: tl.constexpr, COLS: tl.constexpr):
        """x [ROWS, COLS] as [TO, COLS]: its rows first, then zero rows (TO a multiple of ROWS). A tl.dot
        takes 16 rows at least; a merge of fewer rows pads its tiles for the rotation back."""
        copy = tl.arange(0, TO // ROWS)[:, None, None]
        return tl.reshape(tl.where(copy == 0, x[None, :, :], 0.0), (TO, COLS))

    @triton.jit
    def _merge(
        ml_ptr, acc_ptr, coef_ptr, bv_ptr, stride_bvo, stride_bvd, out_ptr, o, mb, M, S,
        NUM_RED: tl.constexpr,
        RV1: tl.constexpr, RV2: tl.constexpr, RV3: tl.constexpr, RV4: tl.constexpr,
        RV_TOP: tl.constexpr, RV_MAX: tl.constexpr, BLOCK_M: tl.constexpr, MERGE_M: tl.constexpr,
        M_P: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr, MERGE_UNROLL: tl.constexpr, MERGE_FOR: tl.constexpr,
        DOT_PREC: tl.constexpr, INTERP: tl.constexpr,
    ):
        """Log-sum-exp merge of the S x (1 + NUM_RED) partials of row block mb, one pass in a fixed order
        (deterministic whichever program runs it). The value coefficients of all reduced tiers (RV1..RV4
        wide, the widest RV_TOP) are summed in one [rows, RV_MAX] tile, normalised, and rotated back once
        with basis_v[o] ([d, >= RV_TOP]); then written.

        The merge holds MERGE_M rows (launch.py: the block's rows that exist, rounded up to a power of
        2), not BLOCK_M: a decode step's 4 query heads in tiles padded to 16 rows took four times the
        registers and instructions for the same loads; the tiles are padded to BLOCK_M only for the
        rotation's tl.dot. MERGE_FOR (GPU only): the loop over splits as an scf.for, through which the
        row vectors keep the layouts their users need, not the scf.while that changes them in every step
        (docs/notes/kernel_notes.md, calls 9 to 11)."""
        rows = mb * BLOCK_M + tl.arange(0, MERGE_M)
        offs_d = tl.arange(0, BLOCK_D)
        if NUM_RED >= 1:
            # issued first: the only load of the merge that misses L2 (no other program reads basis_v),
            # in flight while the partials are read
            offs_r = tl.arange(0, RV_MAX)
            bv_t = tl.load(bv_ptr + o.to(tl.int64) * stride_bvo + offs_r[:, None] + offs_d[None, :] * stride_bvd,
                           mask=(offs_r[:, None] < RV_TOP) & (offs_d[None, :] < D), other=0.0).to(tl.float32)
        m_run = tl.full([MERGE_M], float("-inf"), tl.float32)
        l_i = tl.zeros([MERGE_M], tl.float32)
        acc = tl.zeros([MERGE_M, BLOCK_D], tl.float32)
        coef = tl.zeros([MERGE_M, RV_MAX], tl.float32)
        # MERGE_UNROLL splits per iteration (Tuning.merge_unroll)
        if INTERP or not MERGE_FOR:
            s0 = 0
            while s0 < S:  # the interpreter's loop (see _region); on the GPU unless MERGE_FOR
                for j in tl.static_range(MERGE_UNROLL):
                    m_run, l_i, acc, coef = _merge_split(ml_ptr, acc_ptr, coef_ptr, o, s0 + j, S, rows, M, m_run,
                                                         l_i, acc, coef, NUM_RED, RV1, RV2, RV3, RV4, RV_MAX, M_P, D,
                                                         BLOCK_D)
                s0 += MERGE_UNROLL
        else:
            # a for loop (Tuning.merge_for_loop): Triton's layout pass keeps each row vector in the layout
            # its users need through scf.for (loads of m and l done once per layout), where through the
            # scf.while loop every weight changes its layout in every step (a shared-memory round trip and
            # a barrier each)
            for s0 in range(0, S, MERGE_UNROLL):
                for j in tl.static_range(MERGE_UNROLL):
                    m_run, l_i, acc, coef = _merge_split(ml_ptr, acc_ptr, coef_ptr, o, s0 + j, S, rows, M, m_run,
                                                         l_i, acc, coef, NUM_RED, RV1, RV2, RV3, RV4, RV_MAX, M_P, D,
                                                         BLOCK_D)
        # normalised before the rotation (a row that saw nothing has l = 0 and writes zeros)
        inv_l = tl.where(l_i > 0, 1.0 / tl.where(l_i > 0, l_i, 1.0), 0.0)
        out = acc * inv_l[:, None]
        if NUM_RED >= 1:
            coef = coef * inv_l[:, None]
            if MERGE_M < BLOCK_M:
                out = _pad_rows(out, MERGE_M, BLOCK_M, BLOCK_D)
                coef = _pad_rows(coef, MERGE_M, BLOCK_M, RV_MAX)
                rows = mb * BLOCK_M + tl.arange(0, BLOCK_M)  # padded rows are past M (one row block then)
            # rotate back once: out += coef @ basis_v[o][:, :RV_TOP].T. TF32 products for 16-bit models
            # (their error, ~5e-4, is under the output's rounding; an exact fp32 dot of this size spills)
            out += dot(coef, bv_t, DOT_PREC, INTERP)
        dmask = (rows < M)[:, None] & (offs_d[None, :] < D)
        tl.store(out_ptr + (o * M + rows)[:, None].to(tl.int64) * D + offs_d[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=dmask)

    @triton.jit
    def _packed_attention(
        q_ptr,
        k0_ptr, v0_ptr, off0_ptr,
        k1_ptr, v1_ptr, off1_ptr,
        k2_ptr, v2_ptr, off2_ptr,
        k3_ptr, v3_ptr, off3_ptr,
        k4_ptr, v4_ptr, off4_ptr,
        bk_ptr, stride_bko, stride_bkd, bv_ptr, stride_bvo, stride_bvd,
        kn_ptr, vn_ptr, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
        n_new, n_new_ptr, L, H_KV, OWNERS, M, S, NMB,
        ml_ptr, acc_ptr, coef_ptr, count_ptr, out_ptr, trace_ptr,
        qk_scale, scale, softcap,
        N_FROM_PTR: tl.constexpr,
        NUM_RED: tl.constexpr,
        R1: tl.constexpr, R2: tl.constexpr, R3: tl.constexpr, R4: tl.constexpr,
        BR1: tl.constexpr, BR2: tl.constexpr, BR3: tl.constexpr, BR4: tl.constexpr,
        RV1: tl.constexpr, RV2: tl.constexpr, RV3: tl.constexpr, RV4: tl.constexpr,
        BRV1: tl.constexpr, BRV2: tl.constexpr, BRV3: tl.constexpr, BRV4: tl.constexpr,
        BN1: tl.constexpr, BN2: tl.constexpr, BN3: tl.constexpr, BN4: tl.constexpr,
        PART1: tl.constexpr, PART2: tl.constexpr, PART3: tl.constexpr, PART4: tl.constexpr,
        PARTS1: tl.constexpr, PARTS2: tl.constexpr, PARTS3: tl.constexpr, PARTS4: tl.constexpr,
        RV_TOP: tl.constexpr,
        RV_MAX: tl.constexpr,
        BLOCK_M: tl.constexpr,
        M_P: tl.constexpr,
        D: tl.constexpr,
        BLOCK_D: tl.constexpr,
        BLOCK_N: tl.constexpr,
        REVERSE_REGIONS: tl.constexpr,
        MERGE_M: tl.constexpr,
        MERGE_UNROLL: tl.constexpr,
        MERGE_FOR: tl.constexpr,
        HAS_SOFTCAP: tl.constexpr,
        DOT_PREC: tl.constexpr,
        INTERP: tl.constexpr,
        TRACE: tl.constexpr,
    ):
        # TRACE (GPU only, launch.py's `trace`): each program writes TRACE_FIELDS int64 to its row of
        # trace_ptr, the GPU's nanosecond timer at its start, after its region's partial is stored, after
        # its arrival is counted and after the merge (0 unless it merged), then its SM, region, owner, split
        if TRACE:
            t_begin = globaltimer()
        # 1-D grid, row block fastest: the programs of one (owner, split, region) run side by side, so
        # a chunk's row blocks read the store's slice once from DRAM and the rest from L2
        NREG: tl.constexpr = NUM_RED + 1
        pid = tl.program_id(0)
        mb = pid % NMB  # block of BLOCK_M query rows (row r = g * L + l)
        rest = pid // NMB
        s = rest % S
        rest = rest // S
        o = rest % OWNERS
        reg = rest // OWNERS  # 0: full tier + new tokens; t >= 1: reduced tier t
        if REVERSE_REGIONS:
            reg = NREG - 1 - reg
        if N_FROM_PTR:
            # the count of new tokens lives on the device: a captured CUDA graph replays with whatever
            # the step wrote there, not the value seen at capture
            n_new = tl.load(n_new_ptr)
        # Inductor passes Python floats as fp64 scalars: keep the softmax state fp32
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
            # full tier (stored as is)
            beg = tl.load(off0_ptr + o)
            end = tl.load(off0_ptr + o + 1)
            lo, hi = _slice(end - beg, s, S)
            m_a, l_a, acc_a = _region(
                q, k0_ptr + beg.to(tl.int64) * D, v0_ptr + beg.to(tl.int64) * D, lo, hi, D, D,
                qk_scale, scale, softcap, BLOCK_M, D, BLOCK_D, D, BLOCK_D, BLOCK_N, HAS_SOFTCAP, DOT_PREC, INTERP,
            )
            # new tokens [B, H_kv, n_new, d] (full dimension; stride_vn equals stride_kn, checked on the
            # host): query row r is new token n_new - L + r % L and sees new tokens 0 .. that position
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
            # an empty region has m = -inf and weight exp2(-inf) = 0; a finite stand-in for m when both
            # are empty avoids -inf - -inf
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
                _reduced_tier(q, bk_ptr, stride_bko, stride_bkd, k1_ptr, v1_ptr, off1_ptr, o, s, S, rows, M,
                              ml_ptr, coef_ptr, qk_scale, scale, softcap, 1, NREG, RV_MAX, BLOCK_M, M_P, D, BLOCK_D,
                              R1, BR1, RV1, BRV1, BN1, PART1, PARTS1, HAS_SOFTCAP, DOT_PREC, INTERP)
        if NUM_RED >= 2:
            if reg == 2:
                _reduced_tier(q, bk_ptr, stride_bko, stride_bkd, k2_ptr, v2_ptr, off2_ptr, o, s, S, rows, M,
                              ml_ptr, coef_ptr, qk_scale, scale, softcap, 2, NREG, RV_MAX, BLOCK_M, M_P, D, BLOCK_D,
                              R2, BR2, RV2, BRV2, BN2, PART2, PARTS2, HAS_SOFTCAP, DOT_PREC, INTERP)
        if NUM_RED >= 3:
            if reg == 3:
                _reduced_tier(q, bk_ptr, stride_bko, stride_bkd, k3_ptr, v3_ptr, off3_ptr, o, s, S, rows, M,
                              ml_ptr, coef_ptr, qk_scale, scale, softcap, 3, NREG, RV_MAX, BLOCK_M, M_P, D, BLOCK_D,
                              R3, BR3, RV3, BRV3, BN3, PART3, PARTS3, HAS_SOFTCAP, DOT_PREC, INTERP)
        if NUM_RED >= 4:
            if reg == 4:
                _reduced_tier(q, bk_ptr, stride_bko, stride_bkd, k4_ptr, v4_ptr, off4_ptr, o, s, S, rows, M,
                              ml_ptr, coef_ptr, qk_scale, scale, softcap, 4, NREG, RV_MAX, BLOCK_M, M_P, D, BLOCK_D,
                              R4, BR4, RV4, BRV4, BN4, PART4, PARTS4, HAS_SOFTCAP, DOT_PREC, INTERP)
        # the last of the S x NREG programs of this (owner, row block) to finish merges their partials:
        # no second launch. The barrier orders every thread's partial stores before the release of the
        # count; the acquire (and the L2 loads, .cg) make the others' partials visible to the merge.
        if TRACE:
            t_work = globaltimer()
        tl.debug_barrier()
        arrived = tl.atomic_add(count_ptr + o * NMB + mb, 1, sem="acq_rel", scope="gpu")
        if TRACE:
            t_arrive = globaltimer()
            t_merged = t_arrive * 0
        if arrived == S * NREG - 1:
            _merge(ml_ptr, acc_ptr, coef_ptr, bv_ptr, stride_bvo, stride_bvd, out_ptr, o, mb, M, S, NUM_RED,
                   RV1, RV2, RV3, RV4, RV_TOP, RV_MAX, BLOCK_M, MERGE_M, M_P, D, BLOCK_D, MERGE_UNROLL, MERGE_FOR,
                   DOT_PREC, INTERP)
            # every program of this (owner, row block) has counted: back to 0, so that a count buffer kept
            # across launches (launch.py's `arrival_counts`) needs no memset before the next one
            tl.store(count_ptr + o * NMB + mb, 0)
            if TRACE:
                t_merged = globaltimer()
        if TRACE:
            row = trace_ptr + pid.to(tl.int64) * _TRACE_FIELDS
            tl.store(row, t_begin)
            tl.store(row + 1, t_work)
            tl.store(row + 2, t_arrive)
            tl.store(row + 3, t_merged)
            tl.store(row + 4, smid().to(tl.int64))
            tl.store(row + 5, reg.to(tl.int64))
            tl.store(row + 6, o.to(tl.int64))
            tl.store(row + 7, s.to(tl.int64))
