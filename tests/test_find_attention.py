"""The attention finder on Dynamo graphs: HF models (tiny, random weights), two hand-written decoders,
encoders and cross-attention. Graphs are captured with a recording backend (no Inductor)."""

from __future__ import annotations

import math
import operator

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from mdkv_compile.passes.explain import capture_graphs, explain
from mdkv_compile.passes.find_attention import AttentionSite, find_attention_sites
from mdkv_compile.testing import (
    DIM,
    HEAD_DIM,
    HEADS,
    CatDecoder,
    StaticKVDecoder,
    build_tiny_model,
    empty_past,
    tiny_model,
)

transformers = pytest.importorskip("transformers")

# Every test here traces with torch.compile (Dynamo and a recording backend).
pytestmark = pytest.mark.compile


def _sites(fn, *args, dynamic: bool | None = None, **kwargs) -> list[AttentionSite]:
    graphs, _, _ = capture_graphs(fn, *args, dynamic=dynamic, **kwargs)
    root = fn if isinstance(fn, nn.Module) else None
    return [s for gm, ex in graphs for s in find_attention_sites(gm, ex, root=root)]


def _assert_replace_closed(s: AttentionSite) -> None:
    """Once `output`'s uses are redirected, every other node in `replace` is dead code."""
    owned = set(s.replace)
    assert s.output in owned
    assert all(set(n.users) <= owned for n in s.replace if n is not s.output), s.layer
    assert s.k not in owned and s.v not in owned and s.q not in owned


def _assert_one_causal_site_per_layer(
    sites: list[AttentionSite], layers: list[str], kind: str, group: int, scale: float | None
) -> None:
    assert [s.layer for s in sites] == layers, [s.layer for s in sites]
    for s in sites:
        assert s.status == "rewritable", (s.layer, s.reason)
        assert s.is_causal and s.causal_proof, s.layer
        assert s.kind == kind
        assert s.group_size == group
        assert s.scale == pytest.approx(scale) if scale is not None else s.scale is None
        assert s.source is not None
        _assert_replace_closed(s)
        # k / v are un-repeated: kv heads, not query heads
        qs, ks, vs = (s.q.meta["example_value"].shape, s.k.meta["example_value"].shape, s.v.meta["example_value"].shape)
        assert qs[1] == ks[1] * group == vs[1] * group
        assert ks[-2] == vs[-2]


# ---------------------------------------------------------------------------------------------
# Hugging Face decoders: prefill and one decode step over a DynamicCache

HF_DECODERS = [
    # arch, attn implementation, layer path format, GQA group, scale as seen on the reported q
    ("llama", "sdpa", "model.layers.{}.self_attn", 2, 0.25),
    ("llama", "eager", "model.layers.{}.self_attn", 2, 0.25),
    ("qwen2", "sdpa", "model.layers.{}.self_attn", 2, 0.25),
    ("mistral", "eager", "model.layers.{}.self_attn", 2, 0.25),
    ("gpt2", "eager", "transformer.h.{}.attn", 1, 0.25),
    ("gpt2", "sdpa", "transformer.h.{}.attn", 1, 0.25),
    ("opt", "eager", "model.decoder.layers.{}.self_attn", 1, 1.0),  # OPT scales q after q_proj
    ("gpt_neox", "sdpa", "gpt_neox.layers.{}.attention", 1, 0.25),
]


