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
from hypothesis import HealthCheck, settings  # noqa: E402

from mdkv_compile import assets  # noqa: E402

# Property tests (test_properties*.py): CI draws the same examples every run (derandomized), with
# no per-example deadline (the first call of a shape pays for its kernels); each test sets its
# number of examples. HYPOTHESIS_PROFILE=mdkv-explore searches longer, at random.
settings.register_profile("mdkv-ci", derandomize=True, deadline=None, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("mdkv-explore", deadline=None, max_examples=500,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "mdkv-ci"))


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


@pytest.fixture
def stored_bytes_bound():
    """The most a compressed layer may store (MixedDimKVConfig's docstring): per (row, KV head),
    its budget (PyramidKV's share of the layer included) or, when larger, the forced tokens (the
    window and the sinks) whole plus one tier's bookkeeping. Bytes of keys and values together."""
    from mdkv_compile.methods import RECORDS
    from mdkv_compile.policies.base import bookkeeping_units, pyramid_factor

    def bound(cfg, n_valid: int, head_dim: int, owners: int, itemsize: int, layer_idx: int = 0,
              num_layers: int = 1) -> float:
        units = cfg.budget * n_valid * head_dim if cfg.budget is not None else cfg.budget_tokens * head_dim
        if RECORDS[cfg.method].budget_schedule == "pyramid":
            units *= pyramid_factor(layer_idx, num_layers, cfg.pyramid_beta)
        floor = min(n_valid, cfg.window + cfg.sinks) * head_dim + bookkeeping_units(1, itemsize)
        return owners * max(units, floor) * 2 * itemsize

    return bound


@pytest.fixture
def no_model_loads(monkeypatch: pytest.MonkeyPatch) -> None:
    """A command that loads a model before it has checked its cheap arguments fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the arguments were checked")

    monkeypatch.setattr(assets, "_load_model", refuse)
    monkeypatch.setattr("transformers.AutoModelForCausalLM.from_pretrained", refuse)
    monkeypatch.setattr("transformers.AutoConfig.from_pretrained", refuse)
