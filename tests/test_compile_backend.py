"""The `mixeddimkv` torch.compile backend and the mdkv custom ops, with real Inductor on CPU.

Compiles are slow on CPU (~15 s per graph of a 2-layer model), so each test compiles one model
and checks several things on it.
"""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters
from transformers import DynamicCache

import mdkv_compile as mdkv
from mdkv_compile.backends import torch_compile as backend
from mdkv_compile.cache import MixedDimCache, MixedDimLayer
from mdkv_compile.passes import sites
from mdkv_compile.testing import CatDecoder, StaticKVDecoder, build_tiny_model, empty_past, greedy_decode

# min_compress_tokens 0: the short test prompts are compressed (they would be kept whole otherwise)
OPTS = {"budget": 0.25, "window": 4, "min_compress_tokens": 0}
IDS = torch.randint(1, 128, (1, 40), generator=torch.Generator().manual_seed(1))


def decode_loop(model, cache, steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy tokens of a manual prefill of IDS + decode loop, and the last step's logits."""
    return greedy_decode(model, cache, IDS, steps)


def eager_reference(opts: dict, steps: int) -> tuple[torch.Tensor, torch.Tensor, MixedDimCache]:
    model = build_tiny_model("llama").eval()
    cfg = mdkv.MixedDimKVConfig(**opts)
    mdkv.patch(model, cfg)
    cache = MixedDimCache(model.config, cfg)
    return *decode_loop(model, cache, steps), cache


def held_bytes(tensors) -> int:
    """Bytes of the storages behind the tensors a model's cache holds."""
    return sum(t.untyped_storage().nbytes() for t in tensors)


@pytest.mark.compile
def test_torch_compile_manual_loop_matches_eager_and_budget_one_matches_plain() -> None:
    """Unpatched tiny Llama with a DynamicCache: tokens equal the eager MixedDimKV reference, the
    DynamicCache holds only shape placeholders while the site state holds exactly the reference
    cache's bytes, misuse raises, and budget 1.0 equals the plain model."""
    torch._dynamo.reset()
    sites.reset_sites()
    steps = 10
    model = build_tiny_model("llama").eval()
    plain_cache = DynamicCache(config=model.config)
    plain, plain_logits = decode_loop(model, plain_cache, steps)

    counters.clear()
    compiled = torch.compile(model, backend="mixeddimkv", options=OPTS)
    cache = DynamicCache(config=model.config)
    tokens, logits = decode_loop(compiled, cache, steps)
    ref, ref_logits, ref_cache = eager_reference(OPTS, steps)
    assert torch.equal(tokens, ref)
    torch.testing.assert_close(logits, ref_logits, atol=1e-4, rtol=1e-4)
    assert not torch.equal(tokens, plain)  # budget 0.25 really compresses
    # Prefill, first decode step, then one dynamic-length decode graph: bounded recompiles.
    assert counters["stats"]["unique_graphs"] <= 3
    assert sum(counters["graph_break"].values()) == 0
    report = backend.LAST_REPORTS[-1]
    assert len(report.rewritten) == 2 and not report.left
    assert report.placeholders == report.rewritten and not report.kept_cache

    # The model's cache: right length, zero-stride placeholders of [B, H, 1, d] storage each.
    n_tokens = IDS.shape[1] + steps
    assert cache.get_seq_length() == plain_cache.get_seq_length() == n_tokens
    held = held_bytes(t for layer in cache.layers for t in (layer.keys, layer.values))
    full = held_bytes(t for layer in plain_cache.layers for t in (layer.keys, layer.values))
    assert full == ref_cache.full_bytes() == 2 * 2 * 2 * n_tokens * 16 * 4  # layers, k/v, heads, tokens, d
    assert held == 2 * 2 * 2 * 16 * 4  # one token per layer, k/v and head
    for layer in cache.layers:
        assert layer.keys.shape == (1, 2, n_tokens, 16) and layer.keys.stride(2) == 0
    # The compressed state is the site registry's, byte for byte the eager MixedDimCache's.
    assert backend.compiled_cache_bytes(OPTS, model) == ref_cache.stored_bytes() < 0.5 * full
    assert backend.compiled_full_bytes(OPTS, model) == full

    # Misuse raises instead of attending over the wrong state.
    nxt = tokens[:, -1:]
    cache.crop(n_tokens - 5)  # placeholders of another length (e.g. assisted decoding's crop)
    with torch.no_grad(), pytest.raises(RuntimeError, match="holds 45 tokens but the compressed state covers 50"):
        compiled(input_ids=nxt, past_key_values=cache, use_cache=True)
    # A real past of the right length from the uncompiled model: refused, not silently ignored.
    with torch.no_grad(), pytest.raises(RuntimeError, match="hold real data"):
        compiled(input_ids=nxt, past_key_values=plain_cache, use_cache=True)
    sites.reset_sites()
    with torch.no_grad(), pytest.raises(RuntimeError, match="no compressed prompt"):
        compiled(input_ids=nxt, past_key_values=cache, use_cache=True)

    full_model = torch.compile(model, backend="mixeddimkv", options={"budget": 1.0})
    tokens, logits = decode_loop(full_model, DynamicCache(config=model.config), steps)
    assert torch.equal(tokens, plain)
    torch.testing.assert_close(logits, plain_logits, atol=1e-4, rtol=1e-4)


@pytest.mark.compile
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
    # a new prompt resets every site's compressed state
    again = model.generate(IDS, return_dict_in_generate=True, **kw)
    assert torch.equal(first, ref) and torch.equal(again.sequences, ref)
    # generate()'s DynamicCache holds placeholders of the right length (the last token is not fed).
    cache = again.past_key_values
    assert cache.get_seq_length() == ref.shape[1] - 1
    assert sum(t.untyped_storage().nbytes() for layer in cache.layers for t in (layer.keys, layer.values)) == 512
    assert sum(counters["graph_break"].values()) == 0
    assert counters["stats"]["unique_graphs"] <= 3

    # Left-padded batch: padding reaches the compression through the mask the site op gets.
    ids = torch.cat([IDS, IDS.roll(3, dims=1)])
    mask = torch.ones_like(ids)
    ids[1, :7], mask[1, :7] = 0, 0
    ref = ref_model.generate(ids, attention_mask=mask, **kw)
    assert torch.equal(model.generate(ids, attention_mask=mask, **kw), ref)


@pytest.mark.compile
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


@pytest.mark.compile
def test_hand_written_decoder_with_tensor_pasts() -> None:
    """A decoder outside transformers (tuple pasts, torch.cat, MQA, where-mask of rank 2): the
    backend is its only route to MixedDimKV. Budget 1.0 equals the plain model; 0.25 compresses
    (`mdkv.patch` raises; `compile_model` compiles it), the returned pasts are placeholders and a
    past the compiled model did not make raises."""
    torch._dynamo.reset()
    sites.reset_sites()
    torch.manual_seed(0)
    model = CatDecoder().eval()
    prompt = torch.randint(0, 128, (1, 24), generator=torch.Generator().manual_seed(3))

    def run(fn) -> tuple[list[torch.Tensor], list[tuple[torch.Tensor, torch.Tensor]]]:
        outs = []
        with torch.no_grad():
            x, past = fn(prompt, empty_past())
            outs.append(x[:, -1])
            for tok in (5, 9, 11):
                x, past = fn(torch.tensor([[tok]]), past)
                outs.append(x[:, -1])
        return outs, past

    plain, plain_past = run(model)
    full, _ = run(torch.compile(model, backend="mixeddimkv", options={"budget": 1.0, "window": 4}))
    for a, b in zip(full, plain, strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    report = backend.LAST_REPORTS[-1]
    assert report.rewritten == [k for k in report.rewritten if k.endswith(("blocks.0", "blocks.1"))]
    assert len(report.rewritten) == 2 and report.placeholders == report.rewritten

    # mdkv.patch cannot reach this model; the caller compiles it with the backend instead.
    with pytest.raises(NotImplementedError):
        mdkv.patch(model, mdkv.MixedDimKVConfig(**OPTS))
    assert backend.compile_model(model, mdkv.MixedDimKVConfig(**OPTS)) is model
    small, past = run(model)
    torch.testing.assert_close(small[0], plain[0], atol=1e-4, rtol=1e-4)  # prefill attention is exact
    assert not torch.allclose(small[-1], plain[-1], atol=1e-3)
    # The returned pasts: the plain model's shapes, one token of storage each (stride 0).
    full_bytes = held_bytes(t for kv in plain_past for t in kv)
    assert full_bytes == 2 * 2 * 27 * 16 * 4  # layers, k/v, tokens, d (one kv head)
    assert [t.shape for kv in past for t in kv] == [t.shape for kv in plain_past for t in kv]
    assert held_bytes(t for kv in past for t in kv) == 2 * 2 * 16 * 4
    # The compressed state lives in the site registry.
    assert backend.compiled_full_bytes(OPTS, model) == full_bytes
    assert backend.compiled_cache_bytes(OPTS, model) < 0.5 * full_bytes
    layer = sites.site_layer(backend.LAST_REPORTS[-1].rewritten[0])
    assert layer.stored_bytes() < 0.5 * layer.full_bytes()

    with torch.no_grad():
        nxt = torch.tensor([[7]])
        short = [(k[:, :, :20], v[:, :, :20]) for k, v in past]
        with pytest.raises(RuntimeError, match="holds 20 tokens but the compressed state covers 27"):
            model(nxt, short)
        # The uncompiled model's past has the same length as the compressed state: only its data differ.
        with pytest.raises(RuntimeError, match="hold real data"):
            model(nxt, plain_past)
        x, _ = model(nxt, past)  # the failed calls changed nothing: the right past still works
        assert x.shape == (1, 1, 64)


def static_greedy(fn, prompt: torch.Tensor, steps: int, start: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy tokens of a gpt-fast style loop (`fn(idx, input_pos) -> logits`): prefill at positions
    0..N-1, then one token per step at the next position; and the last step's logits."""
    n = prompt.shape[1]
    with torch.no_grad():
        logits = fn(prompt, torch.arange(n))[:, -1]
        tokens = []
        for i in range(steps):
            tokens.append(logits.argmax(-1, keepdim=True))
            logits = fn(tokens[-1], torch.tensor([n + i]))[:, -1]
    return torch.cat(tokens, 1), logits


def static_lm(max_seq: int = 64):
    """The gpt-fast style decoder of mdkv_compile.testing with an LM head: layer 0 writes its
    buffers with `index_copy_` and attends with SDPA (bool mask), layer 1 writes with
    `k_cache[:, :, input_pos] = k` and attends with einsum + masked_fill(~mask)."""
    class StaticLM(StaticKVDecoder):
        def __init__(self) -> None:
            super().__init__(max_seq=max_seq, layer_kw=[{"write": "index_copy", "sdpa": True}, {"write": "setitem"}])
            self.head = torch.nn.Linear(64, 128, bias=False)

        def forward(self, idx: torch.Tensor, input_pos: torch.Tensor) -> torch.Tensor:
            return self.head(super().forward(idx, input_pos))

    torch.manual_seed(0)
    return StaticLM().eval()


def mixeddim_reference(model, cfg: mdkv.MixedDimKVConfig):
    """The eager MixedDimKV reference of `static_lm`: a copy whose attention layers keep a
    `MixedDimLayer` each (a fresh one at input_pos 0, appended to later) and attend through
    `MixedDimLayer.attend` with the mask cut to the written positions; the copy's buffers are
    not used. Returns (reference model, {layer path: MixedDimLayer of the current sequence})."""
    import copy

    ref = copy.deepcopy(model)
    states: dict[str, object] = {}
    for i, attn in enumerate(ref.layers):

        def forward(x, mask, input_pos, attn=attn, i=i):
            b, t, _ = x.shape
            q, k, v = attn.project(x)
            start = int(input_pos[0])
            if start == 0:
                states[f"layers.{i}"] = MixedDimLayer(cfg, i, len(ref.layers), cfg.resolve_dims(k.shape[-1]))
            layer = states[f"layers.{i}"]
            layer.update(k, v)
            out = layer.attend(q, mask[..., : start + t], k.shape[-1] ** -0.5, None)
            return attn.wo(out.transpose(1, 2).reshape(b, t, -1))

        attn.forward = forward
    return ref, states


@pytest.mark.compile
def test_static_kv_buffer_decoder_matches_eager_reference() -> None:
    """gpt-fast style static KV buffers (written in place at input_pos, mask rows picked by
    input_pos): each layer's site is rewritten to `mdkv::site_attention_buffer`; 32 greedy tokens
    equal the eager MixedDimKV reference, the site state holds the reference's bytes, the model's
    buffer is still written, budget 1.0 equals the plain model, recompiles are bounded and a
    write at the wrong position raises."""
    torch._dynamo.reset()
    sites.reset_sites()
    steps, n = 32, 24
    model = static_lm()
    prompt = torch.randint(0, 128, (1, n), generator=torch.Generator().manual_seed(3))

    rep = mdkv.explain(model, prompt, torch.arange(n))
    assert [s.location for s in rep.rewritten] == ["layers.0", "layers.1"] and not rep.skipped
    assert all(s.is_causal and s.kv_cache == "buffer" for s in rep.sites)

    plain, plain_logits = static_greedy(model, prompt, steps)
    cfg = mdkv.MixedDimKVConfig(**OPTS)
    ref_model, ref_layers = mixeddim_reference(model, cfg)
    ref, ref_logits = static_greedy(ref_model, prompt, steps)

    counters.clear()
    compiled = torch.compile(model, backend="mixeddimkv", options=OPTS)
    tokens, logits = static_greedy(compiled, prompt, steps)
    assert torch.equal(tokens, ref)
    torch.testing.assert_close(logits, ref_logits, atol=1e-4, rtol=1e-4)
    assert not torch.equal(tokens, plain)  # budget 0.25 really compresses
    # Prefill and one decode graph for all 32 steps (input_pos is a tensor: its values add no guards).
    assert counters["stats"]["unique_graphs"] <= 2
    assert sum(counters["graph_break"].values()) == 0
    report = backend.LAST_REPORTS[-1]
    assert [k.split(":")[1] for k in report.rewritten] == ["layers.0", "layers.1"] and not report.left
    assert report.buffers == report.rewritten and not report.placeholders and not report.kept_cache

    # The compressed state: byte for byte the reference's MixedDimLayers.
    total = n + steps
    assert all(layer.get_seq_length() == total for layer in ref_layers.values())
    ref_bytes = sum(layer.stored_bytes() for layer in ref_layers.values())
    per_token = 2 * 2 * 2 * 16 * 4  # layers, k/v, kv heads, d, fp32
    assert backend.compiled_cache_bytes(OPTS, model) == ref_bytes
    assert backend.compiled_full_bytes(OPTS, model) == total * per_token
    # The decoded tokens stay at full dimension; the 24-token prompt is compressed.
    assert ref_bytes - steps * per_token < 0.5 * n * per_token
    # The model's buffers are its own (max_seq = 64 positions) and still written at input_pos.
    assert held_bytes(t for layer in model.layers for t in (layer.k_cache, layer.v_cache)) == 2 * 2 * 2 * 64 * 16 * 4
    fed = torch.cat([prompt, tokens[:, :-1]], 1)
    with torch.no_grad():
        _, k0, _ = model.layers[0].project(model.emb(fed))
    torch.testing.assert_close(model.layers[0].k_cache[:, :, :total - 1], k0)

    # A write that does not continue the compressed state raises; the state is left as it was.
    nxt = torch.tensor([[int(tokens[0, -1])]])  # a view of `tokens` has other strides: a recompile
    with torch.no_grad(), pytest.raises(RuntimeError, match="at position 40 but the compressed state covers 56"):
        compiled(nxt, torch.tensor([40]))
    site = report.rewritten[0]
    x = torch.randn(1, 2, 2, 16)
    with pytest.raises(RuntimeError, match=r"positions \[56, 58\] are not 2 consecutive"):
        torch.ops.mdkv.site_attention_buffer(torch.randn(1, 4, 2, 16), x, x, torch.tensor([56, 58]), None, None, site)
    with torch.no_grad():
        got = compiled(nxt, torch.tensor([total]))
        want = ref_model(nxt, torch.tensor([total]))
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    assert counters["stats"]["unique_graphs"] <= 2
    sites.reset_sites()
    with torch.no_grad(), pytest.raises(RuntimeError, match="no compressed prompt"):
        compiled(nxt, torch.tensor([total + 1]))

    full_model = torch.compile(model, backend="mixeddimkv", options={"budget": 1.0, "window": 4})
    tokens, logits = static_greedy(full_model, prompt, steps)
    assert torch.equal(tokens, plain)
    torch.testing.assert_close(logits, plain_logits, atol=1e-4, rtol=1e-4)
    assert backend.LAST_REPORTS[-1].buffers == backend.LAST_REPORTS[-1].rewritten != []


@pytest.mark.compile
def test_hf_static_cache_matches_eager_reference() -> None:
    """Unpatched tiny Llama with transformers' StaticCache (buffers allocated in-graph on first use,
    `index_copy_(2, cache_position, k)`, HF's mask over the whole buffer): the sites are rewritten
    to the buffer op; 10 greedy tokens equal the eager `mdkv.patch` + MixedDimCache reference and
    the site state holds its bytes."""
    from transformers import StaticCache

    torch._dynamo.reset()
    sites.reset_sites()
    steps = 10
    model = build_tiny_model("llama").eval()
    counters.clear()
    compiled = torch.compile(model, backend="mixeddimkv", options=OPTS)
    cache = StaticCache(config=model.config, max_cache_len=64)
    tokens, logits = decode_loop(compiled, cache, steps)
    ref, ref_logits, ref_cache = eager_reference(OPTS, steps)
    assert torch.equal(tokens, ref)
    torch.testing.assert_close(logits, ref_logits, atol=1e-4, rtol=1e-4)
    assert counters["stats"]["unique_graphs"] <= 2 and sum(counters["graph_break"].values()) == 0
    report = backend.LAST_REPORTS[-1]
    assert len(report.rewritten) == 2 and report.buffers == report.rewritten and not report.left
    assert backend.compiled_cache_bytes(OPTS, model) == ref_cache.stored_bytes()
    # The StaticCache keeps its full-length buffers (the writes stay in the graph).
    assert all(layer.keys.shape[-2] == 64 for layer in cache.layers)


@pytest.mark.compile
def test_reduce_overhead_static_cache_uses_fixed_region_and_matches_eager() -> None:
    """`mode="reduce-overhead"` with transformers' StaticCache: the sites' decoded tokens go to a
    fixed region sized by the buffer (what a CUDA-graph replay needs: backends/site_graphs.py); the
    decode graph, and only it, is marked capturable; tokens equal the eager reference. On CPU no
    graph is captured (the wrapper calls Inductor's code directly); the capture itself runs only
    on CUDA (benchmarks/check_compile_graphs.py, docs/notes/gpu_notes.md)."""
    from transformers import StaticCache

    torch._dynamo.reset()
    sites.reset_sites()
    steps, max_len = 10, 64
    model = build_tiny_model("llama").eval()
    compiled = torch.compile(model, backend="mixeddimkv", options={**OPTS, "mode": "reduce-overhead"})
    cache = StaticCache(config=model.config, max_cache_len=max_len)
    tokens, logits = decode_loop(compiled, cache, steps)
    ref, ref_logits, _ = eager_reference(OPTS, steps)
    assert torch.equal(tokens, ref)
    torch.testing.assert_close(logits, ref_logits, atol=1e-4, rtol=1e-4)
    prefill, decode = backend.LAST_REPORTS[-2:]
    assert prefill.buffers == prefill.rewritten and not prefill.one_token
    assert decode.one_token == decode.rewritten == prefill.rewritten and len(decode.rewritten) == 2
    for key in decode.rewritten:
        layer = sites.site_layer(key)
        assert layer.max_new_tokens == max_len - IDS.shape[1] and layer.n_new == steps
        assert int(layer.n_decoded) == steps  # the device count the captured step would read
    # A second sequence starts a new state (new numbers: a captured graph of the old one is stale).
    before = sites.site_generations(decode.rewritten)
    cache = StaticCache(config=model.config, max_cache_len=max_len)
    tokens2, _ = decode_loop(compiled, cache, steps)
    assert torch.equal(tokens2, ref)
    after = sites.site_generations(decode.rewritten)
    assert None not in after and all(a != b for a, b in zip(after, before, strict=True))
    sites.reset_sites()
    assert sites.site_generations(decode.rewritten) == (None, None)


@pytest.mark.compile
def test_captured_decode_step_matches_eager_and_poisons_a_wrong_position() -> None:
    """The device-only step a CUDA graph captures (`_capture_decode_step`, called directly here on
    CPU) equals the eager op's step over the same fixed region; a step at a position that does not
    continue the state (a replay cannot raise) gives NaN instead of a silent answer."""
    torch.manual_seed(0)
    cfg = mdkv.MixedDimKVConfig(**OPTS)
    n, s_max = 24, 40
    q, k, v = torch.randn(1, 4, n, 16), torch.randn(1, 2, n, 16), torch.randn(1, 2, n, 16)
    mask = torch.ones(1, 1, n, s_max, dtype=torch.bool).tril(0)
    eager, graphed = "test:eager", "test:graphed"
    for site in (eager, graphed):
        sites.register_site(site, cfg, 0, 1)
        sites.site_attention_buffer(q, k, v, torch.arange(n), mask, None, site, True)
    assert sites.site_layer(graphed).max_new_tokens == s_max - n
    for pos in (n, n + 1):
        q1, k1, v1 = torch.randn(1, 4, 1, 16), torch.randn(1, 2, 1, 16), torch.randn(1, 2, 1, 16)
        step_mask = torch.ones(1, 1, 1, s_max, dtype=torch.bool)
        want = sites.site_attention_buffer(q1, k1, v1, torch.tensor([pos]), step_mask, None, eager, True)
        got = sites._capture_decode_step(q1, k1, v1, torch.tensor([pos]), None, graphed)
        torch.testing.assert_close(got, want)
    wrong = sites._capture_decode_step(q1, k1, v1, torch.tensor([n + 7]), None, graphed)
    assert wrong.isnan().all()
    sites.reset_sites()


@pytest.mark.compile
def test_written_inputs_finds_in_place_writes_through_views() -> None:
    """The CUDA-graph wrapper must not copy an input the graph writes (the copy would take the
    write): `written_inputs` finds direct writes, writes through views and any in-place method."""
    from mdkv_compile.backends.site_graphs import written_inputs

    def f(k_buf, v_buf, acc, x, pos):
        k_buf.index_copy_(2, pos, x)
        v_buf[0][:, pos] = x[0]
        acc.add_(x.sum())
        return x * 2

    graphs = []

    def keep(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    buffers = (torch.zeros(1, 2, 8, 4), torch.zeros(1, 2, 8, 4))
    args = (*buffers, torch.zeros(()), torch.randn(1, 2, 1, 4), torch.tensor([3]))
    torch.compile(f, backend=keep, fullgraph=True)(*args)
    placeholders = [n.name for n in graphs[0].graph.nodes if n.op == "placeholder"]
    assert sorted(placeholders[i] for i in written_inputs(graphs[0])) == ["l_acc_", "l_k_buf_", "l_v_buf_"]


def test_capture_takes_only_its_own_call() -> None:
    """The CUDA-graph wrapper's per-step check (no full signature): a capture takes a call with the
    very same static tensors at their addresses and other arguments of the same shapes, strides and
    dtypes (their values may change: they are copied in), and nothing else."""
    from mdkv_compile.backends.site_graphs import _Capture, _signature

    weight, buffer = torch.nn.Parameter(torch.randn(4, 4)), torch.zeros(2, 8)
    args = [weight, buffer, torch.tensor([[5]]), 3]
    static, dynamic = [0, 1], [2, 3]
    capture = _Capture(graph=None, inputs=[weight, buffer, args[2].clone(), 3], static=static, outputs=[],
                       generations=(1,), owned=[], layers=[], dynamic=dynamic,
                       dynamic_signature=_signature([args[i] for i in dynamic]),
                       static_ptrs=[weight.data_ptr(), buffer.data_ptr()])
    assert capture.takes(args)
    assert capture.takes([weight, buffer, torch.tensor([[9]]), 3])  # a new token: copied in
    assert not capture.takes([weight.detach().clone(), buffer, args[2], 3])  # another weight tensor
    assert not capture.takes([weight, buffer, torch.tensor([[9, 9]]), 3])  # another shape
    assert not capture.takes([weight, buffer, torch.tensor([[9.0]]), 3])  # another dtype
    assert not capture.takes([weight, buffer, torch.zeros(1, 2, dtype=torch.long)[:, :1], 3])  # another stride
    assert not capture.takes([weight, buffer, args[2], 4])  # another plain value
    assert not capture.takes([weight, buffer, args[2]])
    buffer.set_(torch.zeros(2, 8))  # the same tensor object over new storage: captured addresses are stale
    assert not capture.takes([weight, buffer, args[2], 3])


@pytest.mark.compile
def test_cache_read_inside_the_graph_keeps_the_concat() -> None:
    """Rewrite only (no Inductor): a site whose concatenated keys are also read inside the graph
    keeps its concat (reason recorded); the other site's concats are erased and the graph
    returns zero-stride placeholders of the concat's shape."""
    from mdkv_compile.passes.explain import capture_graphs

    class KeyReadingDecoder(CatDecoder):
        def forward(self, idx, past):
            x, new_past = super().forward(idx, past)
            return x + new_past[0][0].mean(), new_past  # reads layer 0's past keys

    torch.manual_seed(0)
    model = KeyReadingDecoder().eval()
    prompt = torch.randint(0, 128, (1, 6))
    ((gm, example),), _, _ = capture_graphs(model, prompt, empty_past())
    report = backend.rewrite_graph(gm, example, mdkv.MixedDimKVConfig(**OPTS))
    assert len(report.rewritten) == 2
    assert [key.split(":")[1] for key in report.placeholders] == ["blocks.1"]
    ((kept, why),) = report.kept_cache
    assert kept.endswith("blocks.0") and "also read by" in why
    # Layer 0 keeps both concats (the decision is per site); layer 1's are erased.
    assert sum(n.target is torch.cat for n in gm.graph.nodes) == 2
    ops = [n for n in gm.graph.nodes if n.target is torch.ops.mdkv.site_attention.default]
    assert [(n.args[7].split(":")[1], n.args[8]) for n in ops] == [("blocks.0", False), ("blocks.1", True)]

    sites.reset_sites()
    with torch.no_grad():
        x, k0, v0, k1, v1 = gm(*example)  # Dynamo's flat outputs: x, then the past tensors in order
        want, want_past = model(prompt, empty_past())
    torch.testing.assert_close(x, want, atol=1e-5, rtol=1e-5)  # prompt attention is exact
    torch.testing.assert_close((k0, v0), want_past[0])  # kept: the real keys and values
    assert k1.shape == v1.shape == want_past[1][0].shape and k1.stride(2) == v1.stride(2) == 0


@pytest.mark.compile
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
