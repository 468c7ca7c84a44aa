"""Token eviction baselines: every kept token at full dimension, the rest dropped.

`snapkv`, `pyramidkv` and `headkv` pick the top tokens of each KV head by window importance;
`ada-snapkv` pools the budget over the KV heads of a layer (Ada-KV); `streamingllm` keeps the
sinks and the most recent tokens. Selection is a stable top-k written independently of the
knapsack solver, so the `mixeddimkv` with dims (0, d) equivalence is a real test.
"""

from __future__ import annotations

import torch

from mdkv_compile.core.sharding import gather_heads, local_heads
from mdkv_compile.policies.base import (
    LayerContext,
    Selection,
    bookkeeping_units,
    full_selection,
    keep_top,
    keeps_everything,
    owner_budget,
)


def _kept_to_selection(ctx: LayerContext, keep: torch.Tensor) -> Selection:
    keep = keep & ctx.valid[:, None, :]
    return Selection(chosen_dim=torch.where(keep, ctx.head_dim, 0).long(), tier_dims=(ctx.head_dim,))


def _usable_units(ctx: LayerContext) -> tuple[torch.Tensor, torch.Tensor]:
    """(units per owner left for tokens [B, H], rows whose budget keeps everything [B])."""
    units = owner_budget(ctx)
    return units - bookkeeping_units(1, ctx.key.element_size()), keeps_everything(ctx)


def _finish(ctx: LayerContext, keep: torch.Tensor, everything: torch.Tensor) -> Selection:
    keep = keep | everything[:, None, None]
    return _kept_to_selection(ctx, keep)


def scored(ctx: LayerContext, scores: torch.Tensor) -> torch.Tensor:
    """Forced tokens first (+inf), padding never (-inf)."""
    scores = scores.masked_fill(ctx.forced()[:, None, :], float("inf"))
    return scores.masked_fill(~ctx.valid[:, None, :], float("-inf"))


def select_per_head(ctx: LayerContext, scores: torch.Tensor) -> Selection:
    bsz, n_heads, n_tokens = scores.shape
    units, everything = _usable_units(ctx)
    k = (units / ctx.head_dim).floor().clamp_min(0).long()
    keep = keep_top(scored(ctx, scores).reshape(-1, n_tokens), k.reshape(-1)).view(bsz, n_heads, n_tokens)
    return _finish(ctx, keep, everything)


def snapkv(ctx: LayerContext) -> Selection:
    return select_per_head(ctx, ctx.importance())


def ada_snapkv(ctx: LayerContext) -> Selection:
    units, everything = _usable_units(ctx)
    scores = scored(ctx, ctx.importance())
    if ctx.shard is not None:
        # The layer's pool spans every rank's heads: rank them all as one process would.
        units, scores = gather_heads(units, ctx.shard), gather_heads(scores, ctx.shard)
    bsz, n_heads, n_tokens = scores.shape
    k_row = (units.sum(-1) / ctx.head_dim).floor().clamp_min(0).long()
    keep = keep_top(scores.reshape(bsz, n_heads * n_tokens), k_row).view(bsz, n_heads, n_tokens)
    if ctx.shard is not None:
        keep = local_heads(keep, ctx.shard)
    return _finish(ctx, keep, everything)


def streamingllm(ctx: LayerContext) -> Selection:
    bsz, n_heads, n_tokens = ctx.key.shape[:3]
    # Recency as the score: the latest tokens win; sinks (and the window) are forced by `scored`.
    recency = torch.arange(n_tokens, device=ctx.key.device, dtype=torch.float32)
    return select_per_head(ctx, recency.expand(bsz, n_heads, n_tokens).clone())


def full(ctx: LayerContext) -> Selection:
    return full_selection(ctx)
