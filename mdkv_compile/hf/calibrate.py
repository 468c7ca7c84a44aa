"""Calibrated bases: post-RoPE key and value second moments accumulated over calibration text
through a patched model, saved as one basis per (layer, KV head) (`core.bases.save_calibrated`).

`capture_kv` hands every prompt's keys and values to a callback as a `MixedDimLayer` compresses
them (the cache runs `cache.KV_HOOKS` there, the one place that sees every compressed prompt).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import torch

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
    )
    return Path(path)
