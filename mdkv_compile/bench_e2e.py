"""End-to-end decode speed, compression overhead and memory of a Llama-3-8B-shaped model (random
bf16 weights: speed needs no trained weights) on one GPU. Writes JSON after every configuration.

    mdkv bench --suite e2e --out results.json [--quick]
    python benchmarks/bench_e2e.py --out results.json [--quick]

Per configuration: prefill once (timed), then single-token decode steps through the model's
forward (timed one by one with synchronisation; the median is reported), peak allocated memory
(torch.cuda.max_memory_allocated) and the cache's own measured bytes. "dynamic" is transformers'
DynamicCache with SDPA, i.e. plain `generate()`-style decoding with a full cache.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch

LLAMA3_8B = dict(
    vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
    num_attention_heads=32, num_key_value_heads=8, head_dim=128, max_position_embeddings=131072,
    rope_theta=500000.0,
)


def build_model(layers: int | None):
    from transformers import LlamaConfig, LlamaForCausalLM

    kwargs = dict(LLAMA3_8B)
    if layers:
        kwargs["num_hidden_layers"] = layers
    config = LlamaConfig(**kwargs)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device("cuda"):
            model = LlamaForCausalLM(config).eval()
    finally:
        torch.set_default_dtype(previous)
    return model


def run_config(model, batch: int, context: int, method: str, budget: float, steps: int) -> dict:
    import mdkv_compile as mdkv

    if method == "dynamic":
        mdkv.unpatch(model)
        from transformers import DynamicCache

        cache = DynamicCache(config=model.config)
    else:
        cfg = mdkv.MixedDimKVConfig(budget=budget, method=method)
        mdkv.patch(model, cfg)
        cache = mdkv.MixedDimCache(model.config, cfg)
    ids = torch.randint(0, model.config.vocab_size, (batch, context), device="cuda")
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    with torch.inference_mode():
        torch.cuda.synchronize()
        start = time.perf_counter()
        out = model(ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
        torch.cuda.synchronize()
        prefill_s = time.perf_counter() - start
        del ids
        token = out.logits[:, -1:].argmax(-1)
        del out
        step_s = []
        for _ in range(steps):
            torch.cuda.synchronize()
            t = time.perf_counter()
            out = model(token, past_key_values=cache, use_cache=True)
            token = out.logits[:, -1:].argmax(-1)
            torch.cuda.synchronize()
            step_s.append(time.perf_counter() - t)
    if method == "dynamic":
        stored = sum(layer.keys.numel() * layer.keys.element_size() * 2 for layer in cache.layers)
        full = stored
    else:
        stored, full = cache.stored_bytes(), cache.full_bytes()
    median = statistics.median(step_s[2:] if len(step_s) > 4 else step_s)
    row = dict(
        batch=batch, context=context, method=method, budget=budget, prefill_s=prefill_s,
        decode_step_ms=median * 1e3, decode_tokens_per_s=batch / median, steps=len(step_s),
        cache_bytes=stored, full_cache_bytes=full,
        peak_allocated_bytes=torch.cuda.max_memory_allocated(), weights_bytes=base,
    )
    del cache
    torch.cuda.empty_cache()
    return row


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--layers", type=int, default=None, help="fewer layers for a quick run")
    parser.add_argument("--quick", action="store_true", help="small shapes (checks the script)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    add_arguments(parser)
    return run(parser.parse_args(argv))


def run(args: argparse.Namespace) -> int:
    if not torch.cuda.is_available():
        print("the end-to-end benchmark needs a CUDA GPU", file=sys.stderr)
        return 2
    args.out = Path(args.out)
    plan = (
        [(1, 2048, "dynamic", 1.0), (1, 2048, "mixeddimkv", 0.0625)]
        if args.quick
        else [
            # (c) compression overhead against prefill, batch 1
            (1, 8192, "dynamic", 1.0), (1, 8192, "mixeddimkv", 0.0625),
            (1, 32768, "dynamic", 1.0), (1, 32768, "mixeddimkv", 0.0625),
            # (b) end-to-end decode at 32K, batch 8
            (8, 32768, "dynamic", 1.0), (8, 32768, "full", 1.0),
            (8, 32768, "snapkv", 0.0625), (8, 32768, "mixeddimkv", 0.0625), (8, 32768, "mixeddimkv", 0.01),
            # (d) one 128K sequence: bytes per sequence, full vs compressed
            (1, 131072, "dynamic", 1.0), (1, 131072, "mixeddimkv", 0.0625), (1, 131072, "mixeddimkv", 0.01),
        ]
    )
    model = build_model(args.layers)
    total_mem = torch.cuda.get_device_properties(0).total_memory
    result = {
        "device": torch.cuda.get_device_name(0), "torch": torch.__version__, "model": "Llama-3-8B shape, random bf16",
        "layers": model.config.num_hidden_layers, "total_memory_bytes": total_mem, "rows": [],
    }
    for batch, context, method, budget in plan:
        try:
            row = run_config(model, batch, context, method, budget, args.steps)
        except Exception as exc:  # record and go on: one OOM must not lose the other rows
            row = dict(batch=batch, context=context, method=method, budget=budget, error=repr(exc)[:500])
            traceback.print_exc()
            torch.cuda.empty_cache()
        result["rows"].append(row)
        args.out.write_text(json.dumps(result, indent=1))
        print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
