"""Shared fixtures: tiny random-weight models of every supported architecture (no downloads)."""

from __future__ import annotations

import os

import torch

# Triton reads TRITON_INTERPRET when it is first imported: set it before any test module imports
# it, so kernel tests run on the CPU interpreter wherever there is no GPU.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import json  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import transformers  # noqa: E402

# (config class, model class, extra config kwargs)
TINY_ARCHS: dict[str, tuple[str, str, dict]] = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "mistral": ("MistralConfig", "MistralForCausalLM", {"sliding_window": None}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {}),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", {"pad_token_id": 0}),
    "gemma2": (
        "Gemma2Config", "Gemma2ForCausalLM",
        {"sliding_window": 16, "layer_types": ["sliding_attention", "full_attention", "full_attention"],
         "num_hidden_layers": 3, "attn_logit_softcapping": 50.0, "query_pre_attn_scalar": 16},
    ),
    "gemma3": (
        "Gemma3TextConfig", "Gemma3ForCausalLM",
        {"sliding_window": 16, "layer_types": ["sliding_attention", "full_attention", "full_attention"],
         "num_hidden_layers": 3, "query_pre_attn_scalar": 16},
    ),
}


def tiny_model(arch: str, seed: int = 0) -> torch.nn.Module:
    config_name, model_name, extra = TINY_ARCHS[arch]
    kwargs = dict(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=1024,
    )
    kwargs.update(extra)
    config = getattr(transformers, config_name)(**kwargs)
    config._attn_implementation = "sdpa" if arch not in ("gemma2",) else "eager"
    torch.manual_seed(seed)
    return getattr(transformers, model_name)(config).eval()


def greedy_decode(model, cache, ids: torch.Tensor, steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy tokens of a manual prefill + decode loop over `cache`, and the last step's logits."""
    with torch.no_grad():
        logits = model(input_ids=ids, past_key_values=cache, use_cache=True).logits[:, -1]
        tokens = []
        for _ in range(steps):
            tokens.append(logits.argmax(-1, keepdim=True))
            logits = model(input_ids=tokens[-1], past_key_values=cache, use_cache=True).logits[:, -1]
    return torch.cat(tokens, 1), logits


def write_head_scores(path: Path, num_layers: int, n_heads: int, seed: int = 0) -> Path:
    gen = torch.Generator().manual_seed(seed)
    scores = torch.rand(num_layers, n_heads, generator=gen).tolist()
    path.write_text(json.dumps({"model": "tiny", "num_layers": num_layers, "scores": scores}))
    return path


@pytest.fixture
def head_scores_file(tmp_path: Path):
    def make(num_layers: int, n_heads: int) -> Path:
        return write_head_scores(tmp_path / "heads.json", num_layers, n_heads)

    return make
