"""Decode attention over the packed store: the Triton kernels (compiled on a GPU, run by Triton's
CPU interpreter elsewhere) and the pure-torch fallback, both against an independent float64
reference that reconstructs every key and value (k_hat = basis_k[o][:, :rk] @ c, v_hat =
basis_v[o][:, :rv] @ c) and runs plain softmax attention owner by owner. A tier is a key width, or a
(key width, value width) pair for the decoupled tiers."""

from __future__ import annotations

import pytest
import torch
from triton_harness import interpreter_guard, kernel_device

DEVICE = kernel_device()  # skips the module where the kernels cannot run

from mdkv_compile.kernels import store_attention  # noqa: E402
from mdkv_compile.kernels.store_attention import (  # noqa: E402
    packed_attention_torch,
    packed_chunk_attention,
    packed_chunk_attention_triton,
    packed_decode_attention,
    packed_decode_attention_triton,
)

STALE, _needs_interpreter, test_module_in_fresh_process = interpreter_guard(
    __file__, lambda: [store_attention.jit._packed_attention]
)


def make_case(
    gen: torch.Generator,
    B: int,
    Hkv: int,
    G: int,
    d: int,
    tiers: tuple[int | tuple[int, int], ...],
    max_count: int,
    n_new: int,
    n_cap: int,
    dtype: torch.dtype,
    empty_owner: bool = False,
    L: int = 1,
    counts: list[list[int]] | None = None,
) -> dict:
    """Random tiers with random token counts per owner, or `counts[t][owner]` where given."""
    n_own = B * Hkv
    pairs = [t if isinstance(t, tuple) else (t, t) for t in tiers]
    keys, vals, offs = [], [], []
    for t, (r, rv) in enumerate(pairs):
        if counts is None:
            count = torch.randint(0, max_count + 1, (n_own,), generator=gen)
            count[torch.randint(0, n_own, (1,), generator=gen)] = 0  # some owner has no token in this tier
            if t == 0:
                count[0] = max_count  # and some owner many: several row blocks and splits
        else:
            count = torch.tensor(counts[t])
        if empty_owner:
            count[n_own - 1] = 0
        off = torch.zeros(n_own + 1, dtype=torch.int32)
        off[1:] = torch.cumsum(count, 0)
        m = int(off[-1])
        keys.append((torch.randn(m, r, generator=gen) * (1.0 if t == 0 else 1.5)).to(dtype))
        vals.append(torch.randn(m, rv, generator=gen).to(dtype))
        offs.append(off)
    if len(pairs) > 1:
        rk_max, rv_max = max(r for r, _ in pairs[1:]), max(rv for _, rv in pairs[1:])
        bk = torch.linalg.qr(torch.randn(n_own, d, rk_max, generator=gen, dtype=torch.float64))[0].to(dtype)
        bv = torch.linalg.qr(torch.randn(n_own, d, rv_max, generator=gen, dtype=torch.float64))[0].to(dtype)
    else:
        bk = bv = None
    # the decoded region is a slice of a larger preallocated buffer: non-contiguous on purpose
    k_buf = torch.randn(B, Hkv, n_cap + 3, d, generator=gen).to(dtype)
    v_buf = torch.randn(B, Hkv, n_cap + 3, d, generator=gen).to(dtype)
    q = torch.randn(B, Hkv * G, L, d, generator=gen).to(dtype)
    dev = DEVICE
    return dict(
        q=q.to(dev),
        tier_keys=[k.to(dev) for k in keys],
        tier_values=[v.to(dev) for v in vals],
        tier_offsets=[o.to(dev) for o in offs],
        basis_k=None if bk is None else bk.to(dev),
        basis_v=None if bv is None else bv.to(dev),
        k_new=k_buf[:, :, :n_cap].to(dev),
        v_new=v_buf[:, :, :n_cap].to(dev),
        n_new=n_new,
        scale=d**-0.5,
    )


def reference(c: dict, softcap: float | None = None) -> torch.Tensor:
    """Reconstruct keys/values owner by owner, float64 softmax attention. Independent of the kernel.
    With L query tokens, query l is new token n_new - L + l and sees new tokens up to itself."""
    q = c["q"].double().cpu()
    B, Hq, L, d = q.shape
    Hkv = c["k_new"].shape[1]
    G = Hq // Hkv
    n_new = c["n_new"]
    out = torch.zeros(B, Hq, L, d, dtype=torch.float64)
    for b in range(B):
        for h in range(Hkv):
            o = b * Hkv + h
            ks, vs = [], []
            for t, (kt, vt, off) in enumerate(zip(c["tier_keys"], c["tier_values"], c["tier_offsets"], strict=True)):
                lo, hi = int(off[o]), int(off[o + 1])
                kc, vc = kt[lo:hi].double().cpu(), vt[lo:hi].double().cpu()
                if t == 0:
                    ks.append(kc)
                    vs.append(vc)
                else:
                    ks.append(kc @ c["basis_k"][o, :, : kt.shape[1]].double().cpu().T)
                    vs.append(vc @ c["basis_v"][o, :, : vt.shape[1]].double().cpu().T)
            K0, V0 = torch.cat(ks), torch.cat(vs)
            for l_ in range(L):
                seen = n_new - L + l_ + 1
                K = torch.cat([K0, c["k_new"][b, h, :seen].double().cpu()])
                V = torch.cat([V0, c["v_new"][b, h, :seen].double().cpu()])
                if K.shape[0] == 0:
                    continue  # the kernel's convention: attention over nothing is zero
                for g in range(G):
                    s = K @ q[b, h * G + g, l_] * c["scale"]
                    if softcap is not None:
                        s = softcap * torch.tanh(s / softcap)
                    out[b, h * G + g, l_] = torch.softmax(s, 0) @ V
    return out


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    return float((x.double().cpu() - ref).norm() / ref.norm().clamp_min(1e-30))


