"""End-to-end decode speed, compression overhead and memory of a Llama-3-8B-shaped model (random
bf16 weights: speed needs no trained weights) on one GPU. Writes JSON after every configuration.

    mdkv bench --suite e2e --out results.json [--part decode|prefill|all] [--quick]
    python benchmarks/bench_e2e.py --out results.json

A row is (batch, context, cache, budget, mode):

* cache: "dynamic" (transformers' DynamicCache + SDPA, the unpatched model), "static"
  (transformers' StaticCache + SDPA), or a MixedDimKV method ("full" at budget 1.0 is our own
  path with nothing compressed: the baseline that isolates what compression buys).
* mode: "generate" (transformers' `model.generate()`, steps timed by a logits processor), "eager"
  (single-token forward calls), "graph" (the step captured once as a CUDA graph and replayed,
  `mdkv_compile.hf.cuda_graphs.GraphedDecoder`), "compiled-graph" (the same after
  `compile_regions`: MLP and RMSNorm modules compiled by Inductor; these rows run last).

Per row: prefill once (timed), decode steps (each timed with synchronisation; median), peak
allocated memory (torch.cuda.max_memory_allocated), the cache's own measured bytes and, with
`--part capacity`, how many copies of one 128K-token cache can be allocated on the card.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch

from mdkv_compile.cache import MixedDimCache
from mdkv_compile.config import MixedDimKVConfig
from mdkv_compile.hf.cuda_graphs import GraphedDecoder, compile_regions
from mdkv_compile.hf.patch import patch, unpatch
from mdkv_compile.testing import decode_one_token, prefill, random_llama
from mdkv_compile.usage import positive_int

LLAMA3_8B = dict(
    vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
    num_attention_heads=32, num_key_value_heads=8, head_dim=128, max_position_embeddings=131072,
    rope_theta=500000.0,
)
HF_CACHES = ("dynamic", "static")
GRAPH_MODES = ("graph", "compiled-graph")


@dataclasses.dataclass(frozen=True)
class Config:
    batch: int
    context: int
    cache: str  # "dynamic", "static" or a MixedDimKV method
    budget: float = 1.0
    mode: str = "eager"  # "eager", "graph", "compiled-graph" or "generate"


def plan(part: str, quick: bool) -> list[Config]:
    if quick:
        return [
            Config(1, 2048, "dynamic"), Config(1, 2048, "dynamic", mode="generate"),
            Config(1, 2048, "static", mode="graph"), Config(1, 2048, "full", mode="graph"),
            Config(1, 2048, "mixeddimkv", 0.0625), Config(1, 2048, "mixeddimkv", 0.0625, "graph"),
            Config(1, 2048, "mixeddimkv", 0.0625, "compiled-graph"),
        ]
    decode = [
        # (b) end-to-end decode at 32K, batch 8: transformers' generate(), the same full cache under a
        # CUDA graph, our path at budget 1.0, and compressed
        Config(8, 32768, "dynamic", mode="generate"), Config(8, 32768, "static", mode="graph"),
        Config(8, 32768, "full", mode="graph"), Config(8, 32768, "snapkv", 0.0625, "graph"),
        Config(8, 32768, "mixeddimkv", 0.0625, "graph"), Config(8, 32768, "mixeddimkv", 0.0625, "eager"),
        Config(8, 32768, "mixeddimkv", 0.01, "graph"),
        Config(8, 32768, "full", mode="compiled-graph"), Config(8, 32768, "mixeddimkv", 0.0625, "compiled-graph"),
        Config(8, 32768, "mixeddimkv", 0.01, "compiled-graph"),
        # 128K context, batch 1 (batch 8 of a full 128K cache does not fit: 137 GB)
        Config(1, 131072, "full", mode="graph"), Config(1, 131072, "mixeddimkv", 0.0625, "graph"),
        Config(1, 131072, "mixeddimkv", 0.01, "graph"),
    ]
    prefill = [
        # (c) compression overhead against prefill, batch 1
        Config(1, 8192, "dynamic"), Config(1, 8192, "mixeddimkv", 0.0625),
        Config(1, 32768, "dynamic"), Config(1, 32768, "snapkv", 0.0625), Config(1, 32768, "mixeddimkv", 0.0625),
        Config(1, 131072, "dynamic"), Config(1, 131072, "mixeddimkv", 0.0625),
    ]
    return {"decode": decode, "prefill": prefill, "all": decode + prefill, "capacity": []}[part]


def build_model(layers: int | None):
    kwargs = dict(LLAMA3_8B)
    if layers:
        kwargs["num_hidden_layers"] = layers
    return random_llama(attn_implementation="sdpa", dtype=torch.bfloat16, device="cuda", **kwargs)


def make_cache(model, c: Config, max_new_tokens: int):
    """Patch (or unpatch) the model for `c` and return the cache to prefill into."""
    from transformers import DynamicCache, StaticCache

    if c.cache in HF_CACHES:
        unpatch(model)
        if c.cache == "dynamic":
            return DynamicCache(config=model.config)
        return StaticCache(config=model.config, max_cache_len=c.context + max_new_tokens)
    cfg = MixedDimKVConfig(budget=c.budget, method=c.cache)
    patch(model, cfg)
    return MixedDimCache(model.config, cfg, max_new_tokens=max_new_tokens if c.mode in GRAPH_MODES else None)


def cache_bytes(cache) -> tuple[int, int]:
    """(bytes the cache holds, bytes a full cache holds for the same tokens), from its tensors."""
    if isinstance(cache, MixedDimCache):
        return cache.stored_bytes(), cache.full_bytes()
    held = sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))
    return held, held


def _synced(fn):
    torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn()
    torch.cuda.synchronize()
    return out, time.perf_counter() - start


def time_generate(model, ids: torch.Tensor, steps: int) -> tuple[float, list[float]]:
    """transformers' generate() with its default (dynamic) cache, greedy. A logits processor runs once
    per new token, after that token's forward: synchronised timestamps there give the prefill time
    (start to first call) and each decode step's time (between consecutive calls)."""
    from transformers import LogitsProcessorList

    stamps: list[float] = []

    def stamp(input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        torch.cuda.synchronize()
        stamps.append(time.perf_counter())
        return scores

    with torch.inference_mode():
        torch.cuda.synchronize()
        start = time.perf_counter()
        model.generate(ids, max_new_tokens=1 + steps, min_new_tokens=1 + steps, do_sample=False, pad_token_id=0,
                       logits_processor=LogitsProcessorList([stamp]))
    steps_s = [b - a for a, b in zip(stamps, stamps[1:], strict=False)]
    return stamps[0] - start, steps_s[1:]


def _prefill_static(model, cache, ids: torch.Tensor) -> float:
    """Fill a StaticCache with the prompt: prefill through a DynamicCache (causal SDPA without a
    mask; a static cache's prefill builds a [B, 1, N, max_len] mask and a slower kernel) and copy."""
    from transformers import DynamicCache

    dynamic = DynamicCache(config=model.config)
    _, prefill_s = _synced(lambda: model(ids, past_key_values=dynamic, use_cache=True, logits_to_keep=1))
    n = ids.shape[1]
    for layer, filled in zip(cache.layers, dynamic.layers, strict=True):
        layer.lazy_initialization(filled.keys, filled.values)
        layer.keys[:, :, :n].copy_(filled.keys)
        layer.values[:, :, :n].copy_(filled.values)
        layer.cumulative_length.fill_(n)
        filled.keys = filled.values = None  # free as we go: two full caches at once may not fit
    return prefill_s


def time_decode(model, cache, ids: torch.Tensor, c: Config, steps: int) -> tuple[float, list[float]]:
    with torch.inference_mode():
        if c.cache == "static":
            prefill_s = _prefill_static(model, cache, ids)
            token = ids[:, -1:]  # any token: only the step time is measured
        else:
            logits, prefill_s = _synced(lambda: prefill(model, ids, cache, logits_to_keep=1))
            token = logits.argmax(-1, keepdim=True)
            del logits
    step_s = []
    if c.mode in GRAPH_MODES:
        decoder = GraphedDecoder(model, cache)
        for _ in range(steps):
            logits, t = _synced(lambda tok=token: decoder.step(tok))
            token = logits.argmax(-1, keepdim=True)
            step_s.append(t)
        return prefill_s, step_s[1:]  # the first step includes the capture
    with torch.inference_mode():
        for _ in range(steps):
            logits, t = _synced(lambda tok=token: decode_one_token(model, tok, cache))
            token = logits.argmax(-1, keepdim=True)
            step_s.append(t)
    return prefill_s, step_s[2:]


def _live_cuda_tensors(exclude: set[int]) -> list[str]:
    """Shapes of the largest CUDA tensors still alive (not the model's), for the leak report."""
    found = []
    for obj in gc.get_objects():
        try:
            if isinstance(obj, torch.Tensor) and obj.is_cuda and id(obj) not in exclude:
                found.append((obj.numel() * obj.element_size(), f"{tuple(obj.shape)} {obj.dtype}"))
        except Exception:  # objects that fail isinstance/attribute checks (proxies) are not tensors
            continue
    return [f"{desc} {size / 2**20:.1f} MiB" for size, desc in sorted(found, reverse=True)[:6]]


def run_config(model, c: Config, steps: int) -> dict:
    gc.collect()
    torch.cuda.empty_cache()
    start_bytes = torch.cuda.memory_allocated()
    ids = torch.randint(0, model.config.vocab_size, (c.batch, c.context), device="cuda")
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    held = full = None
    if c.mode == "generate":
        unpatch(model)
        prefill_s, step_s = time_generate(model, ids, steps)
    else:
        cache = make_cache(model, c, steps + 8)
        prefill_s, step_s = time_decode(model, cache, ids, c, steps)
        held, full = cache_bytes(cache)
        del cache
    median = statistics.median(step_s)
    row = dict(
        dataclasses.asdict(c), prefill_s=prefill_s, decode_step_ms=median * 1e3,
        decode_tokens_per_s=c.batch / median, steps_timed=len(step_s), cache_bytes=held, full_cache_bytes=full,
        peak_allocated_bytes=torch.cuda.max_memory_allocated(), weights_bytes=base,
    )
    del ids
    gc.collect()
    torch.cuda.empty_cache()
    # memory the row left allocated (should be 0: every row must start from the weights alone)
    row["left_allocated_bytes"] = torch.cuda.memory_allocated() - start_bytes
    if row["left_allocated_bytes"] > 2**20:
        row["left_tensors"] = _live_cuda_tensors({id(p) for p in model.parameters()} | {id(b) for b in model.buffers()})
    return row


def _tensors(obj, seen: set[int]) -> list[torch.Tensor]:
    """Every tensor reachable from a cache layer's attributes (stores, regions, counts)."""
    if isinstance(obj, torch.Tensor):
        return [] if id(obj) in seen or seen.add(id(obj)) else [obj]
    if isinstance(obj, (list, tuple)):
        return [t for x in obj for t in _tensors(x, seen)]
    if dataclasses.is_dataclass(obj) or hasattr(obj, "__dict__"):
        fields = vars(obj) if hasattr(obj, "__dict__") else {}
        return [t for name, x in fields.items() if name not in ("cfg",) for t in _tensors(x, seen)]
    return []


def held_bytes(*objects) -> int:
    """Bytes of the distinct storages behind every tensor reachable from `objects` (cache layers,
    the backend's site layers): what they keep allocated. A view keeps its whole storage alive, so
    it counts whole (a store that held a slice of the prompt's keys would count the whole prompt)."""
    seen: set[int] = set()
    storages = {}
    for obj in objects:
        for t in _tensors(obj, seen):
            storage = t.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values())


