"""`mdkv bench`: decode-attention speed over the packed store vs SDPA, JSON out.

One layer's decode attention at Llama-3-8B shapes (32 query heads, 8 KV heads, head_dim 128, bf16):

* ``sdpa_full``: SDPA over the whole cache (context + decoded tokens);
* ``sdpa_evict``: SDPA over an evicted cache of the same bytes as the packed store (budget x full);
* ``packed``: our Triton kernels over a packed store at the same budget, the bytes split equally over
  the tiers (default 128/64/32/16, keys and values at the same dims; ``--tiers`` takes ``rk/rv`` pairs,
  and ``--tiers mixeddimkv`` the policy's default decoupled tiers at ``--head-dim``), the per-owner
  bases (``d * (rk_max + rv_max)`` values) counted in it.

SDPA runs twice per cache: with ``enable_gqa=True`` and with the GQA group folded into the query
length (``q.view(B, H_kv, G, d)``: the same function for one decode token, and what FlashAttention
does internally for GQA decode); the faster is the baseline. Every time is the median of
``triton.testing.do_bench`` (eager launches, L2 flushed before each call) and also of
``do_bench_cudagraph`` (launch overhead removed; no L2 flush: rows whose data fits the 60 MB L2 are
flagged). Bandwidth = the bytes each method must read (and write) / time, against a measured
device-to-device copy in the same run. Correctness against a float64 reference runs first.

``--sweep``: the decode kernel's launch parameters (``ta.Tuning``: split count, warps, stages, rows
per block) at shapes that fill the GPU, one knob group at a time from the best so far, with SDPA over
an evicted cache of the same bytes beside it. ``--chunks``: chunked prefill (L query tokens after a
compressed prompt) against SDPA over the full and the evicted cache with the same causal chunk.
``--dry-run``: every code path on the CPU under ``TRITON_INTERPRET=1`` at tiny shapes (no timing).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import sys
import time
from typing import Any

import torch
import torch.nn.functional as F

from mdkv_compile.bench import e2e as bench_e2e
from mdkv_compile.config import MixedDimKVConfig
from mdkv_compile.core.attention import causal_mask
from mdkv_compile.kernels import store_attention as ta
from mdkv_compile.kernels._triton import interpreting, sm_count
from mdkv_compile.kernels.store_attention.plan import chunk_block_rows
from mdkv_compile.usage import check, command, csv, fraction, non_negative_int, positive_int, writable_file

L2_BYTES = 60 * 2**20  # H200: 60 MB (KINDS.md reading); used only to flag cache-resident rows


def _ints_text(text: str) -> str:
    """A comma list of positive ints, checked and kept as text (each suite splits it where it uses it)."""
    csv(positive_int)(text)
    return text


def _ints_or_empty_text(text: str) -> str:
    return _ints_text(text) if text.strip() else text


def _tiers_text(text: str) -> str:
    """--tiers checked (see `parse_tiers`) and kept as text: it resolves against --head-dim later."""
    if text != "mixeddimkv":
        for item in csv(str)(text):
            for part in item.split("/", 1):
                positive_int(part)
    return text


def _shapes_text(text: str) -> str:
    """CONTEXTxBATCH,... checked (positive ints each side) and kept as text."""
    for item in csv(str)(text):
        parts = item.lower().split("x")
        if len(parts) != 2:
            raise argparse.ArgumentTypeError(f"{item!r} is not CONTEXTxBATCH (e.g. 32768x8)")
        for part in parts:
            positive_int(part)
    return text


def _tuning_text(text: str) -> str:
    """--tuning checked (see `run_tuning`) and kept as text."""
    run_tuning(text)
    return text


def run_tuning(text: str) -> ta.Tuning:
    """'key=value,...' over ``DEFAULT_TUNING`` (ints, 'none', booleans as 0/1/true/false)."""
    fields = {f.name: f for f in dataclasses.fields(ta.Tuning)}
    changes: dict[str, Any] = {}
    for item in csv(str)(text) if text.strip() else []:
        key, sep, value = item.partition("=")
        if not sep or key not in fields:
            raise argparse.ArgumentTypeError(f"{item!r}: not KEY=VALUE with KEY one of {sorted(fields)}")
        default = getattr(ta.DEFAULT_TUNING, key)
        if isinstance(default, bool):
            if value.lower() not in ("0", "1", "true", "false"):
                raise argparse.ArgumentTypeError(f"{item!r}: {key} takes 0/1/true/false")
            changes[key] = value.lower() in ("1", "true")
        elif value.lower() == "none" and key in ("splits", "decode_max_registers", "owner_programs"):
            changes[key] = None
        else:
            changes[key] = positive_int(value)
    return dataclasses.replace(ta.DEFAULT_TUNING, **changes)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--suite", choices=("decode", "e2e"), default="decode",
        help="decode: attention kernel alone (this module); e2e: whole-model decode, prefill overhead "
        "and memory (mdkv_compile/bench/e2e.py)",
    )
    parser.add_argument("--out", default="bench_decode_attention.json", help="JSON results file")
    bench_e2e.add_e2e_options(parser)
    parser.add_argument("--contexts", type=_ints_text, default="8192,32768,131072",
                        help="comma-separated prompt lengths")
    parser.add_argument("--batches", type=_ints_text, default="1,4,16,32,64", help="comma-separated batch sizes")
    parser.add_argument("--shapes", type=lambda text: _shapes_text(text) if text.strip() else text, default="",
                        help="CONTEXTxBATCH list timed instead of every --contexts x --batches pair")
    parser.add_argument("--budget", type=fraction, default=0.0625, help="stored bytes / full-cache bytes")
    parser.add_argument("--tuning", type=_tuning_text, default="",
                        help="launch parameters for every packed call of the run, KEY=VALUE,... over the "
                        "defaults (fields of kernels.store_attention.Tuning), e.g. reverse_regions=0,splits=4")
    parser.add_argument(
        "--tiers", type=_tiers_text, default="128,64,32,16",
        help="tiers, full first, equal bytes each: a dim (keys and values) or KEY/VALUE dims, e.g. "
        "128,128/64,64/32,32/16,16/16; 'mixeddimkv': the full tier and the policy's default tiers at --head-dim",
    )
    parser.add_argument("--q-heads", type=positive_int, default=32)
    parser.add_argument("--kv-heads", type=positive_int, default=8)
    parser.add_argument("--head-dim", type=positive_int, default=128)
    parser.add_argument("--n-new", type=non_negative_int, default=32, help="decoded tokens already appended")
    parser.add_argument("--rep-ms", type=positive_int, default=100, help="do_bench repetition time")
    parser.add_argument("--max-gib", type=float, default=80.0, help="skip shapes whose tensors exceed this")
    parser.add_argument("--sweep", action="store_true", help="also sweep the decode kernel's launch parameters")
    parser.add_argument("--sweep-shapes", type=_shapes_text, default="131072x8,32768x32,8192x64",
                        help="CONTEXTxBATCH list for --sweep")
    parser.add_argument("--sweep-rep-ms", type=positive_int, default=40,
                        help="do_bench_cudagraph repetition time (sweep)")
    parser.add_argument("--chunks", type=_ints_or_empty_text, default="",
                        help="chunk lengths L to time (chunked prefill), e.g. 16,64,256")
    parser.add_argument("--chunk-batches", type=_ints_text, default="1,8", help="batch sizes of the chunk rows")
    parser.add_argument("--chunk-context", type=positive_int, default=32768,
                        help="compressed prompt length of the chunk rows")
    parser.add_argument("--chunk-block-m", type=_ints_text, default="64",
                        help="Tuning.chunk_block_m values to time for the packed chunk (first = reported)")
    parser.add_argument("--chunk-warps", type=_ints_or_empty_text, default="",
                        help="Tuning.chunk_num_warps values to time with each --chunk-block-m (default: the tuning's)")
    parser.add_argument("--no-compile-check", action="store_true", help="skip the torch.compile check")
    parser.add_argument("--dry-run", action="store_true",
                        help="CPU, TRITON_INTERPRET=1, tiny shapes, one untimed call per method: checks the code paths")


def _check_args(args: argparse.Namespace) -> None:
    """What argparse types cannot see alone: the shapes must fit together."""
    writable_file(args.out, "--out")
    check(args.q_heads % args.kv_heads == 0,
          f"--q-heads {args.q_heads} is not a multiple of --kv-heads {args.kv_heads} (GQA groups)")
    d = args.head_dim
    tiers = parse_tiers(args.tiers, d)
    check(tiers[0] == (d, d) and all(max(t) <= d for t in tiers),
          f"--tiers {args.tiers}: the first tier is the full --head-dim {d} (keys and values), the others no wider")


# ------------------------------------------------------------------------------------------------
# inputs
# ------------------------------------------------------------------------------------------------


Tier = tuple[int, int]  # (key dims, value dims)


def parse_tiers(spec: str, d: int) -> list[Tier]:
    """--tiers: 'mixeddimkv', or comma-separated items 'r' (keys and values at r dims) or 'rk/rv'."""
    if spec == "mixeddimkv":
        return [(d, d), *MixedDimKVConfig().resolve_tiers(d)]
    tiers = []
    for item in filter(None, spec.split(",")):
        rk, _, rv = item.partition("/")
        tiers.append((int(rk), int(rv or rk)))
    return tiers


def tier_counts(n_ctx: int, budget: float, tiers: list[Tier], d: int, itemsize: int) -> tuple[list[int], int]:
    """Tokens per owner in each tier so that tiers + bases fit budget * full bytes, equal bytes per tier."""
    full = 2 * n_ctx * d * itemsize
    allowed = budget * full
    basis = d * sum(_basis_widths(tiers)) * itemsize
    offsets = 4 * len(tiers)  # one int32 offset per tier per owner
    per_tier = (allowed - basis - offsets) / len(tiers)
    counts = [int(per_tier // ((rk + rv) * itemsize)) for rk, rv in tiers]
    used = sum(c * (rk + rv) * itemsize for c, (rk, rv) in zip(counts, tiers, strict=True)) + basis + offsets
    assert used <= allowed
    return counts, int(used)


def _basis_widths(tiers: list[Tier]) -> tuple[int, int]:
    """(rk_max, rv_max) of the reduced tiers (tiers[1:]); (0, 0) without one."""
    if len(tiers) < 2:
        return 0, 0
    return max(rk for rk, _ in tiers[1:]), max(rv for _, rv in tiers[1:])


def make_packed(
    B: int, Hkv: int, d: int, tiers: list[Tier], counts: list[int], n_new: int, dtype: torch.dtype,
    gen: torch.Generator, dev: str, jitter: bool = False,
) -> dict[str, Any]:
    """A packed store with the given tokens per owner in each tier (optionally random per owner).
    Coupled tiers draw the same random numbers as before value dims existed (rows stay reproducible)."""
    n_own = B * Hkv
    keys, vals, offs = [], [], []
    for (rk, rv), c in zip(tiers, counts, strict=True):
        if jitter:
            cnt = torch.randint(0, 2 * c + 1, (n_own,), generator=gen, device=dev)
        else:
            cnt = torch.full((n_own,), c, device=dev, dtype=torch.long)
        off = torch.zeros(n_own + 1, dtype=torch.int32, device=dev)
        off[1:] = torch.cumsum(cnt, 0)
        m = int(off[-1])
        keys.append(torch.randn(m, rk, generator=gen, device=dev, dtype=dtype))
        vals.append(torch.randn(m, rv, generator=gen, device=dev, dtype=dtype))
        offs.append(off)
    rk_max, rv_max = _basis_widths(tiers)
    bk = bv = None
    if rk_max:
        bk = torch.linalg.qr(torch.randn(n_own, d, rk_max, generator=gen, device=dev))[0].to(dtype).contiguous()
        bv = torch.linalg.qr(torch.randn(n_own, d, rv_max, generator=gen, device=dev))[0].to(dtype).contiguous()
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


# Correctness cases: name, B, Hkv, G, d, tiers (--tiers syntax), counts, n_new, dtype, softcap, jitter.
CHECK_CASES = [
    ("small_fp32", 2, 2, 3, 64, "64,32,16,8", [40, 60, 90, 120], 5, torch.float32, None, True),
    ("small_bf16_softcap", 2, 2, 3, 64, "64,32,16,8", [40, 60, 90, 120], 5, torch.bfloat16, 20.0, True),
    ("small_fp16_full_only", 3, 2, 4, 64, "64", [300], 0, torch.float16, None, True),
    ("llama_8k_bf16", 2, 8, 4, 128, "128,64,32,16", [111, 223, 447, 895], 32, torch.bfloat16, None, False),
]
# Decoupled tiers (a key of every coordinate, values narrower and wider than their keys), drawn from
# their own generator so the cases above and the timed rows get the inputs they always had.
DECOUPLED_CHECK_CASES = [
    ("decoupled_fp32", 2, 2, 3, 64, "64,64/32,32/16,12/40,8/8", [40, 60, 90, 120, 50], 5, torch.float32, None,
     True),
    ("decoupled_bf16_softcap", 2, 2, 3, 64, "64,64/32,16/8,8/8", [40, 60, 90, 120], 5, torch.bfloat16, 20.0, True),
    ("llama_8k_bf16_mixeddimkv", 2, 8, 4, 128, "mixeddimkv", [111, 300, 600, 1200], 32, torch.bfloat16, None,
     False),
]


def correctness(dev: str, gen: torch.Generator, log: list[str]) -> list[dict[str, Any]]:
    """Triton vs the float64 torch version on the GPU; poisoned output; fresh inputs per case."""
    rows = []
    decoupled_gen = torch.Generator(device=dev).manual_seed(1)
    cases = [(c, gen) for c in CHECK_CASES] + [(c, decoupled_gen) for c in DECOUPLED_CHECK_CASES]
    for (name, B, Hkv, G, d, spec, counts, n_new, dtype, softcap, jitter), gen in cases:
        p = make_packed(B, Hkv, d, parse_tiers(spec, d), counts, n_new, dtype, gen, dev, jitter=jitter)
        q = torch.randn(B, Hkv * G, 1, d, generator=gen, device=dev, dtype=dtype)
        out = torch.full((B, Hkv * G, 1, d), float("nan"), device=dev, dtype=dtype)
        ta.packed_decode_attention_triton(q, **p, scale=d**-0.5, softcap=softcap, out=out, poison_workspace=True)
        if out.is_cuda:
            torch.cuda.synchronize()
        ref = ta.packed_attention_torch(q, **p, scale=d**-0.5, softcap=softcap, compute_dtype=torch.float64)
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
    return ta.packed_attention_torch(q.double(), **up, scale=scale, softcap=softcap,
                                            compute_dtype=torch.float64)


def compile_check(dev: str, gen: torch.Generator, log: list[str]) -> dict[str, Any]:
    """torch.compile(fullgraph) over the registered op: same result, kernels inlined by Inductor; for
    coupled tiers and (key ``decoupled``, from its own generator) decoupled ones."""
    res = _compile_case(dev, gen, "64,32,16", log)
    res["decoupled"] = _compile_case(dev, torch.Generator(device=dev).manual_seed(2), "64,64/32,16/8,8/16", log)
    return res


def _compile_case(dev: str, gen: torch.Generator, spec: str, log: list[str]) -> dict[str, Any]:
    from torch._inductor.utils import run_and_get_code

    B, Hkv, G, d = 2, 2, 3, 64
    tiers = parse_tiers(spec, d)
    p = make_packed(B, Hkv, d, tiers, [30, 50, 70, 40][: len(tiers)], 4, torch.bfloat16, gen, dev, jitter=True)
    q = torch.randn(B, Hkv * G, 1, d, generator=gen, device=dev, dtype=torch.bfloat16)

    def f(q: torch.Tensor, p: dict[str, Any]) -> torch.Tensor:
        return ta.packed_decode_attention(q, **p, scale=d**-0.5) * 2.0

    t0 = time.time()
    try:
        out, code = run_and_get_code(torch.compile(f, fullgraph=True), q, p)
        ref = f(q, p)
        src = "\n".join(code)
        res = dict(ok=True, rel_err=rel_err(out, ref), kernel_inlined="_packed_attention" in src,
                   extern_op_call="torch.ops.mdkv.packed_decode_attention" in src, seconds=time.time() - t0)
    except Exception as e:  # report, don't hide: the table still runs
        res = dict(ok=False, error=f"{type(e).__name__}: {e}"[:2000], seconds=time.time() - t0)
    log.append(f"compile check ({spec}): {res}")
    return res


# ------------------------------------------------------------------------------------------------
# timing
# ------------------------------------------------------------------------------------------------


def kernel_resources() -> list[dict[str, Any]]:
    """Registers / spills / shared memory of every compiled variant (best effort: Triton internals)."""
    rows: list[dict[str, Any]] = []
    try:
        for fn in (ta.jit._packed_attention,):
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


def _time(fn, rep_ms: int, dry: bool = False, eager: bool = True) -> dict[str, float | None]:
    """Medians of do_bench (eager, L2 flushed; skipped with eager=False) and do_bench_cudagraph.
    dry: one untimed call (CPU dry runs), ms = its wall time."""
    if dry:
        t0 = time.perf_counter()
        fn()
        return {"ms": (time.perf_counter() - t0) * 1e3, "ms_graph": None}
    import triton.testing as tt

    fn()
    torch.cuda.synchronize()
    out: dict[str, float | None] = {"ms": tt.do_bench(fn, rep=rep_ms, return_mode="median") if eager else None}
    try:
        out["ms_graph"] = tt.do_bench_cudagraph(fn, rep=rep_ms, return_mode="median")
    except Exception:  # a method that cannot be captured still has its eager time
        out["ms_graph"] = None
    return out


def _sdpa_variants(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> dict[str, Any]:
    """SDPA without the math backend (it would materialise repeated KV heads). One query token:
    ``enable_gqa`` and the group folded into the query length. A chunk of L > 1 (the last L of the
    keys' positions, causal): lower-right causal bias, an explicit boolean mask with ``enable_gqa``,
    and the group folded into the query length with the mask repeated per head of the group."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.attention.bias import causal_lower_right

    B, Hq, L, d = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    G = Hq // Hkv
    backends = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION]
    qg = q.view(B, Hkv, G * L, d)  # row g * L + l: q's own memory order

    def sdpa(qq: torch.Tensor, **kw: Any) -> torch.Tensor:
        with sdpa_kernel(backends):
            return F.scaled_dot_product_attention(qq, k, v, **kw)

    if L == 1:
        return {"gqa": lambda: sdpa(q, enable_gqa=True), "grouped": lambda: sdpa(qg).view(B, Hq, 1, d)}
    mask = causal_mask(L, S, q.device)
    mask_g = mask.repeat(G, 1)
    return {
        "gqa_lower_right": lambda: sdpa(q, attn_mask=causal_lower_right(L, S), enable_gqa=True),
        "gqa_mask": lambda: sdpa(q, attn_mask=mask, enable_gqa=True),
        "grouped_mask": lambda: sdpa(qg, attn_mask=mask_g).view(B, Hq, L, d),
    }


