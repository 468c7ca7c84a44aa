"""The one interface every policy implements, and the budget accounting they share.

A policy looks at one layer's prompt (queries, keys, values, which tokens are real) and returns a
`Selection`: the stored dimension of every token (0 = dropped) plus the bases its reduced tiers
use. Packing and attention are the same for every policy, so every method stores real, smaller
tensors and is measured by the same `stored_bytes()`.

Budgets are in *units*: one unit is one key element plus one value element of one owner (a
(row, KV head) pair), so a token kept at dimension r costs r units and a full token costs
head_dim units. A prompt basis of rank r_max costs head_dim * r_max units per owner.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

from mdkv_compile.config import MixedDimKVConfig
from mdkv_compile.core.bases import masked_float
from mdkv_compile.core.packing import PackedStore, pack
from mdkv_compile.core.scoring import forced_mask, window_importance
from mdkv_compile.core.sharding import HeadShard
from mdkv_compile.kernels import compression
from mdkv_compile.kernels._triton import HAS_TRITON
from mdkv_compile.methods import RECORDS


@dataclass
class LayerContext:
    query: torch.Tensor  # [B, Hq, N, d]
    key: torch.Tensor  # [B, H, N, d] post-RoPE
    value: torch.Tensor  # [B, H, N, d]
    valid: torch.Tensor  # [B, N] bool, False on left padding
    layer_idx: int
    num_layers: int
    cfg: MixedDimKVConfig
    dims: tuple[int, ...]  # candidate dims, ascending, 0 first, head_dim last
    scale: float | None = None
    softcap: float | None = None
    # HeadKV share of each KV head of this layer in the model-wide pool, [H] (sums to 1 over the model).
    head_shares: torch.Tensor | None = None
    # Calibrated bases of this layer, [H, d, d] each (basis="calibrated").
    calibrated: tuple[torch.Tensor, torch.Tensor] | None = None
    # Tensor parallelism: this rank holds `shard.heads` of the layer's KV heads (None: all of them).
    shard: HeadShard | None = None
    # Known on the host: every token is valid (no mask), so float32 copies need no masking pass.
    all_valid: bool = False

    @property
    def head_dim(self) -> int:
        return self.key.shape[-1]

    @property
    def total_heads(self) -> int:
        """KV heads of the layer over all tensor-parallel ranks (budgets are per model, not per rank)."""
        return self.key.shape[1] if self.shard is None else self.shard.total_heads

    @functools.cached_property
    def n_valid(self) -> torch.Tensor:
        """[B] valid tokens per row; summed once per context (budgets ask for it several times)."""
        return self.valid.sum(-1)

    def uses_kernels(self) -> bool:
        """Compression steps run the fused Triton kernels (kernels/compression.py): on CUDA with
        cfg.kernel == "auto"; the PyTorch reference otherwise."""
        if self.cfg.kernel != "auto" or not self.key.is_cuda:
            return False
        return HAS_TRITON

    def importance(self, key: torch.Tensor | None = None) -> torch.Tensor:
        """Window importance [B, H, N]; `key` may be a float32 copy of `self.key` (same values at valid
        tokens; padding keys are masked out of the scores) that the caller already holds, so that no
        second copy is made (the kernel reads `self.key`)."""
        if self.uses_kernels():
            return compression.window_importance(
                self.query, self.key, self.valid, self.cfg.window, self.cfg.pool_kernel, self.scale, self.softcap
            )
        return window_importance(
            self.query, self.key if key is None else key, self.valid, self.cfg.window, self.cfg.pool_kernel,
            self.scale, self.softcap,
        )

    def float_copy(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, H, N, d] (the keys or values) as float32, zero at padding (`masked_float`): one pass,
        and a plain conversion when `all_valid`. Second moments take it as already masked; scores and
        coordinates only differ at padding, which is masked out of the scores and never stored."""
        return x.float() if self.all_valid else masked_float(x, self.valid)

    def forced(self) -> torch.Tensor:
        """[B, N] tokens always kept at full dimension (window and sinks)."""
        return forced_mask(self.valid, self.cfg.window, self.cfg.sinks)


@dataclass
class Selection:
    """What a policy keeps. Tier t stores keys at tier_dims[t] and values at value_dims[t] dims; tier 0
    is (d, d), the tokens as they are; every later tier holds basis coordinates (its key dim may be d:
    all coordinates of the key, a reduced value). A token's tier is its (chosen_dim, chosen_value_dim)."""

    chosen_dim: torch.Tensor  # [B, H, N] long: the key dim kept, 0 dropped
    tier_dims: tuple[int, ...]  # key dims per stored tier, head_dim first
    key_coef: torch.Tensor | None = None  # [B, H, N, rk_max]
    value_coef: torch.Tensor | None = None  # [B, H, N, rv_max]
    basis_k: torch.Tensor | None = None  # [n_basis, d, rk_max]
    basis_v: torch.Tensor | None = None  # [n_basis, d, rv_max]
    basis_index: torch.Tensor | None = None  # [B*H] int32 or None
    basis_shared: bool = False
    # Value dims per stored tier and per token; None: the same as the key dims (coupled tiers).
    value_dims: tuple[int, ...] | None = None
    chosen_value_dim: torch.Tensor | None = None


