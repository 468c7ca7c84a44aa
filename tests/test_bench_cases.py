"""The GPU benchmark's correctness cases are only run on a GPU; their inputs must still build: each
case names as many token counts as its tier spec has tiers, at every head width it uses."""

from __future__ import annotations

import pytest
import torch

from mdkv_compile.bench.decode import CHECK_CASES, DECOUPLED_CHECK_CASES, make_packed, parse_tiers


@pytest.mark.parametrize("case", CHECK_CASES + DECOUPLED_CHECK_CASES, ids=lambda c: c[0])
def test_check_case_builds(case: tuple) -> None:
    _, B, Hkv, _, d, spec, counts, n_new, dtype, _, jitter = case
    tiers = parse_tiers(spec, d)
    assert len(counts) == len(tiers), f"{spec} has {len(tiers)} tiers, {len(counts)} counts"
    gen = torch.Generator().manual_seed(0)
    p = make_packed(B, Hkv, d, tiers, [min(c, 8) for c in counts], n_new, dtype, gen, "cpu", jitter=jitter)
    assert [k.shape[1] for k in p["tier_keys"]] == [rk for rk, _ in tiers]
    assert [v.shape[1] for v in p["tier_values"]] == [rv for _, rv in tiers]