def _sdpa_cache(q: torch.Tensor, n_tokens: int, name: str, args: argparse.Namespace, gen: torch.Generator,
                eager: bool = True) -> tuple[dict[str, Any], int]:
    """Every SDPA variant over a fresh cache of n_tokens tokens per KV head (freed after): results
    keyed f"{name}_{variant}", and the cache's bytes."""
    B, _, _, d = q.shape
    k = torch.randn(B, args.kv_heads, n_tokens, d, generator=gen, device=q.device, dtype=q.dtype)
    v = torch.randn_like(k)
    res: dict[str, Any] = {}
    first = None  # the variants compute the same attention: each is checked against the first that ran
    for variant, fn in _sdpa_variants(q, k, v).items():
        try:
            o = fn()
            first = o if first is None else first
            r = _time(fn, args.rep_ms, args.dry_run, eager)
            res[f"{name}_{variant}"] = {**r, "rel_err_vs_first": rel_err(o, first)}
        except Exception as e:
            res[f"{name}_{variant}"] = {"error": f"{type(e).__name__}: {e}"[:300]}
    nbytes = 2 * k.numel() * k.element_size()
    del k, v
    if q.is_cuda:
        torch.cuda.empty_cache()
    return res, nbytes


def _annotate(res: dict[str, Any], bytes_of: dict[str, int], bw: float) -> None:
    """Bytes, bandwidth (TB/s) and the copy-bandwidth floor of every timed method; bytes_of maps a
    method's prefix (sdpa_full, sdpa_evict, packed...) to the bytes it must move."""
    for key, r in res.items():
        if "ms" not in r:
            continue
        prefix = max((p for p in bytes_of if key.startswith(p)), key=len)
        b = bytes_of[prefix]
        r["bytes"] = b
        r["tb_s"] = b / r["ms"] / 1e9 if r.get("ms") else None
        r["tb_s_graph"] = b / r["ms_graph"] / 1e9 if r.get("ms_graph") else None
        r["floor_ms"] = b / (bw * 1e12) * 1e3
        r["fits_l2"] = b < L2_BYTES