def pack_selection(key: torch.Tensor, value: torch.Tensor, sel: Selection) -> PackedStore:
    """The packed store of a policy's selection over key, value [B, H, N, d]."""
    return pack(
        key, value, sel.chosen_dim, sel.tier_dims, sel.key_coef, sel.value_coef, sel.basis_k, sel.basis_v,
        sel.basis_index, sel.basis_shared, sel.value_dims, sel.chosen_value_dim,
    )


def full_selection(ctx: LayerContext) -> Selection:
    chosen = torch.where(ctx.valid[:, None, :], ctx.head_dim, 0).expand(ctx.key.shape[:3])
    return Selection(chosen_dim=chosen.long(), tier_dims=(ctx.head_dim,))


def bookkeeping_units(n_tiers: int, itemsize: int) -> int:
    """Units per owner reserved for a tier's CSR offsets (int32, B*H + 1 per tier)."""
    return n_tiers * math.ceil(8 / (2 * itemsize))


def base_budget(ctx: LayerContext) -> torch.Tensor:
    """Uniform budget units per owner, [B] float: the config's budget before any per-layer or
    per-head redistribution."""
    cfg, d = ctx.cfg, ctx.head_dim
    bsz = ctx.key.shape[0]
    if cfg.budget is not None:
        return cfg.budget * ctx.n_valid.double() * d
    if cfg.budget_tokens is not None:
        per_owner = float(cfg.budget_tokens * d)
    else:
        per_owner = cfg.budget_bytes / (ctx.num_layers * ctx.total_heads * 2 * ctx.key.element_size())
    return torch.full((bsz,), per_owner, dtype=torch.double, device=ctx.key.device)


def forced_floor(ctx: LayerContext) -> torch.Tensor:
    """[B] units per owner below which no budget goes: the forced tokens (the window and the
    sinks, `ctx.forced()`) at full dimension plus one tier's bookkeeping, so the budget of a short
    prompt (or of a layer or head that a schedule starves) never takes them."""
    n_forced = ctx.n_valid.clamp(max=ctx.cfg.window + ctx.cfg.sinks)
    return n_forced.double() * ctx.head_dim + bookkeeping_units(1, ctx.key.element_size())


def owner_budget(ctx: LayerContext) -> torch.Tensor:
    """Budget units per owner, [B, H] float, before bookkeeping and bases; at least `forced_floor`."""
    cfg = ctx.cfg
    bsz, n_heads = ctx.key.shape[:2]
    units = base_budget(ctx)[:, None].expand(bsz, n_heads)
    if RECORDS[cfg.method].budget_schedule == "pyramid":
        units = units * pyramid_factor(ctx.layer_idx, ctx.num_layers, cfg.pyramid_beta)
    if ctx.head_shares is not None:
        # HeadKV: a 1 - 1/beta share of each head's budget stays uniform; the rest is pooled over
        # every head of the model and handed out by head importance.
        pooled = units / cfg.head_beta * ctx.num_layers * ctx.total_heads
        units = units * (1 - 1 / cfg.head_beta) + ctx.head_shares[None, :].double() * pooled
    return torch.maximum(units, forced_floor(ctx)[:, None])


def pyramid_factor(layer_idx: int, num_layers: int, beta: float) -> float:
    """PyramidKV's arithmetic schedule: lower layers keep more, the mean over layers is 1."""
    if num_layers == 1:
        return 1.0
    low = 1.0 / beta
    high = 2.0 - low
    return high - (high - low) * layer_idx / (num_layers - 1)


def keeps_everything(ctx: LayerContext) -> torch.Tensor:
    """[B] rows stored uncompressed: those whose budget covers every valid token at full dimension
    (budget 1.0 means no compression for every method, whatever it would redistribute), those of
    at most `cfg.min_compress_tokens` valid tokens, and those whose every token is forced (the
    window and the sinks are never compressed, by any method)."""
    covered = base_budget(ctx) >= (ctx.n_valid * ctx.head_dim).double()
    short = ctx.n_valid <= max(ctx.cfg.min_compress_tokens, ctx.cfg.window + ctx.cfg.sinks)
    return covered | short


def keep_top(scores: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """scores [G, T], k [G] -> [G, T] bool: the k highest per group. Ties go to the earlier token
    (stable sort), the same rule the knapsack solver uses."""
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices
    positions = torch.arange(scores.shape[-1], device=scores.device).expand_as(order)
    rank = torch.empty_like(order).scatter_(-1, order, positions)
    return rank < k[:, None]