@pytest.mark.parametrize("arch,impl,layer_fmt,group,scale", HF_DECODERS, ids=[f"{a}-{i}" for a, i, *_ in HF_DECODERS])
def test_hf_decoder_prefill_and_decode(arch: str, impl: str, layer_fmt: str, group: int, scale: float) -> None:
    model = build_tiny_model(arch, impl)
    if arch == "mistral":
        assert model.config.sliding_window is None  # full attention, as in Mistral v0.2+
    layers = [layer_fmt.format(i) for i in range(2)]
    kind = "sdpa" if impl == "sdpa" else "manual"
    ids = torch.randint(3, 128, (1, 8))

    prefill = _sites(model, input_ids=ids)
    _assert_one_causal_site_per_layer(prefill, layers, kind, group, scale)
    # HF eager adds a float mask; HF sdpa passes the bool mask (True = attend) to SDPA
    assert {s.mask_use for s in prefill} == {"additive" if impl == "eager" else "allow"}
    assert all(s.kv_cache == "concat" and s.k_new is not None for s in prefill)  # DynamicLayer.update

    with torch.no_grad():
        past = model(input_ids=ids, use_cache=True).past_key_values
    decode = _sites(model, input_ids=ids[:, -1:], past_key_values=past, use_cache=True)
    _assert_one_causal_site_per_layer(decode, layers, kind, group, scale)
    for s in decode:
        assert s.q.meta["example_value"].shape[-2] == 1
        assert s.k.meta["example_value"].shape[-2] == 9  # 8 cached + 1 new


def test_hf_static_cache_writes_are_followed() -> None:
    """StaticCache: keys live in a buffer written with index_copy_ (allocated in-graph on first use)."""
    model = build_tiny_model("llama", "eager")
    cache = transformers.StaticCache(config=model.config, max_cache_len=16)
    ids = torch.randint(3, 128, (1, 6))
    layers = [f"model.layers.{i}.self_attn" for i in range(2)]
    prefill = _sites(model, input_ids=ids, past_key_values=cache, use_cache=True, cache_position=torch.arange(6))
    with torch.no_grad():
        model(input_ids=ids, past_key_values=cache, use_cache=True, cache_position=torch.arange(6))
    decode = _sites(
        model, input_ids=ids[:, :1], past_key_values=cache, use_cache=True, cache_position=torch.tensor([6])
    )
    for sites in (prefill, decode):
        _assert_one_causal_site_per_layer(sites, layers, "manual", 2, 0.25)
        for s in sites:
            assert s.kv_cache == "buffer" and s.k_new is not None and s.k_new.name.startswith("k_embed")
            assert s.k.meta["example_value"].shape[-2] == 16  # the whole static buffer


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_hf_padding_mask_keeps_causality_and_is_flagged(impl: str) -> None:
    model = build_tiny_model("llama", impl)
    ids = torch.randint(3, 128, (2, 8))
    mask = torch.ones(2, 8, dtype=torch.long)
    mask[1, :3] = 0  # left padding
    sites = _sites(model, input_ids=ids, attention_mask=mask)
    assert len(sites) == 2
    for s in sites:
        assert s.rewritable and s.is_causal, s.reason
        assert s.padding_mask  # the rewrite must apply s.mask, not only causality


def test_output_attentions_is_skipped() -> None:
    """The probabilities leave the site (returned to the caller): a rewrite could not drop them."""
    model = build_tiny_model("llama", "eager")
    sites = _sites(model, input_ids=torch.randint(3, 128, (1, 8)), output_attentions=True)
    assert len(sites) == 2
    for s in sites:
        assert s.is_causal and s.status == "skipped" and "probabilities" in s.reason


def test_sliding_window_is_skipped() -> None:
    model = build_tiny_model("mistral", "sdpa")
    model.config.sliding_window = 4  # shorter than the 8-token prompt: keys really get dropped
    sites = _sites(model, input_ids=torch.randint(3, 128, (1, 8)))
    assert len(sites) == 2
    for s in sites:
        assert s.status == "skipped" and "sliding-window" in s.reason and "window=4" in s.reason
        assert s.extra["sliding_window"] == 4


# ---------------------------------------------------------------------------------------------
# Encoders and encoder-decoders: sites found, skipped with a reason


def test_bert_encoder_is_skipped_as_bidirectional() -> None:
    for impl in ("sdpa", "eager"):
        model = build_tiny_model("bert", impl)
        report = explain(model, input_ids=torch.randint(3, 128, (1, 8)))
        assert [s.location for s in report.sites] == [f"encoder.layer.{i}.attention.self" for i in range(2)]
        for s in report.sites:
            assert s.status == "skipped" and s.reason.startswith("bidirectional"), s.reason
            assert not s.is_causal


