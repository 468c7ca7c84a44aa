"""`mdkv eval` runner: hand-written greedy decoding matches transformers, both protocols, resume."""

from __future__ import annotations

import argparse
import csv
import json

import pytest
import torch
from transformers import DynamicCache

import mdkv_compile as mdkv
from mdkv_compile import assets
from mdkv_compile.eval import runner as R
from mdkv_compile.eval import tasks as T
from mdkv_compile.testing import random_llama


@pytest.fixture(scope="module")
def tok():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(assets.smollm2_dir()), gguf_file=assets.SMOLLM2_GGUF)


@pytest.fixture(scope="module")
def tiny(tok):
    # random weights, the real tokenizer's vocabulary: fast, and exercises GQA (4 q / 2 kv heads)
    return random_llama(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                        eos_token_id=2, bos_token_id=1)  # fmt: skip


@pytest.fixture(scope="module")
def hay() -> str:
    return assets.haystack_text()


def test_greedy_matches_generate(tiny, tok, hay) -> None:
    inst = T.make_instance("niah_single", tok, 256, haystack=hay)
    ctx, q = T.encode(tok, inst)
    res = R.greedy_generate(tiny, tok, DynamicCache(config=tiny.config), ctx, q, "query-aware", 8, set())
    ref = tiny.generate(torch.tensor([ctx + q]), max_new_tokens=8, do_sample=False, eos_token_id=None,
                        pad_token_id=0)  # fmt: skip
    assert res["prediction"] == tok.decode(ref[0, len(ctx + q) :], skip_special_tokens=True)
    assert res["new_tokens"] == 8


@pytest.mark.parametrize("protocol", T.PROTOCOLS)
def test_full_method_equals_uncompressed(tiny, tok, hay, protocol: str) -> None:
    inst = T.make_instance("niah", tok, 300, depth=0.5, haystack=hay)
    ctx, q = T.encode(tok, inst)
    ref = R.greedy_generate(tiny, tok, DynamicCache(config=tiny.config), ctx, q, protocol, 10, set())
    cfg = mdkv.MixedDimKVConfig(method="full", budget=1.0)
    mdkv.patch(tiny, cfg)
    try:
        got = R.greedy_generate(tiny, tok, mdkv.MixedDimCache(tiny.config, cfg), ctx, q, protocol, 10, set())
    finally:
        mdkv.unpatch(tiny)
    assert got["prediction"] == ref["prediction"]
    assert got["stored_bytes"] == got["full_bytes"] > 0


def test_compression_protocols_differ_in_what_is_compressed(tiny, tok, hay) -> None:
    inst = T.make_instance("niah", tok, 400, depth=0.5, haystack=hay)
    ctx, q = T.encode(tok, inst)
    cfg = mdkv.MixedDimKVConfig(method="snapkv", budget=0.25)
    mdkv.patch(tiny, cfg)
    try:
        agn = R.greedy_generate(tiny, tok, mdkv.MixedDimCache(tiny.config, cfg), ctx, q, "query-agnostic", 4, set())
        awr = R.greedy_generate(tiny, tok, mdkv.MixedDimCache(tiny.config, cfg), ctx, q, "query-aware", 4, set())
    finally:
        mdkv.unpatch(tiny)
    for res in (agn, awr):
        assert 0 < res["stored_bytes"] < 0.6 * res["full_bytes"]
        # SnapKV keeps tokens whole or drops them: only dims 0 and head_dim (16) are used
        assert set(res["dim_fractions"]) <= {"0", "16"}
        assert sum(res["dim_fractions"].values()) == pytest.approx(1.0)
    # query-agnostic keeps the question uncompressed on top of the compressed context
    assert agn["stored_bytes"] > awr["stored_bytes"]


def test_continuation_nll_matches_one_forward(tiny, tok, hay) -> None:
    inst = T.make_instance("ppl", tok, 200, haystack=hay, ppl_tokens=32)
    ctx, cont = T.encode(tok, inst)
    res = R.continuation_nll(tiny, DynamicCache(config=tiny.config), ctx, cont)
    with torch.no_grad():
        logits = tiny(torch.tensor([ctx + cont])).logits[0]
    ref = torch.nn.functional.cross_entropy(logits[len(ctx) - 1 : -1], torch.tensor(cont)).item()
    assert res["nll"] == pytest.approx(ref, rel=1e-4)


def test_kl_is_zero_for_the_full_cache_and_positive_under_compression(tiny, tok, hay) -> None:
    inst = T.make_instance("kl", tok, 300, haystack=hay, ppl_tokens=24)
    ctx, cont = T.encode(tok, inst)
    ref = R.reference_logprobs(tiny, ctx, cont)
    # the reference is the model's own next-token distribution after ctx + cont in one forward
    with torch.no_grad():
        one = tiny(torch.tensor([ctx + cont])).logits[0, len(ctx) - 1 : -1].float().log_softmax(-1)
    torch.testing.assert_close(ref, one, atol=1e-4, rtol=1e-4)
    results = {}
    for method, budget in (("full", 1.0), ("snapkv", 0.1)):
        cfg = mdkv.MixedDimKVConfig(method=method, budget=budget)
        mdkv.patch(tiny, cfg)
        try:
            results[method] = R.continuation_kl(tiny, mdkv.MixedDimCache(tiny.config, cfg), ctx, cont, ref)
        finally:
            mdkv.unpatch(tiny)
    assert results["full"]["kl"] == pytest.approx(0.0, abs=1e-6)
    assert results["full"]["top1_agreement"] == 1.0
    assert results["snapkv"]["kl"] > 1e-4
    assert results["snapkv"]["stored_bytes"] < 0.5 * results["snapkv"]["full_bytes"]