def sequences_that_fit(model, context: int, cache_kind: str, budget: float, limit: int = 2000) -> dict:
    """Prefill one `context`-token sequence, then allocate copies of its cache until the card is
    full: the number of such sequences that fit beside the weights (measured by allocation)."""
    c = Config(1, context, cache_kind, budget)
    cache = make_cache(model, c, 0)
    ids = torch.randint(0, model.config.vocab_size, (1, context), device="cuda")
    with torch.inference_mode():
        model(ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
    del ids
    tensors = [t for layer in cache.layers for t in _tensors(layer, set())]
    per_seq = sum(t.numel() * t.element_size() for t in tensors)
    torch.cuda.empty_cache()
    copies: list[list[torch.Tensor]] = []
    try:
        while len(copies) + 1 < limit:
            copies.append([t.clone() for t in tensors])
    except torch.cuda.OutOfMemoryError:
        pass
    fit = len(copies) + 1  # the prefilled one
    del copies, cache, tensors
    torch.cuda.empty_cache()
    return dict(context=context, cache=cache_kind, budget=budget, bytes_per_sequence=per_seq, sequences_fit=fit,
                hit_limit=fit >= limit)


def add_e2e_options(parser: argparse.ArgumentParser) -> None:
    """Options of the end-to-end suite (shared with `mdkv bench`)."""
    parser.add_argument("--steps", type=positive_int, default=12, help="e2e: decode steps timed per configuration")
    parser.add_argument("--layers", type=positive_int, default=None, help="e2e: fewer layers for a quick run")
    parser.add_argument("--quick", action="store_true", help="e2e: small shapes (checks the script)")
    parser.add_argument("--part", choices=("decode", "prefill", "capacity", "all"), default="all",
                        help="e2e: which rows (capacity: 128K sequences that fit, full vs compressed)")
    parser.add_argument("--modes", default=None, help="e2e: only rows of these comma-separated modes")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, required=True)
    add_e2e_options(parser)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    add_arguments(parser)
    return run(parser.parse_args(argv))


