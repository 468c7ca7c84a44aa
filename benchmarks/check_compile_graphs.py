"""GPU check and timing of the `mixeddimkv` backend under CUDA graphs (`mode="reduce-overhead"`).

Unpatched transformers Llama with its StaticCache, compiled with the backend; prefill and decode
both go through the compiled model (a manual greedy loop).

Part 1 (check; 2 layers, Llama-3-8B head shape, bf16, batch 4, 3000-token prompts). Prediction:
the captured decode step replays the kernels of an eager step of the same compiled code over the
same fixed region, so its logits equal those of the backend without CUDA graphs to bf16 rounding
(the two differ only in the decode region: fixed vs growing, which changes the kernel's work
split); greedy tokens equal. A second prompt on the same compiled model gets a new state: the
wrapper must warm up and capture again (counts in `site_graphs.STATS`), and match again.

Part 2 (timing; Llama-3-8B shape with `--layers` layers, random bf16, batch 8, 32K context):
ms per decode step, median of `--steps`, for Inductor's own reduce-overhead with the full
StaticCache, the backend at budget 1.0 and 0.0625 with CUDA graphs, and at 0.0625 without.
Writes JSON (`--out`).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from check_cuda_graph_decode import model_2layers  # the same small model (this directory is on sys.path)
from transformers import StaticCache

from mdkv_compile.backends import site_graphs
from mdkv_compile.backends.torch_compile import ensure_registered
from mdkv_compile.bench.e2e import build_model
from mdkv_compile.passes import sites as library

CHECK_STEPS = 24


def greedy(fn, config, ids: torch.Tensor, steps: int, max_len: int, timed: bool = False):
    """Prefill `ids` into a fresh StaticCache through `fn`, then `steps` greedy one-token steps.
    Returns (logits per step [steps + 1, B, V] float32, seconds per decode step)."""
    cache = StaticCache(config=config, max_cache_len=max_len)
    n = ids.shape[1]
    step_s = []
    with torch.inference_mode():
        out = fn(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1,
                 cache_position=torch.arange(n, device=ids.device))
        logits = [out.logits[:, -1].float()]
        token = out.logits[:, -1:].argmax(-1)
        for i in range(steps):
            if timed:
                torch.cuda.synchronize()
                start = time.perf_counter()
            out = fn(input_ids=token, past_key_values=cache, use_cache=True,
                     cache_position=torch.tensor([n + i], device=ids.device))
            token = out.logits[:, -1:].argmax(-1)
            if timed:
                torch.cuda.synchronize()
                step_s.append(time.perf_counter() - start)
            logits.append(out.logits[:, -1].float())
    return torch.stack(logits), step_s


def compare(name: str, a: torch.Tensor, b: torch.Tensor, **extra) -> dict:
    """Logits [steps, B, V] of two greedy runs. Once a row's tokens differ its inputs differ, so
    the step where they first do says more than the agreement: with `b`'s top-2 margin there
    (a near tie flips under bf16 rounding) and the largest logit difference before it."""
    same = a.argmax(-1) == b.argmax(-1)  # [steps, B]
    row = dict(case=name, tokens_equal=bool(same.all()), token_agreement=float(same.float().mean()),
               max_logit_diff=float((a - b).abs().max()), **extra)
    if not same.all():
        step, batch = (~same).nonzero()[0].tolist()
        top2 = b[step, batch].topk(2).values
        row.update(first_diff_step=step, first_diff_row=batch, ref_top2_margin_there=float(top2[0] - top2[1]),
                   max_logit_diff_before=float((a[:step] - b[:step]).abs().max()) if step else 0.0)
    print(json.dumps(row), flush=True)
    return row


def check(quick: bool = False) -> list[dict]:
    model = model_2layers()
    gen = torch.Generator("cuda").manual_seed(1)
    prompts = [torch.randint(0, 512, (4, 3000), device="cuda", generator=gen) for _ in range(2)]
    max_len = 3000 + CHECK_STEPS + 8
    rows = []
    configs = [{"budget": 0.0625, "method": "mixeddimkv"}, {"budget": 0.0625, "method": "snapkv"},
               {"budget": 1.0, "method": "mixeddimkv"}]
    for opts in configs[:1] if quick else configs:
        torch._dynamo.reset()
        library.reset_sites()
        graphs = torch.compile(model, backend="mixeddimkv", options={**opts, "mode": "reduce-overhead"})
        plain = torch.compile(model, backend="mixeddimkv", options=opts)
        for i, ids in enumerate(prompts):
            before = dict(site_graphs.STATS)
            got, _ = greedy(graphs, model.config, ids, CHECK_STEPS, max_len)
            stats = {k: site_graphs.STATS[k] - before[k] for k in before}
            want, _ = greedy(plain, model.config, ids, CHECK_STEPS, max_len)
            rows.append(compare(f"{opts['method']}@{opts['budget']} prompt {i}: reduce-overhead vs default mode",
                                got, want, wrapper=stats))
    return rows


def timing(layers: int, batch: int, context: int, steps: int, partial: Path | None = None) -> list[dict]:
    model = build_model(layers)
    ids = torch.randint(0, model.config.vocab_size, (batch, context), device="cuda",
                        generator=torch.Generator("cuda").manual_seed(2))
    max_len = context + steps + 8
    rows = []
    # Inductor's own run last: at 32K x 8 it died in its prefill (segfault) on the H200, taking the rest along.
    cases = [
        ("mixeddimkv budget 1.0, reduce-overhead", "mixeddimkv",
         {"options": {"budget": 1.0, "mode": "reduce-overhead"}}),
        ("mixeddimkv budget 0.0625, reduce-overhead", "mixeddimkv",
         {"options": {"budget": 0.0625, "mode": "reduce-overhead"}}),
        ("mixeddimkv budget 0.0625, default mode", "mixeddimkv", {"options": {"budget": 0.0625}}),
        ("inductor reduce-overhead, full StaticCache", "inductor", {"mode": "reduce-overhead"}),
    ]
    for name, backend, kwargs in cases:
        torch._dynamo.reset()
        library.reset_sites()
        torch.cuda.empty_cache()
        fn = torch.compile(model, backend=backend, **kwargs)
        start = time.perf_counter()
        try:
            _, step_s = greedy(fn, model.config, ids, steps, max_len, timed=True)
        except Exception as exc:  # one failing case must not cost the others' device time
            import traceback

            row = dict(case=name, error=f"{type(exc).__name__}: {exc}"[:2000],
                       where=traceback.format_exc().splitlines()[-12:])
            print(json.dumps(row), flush=True)
            rows.append(row)
            continue
        wall = time.perf_counter() - start
        decode = step_s[3:]  # the first steps compile, warm up and capture
        row = dict(case=name, layers=layers, batch=batch, context=context, steps=len(decode),
                   ms_per_step_median=1e3 * statistics.median(decode), ms_first_steps=[1e3 * s for s in step_s[:3]],
                   wall_s_including_compile=wall, peak_gib=torch.cuda.max_memory_allocated() / 2**30,
                   stored_bytes=library.compiled_cache_bytes() if backend == "mixeddimkv" else None)
        torch.cuda.reset_peak_memory_stats()
        print(json.dumps(row), flush=True)
        rows.append(row)
        if partial is not None:  # a later case that crashes the process leaves these
            partial.write_text(json.dumps(rows, indent=1))
        del fn
    base = rows[0].get("ms_per_step_median")
    for row in rows:
        if base and row.get("ms_per_step_median"):
            row["speedup_vs_mixeddimkv_budget_1"] = base / row["ms_per_step_median"]
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=("check", "timing", "all"), default="all")
    parser.add_argument("--quick-check", action="store_true", help="check mixeddimkv at 0.0625 only")
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--context", type=int, default=32768)
    parser.add_argument("--steps", type=int, default=23)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/compile_graphs_h200.json"))
    args = parser.parse_args()
    ensure_registered()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    result = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__}
    if args.part in ("check", "all"):
        result["check"] = check(args.quick_check)
    if args.part in ("timing", "all"):
        result["timing"] = timing(args.layers, args.batch, args.context, args.steps,
                                  args.out.with_suffix(".partial.json"))
    args.out.write_text(json.dumps(result, indent=1))
    print("wrote", args.out)


if __name__ == "__main__":
    main()