@pytest.mark.parametrize("arch", ["t5", "bart"])
def test_encoder_decoder_cross_attention_is_skipped(arch: str) -> None:
    model = build_tiny_model(arch, "eager" if arch == "t5" else "sdpa")
    ids = torch.randint(3, 128, (1, 8))
    sites = _sites(model, input_ids=ids, decoder_input_ids=ids[:, :4], use_cache=False)
    cross = [s for s in sites if "EncDecAttention" in s.layer or "encoder_attn" in s.layer]
    enc = [s for s in sites if s.layer.split(".")[0 if arch == "t5" else 1] == "encoder"]
    assert len(cross) == 2 and len(enc) == 2
    for s in cross:
        assert s.status == "skipped" and s.reason.startswith("cross-attention"), s.reason
        assert s.source is None
    for s in enc:
        assert s.status == "skipped" and s.reason.startswith("bidirectional"), s.reason
    dec_self = [s for s in sites if s not in cross and s not in enc]
    assert len(dec_self) == 2
    if arch == "bart":  # plain causal decoder self-attention: rewritable
        assert all(s.rewritable and s.is_causal for s in dec_self)
    else:  # T5 adds a learned relative-position bias to the mask: not plain attention
        assert all(s.status == "skipped" for s in dec_self)


def test_t5_decoder_self_attention_bias_reason() -> None:
    model = build_tiny_model("t5", "sdpa")
    ids = torch.randint(3, 128, (1, 8))
    sites = _sites(model, input_ids=ids, decoder_input_ids=ids[:, :4], use_cache=False)
    dec_self = [s for s in sites if s.layer.startswith("decoder") and "SelfAttention" in s.layer]
    assert len(dec_self) == 2
    for s in dec_self:
        assert s.is_causal and "bias" in s.reason


# ---------------------------------------------------------------------------------------------
# Hand-written decoder 1 (gpt-fast style): static KV buffers written at input_pos, a causal
# buffer indexed by input_pos, fused wqkv, repeat_interleave GQA, einsum + masked_fill + div scale.


def test_static_kv_decoder_prefill_and_decode() -> None:
    torch.manual_seed(0)
    model = StaticKVDecoder().eval()
    for idx, pos in ((torch.randint(0, 128, (1, 6)), torch.arange(6)), (torch.tensor([[7]]), torch.tensor([6]))):
        sites = _sites(model, idx, pos)
        assert [s.layer for s in sites] == ["layers.0", "layers.1"]
        for s in sites:
            assert s.rewritable, s.reason
            assert s.kind == "manual" and s.group_size == 2
            assert s.kv_cache == "buffer" and s.k_new is not None
            assert "lower-triangular buffer" in s.causal_proof
            assert s.scale == pytest.approx(1 / math.sqrt(HEAD_DIM))
            assert s.k.op == "placeholder" and "k_cache" in s.k.name  # un-repeated buffer
            assert s.mask is not None and s.mask_use == "block"  # masked_fill(~mask, -inf)
            _assert_replace_closed(s)


def test_static_kv_decoder_rejects_a_non_causal_buffer() -> None:
    """Same graph shape, but the 'causal' buffer is all ones: must not be proven causal."""
    model = StaticKVDecoder(causal_buffer=torch.ones(16, 16, dtype=torch.bool)).eval()
    sites = _sites(model, torch.randint(0, 128, (1, 6)), torch.arange(6))
    assert len(sites) == 2
    for s in sites:
        assert not s.is_causal and s.status == "skipped"


# ---------------------------------------------------------------------------------------------
# Hand-written decoder 2: past keys/values passed in and returned as tensors (torch.cat), MQA via
# expand, q pre-scaled, method-form matmul/softmax, causal mask from tril(ones, diagonal=past)
# applied with torch.where.


