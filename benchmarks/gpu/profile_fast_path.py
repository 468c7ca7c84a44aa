"""Where issue 14's `reduce-overhead` + static-cache path spends its host time per decode step.

    python benchmarks/gpu/profile_fast_path.py --out profile_fast_path.json   # GPU, about 3 minutes
    python benchmarks/gpu/profile_fast_path.py --quick --out /tmp/p.json      # tiny shapes (checks the script)

`check_fast_path.py` measured `model.compile(backend="mixeddimkv", options={"mode": "reduce-overhead"})`
+ `generate(cache_implementation="static")` at 4.63 ms per step against 2.78 ms for `GraphedDecoder`
over the same replayed step (H100, docs/notes/gpu_notes.md section 8): about 1.9 ms of Python per
step. This script splits that time, on the same model and shape (8-layer Llama-3-8B-shaped, random
bf16 weights, batch 4 x 16K, 32 new tokens):

* `generate`: ms per step as check_fast_path measures it (a synchronised stamp per new token), and
  the same inside `torch.inference_mode()`;
* `forward loop`: the same compiled model called in a plain loop over transformers' StaticCache
  (what generate() calls per step, without generate's own Python);
* `wrapper`: time inside the backend's `SiteGraphs.__call__` per call, and inside its replay;
* `cprofile`: one generate() call under cProfile, the top functions by own and by cumulative time.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from check_fast_path import LLAMA3_8B, TINY, Runner, _prompt, _sync  # noqa: E402


def _median_ms(xs: list[float]) -> float | None:
    return 1e3 * statistics.median(xs) if xs else None  # None: nothing ran there (no SiteGraphs on CPU)


def _timed(fn: Callable[..., Any], seconds: list[float]) -> Callable[..., Any]:
    """`fn`, appending the seconds of each call to `seconds`."""

    def timed(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            seconds.append(time.perf_counter() - start)

    return timed


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--quick", action="store_true")
    args = p.parse_args()

    from transformers import StaticCache

    from mdkv_compile.backends import site_graphs
    from mdkv_compile.backends.torch_compile import ensure_registered
    from mdkv_compile.testing import random_llama

    ensure_registered()
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    base = {**TINY, "num_hidden_layers": 2} if args.quick else {**LLAMA3_8B, "num_hidden_layers": 8}
    batch, length, new = (2, 48, 8) if args.quick else (4, 16384, 32)
    config = {**base, "bos_token_id": None, "eos_token_id": None, "pad_token_id": 0}
    model = random_llama(attn_implementation="sdpa", dtype=torch.bfloat16 if cuda else torch.float32,
                         device=device, **config)
    runner = Runner("ro-static" if cuda else "mdkv-static", model, 0.0625, new)
    ids = _prompt(batch, length, config["vocab_size"], device, 0)
    result: dict = dict(device=torch.cuda.get_device_name() if cuda else "cpu", torch=torch.__version__,
                        layers=config["num_hidden_layers"], batch=batch, prompt=length, new_tokens=new)

    # time inside the wrapper and inside its replay
    wrapper_s: list[float] = []
    replay_s: list[float] = []
    site_graphs.SiteGraphs.__call__ = _timed(site_graphs.SiteGraphs.__call__, wrapper_s)
    site_graphs.SiteGraphs._replay = _timed(site_graphs.SiteGraphs._replay, replay_s)

    for _ in range(2):  # compile, then transformers' reused static cache recompiles once
        runner(ids)
    wrapper_s.clear()
    replay_s.clear()
    generated, _, _, steps = runner(ids)  # as check_fast_path.py times it (generate() runs under no_grad)
    result["generate_ms_per_step"] = _median_ms(steps[2:])
    result["wrapper_ms_per_call"] = _median_ms(wrapper_s[-len(steps):])
    result["replay_ms_per_call"] = _median_ms(replay_s[-len(steps):])
    result["wrapper_calls_per_generate"] = len(wrapper_s)
    with torch.inference_mode():  # the same call inside inference mode (Dynamo recompiles for it)
        runner(ids)
        _, _, _, steps = runner(ids)
    result["generate_inference_mode_ms_per_step"] = _median_ms(steps[2:])

    with torch.no_grad():
        # the compiled forward in a plain loop over a StaticCache: the step without generate()'s Python
        cache = StaticCache(config=model.config, max_cache_len=length + new)
        out = model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
        token = out.logits[:, -1].argmax(-1, keepdim=True)
        loop: list[float] = []
        looped = [token]
        for i in range(new - 1):
            _sync()
            t0 = time.perf_counter()
            pos = torch.full((batch, 1), length + i, device=device)
            out = model(input_ids=token, position_ids=pos, cache_position=pos[0], past_key_values=cache,
                        use_cache=True, logits_to_keep=1)
            token = out.logits[:, -1].argmax(-1, keepdim=True)
            _sync()
            loop.append(time.perf_counter() - t0)
            looped.append(token)
        result["forward_loop_ms_per_step"] = _median_ms(loop[2:])
        # the same compiled model, prompt and greedy rule (bf16 near-ties aside: random weights)
        result["loop_tokens_equal_generate"] = bool(torch.equal(torch.cat(looped, 1).cpu(), generated))
        del cache, out

    prof = cProfile.Profile()
    prof.enable()
    runner(ids)
    prof.disable()
    texts = {}
    for key in ("tottime", "cumulative"):
        buf = io.StringIO()
        pstats.Stats(prof, stream=buf).sort_stats(key).print_stats(40)
        texts[key] = buf.getvalue()
    result["cprofile"] = texts
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(json.dumps({k: v for k, v in result.items() if k != "cprofile"}, indent=1))
    print(texts["tottime"][:6000])


if __name__ == "__main__":
    main()
