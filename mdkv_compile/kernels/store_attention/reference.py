"""Attention over the packed store in plain PyTorch: the op's fallback where the kernels cannot run (a
CPU tensor without ``TRITON_INTERPRET=1``) and the reference the kernel tests check against. Traceable:
no data-dependent Python control flow."""

from __future__ import annotations

import torch
from torch import Tensor

_NEG_INF = float("-inf")


def _segment_ids(offsets: Tensor, n_rows: int) -> Tensor:
    """Owner of each row of a CSR-packed tier."""
    rows = torch.arange(n_rows, device=offsets.device, dtype=offsets.dtype)
    return torch.searchsorted(offsets[1:].contiguous(), rows, right=True)


def packed_attention_torch(
    q: Tensor,
    tier_keys: list[Tensor],
    tier_values: list[Tensor],
    tier_offsets: list[Tensor],
    basis_k: Tensor | None,
    basis_v: Tensor | None,
    k_new: Tensor,
    v_new: Tensor,
    n_new: int,
    scale: float,
    softcap: float | None = None,
    compute_dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Same contract as ``packed_decode_attention`` (L = 1) and ``packed_chunk_attention`` (L >= 1: the
    queries are the last L of the n_new new tokens, causal among them; every stored token visible);
    computes in ``compute_dtype`` (float64 for checks)."""
    B, Hq, L, d = q.shape
    Hkv = k_new.shape[1]
    G = Hq // Hkv
    M = G * L  # query rows per owner, row r = g * L + l (q's own memory order)
    n_own = B * Hkv
    cd = compute_dtype
    qg = q.reshape(n_own, M, d).to(cd)  # owner o = b * Hkv + h serves query heads h*G .. h*G+G-1
    logits: list[Tensor] = []  # per region: [rows, M]
    owners: list[Tensor] = []
    vals: list[Tensor] = []  # per region: [rows, d] value contributions in head space (after rotation)
    for t, (kt, vt, off) in enumerate(zip(tier_keys, tier_values, tier_offsets, strict=True)):
        rk, rv = kt.shape[1], vt.shape[1]
        seg = _segment_ids(off, kt.shape[0])
        if t == 0:
            qs = qg[seg]  # [rows, M, d]
            vals.append(vt.to(cd))
        else:
            assert basis_k is not None and basis_v is not None
            qs = torch.einsum("ogd,odr->ogr", qg, basis_k[:, :, :rk].to(cd))[seg]
            # rotating each value row back is fine for a reference; the kernel rotates sums once
            vals.append(torch.einsum("nr,ndr->nd", vt.to(cd), basis_v[seg][:, :, :rv].to(cd)))
        logits.append(torch.einsum("ngr,nr->ng", qs, kt.to(cd)))
        owners.append(seg)
    kn = k_new[:, :, :n_new].reshape(n_own, n_new, d).to(cd)
    s_new = torch.einsum("ogd,ond->ong", qg, kn)  # [owners, n_new, M]
    # new token j is visible to query row r (position n_new - L + r % L among the new tokens) iff j <= it
    pos = n_new - L + torch.arange(M, device=q.device) % L
    visible = torch.arange(n_new, device=q.device)[:, None] <= pos[None, :]
    logits.append(s_new.masked_fill(~visible, _NEG_INF).reshape(n_own * n_new, M))
    owners.append(torch.arange(n_own, device=q.device).repeat_interleave(n_new))
    vals.append(v_new[:, :, :n_new].reshape(n_own * n_new, d).to(cd))

    s = torch.cat(logits) * scale
    if softcap is not None:
        s = softcap * torch.tanh(s / softcap)
    seg = torch.cat(owners)
    v = torch.cat(vals)
    m = torch.full((n_own, M), _NEG_INF, dtype=cd, device=q.device)
    m = m.scatter_reduce(0, seg[:, None].expand(-1, M), s, reduce="amax")
    m = torch.where(torch.isinf(m), 0.0, m)  # rows with nothing visible: every p is exp(-inf) = 0
    p = torch.exp(s - m[seg])
    denom = torch.zeros(n_own, M, dtype=cd, device=q.device).index_add(0, seg, p)
    num = torch.zeros(n_own, M, d, dtype=cd, device=q.device).index_add(0, seg, p[:, :, None] * v[:, None, :])
    out = torch.where(denom[..., None] > 0, num / denom.clamp_min(1e-300)[..., None], 0.0)
    return out.reshape(B, Hq, L, d).to(q.dtype)
