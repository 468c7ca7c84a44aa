"""The fast path of issue 14 on CPU: `model.compile(backend="mixeddimkv")` or `torch.compile(model,
backend="mixeddimkv")` followed by plain `generate()`, whatever cache the user picks, the memory it
holds, transformers' own decode-step compilation over a fixed-region MixedDimCache, and the
GraphedDecoder prefill. CUDA graphs themselves run only on the GPU (benchmarks/check_fast_path.py).

Compiles are slow on 2 cores (~10 s per graph of the tiny model), so each test compiles one or two
models and checks several things on them.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from script_loader import load_script
from torch._dynamo.utils import counters
from transformers import CompileConfig, DynamicCache, GenerationConfig, StaticCache

import mdkv_compile as mdkv
from mdkv_compile import cache as cache_module
from mdkv_compile.backends import torch_compile as backend
from mdkv_compile.bench.e2e import held_bytes
from mdkv_compile.cache import MixedDimCache
from mdkv_compile.hf.cuda_graphs import GraphedDecoder
from mdkv_compile.passes import sites
from mdkv_compile.testing import build_tiny_model, random_llama

OPTS = {"budget": 0.25, "window": 4}
IDS = torch.randint(1, 128, (1, 40), generator=torch.Generator().manual_seed(1))
GEN = {"do_sample": False, "pad_token_id": 0}
ROOT = Path(__file__).resolve().parents[1]


def eager_reference(new_tokens: int) -> tuple[torch.Tensor, MixedDimCache]:
    """Tokens of the eager MixedDimKV reference (mdkv.patch + generate) and its cache."""
    model = build_tiny_model("llama").eval()
    cfg = mdkv.MixedDimKVConfig(**OPTS)
    mdkv.patch(model, cfg)
    cache = MixedDimCache(model.config, cfg)
    return model.generate(IDS, max_new_tokens=new_tokens, past_key_values=cache, **GEN), cache


def cache_tensors(cache) -> list[torch.Tensor]:
    return [t for layer in cache.layers for t in (layer.keys, layer.values)]


def test_torch_compile_wrapper_gets_a_generate_through_the_entry_point() -> None:
    """In a fresh interpreter `torch.compile(model, backend="mixeddimkv")` imports the backend through
    its entry point before building the wrapper, so the wrapper gets its own `generate`; a wrapper
    of another backend defers to the model's. A deep copy is rebuilt with its own. No compile runs."""
    code = """
import copy, sys, torch
from mdkv_compile.testing import build_tiny_model
assert "mdkv_compile.backends.torch_compile" not in sys.modules
model = build_tiny_model("llama")
ours = torch.compile(model, backend="mixeddimkv", options={"budget": 0.25})
from mdkv_compile.backends.torch_compile import _is_mixeddimkv
assert "generate" in ours.__dict__ and ours.generate.__self__ is ours and _is_mixeddimkv(ours)
other = torch.compile(model, backend="eager")
assert not _is_mixeddimkv(other)
twin = copy.deepcopy(ours)
assert twin.generate.__self__ is twin and _is_mixeddimkv(twin)
assert model._compiled_call_impl is None
print("ok")
"""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-3000:]


def test_ensure_registered_is_a_no_op_where_the_entry_point_is() -> None:
    """The benchmarks call it on machines where the package may not be installed; here the entry
    point provides the name, and a second registration (which Dynamo asserts against) never happens."""
    from torch._dynamo.backends.registry import list_backends

    backend.ensure_registered()
    backend.ensure_registered()
    assert "mixeddimkv" in list_backends(exclude_tags=())


