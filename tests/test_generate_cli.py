"""`mdkv generate`: a prompt in, the text, the measured KV bytes and the time out.

A tiny random model saved with a byte-level tokenizer (one token per byte, 256 ids: the tiny
models' vocabulary) runs the whole command path in seconds; the real model answers a question.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

import mdkv_compile as mdkv
from mdkv_compile.cli import main
from mdkv_compile.testing import tiny_model


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """One token per byte (byte-level BPE without merges): 256 ids."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE(vocab={ch: i for i, ch in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=alphabet[0])


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tiny") / "model"
    tiny_model("llama").save_pretrained(folder)
    byte_tokenizer().save_pretrained(folder)
    return folder


def _stats(out: str) -> tuple[float, float, float]:
    match = re.search(r"KV cache: ([\d.]+) MiB stored, ([\d.]+) MiB full \(ratio ([\d.]+)\)", out)
    assert match, out
    return tuple(float(g) for g in match.groups())  # type: ignore[return-value]


def test_generate_prints_text_bytes_and_time(tiny_model_dir: Path, tmp_path: Path, capsys) -> None:
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("the quick brown fox jumps over the lazy dog " * 12)  # 528 byte tokens
    rc = main(["generate", "--model", str(tiny_model_dir), "--method", "snapkv", "--budget", "0.1",
               "--prompt-file", str(prompt), "--max-new-tokens", "5", "--no-chat-template"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "snapkv at budget 0.1" in out and re.search(r"\d+ new tokens in [\d.]+ s", out)
    stored, full, ratio = _stats(out)
    assert 0 < stored < 0.2 * full and ratio < 0.2
    prompt_ratio = float(re.search(r"prompt alone: .* \(ratio ([\d.]+)\)", out).group(1))
    assert prompt_ratio <= 0.1  # the budget bounds the prompt; the 5 generated tokens come on top
    # The bytes printed are the cache's own: the same run through the library gives them.
    model = tiny_model("llama")
    cfg = mdkv.MixedDimKVConfig(budget=0.1, method="snapkv")
    mdkv.patch(model, cfg)
    cache = mdkv.MixedDimCache(model.config, cfg)
    ids = byte_tokenizer()(prompt.read_text(), return_tensors="pt").input_ids
    model.generate(ids, max_new_tokens=5, do_sample=False, past_key_values=cache, pad_token_id=0)
    assert abs(stored - cache.stored_bytes() / 2**20) < 1e-3 and abs(full - cache.full_bytes() / 2**20) < 1e-3


@pytest.mark.compile
def test_generate_with_an_onnx_export(tiny_model_dir: Path, tmp_path: Path, capsys) -> None:
    out_dir = tmp_path / "export"
    assert main(["export", "onnx", "--model", str(tiny_model_dir), "--method", "snapkv", "--budget", "0.25",
                 "--max-prompt-tokens", "600", "--max-new-tokens", "8", "--out", str(out_dir)]) == 0
    capsys.readouterr()
    text = "the quick brown fox jumps over the lazy dog " * 12
    assert main(["generate", "--onnx", str(out_dir), "--prompt", text, "--max-new-tokens", "6",
                 "--no-chat-template"]) == 0
    out = capsys.readouterr().out
    assert "ONNX export" in out and "snapkv at budget 0.25" in out
    stored, full, _ = _stats(out)
    assert 0 < stored < full


@pytest.mark.slow
def test_generate_answers_a_chat_question_with_smollm2(capsys) -> None:
    assert main(["generate", "--prompt", "What is the capital of France?", "--budget", "0.1",
                 "--max-new-tokens", "12"]) == 0
    out = capsys.readouterr().out
    assert "Paris" in out.splitlines()[0], out
    stored, full, _ = _stats(out)
    assert 0 < stored <= full
