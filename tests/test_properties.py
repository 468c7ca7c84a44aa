"""Property-based tests (hypothesis) of the core and the policies against their references, over
random shapes, GQA ratios, head dimensions, dtypes, padding patterns, budgets and tier sets.

Invariants: packed attention = attention over the reconstructed keys and values; budget 1.0 =
full attention; what a policy stores stays within the budget (or the window-and-sinks floor);
padding is never stored and forced tokens are kept whole; keep/evict MixedDimKV = SnapKV (and,
pooled over the layer, Ada-SnapKV); the greedy knapsack never overspends and stays within one
token's loss of the exact optimum.

The hypothesis profile is conftest.py's: derandomized (the same examples every run), no
deadline, a fixed number of examples per test (`pytest --hypothesis-show-statistics` shows them);
HYPOTHESIS_PROFILE=mdkv-explore searches longer, at random.
"""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mdkv_compile.config import MixedDimKVConfig
from mdkv_compile.core.allocation import allocate_exact, allocate_greedy, total_loss
from mdkv_compile.core.attention import attend_packed, causal_mask, dense_attention
from mdkv_compile.core.packing import PackedStore, pack, reconstruct
from mdkv_compile.methods import RECORDS
from mdkv_compile.policies import POLICIES, LayerContext
from mdkv_compile.policies.base import bookkeeping_units, pyramid_factor

# Methods that need no head-score file, from the registry: a new method is in these tests by itself.
METHODS = [name for name, m in RECORDS.items() if not m.needs_head_scores]
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def _tensor(gen: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=gen)


# --- strategies ----------------------------------------------------------------------------------


@st.composite
def shapes(draw: st.DrawFn, max_tokens: int = 96) -> dict:
    """Batch, KV heads, GQA group, head dim, tokens, left padding per row, dtype and a seed."""
    bsz = draw(st.integers(1, 3))
    n_tokens = draw(st.integers(1, max_tokens))
    return {
        "bsz": bsz,
        "kv_heads": draw(st.integers(1, 3)),
        "group": draw(st.sampled_from([1, 2, 4])),
        "head_dim": draw(st.sampled_from([8, 16, 32])),
        "n_tokens": n_tokens,
        # valid tokens per row (left padding); at least one row without padding, as a batch has
        "n_valid": [n_tokens] + [draw(st.integers(1, n_tokens)) for _ in range(bsz - 1)],
        "dtype": draw(st.sampled_from(list(DTYPES))),
        "seed": draw(st.integers(0, 2**16)),
    }


def tier_sets(head_dim: int) -> st.SearchStrategy[tuple[int, ...]]:
    """Candidate dims: 0, the head dim, and any reduced dims in between."""
    return st.sets(st.integers(1, head_dim - 1), max_size=4).map(lambda s: (0, *sorted(s), head_dim))


def make_ctx(shape: dict, cfg: MixedDimKVConfig, layer_idx: int = 0, num_layers: int = 1) -> LayerContext:
    gen = torch.Generator().manual_seed(shape["seed"])
    b, h, g, d, n = shape["bsz"], shape["kv_heads"], shape["group"], shape["head_dim"], shape["n_tokens"]
    dtype = DTYPES[shape["dtype"]]
    # keys and values near a low-rank subspace (as real ones are), so reduced tiers get chosen
    low = max(1, d // 4)
    key = _tensor(gen, b, h, n, low) @ _tensor(gen, low, d) + 0.1 * _tensor(gen, b, h, n, d)
    value = _tensor(gen, b, h, n, low) @ _tensor(gen, low, d) + 0.1 * _tensor(gen, b, h, n, d)
    valid = torch.arange(n)[None, :] >= (n - torch.tensor(shape["n_valid"]))[:, None]
    return LayerContext(
        query=_tensor(gen, b, h * g, n, d).to(dtype), key=key.to(dtype), value=value.to(dtype), valid=valid,
        layer_idx=layer_idx, num_layers=num_layers, cfg=cfg, dims=cfg.resolve_dims(d),
        all_valid=bool(valid.all()),
    )


def store_of(ctx: LayerContext, method: str) -> tuple[torch.Tensor, PackedStore]:
    sel = POLICIES[method](ctx)
    return sel.chosen_dim, pack(ctx.key, ctx.value, sel.chosen_dim, sel.tier_dims, sel.key_coef, sel.value_coef,
                                sel.basis_k, sel.basis_v, sel.basis_index, sel.basis_shared)


def reference_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, visible: torch.Tensor,
                        scale: float, softcap: float | None) -> torch.Tensor:
    """float64 softmax attention per owner. q [owners, G, L, d]; keys/values [owners, S, d];
    visible [owners, L, S]. A query that sees nothing gets zeros (the kernels' convention)."""
    logits = (q.double() @ keys.double().transpose(-1, -2)[:, None]) * scale
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    logits = logits.masked_fill(~visible[:, None], float("-inf"))
    return torch.softmax(logits, -1).nan_to_num(0.0) @ values.double()[:, None]


