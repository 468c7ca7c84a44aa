"""Orthonormal bases per KV head, ordered so that the first r columns span the best r-dim subspace.

Two sources:
* `prompt_basis`: uncentred PCA of this prompt's own keys (or values), per (row, KV head). No
  calibration, but the basis is stored with the prompt and counted in its budget.
* `save_calibrated` / `load_calibrated`: one basis per (layer, KV head) computed once from
  calibration text (`mdkv_compile.hf.calibrate.calibrate`) and saved as safetensors. Shared by
  every prompt, so it is reported beside the budget (`MixedDimCache.shared_bytes()`), like model
  weights.

`oblique_basis` is the non-orthogonal kind: the best nested projection in another metric than the
vectors' own (keys judged by the queries that read them, values by o_proj).
"""

from __future__ import annotations

from pathlib import Path

import torch

# Iterations of `subspace_basis` (each multiplies by the squared matrix); 4 captures all but ~1% of
# the eigh basis' energy per tier on SmolLM2 keys and values (tests/test_compression_speed.py).
SUBSPACE_ITERS = 4
# Shift of the normalised second moment (mean eigenvalue 1 -> 1 + shift). It changes neither the
# eigenvectors nor their order, and bounds the condition number of the squared matrix, so the
# Cholesky factor of every Gram matrix exists in float64, also for rank-deficient prompts (fewer
# valid tokens than dimensions) and all-zero heads.
SUBSPACE_SHIFT = 1e-2


