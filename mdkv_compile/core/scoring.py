"""Token importance per KV head (SnapKV-style, GQA-aware).

The last `window` valid prompt queries attend to all prompt keys; the attention each key receives
is averaged over those window rows and over the query heads of its GQA group, then smoothed with a
centred max-pool. Window tokens are not scored: callers force them to full dimension.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def softcap_logits(logits: torch.Tensor, softcap: float | None) -> torch.Tensor:
    """Gemma-2 style logit soft-capping (identity when `softcap` is None)."""
    if softcap is None:
        return logits
    return torch.tanh(logits / softcap) * softcap


def window_importance(
    query: torch.Tensor,
    key: torch.Tensor,
    valid: torch.Tensor,
    window: int,
    pool_kernel: int,
    scale: float | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """Importance of every prompt token, per KV head.

    query: [B, Hq, N, d] prompt queries; key: [B, H, N, d] post-RoPE keys; valid: [B, N] bool
    (False for left padding). Padded rows must be left-aligned padding (valid tokens at the end),
    which is what generation uses. Returns [B, H, N] float32, 0 at invalid positions.
    """
    bsz, n_q_heads, n_tokens, head_dim = query.shape
    n_kv_heads = key.shape[1]
    group = n_q_heads // n_kv_heads
    scale = 1.0 / math.sqrt(head_dim) if scale is None else scale
    w = min(window, n_tokens)
    q_win = query[:, :, n_tokens - w :].float().view(bsz, n_kv_heads, group, w, head_dim)
    # In-place where the tensor is this function's own [B, H, G, W, N] temporary: same values, fewer
    # full-size copies.
    logits = torch.einsum("bhgwd,bhnd->bhgwn", q_win, key.float()).mul_(scale)
    logits = softcap_logits(logits, softcap)
    # Causal inside the window: window row i sits at position N - w + i.
    positions = torch.arange(n_tokens, device=key.device)
    row_pos = positions[n_tokens - w :]
    allowed = (positions[None, :] <= row_pos[:, None])[None, None, None] & valid[:, None, None, None, :]
    logits = logits.masked_fill_(~allowed, float("-inf"))
    probs = torch.softmax(logits, dim=-1).nan_to_num_(0.0)
    scores = probs.mean(dim=(2, 3))  # [B, H, N]
    if pool_kernel > 1:
        # An even kernel gives N + 1 outputs: the first N (output j covers j - k/2 .. j + k/2 - 1).
        scores = F.max_pool1d(
            scores.reshape(bsz * n_kv_heads, 1, n_tokens), pool_kernel, stride=1, padding=pool_kernel // 2
        )[..., :n_tokens].reshape(bsz, n_kv_heads, n_tokens)
    return scores.masked_fill(~valid[:, None, :], 0.0)


def forced_mask(valid: torch.Tensor, window: int, sinks: int) -> torch.Tensor:
    """[B, N] bool: the first `sinks` and last `window` valid tokens of each row."""
    n_valid = valid.sum(dim=-1, keepdim=True)
    n_tokens = valid.shape[-1]
    # Rank of each valid token inside its row (padding is on the left).
    rank = torch.arange(n_tokens, device=valid.device)[None, :] - (n_tokens - n_valid)
    return valid & ((rank < sinks) | (rank >= n_valid - window))
