"""Shared fixtures. Tiny models and the greedy decode loop live in mdkv_compile.testing (also used
by `mdkv explain`, the benchmarks and the examples)."""

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