def _best(res: dict[str, Any], prefix: str, key: str) -> float | None:
    vals = [r[key] for k_, r in res.items() if k_.startswith(prefix) and r.get(key)]
    return min(vals) if vals else None


def bench_shape(B: int, n_ctx: int, args: argparse.Namespace, gen: torch.Generator, dev: str,
                bw: float, log: list[str]) -> dict[str, Any]:
    Hq, Hkv, d, nn = args.q_heads, args.kv_heads, args.head_dim, args.n_new
    dtype = torch.bfloat16
    it = 2
    tiers = parse_tiers(args.tiers, d)
    counts, used_per_owner = tier_counts(n_ctx, args.budget, tiers, d, it)
    n_keep = int(args.budget * n_ctx)  # evicted cache of equal bytes: budget * full bytes / token bytes
    full_cache = 2 * B * Hkv * (n_ctx + nn) * d * it
    row: dict[str, Any] = dict(batch=B, context=n_ctx, n_new=nn, tier_dims=[rk for rk, _ in tiers],
                               value_dims=[rv for _, rv in tiers], tier_counts=counts,
                               evict_tokens=n_keep, budget=args.budget)
    if full_cache / 2**30 > args.max_gib:
        row["skipped"] = f"full cache {full_cache / 2**30:.1f} GiB > --max-gib"
        return row
    q = torch.randn(B, Hq, 1, d, generator=gen, device=dev, dtype=dtype)
    qo_bytes = 2 * q.numel() * it  # read q, write out
    scale = d**-0.5

    res, _ = _sdpa_cache(q, n_ctx + nn, "sdpa_full", args, gen)
    evict, evict_bytes = _sdpa_cache(q, n_keep + nn, "sdpa_evict", args, gen)
    res.update(evict)

    p = make_packed(B, Hkv, d, tiers, counts, nn, dtype, gen, dev)
    pb = packed_bytes(p)
    tuning = run_tuning(args.tuning)
    res["packed"] = _time(lambda: ta.packed_decode_attention_triton(q, **p, scale=scale, tuning=tuning), args.rep_ms,
                          args.dry_run)
    # the same launch with a kept arrival-count buffer, which the kernel leaves at zero: no memset per call
    counts_kept = torch.zeros(B * Hkv, dtype=torch.int32, device=dev)
    res["packed_counts_kept"] = _time(
        lambda: ta.packed_decode_attention_triton(q, **p, scale=scale, tuning=tuning, arrival_counts=counts_kept),
        args.rep_ms, args.dry_run)
    # the same expected bytes with random tokens per owner and tier (0 .. 2x the mean): load imbalance
    pj = make_packed(B, Hkv, d, tiers, counts, nn, dtype, gen, dev, jitter=True)
    res["packed_jitter"] = _time(lambda: ta.packed_decode_attention_triton(q, **pj, scale=scale, tuning=tuning),
                                 args.rep_ms, args.dry_run)
    pjb = packed_bytes(pj)
    pj.clear()

    _annotate(res, {"sdpa_full": full_cache + qo_bytes, "sdpa_evict": evict_bytes + qo_bytes,
                    "packed": pb + qo_bytes, "packed_jitter": pjb + qo_bytes}, bw)
    row["methods"] = res
    for key in ("ms", "ms_graph"):
        f, e, pk = _best(res, "sdpa_full", key), _best(res, "sdpa_evict", key), res["packed"].get(key)
        row[f"speedup_vs_full_{key}"] = f / pk if f and pk else None
        row[f"packed_over_evict_{key}"] = pk / e if e and pk else None
    row["packed_stored_bytes_per_owner"] = used_per_owner
    p.clear()  # free the store before the next shape
    if dev == "cuda":
        torch.cuda.empty_cache()
    pr = res["packed"]
    nan = float("nan")
    log.append(
        f"B={B:3d} N={n_ctx:6d} | full {_best(res, 'sdpa_full', 'ms') or nan:8.4f} ms"
        f" ({_best(res, 'sdpa_full', 'ms_graph') or nan:8.4f} g)"
        f" | evict {_best(res, 'sdpa_evict', 'ms') or nan:7.4f} ({_best(res, 'sdpa_evict', 'ms_graph') or nan:7.4f} g)"
        f" | packed {pr['ms']:7.4f} ({pr['ms_graph'] or nan:7.4f} g)"
        f" {pr['tb_s_graph'] or 0:5.2f} TB/s g, floor {pr['floor_ms']:.4f} ms"
        f" | counts kept {res['packed_counts_kept']['ms_graph'] or nan:7.4f} g"
    )
    return row


