"""Fixed-shape form of the packed store, for compiled graphs (no recompiles, CUDA graphs) and for
exported models (the cache as explicit inputs and outputs).

Per layer, each owner o = b * H + h gets one row of `capacity` elements in a key buffer and one in
a value buffer: its tokens tier after tier (tier order = `tier_dims`, full tier first), each token
`tier_dims[t]` consecutive key values and `value_dims[t]` value values. `counts[o, t]` says how many
tokens of tier t the row holds, so where a tier starts in a row is the running sum of counts x
dims: data, not shape. Bases are per owner (zeros where unused). New tokens go to a
full-dimension region of fixed capacity.

    keys, values   [B*H, capacity]        the stored coefficients (model dtype)
    counts         [B*H, T]       int32   tokens per tier
    basis_k        [B*H, d, rk_max]       (absent when no reduced tier)
    basis_v        [B*H, d, rv_max]

Attention gathers each tier as [B*H, capacity // r_t, r_t] with static shapes and masks the slots
past the count: it reads every tier's window of the row, so it costs T x capacity per owner in
plain PyTorch; the Triton kernel reads only the filled slots.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from mdkv_compile.core.attention import softmax_over_parts
from mdkv_compile.core.packing import PackedStore
from mdkv_compile.core.scoring import softcap_logits


@dataclass
class StaticStore:
    tier_dims: tuple[int, ...]
    keys: torch.Tensor  # [B*H, capacity]
    values: torch.Tensor  # [B*H, capacity]
    counts: torch.Tensor  # [B*H, T] int32
    basis_k: torch.Tensor | None  # [B*H, d, r_max]
    basis_v: torch.Tensor | None
    batch: int
    kv_heads: int
    head_dim: int
    value_dims: tuple[int, ...] = ()  # value dims per tier; () means the same as tier_dims

    def __post_init__(self) -> None:
        if not self.value_dims:
            self.value_dims = tuple(self.tier_dims)

    @property
    def capacity(self) -> int:
        return self.keys.shape[1]

    def tensors(self) -> list[torch.Tensor]:
        """The store as a flat list of tensors (graph inputs / outputs), order of `from_tensors`."""
        out = [self.keys, self.values, self.counts]
        if self.basis_k is not None and self.basis_v is not None:
            out += [self.basis_k, self.basis_v]
        return out

    @classmethod
    def from_tensors(
        cls, tensors: list[torch.Tensor], tier_dims: tuple[int, ...], batch: int, kv_heads: int, head_dim: int,
        value_dims: tuple[int, ...] = (),
    ) -> StaticStore:
        basis_k, basis_v = (tensors[3], tensors[4]) if len(tensors) == 5 else (None, None)
        return cls(tier_dims, tensors[0], tensors[1], tensors[2], basis_k, basis_v, batch, kv_heads, head_dim,
                   tuple(value_dims))

    def stored_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())


def to_static(store: PackedStore, capacity: int | None = None) -> StaticStore:
    """Lay a PackedStore out in fixed-shape rows. `capacity` (elements per owner and buffer) defaults
    to the fullest owner's need; give the budget's units to get one shape for every prompt."""
    owners, d = store.owners, store.head_dim
    counts = torch.stack([store.counts(t) for t in range(len(store.tier_dims))], dim=1)  # [O, T]
    key_dims = torch.tensor(store.tier_dims, device=counts.device)
    value_dims = torch.tensor(store.value_dims, device=counts.device)
    need = int(torch.maximum((counts * key_dims).sum(1), (counts * value_dims).sum(1)).max()) if owners else 0
    capacity = need if capacity is None else capacity
    if need > capacity:
        raise ValueError(f"store needs {need} elements per owner, more than the capacity {capacity}")
    dtype, device = store.keys[0].dtype, store.keys[0].device
    keys = torch.zeros(owners, capacity, dtype=dtype, device=device)
    values = torch.zeros(owners, capacity, dtype=dtype, device=device)
    for buffer, stored, dims in ((keys, store.keys, store.tier_dims), (values, store.values, store.value_dims)):
        start = torch.zeros(owners, dtype=torch.long, device=device)
        for t, r in enumerate(dims):
            n = counts[:, t]
            owner = torch.repeat_interleave(torch.arange(owners, device=device), n)
            slot = torch.arange(int(n.sum()), device=device) - (torch.cumsum(n, 0) - n)[owner]
            col = start[owner, None] + slot[:, None] * r + torch.arange(r, device=device)[None, :]
            buffer[owner[:, None], col] = stored[t]
            start = start + n * r
    basis_k, basis_v = store.owner_basis("k"), store.owner_basis("v")
    if basis_k is not None and store.basis_index is not None:
        unused = (store.basis_index < 0)[:, None, None]
        basis_k, basis_v = basis_k.masked_fill(unused, 0), basis_v.masked_fill(unused, 0)
    return StaticStore(
        tier_dims=store.tier_dims, keys=keys, values=values, counts=counts.to(torch.int32),
        basis_k=None if basis_k is None else basis_k.contiguous(),
        basis_v=None if basis_v is None else basis_v.contiguous(),
        batch=store.batch, kv_heads=store.kv_heads, head_dim=d, value_dims=store.value_dims,
    )


def _gather_rows(buffer: torch.Tensor, counts: torch.Tensor, dims: tuple[int, ...], tier: int) -> torch.Tensor:
    """Tier `tier` of one buffer as [B*H, capacity // r, r] with static shapes (r = dims[tier])."""
    r = dims[tier]
    dims_t = torch.tensor(dims, device=counts.device)
    start = (counts[:, :tier] * dims_t[:tier]).sum(1)  # [O]
    capacity = buffer.shape[1]
    slots = capacity // r
    col = start[:, None, None] + torch.arange(slots, device=start.device)[None, :, None] * r
    col = (col + torch.arange(r, device=start.device)[None, None, :]).clamp(max=max(capacity - 1, 0))
    return buffer.gather(1, col.reshape(col.shape[0], -1)).view(-1, slots, r)


def gather_tier(store: StaticStore, tier: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Tier `tier` as [B*H, S, r_k] keys and [B*H, S, r_v] values plus a [B*H, S] mask, with static
    shapes (S = capacity // max(r_k, r_v) slots; slots past the owner's count are masked)."""
    counts = store.counts.long()
    k = _gather_rows(store.keys, counts, store.tier_dims, tier)
    v = _gather_rows(store.values, counts, store.value_dims, tier)
    slots = min(k.shape[1], v.shape[1])  # the tier's count fits both buffers' windows
    mask = torch.arange(slots, device=counts.device)[None, :] < counts[:, tier, None]
    return k[:, :slots], v[:, :slots], mask


def attend_static(
    query: torch.Tensor,
    store: StaticStore,
    key_new: torch.Tensor,
    value_new: torch.Tensor,
    n_new: torch.Tensor,
    scale: float | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """Attention of the last L of `n_new` appended tokens' queries over the static store plus the
    first `n_new` slots of the fixed-capacity region key_new/value_new [B, H, cap, d].
    query [B, Hq, L, d]; n_new: 0-d int tensor (data, so one graph serves every step).
    Same semantics as `attend_packed` with a causal new-token mask."""
    bsz, n_q_heads, n_queries, d = query.shape
    owners = store.batch * store.kv_heads
    group = n_q_heads // store.kv_heads
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    q = query.float().reshape(owners, group, n_queries, d)
    q_rot = None if store.basis_k is None else q @ store.basis_k.float()[:, None]
    logit_parts, value_parts = [], []
    for t, (r, rv) in enumerate(zip(store.tier_dims, store.value_dims, strict=True)):
        k, v, mask = gather_tier(store, t)
        q_t = q if t == 0 else q_rot[..., :r]
        logits = softcap_logits((q_t @ k.float().transpose(-1, -2)[:, None]) * scale, softcap)
        logit_parts.append(logits.masked_fill(~mask[:, None, None, :], float("-inf")))
        value_parts.append((v.float(), None if t == 0 else rv))
    cap = key_new.shape[2]
    k_n = key_new.float().reshape(owners, cap, d)
    logits = softcap_logits((q @ k_n.transpose(-1, -2)[:, None]) * scale, softcap)
    # Query i (of L) sits at new position n_new - L + i and sees new slots up to it.
    q_pos = n_new - n_queries + torch.arange(n_queries, device=query.device)
    allowed = torch.arange(cap, device=query.device)[None, :] <= q_pos[:, None]
    logit_parts.append(logits.masked_fill(~allowed[None, None], float("-inf")))
    value_parts.append((value_new.float().reshape(owners, cap, d), None))

    out = softmax_over_parts(logit_parts, value_parts, store.basis_v, d)
    return out.view(bsz, n_q_heads, n_queries, d).to(query.dtype)


def append_static(
    key_new: torch.Tensor, value_new: torch.Tensor, n_new: torch.Tensor, key: torch.Tensor, value: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Functional append of key/value [B, H, L, d] at slot n_new of the fixed-capacity region:
    returns (new keys, new values, n_new + L). Writing past the capacity is an error of the caller
    (the exporters size the region for max_new_tokens)."""
    n_queries = key.shape[2]
    idx = n_new + torch.arange(n_queries, device=key.device)
    return key_new.index_copy(2, idx, key), value_new.index_copy(2, idx, value), n_new + n_queries
