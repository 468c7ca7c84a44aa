"""The `mixeddimkv` backend on every decoder architecture of the compile issue's acceptance list
(tiny random configs, unpatched models, transformers' DynamicCache): 32 greedy tokens equal the
eager MixedDimKV reference (`mdkv.patch`), and the backend's compressed state holds exactly the
reference cache's bytes. Llama and the hand-written decoders are in test_compile_backend.py.

One model per architecture is compiled (prefill graph + decode graph, ~20-40 s each on 2 cores)."""

from __future__ import annotations

import pytest
import torch

import mdkv_compile as mdkv
from mdkv_compile.cache import MixedDimCache
from mdkv_compile.passes import sites
from mdkv_compile.testing import build_tiny_model, greedy_decode

# min_compress_tokens 0: the short test prompts are compressed (they would be kept whole otherwise)
OPTS = {"budget": 0.25, "window": 4, "min_compress_tokens": 0}
NEW_TOKENS = 32
# 24 + 32 positions stay inside the tiny configs' 64 learned positions (GPT-2, OPT)
IDS = torch.randint(1, 128, (1, 24), generator=torch.Generator().manual_seed(3))


def greedy(model, cache) -> torch.Tensor:
    return greedy_decode(model, cache, IDS, NEW_TOKENS)[0]


@pytest.mark.compile
@pytest.mark.parametrize("arch", ["qwen2", "mistral", "gpt2", "opt", "gpt_neox"])
def test_compiled_tokens_and_bytes_equal_eager_reference(arch: str) -> None:
    from transformers import DynamicCache

    cfg = mdkv.MixedDimKVConfig(**OPTS)
    model = build_tiny_model(arch).eval()
    mdkv.patch(model, cfg)
    reference = MixedDimCache(model.config, cfg)
    ref_tokens = greedy(model, reference)
    mdkv.unpatch(model)

    torch._dynamo.reset()
    sites.reset_sites()
    compiled = torch.compile(model, backend="mixeddimkv", options=OPTS)
    tokens = greedy(compiled, DynamicCache(config=model.config))
    assert torch.equal(tokens, ref_tokens), arch
    n_layers = model.config.num_hidden_layers
    assert len(sites.site_layers(OPTS, model)) == n_layers
    assert mdkv.compiled_cache_bytes(OPTS, model) == reference.stored_bytes()
    assert reference.stored_bytes() < reference.full_bytes()  # the 32 decoded tokens are kept whole


def test_patch_trusts_causal_attention_over_a_stale_is_decoder_flag() -> None:
    """GPTNeoXConfig says is_decoder=False although the model is causal (its attention says so);
    a BERT LM head without is_decoder is bidirectional and must still be refused."""
    import transformers as tf

    neox = build_tiny_model("gpt_neox")
    assert neox.config.is_decoder is False
    mdkv.patch(neox, mdkv.MixedDimKVConfig(**OPTS))
    bert = tf.BertLMHeadModel(tf.BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                            intermediate_size=64, vocab_size=50))
    with pytest.raises(NotImplementedError, match="only decoder-only causal LMs"):
        mdkv.patch(bert)


@pytest.mark.compile
def test_inductor_cache_hit_keeps_the_rewrite(tmp_path, monkeypatch) -> None:
    """The rewrite runs on the Dynamo graph before Inductor, so the FX-graph cache keys on the
    rewritten graph: a second compile that hits the cache still compresses (same tokens and bytes
    as the eager reference), and another config cannot be served from the first one's entry."""
    from torch._dynamo.utils import counters
    from transformers import DynamicCache

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    cfg = mdkv.MixedDimKVConfig(**OPTS)
    model = build_tiny_model("llama").eval()
    mdkv.patch(model, cfg)
    reference = MixedDimCache(model.config, cfg)
    ref_tokens = greedy(model, reference)
    mdkv.unpatch(model)
    plain = greedy(model, DynamicCache(config=model.config))
    assert not torch.equal(plain, ref_tokens)  # compression changes this model's tokens

    def compiled_tokens(opts: dict) -> torch.Tensor:
        torch._dynamo.reset()
        sites.reset_sites()
        return greedy(torch.compile(model, backend="mixeddimkv", options=opts), DynamicCache(config=model.config))

    with torch._inductor.config.patch(fx_graph_cache=True, fx_graph_remote_cache=False):
        counters.clear()
        assert torch.equal(compiled_tokens(OPTS), ref_tokens)
        assert counters["inductor"]["fxgraph_cache_miss"] > 0
        counters.clear()
        assert torch.equal(compiled_tokens(OPTS), ref_tokens)
        assert counters["inductor"]["fxgraph_cache_hit"] > 0
        assert mdkv.compiled_cache_bytes(OPTS, model) == reference.stored_bytes()
        counters.clear()
        assert torch.equal(compiled_tokens({**OPTS, "budget": 1.0}), plain)
        assert counters["inductor"]["fxgraph_cache_miss"] > 0