def run_rows(model, configs: list[Config], args: argparse.Namespace, result: dict) -> None:
    """Warm up (each configuration once at 1K tokens: kernels compiled, libraries loaded), then
    time every configuration; the JSON is rewritten after each row."""
    for c in dict.fromkeys(dataclasses.replace(c, batch=1, context=1024) for c in configs):
        run_config(model, c, 4)
    for c in configs:
        _record(result, "rows", args.out, lambda c=c: run_config(model, c, args.steps), dataclasses.asdict(c))


def _record(result: dict, key: str, out: Path, measure, describe: dict) -> None:
    """Run one measurement, append its row (or the error, described) to result[key], rewrite the
    JSON and print the row: one OOM must not lose the other rows."""
    try:
        row = measure()
    except Exception as exc:
        row = dict(describe, error=repr(exc)[:500])
        traceback.print_exc()
        torch.cuda.empty_cache()
    result[key].append(row)
    out.write_text(json.dumps(result, indent=1))
    print(json.dumps(row), flush=True)


def run(args: argparse.Namespace) -> int:
    if not torch.cuda.is_available():
        print("the end-to-end benchmark needs a CUDA GPU", file=sys.stderr)
        return 2
    args.out = Path(args.out)
    model = build_model(args.layers)
    result = {
        "device": torch.cuda.get_device_name(0), "torch": torch.__version__, "model": "Llama-3-8B shape, random bf16",
        "layers": model.config.num_hidden_layers, "rows": [], "capacity": [],
        "total_memory_bytes": torch.cuda.get_device_properties(0).total_memory,
    }
    configs = plan(args.part, args.quick)
    if args.modes:
        configs = [c for c in configs if c.mode in args.modes.split(",")]
    # rows that need compiled regions last: compiling changes the model for every later row
    groups = [[c for c in configs if c.mode != "compiled-graph"], [c for c in configs if c.mode == "compiled-graph"]]
    for compiled, group in enumerate(groups):
        if compiled and group:
            result["compiled_regions"] = compile_regions(model)
        run_rows(model, group, args, result)
    if args.part in ("capacity", "all"):
        context = 4096 if args.quick else 131072
        for cache_kind, budget in (("dynamic", 1.0), ("mixeddimkv", 0.0625), ("mixeddimkv", 0.01)):
            _record(
                result, "capacity", args.out,
                lambda kind=cache_kind, b=budget: sequences_that_fit(model, context, kind, b),
                dict(context=context, cache=cache_kind, budget=budget),
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