@pytest.mark.compile
def test_torch_compile_wrapper_generate_compresses() -> None:
    """`torch.compile(model, backend="mixeddimkv", options=...)` then `.generate()` on what it returns:
    the eager MixedDimKV tokens and the compressed state's bytes (it used to run the plain model and
    compress nothing); the model itself stays uncompiled."""
    torch._dynamo.reset()
    sites.reset_sites()
    ref, ref_cache = eager_reference(8)
    ref_bytes = ref_cache.stored_bytes()
    model = build_tiny_model("llama").eval()
    compiled = torch.compile(model, backend="mixeddimkv", options=OPTS)
    assert torch.equal(compiled.generate(IDS, max_new_tokens=8, **GEN), ref)
    assert backend.compiled_cache_bytes(OPTS, model) == ref_bytes > 0
    assert model._compiled_call_impl is None
    counters.clear()
    assert torch.equal(compiled.generate(IDS, max_new_tokens=8, **GEN), ref)
    assert counters["stats"]["unique_graphs"] == 0  # the second call reuses the compiled graphs
    # reduce-overhead: the wrapper's generate() picks the static cache from the first call (CUDA graphs
    # need its fixed shapes), unless the caller chose a cache
    graphed = torch.compile(model, backend="mixeddimkv", options={**OPTS, "mode": "reduce-overhead"})
    out = graphed.generate(IDS, max_new_tokens=8, return_dict_in_generate=True, **GEN)
    assert torch.equal(out.sequences, ref) and isinstance(out.past_key_values, StaticCache)
    out = graphed.generate(IDS, max_new_tokens=2, use_cache=True, cache_implementation="dynamic",
                           return_dict_in_generate=True, **GEN)
    assert isinstance(out.past_key_values, DynamicCache)


@pytest.mark.compile
def test_model_compile_generate_same_tokens_for_every_cache(monkeypatch: pytest.MonkeyPatch) -> None:
    """`model.compile(backend="mixeddimkv")` + `generate()`: the default cache, transformers' static
    cache (its decode step gets its mask as an input, which the finder trusts only knowing the
    model's attention is causal: the backend hands it the compiled module) and, on a patched model,
    an explicit fixed-region MixedDimCache all give the eager MixedDimKV tokens. The static cache
    holds zero-stride placeholders instead of full-size buffers, and after the prefill nothing but
    the compressed state (and one position per placeholder) is held."""
    torch._dynamo.reset()
    sites.reset_sites()
    ref, ref_cache = eager_reference(8)
    ref_bytes = ref_cache.stored_bytes()
    model = build_tiny_model("llama").eval()
    model.compile(backend="mixeddimkv", options=OPTS)
    counters.clear()
    # A traced model materialises its causal mask; the prompt's attention must still get none (SDPA
    # with is_causal), not a mask SDPA would turn into a float bias the size of the scores.
    prompt_masks = []
    real_dense = cache_module.dense_attention

    def spy(query, key, value, mask, *args):
        if query.shape[2] > 1:
            prompt_masks.append(mask)
        return real_dense(query, key, value, mask, *args)

    monkeypatch.setattr(cache_module, "dense_attention", spy)
    assert torch.equal(model.generate(IDS, max_new_tokens=8, **GEN), ref)

    out = model.generate(IDS, max_new_tokens=8, cache_implementation="static", return_dict_in_generate=True, **GEN)
    assert torch.equal(out.sequences, ref)
    assert len(prompt_masks) == 4 and all(m is None for m in prompt_masks)  # 2 layers x 2 generate() calls
    prefill, decode = backend.LAST_REPORTS[-2:]
    assert decode.rewritten == prefill.rewritten and len(decode.rewritten) == 2 and not decode.left
    assert prefill.placeholders == prefill.rewritten == decode.placeholders and not prefill.kept_cache
    cache = out.past_key_values
    assert isinstance(cache, StaticCache) and cache.get_seq_length() == ref.shape[1] - 1
    for t in cache_tensors(cache):  # generate() sizes it for the tokens it feeds (the last one is not)
        assert t.shape[-2] == ref.shape[1] - 1 and t.stride(2) == 0
    # What stays allocated: the compressed state (no view of the prompt's KV in it) and one position
    # per placeholder.
    layers = sites.site_layers(OPTS, model).values()
    # bookkeeping that stored_bytes leaves out: the selection's counts, the kernel's arrival counts
    counts = sum(layer.selection_counts.nbytes + layer.arrival_counts.nbytes for layer in layers)
    assert held_bytes(*layers) == backend.compiled_cache_bytes(OPTS, model) + counts == ref_bytes + counts
    assert held_bytes(cache) <= 2 * 2 * 16 * 4 * 2 + 64  # layers x k/v x (2 heads x d 16 x fp32), counters

    # A second static generate() (a new StaticCache, as large as the largest so far): no new graphs.
    graphs = counters["stats"]["unique_graphs"]
    assert torch.equal(model.generate(IDS, max_new_tokens=8, cache_implementation="static", **GEN), ref)
    assert counters["stats"]["unique_graphs"] == graphs
    assert counters["stats"]["unique_graphs"] <= 7 and sum(counters["graph_break"].values()) == 0

    # A MixedDimCache carries the state itself: the model must be patched (the attention is then ours,
    # run outside the graph); unpatched, the cache refuses the second update.
    patched = build_tiny_model("llama").eval()
    cfg = mdkv.MixedDimKVConfig(**OPTS)
    mdkv.patch(patched, cfg)
    patched.compile(backend="mixeddimkv", options=OPTS)
    cache = MixedDimCache(patched.config, cfg, max_new_tokens=16)
    assert torch.equal(patched.generate(IDS, max_new_tokens=8, past_key_values=cache, **GEN), ref)
    assert cache.prompt_stored_bytes() == ref_cache.prompt_stored_bytes()  # the regions differ
    with pytest.raises(RuntimeError, match="mdkv.patch"):
        model.generate(IDS, max_new_tokens=2, past_key_values=MixedDimCache(model.config, cfg), **GEN)


