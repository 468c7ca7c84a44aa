"""Calibrated bases: post-RoPE key and value second moments accumulated over calibration text
through a patched model, saved as one basis per (layer, KV head) (`core.bases.save_calibrated`).

`capture_kv` hands every prompt's keys and values to a callback as a `MixedDimLayer` compresses
them (the cache runs `cache.KV_HOOKS` there, the one place that sees every compressed prompt).

A calibrated basis is fitted once per model and shared by every prompt, like weights, so it costs
no budget; it is only as good as its text is like the prompts (docs/notes/quality_notes.md:
bases fitted on essays serve essays far better than bases fitted on Python's documentation).
`mdkv calibrate` writes one; `calibrated_basis_file` caches the one for a bundled model, fitted on
the essays held out of the haystack (`assets.calibration_text`).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import torch

from mdkv_compile import assets
from mdkv_compile.cache import KV_HOOKS
from mdkv_compile.config import MixedDimKVConfig
from mdkv_compile.core.bases import save_calibrated, second_moment_basis
from mdkv_compile.hf.patch import patch, unpatch


@contextlib.contextmanager
def capture_kv(callback: Callable[[int, torch.Tensor, torch.Tensor], None]) -> Iterator[None]:
    """Call `callback(layer_idx, key, value)` with every prompt's keys and values as they are
    compressed (post-RoPE, as attention sees them)."""
    KV_HOOKS.append(callback)
    try:
        yield
    finally:
        KV_HOOKS.remove(callback)


@torch.no_grad()
def calibrate(
    model: torch.nn.Module, tokenizer, texts: Iterable[str], path: str | Path, max_tokens: int = 2048
) -> Path:
    """Accumulate post-RoPE key and value second moments over `texts` and save the bases.

    Uses the patched model with method "full" so the keys seen are exactly those attention sees.
    """
    moments: dict[int, list[torch.Tensor]] = {}

    def collect(layer_idx: int, key: torch.Tensor, value: torch.Tensor) -> None:
        k, v = key[0].double(), value[0].double()  # [H, N, d]
        acc = moments.setdefault(layer_idx, [torch.zeros(0), torch.zeros(0)])
        km, vm = k.transpose(-1, -2) @ k, v.transpose(-1, -2) @ v
        acc[0] = km if acc[0].numel() == 0 else acc[0] + km
        acc[1] = vm if acc[1].numel() == 0 else acc[1] + vm

    patch(model, MixedDimKVConfig(budget=1.0, method="full"))
    try:
        with capture_kv(collect):
            for text in texts:
                ids = tokenizer(text, return_tensors="pt").input_ids[:, :max_tokens].to(model.device)
                model(ids, use_cache=True)
    finally:
        unpatch(model)
    layers = sorted(moments)
    save_calibrated(
        path,
        [second_moment_basis(moments[layer][0]) for layer in layers],
        [second_moment_basis(moments[layer][1]) for layer in layers],
        layers,
    )
    return Path(path)


# Bump when what `calibrate` computes changes, so cached files are refitted. 2: files name the
# layers they hold (a model whose compressed layers are not 0..L-1, Gemma 3, got them renumbered).
CALIBRATION_VERSION = 2
CHUNK_TOKENS = 2048


def calibration_chunks(tokenizer, text: str, n_chunks: int = 8, chunk_tokens: int = CHUNK_TOKENS) -> list[str]:
    """Up to `n_chunks` consecutive pieces of `text`, `chunk_tokens` tokens each (the last may be
    shorter), decoded back to text for `calibrate`."""
    ids = tokenizer(text, add_special_tokens=False).input_ids
    pieces = [ids[i : i + chunk_tokens] for i in range(0, len(ids), chunk_tokens)][:n_chunks]
    if not pieces:
        raise ValueError("calibration text is empty")
    return [tokenizer.decode(p) for p in pieces]


def calibrated_basis_file(model: torch.nn.Module, tokenizer, model_name: str) -> Path:
    """The calibrated bases of a bundled model (`assets.load_model` name), fitted on the essays held
    out of the haystack and cached under the asset cache; fitted on first use (about 10-30 s on 2
    CPU cores for SmolLM2)."""
    text = assets.calibration_text()
    key = hashlib.sha256(f"{CALIBRATION_VERSION}|{model_name}|{CHUNK_TOKENS}|{text}".encode()).hexdigest()[:16]
    stem = "".join(c if c.isalnum() or c in "-_." else "_" for c in model_name)[-48:]
    path = assets.cache_dir() / "calibration" / f"{stem}-{key}.safetensors"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        calibrate(model, tokenizer, calibration_chunks(tokenizer, text), tmp, max_tokens=CHUNK_TOKENS)
        tmp.replace(path)  # complete or absent: never a half-written file under the final name
    return path


# --- `mdkv calibrate` ----------------------------------------------------------------------------


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="smollm2", help="'smollm2', 'gemma3-270m' or a Hugging Face model path")
    p.add_argument("--out", required=True, help="safetensors file to write (basis_path of basis='calibrated')")
    p.add_argument(
        "--text-file", default=None,
        help="calibration text (UTF-8); default: the essays held out of the evaluation haystack. Use text "
        "like the prompts you will serve",
    )
    p.add_argument("--chunks", type=int, default=8, help="pieces of the text to run through the model")
    p.add_argument("--chunk-tokens", type=int, default=CHUNK_TOKENS, help="tokens per piece")


def run(args: argparse.Namespace) -> int:
    out = Path(args.out)
    if out.exists() and out.is_dir():
        print(f"mdkv calibrate: --out {out} is a folder; give a file name", file=sys.stderr)
        return 2
    if args.chunks < 1 or args.chunk_tokens < 16:
        print("mdkv calibrate: --chunks must be >= 1 and --chunk-tokens >= 16", file=sys.stderr)
        return 2
    if args.text_file is not None and not Path(args.text_file).is_file():
        print(f"mdkv calibrate: --text-file {args.text_file}: no such file", file=sys.stderr)
        return 2
    text = Path(args.text_file).read_text(encoding="utf-8") if args.text_file else assets.calibration_text()
    model, tokenizer = assets.load_model(args.model)
    start = time.perf_counter()
    chunks = calibration_chunks(tokenizer, text, args.chunks, args.chunk_tokens)
    calibrate(model, tokenizer, chunks, out, max_tokens=args.chunk_tokens)
    print(f"calibrated bases of {args.model} on {len(chunks)} x <= {args.chunk_tokens} tokens in "
          f"{time.perf_counter() - start:.1f} s: {out}")
    return 0