def test_cat_decoder_prefill_and_decode() -> None:
    torch.manual_seed(0)
    model = CatDecoder().eval()
    with torch.no_grad():
        _, past = model(torch.randint(0, 128, (1, 5)), empty_past())
    for idx, pst in ((torch.randint(0, 128, (1, 5)), empty_past()), (torch.tensor([[3]]), past)):
        sites = _sites(model, idx, pst)
        assert [s.layer for s in sites] == ["blocks.0", "blocks.1"]
        for s in sites:
            assert s.rewritable, s.reason
            assert s.group_size == HEADS  # MQA
            assert s.kv_cache == "concat"
            assert s.scale == pytest.approx(HEAD_DIM**-0.5)
            assert s.causal_proof.startswith("mask: tril")
            assert s.mask_use == "allow" and s.mask_terms == [(s.mask, "allow")]  # torch.where(allowed, ...)
            # q is the pre-scaled tensor's input: the scale moved into .scale
            assert s.q.target == "permute"
            assert s.k.target is torch.cat and s.v.target is torch.cat
            _assert_replace_closed(s)


def test_cat_decoder_dynamic_shapes_need_a_symbolic_diagonal() -> None:
    """Under dynamic shapes the tril diagonal must equal S - T symbolically, not just for the example."""
    torch.manual_seed(0)
    past = empty_past(5)
    for diagonal, ok in ((None, True), (5, False)):  # 5 == S - T for this example only
        model = CatDecoder(diagonal=diagonal).eval()
        static = _sites(model, torch.tensor([[3]]), past)
        dynamic = _sites(model, torch.tensor([[3]]), past, dynamic=True)
        assert all(s.rewritable for s in static)  # a static graph is guarded on these sizes
        assert len(dynamic) == 2
        for s in dynamic:
            assert s.rewritable == ok, s.reason
            if not ok:
                assert "diagonal does not match" in s.reason


def test_cat_decoder_flipped_mask_is_not_causal() -> None:
    model = CatDecoder(flip_mask=True).eval()
    sites = _sites(model, torch.randint(0, 128, (1, 5)), empty_past())
    assert len(sites) == 2
    for s in sites:
        assert not s.is_causal and s.status == "skipped"
        assert "polarity" in s.reason or "mask" in s.reason


# ---------------------------------------------------------------------------------------------
# Legacy GPT-2 style (transformers 4.x): Conv1D (addmm), fused c_attn split, tuple past via cat,
# causal `bias` buffer sliced [:, :, K-T:K, :K], division by a 0-d tensor, torch.where.