# --- core: packed attention ------------------------------------------------------------------------


@st.composite
def packed_cases(draw: st.DrawFn) -> dict:
    shape = draw(shapes(max_tokens=48))
    dims = draw(tier_sets(shape["head_dim"]))
    return {**shape, "dims": dims, "n_new": draw(st.integers(0, 5)), "n_queries": draw(st.integers(1, 3)),
            "softcap": draw(st.sampled_from([None, 5.0]))}


def random_store(case: dict) -> tuple[PackedStore, torch.Tensor]:
    """A store of random tier choices (0 = dropped) in random per-owner bases, and the query."""
    gen = torch.Generator().manual_seed(case["seed"])
    b, h, g, d, n = case["bsz"], case["kv_heads"], case["group"], case["head_dim"], case["n_tokens"]
    dtype = DTYPES[case["dtype"]]
    dims = torch.tensor(case["dims"])
    chosen = dims[torch.randint(0, len(dims), (b, h, n), generator=gen)]
    reduced = [r for r in case["dims"] if 0 < r < d]
    key, value = _tensor(gen, b, h, n, d).to(dtype), _tensor(gen, b, h, n, d).to(dtype)
    tiers = (d, *sorted(reduced, reverse=True))
    if not reduced:
        return pack(key, value, chosen, tiers), _tensor(gen, b, h * g, case["n_queries"], d).to(dtype)
    r_max = max(reduced)
    basis_k = torch.linalg.qr(_tensor(gen, b * h, d, d))[0][..., :r_max]
    basis_v = torch.linalg.qr(_tensor(gen, b * h, d, d))[0][..., :r_max]
    key_coef = key.float() @ basis_k.view(b, h, d, r_max)
    value_coef = value.float() @ basis_v.view(b, h, d, r_max)
    store = pack(key, value, chosen, tiers, key_coef, value_coef, basis_k, basis_v)
    return store, _tensor(gen, b, h * g, case["n_queries"], d).to(dtype)


@settings(max_examples=60)
@given(packed_cases())
def test_packed_attention_equals_attention_over_reconstructed_keys(case: dict) -> None:
    store, q = random_store(case)
    gen = torch.Generator().manual_seed(case["seed"] + 1)
    b, h, d, L = case["bsz"], case["kv_heads"], case["head_dim"], case["n_queries"]
    n_new = max(case["n_new"], L - 1)  # the queries are the last L of the new tokens (or follow the prompt)
    k_new = _tensor(gen, b, h, n_new, d).to(q.dtype)
    v_new = _tensor(gen, b, h, n_new, d).to(q.dtype)
    if store.num_tokens() == 0 and n_new == 0:
        return  # attention over an empty cache is an error, tested elsewhere
    if n_new < L:  # queries without new tokens of their own: all L see the store only
        q = q[:, :, : max(n_new, 1)]
        L = q.shape[2]
    scale = d**-0.5
    out = attend_packed(q, store, k_new, v_new, None, scale, case["softcap"])
    k_rec, v_rec, valid = reconstruct(store)
    owners = b * h
    keys = torch.cat([k_rec.double(), k_new.double().reshape(owners, n_new, d)], 1)
    values = torch.cat([v_rec.double(), v_new.double().reshape(owners, n_new, d)], 1)
    visible = torch.cat([valid[:, None, :].expand(owners, L, -1), causal_mask(L, n_new, q.device)[None].expand(
        owners, -1, -1)], -1) if n_new else valid[:, None, :].expand(owners, L, -1)
    ref = reference_attention(q.reshape(owners, -1, L, d), keys, values, visible, scale, case["softcap"])
    tol = 2e-5 if q.dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out.double().reshape(ref.shape), ref, atol=tol, rtol=tol)


