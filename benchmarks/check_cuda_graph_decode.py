"""GPU check of the CUDA-graph decode path (`GraphedDecoder` over a fixed-region MixedDimCache).

Prediction: a replayed graph runs the very kernels of an eager step over the same fixed region,
so its greedy tokens and logits equal the eager fixed-region decode exactly; against the growing
region (the kernel splits the work by the true count rather than the capacity) they agree to bf16
rounding. transformers' StaticCache under the same decoder matches its own eager decode.
Small random bf16 Llama (Llama-3-8B head shape, 2 layers). Prints one JSON line per case.
"""

from __future__ import annotations

import json

import torch
from transformers import LlamaForCausalLM, StaticCache

import mdkv_compile as mdkv
from mdkv_compile.hf.cuda_graphs import GraphedDecoder
from mdkv_compile.testing import decode_n_tokens, prefill, random_llama

STEPS = 24


def model_2layers() -> LlamaForCausalLM:
    return random_llama(
        attn_implementation="sdpa", vocab_size=512, hidden_size=1024, intermediate_size=2048, num_hidden_layers=2,
        num_attention_heads=32, num_key_value_heads=8, head_dim=128, max_position_embeddings=8192,
    ).to("cuda", torch.bfloat16)


def eager(model, cache, ids):
    with torch.inference_mode():
        first = prefill(model, ids, cache, logits_to_keep=1)
        _, steps = decode_n_tokens(model, cache, first, STEPS)
    return torch.stack([first, *steps]).float()


def graphed(model, cache, ids):
    with torch.inference_mode():
        first = prefill(model, ids, cache, logits_to_keep=1)
    token, logits = first.argmax(-1, keepdim=True), [first.float()]
    decoder = GraphedDecoder(model, cache)
    for _ in range(STEPS):
        step = decoder.step(token)
        logits.append(step.float().clone())
        token = step.argmax(-1, keepdim=True)
    return torch.stack(logits)


def compare(name, a, b) -> None:
    same = bool(torch.equal(a.argmax(-1), b.argmax(-1)))
    print(json.dumps(dict(case=name, tokens_equal=same, max_logit_diff=float((a - b).abs().max()))), flush=True)


def main() -> None:
    model = model_2layers()
    ids = torch.randint(0, 512, (4, 3000), device="cuda", generator=torch.Generator("cuda").manual_seed(1))
    for method, budget in (("full", 1.0), ("snapkv", 0.0625), ("mixeddimkv", 0.0625), ("lowrank", 0.25)):
        cfg = mdkv.MixedDimKVConfig(budget=budget, method=method)
        mdkv.patch(model, cfg)
        fixed_eager = eager(model, mdkv.MixedDimCache(model.config, cfg, max_new_tokens=STEPS + 4), ids)
        fixed_graph = graphed(model, mdkv.MixedDimCache(model.config, cfg, max_new_tokens=STEPS + 4), ids)
        growing = eager(model, mdkv.MixedDimCache(model.config, cfg), ids)
        compare(f"{method}@{budget} graph vs eager (fixed region)", fixed_graph, fixed_eager)
        compare(f"{method}@{budget} graph vs eager (growing region)", fixed_graph, growing)
    mdkv.unpatch(model)
    n = ids.shape[1] + STEPS + 4
    compare("transformers StaticCache graph vs eager",
            graphed(model, StaticCache(config=model.config, max_cache_len=n), ids),
            eager(model, StaticCache(config=model.config, max_cache_len=n), ids))


if __name__ == "__main__":
    main()
