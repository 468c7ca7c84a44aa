"""Where prefill compression spends its time on a GPU: one Llama-3-8B-shaped layer (32 query / 8 KV
heads, head_dim 128, bf16, random inputs), `MixedDimLayer.compress` per method, timed with
synchronisation; the host synchronisations it makes (torch.cuda sync debug mode, by source
line) and the top operators of torch.profiler; and the scoring steps alone, the PyTorch reference
against the fused Triton kernels (kernels/compression.py) on the same inputs (`scoring` in the JSON).
Writes JSON.

    python benchmarks/profile_compress.py --out profile.json [--batch 8 --context 32768]
    python benchmarks/profile_compress.py --out cpu.json --device cpu --batch 1 --context 1024 --methods snapkv
"""

from __future__ import annotations

import argparse
import collections
import json
import statistics
import time
from pathlib import Path

import torch

from mdkv_compile.cache import MixedDimLayer
from mdkv_compile.config import MixedDimKVConfig
from mdkv_compile.profiling import host_sync_sites


def make_layer(method: str, budget: float) -> MixedDimLayer:
    cfg = MixedDimKVConfig(budget=budget, method=method)
    return MixedDimLayer(cfg, layer_idx=5, num_layers=32, dims=cfg.resolve_dims(128))


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_compress(method: str, budget: float, q, k, v, repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        layer = make_layer(method, budget)
        sync(q.device)
        t = time.perf_counter()
        layer.compress(q, k, v, None, None, None)
        sync(q.device)
        times.append(time.perf_counter() - t)
    return times


def median_ms(fn, device: torch.device, repeats: int = 10) -> float:
    """Median wall time of fn() in ms, synchronised, after one warm-up call (compilation, autotuning)."""
    fn()
    times = []
    for _ in range(repeats):
        sync(device)
        t = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


def time_scoring(q, k, window: int = 32, pool_kernel: int = 7, dims: tuple[int, ...] = (16, 32, 64)) -> dict:
    """The two fused steps alone, reference vs kernel, same inputs: window importance (what every
    method scores with) and the attention loss's logit errors (mixeddimkv; random rotated window
    queries and float32 key coordinates of the shapes the policy makes), with the max abs difference."""
    from mdkv_compile.core.losses import logit_errors as errors_torch
    from mdkv_compile.core.scoring import window_importance as importance_torch
    from mdkv_compile.kernels.compression import logit_errors_triton, window_importance_triton
    from mdkv_compile.policies import _tf32_matmuls

    B, Hq, N, d = q.shape
    H = k.shape[1]
    valid = torch.ones(B, N, dtype=torch.bool, device=q.device)
    scale = d**-0.5
    q_rot = torch.randn(B, H, (Hq // H) * min(window, N), d, device=q.device)
    coef = k.float()  # same shape and dtype as the policy's coordinates in the full key basis
    runs = {
        "window_importance": (lambda: importance_torch(q, k, valid, window, pool_kernel, scale),
                              lambda: window_importance_triton(q, k, valid, window, pool_kernel, scale)),
        "logit_errors": (lambda: errors_torch(q_rot, coef, dims, scale),
                         lambda: logit_errors_triton(q_rot, coef, dims, scale, exact=k.dtype == torch.float32)),
    }
    out = {}
    with _tf32_matmuls(k):  # the precision select() gives the reference's matmuls
        for name, (ref, fused) in runs.items():
            out[name] = dict(torch_ms=median_ms(ref, q.device), triton_ms=median_ms(fused, q.device),
                             max_abs_diff=float((ref() - fused()).abs().max()))
            torch.cuda.empty_cache()
    return out


def sync_sites(method: str, budget: float, q, k, v) -> dict[str, int]:
    """Host synchronisations by source line (file:line of the Python frame that triggered them)."""
    layer = make_layer(method, budget)
    sites = host_sync_sites(lambda: layer.compress(q, k, v, None, None, None))
    counts = collections.Counter(f"{Path(f).name}:{line}" for f, line in sites)
    return dict(counts.most_common())


def top_ops(method: str, budget: float, q, k, v, n: int = 25) -> list[dict]:
    from torch.profiler import ProfilerActivity, profile

    layer = make_layer(method, budget)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        layer.compress(q, k, v, None, None, None)
        torch.cuda.synchronize()
    rows = []
    for e in sorted(prof.key_averages(), key=lambda e: -e.device_time_total)[:n]:
        rows.append(dict(name=e.key, calls=e.count, cuda_ms=e.device_time_total / 1e3, cpu_ms=e.cpu_time_total / 1e3))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--context", type=int, default=32768)
    parser.add_argument("--methods", default="snapkv,mixeddimkv")
    parser.add_argument("--budget", type=float, default=0.0625)
    parser.add_argument("--device", default="cuda", help="cpu: compress times only (no syncs, profile or kernels)")
    args = parser.parse_args()
    torch.manual_seed(0)
    B, N = args.batch, args.context
    device = torch.device(args.device)
    on_cuda = device.type == "cuda"
    opts = dict(device=device, dtype=torch.bfloat16)
    q, k, v = torch.randn(B, 32, N, 128, **opts), torch.randn(B, 8, N, 128, **opts), torch.randn(B, 8, N, 128, **opts)
    # an SDPA prefill of the same layer, for scale: what one layer's attention costs at this size
    sdpa = []
    for _ in range(3):
        sync(device)
        t = time.perf_counter()
        torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        sync(device)
        sdpa.append(time.perf_counter() - t)
    result = dict(device=torch.cuda.get_device_name(0) if on_cuda else "cpu", batch=B, context=N,
                  budget=args.budget, sdpa_prefill_ms=statistics.median(sdpa) * 1e3, methods={})
    if on_cuda:
        result["scoring"] = time_scoring(q, k)
        print("scoring", json.dumps(result["scoring"]), flush=True)
    for method in args.methods.split(","):
        times = time_compress(method, args.budget, q, k, v, repeats=4)
        result["methods"][method] = dict(compress_ms=[t * 1e3 for t in times],
                                         median_ms=statistics.median(times[1:]) * 1e3)
        if on_cuda:
            result["methods"][method].update(syncs=sync_sites(method, args.budget, q, k, v),
                                             top_ops=top_ops(method, args.budget, q, k, v))
        args.out.write_text(json.dumps(result, indent=1))
        print(method, json.dumps({k: v for k, v in result["methods"][method].items() if k != "top_ops"}), flush=True)
    print(json.dumps(result["methods"], indent=1)[:6000])


if __name__ == "__main__":
    main()
