"""Short prompts (chat turns): what the budget may and may not take.

The semantics pinned here (MixedDimKVConfig's docstring says the same):
* a prompt of at most `min_compress_tokens` valid tokens is stored uncompressed (per row);
* above it, the last `window` and the first `sink_tokens` valid tokens are never compressed: each
  (row, KV head) keeps at least what stores them whole plus one tier's bookkeeping, so a
  layer's stored bytes are at most max(its budget, window + sinks full tokens) per owner.
"""

from __future__ import annotations

import pytest
import torch

import mdkv_compile as mdkv
from mdkv_compile.cache import MixedDimLayer
from mdkv_compile.methods import RECORDS
from mdkv_compile.testing import tiny_model

# Every method that compresses; `lowrank` stores every token at one rank by definition (Palu), the
# window included, so it gets the floor's bytes but not the whole window.
COMPRESSING = [name for name in RECORDS if name != "full"]
KEEPS_WINDOW_WHOLE = [name for name in COMPRESSING if name != "lowrank"]


def config_for(method: str, head_scores, **kw) -> mdkv.MixedDimKVConfig:
    if RECORDS[method].needs_head_scores:
        kw["head_scores"] = str(head_scores(2, 4))
    return mdkv.MixedDimKVConfig(method=method, **kw)


def prefill(model, cfg: mdkv.MixedDimKVConfig, ids: torch.Tensor, mask: torch.Tensor | None = None):
    mdkv.patch(model, cfg)
    cache = mdkv.MixedDimCache(model.config, cfg, record_selection=True)
    with torch.no_grad():
        model(ids, attention_mask=mask, past_key_values=cache, use_cache=True)
    return cache


def layer_bound(bound, cfg: mdkv.MixedDimKVConfig, layer: MixedDimLayer, n_valid: int) -> float:
    store = layer.store
    return bound(cfg, n_valid, store.head_dim, store.owners, store.keys[0].element_size(), layer.layer_idx,
                 layer.num_layers)


@pytest.mark.parametrize("method", COMPRESSING)
def test_chat_sized_prompt_is_stored_uncompressed(method: str, head_scores_file) -> None:
    model = tiny_model("llama")
    ids = torch.randint(1, 256, (1, 42), generator=torch.Generator().manual_seed(0))
    ref = model.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=0)
    cfg = config_for(method, head_scores_file, budget=0.0625)
    assert cfg.min_compress_tokens >= 42
    cache = prefill(model, cfg, ids)
    for layer in cache.layers:
        assert bool((layer.last_selection == 16).all()), (method, layer.selection_summary())
    assert torch.equal(model.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=0), ref)


@pytest.mark.parametrize("method", KEEPS_WINDOW_WHOLE)
@pytest.mark.parametrize("n_tokens", [5, 40, 150])
def test_budget_never_takes_the_window_or_the_sinks(method: str, n_tokens: int, head_scores_file,
                                                    stored_bytes_bound) -> None:
    model = tiny_model("llama")
    ids = torch.randint(1, 256, (1, n_tokens), generator=torch.Generator().manual_seed(1))
    cfg = config_for(method, head_scores_file, budget=0.02, window=8, sink_tokens=2, min_compress_tokens=0)
    cache = prefill(model, cfg, ids)
    forced = torch.zeros(n_tokens, dtype=torch.bool)
    forced[:2] = True
    forced[-8:] = True
    for layer in cache.layers:
        chosen = layer.last_selection  # [B, H, N]
        assert bool((chosen[..., forced] == 16).all()), (method, n_tokens, layer.layer_idx)
        if not RECORDS[method].needs_head_scores:  # head scores move bytes between heads
            assert layer.store.stored_bytes() <= layer_bound(stored_bytes_bound, cfg, layer, n_tokens), method