class LegacyGPT2Attention(nn.Module):
    def __init__(self, max_pos: int = 16, row_slice_from_end: bool = True) -> None:
        super().__init__()
        self.c_attn_w = nn.Parameter(torch.randn(DIM, 3 * DIM) * 0.02)
        self.c_attn_b = nn.Parameter(torch.zeros(3 * DIM))
        self.register_buffer(
            "bias",
            torch.tril(torch.ones(max_pos, max_pos, dtype=torch.bool)).view(1, 1, max_pos, max_pos),
            persistent=False,
        )
        self.row_slice_from_end = row_slice_from_end

    def forward(self, x: torch.Tensor, past_k: torch.Tensor, past_v: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        qkv = torch.addmm(self.c_attn_b, x.view(-1, DIM), self.c_attn_w).view(b, t, 3 * DIM)
        q, k, v = (z.view(b, t, HEADS, HEAD_DIM).permute(0, 2, 1, 3) for z in qkv.split(DIM, dim=2))
        k = torch.cat((past_k, k), dim=-2)
        v = torch.cat((past_v, v), dim=-2)
        w = torch.matmul(q, k.transpose(-1, -2))
        w = w / torch.full([], v.size(-1) ** 0.5, dtype=w.dtype)
        ql, kl = q.size(-2), k.size(-2)
        rows = slice(kl - ql, kl) if self.row_slice_from_end else slice(0, ql)  # the latter is a bug
        causal = self.bias[:, :, rows, :kl]
        w = torch.where(causal, w.to(w.dtype), torch.full([], torch.finfo(w.dtype).min, dtype=w.dtype))
        w = nn.functional.softmax(w, dim=-1).type(v.dtype)
        return torch.matmul(w, v)


@pytest.mark.parametrize("past_len", [0, 5])
def test_legacy_gpt2_causal_buffer_slice(past_len: int) -> None:
    torch.manual_seed(0)
    x = torch.randn(1, 1 if past_len else 6, DIM)
    past = [torch.randn(1, HEADS, past_len, HEAD_DIM) for _ in range(2)]
    (good,) = _sites(LegacyGPT2Attention().eval(), x, *past)
    assert good.rewritable, good.reason
    assert good.scale == pytest.approx(0.25) and good.kv_cache == "concat"
    assert good.causal_proof == "lower-triangular buffer l_self_buffers_bias_"
    _assert_replace_closed(good)
    (bad,) = _sites(LegacyGPT2Attention(row_slice_from_end=False).eval(), x, *past)
    if past_len:  # rows [0:T] of the triangle are misaligned with the cached keys
        assert not bad.is_causal and bad.status == "skipped"
        assert bad.reason.startswith("mask not provably causal") and "not aligned" in bad.reason
    else:  # without a cache both slices are the same
        assert bad.rewritable


# ---------------------------------------------------------------------------------------------
# A mask that arrives as a named graph input (HF-style `attention_mask`): causal only when the
# attention module declares itself causal and q, k, v share their input.


class NamedMaskAttention(nn.Module):
    def __init__(self, is_causal: bool) -> None:
        super().__init__()
        self.is_causal = is_causal
        self.qkv = nn.Linear(DIM, 3 * DIM)

    def forward(self, x: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, HEADS, HEAD_DIM).permute(2, 0, 3, 1, 4).unbind(0)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attention_mask)


