"""The fixed decode region (`MixedDimCache(..., max_new_tokens=n)`): same tokens as the growing one,
clear errors, and the CUDA-graph decoder's input checks (the graph itself needs a GPU:
benchmarks/check_cuda_graph_decode.py runs it on the H200)."""

from __future__ import annotations

import pytest
import torch

import mdkv_compile as mdkv
from mdkv_compile.hf.cuda_graphs import GraphedDecoder
from mdkv_compile.testing import decode_n_tokens, prefill, tiny_model


def decode(model, cache, ids: torch.Tensor, steps: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Prefill then greedy single-token forward steps (in inference mode); returns the tokens (the
    last one picked from the last step's logits) and the logits of the prefill and of each step."""
    with torch.inference_mode():
        first = prefill(model, ids, cache)
        tokens, steps_logits = decode_n_tokens(model, cache, first, steps)
    logits = [first, *steps_logits]
    return torch.cat([*tokens, logits[-1].argmax(-1, keepdim=True)], 1), logits


@pytest.mark.parametrize("method,budget", [("mixeddimkv", 0.25), ("snapkv", 0.25), ("full", 1.0)])
def test_fixed_region_decodes_like_growing_region(method: str, budget: float) -> None:
    model = tiny_model("llama")
    cfg = mdkv.MixedDimKVConfig(budget=budget, method=method, window=4, min_compress_tokens=0)
    mdkv.patch(model, cfg)
    ids = torch.randint(1, 256, (2, 120), generator=torch.Generator().manual_seed(3))
    ref_tokens, ref_logits = decode(model, mdkv.MixedDimCache(model.config, cfg), ids, 12)
    cache = mdkv.MixedDimCache(model.config, cfg, max_new_tokens=16)
    tokens, logits = decode(model, cache, ids, 12)
    assert torch.equal(tokens, ref_tokens)
    assert max(float((a - b).abs().max()) for a, b in zip(logits, ref_logits, strict=True)) < 1e-5
    layer = cache.layers[0]
    assert cache.get_seq_length() == 120 + 12 and int(layer.n_decoded) == 12
    assert layer.keys.shape[2] == 16  # the region keeps its shape (and address) while decoding
    # rewinding the count makes the next step overwrite the rewound slots (what the graph capture relies on)
    cache.set_decoded(120 + 11)
    assert cache.get_seq_length() == 131 and int(layer.n_decoded) == 11


def test_fixed_region_overflow_and_bad_sizes_raise() -> None:
    model = tiny_model("llama")
    cfg = mdkv.MixedDimKVConfig(budget=0.5, method="snapkv", window=4, min_compress_tokens=0)
    mdkv.patch(model, cfg)
    with pytest.raises(ValueError, match="max_new_tokens"):
        mdkv.MixedDimCache(model.config, cfg, max_new_tokens=0)
    cache = mdkv.MixedDimCache(model.config, cfg, max_new_tokens=2)
    ids = torch.randint(1, 256, (1, 40), generator=torch.Generator().manual_seed(4))
    with pytest.raises(RuntimeError, match="exceed max_new_tokens=2"):
        decode(model, cache, ids, 3)
    with pytest.raises(ValueError, match="outside"):
        cache.set_decoded(40 + 5)


def test_graphed_decoder_rejects_caches_it_cannot_replay() -> None:
    model = tiny_model("llama")
    cfg = mdkv.MixedDimKVConfig(budget=0.5, method="snapkv", window=4, min_compress_tokens=0)
    mdkv.patch(model, cfg)
    from transformers import DynamicCache

    with pytest.raises(TypeError, match="MixedDimCache or a StaticCache"):
        GraphedDecoder(model, DynamicCache(config=model.config))
    with pytest.raises(ValueError, match="max_new_tokens"):
        GraphedDecoder(model, mdkv.MixedDimCache(model.config, cfg))
    with pytest.raises(ValueError, match="prefill"):
        GraphedDecoder(model, mdkv.MixedDimCache(model.config, cfg, max_new_tokens=4))


@pytest.mark.compile
def test_compiled_regions_decode_like_eager() -> None:
    """compile_regions (Inductor on MLP and RMSNorm modules) keeps the compressed decode's tokens."""
    from mdkv_compile.hf.cuda_graphs import compile_regions

    model = tiny_model("llama")
    cfg = mdkv.MixedDimKVConfig(budget=0.25, method="mixeddimkv", window=4, min_compress_tokens=0)
    mdkv.patch(model, cfg)
    ids = torch.randint(1, 256, (1, 80), generator=torch.Generator().manual_seed(5))
    ref_tokens, ref_logits = decode(model, mdkv.MixedDimCache(model.config, cfg, max_new_tokens=8), ids, 6)
    assert compile_regions(model) == 2 * 3 + 1  # per layer: mlp + 2 norms; the final norm
    tokens, logits = decode(model, mdkv.MixedDimCache(model.config, cfg, max_new_tokens=8), ids, 6)
    assert torch.equal(tokens, ref_tokens)
    assert max(float((a - b).abs().max()) for a, b in zip(logits, ref_logits, strict=True)) < 1e-4


def test_graphed_decoder_refuses_a_cache_advanced_elsewhere() -> None:
    """The decoder counts positions on the host; a step run outside it is caught before any replay
    (checked before capture, so it runs without a GPU)."""
    model = tiny_model("llama")
    cfg = mdkv.MixedDimKVConfig(budget=0.5, method="snapkv", window=4, min_compress_tokens=0)
    mdkv.patch(model, cfg)
    cache = mdkv.MixedDimCache(model.config, cfg, max_new_tokens=4)
    ids = torch.randint(1, 256, (1, 30), generator=torch.Generator().manual_seed(6))
    with torch.inference_mode():
        model(ids, past_key_values=cache, use_cache=True)
        decoder = GraphedDecoder(model, cache)
        model(ids[:, -1:], past_key_values=cache, use_cache=True)  # a step the decoder did not see
    with pytest.raises(RuntimeError, match="do not mix graphed steps"):
        decoder.step(ids[:, -1:])
