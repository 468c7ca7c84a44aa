"""`mdkv demo`: the real model on a long prompt, full cache against compressed caches.

SmolLM2-135M-Instruct reads a haystack of Paul Graham essays with a needle in the middle and is
asked for it. For each method it prints the answer, the KV bytes actually allocated (measured
from the cache's tensors) against the full cache, and the wall time of prefill + decode.
"""

from __future__ import annotations

import argparse
import time

import torch

from mdkv_compile.assets import check_model_source, haystack_text, load_model
from mdkv_compile.cache import MixedDimCache
from mdkv_compile.config import METHODS, MixedDimKVConfig
from mdkv_compile.hf.calibrate import calibrated_basis_file
from mdkv_compile.hf.patch import patch, unpatch
from mdkv_compile.methods import RECORDS
from mdkv_compile.usage import as_usage_error, check, command, csv, device, fraction, positive_int, unit_interval

NEEDLE = "The special magic number is {number}."
QUESTION = "What is the special magic number mentioned in the text above? Answer with the number only."


def build_prompt(tokenizer, haystack: str, n_tokens: int, depth: float, number: str) -> torch.Tensor:
    """Chat prompt: ~n_tokens of haystack with the needle at `depth`, then the question."""
    ids = tokenizer(haystack, add_special_tokens=False).input_ids[:n_tokens]
    cut = int(len(ids) * depth)
    text = f"{tokenizer.decode(ids[:cut])} {NEEDLE.format(number=number)} {tokenizer.decode(ids[cut:])}"
    messages = [{"role": "user", "content": f"{text}\n\n{QUESTION}"}]
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)[
        "input_ids"
    ]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tokens", type=positive_int, default=2000, help="haystack length in tokens")
    parser.add_argument("--depth", type=unit_interval, default=0.5, help="needle position in the haystack (0..1)")
    parser.add_argument("--budget", type=fraction, default=0.1, help="fraction of the full KV cache to keep")
    parser.add_argument(
        "--methods", type=csv(str), default="full,snapkv,mixeddimkv,mixeddimkv+calibrated",
        help="comma-separated methods; NAME+calibrated uses bases fitted on the essay held out of the haystack",
    )
    parser.add_argument("--model", default="smollm2", help="'smollm2' (the bundled GGUF) or an HF model path")
    parser.add_argument("--device", type=device, default="cuda" if torch.cuda.is_available() else "cpu")


def demo_configs(methods: list[str], budget: float) -> list[tuple[str, MixedDimKVConfig]]:
    """(NAME[+calibrated], config) per entry of --methods, checked before any model is loaded; the
    calibrated ones get their basis path once it is made."""
    out = []
    for name in methods:
        method, _, basis = name.partition("+")
        check(basis in ("", "calibrated"), f"--methods {name}: the only suffix is +calibrated")
        check(method in METHODS, f"--methods {name}: unknown method {method!r}; known: {', '.join(METHODS)}")
        check(not RECORDS[method].needs_head_scores,
              f"--methods {name}: needs head scores (`mdkv profile-heads`), which the demo does not take; "
              "use mdkv eval --head-scores")
        try:
            cfg = MixedDimKVConfig(budget=1.0 if method == "full" else budget, method=method)
        except ValueError as e:
            raise as_usage_error(e) from None
        out.append((name, cfg))
    return out


@command("mdkv demo")
def run(args: argparse.Namespace) -> int:
    number = "7341829"
    configs = demo_configs(args.methods, args.budget)
    try:
        check_model_source(args.model)
    except FileNotFoundError as e:
        raise as_usage_error(e) from None
    model, tokenizer = load_model(args.model, device=args.device)
    haystack = haystack_text()
    available = len(tokenizer(haystack, add_special_tokens=False).input_ids)
    check(available >= args.tokens, f"--tokens {args.tokens}: the haystack has {available} tokens")
    input_ids = build_prompt(tokenizer, haystack, args.tokens, args.depth, number).to(args.device)
    print(f"model {args.model}, prompt {input_ids.shape[1]} tokens, needle {number!r} at depth {args.depth}")
    print(f"{'method':<23} {'budget':>7} {'stored KV':>12} {'full KV':>12} {'ratio':>7} {'time s':>7}  answer")
    basis_path = None
    for name, cfg in configs:
        if name.endswith("+calibrated"):
            if basis_path is None:
                start = time.perf_counter()
                basis_path = str(calibrated_basis_file(model, tokenizer, args.model))
                print(f"calibrated bases (fitted on the essay held out of the haystack; cached): "
                      f"{time.perf_counter() - start:.1f} s")
            cfg = cfg.replace(basis="calibrated", basis_path=basis_path)
        patch(model, cfg)
        cache = MixedDimCache(model.config, cfg)
        start = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(input_ids, max_new_tokens=24, do_sample=False, past_key_values=cache)
        elapsed = time.perf_counter() - start
        answer = tokenizer.decode(out[0, input_ids.shape[1] :], skip_special_tokens=True).strip()
        found = "FOUND" if number in answer else "missed"
        stored, full = cache.stored_bytes(), cache.full_bytes()
        print(
            f"{name:<23} {cfg.budget:>7.4f} {stored / 2**20:>9.2f} MiB {full / 2**20:>9.2f} MiB "
            f"{stored / full:>7.4f} {elapsed:>7.1f}  {found}: {answer!r}"
        )
    unpatch(model)
    return 0