@pytest.mark.compile
def test_reduce_overhead_generate_with_static_cache(caplog: pytest.LogCaptureFixture) -> None:
    """`mode="reduce-overhead"` + `generate(cache_implementation="static")`, the configuration that
    crashed on the H200: the decode graph's sites are rewritten (its mask is an input) and the graph
    goes to the backend's own capture (SiteGraphs; on CPU it calls Inductor's code directly), never to
    Inductor's CUDA graphs; the fixed region has a slot per token generate() feeds; the default cache
    gives the same tokens (without CUDA graphs, said in the log), and later calls that choose no cache
    get the static one (an explicit cache choice is kept)."""
    torch._dynamo.reset()
    sites.reset_sites()
    ref, _ = eager_reference(8)
    model = build_tiny_model("llama").eval()
    model.compile(backend="mixeddimkv", options={**OPTS, "mode": "reduce-overhead"})
    with caplog.at_level(logging.WARNING, logger=backend.__name__):
        assert torch.equal(model.generate(IDS, max_new_tokens=8, cache_implementation="static", **GEN), ref)
    without = [r.getMessage() for r in caplog.records if "without CUDA graphs" in r.getMessage()]
    assert not without  # the decode graph is captured (a prompt never is, and is not warned about)
    decode = backend.LAST_REPORTS[-1]
    assert decode.one_token == decode.rewritten and len(decode.rewritten) == 2
    for key in decode.rewritten:
        layer = sites.site_layer(key)
        assert layer.max_new_tokens == layer.n_new == 7  # the last new token is not fed
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger=backend.__name__):
        assert torch.equal(model.generate(IDS, max_new_tokens=8, **GEN), ref)
    assert any("grows every step" in r.getMessage() and "cache_implementation='static'" in r.getMessage()
               for r in caplog.records)
    out = model.generate(IDS, max_new_tokens=8, return_dict_in_generate=True, **GEN)
    assert torch.equal(out.sequences, ref) and isinstance(out.past_key_values, StaticCache)
    out = model.generate(IDS, max_new_tokens=8, cache_implementation="dynamic", return_dict_in_generate=True, **GEN)
    assert torch.equal(out.sequences, ref) and isinstance(out.past_key_values, DynamicCache)
    model.compile(backend="mixeddimkv", options=OPTS)  # compiled again, not in reduce-overhead: its own generate()
    out = model.generate(IDS, max_new_tokens=8, return_dict_in_generate=True, **GEN)
    assert isinstance(out.past_key_values, DynamicCache)


