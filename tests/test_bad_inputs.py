"""Bad input as a new user gives it: every case is either a right result or one clear error naming
the problem, and nothing is lost or changed silently. One section per layer: config, patch and
cache, short prompts, ONNX export and runtime, assets, command lines."""

from __future__ import annotations

import dataclasses
import math

import pytest

from mdkv_compile.config import MixedDimKVConfig

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
