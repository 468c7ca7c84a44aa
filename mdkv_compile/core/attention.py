"""Attention over the packed store plus full-dimension new tokens, without reconstructing keys.

The query is rotated once into each owner's key basis; a reduced-tier token's logit is the dot
product of its stored coordinates with the first r rotated coordinates, which equals q . k_hat
exactly. Values of reduced tiers are summed in coordinate space and rotated back once.
This pure-PyTorch version is the reference every kernel is checked against.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from mdkv_compile.core.packing import PackedStore, padded_tier
from mdkv_compile.core.scoring import softcap_logits


def dense_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    mask: torch.Tensor | None,
    scale: float | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """Exact attention. query [B, Hq, L, d]; key/value [B, H, S, d]; mask [B, 1|Hq, L, S] bool
    (True = attend) or additive float, or None for causal with the queries last. -> [B, Hq, L, d]."""
    group = query.shape[1] // key.shape[1]
    scale = 1.0 / math.sqrt(query.shape[-1]) if scale is None else scale
    if softcap is None:
        return F.scaled_dot_product_attention(
            query, key, value, attn_mask=mask, is_causal=mask is None and query.shape[2] > 1,
            scale=scale, enable_gqa=group > 1,
        )
    key = key.repeat_interleave(group, dim=1)
    value = value.repeat_interleave(group, dim=1)
    logits = softcap_logits((query @ key.transpose(-1, -2)).float() * scale, softcap)
    if mask is None:
        mask = causal_mask(query.shape[2], key.shape[2], query.device)[None, None]
    if mask.dtype == torch.bool:
        logits = logits.masked_fill(~mask, float("-inf"))
    else:
        logits = logits + mask
    return (torch.softmax(logits, dim=-1).to(value.dtype) @ value).to(query.dtype)


def is_causal_mask(mask: torch.Tensor, rows_per_check: int = 1024) -> bool:
    """Whether the bool `mask` [..., L, S] is exactly `causal_mask(L, S)` in every leading index.
    Compared in blocks of `rows_per_check` query rows (a bounded temporary, not an [L, S] causal
    mask beside the model's); one host synchronisation."""
    n_queries, n_keys = mask.shape[-2:]
    keys = torch.arange(n_keys, device=mask.device)
    same = torch.ones((), dtype=torch.bool, device=mask.device)
    for start in range(0, n_queries, rows_per_check):
        q_pos = keys[n_keys - n_queries + start : n_keys - n_queries + start + rows_per_check]
        same &= (mask[..., start : start + rows_per_check, :] == (keys[None, :] <= q_pos[:, None])).all()
    return bool(same)


def causal_or_mask(mask: torch.Tensor | None, rows_per_check: int = 1024) -> torch.Tensor | None:
    """None when `mask` ([B, 1|H, L, L] bool) is exactly the causal mask of a prompt with no
    padding, else `mask` unchanged. A traced model (torch.compile) always materialises its mask;
    SDPA given an explicit mask cannot use its flash kernel and first turns a bool mask into a
    float bias the size of the scores, per layer (2 GiB at batch 4 x 16K in bf16), where
    is_causal needs neither."""
    if mask is None or mask.dtype != torch.bool or mask.dim() != 4 or mask.shape[-1] != mask.shape[-2]:
        return mask
    return None if is_causal_mask(mask, rows_per_check) else mask


def causal_mask(n_queries: int, n_keys: int, device: torch.device) -> torch.Tensor:
    """[L, S] bool: the L queries are the last L of the S keys' positions."""
    q_pos = torch.arange(n_keys - n_queries, n_keys, device=device)
    return torch.arange(n_keys, device=device)[None, :] <= q_pos[:, None]


def attend_packed(
    query: torch.Tensor,
    store: PackedStore | None,
    key_new: torch.Tensor | None,
    value_new: torch.Tensor | None,
    new_mask: torch.Tensor | None = None,
    scale: float | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """query [B, Hq, L, d]; store: the compressed prompt (every stored token is visible to every
    query); key_new/value_new [B, H, S, d]: tokens appended after compression, the queries being
    the last L of them; new_mask [B, 1, L, S] bool (True = attend) or None for causal.
    Returns [B, Hq, L, d] in the query's dtype (computed in float32)."""
    bsz, n_q_heads, n_queries, head_dim = query.shape
    n_kv = store.kv_heads if store is not None else key_new.shape[1]
    group = n_q_heads // n_kv
    owners = bsz * n_kv
    scale = 1.0 / math.sqrt(head_dim) if scale is None else scale
    q = query.float().reshape(owners, group, n_queries, head_dim)

    logit_parts: list[torch.Tensor] = []  # each [owners, G, L, n_part]
    value_parts: list[tuple[torch.Tensor, int | None]] = []  # ([owners, n_part, r], r; None: full)
    q_rot = None
    if store is not None:
        bk = store.owner_basis("k")
        if bk is not None:
            q_rot = q @ bk.float()[:, None]  # [owners, G, L, r_max]
        for t, (r, rv) in enumerate(store.tiers):
            k_pad, v_pad, valid = padded_tier(store, t)
            if k_pad.shape[1] == 0:
                continue
            q_t = q if t == 0 else q_rot[..., :r]
            logits = softcap_logits((q_t @ k_pad.float().transpose(-1, -2)[:, None]) * scale, softcap)
            logit_parts.append(logits.masked_fill(~valid[:, None, None, :], float("-inf")))
            value_parts.append((v_pad.float(), None if t == 0 else rv))
    if key_new is not None and key_new.shape[2] > 0:
        k_n = key_new.float().reshape(owners, -1, head_dim)
        logits = softcap_logits((q @ k_n.transpose(-1, -2)[:, None]) * scale, softcap)
        if new_mask is None:
            allowed = causal_mask(n_queries, k_n.shape[1], query.device)[None, None]
        else:
            allowed = new_mask.bool().expand(bsz, 1, n_queries, k_n.shape[1])
            allowed = allowed.repeat_interleave(n_kv, dim=0)  # [owners, 1, L, S]
        logit_parts.append(logits.masked_fill(~allowed, float("-inf")))
        value_parts.append((value_new.float().reshape(owners, -1, head_dim), None))
    if not logit_parts:
        raise ValueError("attention over an empty cache: nothing stored and no new tokens")

    value_basis = None if store is None else store.owner_basis("v")
    out = softmax_over_parts(logit_parts, value_parts, value_basis, head_dim)
    return out.view(bsz, n_q_heads, n_queries, head_dim).to(query.dtype)


def softmax_over_parts(
    logit_parts: list[torch.Tensor],
    value_parts: list[tuple[torch.Tensor, int | None]],
    value_basis: torch.Tensor | None,
    head_dim: int,
) -> torch.Tensor:
    """One softmax over every part's logits ([owners, G, L, n_part] each), then the weighted sum
    of each part's values ([owners, n_part, r]): full-dimension parts (r None) directly, reduced ones
    (their first r coordinates) in coefficient space, rotated back once with value_basis
    [owners, d, rv_max].
    Returns [owners, G, L, d] float32."""
    probs = torch.softmax(torch.cat(logit_parts, dim=-1), dim=-1).nan_to_num(0.0)  # fully masked rows -> 0
    owners, group, n_queries, _ = probs.shape
    out = torch.zeros(owners, group, n_queries, head_dim, device=probs.device)
    reduced = None
    start = 0
    for (v, r), part in zip(value_parts, logit_parts, strict=True):
        contrib = probs[..., start : start + part.shape[-1]] @ v[:, None]  # [owners, G, L, r]
        start += part.shape[-1]
        if r is None:
            out = out + contrib
        else:
            if reduced is None:
                reduced = torch.zeros(owners, group, n_queries, value_basis.shape[-1], device=probs.device)
            reduced[..., :r] += contrib
    if reduced is not None:
        out = out + reduced @ value_basis.float().transpose(-1, -2)[:, None]
    return out