@pytest.mark.compile
def test_reduce_overhead_patched_model_gets_whole_step_replays() -> None:
    """A patched model compiled under reduce-overhead, generating over a fixed-region MixedDimCache: its
    first call compiles it (the eager MixedDimKV tokens) and gives it a `get_compiled_call` whose result
    transformers uses for the decode steps of later calls: `GenerateSteps`, which replays one-token steps
    from a `GraphedDecoder` capture on CUDA and calls transformers' own compiled call otherwise (here,
    on the CPU, every call). Unpatched, the model gets transformers' own again."""
    from mdkv_compile.hf.cuda_graphs import GenerateSteps, replayable

    torch._dynamo.reset()
    ref, _ = eager_reference(8)
    cfg = mdkv.MixedDimKVConfig(**OPTS)
    model = build_tiny_model("llama").eval()
    mdkv.patch(model, cfg)
    model.compile(backend="mixeddimkv", options={**OPTS, "mode": "reduce-overhead"})
    cache = MixedDimCache(model.config, cfg, max_new_tokens=16)
    assert torch.equal(model.generate(IDS, max_new_tokens=8, past_key_values=cache, **GEN), ref)
    steps = model.get_compiled_call(CompileConfig())
    assert isinstance(steps, GenerateSteps)
    calls = []
    steps.fallback = lambda **kwargs: calls.append(kwargs) or "fallback"
    step = {"input_ids": ref[:, -1:], "past_key_values": cache, "position_ids": torch.tensor([[48]]), "use_cache": True}
    assert not replayable(cache, step["input_ids"])  # a CPU tensor: no CUDA graph
    assert steps(**step) == "fallback" and calls[-1] is not step and calls[-1]["past_key_values"] is cache
    mdkv.unpatch(model)
    assert not isinstance(model.get_compiled_call(CompileConfig()), GenerateSteps)