class NamedMaskModel(nn.Module):
    def __init__(self, is_causal: bool) -> None:
        super().__init__()
        self.attn = NamedMaskAttention(is_causal)

    def forward(self, x: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.attn(x, attention_mask)


@pytest.mark.parametrize("declared", [True, False])
def test_named_mask_input_trusts_the_module_flag(declared: bool) -> None:
    x = torch.randn(1, 6, DIM)
    mask = torch.full((6, 6), float("-inf")).triu(1)
    (s,) = explain(NamedMaskModel(declared), x, mask).sites
    if declared:
        assert s.status == "rewritten" and "HF mask input" in s.site.causal_proof
    else:
        assert s.status == "skipped" and s.reason.startswith("bidirectional")


# ---------------------------------------------------------------------------------------------
# Functions without modules: baddbmm, training dropout, unreadable masks


def _proj(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return F.linear(x, w).view(x.shape[0], x.shape[1], HEADS, HEAD_DIM).transpose(1, 2)


def baddbmm_attention(x: torch.Tensor, wq: torch.Tensor, wk: torch.Tensor, wv: torch.Tensor) -> torch.Tensor:
    b, t, _ = x.shape
    q = _proj(x, wq).reshape(b * HEADS, t, HEAD_DIM)
    k = _proj(x, wk).reshape(b * HEADS, t, HEAD_DIM)
    v = _proj(x, wv).reshape(b * HEADS, t, HEAD_DIM)
    bias = torch.triu(torch.full((t, t), float("-inf")), diagonal=1)
    scores = torch.baddbmm(bias.expand(b * HEADS, t, t), q, k.transpose(1, 2), beta=1.0, alpha=0.125)
    return torch.bmm(torch.softmax(scores, dim=-1), v)


def test_baddbmm_with_additive_triu_mask() -> None:
    x = torch.randn(1, 6, DIM)
    ws = [torch.randn(DIM, DIM) for _ in range(3)]
    sites = _sites(baddbmm_attention, x, *ws)
    assert len(sites) == 1
    s = sites[0]
    assert s.rewritable, s.reason
    assert s.scale == pytest.approx(0.125) and s.causal_proof == "mask: triu(full(-inf), 1)"
    assert s.layer.startswith("baddbmm_attention")


def test_dropout_in_training_and_unreadable_mask_are_skipped() -> None:
    def attn(x: torch.Tensor, w: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        q = k = v = _proj(x, w)
        p = F.dropout(torch.softmax(q @ k.transpose(-2, -1) / 4.0 + mask, dim=-1), p=0.1, training=True)
        return p @ v

    x, w = torch.randn(1, 6, DIM), torch.randn(DIM, DIM)
    causal = torch.full((6, 6), float("-inf")).triu(1)
    (s,) = _sites(attn, x, w, causal)
    # the mask arrives as an un-named tensor input: its content is not provable from the graph
    assert not s.is_causal and s.status == "skipped" and s.reason.startswith("bidirectional")
    assert s.dropout_p == pytest.approx(0.1)
    assert s.scale == pytest.approx(0.25)


def test_unrecognised_chain_is_reported_not_dropped() -> None:
    """Gemma-2 style logit soft-capping: the chain is attention, but not one we can rewrite."""

    def softcap(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        q = k = v = _proj(x, w)
        scores = torch.tanh(q @ k.transpose(-2, -1) * 0.25 / 30.0) * 30.0
        scores = scores.masked_fill(torch.ones(6, 6, dtype=torch.bool).triu(1), float("-inf"))
        return torch.softmax(scores, dim=-1) @ v

    def classifier(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:  # softmax, but no attention
        return torch.softmax(x @ w, dim=-1).sum(-1)

    (s,) = _sites(softcap, torch.randn(1, 6, DIM), torch.randn(DIM, DIM))
    assert s.status == "skipped" and s.reason.startswith("unrecognised attention pattern") and "tanh" in s.reason
    assert s.q is None and s.output.target is operator.matmul
    assert _sites(classifier, torch.randn(1, 6, DIM), torch.randn(DIM, DIM)) == []


def test_sdpa_flags_and_cross_attention_in_plain_functions() -> None:
    def f(x: torch.Tensor, mem: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        q, k, v = _proj(x, w), _proj(x, w * 2), _proj(x, w * 3)
        self_out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        cross = F.scaled_dot_product_attention(q, _proj(mem, w), _proj(mem, w), scale=0.5)
        return self_out + cross

    s_self, s_cross = _sites(f, torch.randn(1, 6, DIM), torch.randn(1, 5, DIM), torch.randn(DIM, DIM))
    assert s_self.kind == "sdpa" and s_self.rewritable and s_self.scale is None
    assert s_self.causal_proof == "sdpa is_causal=True"
    assert s_cross.status == "skipped" and s_cross.reason.startswith("cross-attention")
    assert s_cross.scale == 0.5


def test_explain_report_table_and_graph_breaks() -> None:
    model = build_tiny_model("llama", "sdpa")

    def with_break(ids: torch.Tensor) -> torch.Tensor:
        out = model(input_ids=ids).logits
        torch._dynamo.graph_break()
        return model(input_ids=ids[:, :4]).logits + out[:, :4]

    report = explain(with_break, torch.randint(3, 128, (1, 8)))
    assert report.graph_breaks >= 1 and report.graphs >= 2
    assert len(report.sites) == 4
    assert {s.status for s in report.sites} == {"rewritten"}
    text = str(report)
    assert "model.layers.0.self_attn" in text and "rewritten" in text and "graph break" in text


def test_cli_explain_tiny_arch(capsys: pytest.CaptureFixture[str]) -> None:
    from mdkv_compile.cli import main

    assert main(["explain", "--arch", "gpt2", "--decode"]) == 0
    out = capsys.readouterr().out
    assert out.count("rewritten") >= 4 and "transformer.h.1.attn" in out and "decode step" in out


def test_cli_explain_local_model_dir(tmp_path, capsys: pytest.CaptureFixture[str]) -> None:
    import mdkv_compile as mdkv
    from mdkv_compile.cli import main

    assert mdkv.explain is explain  # the public lazy name
    build_tiny_model("gpt_neox", "sdpa").save_pretrained(tmp_path)
    assert main(["explain", "--model", str(tmp_path), "--attn-implementation", "eager"]) == 0
    out = capsys.readouterr().out
    assert "gpt_neox.layers.1.attention  manual  rewritten" in out


def test_finder_does_not_touch_the_graph_or_specialise_shapes() -> None:
    """Reading sizes must not int() SymInts: that would add guards and specialise a dynamic graph."""
    model = build_tiny_model("llama", "eager")
    graphs, _, _ = capture_graphs(model, input_ids=torch.randint(3, 128, (1, 8)), dynamic=True)
    gm, ex = graphs[0]
    ids_node = next(n for n in gm.graph.nodes if n.op == "placeholder" and "input_ids" in n.name)
    seq = ids_node.meta["example_value"].shape[-1]
    assert isinstance(seq, torch.SymInt)
    shape_env = seq.node.shape_env
    before_graph, before_guards = str(gm.graph), len(shape_env.guards)
    sites = find_attention_sites(gm, ex, root=model)
    assert [s.status for s in sites] == ["rewritable"] * 2
    for s in sites:  # dynamic=True lifts HF's float `scaling` into the graph: passed on as a node
        assert s.scale_node is not None and s.scale == pytest.approx(0.25)
    assert str(gm.graph) == before_graph
    assert len(shape_env.guards) == before_guards
    assert not str(seq.node.expr).isdigit()  # still symbolic


# ---------------------------------------------------------------------------------------------
# Every model of mdkv_compile.testing, prefill and (decoders) one decode step over the filled
# cache: the exact status and causal proof or skip reason of every site, in graph order. Reasons
# that name graph nodes use Dynamo's node names for the pinned torch version.

_ALL_CAUSAL = "rewritable: mask: kv_idx <= q_idx"
_FULL_ATTENTION = "skipped: bidirectional: no causal pattern in the mask (padding / full attention)"
_BIAS = "skipped: additive attention bias (ALiBi / relative position) in the mask: not supported"
_T5_CROSS = "skipped: cross-attention: k/v come from hidden_states_17, not the query's input normed_hidden_states_{}"
_BART_CROSS = "skipped: cross-attention: k/v come from hidden_states_20, not the query's input hidden_states_{}"
_SOFTCAP = "skipped: unrecognised attention pattern: cannot tell scores from mask in attn_weights_{}"
_WINDOW = "skipped: sliding-window mask (window=16): the rewrite computes full causal attention"

_HF_LAYERS = {
    "llama": "model.layers.{}.self_attn",
    "qwen2": "model.layers.{}.self_attn",
    "mistral": "model.layers.{}.self_attn",
    "gpt2": "transformer.h.{}.attn",
    "opt": "model.decoder.layers.{}.self_attn",
    "gpt_neox": "gpt_neox.layers.{}.attention",
}
# case -> [(layer, "status: proof or reason")]; kind is "sdpa" for the sdpa cases, else "manual"
PINNED: dict[str, list[tuple[str, str]]] = {
    **{
        f"{arch}-{impl}{step}": [(fmt.format(i), _ALL_CAUSAL) for i in range(2)]
        for arch, fmt in _HF_LAYERS.items()
        for impl in ("sdpa", "eager")
        for step in ("", "-decode")
    },
    **{
        f"tiny-{arch}{step}": [(f"model.layers.{i}.self_attn", _ALL_CAUSAL) for i in range(2)]
        for arch in ("llama", "mistral", "qwen2", "qwen3", "phi3")
        for step in ("", "-decode")
    },
    **{
        f"bert-{impl}": [(f"encoder.layer.{i}.attention.self", _FULL_ATTENTION) for i in range(2)]
        for impl in ("sdpa", "eager")
    },
    **{
        f"t5-{impl}": [
            ("encoder.block.0.layer.0.SelfAttention", _FULL_ATTENTION),
            ("encoder.block.1.layer.0.SelfAttention", _FULL_ATTENTION),
            ("decoder.block.0.layer.0.SelfAttention", _BIAS),
            ("decoder.block.0.layer.1.EncDecAttention", _T5_CROSS.format(3)),
            ("decoder.block.1.layer.0.SelfAttention", _BIAS),
            ("decoder.block.1.layer.1.EncDecAttention", _T5_CROSS.format(5)),
        ]
        for impl in ("sdpa", "eager")
    },
    **{
        f"bart-{impl}": [
            ("model.encoder.layers.0.self_attn", _FULL_ATTENTION),
            ("model.encoder.layers.1.self_attn", _FULL_ATTENTION),
            ("model.decoder.layers.0.self_attn", _ALL_CAUSAL),
            ("model.decoder.layers.0.encoder_attn", _BART_CROSS.format(26)),
            ("model.decoder.layers.1.self_attn", _ALL_CAUSAL),
            ("model.decoder.layers.1.encoder_attn", _BART_CROSS.format(38)),
        ]
        for impl in ("sdpa", "eager")
    },
    **{
        f"tiny-gemma2{step}": [(f"model.layers.{i}.self_attn", _SOFTCAP.format(4 + 7 * i)) for i in range(3)]
        for step in ("", "-decode")
    },
    **{
        f"tiny-gemma3{step}": [
            ("model.layers.0.self_attn", _WINDOW),
            ("model.layers.1.self_attn", _ALL_CAUSAL),
            ("model.layers.2.self_attn", _ALL_CAUSAL),
        ]
        for step in ("", "-decode")
    },
    **{
        f"static_kv{step}": [
            (f"layers.{i}", "rewritable: lower-triangular buffer l_self_buffers_causal_mask_") for i in range(2)
        ]
        for step in ("", "-decode")
    },
    "cat": [(f"blocks.{i}", "rewritable: mask: tril(ones)") for i in range(2)],
    "cat-decode": [(f"blocks.{i}", "rewritable: mask: tril(ones, 5)") for i in range(2)],
}


def _pinned_case_sites(case: str) -> tuple[list[AttentionSite], str]:
    """The sites of one PINNED case and the kind every site of it has."""
    name, decode = case.removesuffix("-decode"), case.endswith("-decode")
    if name == "static_kv":
        torch.manual_seed(0)
        pos = torch.tensor([6]) if decode else torch.arange(6)
        idx = torch.tensor([[7]]) if decode else torch.randint(0, 128, (1, 6))
        return _sites(StaticKVDecoder().eval(), idx, pos), "manual"
    if name == "cat":
        torch.manual_seed(0)
        idx, past = (torch.tensor([[3]]), empty_past(5)) if decode else (torch.randint(0, 128, (1, 5)), empty_past())
        return _sites(CatDecoder().eval(), idx, past), "manual"
    if name.startswith("tiny-"):
        arch = name.removeprefix("tiny-")
        model, vocab, kind = tiny_model(arch), 256, "manual" if arch == "gemma2" else "sdpa"
    else:
        arch, impl = name.rsplit("-", 1)
        model, vocab, kind = build_tiny_model(arch, impl), 128, "sdpa" if impl == "sdpa" else "manual"
    torch.manual_seed(0)
    ids = torch.randint(3, vocab, (1, 8))
    if arch in ("t5", "bart"):
        return _sites(model, input_ids=ids, decoder_input_ids=ids[:, :4], use_cache=False), kind
    if not decode:
        return _sites(model, input_ids=ids), kind
    with torch.no_grad():
        past = model(input_ids=ids, use_cache=True).past_key_values
    return _sites(model, input_ids=ids[:, -1:], past_key_values=past, use_cache=True), kind


@pytest.mark.parametrize("case", sorted(PINNED))
def test_every_testing_model_has_its_pinned_sites_and_reasons(case: str) -> None:
    sites, kind = _pinned_case_sites(case)
    found = [(s.layer, f"{s.status}: {s.causal_proof if s.rewritable else s.reason}") for s in sites]
    assert found == PINNED[case]
    assert {s.kind for s in sites} == {kind}