@pytest.mark.parametrize("method", COMPRESSING)
@pytest.mark.parametrize(("n_tokens", "budget"), [(40, 0.0625), (300, 0.02), (300, 0.25), (1000, 0.0625)])
def test_stored_bytes_within_the_budget_or_the_floor(method: str, n_tokens: int, budget: float,
                                                     head_scores_file, stored_bytes_bound) -> None:
    if RECORDS[method].needs_head_scores:
        pytest.skip("head-score budgets move bytes between heads: bounded over the model in test_hf")
    model = tiny_model("llama")
    ids = torch.randint(1, 256, (1, n_tokens), generator=torch.Generator().manual_seed(2))
    cfg = config_for(method, head_scores_file, budget=budget, min_compress_tokens=0)
    cache = prefill(model, cfg, ids)
    for layer in cache.layers:
        assert layer.store.stored_bytes() <= layer_bound(stored_bytes_bound, cfg, layer, n_tokens), method


def test_short_rows_of_a_batch_are_kept_and_long_rows_compressed() -> None:
    model = tiny_model("llama")
    gen = torch.Generator().manual_seed(3)
    lengths = (50, 400)
    width = max(lengths)
    ids = torch.zeros(2, width, dtype=torch.long)
    mask = torch.zeros(2, width, dtype=torch.long)
    for i, n in enumerate(lengths):
        ids[i, width - n :] = torch.randint(1, 256, (n,), generator=gen)
        mask[i, width - n :] = 1
    cfg = mdkv.MixedDimKVConfig(budget=0.1, method="snapkv")
    cache = prefill(model, cfg, ids, mask)
    chosen = cache.layers[0].last_selection
    assert bool((chosen[0, :, -50:] == 16).all())  # the short row: every valid token, whole
    assert bool((chosen[0, :, :-50] == 0).all())  # and no padding
    kept = int((chosen[1] > 0).sum(-1).max())
    assert kept <= 0.1 * 400 + 1  # the long row: compressed to its budget


def test_min_compress_tokens_zero_compresses_every_prompt() -> None:
    model = tiny_model("llama")
    ids = torch.randint(1, 256, (1, 42), generator=torch.Generator().manual_seed(4))
    cache = prefill(model, mdkv.MixedDimKVConfig(budget=0.1, method="snapkv", window=4, min_compress_tokens=0), ids)
    kept = int((cache.layers[0].last_selection > 0).sum(-1).max())
    assert kept == 4  # the window (the budget, 4.2 tokens less bookkeeping, affords no more)


@pytest.mark.slow
def test_smollm2_answers_a_chat_question_under_patch_at_budget_0_1() -> None:
    import copy

    from mdkv_compile.assets import load_model

    model, tokenizer = load_model("smollm2")
    model = copy.deepcopy(model)  # load_model's object is shared: patch a copy
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                        return_dict=True)["input_ids"]
    answers = {}
    # The 37-token prompt is kept whole by default. Compressed anyway (min_compress_tokens=0), the
    # floor keeps the last 32 tokens: with the first token as a sink the answer survives; without
    # any sink (the default of every method but streamingllm) SmolLM2 answered "... is 2 Hugging
    # Face", which is why chat-sized prompts are not compressed at all.
    for name, cfg in {
        "default": mdkv.MixedDimKVConfig(budget=0.1),
        "window floor and one sink": mdkv.MixedDimKVConfig(budget=0.1, min_compress_tokens=0, sink_tokens=1),
    }.items():
        mdkv.patch(model, cfg)
        with torch.inference_mode():
            out = model.generate(ids, max_new_tokens=12, do_sample=False)
        answers[name] = tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
    assert all("Paris" in a for a in answers.values()), answers


@pytest.mark.parametrize("method", COMPRESSING)
def test_a_prompt_of_forced_tokens_only_is_stored_whole_by_every_method(method: str, head_scores_file) -> None:
    """Every token is in the window or the sinks: none may be compressed, lowrank's included."""
    model = tiny_model("llama")
    ids = torch.randint(1, 256, (1, 10), generator=torch.Generator().manual_seed(5))
    cfg = config_for(method, head_scores_file, budget=0.1, window=8, sink_tokens=2, min_compress_tokens=0)
    cache = prefill(model, cfg, ids)
    for layer in cache.layers:
        assert bool((layer.last_selection == 16).all()), (method, layer.selection_summary())