CASES = [
    # name, B, Hkv, G, d, tiers, max_count, n_new, n_cap, dtype, softcap, empty_owner
    ("fp32_d64_4tiers", 2, 2, 3, 64, (64, 32, 16, 8), 150, 5, 8, torch.float32, None, False),
    ("fp32_d32_softcap_nonew", 2, 2, 3, 32, (32, 16, 8), 40, 0, 4, torch.float32, 4.0, True),
    ("fp32_d64_full_only", 1, 2, 4, 64, (64,), 90, 7, 7, torch.float32, None, False),
    ("bf16_d64_4tiers", 2, 2, 3, 64, (64, 32, 16, 8), 100, 6, 8, torch.bfloat16, None, False),
    ("fp16_d32_2tiers_softcap", 1, 3, 2, 32, (32, 16), 60, 3, 5, torch.float16, 30.0, False),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_triton_matches_float64_reference(case: tuple) -> None:
    name, B, Hkv, G, d, tiers, max_count, n_new, n_cap, dtype, softcap, empty_owner = case
    gen = torch.Generator().manual_seed(abs(hash(name)) % 2**31)  # fresh inputs per case
    c = make_case(gen, B, Hkv, G, d, tiers, max_count, n_new, n_cap, dtype, empty_owner)
    out = torch.full((B, Hkv * G, 1, d), float("nan"), dtype=dtype, device=DEVICE)
    res = packed_decode_attention_triton(**c, softcap=softcap, out=out, poison_workspace=True)
    assert res is out
    assert torch.isfinite(out).all(), "an output element was never written, or NaN leaked in"
    ref = reference(c, softcap)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert rel_err(out, ref) < tol
    if dtype == torch.float32:
        torch.testing.assert_close(out.double().cpu(), ref, rtol=1e-4, atol=1e-5)
    if empty_owner:  # the last owner has no stored token and no new token
        assert (out[-1, -G:] == 0).all()


@pytest.mark.parametrize("case", CASES[:4], ids=[c[0] for c in CASES[:4]])
def test_torch_fallback_matches_float64_reference(case: tuple) -> None:
    name, B, Hkv, G, d, tiers, max_count, n_new, n_cap, dtype, softcap, empty_owner = case
    gen = torch.Generator().manual_seed(abs(hash(name + "torch")) % 2**31)
    c = make_case(gen, B, Hkv, G, d, tiers, max_count, n_new, n_cap, dtype, empty_owner)
    ref = reference(c, softcap)
    out64 = packed_attention_torch(**c, softcap=softcap, compute_dtype=torch.float64)
    # returned in q's dtype: fp32 rounding of the output only
    assert rel_err(out64, ref) < (1e-7 if dtype == torch.float32 else 1e-2)
    out = packed_attention_torch(**c, softcap=softcap)
    assert rel_err(out, ref) < (1e-5 if dtype == torch.float32 else 2e-2)


def test_registered_op_runs_and_matches() -> None:
    gen = torch.Generator().manual_seed(7)
    c = make_case(gen, 1, 2, 2, 32, (32, 16), 30, 2, 4, torch.float32)
    out = packed_decode_attention(**c)
    assert rel_err(out, reference(c)) < 1e-5
    schema = str(torch.ops.mdkv.packed_decode_attention.default._schema)
    assert "Tensor[] tier_keys" in schema and "Tensor? basis_k" in schema


def test_budget_one_equals_full_attention() -> None:
    """All tokens in the full tier, nothing reduced: plain GQA attention over the same keys."""
    gen = torch.Generator().manual_seed(11)
    B, Hkv, G, d, n = 2, 2, 3, 32, 37
    k = torch.randn(B, Hkv, n, d, generator=gen).to(DEVICE)
    v = torch.randn(B, Hkv, n, d, generator=gen).to(DEVICE)
    q = torch.randn(B, Hkv * G, 1, d, generator=gen).to(DEVICE)
    off = torch.arange(0, B * Hkv + 1, dtype=torch.int32, device=DEVICE) * n
    empty = torch.zeros(B, Hkv, 1, d, device=DEVICE)
    out = packed_decode_attention_triton(
        q, [k.reshape(-1, d)], [v.reshape(-1, d)], [off], None, None, empty, empty, 0, d**-0.5
    )
    ref = torch.nn.functional.scaled_dot_product_attention(
        q.double(), k.double().repeat_interleave(G, 1), v.double().repeat_interleave(G, 1)
    ).cpu()
    assert rel_err(out, ref) < 1e-5


def test_many_splits_merged_by_the_last_program() -> None:
    """Many small splits, some empty, in either region order: the last program of each owner merges
    them all (the arrival count reaches S x regions exactly once per owner), several splits at a time
    whether or not the count divides S."""
    from mdkv_compile.kernels import store_attention as ta

    gen = torch.Generator().manual_seed(5)
    c = make_case(gen, 1, 2, 3, 32, (32, 16, 8), 70, 3, 4, torch.float32)
    for reverse, unroll in ((True, 4), (False, 5), (True, 1)):
        tuning = ta.Tuning(min_rows_per_split=4, programs_per_sm=64, block_n_full=16, block_n_reduced_max=64,
                           decode_block_n_reduced_max=64, reverse_regions=reverse, merge_unroll=unroll)
        plan = ta.StorePlan.from_tiers(c["tier_keys"], c["tier_values"], c["tier_offsets"], c["basis_k"],
                                       c["basis_v"], tuning)
        splits = plan.decode_split(2, 3, c["n_new"], c["q"].device).splits
        assert splits > unroll and (splits % unroll != 0 or unroll == 1), splits
        out = torch.full((1, 6, 1, 32), float("nan"), device=DEVICE)
        packed_decode_attention_triton(**c, out=out, poison_workspace=True, tuning=tuning)
        assert rel_err(out, reference(c)) < 1e-5


def test_kept_arrival_counts_are_left_at_zero() -> None:
    """A caller-kept count buffer serves consecutive launches with no memset: decode and chunk launches of
    several splits and row blocks each leave it at zero and give the reference's result; a buffer of the
    wrong type or size is refused."""
    from mdkv_compile.kernels import store_attention as ta

    tuning = ta.Tuning(min_rows_per_split=4, programs_per_sm=64, chunk_programs_per_sm=64, block_n_full=16,
                       block_n_reduced_max=64, decode_block_n_reduced_max=64, chunk_block_m=16)
    counts = torch.zeros(64, dtype=torch.int32, device=DEVICE)
    for seed, L in ((21, 1), (22, 7), (23, 1)):  # a chunk of 7 x 3 rows: two row blocks of 16
        gen = torch.Generator().manual_seed(seed)
        c = make_case(gen, 2, 2, 3, 32, (32, 16, 8), 70, 8, 10, torch.float32, L=L)
        kernel = packed_decode_attention_triton if L == 1 else packed_chunk_attention_triton
        out = kernel(**c, tuning=tuning, poison_workspace=True, arrival_counts=counts)
        assert rel_err(out, reference(c)) < 1e-5
        assert not counts.any(), "a launch left an arrival count behind"
    # through the registered op, at the default launch parameters
    assert rel_err(packed_decode_attention(**c, arrival_counts=counts), reference(c)) < 1e-5
    assert not counts.any()
    with pytest.raises(ValueError, match="arrival_counts"):
        packed_decode_attention_triton(**c, tuning=tuning, arrival_counts=counts[:2])
    with pytest.raises(ValueError, match="arrival_counts"):
        packed_decode_attention_triton(**c, tuning=tuning, arrival_counts=counts.long())


def test_trace_records_every_program_once() -> None:
    """A traced launch (GPU only) gives the untraced result and one row per program: timestamps in
    order, one merging program per owner, every (region, owner, split) once. Under the interpreter,
    which has no GPU timer, asking for a trace is a clear error."""
    from mdkv_compile.kernels._triton import interpreting
    from mdkv_compile.kernels.store_attention.jit import TRACE_FIELDS

    gen = torch.Generator().manual_seed(31)
    c = make_case(gen, 2, 2, 3, 32, (32, 16, 8), 70, 4, 6, torch.float32)
    trace = torch.zeros(4096, TRACE_FIELDS, dtype=torch.int64, device=DEVICE)
    if interpreting():
        with pytest.raises(ValueError, match="timer"):
            packed_decode_attention_triton(**c, trace=trace)
        return
    with pytest.raises(ValueError, match="trace"):
        packed_decode_attention_triton(**c, trace=trace[:1])
    out = packed_decode_attention_triton(**c, trace=trace)
    assert torch.equal(out, packed_decode_attention_triton(**c))
    rows = trace[trace[:, 0] > 0].cpu()
    begin, work, arrive, merged, _, region, owner, split = rows.T
    assert (begin <= work).all() and (work <= arrive).all()
    assert int((merged > 0).sum()) == 4 and (merged[merged > 0] >= arrive[merged > 0]).all()
    keys = {(int(r), int(o), int(s)) for r, o, s in zip(region, owner, split, strict=True)}
    assert len(keys) == rows.shape[0] and {r for r, _, _ in keys} == {0, 1, 2}  # the full tier and two reduced


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_whole_and_partial_blocks_match_reference(dtype: torch.dtype) -> None:
    """A region's whole blocks run unmasked and only its last, partial block masked: regions of exactly
    one and two blocks, two blocks and one row, and less than one block (blocks of 16 rows, one split),
    decode and a chunk of three tokens."""
    from mdkv_compile.kernels import store_attention as ta

    lengths = [32, 33, 15, 16]  # per owner, rotated per tier so every tier gets every case
    counts = [lengths[t:] + lengths[:t] for t in range(3)]
    tuning = ta.Tuning(min_rows_per_split=10**6, block_n_full=16, block_n_reduced_max=16, decode_block_n_reduced_max=16)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    for L in (1, 3):
        gen = torch.Generator().manual_seed(11 + L)
        c = make_case(gen, 2, 2, 3, 32, (32, 16, 8), 0, 4, 6, dtype, L=L, counts=counts)
        plan = ta.StorePlan.from_tiers(c["tier_keys"], c["tier_values"], c["tier_offsets"], c["basis_k"],
                                       c["basis_v"], tuning)
        kernel = packed_decode_attention_triton if L == 1 else packed_chunk_attention_triton
        split = (plan.decode_split(4, 3, c["n_new"], c["q"].device) if L == 1
                 else plan.chunk_split(4, 3 * L, c["n_new"], c["q"].device))
        assert plan.block_n == 16 and all(plan.reduced_block_rows(split)[f"BN{t}"] == 16 for t in (1, 2, 3))
        out = kernel(**c, tuning=tuning)
        assert rel_err(out, reference(c)) < tol


def test_matches_core_attend_packed() -> None:
    """Against the core's pure-torch reference on a store built by the core's own pack()."""
    core_attention = pytest.importorskip("mdkv_compile.core.attention")
    core_packing = pytest.importorskip("mdkv_compile.core.packing")
    from mdkv_compile.kernels.store_attention import packed_store_attention

    gen = torch.Generator().manual_seed(3)
    B, H, G, N, d, tiers = 2, 2, 3, 48, 32, (32, 16, 8)
    key = torch.randn(B, H, N, d, generator=gen)
    value = torch.randn(B, H, N, d, generator=gen)
    bk = torch.linalg.qr(torch.randn(B * H, d, 16, generator=gen, dtype=torch.float64))[0].float()
    bv = torch.linalg.qr(torch.randn(B * H, d, 16, generator=gen, dtype=torch.float64))[0].float()
    kc = torch.einsum("bhnd,bhdr->bhnr", key, bk.view(B, H, d, 16))
    vc = torch.einsum("bhnd,bhdr->bhnr", value, bv.view(B, H, d, 16))
    choice = torch.tensor([0, *tiers])[torch.randint(0, 4, (B, H, N), generator=gen)]
    choice[0, 0] = 16  # one owner holds only 16-dim tokens: empty full and 8-dim slices for it
    store = core_packing.pack(key, value, choice, tiers, kc, vc, bk, bv)
    q = torch.randn(B, H * G, 1, d, generator=gen)
    k_new = torch.randn(B, H, 5, d, generator=gen)
    v_new = torch.randn(B, H, 5, d, generator=gen)
    ref = core_attention.attend_packed(q, store, k_new, v_new, scale=d**-0.5)
    out = packed_store_attention(q, store, k_new, v_new)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    # a uniform tier carries no offsets (offsets[t] is None in the core store)
    store_u = core_packing.pack(key, value, torch.full((B, H, N), 16), tiers, kc, vc, bk, bv)
    assert any(o is None for o in store_u.offsets)
    ref_u = core_attention.attend_packed(q, store_u, k_new, v_new, scale=d**-0.5)
    torch.testing.assert_close(packed_store_attention(q, store_u, k_new, v_new), ref_u, rtol=1e-4, atol=1e-5)


CHUNK_CASES = [
    # name, B, Hkv, G, d, tiers, max_count, L, n_new, n_cap, dtype, softcap, block_m
    ("fp32_L3", 2, 2, 3, 32, (32, 16, 8), 60, 3, 7, 9, torch.float32, None, 64),
    ("fp32_L8_two_row_blocks", 1, 2, 3, 32, (32, 16), 40, 8, 11, 12, torch.float32, None, 16),
    ("bf16_L5_all_new_softcap", 2, 1, 4, 64, (64, 32, 16, 8), 50, 5, 5, 6, torch.bfloat16, 25.0, 64),
]


@pytest.mark.parametrize("case", CHUNK_CASES, ids=[c[0] for c in CHUNK_CASES])
def test_chunk_matches_float64_reference(case: tuple) -> None:
    from mdkv_compile.kernels import store_attention as ta

    name, B, Hkv, G, d, tiers, max_count, L, n_new, n_cap, dtype, softcap, block_m = case
    gen = torch.Generator().manual_seed(abs(hash(name)) % 2**31)
    c = make_case(gen, B, Hkv, G, d, tiers, max_count, n_new, n_cap, dtype, L=L)
    out = torch.full((B, Hkv * G, L, d), float("nan"), dtype=dtype, device=DEVICE)
    packed_chunk_attention_triton(**c, softcap=softcap, out=out, poison_workspace=True,
                                  tuning=ta.Tuning(chunk_block_m=block_m))
    assert torch.isfinite(out).all()
    ref = reference(c, softcap)
    assert rel_err(out, ref) < (1e-5 if dtype == torch.float32 else 2e-2)
    fallback = ta.packed_attention_torch(**c, softcap=softcap, compute_dtype=torch.float64)
    assert rel_err(fallback, ref) < (1e-7 if dtype == torch.float32 else 1e-2)


def test_chunk_with_merge_for_loop_and_split_tier_matches_float64_reference() -> None:
    """The chunk launch with the longest tier in two slots and, on a GPU, the merge's for loop (the
    interpreter always takes the while loop)."""
    from mdkv_compile.kernels import store_attention as ta

    gen = torch.Generator().manual_seed(43)
    c = make_case(gen, 2, 2, 3, 32, (32, 16, 8), 60, 7, 9, torch.float32, L=3)
    out = torch.full((2, 6, 3, 32), float("nan"), dtype=torch.float32, device=DEVICE)
    packed_chunk_attention_triton(**c, out=out, poison_workspace=True,
                                  tuning=ta.Tuning(merge_for_loop=True, split_longest_tier=True, splits=2))
    assert rel_err(out, reference(c)) < 1e-5


def test_chunk_with_one_token_equals_decode() -> None:
    gen = torch.Generator().manual_seed(13)
    c = make_case(gen, 2, 2, 3, 32, (32, 16, 8), 50, 4, 6, torch.float32)
    torch.testing.assert_close(packed_chunk_attention(**c), packed_decode_attention(**c), rtol=1e-5, atol=1e-6)


def test_chunk_matches_core_attend_packed() -> None:
    core_attention = pytest.importorskip("mdkv_compile.core.attention")
    core_packing = pytest.importorskip("mdkv_compile.core.packing")
    from mdkv_compile.kernels.store_attention import StorePlan

    gen = torch.Generator().manual_seed(17)
    B, H, G, N, d, tiers, L, S = 1, 2, 2, 40, 32, (32, 16), 4, 6
    key = torch.randn(B, H, N, d, generator=gen)
    value = torch.randn(B, H, N, d, generator=gen)
    bk = torch.linalg.qr(torch.randn(B * H, d, 16, generator=gen, dtype=torch.float64))[0].float()
    bv = torch.linalg.qr(torch.randn(B * H, d, 16, generator=gen, dtype=torch.float64))[0].float()
    kc = torch.einsum("bhnd,bhdr->bhnr", key, bk.view(B, H, d, 16))
    vc = torch.einsum("bhnd,bhdr->bhnr", value, bv.view(B, H, d, 16))
    choice = torch.tensor([0, *tiers])[torch.randint(0, 3, (B, H, N), generator=gen)]
    store = core_packing.pack(key, value, choice, tiers, kc, vc, bk, bv)
    q = torch.randn(B, H * G, L, d, generator=gen)
    k_new = torch.randn(B, H, S, d, generator=gen)
    v_new = torch.randn(B, H, S, d, generator=gen)
    ref = core_attention.attend_packed(q, store, k_new, v_new, scale=d**-0.5)  # causal, queries = last L
    keys, vals, offs, obk, obv = StorePlan.for_store(store).tiers
    out = packed_chunk_attention(q, keys, vals, offs, obk, obv, k_new, v_new, S, d**-0.5)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)