def test_decode_steps_need_no_mask_at_generates_positions() -> None:
    """What a `GenerateSteps` replay relies on: a patched model's decode step over a fixed-region
    MixedDimCache, called as `GraphedDecoder` calls it (no attention mask, `generate()`'s position ids),
    gives `generate()`'s own tokens for a left-padded batch (the store recorded the padding at prefill).
    Run on the CPU through transformers' decode-step hook, where the replay itself cannot run."""
    cfg = mdkv.MixedDimKVConfig(**OPTS)
    model = build_tiny_model("llama").eval()
    mdkv.patch(model, cfg)
    ids = torch.randint(1, 128, (2, 40), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    mask[0, :7] = 0
    kwargs = dict(attention_mask=mask, max_new_tokens=10, output_logits=True, return_dict_in_generate=True, **GEN)
    ref = model.generate(ids, past_key_values=MixedDimCache(model.config, cfg, max_new_tokens=16), **kwargs)
    steps = []

    def as_graphed_decoder(compile_config: CompileConfig):
        def step(input_ids, position_ids, past_key_values, **ignored):
            steps.append(position_ids[:, 0].tolist())
            return model(input_ids=input_ids, position_ids=position_ids, past_key_values=past_key_values,
                         use_cache=True, logits_to_keep=1)
        return step

    model.get_compiled_call = as_graphed_decoder
    config = CompileConfig()
    config._compile_all_devices = True  # transformers takes the hook on the CPU too
    out = model.generate(ids, past_key_values=MixedDimCache(model.config, cfg, max_new_tokens=16),
                         compile_config=config, **kwargs)
    assert len(steps) == 9 and steps[0] == [33, 40]  # the padded row's positions skip its 7 pads
    assert torch.equal(out.sequences, ref.sequences)
    torch.testing.assert_close(torch.stack(out.logits), torch.stack(ref.logits))


def test_static_cache_is_picked_only_where_the_call_chooses_none() -> None:
    """What reduce-overhead's `generate` adds: `cache_implementation="static"` for a call that chose no
    cache, and nothing where the call or its generation config chose one, turned caching off, or asks
    for assisted generation (which refuses a static cache)."""
    model = build_tiny_model("llama")
    pick = backend._static_unless_chosen
    assert pick(model, (), {"max_new_tokens": 4}) == {"max_new_tokens": 4, "cache_implementation": "static"}
    for args, kwargs in (
        ((), {"past_key_values": DynamicCache()}),
        ((), {"cache_implementation": "dynamic"}),
        ((), {"use_cache": False}),
        ((), {"generation_config": GenerationConfig(cache_implementation="offloaded")}),
        ((IDS, GenerationConfig(use_cache=False)), {}),
        ((), {"prompt_lookup_num_tokens": 3}),
        ((), {"assistant_model": model}),
    ):
        assert pick(model, args, kwargs) is kwargs, (args, kwargs)


def test_fixed_region_cache_is_compileable() -> None:
    model = build_tiny_model("llama")
    assert MixedDimCache(model.config, max_new_tokens=4).is_compileable
    assert not MixedDimCache(model.config).is_compileable


@pytest.mark.compile
def test_transformers_compile_config_with_fixed_region_cache() -> None:
    """transformers' own decode-step compilation (`generate(..., compile_config=...)`, forced onto the
    CPU) over a patched model and a MixedDimCache with a fixed decode region: the step is compiled
    (the cache update and the attention run outside the graph), tokens equal the eager reference,
    and longer generations add no graphs."""
    torch._dynamo.reset()
    ref, _ = eager_reference(20)
    model = build_tiny_model("llama").eval()
    cfg = mdkv.MixedDimKVConfig(**OPTS)
    mdkv.patch(model, cfg)
    config = CompileConfig(mode="default")
    config._compile_all_devices = True  # transformers compiles on CUDA only unless told
    counters.clear()
    cache = MixedDimCache(model.config, cfg, max_new_tokens=24)
    out = model.generate(IDS, max_new_tokens=6, past_key_values=cache, compile_config=config, **GEN)
    assert torch.equal(out, ref[:, : IDS.shape[1] + 6])
    graphs = counters["stats"]["unique_graphs"]
    assert graphs > 0
    cache = MixedDimCache(model.config, cfg, max_new_tokens=24)
    assert torch.equal(model.generate(IDS, max_new_tokens=20, past_key_values=cache, compile_config=config, **GEN), ref)
    assert counters["stats"]["unique_graphs"] == graphs


def test_graphed_decoder_prefill_runs_in_inference_mode() -> None:
    """`GraphedDecoder.from_prompt` prefills without autograd state (the README recipe without it kept
    the prompt's whole autograd graph: 106 GiB against 11 on the H200). The replay needs CUDA."""
    model = build_tiny_model("llama").eval()
    cfg = mdkv.MixedDimKVConfig(**OPTS)
    mdkv.patch(model, cfg)
    cache = MixedDimCache(model.config, cfg, max_new_tokens=8)
    decoder, logits = GraphedDecoder.from_prompt(model, cache, IDS)
    assert logits.shape == (1, model.config.vocab_size) and logits.is_inference() and logits.grad_fn is None
    assert decoder.length == IDS.shape[1] and cache.layers[0].store is not None
    twin = build_tiny_model("llama").eval()  # the same weights (seeded)
    mdkv.patch(twin, cfg)
    with torch.no_grad():
        cache = MixedDimCache(twin.config, cfg, max_new_tokens=8)
        want = twin(IDS, past_key_values=cache, use_cache=True).logits[:, -1]
    torch.testing.assert_close(logits, want)


@pytest.mark.compile
def test_check_fast_path_script_runs_its_quick_shapes(tmp_path: Path) -> None:
    """The GPU check (issue 14's table) on its tiny CPU shapes: device time is scarce, so the script
    must not be first run on the GPU. Each path in its own process; the compiled path's tokens equal
    the eager MixedDimKV ones in float32 at every call."""
    out = tmp_path / "quick.json"
    run = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "check_fast_path.py"), "--quick", "--paths", "patch,mdkv-static",
         "--dtype", "float32", "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["args"]["dtype"] == "float32"
    paths = result["paths"]
    assert paths["patch"]["ok"] and paths["mdkv-static"]["ok"]
    calls = paths["mdkv-static"]["calls"]
    assert len(calls) == 4 and all(call["tokens_equal"] for call in calls)


