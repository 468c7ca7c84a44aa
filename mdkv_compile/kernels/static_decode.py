"""The single-launch decode kernel of the TensorRT plugin (`mdkv::MixedDimKVAttention`, see
backends/tensorrt.py), over the *static* store layout.

* `static_decode_kernel` / `static_decode_kernel_nobasis`: one Triton kernel launch computing the
  node over the static store layout (`mdkv_compile.core.static`: per owner one key row and one value
  row of `capacity` elements, tiers back to back, each tier `tier_dims[t]` key and `value_dims[t]`
  value elements per token, so a tier starts at different offsets in the two rows; `counts` per tier)
  plus the new-token region, one query token per row. One program per query head; it reads only
  the filled slots of each tier (the ONNX fallback function reads every tier's whole window). It is
  a plain, untuned kernel written for a single launch with no scratch memory (QDP's AOT path), not
  the split kernel of `mdkv_compile.kernels.store_attention`, which works on the packed (CSR) layout
  and needs workspace for its partials and a zeroed arrival count per owner.
* `static_decode_attention(...)`: launches it from PyTorch (tests; Triton's interpreter on CPU).
* `compile_ptx(...)`: the kernel compiled ahead of time to PTX with `triton.compile`, what the
  plugin's `aot_impl` hands to TensorRT.

What has run: the kernel against `attend_static` (tests/test_onnx_export.py, Triton's CPU
interpreter; on a GPU it compiles and runs the same way), and `compile_ptx` where a CUDA target is
available.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch

from mdkv_compile.core.static import StaticStore
from mdkv_compile.kernels._triton import HAS_TRITON, call_uninterpreted, interpreting, next_pow2

if HAS_TRITON:
    import triton
    import triton.language as tl


@dataclasses.dataclass(frozen=True)
class StaticDecodeTuning:
    """Launch parameters of the plugin kernel: plain defaults, not tuned on a GPU (one program per
    query head; TensorRT launches what `compile_ptx` built with them)."""

    block_n: int = 32  # slots per block of every tier and of the new-token region
    num_warps: int = 4


DEFAULT_STATIC_DECODE_TUNING = StaticDecodeTuning()


if HAS_TRITON:

    @triton.jit
    def _online(m, l_sum, acc, other, s, v, alpha_other: tl.constexpr):
        """Online-softmax step over one block: logits s [BLOCK_N] (-inf where masked), values
        v [BLOCK_N, W] into acc; `other` is the accumulator of the other space (full vs reduced
        coefficients), which shares the softmax state and only gets rescaled."""
        m_new = tl.maximum(m, tl.max(s, 0))
        alpha = tl.exp(m - m_new)
        p = tl.exp(s - m_new)
        l_sum = l_sum * alpha + tl.sum(p, 0)
        acc = acc * alpha + tl.sum(p[:, None] * v, 0)
        if alpha_other:
            other = other * alpha
        return m_new, l_sum, acc, other

    @triton.jit
    def _logits(k, qv, SCALE: tl.constexpr, SOFTCAP: tl.constexpr, HAS_SOFTCAP: tl.constexpr):
        s = tl.sum(k * qv[None, :], 1) * SCALE
        if HAS_SOFTCAP:
            # tanh through exp (saturates cleanly), as softcap_logits: softcap * tanh(s / softcap)
            x = s / SOFTCAP
            s = SOFTCAP * (1.0 - 2.0 / (tl.exp(2.0 * x) + 1.0))
        return s

    @triton.jit
    def _reduced_tier(
        k_ptr, v_ptr, row, start_k, start_v, cnt, qr, m, l_sum, accr, acc,
        R: tl.constexpr, BLOCK_R: tl.constexpr, RV: tl.constexpr, BLOCK_RV: tl.constexpr, BLOCK_N: tl.constexpr,
        SCALE: tl.constexpr, SOFTCAP: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    ):
        """One reduced tier: `cnt` tokens of R key coordinates from `start_k` of the owner's key row and
        RV value coordinates from `start_v` of its value row."""
        offs_n = tl.arange(0, BLOCK_N)
        offs_r = tl.arange(0, BLOCK_R)
        offs_v = tl.arange(0, BLOCK_RV)
        slot = 0
        while slot < cnt:
            rows = slot + offs_n
            rmask = rows < cnt
            ptr = row + start_k + rows[:, None].to(tl.int64) * R + offs_r[None, :]
            msk = rmask[:, None] & (offs_r < R)[None, :]
            k = tl.load(k_ptr + ptr, mask=msk, other=0.0).to(tl.float32)
            s = tl.where(rmask, _logits(k, qr, SCALE, SOFTCAP, HAS_SOFTCAP), float("-inf"))
            vptr = row + start_v + rows[:, None].to(tl.int64) * RV + offs_v[None, :]
            v = tl.load(v_ptr + vptr, mask=rmask[:, None] & (offs_v < RV)[None, :], other=0.0).to(tl.float32)
            m, l_sum, accr, acc = _online(m, l_sum, accr, acc, s, v, True)
            slot += BLOCK_N
        return m, l_sum, accr, acc

    @triton.jit
    def _static_decode_body(
        q_ptr, k_ptr, v_ptr, cnt_ptr, kn_ptr, vn_ptr, nnew_ptr, bk_ptr, bv_ptr, CAP, NCAP, HQ, out_ptr,
        KV_HEADS: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr, T: tl.constexpr,
        NUM_RED: tl.constexpr, R1: tl.constexpr, R2: tl.constexpr, R3: tl.constexpr, R4: tl.constexpr,
        RV1: tl.constexpr, RV2: tl.constexpr, RV3: tl.constexpr, RV4: tl.constexpr,
        RK_MAX: tl.constexpr, BLOCK_RK: tl.constexpr, RV_MAX: tl.constexpr, BLOCK_RV: tl.constexpr,
        BLOCK_N: tl.constexpr, SCALE: tl.constexpr, SOFTCAP: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    ):
        pid = tl.program_id(0)  # query row b * HQ + hq (one decode token)
        b = pid // HQ
        hq = pid % HQ
        o = b * KV_HEADS + hq // (HQ // KV_HEADS)
        offs_d = tl.arange(0, BLOCK_D)
        offs_n = tl.arange(0, BLOCK_N)
        dmask = offs_d < D
        q = tl.load(q_ptr + pid.to(tl.int64) * D + offs_d, mask=dmask, other=0.0).to(tl.float32)
        m = tl.max(tl.full([BLOCK_N], float("-inf"), tl.float32), 0)
        l_sum = tl.sum(tl.zeros([BLOCK_N], tl.float32), 0)
        acc = tl.zeros([BLOCK_D], tl.float32)
        accr = tl.zeros([BLOCK_RV], tl.float32)
        row = o.to(tl.int64) * CAP

        # full tier: slots of D elements from the start of the key and of the value row
        c0 = tl.load(cnt_ptr + o * T)
        slot = 0
        while slot < c0:
            rows = slot + offs_n
            rmask = rows < c0
            ptr = row + rows[:, None].to(tl.int64) * D + offs_d[None, :]
            msk = rmask[:, None] & dmask[None, :]
            k = tl.load(k_ptr + ptr, mask=msk, other=0.0).to(tl.float32)
            s = tl.where(rmask, _logits(k, q, SCALE, SOFTCAP, HAS_SOFTCAP), float("-inf"))
            v = tl.load(v_ptr + ptr, mask=msk, other=0.0).to(tl.float32)
            m, l_sum, acc, accr = _online(m, l_sum, acc, accr, s, v, True)
            slot += BLOCK_N
        # where the next tier starts in the key row and in the value row (they part when a tier's
        # keys and values keep different dims)
        start_k = c0 * D
        start_v = c0 * D

        if NUM_RED > 0:
            # the query rotated once into the owner's key basis: q_rot = q @ basis_k[o]
            offs_rk = tl.arange(0, BLOCK_RK)
            bkofs = o.to(tl.int64) * D * RK_MAX + offs_d[:, None] * RK_MAX + offs_rk[None, :]
            bkmask = dmask[:, None] & (offs_rk < RK_MAX)[None, :]
            qr = tl.sum(q[:, None] * tl.load(bk_ptr + bkofs, mask=bkmask, other=0.0).to(tl.float32), 0)
            c = tl.load(cnt_ptr + o * T + 1)
            m, l_sum, accr, acc = _reduced_tier(
                k_ptr, v_ptr, row, start_k, start_v, c, qr, m, l_sum, accr, acc, R1, BLOCK_RK, RV1, BLOCK_RV,
                BLOCK_N, SCALE, SOFTCAP, HAS_SOFTCAP,
            )
            start_k += c * R1
            start_v += c * RV1
            if NUM_RED > 1:
                c = tl.load(cnt_ptr + o * T + 2)
                m, l_sum, accr, acc = _reduced_tier(
                    k_ptr, v_ptr, row, start_k, start_v, c, qr, m, l_sum, accr, acc, R2, BLOCK_RK, RV2, BLOCK_RV,
                    BLOCK_N, SCALE, SOFTCAP, HAS_SOFTCAP,
                )
                start_k += c * R2
                start_v += c * RV2
            if NUM_RED > 2:
                c = tl.load(cnt_ptr + o * T + 3)
                m, l_sum, accr, acc = _reduced_tier(
                    k_ptr, v_ptr, row, start_k, start_v, c, qr, m, l_sum, accr, acc, R3, BLOCK_RK, RV3, BLOCK_RV,
                    BLOCK_N, SCALE, SOFTCAP, HAS_SOFTCAP,
                )
                start_k += c * R3
                start_v += c * RV3
            if NUM_RED > 3:
                c = tl.load(cnt_ptr + o * T + 4)
                m, l_sum, accr, acc = _reduced_tier(
                    k_ptr, v_ptr, row, start_k, start_v, c, qr, m, l_sum, accr, acc, R4, BLOCK_RK, RV4, BLOCK_RV,
                    BLOCK_N, SCALE, SOFTCAP, HAS_SOFTCAP,
                )

        # new-token region: the first n_new slots of [NCAP, D] for this owner
        n_new = tl.load(nnew_ptr)
        slot = 0
        while slot < n_new:
            rows = slot + offs_n
            rmask = rows < n_new
            ptr = (o.to(tl.int64) * NCAP + rows[:, None]) * D + offs_d[None, :]
            msk = rmask[:, None] & dmask[None, :]
            k = tl.load(kn_ptr + ptr, mask=msk, other=0.0).to(tl.float32)
            s = tl.where(rmask, _logits(k, q, SCALE, SOFTCAP, HAS_SOFTCAP), float("-inf"))
            v = tl.load(vn_ptr + ptr, mask=msk, other=0.0).to(tl.float32)
            m, l_sum, acc, accr = _online(m, l_sum, acc, accr, s, v, True)
            slot += BLOCK_N

        out = acc
        if NUM_RED > 0:
            # reduced tiers' value coefficients (zero-padded to rv_max) rotated back once: accr @ basis_v[o]^T
            offs_rv = tl.arange(0, BLOCK_RV)
            bvofs = o.to(tl.int64) * D * RV_MAX + offs_d[:, None] * RV_MAX + offs_rv[None, :]
            bv = tl.load(bv_ptr + bvofs, mask=dmask[:, None] & (offs_rv < RV_MAX)[None, :], other=0.0)
            out = out + tl.sum(bv.to(tl.float32) * accr[None, :], 1)
        out = out / tl.where(l_sum > 0, l_sum, 1.0)
        tl.store(out_ptr + pid.to(tl.int64) * D + offs_d, out.to(out_ptr.dtype.element_ty), mask=dmask)

    @triton.jit
    def static_decode_kernel(
        q_ptr, k_ptr, v_ptr, cnt_ptr, kn_ptr, vn_ptr, nnew_ptr, bk_ptr, bv_ptr, CAP, NCAP, HQ, out_ptr,
        KV_HEADS: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr, T: tl.constexpr,
        NUM_RED: tl.constexpr, R1: tl.constexpr, R2: tl.constexpr, R3: tl.constexpr, R4: tl.constexpr,
        RV1: tl.constexpr, RV2: tl.constexpr, RV3: tl.constexpr, RV4: tl.constexpr,
        RK_MAX: tl.constexpr, BLOCK_RK: tl.constexpr, RV_MAX: tl.constexpr, BLOCK_RV: tl.constexpr,
        BLOCK_N: tl.constexpr, SCALE: tl.constexpr, SOFTCAP: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    ):
        """Node with bases (9 inputs): inputs, scalars CAP/NCAP/HQ, output, constexprs."""
        _static_decode_body(
            q_ptr, k_ptr, v_ptr, cnt_ptr, kn_ptr, vn_ptr, nnew_ptr, bk_ptr, bv_ptr, CAP, NCAP, HQ, out_ptr,
            KV_HEADS, D, BLOCK_D, T, NUM_RED, R1, R2, R3, R4, RV1, RV2, RV3, RV4, RK_MAX, BLOCK_RK, RV_MAX, BLOCK_RV,
            BLOCK_N, SCALE, SOFTCAP, HAS_SOFTCAP,
        )

    @triton.jit
    def static_decode_kernel_nobasis(
        q_ptr, k_ptr, v_ptr, cnt_ptr, kn_ptr, vn_ptr, nnew_ptr, CAP, NCAP, HQ, out_ptr,
        KV_HEADS: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr, T: tl.constexpr,
        BLOCK_N: tl.constexpr, SCALE: tl.constexpr, SOFTCAP: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    ):
        """Node without bases (7 inputs, full tier only); the basis pointers are never read."""
        _static_decode_body(
            q_ptr, k_ptr, v_ptr, cnt_ptr, kn_ptr, vn_ptr, nnew_ptr, q_ptr, q_ptr, CAP, NCAP, HQ, out_ptr,
            KV_HEADS, D, BLOCK_D, T, 0, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, BLOCK_N, SCALE, SOFTCAP, HAS_SOFTCAP,
        )


def kernel_constexprs(
    tier_dims: tuple[int, ...], kv_heads: int, scale: float, softcap: float, has_basis: bool,
    value_dims: tuple[int, ...] | None = None,
) -> dict[str, Any]:
    """Compile-time constants of the kernel for one node's attributes (`value_dims` None: the same as
    `tier_dims`). The bases are read as [d, rk_max] and [d, rv_max] per owner, rk_max / rv_max the
    widest reduced key / value."""
    d = tier_dims[0]
    value_dims = tuple(tier_dims) if value_dims is None else tuple(value_dims)
    if len(value_dims) != len(tier_dims):
        raise ValueError(f"value_dims {value_dims} and tier_dims {tier_dims} differ in length")
    red, red_v = tier_dims[1:], value_dims[1:]
    if len(red) > 4:
        raise ValueError(f"the kernel takes at most 4 reduced tiers, got {len(red)} ({tier_dims})")
    out: dict[str, Any] = {
        "KV_HEADS": kv_heads, "D": d, "BLOCK_D": next_pow2(d), "T": len(tier_dims),
        "BLOCK_N": DEFAULT_STATIC_DECODE_TUNING.block_n,
        "SCALE": float(scale), "SOFTCAP": float(softcap or 1.0), "HAS_SOFTCAP": bool(softcap),
    }
    if has_basis:
        r, rv = [*red, 1, 1, 1, 1][:4], [*red_v, 1, 1, 1, 1][:4]
        rk_max, rv_max = max(red, default=1), max(red_v, default=1)
        out.update(NUM_RED=len(red), R1=r[0], R2=r[1], R3=r[2], R4=r[3], RV1=rv[0], RV2=rv[1], RV3=rv[2], RV4=rv[3],
                   RK_MAX=rk_max, BLOCK_RK=next_pow2(rk_max), RV_MAX=rv_max, BLOCK_RV=next_pow2(rv_max))
    return out


def static_decode_attention(
    query: torch.Tensor,
    store: StaticStore,
    key_new: torch.Tensor,
    value_new: torch.Tensor,
    n_new: torch.Tensor,
    scale: float | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """The plugin's kernel launched from PyTorch: same contract as `attend_static` for one query
    token (query [B, Hq, 1, d]); `n_new` counts the new tokens including this one."""
    if not HAS_TRITON:
        raise RuntimeError("Triton is not installed")
    if query.shape[2] != 1:
        raise ValueError("the plugin kernel serves one decode token per row")
    d = query.shape[-1]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    has_basis = store.basis_k is not None
    cx = kernel_constexprs(store.tier_dims, store.kv_heads, scale, softcap or 0.0, has_basis, store.value_dims)
    q = query.contiguous()
    out = torch.empty_like(q)
    rows = q.shape[0] * q.shape[1]
    n = n_new.reshape(()).to(torch.int64)
    args = [q, store.keys.contiguous(), store.values.contiguous(), store.counts.contiguous(),
            key_new.contiguous(), value_new.contiguous(), n]
    if has_basis:
        # the kernel reads [d, rk_max] / [d, rv_max] per owner: wider bases give their first columns
        args += [store.basis_k[..., : cx["RK_MAX"]].contiguous(), store.basis_v[..., : cx["RV_MAX"]].contiguous()]
    args += [store.capacity, key_new.shape[2], q.shape[1], out]
    kernel = static_decode_kernel if has_basis else static_decode_kernel_nobasis
    kernel[(rows,)](*args, **cx, num_warps=DEFAULT_STATIC_DECODE_TUNING.num_warps)
    return out


def _signature(dtype: str, has_basis: bool, constexprs: dict[str, Any]) -> dict[str, str]:
    """Triton signature of the kernel: tensor inputs, int32 scalars, output, constexprs."""
    sig = {"q_ptr": f"*{dtype}", "k_ptr": f"*{dtype}", "v_ptr": f"*{dtype}", "cnt_ptr": "*i32",
           "kn_ptr": f"*{dtype}", "vn_ptr": f"*{dtype}", "nnew_ptr": "*i64"}
    if has_basis:
        sig |= {"bk_ptr": f"*{dtype}", "bv_ptr": f"*{dtype}"}
    sig |= {"CAP": "i32", "NCAP": "i32", "HQ": "i32", "out_ptr": f"*{dtype}"}
    sig |= dict.fromkeys(constexprs, "constexpr")
    return sig


def compile_ptx(
    tier_dims: tuple[int, ...], kv_heads: int, scale: float, softcap: float, dtype: str = "fp32",
    capability: int = 90, value_dims: tuple[int, ...] | None = None,
) -> tuple[str, str, int, int]:
    """Compile the kernel for one node to PTX ahead of time: (kernel name, PTX, threads per block,
    shared memory bytes). This is what the QDP `aot_impl` hands to TensorRT. `value_dims`: the
    node's value dims per tier (None: the same as `tier_dims`)."""
    if interpreting():
        name, ptx, threads, shared = call_uninterpreted(
            "mdkv_compile.kernels.static_decode", "compile_ptx", tuple(tier_dims), kv_heads, float(scale),
            float(softcap), dtype, capability, None if value_dims is None else tuple(value_dims))
        return name, ptx, threads, shared
    from triton.backends.compiler import GPUTarget

    has_basis = len(tier_dims) > 1
    cx = kernel_constexprs(tier_dims, kv_heads, scale, softcap, has_basis, value_dims)
    kernel = static_decode_kernel if has_basis else static_decode_kernel_nobasis
    src = triton.compiler.ASTSource(fn=kernel, signature=_signature(dtype, has_basis, cx), constexprs=cx)
    compiled = triton.compile(src, target=GPUTarget("cuda", capability, 32),
                              options={"num_warps": DEFAULT_STATIC_DECODE_TUNING.num_warps})
    md = compiled.metadata
    # Triton >= 3.3 appends two pointer parameters (global and profile scratch) to every kernel;
    # a QDP launch passes only inputs, scalars and outputs, so the kernel must not need them.
    if getattr(md, "global_scratch_size", 0) or getattr(md, "profile_scratch_size", 0):
        raise RuntimeError(f"{md.name} needs Triton scratch memory, which a TensorRT AOT launch does not provide")
    return md.name, compiled.asm["ptx"], md.num_warps * 32, md.shared
