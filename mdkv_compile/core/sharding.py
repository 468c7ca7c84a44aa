"""Tensor parallelism: each rank's MixedDimCache compresses the KV heads it owns.

Under transformers' tensor parallelism (`from_pretrained(..., tp_plan="auto")` under `torchrun`)
q/k/v projections are column-sharded, so rank r of W sees KV heads [r*H/W, (r+1)*H/W) of every
layer (contiguous: the projection's output rows are split in order). The model config still
says H. This module holds what the cache and the policies need for that:

- `HeadShard`: this rank's slice of the KV heads (`mdkv_compile.cache.head_shard(config)` reads it
  off a model config; None when not tensor-parallel). Every helper below is only called with a
  shard, so single-process behaviour is untouched.
- `gather_heads`: all-gather a per-head tensor along the head dimension. Budgets pooled across
  heads (`ada-snapkv`, `pool="layer"`), the lowrank rank (min over heads) and the per-row
  evict-or-mixed decision of `mixeddimkv` are computed on the gathered, model-wide tensors with
  the single-process code, so every rank takes the same decision as one process would and keeps
  its slice of it. What is gathered is per-token scores or losses, not keys or values.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class HeadShard:
    """This rank's contiguous slice of the KV heads of every layer."""

    rank: int
    world: int
    total_heads: int  # KV heads per layer of the whole model (the config's count)
    group: Any = None  # process group of the TP ranks; None = the default (world) group

    @property
    def local_heads(self) -> int:
        return self.total_heads // self.world

    @property
    def heads(self) -> slice:
        return slice(self.rank * self.local_heads, (self.rank + 1) * self.local_heads)


def check_local_heads(shard: HeadShard, local: int, layer_idx: int) -> None:
    """Fail clearly when the keys' head count does not match the sharding the cache assumed."""
    if local != shard.local_heads:
        raise RuntimeError(
            f"layer {layer_idx}: keys have {local} KV heads on rank {shard.rank} of {shard.world}, expected "
            f"{shard.local_heads} ({shard.total_heads} in the config); the model is sharded differently from "
            "what MixedDimCache read off its config"
        )


# What the policies' collectives sent from this rank (calls, bytes): benchmarks read and reset it.
GATHER_STATS = {"calls": 0, "bytes": 0}


def gather_heads(x: torch.Tensor, shard: HeadShard, dim: int = 1) -> torch.Tensor:
    """All-gather a per-head tensor (heads on `dim`) into the model-wide tensor, heads in order."""
    x = x.contiguous()
    GATHER_STATS["calls"] += 1
    GATHER_STATS["bytes"] += x.numel() * x.element_size()
    parts = [torch.empty_like(x) for _ in range(shard.world)]
    dist.all_gather(parts, x, group=shard.group)
    return torch.cat(parts, dim=dim)


def local_heads(x: torch.Tensor, shard: HeadShard, dim: int = 1) -> torch.Tensor:
    """This rank's slice of a model-wide per-head tensor."""
    return x.narrow(dim, shard.heads.start, shard.local_heads)


def shard_store_bytes(chosen_dim: torch.Tensor, tier_dims: tuple[int, ...], head_dim: int, itemsize: int,
                      basis_rows: int, basis_widths: tuple[int, int], has_basis_index: bool, shard: HeadShard,
                      value_dims: tuple[int, ...] | None = None, chosen_value_dim: torch.Tensor | None = None) -> int:
    """Bytes `core.packing.pack` allocates on `shard`'s rank for a single-process selection
    `chosen_dim` [B, H, N] of key dims and `chosen_value_dim` of value dims over tiers of
    (`tier_dims`, `value_dims`) (None: values at the key dims) (for tests and benchmarks: what each
    rank should hold).

    `basis_rows`: rows of the single-process prompt basis (0 for none or a calibrated one), of
    `basis_widths` = (basis_k, basis_v) columns. The split is exact for tier payloads, bases and the
    basis index; the CSR offsets are per rank (B*H/W + 1 int32 each), and a tier can be uniform on one
    rank but not on the whole model.
    """
    sel = local_heads(chosen_dim, shard)
    sel_v = sel if chosen_value_dim is None else local_heads(chosen_value_dim, shard)
    owners = sel.shape[0] * sel.shape[1]
    total = 0
    for r, rv in zip(tier_dims, tier_dims if value_dims is None else value_dims, strict=True):
        counts = ((sel == r) & (sel_v == rv)).reshape(owners, -1).sum(-1)
        total += int(counts.sum()) * (r + rv) * itemsize
        if not bool((counts == counts[0]).all()):
            total += (owners + 1) * 4
    if basis_rows:
        total += basis_rows // shard.world * head_dim * sum(basis_widths) * itemsize
    if has_basis_index:
        total += owners * 4
    return total
