"""Dimension-reducing policies: `mixeddimkv` (and `-h`), and `lowrank` (Palu-like).

`mixeddimkv`: per-token candidate losses over `dims`, then a multiple-choice knapsack per KV head
(`pool="head"`) or per layer (`pool="layer"`). A prompt basis costs budget, so each row also
solves the keep-or-evict problem without it and keeps whichever has the lower total loss: at tiny
budgets the basis is not worth its bytes and the method falls back to eviction by itself.
`mixeddimkv-h` is the same inside HeadKV's per-head budgets.
"""

from __future__ import annotations

import math

import torch

from mdkv_compile.core.allocation import FORCED_LOSS, allocate
from mdkv_compile.core.bases import prompt_basis
from mdkv_compile.core.losses import attention_losses, candidate_losses
from mdkv_compile.distributed import gather_heads, local_heads
from mdkv_compile.policies.base import (
    LayerContext,
    Selection,
    bookkeeping_units,
    full_selection,
    keeps_everything,
    owner_budget,
)


def _bases(ctx: LayerContext, rank: int) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """Key and value bases [B, H, d, rank] (prompt PCA) or [H, d, rank] (calibrated), and whether
    they are shared (not stored per prompt)."""
    if ctx.calibrated is not None:
        kb, vb = ctx.calibrated
        return kb[:, :, :rank].to(ctx.key.device), vb[:, :, :rank].to(ctx.key.device), True
    return prompt_basis(ctx.key, ctx.valid, rank), prompt_basis(ctx.value, ctx.valid, rank), False