def test_count_read_on_device_matches_host_count() -> None:
    """n_decoded (the decoded-token count on the device, as a CUDA graph replays it) gives the result of
    the host count; n_new then only sizes the splits (the region's capacity)."""
    gen = torch.Generator().manual_seed(13)
    c = make_case(gen, 2, 2, 3, 32, (32, 16), 40, 3, 6, torch.float32)
    ref = reference(c)
    n_decoded = torch.tensor([c["n_new"]], dtype=torch.long, device=DEVICE)
    args = {**c, "n_new": c["k_new"].shape[2]}
    out = packed_decode_attention_triton(**args, out=torch.full_like(c["q"], float("nan")), poison_workspace=True,
                                         n_decoded=n_decoded)
    assert rel_err(out, ref) < 1e-5
    assert rel_err(packed_decode_attention(**args, n_decoded=n_decoded), ref) < 1e-5  # through the op
    # the count is data: change it in place and the same arguments give the 5-token answer
    n_decoded.fill_(5)
    assert rel_err(packed_decode_attention_triton(**args, n_decoded=n_decoded), reference({**c, "n_new": 5})) < 1e-5


def test_argument_on_another_device_is_a_clear_error() -> None:
    gen = torch.Generator().manual_seed(3)
    c = make_case(gen, 1, 2, 2, 32, (32, 16), 20, 2, 4, torch.float32)
    c["q"] = c["q"].to("meta")
    with pytest.raises(ValueError, match="on cpu|on cuda"):
        packed_decode_attention_triton(**c)


