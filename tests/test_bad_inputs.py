"""Bad input as a new user gives it: every case is either a right result or one clear error naming
the problem, and nothing is lost or changed silently. One section per layer: config, patch and
cache, short prompts, ONNX export and runtime, assets, command lines."""

from __future__ import annotations

import copy
import dataclasses
import math

import pytest
import torch

import mdkv_compile as mdkv
from mdkv_compile.config import MixedDimKVConfig
from mdkv_compile.testing import tiny_model

# --- config -------------------------------------------------------------------------------------

# Every numeric field with a value of the wrong type, NaN and infinity: each must be refused by name.
NUMERIC_FIELDS = [
    "budget", "budget_tokens", "budget_bytes", "window", "pool_kernel", "sink_tokens",
    "key_weight", "head_beta", "head_temp", "pyramid_beta", "lowrank_dim",
]


@pytest.mark.parametrize("name", NUMERIC_FIELDS)
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf, "0.5", [1], True])
def test_numeric_field_refuses_nan_inf_and_wrong_types_by_name(name: str, bad) -> None:
    with pytest.raises(ValueError, match=rf"MixedDimKVConfig\.{name}="):
        MixedDimKVConfig(**{name: bad})


@pytest.mark.parametrize("name", ["method", "basis", "basis_solver", "pool", "solver", "kernel", "loss"])
@pytest.mark.parametrize("bad", [3, None, ["mixeddimkv"]])
def test_choice_field_refuses_wrong_types_by_name(name: str, bad) -> None:
    with pytest.raises(ValueError, match=rf"MixedDimKVConfig\.{name}="):
        MixedDimKVConfig(**{name: bad})


def test_nan_beta_cannot_change_what_pyramidkv_stores() -> None:
    with pytest.raises(ValueError, match="pyramid_beta"):
        MixedDimKVConfig(method="pyramidkv", pyramid_beta=float("nan"))


def test_config_is_frozen_and_replace_still_works() -> None:
    cfg = MixedDimKVConfig(budget=0.1)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.budget = 7.0  # type: ignore[misc]
    other = cfg.replace(budget=0.2, dims=[16, 0, 8])
    assert (cfg.budget, other.budget, other.dims) == (0.1, 0.2, (0, 8, 16))
    with pytest.raises(ValueError, match="budget"):
        cfg.replace(budget=7.0)
    assert MixedDimKVConfig().budget == 0.0625
    assert hash(cfg) == hash(MixedDimKVConfig(budget=0.1))


def test_ints_given_as_integral_floats_are_refused_not_truncated() -> None:
    with pytest.raises(ValueError, match=r"MixedDimKVConfig\.window="):
        MixedDimKVConfig(window=31.5)


# --- patch ----------------------------------------------------------------------------------------


def _ids(n: int = 64, seed: int = 0) -> torch.Tensor:
    return torch.randint(1, 256, (1, n), generator=torch.Generator().manual_seed(seed))


def _greedy(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0)


def test_deepcopy_of_a_patched_model_generates_with_the_copys_weights() -> None:
    cfg = MixedDimKVConfig(budget=0.5, method="snapkv", window=4)
    model = mdkv.patch(tiny_model("llama"), cfg)
    ids = _ids()
    before = _greedy(model, ids)
    clone = copy.deepcopy(model)
    with torch.no_grad():
        clone.lm_head.weight.mul_(-1.0)  # a different model: greedy picks other tokens
    expected = mdkv.patch(tiny_model("llama"), cfg)
    with torch.no_grad():
        expected.lm_head.weight.mul_(-1.0)
    assert torch.equal(_greedy(clone, ids), _greedy(expected, ids))
    assert not torch.equal(_greedy(clone, ids), before)
    assert torch.equal(_greedy(model, ids), before)  # the original is untouched
    # Each has its own patch: unpatching the copy leaves the original patched.
    mdkv.unpatch(clone)
    assert clone.config._attn_implementation != "mixeddimkv"
    assert model.config._attn_implementation == "mixeddimkv"
    assert isinstance(model(ids, use_cache=True).past_key_values, mdkv.MixedDimCache)
    assert not isinstance(clone(ids, use_cache=True).past_key_values, mdkv.MixedDimCache)


def _unpatched_outputs(model: torch.nn.Module, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        return model(ids).logits, _greedy(model, ids)


@pytest.mark.parametrize("bad_cfg", [{"budget": 0.1}, "snapkv", 0.1])
def test_patch_with_something_else_than_a_config_changes_nothing(bad_cfg) -> None:
    model = tiny_model("llama")
    ids = _ids()
    logits, tokens = _unpatched_outputs(model, ids)
    with pytest.raises(TypeError, match="MixedDimKVConfig"):
        mdkv.patch(model, bad_cfg)
    assert model.config._attn_implementation == "sdpa"
    got_logits, got_tokens = _unpatched_outputs(model, ids)
    assert torch.equal(got_logits, logits) and torch.equal(got_tokens, tokens)
    mdkv.unpatch(model)  # a no-op
    assert torch.equal(_unpatched_outputs(model, ids)[1], tokens)


def test_patch_that_fails_midway_rolls_back(monkeypatch) -> None:
    model = tiny_model("llama")
    ids = _ids()
    logits, tokens = _unpatched_outputs(model, ids)

    def refuse(*args, **kwargs):
        raise RuntimeError("hook refused")

    monkeypatch.setattr(model, "register_forward_pre_hook", refuse)
    with pytest.raises(RuntimeError, match="hook refused"):
        mdkv.patch(model, MixedDimKVConfig(budget=0.1))
    monkeypatch.undo()
    assert model.config._attn_implementation == "sdpa"
    assert "generate" not in vars(model)
    got_logits, got_tokens = _unpatched_outputs(model, ids)
    assert torch.equal(got_logits, logits) and torch.equal(got_tokens, tokens)
    mdkv.unpatch(model)
    mdkv.patch(model, MixedDimKVConfig(budget=0.1))  # and it can be patched properly afterwards
    assert isinstance(model(ids, use_cache=True).past_key_values, mdkv.MixedDimCache)


def test_patch_of_a_model_without_lm_head_compresses_its_forward_calls() -> None:
    from transformers import LlamaModel

    base = LlamaModel(tiny_model("llama").config).eval()
    ids = _ids(200)
    with torch.no_grad():
        ref = base(ids).last_hidden_state
    mdkv.patch(base, MixedDimKVConfig(budget=1.0))
    with torch.no_grad():
        out = base(ids, use_cache=True)
    assert isinstance(out.past_key_values, mdkv.MixedDimCache)
    assert torch.allclose(out.last_hidden_state, ref, atol=1e-5)
    mdkv.unpatch(base)
    assert base.config._attn_implementation == "sdpa"
