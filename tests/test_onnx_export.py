"""ONNX export of the MixedDimKV decode step, run on real ONNX Runtime (CPU) against PyTorch."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import onnx
import onnx.inliner
import onnxruntime as ort
import pytest
import torch

import mdkv_compile as mdkv
from mdkv_compile.backends.onnx.export import DOMAIN, OP_NAME, ExportError, align_store, export_onnx
from mdkv_compile.backends.onnx.runtime import OnnxGenerator
from mdkv_compile.cache import MixedDimCache
from mdkv_compile.testing import tiny_model

NEW_TOKENS = 24
PROMPT = 256
HAS_TRT = importlib.util.find_spec("tensorrt") is not None


def _prompt(seed: int = 1, n: int = PROMPT) -> torch.Tensor:
    return torch.randint(0, 256, (1, n), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def exported(request, tmp_path_factory) -> tuple[str, torch.nn.Module, mdkv.MixedDimKVConfig, Path]:
    arch = request.param
    model = tiny_model(arch)
    # budget 0.5 on a 256-token prompt: the tiny models store a mix of full and reduced tiers, among
    # them decoupled ones (16/8, 8/4) before a coupled one (2), so a tier starts at different offsets of
    # the key and the value rows (at 0.25 they use the coupled tier only; on shorter prompts the
    # per-prompt basis costs more than it saves and the policy only evicts)
    cfg = mdkv.MixedDimKVConfig(budget=0.5)
    mdkv.patch(model, cfg)
    out = tmp_path_factory.mktemp(f"export_{arch}") / "decode"
    export_onnx(model, cfg, out, max_prompt_tokens=PROMPT, max_new_tokens=NEW_TOKENS)
    return arch, model, cfg, out


@pytest.mark.compile
def test_ort_greedy_matches_pytorch(exported) -> None:
    _, model, _, out = exported
    ids = _prompt()
    ref = model.generate(
        ids, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False,
        output_logits=True, return_dict_in_generate=True,
    )
    # prefill model loaded from disk; the details (logits, bytes) on request, as generate() has them
    got = OnnxGenerator(out).generate(ids, max_new_tokens=NEW_TOKENS, return_dict_in_generate=True)
    assert torch.equal(got.sequences, ref.sequences)
    err = max(float((a.float() - b).abs().max()) for a, b in zip(ref.logits, got.logits, strict=True))
    assert err < 1e-3


@pytest.mark.compile
def test_prompt_store_uses_reduced_tiers(exported) -> None:
    """The export's comparison above is only meaningful if the store really holds reduced tiers: a
    decoupled tier (keys and values at different dims) followed by a filled tier, where the key and
    the value rows of the static layout part."""
    _, model, cfg, _ = exported
    cache = MixedDimCache(model.config, cfg)
    with torch.no_grad():
        model(input_ids=_prompt(), past_key_values=cache, use_cache=True)
    parted = False
    for layer in cache.layers:
        store = layer.store
        filled = [int(k.shape[0]) > 0 for k in store.keys]
        decoupled = [rk != rv for rk, rv in store.tiers]
        parted |= any(decoupled[t] and filled[t] and any(filled[t + 1 :]) for t in range(len(filled)))
    assert parted


@pytest.mark.compile
def test_checker_and_mdkv_nodes(exported) -> None:
    _, model, _, out = exported
    path = out / "decode.onnx"
    onnx.checker.check_model(str(path), full_check=True)
    proto = onnx.load(str(path))
    nodes = [n for n in proto.graph.node if n.domain == DOMAIN]
    assert len(nodes) == model.config.num_hidden_layers
    assert all(n.op_type == OP_NAME for n in nodes)
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in nodes[0].attribute}
    assert attrs["plugin_namespace"] == b"mdkv" and attrs["plugin_version"] == b"1"
    functions = {(f.domain, f.name) for f in proto.functions}
    assert functions == {(DOMAIN, OP_NAME)}
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["node"]["count"] == len(nodes)
    # the default tiers for head dim 16: (8, 8), (4, 2), (2, 2) after the full tier
    assert manifest["tier_dims"] == attrs["tier_dims"] == [16, 8, 4, 2]
    assert manifest["value_dims"] == attrs["value_dims"] == [16, 8, 2, 2]
    assert manifest["format_version"] == 3
    assert manifest["versions"]["onnx"] == onnx.__version__


@pytest.mark.compile
def test_inlined_graph_is_standard_ops_and_runs(exported) -> None:
    _, model, _, out = exported
    inlined = onnx.inliner.inline_local_functions(onnx.load(str(out / "decode.onnx")))
    assert not inlined.functions
    assert {n.domain for n in inlined.graph.node} <= {"", "ai.onnx"}
    ids = _prompt(seed=2)
    a = OnnxGenerator(out, model=model, inline=True).generate(ids, max_new_tokens=12)
    b = OnnxGenerator(out, model=model).generate(ids, max_new_tokens=12)
    assert torch.equal(a, b)


@pytest.mark.compile
def test_cache_inputs_bytes_equal_static_store(exported) -> None:
    _, model, cfg, out = exported
    manifest = json.loads((out / "manifest.json").read_text())
    session = ort.InferenceSession(str(out / "decode.onnx"))
    dtypes = {"tensor(float)": 4, "tensor(int32)": 4}
    graph_bytes = sum(
        int(np.prod(i.shape)) * dtypes[i.type] for i in session.get_inputs() if i.name.startswith("store.")
    )
    cache = MixedDimCache(model.config, cfg)
    with torch.no_grad():
        model(input_ids=_prompt(), past_key_values=cache, use_cache=True)
    dims = tuple(manifest["tier_dims"]), tuple(manifest["value_dims"])
    stores = [align_store(layer.store, dims[0], manifest["capacity"], dims[1]) for layer in cache.layers]
    store_bytes = sum(s.stored_bytes() for s in stores)
    assert graph_bytes == store_bytes == manifest["store_bytes"]


@pytest.mark.compile
def test_prompt_over_capacity_fails_clearly(exported) -> None:
    _, model, _, out = exported
    gen = OnnxGenerator(out, model=model)
    with pytest.raises(ValueError, match=f"allows {PROMPT}"):
        gen.generate(_prompt(n=PROMPT + 8), max_new_tokens=4)
    with pytest.raises(ValueError, match="new-token slots"):
        gen.generate(_prompt(), max_new_tokens=NEW_TOKENS + 8)


@pytest.mark.compile
def test_eviction_method_exports_without_basis(tmp_path) -> None:
    model = tiny_model("llama")
    cfg = mdkv.MixedDimKVConfig(budget=0.25, method="snapkv")
    mdkv.patch(model, cfg)
    out = export_onnx(model, cfg, tmp_path / "snap", max_prompt_tokens=PROMPT, max_new_tokens=8)
    names = [i.name for i in ort.InferenceSession(str(out / "decode.onnx")).get_inputs()]
    assert not any("basis" in n for n in names)
    ids = _prompt()
    ref = model.generate(ids, max_new_tokens=8, min_new_tokens=8, do_sample=False)
    assert torch.equal(OnnxGenerator(out, model=model).generate(ids, max_new_tokens=8), ref)


@pytest.mark.parametrize(
    ("arch", "method", "match"),
    [("gemma2", "mixeddimkv", "sliding"), ("llama", "lowrank", "lowrank")],
)
def test_unexportable_fails_before_writing(tmp_path, arch: str, method: str, match: str) -> None:
    model = tiny_model(arch)
    cfg = mdkv.MixedDimKVConfig(budget=0.25, method=method)
    out = tmp_path / "nope"
    with pytest.raises(ExportError, match=match):
        export_onnx(model, cfg, out)
    assert not out.exists() and not list(tmp_path.iterdir())


def test_non_empty_out_dir_that_is_not_an_export_is_refused(tmp_path) -> None:
    model = tiny_model("llama")
    (tmp_path / "keep.txt").write_text("x")
    for overwrite in (False, True):
        with pytest.raises(ExportError, match="not an mdkv export"):
            export_onnx(model, mdkv.MixedDimKVConfig(budget=0.25), tmp_path, overwrite=overwrite)
    assert [p.name for p in tmp_path.iterdir()] == ["keep.txt"]


@pytest.mark.compile
def test_cli_export_onnx_then_generate(tmp_path) -> None:
    from mdkv_compile.cli import main

    model = tiny_model("qwen2")
    model.save_pretrained(tmp_path / "hf")
    out = tmp_path / "exp"
    rc = main([
        "export", "onnx", "--model", str(tmp_path / "hf"), "--budget", "0.25",
        "--max-prompt-tokens", str(PROMPT), "--max-new-tokens", "8", "--out", str(out),
    ])
    assert rc == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["prefill"]["model"] == str((tmp_path / "hf").resolve())
    ids = _prompt()
    got = OnnxGenerator(out).generate(ids, max_new_tokens=8)
    mdkv.patch(model, mdkv.MixedDimKVConfig(budget=0.25))
    ref = model.generate(ids, max_new_tokens=8, min_new_tokens=8, do_sample=False)
    assert torch.equal(got, ref)


@pytest.mark.skipif(HAS_TRT, reason="TensorRT is installed: the no-TensorRT error path does not apply")
def test_cli_export_trt_without_tensorrt_names_it(tmp_path, capsys) -> None:
    from mdkv_compile.cli import main

    rc = main(["export", "trt", "--model", "smollm2", "--out", str(tmp_path / "e")])
    assert rc == 2
    assert "TensorRT" in capsys.readouterr().err
    assert not (tmp_path / "e").exists()


@pytest.mark.compile
@pytest.mark.skipif(not HAS_TRT, reason="needs TensorRT (not installed): builds an engine with the mdkv plugin")
def test_trt_engine_from_export(exported, tmp_path) -> None:
    from mdkv_compile.backends.tensorrt import build_engine

    _, _, _, out = exported
    engine = build_engine(out / "decode.onnx", tmp_path / "decode.engine")
    assert engine.stat().st_size > 0


@pytest.mark.slow
def test_smollm2_export_matches_pytorch(tmp_path) -> None:
    import copy

    from mdkv_compile.assets import load_model

    model, tok = load_model("smollm2")
    model = copy.deepcopy(model)  # load_model's object is shared: do not leave it patched
    cfg = mdkv.MixedDimKVConfig(budget=0.1)
    mdkv.patch(model, cfg)
    out = export_onnx(model, cfg, tmp_path / "smol", max_prompt_tokens=256, max_new_tokens=16, prefill_source="smollm2")
    text = "The capital of France is Paris. The capital of Italy is Rome. " * 8 + "The capital of France is"
    ids = tok(text, return_tensors="pt").input_ids[:, :256]
    ref = model.generate(ids, max_new_tokens=16, min_new_tokens=16, do_sample=False)
    got = OnnxGenerator(out, model=model).generate(ids, max_new_tokens=16)
    assert torch.equal(got, ref)


# --- the TensorRT plugin's kernel (runs without TensorRT: Triton on the GPU or its CPU interpreter)


# (key dims, value dims) per tier of the random static stores: coupled; decoupled with a reduced tier
# keeping every key coordinate, values narrower and wider than their keys, and a coupled one
STORE_TIERS = {
    "coupled": ((16, 8, 4, 2), (16, 8, 4, 2)),
    "decoupled": ((16, 16, 8, 3, 2), (16, 8, 4, 6, 2)),
    "full": ((16,), (16,)),
}


def _random_store(tiers: str, seed: int = 0):
    from mdkv_compile.core.static import StaticStore

    g = torch.Generator().manual_seed(seed)
    bsz, n_kv, d, cap = 2, 2, 16, 200
    tier_dims, value_dims = STORE_TIERS[tiers]
    counts = [[3, 5, 2, 1, 4], [0, 7, 0, 4, 0], [4, 0, 0, 0, 9], [1, 1, 1, 1, 1]]
    if len(tier_dims) == 1:
        counts = [[3], [0], [12], [1]]
    counts = torch.tensor(counts, dtype=torch.int32)[:, : len(tier_dims)]
    basis = [None, None]
    if len(tier_dims) > 1:
        basis = [torch.randn(bsz * n_kv, d, max(dims[1:]), generator=g) for dims in (tier_dims, value_dims)]
    keys, values = (torch.randn(bsz * n_kv, cap, generator=g) for _ in range(2))
    store = StaticStore(tier_dims, keys, values, counts, basis[0], basis[1], bsz, n_kv, d, value_dims)
    q = torch.randn(bsz, 2 * n_kv, 1, d, generator=g)
    region = [torch.randn(bsz, n_kv, 8, d, generator=g) for _ in range(2)]
    return q, store, region


def _to(store, device: str):
    from dataclasses import replace

    move = {k: getattr(store, k).to(device) for k in ("keys", "values", "counts", "basis_k", "basis_v")
            if getattr(store, k) is not None}
    return replace(store, **move)


@pytest.mark.parametrize("tiers", list(STORE_TIERS))
@pytest.mark.parametrize("softcap", [None, 5.0])
def test_plugin_kernel_matches_attend_static(tiers: str, softcap: float | None) -> None:
    from mdkv_compile.core.static import attend_static
    from mdkv_compile.kernels.static_decode import static_decode_attention

    device = "cuda" if torch.cuda.is_available() else "cpu"  # cpu: Triton's interpreter (conftest)
    q, store, (kn, vn) = _random_store(tiers)
    n_new = torch.tensor(3)
    ref = attend_static(q, store, kn, vn, n_new, 0.3, softcap)
    got = static_decode_attention(q.to(device), _to(store, device), kn.to(device), vn.to(device), n_new.to(device),
                                  0.3, softcap)
    assert (got.cpu() - ref).abs().max() < 1e-5


def test_align_store_places_each_tier_by_its_pair() -> None:
    """A store whose tiers are a subset of the export's, in another order: each goes to the export's
    tier of the same (key dims, value dims); the aligned static store attends as the packed one."""
    from mdkv_compile.core.attention import attend_packed
    from mdkv_compile.core.packing import pack
    from mdkv_compile.core.static import attend_static

    g = torch.Generator().manual_seed(4)
    bsz, n_kv, n, d = 1, 2, 40, 16
    tiers = ((16, 16), (2, 4), (16, 8))  # not the export's order
    export = ((16, 16), (16, 8), (8, 4), (4, 2), (2, 4))
    key, value = (torch.randn(bsz, n_kv, n, d, generator=g) for _ in range(2))
    bk = torch.linalg.qr(torch.randn(bsz * n_kv, d, d, generator=g))[0]
    bv = torch.linalg.qr(torch.randn(bsz * n_kv, d, d, generator=g))[0][..., :8]
    pick = torch.tensor([(0, 0), *tiers])[torch.randint(0, 4, (bsz, n_kv, n), generator=g)]
    store = pack(key, value, pick[..., 0], tuple(rk for rk, _ in tiers), key @ bk.view(bsz, n_kv, d, d),
                 value @ bv.view(bsz, n_kv, d, 8), bk, bv, value_dims=tuple(rv for _, rv in tiers),
                 chosen_value_dim=pick[..., 1])
    static = align_store(store, tuple(rk for rk, _ in export), 2 * n * d, tuple(rv for _, rv in export))
    assert static.tier_dims == (16, 16, 8, 4, 2) and static.value_dims == (16, 8, 4, 2, 4)
    assert static.basis_k.shape[-1] == 16 and static.basis_v.shape[-1] == 8
    assert torch.equal(static.counts[:, [0, 4, 1]].long(), torch.stack([store.counts(t) for t in range(3)], 1))
    assert (static.counts[:, 2:4] == 0).all()
    q = torch.randn(bsz, 2 * n_kv, 1, d, generator=g)
    kn, vn = (torch.randn(bsz, n_kv, 4, d, generator=g) for _ in range(2))
    ref = attend_packed(q, store, kn[:, :, :3], vn[:, :, :3], scale=0.3)
    torch.testing.assert_close(attend_static(q, static, kn, vn, torch.tensor(3), 0.3), ref, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="does not know"):
        align_store(store, (16, 16, 2), 2 * n * d)  # coupled (2, 2): not the store's (2, 4)


@pytest.mark.compile
def test_onnx_function_matches_attend_static_on_decoupled_store() -> None:
    """The model-local function (attend_static in standard ops) on ONNX Runtime over a decoupled static
    store: a reduced tier keeping every key coordinate, values narrower and wider than their keys."""
    from onnx import TensorProto, helper

    from mdkv_compile.backends.onnx.export import FUNCTION_INPUTS, OPSET, _function_proto
    from mdkv_compile.core.static import attend_static

    q, store, (kn, vn) = _random_store("decoupled")
    n_new = torch.tensor(3)
    example = [q, store.keys, store.values, store.counts, kn, vn, n_new, store.basis_k, store.basis_v]
    attrs = dict(tier_dims=list(store.tier_dims), value_dims=list(store.value_dims), kv_heads=store.kv_heads,
                 scale=0.3, softcap=0.0)
    opsets = [helper.make_opsetid("", OPSET), helper.make_opsetid(DOMAIN, 1)]
    types = {torch.float32: TensorProto.FLOAT, torch.int32: TensorProto.INT32, torch.int64: TensorProto.INT64}
    inputs = [helper.make_tensor_value_info(name, types[t.dtype], list(t.shape))
              for name, t in zip(FUNCTION_INPUTS, example, strict=True)]
    node = helper.make_node(OP_NAME, FUNCTION_INPUTS, ["out"], domain=DOMAIN, **attrs, plugin_namespace="mdkv",
                            plugin_version="1")
    graph = helper.make_graph([node], "attn", inputs, [helper.make_tensor_value_info("out", TensorProto.FLOAT, None)])
    model = helper.make_model(graph, opset_imports=opsets, functions=[_function_proto(example, attrs, opsets)])
    session = ort.InferenceSession(model.SerializeToString())
    (got,) = session.run(None, {name: t.numpy() for name, t in zip(FUNCTION_INPUTS, example, strict=True)})
    ref = attend_static(q, store, kn, vn, n_new, 0.3)
    assert (torch.from_numpy(got) - ref).abs().max() < 1e-5


@pytest.mark.compile
def test_plugin_kernel_on_a_prompt_store(exported) -> None:
    """The kernel over a real compressed prompt (mixed tiers, per-owner bases) laid out for the export."""
    from mdkv_compile.core.static import attend_static
    from mdkv_compile.kernels.static_decode import static_decode_attention

    _, model, cfg, out = exported
    manifest = json.loads((out / "manifest.json").read_text())
    cache = MixedDimCache(model.config, cfg)
    with torch.no_grad():
        model(input_ids=_prompt(), past_key_values=cache, use_cache=True)
    store = align_store(cache.layers[-1].store, tuple(manifest["tier_dims"]), manifest["capacity"],
                        tuple(manifest["value_dims"]))
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, model.config.num_attention_heads, 1, 16, generator=g)
    kn, vn = (torch.randn(1, 2, NEW_TOKENS, 16, generator=g) for _ in range(2))
    n_new = torch.tensor(5)
    ref = attend_static(q, store, kn, vn, n_new, 0.25)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = [t.to(device) for t in (q, kn, vn, n_new)]
    got = static_decode_attention(dev[0], _to(store, device), dev[1], dev[2], dev[3], 0.25)
    assert (got.cpu() - ref).abs().max() < 1e-5


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs Triton")
def test_aot_ptx_compiles_without_a_gpu() -> None:
    """What the QDP aot_impl hands TensorRT: PTX of one kernel, no scratch buffers."""
    from mdkv_compile.kernels.static_decode import compile_ptx

    for tier_dims, value_dims in (STORE_TIERS["coupled"], STORE_TIERS["decoupled"]):
        name, ptx, threads, shared = compile_ptx(tier_dims, 2, 0.25, 0.0, value_dims=value_dims)
        assert name == "static_decode_kernel" and f".entry {name}(" in ptx and threads == 128
        # inputs (9 pointers), CAP/NCAP/HQ (u32), output, then Triton's two scratch pointers
        entry = ptx[ptx.index(f".entry {name}(") : ptx.index(")", ptx.index(f".entry {name}("))]
        assert entry.count(".param .u64") == 12 and entry.count(".param .u32") == 3


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: launches the AOT PTX as TensorRT would")
@pytest.mark.parametrize("tiers", ["coupled", "decoupled"])
def test_aot_ptx_launch_matches_attend_static(tiers: str) -> None:
    """Loads the AOT PTX with the CUDA driver and launches it with QDP's argument order (inputs,
    int32 scalars, output; Triton's scratch pointers null): the ABI TensorRT's AOT path relies on."""
    import ctypes

    from cuda.bindings import driver as cu

    from mdkv_compile.core.static import attend_static
    from mdkv_compile.kernels.static_decode import compile_ptx

    q, store, (kn, vn) = _random_store(tiers)
    n_new = torch.tensor(3)
    ref = attend_static(q, store, kn, vn, n_new, 0.3)
    major, minor = torch.cuda.get_device_capability()
    name, ptx, threads, shared = compile_ptx(store.tier_dims, store.kv_heads, 0.3, 0.0, "fp32", major * 10 + minor,
                                             store.value_dims)
    torch.cuda.init()
    torch.zeros(1, device="cuda")  # make torch's primary context current
    err, module = cu.cuModuleLoadData(ptx.encode() + b"\0")
    assert err == cu.CUresult.CUDA_SUCCESS, err
    err, fn = cu.cuModuleGetFunction(module, name.encode())
    assert err == cu.CUresult.CUDA_SUCCESS, err
    s = _to(store, "cuda")
    tensors = [q.cuda(), s.keys, s.values, s.counts, kn.cuda(), vn.cuda(), n_new.cuda(), s.basis_k, s.basis_v]
    out = torch.empty_like(tensors[0])
    ptr, i32 = ctypes.c_void_p, ctypes.c_int32
    values = (*[t.data_ptr() for t in tensors], store.capacity, kn.shape[2], q.shape[1], out.data_ptr(), 0, 0)
    types = (*[ptr] * 9, i32, i32, i32, ptr, ptr, ptr)
    err, = cu.cuLaunchKernel(fn, q.shape[0] * q.shape[1], 1, 1, threads, 1, 1, shared, 0, (values, types), 0)
    assert err == cu.CUresult.CUDA_SUCCESS, err
    torch.cuda.synchronize()
    assert (out.cpu() - ref).abs().max() < 1e-5


@pytest.mark.compile
def test_batch_of_two_matches_pytorch(tmp_path) -> None:
    model = tiny_model("llama")
    cfg = mdkv.MixedDimKVConfig(budget=0.25)
    mdkv.patch(model, cfg)
    out = export_onnx(model, cfg, tmp_path / "b2", batch=2, max_prompt_tokens=PROMPT, max_new_tokens=8)
    ids = torch.cat([_prompt(seed=3), _prompt(seed=4)])
    ref = model.generate(ids, max_new_tokens=8, min_new_tokens=8, do_sample=False)
    assert torch.equal(OnnxGenerator(out, model=model).generate(ids, max_new_tokens=8), ref)


@pytest.mark.compile
def test_file_stands_alone(exported) -> None:
    """The checker passes where no mdkv schema is registered (a deployment process), and the
    local function is what stock ORT runs: without it the node is opaque and ORT refuses it."""
    import subprocess
    import sys

    _, _, _, out = exported
    path = out / "decode.onnx"
    code = (
        f"import onnx; onnx.checker.check_model({str(path)!r}, full_check=True); "
        f"print(onnx.defs.has({OP_NAME!r}, {DOMAIN!r}))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False"
    proto = onnx.load(str(path))
    del proto.functions[:]
    with pytest.raises(Exception, match=OP_NAME):
        ort.InferenceSession(proto.SerializeToString())
