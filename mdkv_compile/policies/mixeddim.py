"""Dimension-reducing policies: `mixeddimkv` (and `-h`), and `lowrank` (Palu-like).

`mixeddimkv`: per-token losses of every option (r_k, r_v) (eviction, the config's reduced tiers,
whole; core/losses.py), then a multiple-choice knapsack per KV head (`pool="head"`) or per layer
(`pool="layer"`). A token's key and value may keep different numbers of dims (`cfg.tiers`). A
prompt basis costs budget, so each row also solves the keep-or-evict problem without it and keeps
whichever has the lower total loss: when the basis is not worth its bytes the method falls back to
eviction by itself. `mixeddimkv-h` is the same inside HeadKV's per-head budgets.
"""

from __future__ import annotations

import math

import torch

from mdkv_compile.core.allocation import FORCED_LOSS, allocate
from mdkv_compile.core.bases import prompt_bases
from mdkv_compile.core.losses import (
    Option,
    attention_losses,
    energy_losses,
    eviction_losses,
    residual_fraction,
)
from mdkv_compile.core.losses import logit_errors as logit_errors_torch
from mdkv_compile.core.sharding import gather_heads, local_heads
from mdkv_compile.kernels.compression import logit_errors
from mdkv_compile.policies.base import (
    LayerContext,
    Selection,
    bookkeeping_units,
    full_selection,
    keeps_everything,
    owner_budget,
)