def _coefficients(x: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """Coordinates [B, H, N, r] of x [B, H, N, d] in a basis [B, H, d, r] or [H, d, r]."""
    return x.float() @ basis.float()


def _basis_storage(
    ctx: LayerContext, kb: torch.Tensor, vb: torch.Tensor, shared: bool, rows: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The bases to keep for the rows that use them, and the owner -> basis-row index."""
    if shared:
        return kb, vb, None
    bsz, n_heads = ctx.key.shape[:2]
    d, rank = kb.shape[-2:]
    if bool(rows.all()):
        return kb.reshape(-1, d, rank), vb.reshape(-1, d, rank), None
    slot = torch.cumsum(rows.long(), 0) - 1
    heads = torch.arange(n_heads, device=rows.device)
    index = torch.where(rows[:, None], slot[:, None] * n_heads + heads[None, :], -1)
    return kb[rows].reshape(-1, d, rank), vb[rows].reshape(-1, d, rank), index.reshape(-1).to(torch.int32)


def _solve(
    ctx: LayerContext, losses: torch.Tensor, units: torch.Tensor, dims: tuple[int, ...]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Allocate; returns (chosen dim [B, H, N] long, total loss per row [B], over all TP ranks)."""
    costs = torch.tensor(dims, device=losses.device)
    pooled = ctx.cfg.pool == "layer" and ctx.head_shares is None
    if pooled and ctx.shard is not None:
        # One knapsack over every rank's heads: each rank solves the gathered layer, keeps its slice.
        losses, units = gather_heads(losses, ctx.shard), gather_heads(units, ctx.shard)
    bsz, n_heads, n_tokens, n_opts = losses.shape
    if pooled:
        budget = units.sum(-1).floor().clamp_min(0).long()
        choice = allocate(losses.reshape(bsz, n_heads * n_tokens, n_opts), costs, budget, ctx.cfg.solver)
    else:
        budget = units.floor().clamp_min(0).long().reshape(-1)
        choice = allocate(losses.reshape(bsz * n_heads, n_tokens, n_opts), costs, budget, ctx.cfg.solver)
    choice = choice.view(bsz, n_heads, n_tokens)
    token_loss = losses.double().gather(-1, choice[..., None]).squeeze(-1)
    if ctx.shard is not None:
        if pooled:
            choice = local_heads(choice, ctx.shard)
        else:
            # The row's evict-or-mixed decision must be the same on every rank: sum over all heads.
            token_loss = gather_heads(token_loss, ctx.shard)
    return costs[choice], token_loss.sum(dim=(1, 2))


def mixeddimkv(ctx: LayerContext) -> Selection:
    d = ctx.head_dim
    dims = ctx.dims
    reduced = tuple(r for r in dims if 0 < r < d)
    itemsize = ctx.key.element_size()
    units = owner_budget(ctx)
    everything = keeps_everything(ctx)
    if bool(everything.all()):
        return full_selection(ctx)

    forced = ctx.forced()[:, None, :, None]
    importance = ctx.importance()
    k_norm2 = ctx.key.float().square().sum(-1)
    v_norm2 = ctx.value.float().square().sum(-1)

    def constrain(losses: torch.Tensor) -> torch.Tensor:
        # Forced tokens are kept whole: any smaller option costs as much as dropping them.
        forced_row = torch.full((losses.shape[-1],), FORCED_LOSS, device=losses.device)
        forced_row[-1] = 0.0
        return torch.where(forced, forced_row, losses).masked_fill(~ctx.valid[:, None, :, None], 0.0)

    def losses_for(option_dims: tuple[int, ...], kc: torch.Tensor | None, vc: torch.Tensor | None) -> torch.Tensor:
        return constrain(candidate_losses(importance, kc, vc, k_norm2, v_norm2, option_dims, d, ctx.cfg.key_weight))

    evict_dims = (0, d)
    evict_units = units - bookkeeping_units(1, itemsize)
    evict_dim, evict_loss = _solve(ctx, losses_for(evict_dims, None, None), evict_units, evict_dims)
    if not reduced:
        chosen = torch.where(everything[:, None, None], full_selection(ctx).chosen_dim, evict_dim)
        return Selection(chosen_dim=chosen, tier_dims=(d,))

    r_max = max(reduced)
    # The attention loss needs every key coordinate (the logit error lives in the tail).
    kb_full, vb, shared = _bases(ctx, d if ctx.cfg.loss == "attention" else r_max)
    vb = vb[..., :r_max]
    kc_full, vc = _coefficients(ctx.key, kb_full), _coefficients(ctx.value, vb)
    kb, kc = kb_full[..., :r_max].contiguous(), kc_full[..., :r_max]
    if ctx.cfg.loss == "attention":
        bsz, n_heads = ctx.key.shape[:2]
        w = min(ctx.cfg.window, ctx.key.shape[2])
        q_win = ctx.query[:, :, -w:].float().reshape(bsz, n_heads, -1, d)  # the group's window queries
        q_rot = q_win @ (kb_full.float() if kb_full.dim() == 4 else kb_full.float()[None])
        scale = ctx.scale if ctx.scale is not None else 1.0 / math.sqrt(d)
        mixed_losses = constrain(attention_losses(importance, q_rot, kc_full, vc, v_norm2, dims, d, scale))
    else:
        mixed_losses = losses_for(dims, kc, vc)
    # One more bookkeeping slot pays for the owner -> basis index when rows differ.
    mixed_units = units - bookkeeping_units(len(reduced) + 2, itemsize) - (0 if shared else d * r_max)
    mixed_dim, mixed_loss = _solve(ctx, mixed_losses, mixed_units, dims)

    use_mixed = (mixed_loss < evict_loss) & ~everything
    chosen = torch.where(use_mixed[:, None, None], mixed_dim, evict_dim)
    chosen = torch.where(everything[:, None, None], full_selection(ctx).chosen_dim, chosen)
    if not bool(use_mixed.any()):
        return Selection(chosen_dim=chosen, tier_dims=(d,))
    basis_k, basis_v, index = _basis_storage(ctx, kb, vb, shared, use_mixed)
    return Selection(
        chosen_dim=chosen,
        tier_dims=(d, *sorted(reduced, reverse=True)),
        key_coef=kc,
        value_coef=vc,
        basis_k=basis_k,
        basis_v=basis_v,
        basis_index=index,
        basis_shared=shared,
    )


def lowrank(ctx: LayerContext) -> Selection:
    """Every valid token at one rank r per row, the largest the budget affords (basis included)."""
    d = ctx.head_dim
    units = owner_budget(ctx)
    if ctx.shard is not None:
        units = gather_heads(units, ctx.shard)  # the row's rank is the same on every TP rank
    units = units.min(-1).values  # one rank for every head of a row
    n = ctx.n_valid.double()
    # Two tiers plus the owner -> basis index.
    usable = units - bookkeeping_units(3, ctx.key.element_size())
    shared = ctx.calibrated is not None
    rank = (usable / (n if shared else n + d)).floor().clamp(0, d).long()
    if ctx.cfg.lowrank_dim is not None:
        rank = rank.clamp_max(ctx.cfg.lowrank_dim)
    rank = torch.where(keeps_everything(ctx), d, rank)
    chosen = torch.where(ctx.valid[:, None, :], rank[:, None, None], 0).expand(ctx.key.shape[:3]).long()
    reduced = sorted({int(r) for r in rank.tolist() if 0 < r < d}, reverse=True)
    if not reduced:
        return Selection(chosen_dim=chosen, tier_dims=(d,))
    kb, vb, shared = _bases(ctx, reduced[0])
    uses = (rank > 0) & (rank < d)
    basis_k, basis_v, index = _basis_storage(ctx, kb, vb, shared, uses)
    return Selection(
        chosen_dim=chosen,
        tier_dims=(d, *reduced),
        key_coef=_coefficients(ctx.key, kb),
        value_coef=_coefficients(ctx.value, vb),
        basis_k=basis_k,
        basis_v=basis_v,
        basis_index=index,
        basis_shared=shared,
    )