def test_tuning_overrides_the_launch_and_keeps_results() -> None:
    """Sweep-style launch parameters (fixed split counts, row blocks, warps, stages) change the launch,
    not the answer; a fixed split count overrides the policy."""
    from mdkv_compile.kernels import store_attention as ta

    assert ta.num_splits(8, 5, 10_000, 132, ta.Tuning(splits=7)) == 7
    # The default policy gives the split counts the H200 sweep found best (8 / 2 / 1 at 128K x 8,
    # 32K x 32, 8K x 64: owners = B x 8 KV heads, 4 regions, rows per owner at budget 0.0625)...
    assert [ta.num_splits(own, 4, rows, 132) for own, rows in ((64, 30_508), (256, 7_660), (512, 1_932))] == [8, 2, 1]
    # ...is capped where a split would get fewer than min_rows_per_split rows per region, and at
    # max_splits (batch 1: the per-SM target alone would ask for ~60 splits).
    assert ta.num_splits(8, 5, 2_000, 132) == ta.num_splits(8, 5, 2_000, 132, ta.DEFAULT_TUNING) == 2_000 // 320
    assert ta.num_splits(8, 4, 30_508, 132) == ta.DEFAULT_TUNING.max_splits == 8
    # Chunks after a 32K prompt at batch 8 (64 owners; rows per block 32 for 16 tokens, 64 above): the
    # split counts measured fastest on an H100, 2 / 1 / 1 for 16 / 64 / 256 tokens, with 4 or 5 regions
    for regions in (4, 5):
        assert [ta.num_splits(64 * blocks, regions, 7_700, 132, chunk=True) for blocks in (2, 4, 16)] == [2, 1, 1]
    # ...where the decode target would give 4 / 2 / 1 (4 regions)
    assert [ta.num_splits(64 * blocks, 4, 7_700, 132) for blocks in (2, 4, 16)] == [4, 2, 1]
    # A cap per owner instead: one region (an evicted cache) gets 32 splits at batch 1, four get 8.
    per_owner = ta.Tuning(owner_programs=32)
    assert [ta.num_splits(8, regions, 131_072, 132, per_owner) for regions in (1, 2, 4, 5)] == [32, 16, 8, 6]
    gen = torch.Generator().manual_seed(19)
    c = make_case(gen, 2, 2, 3, 32, (32, 16, 8), 90, 4, 6, torch.float32)
    ref = reference(c)
    for tuning in (ta.Tuning(splits=1), ta.Tuning(splits=5, num_warps=8, num_stages=2),
                   ta.Tuning(block_n_full=32, block_n_reduced_max=64, num_stages=4),
                   ta.Tuning(block_n_full=128, block_n_reduced_max=256, decode_block_n_reduced_max=512, splits=2),
                   ta.Tuning(decode_max_registers=None, reverse_regions=False),
                   ta.Tuning(merge_unroll=4, splits=5), ta.Tuning(narrow_merge=False, merge_unroll=2),
                   ta.Tuning(split_longest_tier=True), ta.Tuning(split_longest_tier=True, splits=3),
                   ta.Tuning(merge_for_loop=True, merge_unroll=2, splits=5),
                   ta.Tuning(merge_for_loop=True, split_longest_tier=True)):
        out = torch.full_like(c["q"], float("nan"))
        packed_decode_attention_triton(**c, out=out, poison_workspace=True, tuning=tuning)
        assert rel_err(out, ref) < 1e-5, tuning
    # one query head per KV head: the merge holds one row, padded to 16 for the rotation back
    c = make_case(gen, 1, 3, 1, 32, (32, 16, 8), 70, 3, 4, torch.float32)
    for tuning in (ta.DEFAULT_TUNING, ta.Tuning(narrow_merge=False)):
        out = torch.full_like(c["q"], float("nan"))
        packed_decode_attention_triton(**c, out=out, poison_workspace=True, tuning=tuning)
        assert rel_err(out, reference(c)) < 1e-5, tuning