def masked_float(x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """x: [B, H, N, d] as float32, zero where valid [B, N] is False. One elementwise pass: the float32
    mask promotes x, so conversion and masking are one kernel (x * 1.0 and x * 0.0 are exact)."""
    return torch.mul(x, valid[:, None, :, None].to(torch.float32)).float()


def masked_second_moment(x: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
    """x: [B, H, N, d]; valid: [B, N] bool, or None when x is already zero at invalid tokens (from
    `masked_float`). Uncentred second moment of the valid tokens, [B, H, d, d] float32 (float32
    accumulation, as `prompt_basis` has always used)."""
    xf = x.float() if valid is None else masked_float(x, valid)
    return xf.transpose(-1, -2) @ xf


def _cholesky_qr(y: torch.Tensor) -> torch.Tensor:
    """Q with Q R = y, R upper triangular (column j of Q mixes only columns 1..j of y), orthonormal
    up to cond(y)^2 * eps. `cholesky_ex` does not check for errors, so nothing syncs."""
    gram = y.transpose(-1, -2) @ y
    low, _ = torch.linalg.cholesky_ex(gram)
    return torch.linalg.solve_triangular(low.transpose(-1, -2), y, upper=True, left=False)


def subspace_basis(second_moment: torch.Tensor, rank: int, iters: int = SUBSPACE_ITERS) -> torch.Tensor:
    """Orthonormal [.., d, rank] float32 approximating the top-`rank` eigenvectors of a symmetric
    PSD [.., d, d], largest first: simultaneous (orthogonal) subspace iteration with Cholesky-QR.

    No eigendecomposition and no host synchronisation: batched matmuls, Cholesky factors and
    triangular solves in float64, a fixed number of them. Cholesky-QR keeps the subspaces nested
    (column j only mixes columns 1..j), so for every r the first r columns approximate the best
    r-dimensional subspace, which is all the tiers use. Start: the matrix's own columns of largest
    diagonal (deterministic; the coordinates with the most energy). Each iteration multiplies by
    the squared (shifted) matrix, so `iters` iterations apply it 2 * iters + 1 times. The last step
    repeats Cholesky-QR (CholQR2), so the columns are orthonormal to float64 rounding.
    """
    a = second_moment.double()
    d = a.shape[-1]
    mean_eig = (a.diagonal(dim1=-2, dim2=-1).sum(-1) / d).clamp_min(1e-30)
    a = a / mean_eig[..., None, None]
    a.diagonal(dim1=-2, dim2=-1).add_(SUBSPACE_SHIFT)  # + shift * I (in place: one op, no identity matrix)
    order = a.diagonal(dim1=-2, dim2=-1).argsort(dim=-1, descending=True, stable=True)[..., :rank]
    y = a.gather(-1, order[..., None, :].expand(*a.shape[:-1], rank))  # a @ (those identity columns)
    a2 = a @ a
    for _ in range(iters):
        y = a2 @ _cholesky_qr(y)
    return _cholesky_qr(_cholesky_qr(y)).float().contiguous()


def prompt_basis(x: torch.Tensor, valid: torch.Tensor | None, rank: int, solver: str = "eigh") -> torch.Tensor:
    """x: [B, H, N, d]; valid: [B, N] bool (None: x is already masked, see `masked_second_moment`).
    Returns [B, H, d, rank] float32 with orthonormal columns spanning (nested, largest first) the top
    principal directions of the valid tokens' second moment.

    solver "eigh": exact eigenvectors (`torch.linalg.eigh`; on CUDA a batched Jacobi solver of many
    small launches that synchronises with the host, most of the compression time). "subspace":
    `subspace_basis`, an approximation from a few batched matmuls (no host synchronisation)."""
    second_moment = masked_second_moment(x, valid)  # [B, H, d, d]
    if solver == "subspace":
        return subspace_basis(second_moment, rank)
    if solver != "eigh":
        raise ValueError(f"unknown basis solver {solver!r}: 'eigh' or 'subspace'")
    # eigh returns ascending eigenvalues; flip so column 0 carries the most energy.
    _, vecs = torch.linalg.eigh(second_moment)
    return vecs.flip(-1)[..., :rank].contiguous()


def prompt_bases(
    key: torch.Tensor, value: torch.Tensor, valid: torch.Tensor | None, rank: int, solver: str = "eigh"
) -> tuple[torch.Tensor, torch.Tensor]:
    """`prompt_basis` of the keys and of the values. The subspace solver runs both as one batch
    (half the launches: its cost on CUDA is the number of small batched factorisations, not their
    size); eigh runs them one after the other."""
    if solver != "subspace":
        return prompt_basis(key, valid, rank, solver), prompt_basis(value, valid, rank, solver)
    moments = torch.stack([masked_second_moment(key, valid), masked_second_moment(value, valid)])
    both = subspace_basis(moments, rank)
    return both[0], both[1]


def second_moment_basis(second_moment: torch.Tensor) -> torch.Tensor:
    """Full ordered basis [.., d, d] from accumulated second moments."""
    _, vecs = torch.linalg.eigh(second_moment.double())
    return vecs.flip(-1).float().contiguous()


def oblique_basis(
    second_moment: torch.Tensor, metric: torch.Tensor, eps: float = 1e-2
) -> tuple[torch.Tensor, torch.Tensor]:
    """The nested projection of vectors x (second moment S [.., d, d]) that is best in the metric M
    [.., d, d]: x_hat = A[:, :r] B[:, :r]^T x minimises E[(x - x_hat)^T M (x - x_hat)] for every r at
    once, with A = M^(-1/2) U, B = M^(1/2) U and U the eigenvectors of M^(1/2) S M^(1/2), largest first.
    Keys with M the queries' second moment: the logit error over those queries (query-whitened);
    values with W_o^T W_o: the error after o_proj. Eigenvalues of M are floored at `eps` times their
    mean, so a metric of lower rank still has an inverse root. Returns (synthesis A, analysis B)
    [.., d, d] float32, A B^T = I: the store would keep B^T x and attention turn the query by A."""
    vals, vecs = torch.linalg.eigh(metric.double())
    vals = vals.clamp_min(eps * vals.mean(-1, keepdim=True).clamp_min(1e-30))
    root = (vecs * vals.sqrt()[..., None, :]) @ vecs.transpose(-1, -2)
    inv_root = (vecs * vals.rsqrt()[..., None, :]) @ vecs.transpose(-1, -2)
    u = second_moment_basis(root @ second_moment.double() @ root).double()
    return (inv_root @ u).float().contiguous(), (root @ u).float().contiguous()


def save_calibrated(
    path: str | Path, key_bases: list[torch.Tensor], value_bases: list[torch.Tensor], layers: list[int] | None = None
) -> None:
    """Write per-layer bases ([H, d, d] each) to a safetensors file, for the model layers `layers`
    (default 0, 1, ...: every layer is compressed)."""
    from safetensors.torch import save_file

    layers = list(range(len(key_bases))) if layers is None else list(layers)
    tensors = {}
    for layer, kb, vb in zip(layers, key_bases, value_bases, strict=True):
        tensors[f"layer.{layer}.key"] = kb.float().contiguous()
        tensors[f"layer.{layer}.value"] = vb.float().contiguous()
    meta = {"format": "mdkv-calibrated-basis", "layers": str(len(layers)), "layer_ids": ",".join(map(str, layers))}
    save_file(tensors, str(path), metadata=meta)


def load_calibrated(path: str | Path) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """Read a file written by `save_calibrated`: {layer: (key_basis [H, d, d], value_basis [H, d, d])}."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"calibrated basis file {path} does not exist; create it with mdkv_compile.hf."
                                "calibrate.calibrate(model, tokenizer, texts, path)")
    out: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        if meta.get("format") != "mdkv-calibrated-basis":
            raise ValueError(f"{path} is not an mdkv calibrated-basis file (metadata {meta})")
        # files without "layer_ids" hold layers 0 .. layers - 1
        ids = meta.get("layer_ids")
        for layer in map(int, ids.split(",")) if ids else range(int(meta["layers"])):
            out[layer] = (f.get_tensor(f"layer.{layer}.key"), f.get_tensor(f"layer.{layer}.value"))
    return out
