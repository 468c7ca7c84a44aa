"""Calibrated bases: post-RoPE key and value second moments accumulated over calibration text
through a patched model, saved as one basis per (layer, KV head) (`core.bases.save_calibrated`).

`capture_contexts` hands every prompt (its queries, keys and values) to a callback as a
`MixedDimLayer` compresses it (the cache runs `cache.KV_HOOKS` there, the one place that sees every
compressed prompt); `capture_kv` hands over the keys and values alone.

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
from mdkv_compile.policies.base import LayerContext


@contextlib.contextmanager
def capture_contexts(callback: Callable[[LayerContext], None]) -> Iterator[None]:
    """Call `callback(ctx)` with the LayerContext of every prompt as it is compressed: its post-RoPE
    queries, keys and values as attention sees them, and the layer's scale and softcap."""
    KV_HOOKS.append(callback)
    try:
        yield
    finally:
        KV_HOOKS.remove(callback)


def capture_kv(callback: Callable[[int, torch.Tensor, torch.Tensor], None]) -> contextlib.AbstractContextManager:
    """Call `callback(layer_idx, key, value)` with every prompt's keys and values as they are
    compressed (post-RoPE, as attention sees them)."""
    return capture_contexts(lambda ctx: callback(ctx.layer_idx, ctx.key, ctx.value))


def calibration_moments(model: torch.nn.Module, batches: Iterable[torch.Tensor]) -> dict[int, dict[str, torch.Tensor]]:
    """Uncentred second moments summed in float64 over every token of `batches` ([1, N] token ids
    each), per compressed layer: "key" and "value" [H, d, d], and "query" [H, d, d] over the query
    heads of each KV head's group (`run_uncompressed`: the vectors attention sees)."""
    moments: dict[int, dict[str, torch.Tensor]] = {}

    def collect(ctx: LayerContext) -> None:
        n_kv, d = ctx.key.shape[1], ctx.key.shape[-1]
        vectors = {"query": ctx.query[0].double().reshape(n_kv, -1, d), "key": ctx.key[0].double(),
                   "value": ctx.value[0].double()}
        acc = moments.setdefault(ctx.layer_idx, {})
        for name, x in vectors.items():
            m = x.transpose(-1, -2) @ x
            acc[name] = acc[name] + m if name in acc else m

    run_uncompressed(model, batches, collect)
    return moments


@torch.no_grad()
def run_uncompressed(
    model: torch.nn.Module, batches: Iterable[torch.Tensor], callback: Callable[[LayerContext], None]
) -> None:
    """Run each batch of token ids [B, N] through the model patched with method "full" (one logit
    per forward) and hand every compressed layer's LayerContext to `callback`: the post-RoPE
    queries, keys and values exactly as attention sees them."""
    patch(model, MixedDimKVConfig(budget=1.0, method="full"))
    try:
        with capture_contexts(callback):
            for ids in batches:
                model(ids.to(model.device), use_cache=True, logits_to_keep=1)
    finally:
        unpatch(model)


@torch.no_grad()
def calibrate(
    model: torch.nn.Module, tokenizer, texts: Iterable[str], path: str | Path, max_tokens: int = 2048
) -> Path:
    """Accumulate post-RoPE key and value second moments over `texts` (`calibration_moments`) and
    save the bases."""
    batches = (tokenizer(text, return_tensors="pt").input_ids[:, :max_tokens] for text in texts)
    moments = calibration_moments(model, batches)
    layers = sorted(moments)
    save_calibrated(
        path,
        [second_moment_basis(moments[layer]["key"]) for layer in layers],
        [second_moment_basis(moments[layer]["value"]) for layer in layers],
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
