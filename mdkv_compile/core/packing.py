"""The packed per-layer store (layout: docs/packed_store.md).

Tokens are grouped by tier (stored dimension), flat over all (row, KV head) owners, with CSR
offsets per tier; a tier whose owners all hold the same number of tokens needs no offsets. The
full tier holds keys and values as they are; reduced tiers hold coordinates in a per-owner basis.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class PackedStore:
    tier_dims: tuple[int, ...]  # nonzero dims, descending; tier_dims[0] == head_dim
    keys: list[torch.Tensor]  # per tier [M_t, r_t]
    values: list[torch.Tensor]
    offsets: list[torch.Tensor | None]  # per tier [B*H + 1] int32; None: uniform count per owner
    basis_k: torch.Tensor | None  # [n_basis, d, r_max]
    basis_v: torch.Tensor | None
    basis_index: torch.Tensor | None  # [B*H] int32 owner -> basis row (-1: none); None: owner % n_basis
    basis_shared: bool  # calibrated bases belong to the model, not to this prompt
    batch: int
    kv_heads: int
    head_dim: int

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
) -> PackedStore:
    """key, value: [B, H, N, d]; chosen_dim: [B, H, N] (0 = dropped, else one of tier_dims);
    key_coef / value_coef: [B, H, N, r_max] coordinates in the owner's basis (needed when a
    reduced tier is used)."""
    bsz, n_heads, n_tokens, head_dim = key.shape
    owners = bsz * n_heads
    flat_dim = chosen_dim.reshape(owners * n_tokens)
    masks = torch.stack([flat_dim == r for r in tier_dims]) if tier_dims else None  # [tiers, B*H*N]
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
    for t, r in enumerate(tier_dims):
        # Indices of an owner-major flat mask list tokens by owner, then position.
        idx = torch.nonzero_static(masks[t], size=sizes[t]).squeeze(-1)
        if r == head_dim:
            k_t = key.reshape(-1, head_dim).index_select(0, idx)
            v_t = value.reshape(-1, head_dim).index_select(0, idx)
        else:
            if key_flat is None or value_flat is None:
                raise ValueError(f"tier {r} is used but no basis coordinates were given")
            k_t = key_flat.index_select(0, idx)[:, :r].to(key.dtype)
            v_t = value_flat.index_select(0, idx)[:, :r].to(value.dtype)
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
    )


def padded_tier(store: PackedStore, tier: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A tier as [B*H, n_max, r] keys and values plus a [B*H, n_max] validity mask (transient)."""
    k_t, v_t = store.keys[tier], store.values[tier]
    r = store.tier_dims[tier]
    owners = store.owners
    if store.offsets[tier] is None:
        n = k_t.shape[0] // max(owners, 1)
        mask = torch.ones(owners, n, dtype=torch.bool, device=k_t.device)
        return k_t.view(owners, n, r), v_t.view(owners, n, r), mask
    counts = store.counts(tier)
    n_max = int(counts.max()) if counts.numel() else 0
    owner = torch.repeat_interleave(torch.arange(owners, device=k_t.device), counts)
    slot = torch.arange(k_t.shape[0], device=k_t.device) - store.offsets[tier].long()[owner]
    k_pad = k_t.new_zeros(owners, n_max, r)
    v_pad = v_t.new_zeros(owners, n_max, r)
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
    for t, r in enumerate(store.tier_dims):
        k_pad, v_pad, mask = padded_tier(store, t)
        if r != store.head_dim:
            k_pad = k_pad.float() @ bk[:, :, :r].float().transpose(-1, -2)
            v_pad = v_pad.float() @ bv[:, :, :r].float().transpose(-1, -2)
        parts_k.append(k_pad.float())
        parts_v.append(v_pad.float())
        parts_m.append(mask)
    return torch.cat(parts_k, 1), torch.cat(parts_v, 1), torch.cat(parts_m, 1)