# Sweep: one knob group at a time, each from the best configuration so far (coordinate descent).
# Split counts are a runtime argument (no recompile); warps/stages and rows per block each compile a
# variant. None = the default policy of `_num_splits`.
SWEEP_SPLITS = (None, 1, 2, 4, 8, 16)
SWEEP_WARPS_STAGES = ((4, 2), (4, 3), (4, 4), (8, 2), (8, 3), (8, 4))
SWEEP_BLOCKS = ((64, 128), (32, 128), (128, 128), (64, 64), (64, 256), (128, 256))  # (full, decode's reduced max)


def _parse_shapes(spec: str) -> list[tuple[int, int]]:
    """'131072x8,32768x32' -> [(131072, 8), (32768, 32)] (context, batch)."""
    out = []
    for item in filter(None, spec.split(",")):
        ctx, batch = item.lower().split("x")
        out.append((int(ctx), int(batch)))
    return out


def sweep(args: argparse.Namespace, gen: torch.Generator, dev: str, bw: float,
          log: list[str]) -> list[dict[str, Any]]:
    """Decode kernel launch parameters at shapes that fill the GPU (`_sweep_shape` each)."""
    return [_sweep_shape(n_ctx, B, args, gen, dev, bw, log) for n_ctx, B in _parse_shapes(args.sweep_shapes)]