def test_grid_resumes_and_writes_summary(tiny, tok, hay, tmp_path) -> None:
    spec = R.EvalSpec(model_name="tiny", methods=["full", "snapkv"], budgets=[0.5],
                      tasks=["niah", "niah_single", "ppl", "kl"], lengths=[256], depths=[0.25, 0.75], seeds=[0],
                      protocols=list(T.PROTOCOLS), ppl_tokens=16, max_new_tokens=3)  # fmt: skip
    first = R.run_grid(tiny, tok, spec, tmp_path, haystack=hay, progress=False, fail_fast=True)
    # 2 methods x (2 niah depths + 1 niah_single) x 2 protocols + 2 methods x (ppl, kl) (one protocol)
    assert first == {"done": 16, "skipped": 0, "failed": 0}
    lines = (tmp_path / "results.jsonl").read_text().splitlines()
    assert len(lines) == 16
    again = R.run_grid(tiny, tok, spec, tmp_path, haystack=hay, progress=False, fail_fast=True)
    assert again == {"done": 0, "skipped": 16, "failed": 0}
    assert (tmp_path / "results.jsonl").read_text().splitlines() == lines
    recs = [json.loads(x) for x in lines]
    assert {r["method"] for r in recs} == {"full", "snapkv"}
    assert all(r["stored_bytes"] and r["full_bytes"] and r["seconds"] > 0 for r in recs)
    assert all(r["budget"] == 1.0 for r in recs if r["method"] == "full")
    assert len({R.cell_key(r) for r in recs}) == 16
    kl = {r["method"]: r for r in recs if r["task"] == "kl"}
    assert kl["full"]["score"] == pytest.approx(0.0, abs=1e-6) and kl["full"]["metric"] == "kl"
    assert kl["snapkv"]["score"] > 0 and 0 <= kl["snapkv"]["top1_agreement"] <= 1
    rows = list(csv.DictReader((tmp_path / "summary.csv").open()))
    assert {r["task"] for r in rows} == {"niah", "niah_single", "ppl", "kl"}
    # a grown grid only runs the new cells
    spec.budgets = [0.5, 0.25]
    more = R.run_grid(tiny, tok, spec, tmp_path, haystack=hay, progress=False, fail_fast=True)
    assert more == {"done": 8, "skipped": 16, "failed": 0}
    # config options make a new variant of the method; full (the reference) is not rerun
    spec.budgets, spec.options = [0.5], {"window": 4}
    variant = R.run_grid(tiny, tok, spec, tmp_path, haystack=hay, progress=False, fail_fast=True)
    assert variant == {"done": 8, "skipped": 8, "failed": 0}
    labels = {r["method"] for r in R.read_results(tmp_path / "results.jsonl")}
    assert labels == {"full", "snapkv", "snapkv[window=4]"}
    assert not hasattr(tiny, "_mdkv_patch")  # the shared model is left unpatched


def test_cli_arguments_and_errors(tmp_path) -> None:
    p = argparse.ArgumentParser()
    R.add_arguments(p)
    spec = R.spec_from_args(p.parse_args(["--smoke"]))
    assert spec.methods == ["full", "snapkv"] and spec.lengths == [1024]
    spec = R.spec_from_args(p.parse_args(["--smoke", "--methods", "full,mixeddimkv", "--option", "window=16"]))
    assert spec.methods == ["full", "mixeddimkv"] and spec.options == {"window": 16}
    # calibrated bases by default for the methods with reduced tiers, once a file is known
    with pytest.raises(ValueError, match="calibrated basis file"):
        spec.config("mixeddimkv", 0.1)
    spec.calibrated_path = "bases.safetensors"
    cfg = spec.config("mixeddimkv", 0.1)
    assert cfg.window == 16 and cfg.basis == "calibrated" and cfg.basis_path == "bases.safetensors"
    assert spec.label("mixeddimkv") == "mixeddimkv[basis=\"calibrated\",window=16]"
    assert spec.config("snapkv", 0.1).basis == "prompt" and spec.label("snapkv") == "snapkv[window=16]"
    prompt = R.spec_from_args(p.parse_args(["--smoke", "--methods", "mixeddimkv", "--basis", "prompt"]))
    assert prompt.config("mixeddimkv", 0.1).basis == "prompt" and prompt.label("mixeddimkv") == "mixeddimkv"
    bad = R.spec_from_args(p.parse_args(["--methods", "headkv"]))
    with pytest.raises(ValueError, match="profile-heads"):
        bad.validate()
    with pytest.raises(ValueError, match="unknown task"):
        R.spec_from_args(p.parse_args(["--tasks", "niah,bogus"])).validate()
    assert R.run(p.parse_args(["--methods", "nope", "--out", str(tmp_path)])) == 2


@pytest.mark.slow
def test_smollm2_smoke(tmp_path) -> None:
    """Real model: the full cache finds a 512-token needle; SnapKV at 50% stores about half."""
    model, tok = assets.load_model("smollm2")
    spec = R.EvalSpec(model_name="smollm2", methods=["full", "snapkv"], budgets=[0.5], tasks=["niah"],
                      lengths=[512], depths=[0.5])  # fmt: skip
    counts = R.run_grid(model, tok, spec, tmp_path, progress=False, fail_fast=True)
    assert counts["done"] == 2
    recs = {r["method"]: r for r in R.read_results(tmp_path / "results.jsonl")}
    assert recs["full"]["score"] == 1.0, recs["full"]["prediction"]
    assert recs["snapkv"]["stored_bytes"] < 0.6 * recs["snapkv"]["full_bytes"]
