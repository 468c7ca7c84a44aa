"""Stage 1 of MixedDimKV: the loss of storing each token at each candidate dimension.

    L_i(r) = importance_i * ( a * |k_i - P_r P_r^T k_i|^2 / |k_i|^2 + (1 - a) * (same for v_i) )

with P_r the first r basis columns. L_i(0) = importance_i (eviction, as SnapKV scores it) and
L_i(d) = 0 (kept as is), so with dims (0, d) the objective is exactly eviction by importance.
"""

from __future__ import annotations

import torch


def running_min(columns: list[torch.Tensor]) -> torch.Tensor:
    """torch.cummin(torch.stack(columns, -1), -1).values for a handful of columns, as len - 1
    elementwise minima: the same values (a minimum is exact), without the scan-with-indices kernel,
    which on CUDA is very slow for a short innermost dimension."""
    out = [columns[0]]
    for col in columns[1:]:
        out.append(torch.minimum(out[-1], col))
    return torch.stack(out, dim=-1)


def residual_fraction(coef: torch.Tensor, norm2: torch.Tensor, dims: tuple[int, ...], head_dim: int) -> torch.Tensor:
    """coef: [..., N, r_max] coordinates in an orthonormal basis; norm2: [..., N] squared norms.
    Returns [..., N, len(dims)]: energy outside the first r coordinates over the total, per r."""
    # Energy kept by the first j+1 columns, scanned over a non-innermost axis: CUDA then runs one
    # sequential loop per token (the innermost-axis scan kernel is slow for short rows); on CPU the
    # scan is the same sequential loop either way, so the values are those of a last-axis cumsum.
    # The squares are written [..., r_max, N]-contiguous and scanned in place: a CUDA scan first
    # copies a strided input to a contiguous one, so the transpose is paid once, by the square.
    coef_t = coef.float().transpose(-1, -2)
    energy = torch.square(coef_t, out=coef_t.new_empty(coef_t.shape)).cumsum_(dim=-2)  # [..., r_max, N]
    denom = norm2.clamp_min(1e-12)  # shared by the tiers
    out = []
    for r in dims:
        if r == 0:
            out.append(torch.ones_like(norm2))
        elif r >= head_dim:
            out.append(torch.zeros_like(norm2))
        else:
            kept = energy[..., r - 1, :]
            out.append(((norm2 - kept) / denom).clamp(0.0, 1.0))
    return torch.stack(out, dim=-1)


def candidate_losses(
    importance: torch.Tensor,
    key_coef: torch.Tensor | None,
    value_coef: torch.Tensor | None,
    key_norm2: torch.Tensor | None,
    value_norm2: torch.Tensor | None,
    dims: tuple[int, ...],
    head_dim: int,
    key_weight: float,
) -> torch.Tensor:
    """importance [B, H, N] (non-negative, finite); coefficients [B, H, N, r_max] and squared norms
    [B, H, N] (None when dims has no reduced tier). Returns [B, H, N, len(dims)] float32, non-increasing along the last
    axis."""
    if key_coef is None or value_coef is None or key_norm2 is None or value_norm2 is None:
        # Fraction 1 at dim 0, else 0: the losses are importance and 0 (importance * 1.0 and
        # importance * 0.0 for the non-negative, finite importance of `window_importance`).
        importance = importance.float()
        zero = torch.zeros_like(importance)
        return torch.stack([importance if r == 0 else zero for r in dims], dim=-1)
    frac = key_weight * residual_fraction(key_coef, key_norm2, dims, head_dim) + (
        1.0 - key_weight
    ) * residual_fraction(value_coef, value_norm2, dims, head_dim)
    # Rounding can make a longer prefix look worse by 1e-8; the solver needs monotone losses.
    frac = running_min(list(frac.unbind(-1)))
    return importance.float()[..., None] * frac


def logit_errors(
    window_queries: torch.Tensor, key_coef_full: torch.Tensor, dims: tuple[int, ...], scale: float
) -> torch.Tensor:
    """[B, H, N, len(dims)]: for each r in dims (0 < r < d), the rms over the window queries of the logit
    error of keeping a key's first r coordinates, scale * |q[r:] . k[r:]|. The reference for the fused
    kernel (kernels/compression.py), which never holds the [B, H, W, N] product."""
    out = []
    for r in dims:
        tail = window_queries[..., r:].float() @ key_coef_full[..., r:].float().transpose(-1, -2)  # [B,H,W,N]
        out.append(scale * tail.square_().mean(dim=-2).sqrt())
    return torch.stack(out, dim=-1)


def attention_losses(
    importance: torch.Tensor,
    window_queries: torch.Tensor,
    key_coef_full: torch.Tensor,
    value_coef: torch.Tensor,
    value_norm2: torch.Tensor,
    dims: tuple[int, ...],
    head_dim: int,
    scale: float,
    errors: torch.Tensor | None = None,
) -> torch.Tensor:
    """Loss as the error a token's reduction puts into the attention output (default).

    Evicting token i changes the output by about a_i * (v_i - o); keeping it at dimension r
    changes it by a_i * dv_i + a_i * delta_i * (v_i - o), where delta_i is the error of its logit.
    Relative to eviction that is |dv_i| / |v_i| + rms over the window queries of |delta_i(r)|,
    capped at 1 (never worse than eviction):

        L_i(r) = a_i * min(1, |v_i - v_hat_i| / |v_i| + rms_q |scale * q . (k_i - k_hat_i)|)

    window_queries [B, H, W, d] are the window queries of the KV head's group, rotated into the
    key basis; key_coef_full [B, H, N, d] are the keys in the full key basis (all d columns), so the
    logit error of keeping the first r coordinates is the dot product over the remaining ones.
    Logit errors weigh like this because attention is exponential in them: a retrieval token whose
    key loses a little energy in a direction the queries use loses most of its weight.
    `errors`: `logit_errors` of the reduced dims (0 < r < d, in order) when the caller computed them
    (the fused kernel); None computes them here.
    """
    # residual_fraction is already in [0, 1] (+0, never -0: a clamp, or exact 1 / 0).
    value_frac = residual_fraction(value_coef, value_norm2, dims, head_dim).sqrt()
    reduced = tuple(r for r in dims if 0 < r < head_dim)
    if errors is None and reduced:
        errors = logit_errors(window_queries, key_coef_full, reduced, scale)
    out = []
    for j, r in enumerate(dims):
        if r == 0:
            out.append(torch.ones_like(importance))
        elif r >= head_dim:
            out.append(torch.zeros_like(importance))
        else:
            out.append((value_frac[..., j] + errors[..., reduced.index(r)]).clamp(max=1.0))
    frac = running_min(out)
    return importance.float()[..., None] * frac
