"""`mdkv profile-heads`: probe construction, F1, and real SmolLM2 scores in the policies' format."""

from __future__ import annotations

import argparse
import json

import pytest
import torch

from mdkv_compile import assets
from mdkv_compile.eval import heads as Hd


@pytest.fixture(scope="module")
def tok():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(assets.smollm2_dir()), gguf_file=assets.SMOLLM2_GGUF)


def test_qa_f1() -> None:
    assert Hd.qa_f1(" 4821", "4821") == 1.0
    assert Hd.qa_f1("The Lisbon", "lisbon") == 1.0  # articles and case ignored
    assert Hd.qa_f1("code 4821 maybe", "4821") == pytest.approx(0.5)
    assert Hd.qa_f1("", "4821") == 0.0


@pytest.mark.parametrize("scoring", Hd.SCORING)
def test_probe_span_is_exact(tok, scoring: str) -> None:
    hay_ids = tok(assets.haystack_text()[:40000], add_special_tokens=False)["input_ids"]
    probes = Hd.make_probes(8, [400, 700], scoring, seed=1)
    assert probes == Hd.make_probes(8, [400, 700], scoring, seed=1)  # deterministic
    for p in probes:
        ids, start, end = Hd.build_prompt(tok, p, hay_ids, offset=100)
        assert len(ids) == p.length
        assert tok.decode(ids[start:end]).strip() == p.real
        assert p.answer in p.real  # the scored span holds the right answer
        if scoring == "retrieval_reasoning":  # and a distractor sits next to it
            assert p.before or p.after.strip()


@pytest.mark.slow
def test_profile_smollm2_writes_valid_nonuniform_scores(tmp_path) -> None:
    from mdkv_compile.policies.head_scores import load_head_shares

    out = tmp_path / "heads.json"
    p = argparse.ArgumentParser()
    Hd.add_arguments(p)
    args = p.parse_args(["--out", str(out), "--probes", "3", "--lengths", "512", "--quiet"])
    assert Hd.run(args) == 0
    doc = json.loads(out.read_text())
    Hd.validate_scores(doc)
    assert (doc["num_layers"], doc["num_attention_heads"], doc["num_key_value_heads"]) == (30, 9, 3)
    assert doc["method"] == "retrieval_reasoning"
    s = torch.tensor(doc["scores"])
    assert s.shape == (30, 9) and bool((s >= 0).all())
    assert s.std() > 0.1 * s.mean() > 0  # some heads gather the needle far more than others
    assert doc["meta"]["probes"] == 3
    shares = load_head_shares(out, 30, 3)  # the file the headkv / mixeddimkv-h policies read
    assert shares.shape == (30, 3) and float(shares.sum()) == pytest.approx(1.0, rel=1e-5)
    model, _ = assets.load_model("smollm2")
    assert model.config._attn_implementation == "sdpa"  # restored after the eager decoding