def _bases(
    ctx: LayerContext, key_rank: int, value_rank: int, key_f: torch.Tensor, value_f: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """Key bases [B, H, d, key_rank] and value bases [B, H, d, value_rank] (prompt PCA, by
    `cfg.basis_solver`) or [H, d, rank] (calibrated), and whether they are shared (not stored per
    prompt). `key_f` / `value_f`: the context's keys and values from `ctx.float_copy` (already zero
    at padding, not masked again)."""
    if ctx.calibrated is not None:
        kb, vb = ctx.calibrated
        return kb[:, :, :key_rank].to(ctx.key.device), vb[:, :, :value_rank].to(ctx.key.device), True
    kb, vb = prompt_bases(key_f, value_f, None, max(key_rank, value_rank), ctx.cfg.basis_solver)
    return kb[..., :key_rank], vb[..., :value_rank], False


def _coefficients(x: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """Coordinates [B, H, N, r] of x [B, H, N, d] in a basis [B, H, d, r] or [H, d, r]."""
    return x.float() @ basis.float()


def _basis_storage(
    ctx: LayerContext, kb: torch.Tensor, vb: torch.Tensor, shared: bool, rows: torch.Tensor, n_rows: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The bases to keep for the rows that use them (`rows` [B] bool, `n_rows` of them, known on
    the host), and the owner -> basis-row index. Synchronises nothing."""
    if shared:
        return kb, vb, None
    bsz, n_heads = ctx.key.shape[:2]
    d, k_rank, v_rank = kb.shape[-2], kb.shape[-1], vb.shape[-1]
    if n_rows == bsz:
        return kb.reshape(-1, d, k_rank), vb.reshape(-1, d, v_rank), None
    slot = torch.cumsum(rows.long(), 0) - 1
    heads = torch.arange(n_heads, device=rows.device)
    index = torch.where(rows[:, None], slot[:, None] * n_heads + heads[None, :], -1)
    pick = torch.nonzero_static(rows, size=n_rows).squeeze(-1)  # = kb[rows], without a sync
    return (
        kb.index_select(0, pick).reshape(-1, d, k_rank),
        vb.index_select(0, pick).reshape(-1, d, v_rank),
        index.reshape(-1).to(torch.int32),
    )


def _device_ints(values: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """A small long tensor written on the device by fills: torch.tensor(values, device=...) copies
    from pageable host memory, which synchronises."""
    out = torch.empty(len(values), dtype=torch.long, device=device)
    for i, v in enumerate(values):
        out[i : i + 1].fill_(v)
    return out


def _solve(
    ctx: LayerContext, losses: torch.Tensor, units: torch.Tensor, costs: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Allocate over options of `costs` ([D] long on the device, ascending, 0 first); returns
    (chosen option [B, H, N] long, total loss per row [B], over all TP ranks)."""
    pooled = ctx.cfg.pool == "layer" and ctx.head_shares is None
    if pooled and ctx.shard is not None:
        # One knapsack over every rank's heads: each rank solves the gathered layer, keeps its slice.
        losses, units = gather_heads(losses, ctx.shard), gather_heads(units, ctx.shard)
    losses = losses.double()  # the solvers work in float64; converted once for them and the total
    bsz, n_heads, n_tokens, n_opts = losses.shape
    if pooled:
        budget = units.sum(-1).floor().clamp_min(0).long()
        choice = allocate(losses.reshape(bsz, n_heads * n_tokens, n_opts), costs, budget, ctx.cfg.solver)
    else:
        budget = units.floor().clamp_min(0).long().reshape(-1)
        choice = allocate(losses.reshape(bsz * n_heads, n_tokens, n_opts), costs, budget, ctx.cfg.solver)
    choice = choice.view(bsz, n_heads, n_tokens)
    token_loss = losses.gather(-1, choice[..., None]).squeeze(-1)
    if ctx.shard is not None:
        if pooled:
            choice = local_heads(choice, ctx.shard)
        else:
            # The row's evict-or-mixed decision must be the same on every rank: sum over all heads.
            token_loss = gather_heads(token_loss, ctx.shard)
    return choice, token_loss.sum(dim=(1, 2))


def options(ctx: LayerContext) -> tuple[Option, ...]:
    """Every option of the mixed solve in ascending cost: (0, 0), the config's reduced tiers (key
    dim, value dim), (d, d). A token's cost is r_k + r_v elements (half units)."""
    d = ctx.head_dim
    reduced = sorted(ctx.cfg.resolve_tiers(d), key=lambda t: (t[0] + t[1], t))
    return ((0, 0), *reduced, (d, d))


def _mixed_losses(
    ctx: LayerContext, opts: tuple[Option, ...], importance: torch.Tensor, key_f: torch.Tensor,
    value_f: torch.Tensor, kb: torch.Tensor, vb: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(losses [B, H, N, len(opts)], key coefficients [B, H, N, rk_max], value coefficients
    [B, H, N, rv_max]) in the bases kb [.., d, d or rk_max] and vb [.., d, rv_max]."""
    d = ctx.head_dim
    key_dims = tuple(sorted({rk for rk, _ in opts if 0 < rk < d}))
    value_dims = tuple(sorted({rv for _, rv in opts if 0 < rv < d}))
    rk_max = max(rk for rk, _ in opts[1:-1])
    kc_full = _coefficients(key_f, kb)
    vc = _coefficients(value_f, vb)
    v_norm2 = value_f.square().sum(-1)
    value_frac = residual_fraction(vc, v_norm2, value_dims, d) if value_dims else None
    if ctx.cfg.loss == "attention":
        bsz, n_heads = ctx.key.shape[:2]
        w = min(ctx.cfg.window, ctx.key.shape[2])
        q_win = ctx.query[:, :, -w:].float().reshape(bsz, n_heads, -1, d)  # the group's window queries
        q_rot = q_win @ (kb.float() if kb.dim() == 4 else kb.float()[None])
        scale = ctx.scale if ctx.scale is not None else 1.0 / math.sqrt(d)
        logit_rms = None
        if key_dims:
            # fp32 products for an fp32 model; TF32 otherwise, as the reference's matmuls under select()
            logit_rms = (
                logit_errors(q_rot, kc_full, key_dims, scale, exact=ctx.key.dtype == torch.float32)
                if ctx.uses_kernels() else logit_errors_torch(q_rot, kc_full, key_dims, scale)
            )
        losses = attention_losses(importance, logit_rms, key_dims, value_frac, value_dims, opts,
                                  ctx.cfg.value_weight)
    else:
        key_frac = residual_fraction(kc_full, key_f.square().sum(-1), key_dims, d) if key_dims else None
        losses = energy_losses(importance, key_frac, key_dims, value_frac, value_dims, opts, ctx.cfg.key_weight)
    return losses, kc_full[..., :rk_max], vc


def _option_losses(
    ctx: LayerContext, opts: tuple[Option, ...], importance: torch.Tensor, key_f: torch.Tensor, value_f: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, bool]:
    """The mixed solve's losses [B, H, N, len(opts)] (`_mixed_losses`) in the bases it stores: also
    the key and value coefficients, the key basis [.., d, rk_max] (a view: `pack` makes the stored
    basis contiguous), the value basis and whether the bases are shared."""
    rk_max = max(rk for rk, _ in opts[1:-1])
    rv_max = max(rv for _, rv in opts[1:-1])
    # The attention loss needs every key coordinate (the logit error lives in the tail).
    kb_full, vb, shared = _bases(ctx, ctx.head_dim if ctx.cfg.loss == "attention" else rk_max, rv_max, key_f, value_f)
    losses, kc, vc = _mixed_losses(ctx, opts, importance, key_f, value_f, kb_full, vb)
    return losses, kc, vc, kb_full[..., :rk_max], vb, shared


def option_losses(ctx: LayerContext) -> tuple[tuple[Option, ...], torch.Tensor]:
    """`mixeddimkv`'s loss of every option for every token: (options(ctx), [B, H, N, len(options)]),
    relative to eviction as in core/losses.py, before forced tokens and padding are settled. What
    its allocation minimises; `mdkv diagnose` sums it over the options an allocation chose (the
    predicted loss) and sets that against the measured attention-output error."""
    opts = options(ctx)
    key_f = ctx.float_copy(ctx.key)
    importance = ctx.importance(key_f)
    if len(opts) == 2:
        return opts, eviction_losses(importance)
    return opts, _option_losses(ctx, opts, importance, key_f, ctx.float_copy(ctx.value))[0]


def mixeddimkv(ctx: LayerContext) -> Selection:
    """Host synchronisations: one per round of the mixed solve's leftover fill (core/allocation.py;
    the keep/evict solve has none) and one here, at the end, for how many rows use the mixed tiers
    (the store's shapes depend on it). With basis_solver="eigh" the eigendecomposition syncs too."""
    d = ctx.head_dim
    opts = options(ctx)
    itemsize = ctx.key.element_size()
    if ctx.cfg.budget is not None and ctx.cfg.budget >= 1.0:
        # keeps_everything() holds for every row; known on the host, so no need to ask the device.
        return full_selection(ctx)
    units = owner_budget(ctx)
    # Rows that keep everything (other budgets) are settled by the torch.where calls below, so no
    # early exit (and no synchronisation) is needed for them.
    everything = keeps_everything(ctx)

    forced = ctx.forced()[:, None, :, None]
    invalid = ~ctx.valid[:, None, :, None]
    # Forced tokens are kept whole: any smaller option costs as much as dropping them. The loss row
    # [FORCED_LOSS, ..., FORCED_LOSS, 0] (float32, no host copy) of the mixed options; the evict
    # solve's options (0, d) are its last two.
    forced_row = torch.full((len(opts),), FORCED_LOSS, device=ctx.key.device)
    forced_row[-1:].fill_(0.0)
    # Option costs in elements (key + value) on the device, once; the evict solve's are (0, 2d).
    costs = _device_ints(tuple(rk + rv for rk, rv in opts), ctx.key.device)
    reduced = len(opts) > 2
    # One float32 copy of the keys for importance, basis and coordinates; the kernels' importance
    # reads ctx.key, so without reduced tiers they need no copy.
    key_f = ctx.float_copy(ctx.key) if reduced or not ctx.uses_kernels() else None
    importance = ctx.importance(key_f)

    def constrain(losses: torch.Tensor) -> torch.Tensor:
        return torch.where(forced, forced_row[-losses.shape[-1] :], losses).masked_fill(invalid, 0.0)

    evict_costs = costs[:: len(opts) - 1]
    evict_units = 2 * (units - bookkeeping_units(1, itemsize))
    evict_choice, evict_loss = _solve(ctx, constrain(eviction_losses(importance)), evict_units, evict_costs)
    evict_dim = evict_choice * d
    if not reduced:
        chosen = torch.where(everything[:, None, None], full_selection(ctx).chosen_dim, evict_dim)
        return Selection(chosen_dim=chosen, tier_dims=(d,))

    assert key_f is not None  # made above whenever there are reduced tiers
    mixed_losses, kc, vc, kb, vb, shared = _option_losses(ctx, opts, importance, key_f, ctx.float_copy(ctx.value))
    del key_f
    # One more bookkeeping slot pays for the owner -> basis index when rows differ; a prompt basis
    # costs d x (rk_max + rv_max) elements.
    basis_elems = 0 if shared else d * (kb.shape[-1] + vb.shape[-1])
    mixed_units = 2 * (units - bookkeeping_units(len(opts), itemsize)) - basis_elems
    mixed_choice, mixed_loss = _solve(ctx, constrain(mixed_losses), mixed_units, costs)

    use_mixed = (mixed_loss < evict_loss) & ~everything
    key_dims = _device_ints(tuple(rk for rk, _ in opts), costs.device)
    value_dims = _device_ints(tuple(rv for _, rv in opts), costs.device)
    full = full_selection(ctx).chosen_dim
    chosen = torch.where(use_mixed[:, None, None], key_dims[mixed_choice], evict_dim)
    chosen = torch.where(everything[:, None, None], full, chosen)
    chosen_value = torch.where(use_mixed[:, None, None], value_dims[mixed_choice], evict_dim)
    chosen_value = torch.where(everything[:, None, None], full, chosen_value)
    n_mixed = int(use_mixed.sum())  # the policy's host synchronisation: the tiers and bases depend on it
    if n_mixed == 0:
        return Selection(chosen_dim=chosen, tier_dims=(d,))
    basis_k, basis_v, index = _basis_storage(ctx, kb, vb, shared, use_mixed, n_mixed)
    tiers = sorted(opts[1:-1], reverse=True)
    return Selection(
        chosen_dim=chosen,
        tier_dims=(d, *(rk for rk, _ in tiers)),
        value_dims=(d, *(rv for _, rv in tiers)),
        chosen_value_dim=chosen_value,
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
    ranks = [int(r) for r in rank.tolist()]  # the one host synchronisation: the tiers depend on it
    reduced = sorted({r for r in ranks if 0 < r < d}, reverse=True)
    if not reduced:
        return Selection(chosen_dim=chosen, tier_dims=(d,))
    key_f, value_f = ctx.float_copy(ctx.key), ctx.float_copy(ctx.value)
    kb, vb, shared = _bases(ctx, reduced[0], reduced[0], key_f, value_f)
    uses = (rank > 0) & (rank < d)
    basis_k, basis_v, index = _basis_storage(ctx, kb, vb, shared, uses, sum(0 < r < d for r in ranks))
    return Selection(
        chosen_dim=chosen,
        tier_dims=(d, *reduced),
        key_coef=_coefficients(key_f, kb),
        value_coef=_coefficients(value_f, vb),
        basis_k=basis_k,
        basis_v=basis_v,
        basis_index=index,
        basis_shared=shared,
    )