@settings(max_examples=30)
@given(shapes(), st.sampled_from(METHODS))
def test_budget_one_is_full_attention(shape: dict, method: str) -> None:
    ctx = make_ctx(shape, MixedDimKVConfig(budget=1.0, method=method, window=4))
    chosen, store = store_of(ctx, method)
    assert torch.equal(chosen, torch.where(ctx.valid[:, None, :], ctx.head_dim, 0).expand_as(chosen))
    gen = torch.Generator().manual_seed(shape["seed"] + 2)
    q = _tensor(gen, shape["bsz"], ctx.query.shape[1], 1, ctx.head_dim).to(ctx.key.dtype)
    out = attend_packed(q, store, None, None)
    mask = ctx.valid[:, None, None, :]  # one query after the prompt sees every valid prompt token
    ref = dense_attention(q.double(), ctx.key.double(), ctx.value.double(), mask)
    tol = 2e-5 if q.dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out.double(), ref, atol=tol, rtol=tol)


# --- policies: budgets and invariants ------------------------------------------------------------


@st.composite
def policy_cases(draw: st.DrawFn) -> tuple[dict, MixedDimKVConfig, int, int]:
    shape = draw(shapes())
    method = draw(st.sampled_from(METHODS))
    num_layers = draw(st.integers(1, 4))
    cfg = MixedDimKVConfig(
        budget=draw(st.floats(0.01, 1.0)), method=method, window=draw(st.integers(1, 12)),
        sink_tokens=draw(st.sampled_from([None, 0, 1, 3])), min_compress_tokens=draw(st.sampled_from([0, 0, 16])),
        dims=draw(tier_sets(shape["head_dim"])), pool=draw(st.sampled_from(["head", "layer"])),
        loss=draw(st.sampled_from(["attention", "energy"])), pool_kernel=draw(st.sampled_from([1, 3, 7])),
    )
    return shape, cfg, draw(st.integers(0, num_layers - 1)), num_layers


def row_bound_units(cfg: MixedDimKVConfig, n_valid: int, head_dim: int, itemsize: int, layer_idx: int,
                    num_layers: int) -> float:
    """Units one owner of a row may hold: everything for a row kept whole, else its budget (the
    pyramid's share of the layer) or the window and sinks whole with one tier's bookkeeping."""
    if n_valid <= max(cfg.min_compress_tokens, cfg.window + cfg.sinks) or cfg.budget >= 1.0 or cfg.method == "full":
        return n_valid * head_dim
    units = cfg.budget * n_valid * head_dim
    if RECORDS[cfg.method].budget_schedule == "pyramid":
        units *= pyramid_factor(layer_idx, num_layers, cfg.pyramid_beta)
    return max(units, min(n_valid, cfg.window + cfg.sinks) * head_dim + bookkeeping_units(1, itemsize))


