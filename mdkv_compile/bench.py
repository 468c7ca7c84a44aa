"""`mdkv bench`: decode-attention speed over the packed store vs SDPA, JSON out.

One layer's decode attention at Llama-3-8B shapes (32 query heads, 8 KV heads, head_dim 128, bf16):

* ``sdpa_full``: SDPA over the whole cache (context + decoded tokens);
* ``sdpa_evict``: SDPA over an evicted cache of the same bytes as the packed store (budget x full);
* ``packed``: our Triton kernels over a packed store at the same budget, the bytes split equally over
  the tiers (default 128/64/32/16), the per-owner bases (``2 * d * r_max`` values) counted in it.

SDPA runs twice per cache: with ``enable_gqa=True`` and with the GQA group folded into the query
length (``q.view(B, H_kv, G, d)``: the same function for one decode token, and what FlashAttention
does internally for GQA decode); the faster is the baseline. Every time is the median of
``triton.testing.do_bench`` (eager launches, L2 flushed before each call) and also of
``do_bench_cudagraph`` (launch overhead removed; no L2 flush: rows whose data fits the 60 MB L2 are
flagged). Bandwidth = the bytes each method must read (and write) / time, against a measured
device-to-device copy in the same run. Correctness against a float64 reference runs first.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from typing import Any

import torch
import torch.nn.functional as F

from mdkv_compile import bench_e2e
from mdkv_compile.ops import triton_attention as ta

L2_BYTES = 60 * 2**20  # H200: 60 MB (KINDS.md reading); used only to flag cache-resident rows


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--suite", choices=("decode", "e2e"), default="decode",
        help="decode: attention kernel alone (this module); e2e: whole-model decode, prefill overhead "
        "and memory (mdkv_compile/bench_e2e.py)",
    )
    parser.add_argument("--out", default="bench_decode_attention.json", help="JSON results file")
    bench_e2e.add_e2e_options(parser)
    parser.add_argument("--contexts", default="8192,32768,131072", help="comma-separated prompt lengths")
    parser.add_argument("--batches", default="1,4,16,32,64", help="comma-separated batch sizes")
    parser.add_argument("--budget", type=float, default=0.0625, help="stored bytes / full-cache bytes")
    parser.add_argument("--tiers", default="128,64,32,16", help="tier dims, full first; equal bytes each")
    parser.add_argument("--q-heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--n-new", type=int, default=32, help="decoded tokens already appended")
    parser.add_argument("--rep-ms", type=int, default=100, help="do_bench repetition time")
    parser.add_argument("--max-gib", type=float, default=80.0, help="skip shapes whose tensors exceed this")
    parser.add_argument("--sweep", action="store_true", help="also sweep launch heuristics at a few shapes")
    parser.add_argument("--no-compile-check", action="store_true", help="skip the torch.compile check")


# ------------------------------------------------------------------------------------------------
# inputs
# ------------------------------------------------------------------------------------------------


def tier_counts(n_ctx: int, budget: float, tiers: list[int], d: int, itemsize: int) -> tuple[list[int], int]:
    """Tokens per owner in each tier so that tiers + bases fit budget * full bytes, equal bytes per tier."""
    full = 2 * n_ctx * d * itemsize
    allowed = budget * full
    r_max = tiers[1] if len(tiers) > 1 else 0
    basis = 2 * d * r_max * itemsize
    offsets = 4 * len(tiers)  # one int32 offset per tier per owner
    per_tier = (allowed - basis - offsets) / len(tiers)
    counts = [int(per_tier // (2 * r * itemsize)) for r in tiers]
    used = sum(c * 2 * r * itemsize for c, r in zip(counts, tiers, strict=True)) + basis + offsets
    assert used <= allowed
    return counts, int(used)


def make_packed(
    B: int, Hkv: int, d: int, tiers: list[int], counts: list[int], n_new: int, dtype: torch.dtype,
    gen: torch.Generator, dev: str, jitter: bool = False,
) -> dict[str, Any]:
    """A packed store with the given tokens per owner in each tier (optionally random per owner)."""
    n_own = B * Hkv
    keys, vals, offs = [], [], []
    for r, c in zip(tiers, counts, strict=True):
        if jitter:
            cnt = torch.randint(0, 2 * c + 1, (n_own,), generator=gen, device=dev)
        else:
            cnt = torch.full((n_own,), c, device=dev, dtype=torch.long)
        off = torch.zeros(n_own + 1, dtype=torch.int32, device=dev)
        off[1:] = torch.cumsum(cnt, 0)
        m = int(off[-1])
        keys.append(torch.randn(m, r, generator=gen, device=dev, dtype=dtype))
        vals.append(torch.randn(m, r, generator=gen, device=dev, dtype=dtype))
        offs.append(off)
    r_max = tiers[1] if len(tiers) > 1 else 0
    bk = bv = None
    if r_max:
        bk = torch.linalg.qr(torch.randn(n_own, d, r_max, generator=gen, device=dev))[0].to(dtype).contiguous()
        bv = torch.linalg.qr(torch.randn(n_own, d, r_max, generator=gen, device=dev))[0].to(dtype).contiguous()
    return dict(
        tier_keys=keys, tier_values=vals, tier_offsets=offs, basis_k=bk, basis_v=bv,
        k_new=torch.randn(B, Hkv, max(n_new, 1), d, generator=gen, device=dev, dtype=dtype),
        v_new=torch.randn(B, Hkv, max(n_new, 1), d, generator=gen, device=dev, dtype=dtype),
        n_new=n_new,
    )


def packed_bytes(p: dict[str, Any]) -> int:
    t = [*p["tier_keys"], *p["tier_values"], *p["tier_offsets"]]
    t += [x for x in (p["basis_k"], p["basis_v"]) if x is not None]
    n = sum(x.numel() * x.element_size() for x in t)
    kn = p["k_new"]
    n += 2 * kn.shape[0] * kn.shape[1] * p["n_new"] * kn.shape[3] * kn.element_size()
    return n


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    return float((x.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30))


# ------------------------------------------------------------------------------------------------
# checks
# ------------------------------------------------------------------------------------------------


def correctness(dev: str, gen: torch.Generator, log: list[str]) -> list[dict[str, Any]]:
    """Triton vs the float64 torch version on the GPU; poisoned output; fresh inputs per case."""
    rows = []
    cases = [
        ("small_fp32", 2, 2, 3, 64, [64, 32, 16, 8], [40, 60, 90, 120], 5, torch.float32, None, True),
        ("small_bf16_softcap", 2, 2, 3, 64, [64, 32, 16, 8], [40, 60, 90, 120], 5, torch.bfloat16, 20.0, True),
        ("small_fp16_full_only", 3, 2, 4, 64, [64], [300], 0, torch.float16, None, True),
        ("llama_8k_bf16", 2, 8, 4, 128, [128, 64, 32, 16], [111, 223, 447, 895], 32, torch.bfloat16, None,
         False),
    ]
    for name, B, Hkv, G, d, tiers, counts, n_new, dtype, softcap, jitter in cases:
        p = make_packed(B, Hkv, d, tiers, counts, n_new, dtype, gen, dev, jitter=jitter)
        q = torch.randn(B, Hkv * G, 1, d, generator=gen, device=dev, dtype=dtype)
        out = torch.full((B, Hkv * G, 1, d), float("nan"), device=dev, dtype=dtype)
        ta.packed_decode_attention_triton(q, **p, scale=d**-0.5, softcap=softcap, out=out, poison_workspace=True)
        if out.is_cuda:
            torch.cuda.synchronize()
        ref = ta.packed_decode_attention_torch(q, **p, scale=d**-0.5, softcap=softcap, compute_dtype=torch.float64)
        ref = ref.double()
        ref64 = _ref_f64(q, p, d**-0.5, softcap)
        err = rel_err(out, ref64)
        tol = 1e-5 if dtype == torch.float32 else 2e-2
        ok = bool(torch.isfinite(out).all()) and err < tol
        rows.append(dict(case=name, dtype=str(dtype), rel_err=err, tol=tol, ok=ok,
                         fallback_rel_err=rel_err(ref, ref64)))
        log.append(f"check {name:24s} rel_err {err:.2e} (tol {tol:.0e}) {'ok' if ok else 'FAIL'}")
    return rows


def _ref_f64(q: torch.Tensor, p: dict[str, Any], scale: float, softcap: float | None) -> torch.Tensor:
    """The torch version with every input upcast to float64 first (returns float64)."""
    up = {k: ([x.double() if x.is_floating_point() else x for x in v] if isinstance(v, list) else
              (v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v)) for k, v in p.items()}
    return ta.packed_decode_attention_torch(q.double(), **up, scale=scale, softcap=softcap,
                                            compute_dtype=torch.float64)


def compile_check(dev: str, gen: torch.Generator, log: list[str]) -> dict[str, Any]:
    """torch.compile(fullgraph) over the registered op: same result, kernels inlined by Inductor."""
    from torch._inductor.utils import run_and_get_code

    B, Hkv, G, d = 2, 2, 3, 64
    p = make_packed(B, Hkv, d, [64, 32, 16], [30, 50, 70], 4, torch.bfloat16, gen, dev, jitter=True)
    q = torch.randn(B, Hkv * G, 1, d, generator=gen, device=dev, dtype=torch.bfloat16)

    def f(q: torch.Tensor, p: dict[str, Any]) -> torch.Tensor:
        return ta.packed_decode_attention(q, **p, scale=d**-0.5) * 2.0

    t0 = time.time()
    try:
        out, code = run_and_get_code(torch.compile(f, fullgraph=True), q, p)
        ref = f(q, p)
        src = "\n".join(code)
        res = dict(ok=True, rel_err=rel_err(out, ref), split_kernel_inlined="_packed_decode_split" in src,
                   merge_kernel_inlined="_packed_decode_merge" in src,
                   extern_op_call="torch.ops.mdkv.packed_decode_attention" in src, seconds=time.time() - t0)
    except Exception as e:  # report, don't hide: the table still runs
        res = dict(ok=False, error=f"{type(e).__name__}: {e}"[:2000], seconds=time.time() - t0)
    log.append(f"compile check: {res}")
    return res


# ------------------------------------------------------------------------------------------------
# timing
# ------------------------------------------------------------------------------------------------


def kernel_resources() -> list[dict[str, Any]]:
    """Registers / spills / shared memory of every compiled variant (best effort: Triton internals)."""
    rows: list[dict[str, Any]] = []
    try:
        for fn in (ta._packed_decode_split, ta._packed_decode_merge):
            for caches in fn.device_caches.values():
                for k in caches[0].values():
                    rows.append(dict(kernel=fn.__name__, n_regs=getattr(k, "n_regs", None),
                                     n_spills=getattr(k, "n_spills", None),
                                     shared=getattr(k.metadata, "shared", None),
                                     num_warps=getattr(k.metadata, "num_warps", None),
                                     num_stages=getattr(k.metadata, "num_stages", None),
                                     constants=str(getattr(k, "constants", ""))[:400]))
    except Exception as e:
        rows.append(dict(error=f"{type(e).__name__}: {e}"))
    return rows


def copy_bandwidth(dev: str) -> dict[str, float]:
    import triton.testing as tt

    n = 2 * 2**30  # 2 GiB each way
    a = torch.empty(n, dtype=torch.uint8, device=dev).random_()
    b = torch.empty_like(a)
    ms = tt.do_bench(lambda: b.copy_(a), rep=200, return_mode="median")
    return dict(bytes=2 * n, ms=ms, tb_s=2 * n / ms / 1e9)


def _time(fn, rep_ms: int) -> dict[str, float | None]:
    import triton.testing as tt

    fn()
    torch.cuda.synchronize()
    out: dict[str, float | None] = {"ms": tt.do_bench(fn, rep=rep_ms, return_mode="median")}
    try:
        out["ms_graph"] = tt.do_bench_cudagraph(fn, rep=rep_ms, return_mode="median")
    except Exception:  # a method that cannot be captured still has its eager time
        out["ms_graph"] = None
    return out


def _sdpa_variants(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> dict[str, Any]:
    """SDPA without the math backend (it would materialise repeated KV heads)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    B, Hq, _, d = q.shape
    Hkv = k.shape[1]
    backends = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION]

    def gqa() -> torch.Tensor:
        with sdpa_kernel(backends):
            return F.scaled_dot_product_attention(q, k, v, enable_gqa=True)

    qg = q.view(B, Hkv, Hq // Hkv, d)

    def grouped() -> torch.Tensor:
        with sdpa_kernel(backends):
            return F.scaled_dot_product_attention(qg, k, v).view(B, Hq, 1, d)

    return {"gqa": gqa, "grouped": grouped}


def bench_shape(B: int, n_ctx: int, args: argparse.Namespace, gen: torch.Generator, dev: str,
                bw: float, log: list[str]) -> dict[str, Any]:
    Hq, Hkv, d, nn = args.q_heads, args.kv_heads, args.head_dim, args.n_new
    dtype = torch.bfloat16
    it = 2
    tiers = [int(x) for x in args.tiers.split(",")]
    counts, used_per_owner = tier_counts(n_ctx, args.budget, tiers, d, it)
    n_keep = int(args.budget * n_ctx)  # evicted cache of equal bytes: budget * full bytes / token bytes
    full_cache = 2 * B * Hkv * (n_ctx + nn) * d * it
    row: dict[str, Any] = dict(batch=B, context=n_ctx, n_new=nn, tier_dims=tiers, tier_counts=counts,
                               evict_tokens=n_keep, budget=args.budget)
    if full_cache / 2**30 > args.max_gib:
        row["skipped"] = f"full cache {full_cache / 2**30:.1f} GiB > --max-gib"
        return row
    q = torch.randn(B, Hq, 1, d, generator=gen, device=dev, dtype=dtype)
    qo_bytes = 2 * q.numel() * it  # read q, write out
    scale = d**-0.5

    k = torch.randn(B, Hkv, n_ctx + nn, d, generator=gen, device=dev, dtype=dtype)
    v = torch.randn_like(k)
    res: dict[str, Any] = {}
    for name, fn in _sdpa_variants(q, k, v).items():
        try:
            res[f"sdpa_full_{name}"] = _time(fn, args.rep_ms)
        except Exception as e:
            res[f"sdpa_full_{name}"] = {"error": f"{type(e).__name__}: {e}"[:300]}
    del k, v
    torch.cuda.empty_cache()

    ke = torch.randn(B, Hkv, n_keep + nn, d, generator=gen, device=dev, dtype=dtype)
    ve = torch.randn_like(ke)
    for name, fn in _sdpa_variants(q, ke, ve).items():
        try:
            res[f"sdpa_evict_{name}"] = _time(fn, args.rep_ms)
        except Exception as e:
            res[f"sdpa_evict_{name}"] = {"error": f"{type(e).__name__}: {e}"[:300]}
    evict_bytes = 2 * B * Hkv * (n_keep + nn) * d * it
    del ke, ve

    p = make_packed(B, Hkv, d, tiers, counts, nn, dtype, gen, dev)
    pb = packed_bytes(p)
    res["packed"] = _time(lambda: ta.packed_decode_attention_triton(q, **p, scale=scale), args.rep_ms)
    # the same expected bytes with random tokens per owner and tier (0 .. 2x the mean): load imbalance
    pj = make_packed(B, Hkv, d, tiers, counts, nn, dtype, gen, dev, jitter=True)
    res["packed_jitter"] = _time(lambda: ta.packed_decode_attention_triton(q, **pj, scale=scale), args.rep_ms)
    pjb = packed_bytes(pj)
    pj.clear()

    bytes_of = {"sdpa_full": full_cache + qo_bytes, "sdpa_evict": evict_bytes + qo_bytes, "packed": pb + qo_bytes,
                "packed_jitter": pjb + qo_bytes}
    for key, r in res.items():
        if "ms" not in r:
            continue
        b = bytes_of[key.rsplit("_", 1)[0] if key.startswith("sdpa") else key]
        r["bytes"] = b
        r["tb_s"] = b / r["ms"] / 1e9
        r["tb_s_graph"] = b / r["ms_graph"] / 1e9 if r.get("ms_graph") else None
        r["floor_ms"] = b / (bw * 1e12) * 1e3
        r["fits_l2"] = b < L2_BYTES
    row["methods"] = res

    def best(prefix: str, key: str) -> float | None:
        vals = [r[key] for k_, r in res.items() if k_.startswith(prefix) and r.get(key)]
        return min(vals) if vals else None

    for key in ("ms", "ms_graph"):
        f, e, pk = best("sdpa_full", key), best("sdpa_evict", key), res["packed"].get(key)
        row[f"speedup_vs_full_{key}"] = f / pk if f and pk else None
        row[f"packed_over_evict_{key}"] = pk / e if e and pk else None
    row["packed_stored_bytes_per_owner"] = used_per_owner
    p.clear()  # free the store before the next shape
    torch.cuda.empty_cache()
    pr = res["packed"]
    nan = float("nan")
    log.append(
        f"B={B:3d} N={n_ctx:6d} | full {best('sdpa_full', 'ms') or nan:8.4f} ms"
        f" ({best('sdpa_full', 'ms_graph') or nan:8.4f} g)"
        f" | evict {best('sdpa_evict', 'ms') or nan:7.4f} ({best('sdpa_evict', 'ms_graph') or nan:7.4f} g)"
        f" | packed {pr['ms']:7.4f} ({pr['ms_graph'] or nan:7.4f} g)"
        f" {pr['tb_s_graph'] or 0:5.2f} TB/s g, floor {pr['floor_ms']:.4f} ms"
    )
    return row


def sweep(args: argparse.Namespace, gen: torch.Generator, dev: str, log: list[str]) -> list[dict[str, Any]]:
    """Split-K target, reduced-tier block rows and stages at three shapes: the heuristics' evidence."""
    import triton.testing as tt

    out = []
    Hq, Hkv, d = args.q_heads, args.kv_heads, args.head_dim
    tiers = [int(x) for x in args.tiers.split(",")]
    base = dict(ta.TUNING)
    for B, n_ctx in ((1, 8192), (1, 131072), (64, 32768)):
        counts, _ = tier_counts(n_ctx, args.budget, tiers, d, 2)
        p = make_packed(B, Hkv, d, tiers, counts, args.n_new, torch.bfloat16, gen, dev)
        q = torch.randn(B, Hq, 1, d, generator=gen, device=dev, dtype=torch.bfloat16)
        for pps in (2, 4, 8):
            for bnr in (64, 128):
                for ns in (2, 3):
                    ta.TUNING.update(programs_per_sm=pps, block_n_reduced_max=bnr, num_stages=ns)
                    fn = lambda: ta.packed_decode_attention_triton(q, **p, scale=d**-0.5)  # noqa: B023
                    fn()
                    ms = tt.do_bench_cudagraph(fn, rep=args.rep_ms, return_mode="median")
                    out.append(dict(batch=B, context=n_ctx, programs_per_sm=pps, block_n_reduced_max=bnr,
                                    num_stages=ns, ms_graph=ms))
                    log.append(f"sweep B={B} N={n_ctx} pps={pps} bnr={bnr} stages={ns}: {ms:.4f} ms")
        ta.TUNING.clear()
        ta.TUNING.update(base)
        p.clear()
    return out


def run(args: argparse.Namespace) -> int:
    if args.suite == "e2e":
        return bench_e2e.run(args)
    if not torch.cuda.is_available():
        print("mdkv bench needs a CUDA GPU", file=sys.stderr)
        return 2
    import triton

    dev = "cuda"
    gen = torch.Generator(device=dev).manual_seed(0)
    log: list[str] = []
    result: dict[str, Any] = dict(
        gpu=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
        python=platform.python_version(), sms=torch.cuda.get_device_properties(0).multi_processor_count,
        args=vars(args), tuning=dict(ta.TUNING), started=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    )
    result["correctness"] = correctness(dev, gen, log)
    print("\n".join(log), flush=True)
    if not all(r["ok"] for r in result["correctness"]):
        print("correctness FAILED: not timing", file=sys.stderr)
        _write(args.out, result)
        return 1
    if not args.no_compile_check:
        result["compile"] = compile_check(dev, gen, log)
        print(log[-1], flush=True)
    result["copy_bandwidth"] = copy_bandwidth(dev)
    bw = result["copy_bandwidth"]["tb_s"]
    print(f"copy bandwidth {bw:.3f} TB/s", flush=True)
    rows = []
    for n_ctx in [int(x) for x in args.contexts.split(",")]:
        for B in [int(x) for x in args.batches.split(",")]:
            rows.append(bench_shape(B, n_ctx, args, gen, dev, bw, log))
            print(log[-1], flush=True)
            _write(args.out, {**result, "rows": rows})  # partial results survive a timeout
    result["rows"] = rows
    if args.sweep:
        result["sweep"] = sweep(args, gen, dev, log)
    result["kernels"] = kernel_resources()
    result["finished"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    _write(args.out, result)
    print("\n".join(x for x in log if x.startswith("B=")))
    return 0


def _write(path: str, obj: dict[str, Any]) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=1, default=str)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mdkv bench", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())

