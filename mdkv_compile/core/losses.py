"""Stage 1 of MixedDimKV: the loss of storing each token at each candidate option.

An option is a pair (r_k, r_v): the token's key keeps its first r_k basis coordinates and its value
its first r_v. (0, 0) is eviction, (d, d) keeps the token as it is. Losses are relative to
eviction, L_i(0, 0) = importance_i, and L_i(d, d) = 0, so with no reduced option the objective is
exactly eviction by importance (SnapKV).

Two models of what a reduction costs (`cfg.loss`):

* "attention" (default): the error the reduction puts into the attention output, relative to
  eviction's. A key kept at r_k dims moves the token's logit by delta (RMS sigma over the window
  queries), which scales its attention weight by e^delta. Over the many tokens of a reduced tier
  the noise averages out and what remains is the bias of the tier's attention mass,
  E[e^delta] - 1 = expm1(sigma^2 / 2) for Gaussian delta; eviction's error is the whole weight,
  and it is coherent too (every evicted token's weight goes to the others). A value kept at r_v
  dims adds its relative error |v - v_hat| / |v|, which is mostly incoherent across tokens and
  weighs `value_weight`:

      L_i(r_k, r_v) = importance_i * min(1, expm1(sigma_i(r_k)^2 / 2) + value_weight * rel_i(r_v))

  The model and its weight were chosen by measurement: docs/notes/quality_notes.md.
* "energy": importance-weighted residual energy of key and value, mixed by `key_weight`.
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


Option = tuple[int, int]  # (key dim, value dim)


def eviction_losses(importance: torch.Tensor) -> torch.Tensor:
    """[B, H, N, 2]: the losses of options (0, 0) and (d, d): importance and 0."""
    importance = importance.float()
    return torch.stack([importance, torch.zeros_like(importance)], dim=-1)


def combine_losses(
    importance: torch.Tensor,
    key_term: dict[int, torch.Tensor],
    value_term: dict[int, torch.Tensor],
    options: tuple[Option, ...],
) -> torch.Tensor:
    """importance [B, H, N]; key_term / value_term: {dim: [B, H, N]} the relative error of keeping
    a key / value at that many dims (dims below d; the full dimension costs nothing); options in
    ascending cost, (0, 0) first. Returns [B, H, N, len(options)] float32:
    importance * min(1, key_term[r_k] + value_term[r_v]), 1 for (0, 0), non-increasing along the
    options (a dearer option never looks worse than a cheaper one: the solver needs monotone losses;
    a dominated option then ties and is never bought)."""
    zero = torch.zeros_like(importance, dtype=torch.float32)
    cols = []
    for r_k, r_v in options:
        if r_k == 0:
            cols.append(torch.ones_like(zero))
            continue
        rel = key_term.get(r_k, zero) + value_term.get(r_v, zero)
        cols.append(rel.clamp(max=1.0))
    return importance.float()[..., None] * running_min(cols)


def attention_losses(
    importance: torch.Tensor,
    logit_rms: torch.Tensor,
    key_dims: tuple[int, ...],
    value_frac: torch.Tensor,
    value_dims: tuple[int, ...],
    options: tuple[Option, ...],
    value_weight: float,
) -> torch.Tensor:
    """The "attention" loss (module docstring). logit_rms [B, H, N, len(key_dims)]: RMS logit error
    over the window queries of a key kept at each of `key_dims` (`logit_errors`); value_frac
    [B, H, N, len(value_dims)]: residual energy fraction of the value at each of `value_dims`
    (`residual_fraction`). Both cover the reduced dims (below d) the options use."""
    key_term = {r: torch.expm1(logit_rms[..., j].square() * 0.5) for j, r in enumerate(key_dims)}
    value_term = {r: value_weight * value_frac[..., j].sqrt() for j, r in enumerate(value_dims)}
    return combine_losses(importance, key_term, value_term, options)


def energy_losses(
    importance: torch.Tensor,
    key_frac: torch.Tensor,
    key_dims: tuple[int, ...],
    value_frac: torch.Tensor,
    value_dims: tuple[int, ...],
    options: tuple[Option, ...],
    key_weight: float,
) -> torch.Tensor:
    """The "energy" loss: importance * (key_weight * key residual fraction + (1 - key_weight) *
    value residual fraction), fractions from `residual_fraction` at `key_dims` / `value_dims`."""
    key_term = {r: key_weight * key_frac[..., j] for j, r in enumerate(key_dims)}
    value_term = {r: (1.0 - key_weight) * value_frac[..., j] for j, r in enumerate(value_dims)}
    return combine_losses(importance, key_term, value_term, options)


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