@settings(max_examples=120)
@given(policy_cases())
def test_policy_stores_within_the_bound_keeps_forced_tokens_and_drops_padding(case) -> None:
    shape, cfg, layer_idx, num_layers = case
    ctx = make_ctx(shape, cfg, layer_idx, num_layers)
    chosen, store = store_of(ctx, cfg.method)
    d, itemsize, heads = ctx.head_dim, ctx.key.element_size(), shape["kv_heads"]
    assert not bool(chosen.masked_select(~ctx.valid[:, None, :]).any()), "padding stored"
    if cfg.method != "lowrank":  # lowrank picks its one rank from the budget (or lowrank_dim), not from dims
        assert set(chosen.unique().tolist()) <= set(ctx.dims)
    # Data (keys, values, prompt bases) within the bound; the CSR offsets and the basis index are
    # bookkeeping, reserved inside the budget of compressed rows and on top for rows kept whole.
    bookkeeping = sum(t.numel() * t.element_size() for t in [*store.offsets, store.basis_index] if t is not None)
    data = store.stored_bytes() - bookkeeping
    bound = 2 * itemsize * heads * sum(row_bound_units(cfg, n, d, itemsize, layer_idx, num_layers)
                                       for n in shape["n_valid"])
    # Known limit: lowrank gives each row its own rank but stores every row's basis at the batch's
    # largest (one basis width per store), so rows of different lengths can overspend by
    # head_dim x (that rank - their own) units per KV head.
    if cfg.method != "lowrank" or len(set(shape["n_valid"])) == 1:
        assert data <= bound + 1e-6, (data, bound)
    assert bookkeeping <= (len(store.tier_dims) + 1) * (shape["bsz"] * heads + 1) * 4
    kept_rows = [n <= max(cfg.min_compress_tokens, cfg.window + cfg.sinks) for n in shape["n_valid"]]
    if cfg.method != "lowrank":  # lowrank stores every token at one rank by definition
        forced = ctx.forced()
        for row, kept in enumerate(kept_rows):  # kept: not compressed at all
            want = ctx.valid[row] if kept else forced[row]
            assert bool((chosen[row][:, want] == d).all()), ("forced token not whole", row)


@settings(max_examples=60)
@given(shapes(), st.floats(0.01, 0.9), st.integers(1, 12), st.sampled_from(["head", "layer"]))
def test_keep_evict_mixeddimkv_selects_what_snapkv_selects(shape: dict, budget: float, window: int,
                                                            pool: str) -> None:
    d = shape["head_dim"]
    common = {"budget": budget, "window": window, "min_compress_tokens": 0, "sink_tokens": 0}
    reference = "snapkv" if pool == "head" else "ada-snapkv"
    snap = store_of(make_ctx(shape, MixedDimKVConfig(method=reference, **common)), reference)[0]
    mixed_cfg = MixedDimKVConfig(method="mixeddimkv", dims=(0, d), pool=pool, **common)
    mixed = store_of(make_ctx(shape, mixed_cfg), "mixeddimkv")[0]
    assert torch.equal(snap, mixed)


# --- core: allocation ------------------------------------------------------------------------------


@st.composite
def knapsacks(draw: st.DrawFn) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    groups, tokens = draw(st.integers(1, 3)), draw(st.integers(1, 6))
    costs = sorted(draw(st.sets(st.integers(1, 12), min_size=1, max_size=4)))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    steps = torch.rand(groups, tokens, len(costs), generator=gen, dtype=torch.float64)
    losses = torch.cat([torch.flip(torch.cumsum(torch.flip(steps, [-1]), -1), [-1]),
                        torch.zeros(groups, tokens, 1, dtype=torch.float64)], -1)
    budget = torch.tensor([draw(st.integers(0, costs[-1] * tokens)) for _ in range(groups)])
    return losses, torch.tensor([0, *costs]), budget


@settings(max_examples=60)
@given(knapsacks())
def test_greedy_allocation_never_overspends_and_is_within_one_token_of_exact(case) -> None:
    losses, costs, budget = case
    greedy, exact = allocate_greedy(losses, costs, budget), allocate_exact(losses, costs, budget)
    assert bool((costs[greedy].sum(-1) <= budget).all()) and bool((costs[exact].sum(-1) <= budget).all())
    got, best = total_loss(losses, greedy), total_loss(losses, exact)
    assert bool((got >= best - 1e-9).all())
    assert bool((got <= best + losses[..., 0].amax(-1) + 1e-9).all())
    if len(costs) == 2:  # keep/evict: greedy is exact (top-k)
        torch.testing.assert_close(got, best)
