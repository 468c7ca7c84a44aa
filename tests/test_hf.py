"""Hugging Face integration: patch / MixedDimCache on every supported architecture."""

from __future__ import annotations

import pytest
import torch

import mdkv_compile as mdkv
from mdkv_compile.cache import MixedDimLayer
from mdkv_compile.methods import RECORDS
from mdkv_compile.testing import TINY_ARCHS, tiny_model

# Every method that compresses (all but "full"), and those of them that need no head-score file:
# from the registry, so a new method is in these tests by itself.
COMPRESSING = [name for name in RECORDS if name != "full"]
COMPRESSING_WITHOUT_HEAD_SCORES = [name for name in COMPRESSING if not RECORDS[name].needs_head_scores]


def config_for(method: str, budget: float, head_scores, model, **kw) -> mdkv.MixedDimKVConfig:
    extra = {}
    if RECORDS[method].needs_head_scores:
        n_layers = model.config.num_hidden_layers
        extra["head_scores"] = str(head_scores(n_layers, model.config.num_attention_heads))
    # min_compress_tokens 0: the short test prompts are compressed (they would be kept whole otherwise)
    return mdkv.MixedDimKVConfig(budget=budget, method=method, window=4, min_compress_tokens=0, **extra, **kw)


def greedy(model, ids, **kw):
    return model.generate(
        ids, max_new_tokens=8, do_sample=False, output_logits=True, return_dict_in_generate=True,
        pad_token_id=0, **kw,
    )


@pytest.mark.parametrize("arch", list(TINY_ARCHS))
def test_budget_one_equals_unpatched_for_every_method(arch: str, head_scores_file) -> None:
    model = tiny_model(arch)
    ids = torch.randint(1, 256, (1, 40), generator=torch.Generator().manual_seed(1))
    ref = greedy(model, ids)
    for method in mdkv.METHODS:
        mdkv.patch(model, config_for(method, 1.0, head_scores_file, model))
        out = greedy(model, ids)
        assert torch.equal(out.sequences, ref.sequences), (arch, method)
        diff = max(float((a - b).abs().max()) for a, b in zip(out.logits, ref.logits, strict=True))
        assert diff < 1e-4, (arch, method, diff)
    mdkv.unpatch(model)
    assert model.config._attn_implementation != "mixeddimkv"
    assert torch.equal(greedy(model, ids).sequences, ref.sequences)


@pytest.mark.parametrize("arch", ["llama", "gemma2"])
@pytest.mark.parametrize("method", COMPRESSING)
def test_compressed_generate_runs_and_saves_memory(arch: str, method: str, head_scores_file) -> None:
    model = tiny_model(arch)
    ids = torch.randint(1, 256, (1, 200), generator=torch.Generator().manual_seed(2))
    cfg = config_for(method, 0.25, head_scores_file, model)
    mdkv.patch(model, cfg)
    cache = mdkv.MixedDimCache(model.config, cfg)
    model(ids, past_key_values=cache, use_cache=True)
    assert cache.stored_bytes() < 0.5 * cache.full_bytes()
    out = model.generate(ids, max_new_tokens=6, do_sample=True, top_k=5, pad_token_id=0)  # sampling works too
    assert out.shape == (1, 206)