def _sweep_shape(n_ctx: int, B: int, args: argparse.Namespace, gen: torch.Generator, dev: str, bw: float,
                 log: list[str]) -> dict[str, Any]:
    """CUDA-graph medians of the configurations one knob group at a time, bytes read, bandwidth, the
    best configuration, and SDPA over an evicted cache of equal bytes."""
    Hq, Hkv, d, nn = args.q_heads, args.kv_heads, args.head_dim, args.n_new
    tiers = parse_tiers(args.tiers, d)
    n_sm = sm_count(torch.device(dev))
    t_shape = time.time()
    counts, _ = tier_counts(n_ctx, args.budget, tiers, d, 2)
    p = make_packed(B, Hkv, d, tiers, counts, nn, torch.bfloat16, gen, dev)
    q = torch.randn(B, Hq, 1, d, generator=gen, device=dev, dtype=torch.bfloat16)
    nbytes = packed_bytes(p) + 2 * q.numel() * 2
    n_own, nreg = B * Hkv, len(tiers)
    avg_rows = sum(int(k.shape[0]) for k in p["tier_keys"]) // n_own + nn
    default = run_tuning(args.tuning)
    ref = ta.packed_decode_attention_triton(q, **p, scale=d**-0.5, tuning=default)
    nan = float("nan")
    timed: dict[ta.Tuning, dict[str, Any]] = {}  # in the order measured

    def measure(tuning: ta.Tuning) -> dict[str, Any]:
        if tuning in timed:
            return timed[tuning]

        def fn() -> torch.Tensor:
            return ta.packed_decode_attention_triton(q, **p, scale=d**-0.5, tuning=tuning)

        # every configuration must give the default's answer (accumulation order aside)
        err = rel_err(fn(), ref)
        t = _time(fn, args.sweep_rep_ms, args.dry_run, eager=False)
        ms = t["ms"] if args.dry_run else t["ms_graph"]
        r = dict(tuning=dataclasses.asdict(tuning), splits=ta.num_splits(n_own, nreg, avg_rows, n_sm, tuning),
                 rel_err_vs_default=err, ok=err < 1e-2, ms_graph=ms, tb_s_graph=nbytes / ms / 1e9 if ms else None)
        timed[tuning] = r
        log.append(f"sweep N={n_ctx} B={B} S={r['splits']:3d} warps={tuning.num_warps} "
                   f"stages={tuning.num_stages} bn={tuning.block_n_full}/{tuning.decode_block_n_reduced_max}: "
                   f"{ms or nan:.4f} ms {r['tb_s_graph'] or 0:.2f} TB/s{'' if r['ok'] else ' MISMATCH'}")
        print(log[-1], flush=True)
        return r

    def best_of(cands: list[ta.Tuning]) -> ta.Tuning:
        good = [(r["ms_graph"], t) for t in cands if (r := measure(t))["ok"] and r["ms_graph"] is not None]
        return min(good, key=lambda x: x[0])[1] if good else cands[0]

    # split counts: distinct resolved S only (the policy's S is one of the fixed ones or another)
    by_s: dict[int, ta.Tuning] = {}
    for s_ in SWEEP_SPLITS:
        t = dataclasses.replace(default, splits=s_)
        by_s.setdefault(ta.num_splits(n_own, nreg, avg_rows, n_sm, t), t)
    best = best_of(list(by_s.values()))
    best = best_of([dataclasses.replace(best, num_warps=w, num_stages=st) for w, st in SWEEP_WARPS_STAGES])
    best = best_of([dataclasses.replace(best, block_n_full=bf, decode_block_n_reduced_max=br)
                    for bf, br in SWEEP_BLOCKS])
    evict, evict_bytes = _sdpa_cache(q, int(args.budget * n_ctx) + nn, "sdpa_evict", args, gen, eager=False)
    _annotate(evict, {"sdpa_evict": evict_bytes + 2 * q.numel() * 2}, bw)
    e_ms = _best(evict, "sdpa_evict", "ms" if args.dry_run else "ms_graph")
    d_ms, b_ms = measure(default)["ms_graph"], measure(best)["ms_graph"]
    row = dict(context=n_ctx, batch=B, bytes=nbytes, floor_ms=nbytes / (bw * 1e12) * 1e3,
               configs=list(timed.values()), default=measure(default), best=measure(best), sdpa_evict=evict,
               best_over_default=b_ms / d_ms if b_ms and d_ms else None,
               best_over_evict=b_ms / e_ms if b_ms and e_ms else None,
               best_fraction_of_copy_bw=(nbytes / b_ms / 1e9) / bw if b_ms else None,
               seconds=time.time() - t_shape)
    changed = {k: v for k, v in dataclasses.asdict(best).items() if v != getattr(default, k)}
    log.append(f"sweep best N={n_ctx} B={B}: {b_ms or nan:.4f} ms (default {d_ms or nan:.4f}, evicted SDPA "
               f"{e_ms or nan:.4f}) {row['best']['tb_s_graph'] or 0:.2f} TB/s = "
               f"{row['best_fraction_of_copy_bw'] or 0:.0%} of copy; S={row['best']['splits']} "
               f"changed from default: {changed or 'nothing'}")
    print(log[-1], flush=True)
    p.clear()
    if dev == "cuda":
        torch.cuda.empty_cache()
    return row