@pytest.mark.parametrize("max_new_tokens", [None, 16], ids=["growing_region", "fixed_region"])
def test_cache_chunk_kernel_path_matches_attend_packed(max_new_tokens: int | None) -> None:
    """MixedDimLayer's kernel path (`_attend_kernel`, what `attend` runs on CUDA) against its PyTorch
    path (`attend_packed`, what it runs on the CPU) over a compressed prompt: a chunk right after
    compression, a decode step, then a chunk after decoded tokens (causal offset n_new - L > 0); and
    which masks the kernels may serve."""
    from mdkv_compile.cache import MixedDimLayer
    from mdkv_compile.config import MixedDimKVConfig
    from mdkv_compile.core.attention import attend_packed

    gen = torch.Generator().manual_seed(23)
    B, H, G, N, d = 2, 2, 2, 128, 32

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen).to(DEVICE)

    # decoupled tiers, (d, d/2) keeping every key coordinate among them; at this prompt length the
    # prompt bases cost most of a 0.25 budget, so 0.5
    tiers = ((d, d // 2), (d // 2, d // 4), (d // 4, d // 8), (d // 8, d // 8))
    cfg = MixedDimKVConfig(budget=0.5, method="mixeddimkv", window=8, min_compress_tokens=0, tiers=tiers)
    layer = MixedDimLayer(cfg, 0, 1, cfg.resolve_dims(d), max_new_tokens=max_new_tokens)

    def near_rank3() -> torch.Tensor:  # so the policy stores tokens at reduced dimensions
        return randn(B, H, N, 3) @ randn(3, d) + 0.01 * randn(B, H, N, d)

    layer.update(near_rank3(), near_rank3())
    layer.attend(randn(B, H * G, N, d), None, None, None)  # prefill: compresses
    assert layer.store is not None and len(layer.store.tier_dims) > 1, "want reduced tiers in the store"
    assert (d, d // 2) in layer.store.tiers, "want a decoupled tier with every key coordinate"
    for L in (5, 1, 3):
        layer.update(randn(B, H, L, d), randn(B, H, L, d))
        q = randn(B, H * G, L, d)
        # the model's mask over prompt + new tokens ([B, 1, L, N + n_new]): causal for the new tokens
        mask = torch.ones(B, 1, L, N + layer.n_new, dtype=torch.bool, device=DEVICE)
        mask[..., N:] = torch.ones(layer.n_new, layer.n_new, dtype=torch.bool, device=DEVICE).tril()[-L:]
        assert layer._sees_new_causally(L, mask) and layer._sees_new_causally(L, None)
        hidden = mask.clone()
        hidden[..., -2 if L > 1 else -1] = False  # the last query no longer sees a token before it
        assert not layer._sees_new_causally(L, hidden)
        if L > 1:  # a query that sees a later new token: not causal
            assert not layer._sees_new_causally(L, torch.ones_like(mask))
        ref = attend_packed(q, layer.store, *layer.new_tokens(), None, d**-0.5)
        # attend: the PyTorch path on the CPU, the kernels on CUDA (the mask is causal)
        torch.testing.assert_close(layer.attend(q, mask, d**-0.5, None), ref, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(layer._attend_kernel(q, d**-0.5, None), ref, rtol=1e-4, atol=1e-5)
    # the layer's kept arrival counts served its decode launch and were left at zero
    assert layer.arrival_counts is not None and not layer.arrival_counts.any()


# --- decoupled tiers: a reduced tier keeps its keys and values at different widths -------------------


def random_tiers(gen: torch.Generator, d: int, n_red: int) -> tuple[tuple[int, int], ...]:
    """The full tier, then n_red (1..4) distinct random (key width, value width) pairs in random order:
    one keeps every key coordinate (rk = d), then one a value wider than its key, one a value narrower
    than its key, one anything. Widths are not powers of 2 in general (masked loads)."""

    def draw(lo: int, hi: int) -> int:  # uniform in lo..hi
        return int(torch.randint(lo, hi + 1, (1,), generator=gen))

    pairs = [(d, draw(1, d - 1))]
    while len(pairs) < n_red:
        if len(pairs) == 1:
            rk = draw(1, d - 1)
            pair = (rk, draw(rk + 1, d))
        elif len(pairs) == 2:
            rk = draw(2, d)
            pair = (rk, draw(1, rk - 1))
        else:
            pair = (draw(1, d), draw(1, d))
        if pair != (d, d) and pair not in pairs:
            pairs.append(pair)
    order = torch.randperm(len(pairs), generator=gen).tolist()
    return ((d, d), *(pairs[i] for i in order))


def test_random_tiers_cover_the_decoupled_cases() -> None:
    gen = torch.Generator().manual_seed(0)
    for _ in range(50):
        tiers = random_tiers(gen, 32, 4)
        assert tiers[0] == (32, 32) and len(set(tiers)) == 5
        assert any(rk == 32 for rk, _ in tiers[1:])
        assert any(rv < rk for rk, rv in tiers[1:]) and any(rv > rk for rk, rv in tiers[1:])


DECOUPLED_CASES = [
    # name, seed, B, Hkv, G, d, reduced tiers, max_count, n_new, n_cap, dtype, softcap
    ("fp32_d32_4", 1, 2, 2, 3, 32, 4, 70, 5, 8, torch.float32, None),
    ("fp32_d64_3_softcap", 2, 1, 2, 4, 64, 3, 90, 3, 4, torch.float32, 30.0),
    ("fp32_d32_1_wide_key", 3, 2, 1, 2, 32, 1, 60, 0, 2, torch.float32, None),
    ("bf16_d64_4", 4, 2, 2, 3, 64, 4, 80, 6, 8, torch.bfloat16, None),
    ("fp16_d32_2", 5, 1, 3, 2, 32, 2, 50, 4, 5, torch.float16, None),
]


@pytest.mark.parametrize("case", DECOUPLED_CASES, ids=[c[0] for c in DECOUPLED_CASES])
def test_decoupled_decode_and_chunk_match_float64_reference(case: tuple) -> None:
    """Random decoupled tier sets (a key of every coordinate, values narrower and wider than their keys)
    through the decode and chunk kernels with poisoned outputs and workspaces, and the pure-torch
    fallback, against the float64 reference."""
    name, seed, B, Hkv, G, d, n_red, max_count, n_new, n_cap, dtype, softcap = case
    gen = torch.Generator().manual_seed(seed)
    tiers = random_tiers(gen, d, n_red)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    c = make_case(gen, B, Hkv, G, d, tiers, max_count, n_new, n_cap, dtype)
    ref = reference(c, softcap)
    out = torch.full((B, Hkv * G, 1, d), float("nan"), dtype=dtype, device=DEVICE)
    packed_decode_attention_triton(**c, softcap=softcap, out=out, poison_workspace=True)
    assert torch.isfinite(out).all(), tiers
    assert rel_err(out, ref) < tol, tiers
    fallback = packed_attention_torch(**c, softcap=softcap, compute_dtype=torch.float64)
    assert rel_err(fallback, ref) < (1e-7 if dtype == torch.float32 else 1e-2), tiers
    L = 3
    c = make_case(gen, B, Hkv, G, d, tiers, max_count, n_new + L, n_cap + L, dtype, L=L)
    out = torch.full((B, Hkv * G, L, d), float("nan"), dtype=dtype, device=DEVICE)
    packed_chunk_attention_triton(**c, softcap=softcap, out=out, poison_workspace=True)
    assert torch.isfinite(out).all(), tiers
    assert rel_err(out, reference(c, softcap)) < tol, tiers


def _decoupled_core_store(gen: torch.Generator, B: int, H: int, N: int, d: int,
                          tiers: tuple[tuple[int, int], ...], dtype: torch.dtype):
    """A core PackedStore of random tokens, each in a random tier of `tiers` or evicted, packed by
    core.packing.pack with per-token value dims."""
    from mdkv_compile.core.packing import pack

    key = torch.randn(B, H, N, d, generator=gen, dtype=torch.float64)
    value = torch.randn(B, H, N, d, generator=gen, dtype=torch.float64)
    rk_max, rv_max = max(rk for rk, _ in tiers[1:]), max(rv for _, rv in tiers[1:])
    bk = torch.linalg.qr(torch.randn(B * H, d, d, generator=gen, dtype=torch.float64))[0][..., :rk_max]
    bv = torch.linalg.qr(torch.randn(B * H, d, d, generator=gen, dtype=torch.float64))[0][..., :rv_max]
    kc = torch.einsum("bhnd,bhdr->bhnr", key, bk.view(B, H, d, rk_max))
    vc = torch.einsum("bhnd,bhdr->bhnr", value, bv.view(B, H, d, rv_max))
    options = torch.tensor([(0, 0), *tiers])
    pick = options[torch.randint(0, len(options), (B, H, N), generator=gen)]
    pick[0, 0] = torch.tensor(tiers[-1])  # one owner holds a single reduced tier: empty slices elsewhere
    return pack(key.to(dtype), value.to(dtype), pick[..., 0], tuple(rk for rk, _ in tiers), kc.to(dtype), vc.to(dtype),
                bk.to(dtype), bv.to(dtype), value_dims=tuple(rv for _, rv in tiers), chosen_value_dim=pick[..., 1])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64_store", "float32_store"])
def test_decoupled_store_matches_core_attend_packed(dtype: torch.dtype) -> None:
    """A store packed by the core with decoupled tiers (the default ones, a set with (d, d/2) among
    them, and random ones) through `packed_store_attention` (the plan, the decode and the chunk kernels) against
    `core.attention.attend_packed`; a uniform tier (no offsets) included. The kernels take float32
    (float64 store: its float32 copy; attend_packed computes in float32 either way)."""
    from mdkv_compile.config import MixedDimKVConfig
    from mdkv_compile.core.attention import attend_packed
    from mdkv_compile.core.packing import pack
    from mdkv_compile.kernels.store_attention import StorePlan, packed_store_attention

    gen = torch.Generator().manual_seed(29)
    B, H, G, N, d, S = 2, 2, 2, 60, 32, 6
    default = ((d, d), *MixedDimKVConfig().resolve_tiers(d))
    assert any(rk != rv for rk, rv in default)
    whole_keys = ((d, d), (d, d // 2), (d // 2, d // 4), (d // 4, d // 8), (d // 8, d // 8))
    for tiers in (default, whole_keys, random_tiers(gen, d, 4), random_tiers(gen, d, 2)):
        store = _decoupled_core_store(gen, B, H, N, d, tiers, dtype)
        assert store.tiers == tiers
        q = torch.randn(B, H * G, 1, d, generator=gen, dtype=dtype)
        k_new = torch.randn(B, H, S, d, generator=gen, dtype=dtype)
        v_new = torch.randn(B, H, S, d, generator=gen, dtype=dtype)
        ref = attend_packed(q, store, k_new, v_new, scale=d**-0.5).double()
        if dtype == torch.float64:
            store = _moved(store, dtype=torch.float32)
            q, k_new, v_new = q.float(), k_new.float(), v_new.float()
        plan = StorePlan.for_store(store)
        assert [int(v.shape[1]) for v in plan.tier_values] == [rv for _, rv in tiers]
        out = packed_store_attention(q.to(DEVICE), _moved(store, device=DEVICE), k_new.to(DEVICE), v_new.to(DEVICE))
        torch.testing.assert_close(out.double().cpu(), ref, rtol=1e-4, atol=1e-5)
        qc = torch.randn(B, H * G, 4, d, generator=gen).to(q.dtype)
        ref_c = attend_packed(qc, store, k_new, v_new, scale=d**-0.5)  # causal, queries = last 4
        out_c = packed_store_attention(qc.to(DEVICE), _moved(store, device=DEVICE), k_new.to(DEVICE), v_new.to(DEVICE))
        torch.testing.assert_close(out_c.cpu(), ref_c, rtol=1e-4, atol=1e-5)
    # every token in the (d, d/2) tier: a uniform tier, offsets None
    key = torch.randn(1, H, N, d, generator=gen)
    value = torch.randn(1, H, N, d, generator=gen)
    bk = torch.linalg.qr(torch.randn(H, d, d, generator=gen))[0]
    bv = bk[..., : d // 2].contiguous()
    kc, vc = key @ bk.view(1, H, d, d), value @ bv.view(1, H, d, d // 2)
    store_u = pack(key, value, torch.full((1, H, N), d), (d, d), kc, vc, bk, bv, value_dims=(d, d // 2),
                   chosen_value_dim=torch.full((1, H, N), d // 2))
    assert store_u.offsets[1] is None and store_u.keys[0].shape[0] == 0
    q = torch.randn(1, H * G, 1, d, generator=gen)
    k_new, v_new = torch.randn(1, H, 2, d, generator=gen), torch.randn(1, H, 2, d, generator=gen)
    ref_u = attend_packed(q, store_u, k_new, v_new, scale=d**-0.5)
    out_u = packed_store_attention(q.to(DEVICE), _moved(store_u, device=DEVICE), k_new.to(DEVICE), v_new.to(DEVICE))
    torch.testing.assert_close(out_u.cpu(), ref_u, rtol=1e-4, atol=1e-5)


def _moved(store, **to: object):
    """The store with every tensor's floating data moved by `Tensor.to(**to)` (device, dtype)."""
    import dataclasses

    def move(t: torch.Tensor | None) -> torch.Tensor | None:
        if t is None:
            return None
        return t.to(**to) if t.is_floating_point() else t.to(device=to.get("device", t.device))

    return dataclasses.replace(store, keys=[move(k) for k in store.keys], values=[move(v) for v in store.values],
                               offsets=[move(o) for o in store.offsets], basis_k=move(store.basis_k),
                               basis_v=move(store.basis_v))


def test_decoupled_fixed_region_reads_the_count_on_the_device() -> None:
    """A decoupled store with the fixed decode region: n_decoded on the device, n_new the capacity."""
    gen = torch.Generator().manual_seed(31)
    tiers = random_tiers(gen, 32, 4)
    c = make_case(gen, 2, 2, 3, 32, tiers, 40, 3, 6, torch.float32)
    n_decoded = torch.tensor([c["n_new"]], dtype=torch.long, device=DEVICE)
    args = {**c, "n_new": c["k_new"].shape[2]}
    out = packed_decode_attention_triton(**args, out=torch.full_like(c["q"], float("nan")), poison_workspace=True,
                                         n_decoded=n_decoded)
    assert rel_err(out, reference(c)) < 1e-5, tiers
    assert rel_err(packed_decode_attention(**args, n_decoded=n_decoded), reference(c)) < 1e-5  # through the op
    n_decoded.fill_(6)
    assert rel_err(packed_decode_attention(**args, n_decoded=n_decoded), reference({**c, "n_new": 6})) < 1e-5


def test_plan_constexprs_of_coupled_and_decoupled_tiers() -> None:
    """Coupled tiers give value slots equal to their key slots (so the kernel's value loads reuse the key
    offsets, as before decoupling); decoupled ones get their own widths, and the merge's coefficient
    vector is as wide as the widest value."""
    from mdkv_compile.kernels.store_attention import StorePlan, Tuning

    gen = torch.Generator().manual_seed(37)
    c = make_case(gen, 1, 2, 2, 64, (64, 32, 16, 8), 10, 1, 2, torch.float32)
    plan = StorePlan.from_tiers(c["tier_keys"], c["tier_values"], c["tier_offsets"], c["basis_k"], c["basis_v"])
    cx = plan.tier_constexprs
    assert all(cx[f"R{t}"] == cx[f"RV{t}"] and cx[f"BR{t}"] == cx[f"BRV{t}"] for t in range(1, 5))
    assert plan.rv_max_padded == 32
    decode, chunk = plan.decode_split(2, 1, 1, c["q"].device), plan.chunk_split(2, 8, 8, c["q"].device)
    assert [plan.reduced_block_rows(split)[f"BN{t}"] for split in (decode, chunk) for t in range(1, 4)] == [128] * 6
    # ~16 KiB of the wider side per block (bf16) under each launch's cap: decode's cap applies to decode alone
    wide = StorePlan.from_tiers(c["tier_keys"], c["tier_values"], c["tier_offsets"], c["basis_k"], c["basis_v"],
                                Tuning(decode_block_n_reduced_max=512))
    assert [wide.reduced_block_rows(decode)[f"BN{t}"] for t in range(1, 4)] == [256, 512, 512]
    assert [wide.reduced_block_rows(chunk)[f"BN{t}"] for t in range(1, 4)] == [128, 128, 128]
    c = make_case(gen, 1, 2, 2, 64, ((64, 64), (64, 32), (32, 16), (8, 8)), 10, 1, 2, torch.float32)
    plan = StorePlan.from_tiers(c["tier_keys"], c["tier_values"], c["tier_offsets"], c["basis_k"], c["basis_v"])
    cx = plan.tier_constexprs
    assert [cx[f"R{t}"] for t in range(1, 4)] == [64, 32, 8] and [cx[f"RV{t}"] for t in range(1, 4)] == [32, 16, 8]
    assert plan.rv_max == 32 and plan.rv_max_padded == 32
    assert plan.bases[0] is plan.basis_k and plan.bases[3] is plan.basis_v
    with pytest.raises(ValueError, match="columns"):
        StorePlan.from_tiers(c["tier_keys"], c["tier_values"], c["tier_offsets"], c["basis_k"],
                             c["basis_v"][..., :16])


def test_longest_tier_split_into_two_slots() -> None:
    """split_longest_tier reads the reduced tier of the most rows through two slots, each half of every
    owner's rows, where a slot is free; with every slot taken the plan is the default's. The results of
    both launches: test_tuning_overrides_the_launch_and_keeps_results."""
    from mdkv_compile.kernels.store_attention import StorePlan, Tuning

    gen = torch.Generator().manual_seed(41)
    counts = [[5, 7], [9, 3], [30, 20], [4, 4]]  # tier 2 (16 dims) holds the most rows
    c = make_case(gen, 1, 2, 2, 64, (64, 32, 16, 8), 0, 1, 2, torch.float32, counts=counts)
    args = (c["tier_keys"], c["tier_values"], c["tier_offsets"], c["basis_k"], c["basis_v"])
    plain, split = StorePlan.from_tiers(*args), StorePlan.from_tiers(*args, Tuning(split_longest_tier=True))
    assert (plain.n_reduced, split.n_reduced) == (3, 4)
    cx = split.tier_constexprs
    assert [cx[f"R{t}"] for t in range(1, 5)] == [32, 16, 8, 16]
    assert [(cx[f"PART{t}"], cx[f"PARTS{t}"]) for t in range(1, 5)] == [(0, 1), (0, 2), (0, 1), (1, 2)]
    # slot 4 reads tier 2's keys, values and offsets
    assert all(a is b for a, b in zip(split.tier_pointers[12:15], split.tier_pointers[6:9], strict=True))
    assert split.stored_rows == plain.stored_rows and split.rv_max == plain.rv_max
    c = make_case(gen, 1, 2, 2, 64, (64, 32, 16, 8, 4), 6, 1, 2, torch.float32)
    full = StorePlan.from_tiers(c["tier_keys"], c["tier_values"], c["tier_offsets"], c["basis_k"], c["basis_v"],
                                Tuning(split_longest_tier=True))
    assert full.n_reduced == 4 and all(full.tier_constexprs[f"PARTS{t}"] == 1 for t in range(1, 5))
