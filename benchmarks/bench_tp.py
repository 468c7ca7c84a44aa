"""MixedDimKV under transformers tensor parallelism vs one process: tokens, allocation, bytes, time.

    torchrun --nproc-per-node 2 benchmarks/bench_tp.py --out benchmarks/results/tp_cpu.json

A random Llama (shape from the flags) is saved by rank 0 and loaded on every rank with
`DistributedConfig(tp_plan="auto")` (DTensor TP, gloo on CPU / nccl on GPUs). For every method,
each rank generates with its own MixedDimCache; rank 0 then loads the same model unsharded and
generates again (the other ranks wait), and checks: greedy tokens equal, the ranks' stored
dimensions concatenated over heads equal the single-process allocation, bytes per rank vs the
single-process total, and the bytes the policies' all-gathers sent per rank.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import transformers

import mdkv_compile as mdkv
from mdkv_compile.cache import MixedDimCache, MixedDimLayer
from mdkv_compile.config import METHODS
from mdkv_compile.core.sharding import GATHER_STATS
from mdkv_compile.methods import RECORDS
from mdkv_compile.testing import random_llama


def _generate(model, cfg: mdkv.MixedDimKVConfig, ids: torch.Tensor, new_tokens: int, sync: bool) -> dict:
    """One greedy generation with a fresh cache: tokens, bytes, allocation, wall time.
    `sync`: the model is sharded, so every rank starts the clock together."""
    mdkv.patch(model, cfg)
    cache = MixedDimCache(model.config, cfg, record_selection=True)
    GATHER_STATS.update(calls=0, bytes=0)
    if sync:
        dist.barrier()
    start = time.perf_counter()
    with torch.no_grad():
        out = model.generate(ids, past_key_values=cache, max_new_tokens=new_tokens, do_sample=False)
    elapsed = time.perf_counter() - start
    mdkv.unpatch(model)
    layers = [layer for layer in cache.layers if isinstance(layer, MixedDimLayer)]
    return {
        "tokens": out[0, ids.shape[1] :].tolist(),
        "stored_bytes": cache.stored_bytes(),
        "full_bytes": cache.full_bytes(),
        "time_s": elapsed,
        "gather_calls": GATHER_STATS["calls"],
        "gather_bytes": GATHER_STATS["bytes"],
        "selection": [layer.last_selection.cpu() for layer in layers],
        "value_selection": [layer.last_value_selection.cpu() for layer in layers],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--prompt-tokens", type=int, default=1024)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--budget", type=float, default=0.1)
    parser.add_argument("--window", type=int, default=32)
    parser.add_argument("--methods", nargs="+", default=list(METHODS) + ["mixeddimkv:layer"],
                        help="method names; NAME:layer uses pool='layer'")
    parser.add_argument("--out", default="benchmarks/results/tp_cpu.json")
    args = parser.parse_args()

    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cpu")
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    tmp = [tempfile.mkdtemp(prefix="bench_tp_")]
    dist.broadcast_object_list(tmp, src=0)  # one directory, rank 0's
    root = Path(tmp[0])
    if rank == 0:
        random_llama(
            vocab_size=1024, hidden_size=args.heads * args.head_dim, intermediate_size=4 * args.heads * args.head_dim,
            num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
            head_dim=args.head_dim, max_position_embeddings=args.prompt_tokens + args.new_tokens + 8,
        ).save_pretrained(root / "model")
        gen = torch.Generator().manual_seed(2)
        scores = torch.rand(args.layers, args.heads, generator=gen).tolist()
        (root / "heads.json").write_text(json.dumps({"scores": scores}))
    dist.barrier()

    tp_model = transformers.LlamaForCausalLM.from_pretrained(
        root / "model", dtype=torch.float32, distributed_config=transformers.DistributedConfig(tp_plan="auto")
    ).eval()
    ids = torch.randint(3, 1024, (1, args.prompt_tokens), generator=torch.Generator().manual_seed(1)).to(device)

    def config_for(spec: str) -> mdkv.MixedDimKVConfig:
        method, _, pool = spec.partition(":")
        return mdkv.MixedDimKVConfig(
            method=method, budget=args.budget, window=args.window, pool=pool or "head",
            head_scores=str(root / "heads.json") if RECORDS[method].needs_head_scores else None,
        )

    _generate(tp_model, config_for("full"), ids, 2, sync=True)  # warm-up (first-call costs, not measured)
    tp_runs = {spec: _generate(tp_model, config_for(spec), ids, args.new_tokens, sync=True) for spec in args.methods}
    gathered: list = [None] * world
    dist.gather_object(tp_runs, gathered if rank == 0 else None, dst=0)

    if rank == 0:
        model = transformers.LlamaForCausalLM.from_pretrained(root / "model", dtype=torch.float32).to(device).eval()
        _generate(model, config_for("full"), ids, 2, sync=False)
        results = {}
        for spec in args.methods:
            ref = _generate(model, config_for(spec), ids, args.new_tokens, sync=False)
            per_rank = [g[spec] for g in gathered]
            selection_equal = all(
                torch.equal(torch.cat([r[kind][i] for r in per_rank], dim=1), ref[kind][i])
                for kind in ("selection", "value_selection") for i in range(len(ref["selection"]))
            )
            results[spec] = {
                # Stored dims that occur (0 = evicted): whether reduced tiers were used at all.
                "dims_used": sorted({int(v) for sel in ref["selection"] for v in sel.unique().tolist()}),
                "tokens_equal_single": all(r["tokens"] == ref["tokens"] for r in per_rank),
                "selection_equal_single": selection_equal,
                "stored_bytes_per_rank": [r["stored_bytes"] for r in per_rank],
                "stored_bytes_single": ref["stored_bytes"],
                "stored_bytes_ranks_minus_single": sum(r["stored_bytes"] for r in per_rank) - ref["stored_bytes"],
                "full_bytes_per_rank": [r["full_bytes"] for r in per_rank],
                "full_bytes_single": ref["full_bytes"],
                "gather_bytes_per_rank": [r["gather_bytes"] for r in per_rank],
                "gather_calls_per_rank": [r["gather_calls"] for r in per_rank],
                "time_s_per_rank": [round(r["time_s"], 4) for r in per_rank],
                "time_s_single": round(ref["time_s"], 4),
            }
            print(f"{spec:18s} tokens={results[spec]['tokens_equal_single']} "
                  f"alloc={selection_equal} bytes/rank={results[spec]['stored_bytes_per_rank']} "
                  f"single={ref['stored_bytes']} gathered/rank={results[spec]['gather_bytes_per_rank']} "
                  f"time tp={max(results[spec]['time_s_per_rank']):.2f}s single={ref['time_s']:.2f}s", flush=True)
        report = {
            "what": "MixedDimKV under transformers DTensor tensor parallelism vs one process (bench_tp.py)",
            "world": world,
            "backend": dist.get_backend(),
            "device": str(device),
            "threads_per_process": torch.get_num_threads(),
            "machine": platform.processor() or platform.machine(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "model": {"layers": args.layers, "heads": args.heads, "kv_heads": args.kv_heads,
                      "head_dim": args.head_dim, "random_weights": True},
            "prompt_tokens": args.prompt_tokens,
            "new_tokens": args.new_tokens,
            "budget": args.budget,
            "window": args.window,
            "methods": results,
        }
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
        print("wrote", args.out)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