@pytest.mark.parametrize("method", COMPRESSING_WITHOUT_HEAD_SCORES)
def test_stored_bytes_within_budget_on_4k_prompt(method: str, stored_bytes_bound) -> None:
    model = tiny_model("llama")
    ids = torch.randint(1, 256, (1, 4096), generator=torch.Generator().manual_seed(3))
    cfg = mdkv.MixedDimKVConfig(budget=0.0625, method=method)
    mdkv.patch(model, cfg)
    cache = mdkv.MixedDimCache(model.config, cfg)
    with torch.no_grad():
        model(ids, past_key_values=cache, use_cache=True)
    budget_bytes = 0.0625 * cache.full_bytes()
    # Per layer: its budget, or the window whole where PyramidKV's schedule gives a layer less.
    for i, layer in enumerate(cache.layers):
        assert layer.stored_bytes() <= stored_bytes_bound(cfg, 4096, 16, owners=2, itemsize=4, layer_idx=i,
                                                          num_layers=len(cache.layers)), (method, i)
    if RECORDS[method].budget_schedule == "uniform":
        assert cache.stored_bytes() <= budget_bytes
    if method != "lowrank":  # one rank for all tokens cannot fill the budget exactly
        assert cache.stored_bytes() >= 0.8 * budget_bytes
    if method == "mixeddimkv":
        layer = cache.layers[0]
        assert isinstance(layer, MixedDimLayer)
        used = {r for r, n in layer.selection_summary().items() if n}
        assert used - {0, 16}, "no reduced tier used"
        assert layer.last_selection is None  # per-entry record only on request (memory beside the store)


def test_budget_tokens_and_bytes_match_fraction() -> None:
    model = tiny_model("llama")
    ids = torch.randint(1, 256, (1, 512), generator=torch.Generator().manual_seed(4))
    sizes = {}
    for name, cfg in {
        "fraction": mdkv.MixedDimKVConfig(budget=0.125, method="snapkv"),
        "tokens": mdkv.MixedDimKVConfig(budget_tokens=64, method="snapkv"),
        "bytes": mdkv.MixedDimKVConfig(budget_bytes=int(0.125 * 2 * 2 * 2 * 512 * 16 * 4), method="snapkv"),
    }.items():
        mdkv.patch(model, cfg)
        cache = mdkv.MixedDimCache(model.config, cfg)
        model(ids, past_key_values=cache, use_cache=True)
        sizes[name] = cache.stored_bytes()
    assert sizes["fraction"] == sizes["tokens"] == sizes["bytes"]


@pytest.mark.parametrize("method", COMPRESSING)
def test_left_padded_batch_matches_each_row_alone(method: str, head_scores_file) -> None:
    model = tiny_model("llama")
    gen = torch.Generator().manual_seed(5)
    rows = [torch.randint(1, 256, (n,), generator=gen) for n in (120, 90)]
    cfg = config_for(method, 0.3, head_scores_file, model)
    mdkv.patch(model, cfg)
    alone = [model.generate(r[None], max_new_tokens=8, do_sample=False, pad_token_id=0)[0, -8:] for r in rows]
    width = max(len(r) for r in rows)
    ids = torch.zeros(2, width, dtype=torch.long)
    mask = torch.zeros(2, width, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = r
        mask[i, width - len(r):] = 1
    batch = model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0)
    for i in range(2):
        assert torch.equal(batch[i, -8:], alone[i]), (i, batch[i, -8:], alone[i])


def test_patch_twice_replaces_config() -> None:
    model = tiny_model("llama")
    ids = torch.randint(1, 256, (1, 256), generator=torch.Generator().manual_seed(6))
    mdkv.patch(model, mdkv.MixedDimKVConfig(budget=0.5, method="snapkv", window=8))
    # window 8: the budget (25.6 tokens) is above the window, so it alone bounds the bytes
    mdkv.patch(model, mdkv.MixedDimKVConfig(budget=0.1, method="snapkv", window=8))
    out = model(ids, use_cache=True)
    cache = out.past_key_values
    assert isinstance(cache, mdkv.MixedDimCache)
    assert cache.cfg.budget == 0.1
    assert cache.stored_bytes() <= 0.1 * cache.full_bytes()


