"""The packed per-layer store (layout: docs/packed_store.md).

Tokens are grouped by tier, flat over all (row, KV head) owners, with CSR offsets per tier; a
tier whose owners all hold the same number of tokens needs no offsets. Tier t keeps keys at
`tier_dims[t]` and values at `value_dims[t]` dims. Tier 0, the full tier, holds keys and values as
they are; every later tier holds coordinates in a per-owner basis (its key dim may be the head
dim: every coordinate of the key, beside a reduced value).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class PackedStore:
    tier_dims: tuple[int, ...]  # key dims per tier; tier_dims[0] == head_dim (the full tier)
    keys: list[torch.Tensor]  # per tier [M_t, tier_dims[t]]
    values: list[torch.Tensor]  # per tier [M_t, value_dims[t]]
    offsets: list[torch.Tensor | None]  # per tier [B*H + 1] int32; None: uniform count per owner
    basis_k: torch.Tensor | None  # [n_basis, d, rk_max]
    basis_v: torch.Tensor | None  # [n_basis, d, rv_max]
    basis_index: torch.Tensor | None  # [B*H] int32 owner -> basis row (-1: none); None: owner % n_basis
    basis_shared: bool  # calibrated bases belong to the model, not to this prompt
    batch: int
    kv_heads: int
    head_dim: int
    value_dims: tuple[int, ...] = ()  # value dims per tier; () means the same as tier_dims

    def __post_init__(self) -> None:
        if not self.value_dims:
            self.value_dims = tuple(self.tier_dims)
        if len(self.value_dims) != len(self.tier_dims):
            raise ValueError(f"value_dims {self.value_dims} and tier_dims {self.tier_dims} differ in length")

    @property
    def tiers(self) -> tuple[tuple[int, int], ...]:
        """(key dims, value dims) per tier."""
        return tuple(zip(self.tier_dims, self.value_dims, strict=True))

    @property
    def owners(self) -> int:
        return self.batch * self.kv_heads

    def counts(self, tier: int) -> torch.Tensor:
        """Tokens per owner in a tier, [B*H] long."""
        off = self.offsets[tier]
        if off is None:
            n = self.keys[tier].shape[0] // max(self.owners, 1)
            return torch.full((self.owners,), n, dtype=torch.long, device=self.keys[tier].device)
        return (off[1:] - off[:-1]).long()

    def owner_basis(self, which: str) -> torch.Tensor | None:
        """Basis per owner, [B*H, d, r_max]: the stored tensor itself when it already has one row
        per owner, else a gathered copy."""
        basis = self.basis_k if which == "k" else self.basis_v
        if basis is None:
            return None
        if self.basis_index is None and basis.shape[0] == self.owners:
            return basis
        owners = torch.arange(self.owners, device=basis.device)
        idx = owners % basis.shape[0] if self.basis_index is None else self.basis_index.long().clamp_min(0)
        return basis[idx]

    def stored_bytes(self) -> int:
        tensors: list[torch.Tensor | None] = [*self.keys, *self.values, *self.offsets, self.basis_index]
        if not self.basis_shared:
            tensors += [self.basis_k, self.basis_v]
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)

    def shared_bytes(self) -> int:
        if not self.basis_shared or self.basis_k is None or self.basis_v is None:
            return 0
        return self.basis_k.numel() * self.basis_k.element_size() * 2

    def num_tokens(self) -> int:
        return sum(k.shape[0] for k in self.keys)


def pack(
    key: torch.Tensor,
    value: torch.Tensor,
    chosen_dim: torch.Tensor,
    tier_dims: tuple[int, ...],
    key_coef: torch.Tensor | None = None,
    value_coef: torch.Tensor | None = None,
    basis_k: torch.Tensor | None = None,
    basis_v: torch.Tensor | None = None,
    basis_index: torch.Tensor | None = None,
    basis_shared: bool = False,
    value_dims: tuple[int, ...] | None = None,
    chosen_value_dim: torch.Tensor | None = None,
) -> PackedStore:
    """key, value: [B, H, N, d]; chosen_dim: [B, H, N] key dims (0 = dropped); tier t holds the
    tokens with (chosen_dim, chosen_value_dim) == (tier_dims[t], value_dims[t]) (value dims None:
    the same as the key dims); tier 0 is the full tier (d, d). key_coef / value_coef: [B, H, N,
    rk_max / rv_max] coordinates in the owner's bases (needed when a reduced tier is used)."""
    bsz, n_heads, n_tokens, head_dim = key.shape
    owners = bsz * n_heads
    value_dims = tuple(tier_dims) if value_dims is None else tuple(value_dims)
    flat_dim = chosen_dim.reshape(owners * n_tokens)
    flat_vdim = flat_dim if chosen_value_dim is None else chosen_value_dim.reshape(owners * n_tokens)
    masks = (
        torch.stack([(flat_dim == r) & (flat_vdim == rv) for r, rv in zip(tier_dims, value_dims, strict=True)])
        if tier_dims else None
    )  # [tiers, B*H*N]
    # Tokens per (tier, owner), copied to the host: one synchronisation for every shape the store
    # needs (each tier's size, and whether it is uniform over owners); then nonzero_static, which
    # does not sync. The copy is tiers x owners integers.
    counts = masks.view(len(tier_dims), owners, n_tokens).sum(-1) if masks is not None else None
    sizes: list[int] = []
    uniform: list[bool] = []
    if counts is not None:
        host_counts = counts.tolist() if owners > 0 else [[] for _ in tier_dims]
        sizes = [sum(row) for row in host_counts]
        uniform = [all(c == row[0] for c in row) for row in host_counts]
    keys, values, offsets = [], [], []
    key_flat = value_flat = None
    if key_coef is not None and value_coef is not None:
        # Views when the coefficients allow it; rows are gathered before the tier's columns are cut.
        key_flat = key_coef.reshape(owners * n_tokens, key_coef.shape[-1])
        value_flat = value_coef.reshape(owners * n_tokens, value_coef.shape[-1])
    for t, (r, rv) in enumerate(zip(tier_dims, value_dims, strict=True)):
        # Indices of an owner-major flat mask list tokens by owner, then position.
        idx = torch.nonzero_static(masks[t], size=sizes[t]).squeeze(-1)
        if t == 0:
            if (r, rv) != (head_dim, head_dim):
                raise ValueError(f"tier 0 must be the full tier ({head_dim}, {head_dim}), got ({r}, {rv})")
            k_t = key.reshape(-1, head_dim).index_select(0, idx)
            v_t = value.reshape(-1, head_dim).index_select(0, idx)
        else:
            if key_flat is None or value_flat is None:
                raise ValueError(f"tier ({r}, {rv}) is used but no basis coordinates were given")
            k_t = key_flat.index_select(0, idx)[:, :r].to(key.dtype)
            v_t = value_flat.index_select(0, idx)[:, :rv].to(value.dtype)
        if uniform[t]:
            off = None
        else:
            off = torch.zeros(owners + 1, dtype=torch.int32, device=key.device)
            torch.cumsum(counts[t], 0, dtype=torch.int32, out=off[1:])
        keys.append(k_t.contiguous())
        values.append(v_t.contiguous())
        offsets.append(off)
    return PackedStore(
        tier_dims=tuple(tier_dims),
        keys=keys,
        values=values,
        offsets=offsets,
        basis_k=None if basis_k is None else basis_k.to(key.dtype).contiguous(),
        basis_v=None if basis_v is None else basis_v.to(value.dtype).contiguous(),
        basis_index=basis_index,
        basis_shared=basis_shared,
        batch=bsz,
        kv_heads=n_heads,
        head_dim=head_dim,
        value_dims=value_dims,
    )


