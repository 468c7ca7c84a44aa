"""The `mixeddimkv` torch.compile backend and the mdkv custom ops, with real Inductor on CPU.

Compiles are slow on CPU (~15 s per graph of a 2-layer model), so each test compiles one model
and checks several things on it.
"""

from __future__ import annotations

import torch
from torch._dynamo.utils import counters
from transformers import DynamicCache

import mdkv_compile as mdkv
from mdkv_compile.backends import compile as backend
from mdkv_compile.cache import MixedDimCache
from mdkv_compile.core.attention import attend_packed
from mdkv_compile.core.packing import pack
from mdkv_compile.ops import library
from mdkv_compile.passes.explain import build_tiny_model
from mdkv_compile.policies import POLICIES, LayerContext

OPTS = {"budget": 0.25, "window": 4}
IDS = torch.randint(1, 128, (1, 40), generator=torch.Generator().manual_seed(1))


def decode_loop(model, cache, steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy tokens of a manual prefill + decode loop, and the last step's logits."""
    with torch.no_grad():
        logits = model(input_ids=IDS, past_key_values=cache, use_cache=True).logits[:, -1]
        tokens = []
        for _ in range(steps):
            tokens.append(logits.argmax(-1, keepdim=True))
            logits = model(input_ids=tokens[-1], past_key_values=cache, use_cache=True).logits[:, -1]
    return torch.cat(tokens, 1), logits


def eager_reference(opts: dict, steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    model = build_tiny_model("llama").eval()
    cfg = mdkv.MixedDimKVConfig(**opts)
    mdkv.patch(model, cfg)
    return decode_loop(model, MixedDimCache(model.config, cfg), steps)


def test_static_ops_match_packed_reference_and_fakes() -> None:
    torch.manual_seed(0)
    q, k, v = torch.randn(1, 4, 24, 16), torch.randn(1, 2, 24, 16), torch.randn(1, 2, 24, 16)
    valid = torch.ones(1, 24, dtype=torch.bool)
    cfg = mdkv.MixedDimKVConfig(**OPTS)
    capacity = library.static_capacity(cfg, 24, 16)
    assert capacity < 24 * 16
    args = (q, k, v, valid, library.cfg_to_json(cfg), 0, 2, None, capacity)
    store = torch.ops.mdkv.compress_static(*args)
    tiers = library.static_tiers(cfg, 16)
    assert store[2].shape == (2, len(tiers)) and store[0].shape == (2, capacity)

    # Reference: the same policy packed into the variable-shape store, attended by attend_packed.
    ctx = LayerContext(query=q, key=k, value=v, valid=valid, layer_idx=0, num_layers=2, cfg=cfg,
                       dims=cfg.resolve_dims(16))
    sel = POLICIES[cfg.method](ctx)
    packed = pack(k, v, sel.chosen_dim, sel.tier_dims, sel.key_coef, sel.value_coef,
                  sel.basis_k, sel.basis_v, sel.basis_index, sel.basis_shared)
    k_step, v_step, q_step = torch.randn(1, 2, 1, 16), torch.randn(1, 2, 1, 16), torch.randn(1, 4, 1, 16)
    region = torch.zeros(1, 2, 8, 16)
    n0 = torch.tensor(0)
    key_new, value_new, n1 = torch.ops.mdkv.append_static(region, region.clone(), n0, k_step, v_step)
    assert int(n1) == 1
    out = torch.ops.mdkv.attend_static(q_step, *store, key_new, value_new, n1, list(tiers), None)
    ref = attend_packed(q_step, packed, k_step, v_step)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)

    # Fake impls agree with the real ones (shapes, dtypes, strides) and the ops trace in one graph.
    torch.library.opcheck(torch.ops.mdkv.compress_static.default, args, test_utils=("test_faketensor",))
    torch.library.opcheck(torch.ops.mdkv.attend_static.default,
                          (q_step, *store, key_new, value_new, n1, list(tiers), None),
                          test_utils=("test_faketensor",))

    def step(query, keys, values, counts, bk, bv, kn, vn, n, key, value):
        kn, vn, n = torch.ops.mdkv.append_static(kn, vn, n, key, value)
        return torch.ops.mdkv.attend_static(query, keys, values, counts, bk, bv, kn, vn, n, list(tiers), None)

    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    got = compiled(q_step, *store, region, region.clone(), n0, k_step, v_step)
    torch.testing.assert_close(got, out)


def test_torch_compile_manual_loop_matches_eager_and_budget_one_matches_plain() -> None:
    torch._dynamo.reset()
    steps = 10
    model = build_tiny_model("llama").eval()
    plain, plain_logits = decode_loop(model, DynamicCache(config=model.config), steps)

    counters.clear()
    compiled = torch.compile(model, backend="mixeddimkv", options=OPTS)
    tokens, logits = decode_loop(compiled, DynamicCache(config=model.config), steps)
    ref, ref_logits = eager_reference(OPTS, steps)
    assert torch.equal(tokens, ref)
    torch.testing.assert_close(logits, ref_logits, atol=1e-4, rtol=1e-4)
    assert not torch.equal(tokens, plain)  # budget 0.25 really compresses
    # Prefill, first decode step, then one dynamic-length decode graph: bounded recompiles.
    assert counters["stats"]["unique_graphs"] <= 3
    assert sum(counters["graph_break"].values()) == 0
    report = backend.LAST_REPORTS[-1]
    assert len(report.rewritten) == 2 and not report.left

    full = torch.compile(model, backend="mixeddimkv", options={"budget": 1.0})
    tokens, logits = decode_loop(full, DynamicCache(config=model.config), steps)
    assert torch.equal(tokens, plain)
    torch.testing.assert_close(logits, plain_logits, atol=1e-4, rtol=1e-4)


def test_model_compile_generate_matches_eager_reference() -> None:
    torch._dynamo.reset()
    kw = {"max_new_tokens": 8, "do_sample": False, "pad_token_id": 0}
    ref_model = build_tiny_model("llama").eval()
    mdkv.patch(ref_model, mdkv.MixedDimKVConfig(**OPTS))
    ref = ref_model.generate(IDS, **kw)

    model = build_tiny_model("llama").eval()
    model.compile(backend="mixeddimkv", options=OPTS)
    counters.clear()
    first = model.generate(IDS, **kw)
    again = model.generate(IDS, **kw)  # a new prompt resets every site's compressed state
    assert torch.equal(first, ref) and torch.equal(again, ref)
    assert sum(counters["graph_break"].values()) == 0
    assert counters["stats"]["unique_graphs"] <= 3

    # Left-padded batch: padding reaches the compression through the mask the site op gets.
    ids = torch.cat([IDS, IDS.roll(3, dims=1)])
    mask = torch.ones_like(ids)
    ids[1, :7], mask[1, :7] = 0, 0
    ref = ref_model.generate(ids, attention_mask=mask, **kw)
    assert torch.equal(model.generate(ids, attention_mask=mask, **kw), ref)


def test_sites_without_cache_are_left_alone() -> None:
    torch._dynamo.reset()
    model = build_tiny_model("llama").eval()
    with torch.no_grad():
        want = model(IDS, use_cache=False).logits
        got = torch.compile(model, backend="mixeddimkv", options=OPTS)(IDS, use_cache=False).logits
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    report = backend.LAST_REPORTS[-1]
    assert not report.rewritten
    # Without the model (a backend only gets the graph) the finder cannot prove this mask causal;
    # with a proof the backend would still keep exact attention ("no KV cache").
    assert len(report.left) == 2 and all(reason for _, reason in report.left)


def test_hand_written_decoder_with_tensor_pasts() -> None:
    """A decoder outside transformers (tuple pasts, torch.cat, MQA, where-mask of rank 2): the
    backend is its only route to MixedDimKV. Budget 1.0 equals the plain model; 0.25 compresses
    (through `mdkv.patch(..., fallback="compile")`)."""
    from test_find_attention import CatDecoder, _empty_past

    torch._dynamo.reset()
    torch.manual_seed(0)
    model = CatDecoder().eval()
    prompt = torch.randint(0, 128, (1, 24), generator=torch.Generator().manual_seed(3))

    def run(fn) -> list[torch.Tensor]:
        outs = []
        with torch.no_grad():
            x, past = fn(prompt, _empty_past())
            outs.append(x[:, -1])
            for tok in (5, 9, 11):
                x, past = fn(torch.tensor([[tok]]), past)
                outs.append(x[:, -1])
        return outs

    plain = run(model)
    full = run(torch.compile(model, backend="mixeddimkv", options={"budget": 1.0, "window": 4}))
    for a, b in zip(full, plain, strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    report = backend.LAST_REPORTS[-1]
    assert report.rewritten == [k for k in report.rewritten if k.endswith(("blocks.0", "blocks.1"))]
    assert len(report.rewritten) == 2

    # mdkv.patch cannot reach this model; with fallback="compile" it compiles it with the backend.
    assert mdkv.patch(model, mdkv.MixedDimKVConfig(**OPTS), fallback="compile") is model
    small = run(model)
    torch.testing.assert_close(small[0], plain[0], atol=1e-4, rtol=1e-4)  # prefill attention is exact
    assert not torch.allclose(small[-1], plain[-1], atol=1e-3)
    layer = library.site_layer(backend.LAST_REPORTS[-1].rewritten[0])
    assert layer.stored_bytes() < 0.5 * layer.full_bytes()


def test_patched_model_compiled_keeps_compressed_cache() -> None:
    """mdkv.patch + model.compile(backend="mixeddimkv"): the MixedDimCache carries the state
    (memory saved), compression runs outside the graph (one break per layer), tokens equal eager,
    and the number of graphs does not grow with the number of decode steps."""
    torch._dynamo.reset()
    cfg = mdkv.MixedDimKVConfig(**OPTS)
    model = build_tiny_model("llama").eval()
    mdkv.patch(model, cfg)
    kw = {"do_sample": False, "pad_token_id": 0}
    ref = model.generate(IDS, max_new_tokens=20, **kw)
    model.compile(backend="mixeddimkv", options=OPTS)
    counters.clear()
    assert torch.equal(model.generate(IDS, max_new_tokens=6, **kw), ref[:, :46])
    graphs = counters["stats"]["unique_graphs"]
    cache = MixedDimCache(model.config, cfg)
    assert torch.equal(model.generate(IDS, max_new_tokens=20, past_key_values=cache, **kw), ref)
    assert counters["stats"]["unique_graphs"] == graphs
    assert cache.stored_bytes() < 0.5 * cache.full_bytes()