def test_baseline_prefill_chunk_prefills_the_baselines_in_chunks() -> None:
    """check_fast_path.py --baseline-prefill-chunk (the 32-layer baselines on an H100): plain
    generate() runs its prompt N tokens per forward and gives the one-pass prefill's tokens; the
    compressed paths keep their own prefill."""
    check = load_script("benchmarks/check_fast_path.py")
    model = random_llama(attn_implementation="sdpa", **{**check.TINY, "num_hidden_layers": 2},
                         bos_token_id=None, eos_token_id=None, pad_token_id=0)
    ids = check._prompt(2, 48, check.TINY["vocab_size"], "cpu", 0)
    lengths: list[int] = []
    model.register_forward_pre_hook(lambda _, args, kwargs: lengths.append(kwargs["input_ids"].shape[1]),
                                    with_kwargs=True)
    one_pass = check.Runner("plain", model, 0.0625, 4)(ids)[0]
    assert lengths == [48, 1, 1, 1]
    lengths.clear()
    chunked = check.Runner("plain", model, 0.0625, 4, baseline_prefill_chunk=20)(ids)[0]
    assert lengths == [20, 20, 8, 1, 1, 1]
    assert torch.equal(chunked, one_pass)
    assert "prefill_chunk_size" not in check.Runner("patch", model, 0.0625, 4, baseline_prefill_chunk=20).kwargs


def test_check_fast_path_passes_its_options_to_each_path(tmp_path: Path) -> None:
    """The script's workers get --baseline-prefill-chunk and --timed-only: plain generate() ends after
    its timed call."""
    out = tmp_path / "chunked.json"
    run = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "check_fast_path.py"), "--quick", "--paths", "plain",
         "--baseline-prefill-chunk", "16", "--timed-only", "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["args"]["baseline_prefill_chunk"] == 16
    plain = result["paths"]["plain"]
    assert plain["generate_kwargs"] == {"prefill_chunk_size": 16}
    assert plain["ok"] and [call["call"] for call in plain["calls"]] == ["first", "timed"]


def _peak_bytes_above_start(run) -> int:
    """Peak of the bytes the CPU allocator held during `run()` above what it held at its start, from
    the profiler's memory timeline (allocations and frees of every tensor, Inductor's buffers too)."""
    from torch.profiler import ProfilerActivity, profile
    from torch.profiler._memory_profiler import Action

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True) as prof:
        run()
    current = peak = 0
    for _, action, (key, _), size in prof._memory_profile().timeline:
        if key.device.type != "cpu":
            continue
        current += size if action == Action.CREATE else -size if action == Action.DESTROY else 0
        peak = max(peak, current)
    return peak


@pytest.mark.compile
def test_compiled_prefill_peak_is_at_most_plain_generate() -> None:
    """Issue 14's prefill-memory target on the CPU: a compiled model that compresses as it goes (the
    default cache, or the static one) peaks no higher than plain generate(), which holds every layer's
    full KV. Inductor's buffer reuse, left on in a prompt graph, kept the MLP's buffers allocated under
    the site ops' compression temporaries: above plain with the default cache."""
    torch._dynamo.reset()
    sites.reset_sites()
    config = dict(vocab_size=512, hidden_size=256, intermediate_size=1024, num_attention_heads=8,
                  num_key_value_heads=2, head_dim=32, max_position_embeddings=4096, num_hidden_layers=4,
                  bos_token_id=None, eos_token_id=None, pad_token_id=0)
    from mdkv_compile.testing import random_llama

    model = random_llama(attn_implementation="sdpa", **config)
    ids = torch.randint(1, 512, (2, 2048), generator=torch.Generator().manual_seed(0))
    peaks = {}
    with torch.inference_mode():
        for name, kwargs in (("plain", {}), ("default", {}), ("static", {"cache_implementation": "static"})):
            if name == "default":
                model.compile(backend="mixeddimkv", options={"budget": 0.0625})

            def run(kwargs=kwargs):
                return model.generate(ids, max_new_tokens=2, do_sample=False, **kwargs)

            run()  # compiles
            peaks[name] = _peak_bytes_above_start(run)
    assert peaks["default"] <= peaks["plain"] and peaks["static"] <= peaks["plain"], peaks