def padded_tier(store: PackedStore, tier: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A tier as [B*H, n_max, r_k] keys and [B*H, n_max, r_v] values plus a [B*H, n_max] validity
    mask (transient)."""
    k_t, v_t = store.keys[tier], store.values[tier]
    r, rv = store.tier_dims[tier], store.value_dims[tier]
    owners = store.owners
    if store.offsets[tier] is None:
        n = k_t.shape[0] // max(owners, 1)
        mask = torch.ones(owners, n, dtype=torch.bool, device=k_t.device)
        return k_t.view(owners, n, r), v_t.view(owners, n, rv), mask
    counts = store.counts(tier)
    n_max = int(counts.max()) if counts.numel() else 0
    owner = torch.repeat_interleave(torch.arange(owners, device=k_t.device), counts)
    slot = torch.arange(k_t.shape[0], device=k_t.device) - store.offsets[tier].long()[owner]
    k_pad = k_t.new_zeros(owners, n_max, r)
    v_pad = v_t.new_zeros(owners, n_max, rv)
    mask = torch.zeros(owners, n_max, dtype=torch.bool, device=k_t.device)
    k_pad[owner, slot] = k_t
    v_pad[owner, slot] = v_t
    mask[owner, slot] = True
    return k_pad, v_pad, mask


def reconstruct(store: PackedStore) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Dense keys/values of every stored token, [B*H, n_max_total, d] each, plus a validity mask.
    For tests and debugging: the attention path never does this."""
    parts_k, parts_v, parts_m = [], [], []
    bk, bv = store.owner_basis("k"), store.owner_basis("v")
    for t, (r, rv) in enumerate(store.tiers):
        k_pad, v_pad, mask = padded_tier(store, t)
        if t > 0:
            k_pad = k_pad.float() @ bk[:, :, :r].float().transpose(-1, -2)
            v_pad = v_pad.float() @ bv[:, :, :rv].float().transpose(-1, -2)
        parts_k.append(k_pad.float())
        parts_v.append(v_pad.float())
        parts_m.append(mask)
    return torch.cat(parts_k, 1), torch.cat(parts_v, 1), torch.cat(parts_m, 1)
