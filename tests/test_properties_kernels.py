"""Property-based tests (hypothesis) of the packed-store attention kernels against the PyTorch
reference (`core.attention.attend_packed`): random stores (tier sets, per-owner counts, empty
owners), GQA ratios, head dimensions, dtypes, decoded tokens and chunk lengths. The kernels run
on a GPU where there is one and in Triton's CPU interpreter elsewhere (TRITON_INTERPRET=1, slow:
few examples). The hypothesis profile is conftest.py's."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from triton_harness import interpreter_guard, kernel_device

DEVICE = kernel_device()  # skips the module where the kernels cannot run

from mdkv_compile.core.attention import attend_packed  # noqa: E402
from mdkv_compile.core.packing import PackedStore, pack  # noqa: E402
from mdkv_compile.kernels import store_attention  # noqa: E402
from mdkv_compile.kernels.store_attention import packed_store_attention  # noqa: E402

STALE, _needs_interpreter, test_module_in_fresh_process = interpreter_guard(
    __file__, lambda: [store_attention.jit._packed_attention]
)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
# Examples per test: each one runs the interpreter over a whole store on the CPU.
EXAMPLES = 20 if DEVICE == "cpu" else 100


@st.composite
def stores(draw: st.DrawFn) -> dict:
    d = draw(st.sampled_from([16, 32, 64]))
    reduced = draw(st.sets(st.sampled_from([d // 2, d // 4, d // 8]), max_size=3))
    return {
        "bsz": draw(st.integers(1, 2)), "kv_heads": draw(st.integers(1, 3)), "group": draw(st.sampled_from([1, 2, 4])),
        "head_dim": d, "tiers": (d, *sorted(reduced, reverse=True)), "n_tokens": draw(st.integers(1, 80)),
        "keep": draw(st.floats(0.0, 1.0)),  # the share of prompt tokens stored at all
        "n_new": draw(st.integers(0, 6)), "chunk": draw(st.sampled_from([1, 1, 3])),
        "softcap": draw(st.sampled_from([None, 20.0])), "dtype": draw(st.sampled_from(list(DTYPES))),
        "seed": draw(st.integers(0, 2**16)),
    }


def build(case: dict) -> tuple[PackedStore, torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """The store, the queries and the decoded tokens (a region with 2 spare slots) on DEVICE."""
    gen = torch.Generator().manual_seed(case["seed"])
    b, h, g, d, n = case["bsz"], case["kv_heads"], case["group"], case["head_dim"], case["n_tokens"]
    dtype = DTYPES[case["dtype"]]
    tiers = case["tiers"]
    options = torch.tensor(tiers)
    chosen = options[torch.randint(0, len(tiers), (b, h, n), generator=gen)]
    chosen = chosen.masked_fill(torch.rand(b, h, n, generator=gen) >= case["keep"], 0)
    key, value = torch.randn(b, h, n, d, generator=gen).to(dtype), torch.randn(b, h, n, d, generator=gen).to(dtype)
    if len(tiers) > 1:
        r_max = tiers[1]
        bk = torch.linalg.qr(torch.randn(b * h, d, d, generator=gen))[0][..., :r_max]
        bv = torch.linalg.qr(torch.randn(b * h, d, d, generator=gen))[0][..., :r_max]
        store = pack(key, value, chosen, tiers, key.float() @ bk.view(b, h, d, r_max),
                     value.float() @ bv.view(b, h, d, r_max), bk, bv)
    else:
        store = pack(key, value, chosen, tiers)
    store = PackedStore(
        store.tier_dims, [t.to(DEVICE) for t in store.keys], [t.to(DEVICE) for t in store.values],
        [None if t is None else t.to(DEVICE) for t in store.offsets],
        *(None if t is None else t.to(DEVICE) for t in (store.basis_k, store.basis_v, store.basis_index)),
        store.basis_shared, store.batch, store.kv_heads, store.head_dim,
    )
    n_new = max(case["n_new"], case["chunk"]) if case["chunk"] > 1 else case["n_new"]
    k_region = torch.randn(b, h, n_new + 2, d, generator=gen).to(dtype).to(DEVICE)
    v_region = torch.randn(b, h, n_new + 2, d, generator=gen).to(dtype).to(DEVICE)
    q = torch.randn(b, h * g, case["chunk"], d, generator=gen).to(dtype).to(DEVICE)
    return store, q, k_region, v_region, n_new


@settings(max_examples=EXAMPLES)
@given(stores())
def test_kernels_equal_attend_packed(case: dict) -> None:
    store, q, k_region, v_region, n_new = build(case)
    if store.num_tokens() == 0 and n_new == 0:
        return  # attention over an empty cache: an error in the reference, zeros in the kernel
    scale = case["head_dim"] ** -0.5
    out = packed_store_attention(q, store, k_region, v_region, n_new, scale, case["softcap"])
    ref = attend_packed(q, store, k_region[:, :, :n_new], v_region[:, :, :n_new], None, scale, case["softcap"])
    tol = 1e-4 if q.dtype == torch.float32 else 3e-2
    torch.testing.assert_close(out.float(), ref.float(), atol=tol, rtol=tol)