def test_query_agnostic_chunk_after_compression_is_causal() -> None:
    """A question prefilled as a chunk after compression: at budget 1.0 it must equal one
    uncompressed forward over context + question."""
    model = tiny_model("llama")
    gen = torch.Generator().manual_seed(7)
    context, question = torch.randint(1, 256, (1, 64), generator=gen), torch.randint(1, 256, (1, 12), generator=gen)
    with torch.no_grad():
        ref = model(torch.cat([context, question], 1)).logits[:, -12:]
    cfg = mdkv.MixedDimKVConfig(budget=1.0, method="mixeddimkv")
    mdkv.patch(model, cfg)
    cache = mdkv.MixedDimCache(model.config, cfg)
    model(context, past_key_values=cache, use_cache=True)
    with torch.no_grad():
        out = model(question, past_key_values=cache, use_cache=True).logits
    assert float((out - ref).abs().max()) < 1e-4


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"budget": 0.0}, "budget"),
        ({"budget": 1.5}, "budget"),
        ({"budget": 0.1, "budget_tokens": 10}, "budget_tokens"),
        ({"budget_tokens": 0}, "budget_tokens"),
        ({"budget_bytes": -5}, "budget_bytes"),
        ({"method": "h2o"}, "method"),
        ({"dims": (8, 16)}, "dims"),
        ({"dims": (0, 8, 8)}, "dims"),
        ({"window": 0}, "window"),
        ({"pool_kernel": 4}, "pool_kernel"),
        ({"sink_tokens": -1}, "sink_tokens"),
        ({"basis": "svd"}, "basis"),
        ({"basis": "calibrated"}, "basis_path"),
        ({"pool": "model"}, "pool"),
        ({"method": "headkv"}, "head_scores"),
        ({"key_weight": 2.0}, "key_weight"),
    ],
)
def test_bad_config_names_field_and_value(kwargs: dict, field: str) -> None:
    with pytest.raises(ValueError, match=rf"MixedDimKVConfig\.{field}="):
        mdkv.MixedDimKVConfig(**kwargs)


def test_dims_that_do_not_fit_fail_at_patch() -> None:
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="head dimension is 16"):
        mdkv.patch(model, mdkv.MixedDimKVConfig(dims=(0, 32, 64)))
    assert model.config._attn_implementation != "mixeddimkv"


def test_unsupported_architecture_names_it() -> None:
    from transformers import BloomConfig, BloomForCausalLM

    model = BloomForCausalLM(BloomConfig(vocab_size=64, hidden_size=32, n_layer=1, n_head=2))
    with pytest.raises(NotImplementedError, match="BloomForCausalLM"):
        mdkv.patch(model, mdkv.MixedDimKVConfig())


def test_missing_head_score_file_fails_at_patch(tmp_path) -> None:
    model = tiny_model("llama")
    with pytest.raises(FileNotFoundError, match="profile-heads"):
        mdkv.patch(model, mdkv.MixedDimKVConfig(method="headkv", head_scores=str(tmp_path / "nope.json")))


class _IdTokenizer:
    """Text -> ids for `calibrate`: one id per character (the tiny models' vocabulary is 256)."""

    def __call__(self, text: str, return_tensors: str | None = None):
        from types import SimpleNamespace

        return SimpleNamespace(input_ids=torch.tensor([[ord(c) % 256 for c in text]]))


def test_calibrated_bases_keep_the_model_layer_indices(tmp_path) -> None:
    # Gemma: layer 0 slides (never compressed), layers 1 and 2 are compressed; their bases must be
    # filed under 1 and 2, which MixedDimCache looks up.
    from mdkv_compile.core.bases import load_calibrated
    from mdkv_compile.hf.calibrate import calibrate

    model = tiny_model("gemma3")
    path = calibrate(model, _IdTokenizer(), ["a calibration text " * 8], tmp_path / "basis.safetensors")
    assert sorted(load_calibrated(path)) == [1, 2]
    cfg = config_for("mixeddimkv", 0.3, None, model, basis="calibrated", basis_path=str(path))
    mdkv.patch(model, cfg)
    try:
        greedy(model, torch.randint(0, 256, (1, 48)))
    finally:
        mdkv.unpatch(model)