def chunk_rows(args: argparse.Namespace, gen: torch.Generator, dev: str, bw: float,
               log: list[str]) -> list[dict[str, Any]]:
    """Chunked prefill: L query tokens (the chunk's own keys appended as the new tokens, causal among
    them) after a compressed prompt of --chunk-context tokens, against SDPA over the full cache and over
    an evicted cache of equal bytes with the same causal chunk."""
    Hq, Hkv, d, n_ctx = args.q_heads, args.kv_heads, args.head_dim, args.chunk_context
    tiers = parse_tiers(args.tiers, d)
    counts, _ = tier_counts(n_ctx, args.budget, tiers, d, 2)
    n_keep = int(args.budget * n_ctx)
    base = run_tuning(args.tuning)
    warps = [int(x) for x in args.chunk_warps.split(",")] if args.chunk_warps else [base.chunk_num_warps]
    rows = []
    for B in [int(x) for x in args.chunk_batches.split(",")]:
        for L in [int(x) for x in args.chunks.split(",")]:
            # values the launch clamps to the same rows per program (as StorePlan.chunk_split does) are timed once
            block_ms = list(dict.fromkeys(
                chunk_block_rows(Hq // Hkv * L, dataclasses.replace(base, chunk_block_m=int(x)))
                for x in args.chunk_block_m.split(",")))
            variants = [(bm, w) for bm in block_ms for w in warps]
            q = torch.randn(B, Hq, L, d, generator=gen, device=dev, dtype=torch.bfloat16)
            qo_bytes = 2 * q.numel() * 2
            res, full_bytes = _sdpa_cache(q, n_ctx + L, "sdpa_full", args, gen)
            evict, evict_bytes = _sdpa_cache(q, n_keep + L, "sdpa_evict", args, gen)
            res.update(evict)
            p = make_packed(B, Hkv, d, tiers, counts, L, torch.bfloat16, gen, dev)
            try:
                ref = ta.packed_attention_torch(q, **p, scale=d**-0.5)
            except torch.OutOfMemoryError:  # the reference materialises [owners, M, rows, d]: 240 GiB at B=8, L=256
                ref = None
                torch.cuda.empty_cache()
            errs: dict[str, float | None] = {}
            for bm, w in variants:
                tuning = dataclasses.replace(base, chunk_block_m=bm, chunk_num_warps=w)

                def fn(q: torch.Tensor = q, p: dict[str, Any] = p, tuning: ta.Tuning = tuning) -> torch.Tensor:
                    return ta.packed_chunk_attention_triton(q, **p, scale=d**-0.5, tuning=tuning)

                errs[f"bm{bm}w{w}"] = rel_err(fn(), ref) if ref is not None else None
                res[f"packed_bm{bm}w{w}"] = _time(fn, args.rep_ms, args.dry_run)
            _annotate(res, {"sdpa_full": full_bytes + qo_bytes, "sdpa_evict": evict_bytes + qo_bytes,
                            "packed": packed_bytes(p) + qo_bytes}, bw)
            key = "ms_graph" if not args.dry_run else "ms"
            pk = res["packed_bm{}w{}".format(*variants[0])].get(key)
            f, e = _best(res, "sdpa_full", key), _best(res, "sdpa_evict", key)
            row = dict(batch=B, chunk=L, context=n_ctx, tier_counts=counts, evict_tokens=n_keep, methods=res,
                       rel_err_vs_torch=errs, ok=all(x < 2e-2 for x in errs.values() if x is not None),
                       speedup_vs_full=f / pk if f and pk else None, packed_over_evict=pk / e if e and pk else None,
                       sdpa_variants_agree=all(r.get("rel_err_vs_first", 0.0) < 2e-2 for r in res.values()))
            rows.append(row)
            nan = float("nan")
            log.append(f"chunk B={B:2d} L={L:4d} N={n_ctx} | full {f or nan:8.4f} ms | evict {e or nan:7.4f} | packed "
                       + " ".join(f"bm{bm}w{w} {res[f'packed_bm{bm}w{w}'].get(key) or nan:7.4f}" for bm, w in variants)
                       + (f" | rel_err {max(x for x in errs.values() if x is not None):.1e}" if ref is not None
                          else " | reference skipped (out of memory)") + ("" if row["ok"] else " FAIL")
                       + ("" if row["sdpa_variants_agree"] else " | SDPA variants DISAGREE (see JSON)"))
            print(log[-1], flush=True)
            p.clear()
            if dev == "cuda":
                torch.cuda.empty_cache()
    return rows


def _dry_run_args(args: argparse.Namespace) -> None:
    """Tiny shapes for a CPU run under the interpreter: every code path, nothing timed."""
    args.q_heads, args.kv_heads, args.head_dim, args.n_new = 4, 2, 32, 3
    if args.tiers != "mixeddimkv":  # the policy's tiers resolve at the dry run's head dim
        args.tiers = "32,16,8"
    args.contexts, args.batches, args.shapes = "512", "1", ""
    args.sweep_shapes = "512x2"
    args.chunk_context, args.chunk_batches = 512, "1"
    args.chunks = args.chunks and "4"
    args.budget = 0.25
    args.no_compile_check = True


@command("mdkv bench")
def run(args: argparse.Namespace) -> int:
    if args.suite == "e2e":
        return bench_e2e.run(args)
    if not args.dry_run:  # a dry run replaces the shapes
        _check_args(args)
    if args.dry_run:
        if not interpreting():
            print("--dry-run runs the kernels on the CPU: set TRITON_INTERPRET=1", file=sys.stderr)
            return 2
        _dry_run_args(args)
    elif not torch.cuda.is_available():
        print("mdkv bench needs a CUDA GPU (or --dry-run with TRITON_INTERPRET=1)", file=sys.stderr)
        return 2
    import triton

    dev = "cpu" if args.dry_run else "cuda"
    gen = torch.Generator(device=dev).manual_seed(0)
    log: list[str] = []
    result: dict[str, Any] = dict(
        gpu=torch.cuda.get_device_name() if dev == "cuda" else "cpu (dry run)", torch=torch.__version__,
        triton=triton.__version__, python=platform.python_version(),
        sms=sm_count(torch.device(dev)), args=vars(args), tuning=dataclasses.asdict(run_tuning(args.tuning)),
        started=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    )
    result["correctness"] = correctness(dev, gen, log)
    print("\n".join(log), flush=True)
    if not all(r["ok"] for r in result["correctness"]):
        print("correctness FAILED: not timing", file=sys.stderr)
        _write(args.out, result)
        return 1
    if not args.no_compile_check:
        result["compile"] = compile_check(dev, gen, log)
        print("\n".join(log[-2:]), flush=True)  # the coupled and the decoupled case
    result["copy_bandwidth"] = copy_bandwidth(dev) if dev == "cuda" else dict(tb_s=1.0, note="dry run: not measured")
    bw = result["copy_bandwidth"]["tb_s"]
    print(f"copy bandwidth {bw:.3f} TB/s", flush=True)
    rows = []
    shapes = _parse_shapes(args.shapes) or [(int(n), int(b)) for n in args.contexts.split(",") if n
                                            for b in args.batches.split(",") if b]
    for n_ctx, B in shapes:
        rows.append(bench_shape(B, n_ctx, args, gen, dev, bw, log))
        print(log[-1], flush=True)
        _write(args.out, {**result, "rows": rows})  # partial results survive a timeout
    result["rows"] = rows
    ok = True
    if args.chunks:
        t0 = time.time()
        result["chunk_rows"] = chunk_rows(args, gen, dev, bw, log)
        result["chunk_seconds"] = time.time() - t0
        ok &= all(r["ok"] for r in result["chunk_rows"])
        _write(args.out, result)
    if args.sweep:
        t0 = time.time()
        result["sweep"] = sweep(args, gen, dev, bw, log)
        result["sweep_seconds"] = time.time() - t0
        ok &= all(c["ok"] for r in result["sweep"] for c in r["configs"])
    result["kernels"] = kernel_resources()
    result["finished"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    _write(args.out, result)
    print("\n".join(x for x in log if x.startswith(("B=", "chunk B=", "sweep best"))))
    if not ok:
        print("a chunk row or sweep configuration did not match the reference (see the JSON)", file=sys.stderr)
    return 0 if ok else 1


def _write(path: str, obj: dict[str, Any]) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=1, default=str)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mdkv bench", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())

