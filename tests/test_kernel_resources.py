"""The store kernel compiled ahead of time for an H100 (sm_90) on this machine with Triton's own ptxas,
and what one program holds (``kernels.store_attention.resources``). On the H100 the decode step's speed
(docs/notes/kernel_notes.md, "v4") rests on two properties that a kernel change can lose without any
test failing on a CPU: no spills, and three programs of 4 warps per SM."""

from __future__ import annotations

import pytest

pytest.importorskip("triton")

from mdkv_compile.kernels.store_attention.resources import compiled_resources  # noqa: E402

COUPLED = [(64, 64), (32, 32), (16, 16)]  # mdkv bench's 128/64/32/16
DECOUPLED = [(128, 64), (64, 32), (32, 16), (16, 16)]  # the mixeddimkv policy's default tiers at d = 128


@pytest.mark.parametrize("tiers", [COUPLED, DECOUPLED], ids=["coupled", "decoupled"])
def test_decode_step_keeps_everything_in_registers(tiers: list[tuple[int, int]]) -> None:
    res = compiled_resources(tiers)
    assert res["stack"] == 0 and res["num_warps"] == 4, res


def test_coupled_decode_step_fits_three_programs_per_sm() -> None:
    # 65536 registers per SM / (3 programs x 128 threads) = 170 per thread
    res = compiled_resources(COUPLED)
    assert res["registers"] <= 170 and 3 * res["shared"] <= 228 * 1024, res


def test_chunk_variant_compiles_with_its_own_rows_and_warps() -> None:
    decode = compiled_resources(COUPLED)
    chunk = compiled_resources(COUPLED, chunk_tokens=64, tuning={"chunk_num_warps": 8})
    assert chunk["num_warps"] == 8 and chunk["shared"] > decode["shared"], (decode, chunk)


def test_decoupled_decode_step_fits_three_programs_per_sm_under_the_default_cap() -> None:
    # the default decode cap (168) fits three programs of 4 warps per SM for the policy's tiers too;
    # uncapped they take more than 170 (two programs per SM)
    res = compiled_resources(DECOUPLED)
    assert res["registers"] <= 168 and res["stack"] == 0, res
    uncapped = compiled_resources(DECOUPLED, tuning={"decode_max_registers": None})
    assert uncapped["registers"] > 170 and uncapped["stack"] == 0, uncapped


def test_register_cap_leaves_chunks_alone() -> None:
    capped = compiled_resources(DECOUPLED, chunk_tokens=64)
    uncapped = compiled_resources(DECOUPLED, chunk_tokens=64, tuning={"decode_max_registers": None})
    assert capped == uncapped, (capped, uncapped)


def test_merge_for_loop_changes_no_layout_per_split() -> None:
    """Through the while loop every unrolled split step changes the layout of its weights; through the
    for loop (Tuning.merge_for_loop) the merge's layout changes are its epilogue's alone, whatever the
    splits per step. With the longest tier in two slots the step keeps its registers."""
    changes = {(loop, unroll): compiled_resources(COUPLED, tuning={"merge_for_loop": loop, "merge_unroll": unroll})
               for loop in (False, True) for unroll in (1, 2)}
    assert changes[True, 1]["merge_layout_changes"] == changes[True, 2]["merge_layout_changes"], changes
    assert (changes[False, 2]["merge_layout_changes"] > changes[False, 1]["merge_layout_changes"]
            > changes[True, 1]["merge_layout_changes"]), changes
    assert all(res["stack"] == 0 for res in changes.values()), changes
    split = compiled_resources(COUPLED, tuning={"merge_for_loop": True, "split_longest_tier": True})
    assert split["stack"] == 0 and split["registers"] <= 170, split
