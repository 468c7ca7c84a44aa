"""`mdkv diagnose`: where reduced tiers lose, per layer and KV head (issue 13, "Diagnostics").

Each sample is a `kl` task instance: `length` tokens of the essays and the `cont` tokens after
them. One forward with the full cache captures every compressed layer's post-RoPE queries, keys
and values over context + continuation. The continuation's queries are held out (no basis and no
allocation is built from them) and judge what a store of the context would serve them:

* **bases**, per basis kind and dim of the default tiers (`cfg.resolve_tiers(d)`): the logit
  error `scale * q . (k - k_hat)` of each context key kept at r key dims, RMS over the
  continuation's queries of its KV head's group, then summarised over the tokens a tier may hold
  (not the window, which is kept whole): the median, the mean weighted by the attention the
  continuation pays each token, the share under `LOGIT_TOLERANCE`, and ("tier") the weighted mean
  over the tokens mixeddimkv actually stores at r key dims; r = d too (whole keys in the basis, as a
  (d, d/2) tier would keep them: a check that the basis is complete). The relative value error |v - v_hat| / |v|,
  plain and through o_proj, with the same summaries.
* **allocations**: the tokens `mixeddimkv` stores at each tier at `budget` (its own policy, run on
  the captured context as the cache runs it) and `snapkv`'s choice at the same budget: the
  predicted loss (the policy's per-token losses, `policies.mixeddim.option_losses`, summed over
  the chosen options) against the measured error |o - o_hat| / |o| of the attention output on the
  continuation's queries (exact attention over context + continuation against attention over the
  packed store + continuation), and how many prompt entries each tier holds.
* **the loss model's check** (`loss_model_check`): whether the predicted gain of mixeddimkv over
  snapkv tracks the measured one per head, with the loss table's importance as the policy has it
  (window queries, max-pooled) and swapped for the unpooled window's and for the continuation's
  own attention (`importance_variants`); and what mixeddimkv's reduced tokens cost as a share of
  evicting them, predicted against measured, for keys and values together and apart
  (`reduction_check`: dense attention over reconstructed vectors, `reconstructed_error`).

Basis kinds: "prompt-pca" (PCA of the context's own keys / values), "calibrated-pca" (the calibrated
file's bases, `calibrated_basis_file` or `--calibrated-basis`) and "query-whitened" (keys: the
oblique projection `core.bases.oblique_basis` under the second moment of the calibration text's
queries of the KV head's group; values: the same under o_proj's metric; both from a forward over the
held-out calibration text, `assets.calibration_text`). Outputs: diagnose.json (everything, per
sample, layer and head), diagnose.md (the tables), diagnose_<model>.png (docs/evaluation.md,
"Diagnostics").
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mdkv_compile import assets
from mdkv_compile.cache import MixedDimCache, MixedDimLayer, model_dims, tier_label
from mdkv_compile.config import MixedDimKVConfig
from mdkv_compile.core.attention import attend_packed, causal_mask, dense_attention
from mdkv_compile.core.bases import load_calibrated, oblique_basis, prompt_bases, second_moment_basis
from mdkv_compile.core.scoring import softcap_logits
from mdkv_compile.eval import tasks as T
from mdkv_compile.hf.calibrate import (
    CHUNK_TOKENS,
    calibrated_basis_file,
    calibration_chunks,
    calibration_moments,
    run_uncompressed,
)
from mdkv_compile.policies import select
from mdkv_compile.policies.base import LayerContext, Selection, pack_selection
from mdkv_compile.policies.mixeddim import option_losses
from mdkv_compile.usage import (
    as_usage_error,
    check,
    command,
    device,
    existing_file,
    fraction,
    non_negative_int,
    output_folder,
    positive_int,
)
from mdkv_compile.usage import csv as csv_list

KINDS = ("prompt-pca", "calibrated-pca", "query-whitened")
METHODS = ("mixeddimkv", "snapkv")
# Floor of the metric's eigenvalues in the oblique bases, relative to their mean: the queries'
# second moment is close to rank-deficient in a few heads, and its inverse root must stay finite.
WHITEN_EPS = 1e-2
# A logit error under this moves a token's attention weight by under e^0.5 ~ 1.65x.
LOGIT_TOLERANCE = 0.5
CALIBRATION_CHUNKS = 2  # pieces of CHUNK_TOKENS of the calibration text for the query statistics
_TINY = 1e-12


@dataclass
class Sample:
    seed: int
    context: list[int]
    continuation: list[int]


@dataclass
class Captured:
    """One compressed layer's post-RoPE tensors over context + continuation (batch row 0, float32)."""

    query: torch.Tensor  # [Hq, N + T, d]
    key: torch.Tensor  # [H, N + T, d]
    value: torch.Tensor  # [H, N + T, d]
    scale: float
    softcap: float | None

    @property
    def group(self) -> int:
        return self.query.shape[0] // self.key.shape[0]


Basis = tuple[torch.Tensor, torch.Tensor]  # (synthesis A, analysis B) [H, d, d]: x_hat = A[:, :r] B[:, :r]^T x


def capture_layers(model: torch.nn.Module, ids: Sequence[int]) -> dict[int, Captured]:
    """Every compressed layer's post-RoPE queries, keys and values over `ids`, from one forward."""
    got: dict[int, Captured] = {}

    def keep(ctx: LayerContext) -> None:
        scale = ctx.scale if ctx.scale is not None else ctx.head_dim**-0.5
        got[ctx.layer_idx] = Captured(ctx.query[0].float(), ctx.key[0].float(), ctx.value[0].float(), scale,
                                      ctx.softcap)

    run_uncompressed(model, [torch.tensor([list(ids)])], keep)
    return got


def o_proj_metric(model: torch.nn.Module, layer_idx: int, n_kv: int, head_dim: int) -> torch.Tensor | None:
    """[H, d, d]: sum over the query heads g of KV head h's group of W_g^T W_g, W_g the head's
    slice [hidden, d] of o_proj's weight, so that e^T M e = sum_g |W_g e|^2 is a value error after
    o_proj. None when the layer's attention module has no `o_proj` Linear."""
    for module in model.modules():
        o_proj = getattr(module, "o_proj", None)
        if getattr(module, "layer_idx", None) == layer_idx and isinstance(o_proj, torch.nn.Linear):
            w = o_proj.weight.detach().double()
            heads = w.view(w.shape[0], -1, head_dim)  # [hidden, Hq, d]
            per_head = torch.einsum("ojd,oje->jde", heads, heads)
            return per_head.view(n_kv, -1, head_dim, head_dim).sum(1).float()
    return None


def basis_kinds(
    cap: Captured, n: int, calibrated: tuple[torch.Tensor, torch.Tensor], moments: dict[str, torch.Tensor],
    metric: torch.Tensor | None,
) -> dict[str, tuple[Basis, Basis]]:
    """(key basis, value basis) of every kind in KINDS for one layer; `n` context tokens."""
    d = cap.key.shape[-1]
    pk, pv = (b[0] for b in prompt_bases(cap.key[None, :, :n], cap.value[None, :, :n], None, d, "eigh"))
    ck, cv = (b.to(cap.key.device).float() for b in calibrated)
    wk = oblique_basis(moments["key"], moments["query"], WHITEN_EPS)
    if metric is None:
        v_pca = second_moment_basis(moments["value"])
        wv = (v_pca, v_pca)
    else:
        wv = oblique_basis(moments["value"], metric.double(), WHITEN_EPS)
    on = [tuple(t.to(cap.key.device) for t in b) for b in (wk, wv)]
    return {"prompt-pca": ((pk, pk), (pv, pv)), "calibrated-pca": ((ck, ck), (cv, cv)),
            "query-whitened": (on[0], on[1])}


def continuation_attention(cap: Captured, n: int) -> torch.Tensor:
    """[H, n]: the attention the continuation's queries pay each context token (exact attention
    over context + continuation), averaged over the queries and the KV head's group."""
    n_kv, total = cap.key.shape[0], cap.key.shape[1]
    q = cap.query[:, n:]
    logits = softcap_logits(q @ cap.key.repeat_interleave(cap.group, 0).transpose(-1, -2) * cap.scale, cap.softcap)
    logits = logits.masked_fill(~causal_mask(total - n, total, q.device), float("-inf"))
    probs = torch.softmax(logits, dim=-1)[..., :n]
    return probs.reshape(n_kv, -1, n).mean(1)


def _weighted(x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Mean of x [H, n] over the tokens, weighted by weights [H, n]: [H]."""
    return (x * weights).sum(-1) / weights.sum(-1).clamp_min(_TINY)


def key_errors(
    cap: Captured, n: int, basis: Basis, dims: Sequence[int], weights: torch.Tensor, reducible: torch.Tensor,
    chosen: torch.Tensor,
) -> dict[str, dict[str, list[float | None]]]:
    """{r: {"median", "weighted", "below", "tier": [H]}}: the RMS over the continuation's queries of
    the logit error scale * q . (k - k_hat) (pre-softcap) of each context key kept at r dims in
    `basis`, k_hat = A_r B_r^T k reconstructed as attention would see it (so r = d checks that the
    basis is complete, A B^T = I), summarised over the tokens a tier may hold (`reducible` [n]
    bool: not the window or the sinks, which the policies keep whole); "tier": the attention-weighted
    mean over the tokens mixeddimkv keeps at r key dims (`chosen` [H, n]; None for a head with none)."""
    synthesis, analysis = basis
    n_kv, d = cap.key.shape[0], cap.key.shape[-1]
    queries = cap.query[:, n:].reshape(n_kv, -1, d)  # the group's continuation queries per KV head
    keys = cap.key[:, :n]
    out = {}
    for r in dims:
        residual = keys - (keys @ analysis[..., :r]) @ synthesis[..., :r].transpose(-1, -2)
        err = cap.scale * (queries @ residual.transpose(-1, -2)).square().mean(-2).sqrt()  # [H, n]
        at = (chosen == r).float()
        tier = _weighted(err, weights * at)
        out[str(r)] = {
            "median": err[:, reducible].median(-1).values.tolist(),
            "weighted": _weighted(err, weights * reducible).tolist(),
            "below": (err[:, reducible] < LOGIT_TOLERANCE).float().mean(-1).tolist(),
            "tier": [t if any_ else None for t, any_ in zip(tier.tolist(), (at.sum(-1) > 0).tolist(), strict=True)],
        }
    return out


def value_errors(
    value: torch.Tensor, basis: Basis, dims: Sequence[int], metric: torch.Tensor | None, weights: torch.Tensor,
    reducible: torch.Tensor, chosen: torch.Tensor,
) -> dict[str, dict[str, list[float | None] | None]]:
    """{r: {"mean", "weighted", "o_proj_mean", "o_proj_weighted", "tier": [H]}}: |v - v_hat| / |v| of
    each context value [H, n, d] kept at r dims in `basis`, and the same measured after o_proj
    (sqrt(e^T M e / v^T M v), `o_proj_metric`; None without one), averaged over the tokens a tier may
    hold (`reducible`) plainly and weighted by the continuation's attention; "tier": the weighted
    mean over the tokens mixeddimkv keeps at r value dims (`chosen` [H, n]; None for a head with none)."""
    synthesis, analysis = basis
    coef = value @ analysis
    norm = value.norm(dim=-1).clamp_min(_TINY)
    o_norm = None if metric is None else ((value @ metric) * value).sum(-1).clamp_min(_TINY).sqrt()
    w = weights * reducible
    out: dict[str, dict[str, list[float | None] | None]] = {}
    for r in dims:
        err = value - coef[..., :r] @ synthesis[..., :r].transpose(-1, -2)
        rel = err.norm(dim=-1) / norm
        at = (chosen == r).float()
        tier = _weighted(rel, weights * at)
        row: dict[str, list[float | None] | None] = {
            "mean": rel[:, reducible].mean(-1).tolist(), "weighted": _weighted(rel, w).tolist(),
            "o_proj_mean": None, "o_proj_weighted": None,
            "tier": [t if any_ else None for t, any_ in zip(tier.tolist(), (at.sum(-1) > 0).tolist(), strict=True)],
        }
        if metric is not None:
            rel_o = ((err @ metric) * err).sum(-1).clamp_min(0).sqrt() / o_norm
            row.update(o_proj_mean=rel_o[:, reducible].mean(-1).tolist(), o_proj_weighted=_weighted(rel_o, w).tolist())
        out[str(r)] = row
    return out


def measured_error(cap: Captured, n: int, sel: Selection, reference: torch.Tensor) -> torch.Tensor:
    """[H]: |o - o_hat| / |o| of the continuation's attention outputs when the context is stored as
    `sel` chose (the packed store; the continuation itself whole), averaged over the KV head's
    query heads and the continuation's tokens. `reference`: exact attention [Hq, T, d]."""
    store = pack_selection(cap.key[None, :, :n], cap.value[None, :, :n], sel)
    out = attend_packed(cap.query[None, :, n:], store, cap.key[None, :, n:], cap.value[None, :, n:], None,
                        cap.scale, cap.softcap)[0]
    return _output_error(out, reference, cap.key.shape[0])


def _output_error(out: torch.Tensor, reference: torch.Tensor, n_kv: int) -> torch.Tensor:
    """[H]: |o - o_hat| / |o| over [Hq, T, d] outputs, averaged over each KV head's query heads and the tokens."""
    rel = (out - reference).norm(dim=-1) / reference.norm(dim=-1).clamp_min(_TINY)  # [Hq, T]
    return rel.reshape(n_kv, -1).mean(-1)


def truncated(x: torch.Tensor, dims: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """x [H, n, d] with each token kept at `dims` [H, n] coordinates of `basis` [H, d, c] (orthonormal
    columns, c >= every reduced dim): its projection on the first r columns where 0 < r < d, itself
    elsewhere (whole, or evicted: the caller masks those)."""
    d = x.shape[-1]
    out = x
    for r in dims.unique().tolist():
        if 0 < r < d:
            b = basis[..., :r].float()
            out = torch.where((dims == r)[..., None], (x @ b) @ b.transpose(-1, -2), out)
    return out


def reconstructed_error(
    cap: Captured, n: int, key_dim: torch.Tensor, value_dim: torch.Tensor, basis_k: torch.Tensor,
    basis_v: torch.Tensor, reference: torch.Tensor,
) -> torch.Tensor:
    """[H]: as `measured_error`, for a store that keeps each context token's key at key_dim [H, n]
    dims of basis_k (0: evicted, d: whole) and its value at value_dim dims of basis_v, by exact
    attention over the reconstructed vectors (no packing: keys and values may be reduced apart)."""
    n_kv, total, _ = cap.key.shape
    keys = torch.cat([truncated(cap.key[:, :n], key_dim, basis_k), cap.key[:, n:]], 1)
    values = torch.cat([truncated(cap.value[:, :n], value_dim, basis_v), cap.value[:, n:]], 1)
    visible = causal_mask(total - n, total, cap.key.device)[None].repeat(cap.query.shape[0], 1, 1)
    visible[..., :n] &= (key_dim > 0).repeat_interleave(cap.group, 0)[:, None, :]
    out = dense_attention(cap.query[None, :, n:], keys[None], values[None], visible[None], cap.scale, cap.softcap)[0]
    return _output_error(out, reference, n_kv)


def chosen_options(
    opts: Sequence[tuple[int, int]], losses: torch.Tensor, sel: Selection
) -> tuple[dict[str, list[float]], dict[str, list[int]]]:
    """Per tier (`tier_label`): the policy's losses [B=1, H, N, len(opts)] summed over the tokens
    `sel` stores at that option, and how many it stores there, per KV head."""
    key_dim = sel.chosen_dim[0]
    value_dim = key_dim if sel.chosen_value_dim is None else sel.chosen_value_dim[0]
    loss_by_tier, count_by_tier = {}, {}
    matched = torch.zeros_like(key_dim, dtype=torch.bool)
    for j, (rk, rv) in enumerate(opts):
        at = (key_dim == rk) & (value_dim == rv)
        matched |= at
        label = str(tier_label(rk, rv))
        loss_by_tier[label] = (losses[0, ..., j] * at).sum(-1).tolist()
        count_by_tier[label] = at.sum(-1).tolist()
    if not bool(matched.all()):
        raise ValueError("the selection stores tokens at a tier that is not one of mixeddimkv's options")
    return loss_by_tier, count_by_tier


def _chosen_loss(opts: Sequence[tuple[int, int]], losses: torch.Tensor, key_dim: torch.Tensor,
                 value_dim: torch.Tensor) -> torch.Tensor:
    """[H, n]: each token's loss [H, n, len(opts)] at the option (key_dim, value_dim) [H, n] it got."""
    out = torch.zeros_like(losses[..., 0])
    for j, (rk, rv) in enumerate(opts):
        out = torch.where((key_dim == rk) & (value_dim == rv), losses[..., j], out)
    return out


@dataclass
class MixedChoice:
    """What mixeddimkv chose for one layer's context: key and value dims [H, n] and its bases
    ([H, d, c]; None when it stored no reduced tier)."""

    key_dim: torch.Tensor
    value_dim: torch.Tensor
    basis_k: torch.Tensor | None
    basis_v: torch.Tensor | None


def reduction_check(
    cap: Captured, n: int, ctx: LayerContext, opts: Sequence[tuple[int, int]], losses: torch.Tensor,
    choice: MixedChoice, reference: torch.Tensor,
) -> dict[str, list[float]]:
    """The loss model's claim about mixeddimkv's reduced tokens against the measurement, per KV head.
    Predicted: their losses at the chosen options ("predicted_reduced"), the same with the key term
    only (value_weight 0) and the value term only (importance * min(1, value_weight * rel)), and
    what evicting them would cost (their importance, "reduced_importance"). Measured: the output
    error with them kept whole ("measured_reduced_whole", over budget: the floor), with only their
    keys or only their values reduced, beside "measured" and "measured_reduced_evicted"."""
    d = cap.key.shape[-1]
    kd, vd = choice.key_dim, choice.value_dim
    kept = kd > 0
    reduced = kept & ((kd < d) | (vd < d))
    whole = torch.where(kept, d, 0)
    importance = losses[0, ..., 0]
    key_only = option_losses(dataclasses.replace(ctx, cfg=ctx.cfg.replace(value_weight=0.0)))[1][0]
    out = {
        "reduced_importance": (importance * reduced).sum(-1).tolist(),
        "predicted_reduced": (_chosen_loss(opts, losses[0], kd, vd) * reduced).sum(-1).tolist(),
        "predicted_keys_only": (_chosen_loss(opts, key_only, kd, vd) * reduced).sum(-1).tolist(),
    }
    # Without a reduced tier (the policy fell back to eviction) no dim is below d: no basis is read.
    none = cap.key.new_zeros(0)
    basis_k = none if choice.basis_k is None else choice.basis_k
    basis_v = none if choice.basis_v is None else choice.basis_v
    value = cap.value[:, :n]
    rel = (value - truncated(value, vd, basis_v)).norm(dim=-1) / value.norm(dim=-1).clamp_min(_TINY)
    value_term = importance * (ctx.cfg.value_weight * rel).clamp(max=1.0)
    out["predicted_values_only"] = (value_term * reduced).sum(-1).tolist()

    def err(key_dim: torch.Tensor, value_dim: torch.Tensor) -> list[float]:
        return reconstructed_error(cap, n, key_dim, value_dim, basis_k, basis_v, reference).tolist()

    out.update(
        measured_reduced_whole=err(whole, whole),
        measured_keys_only=err(kd, whole),
        measured_values_only=err(whole, vd),
    )
    return out


IMPORTANCES = ("window", "window_unpooled", "continuation")


def importance_variants(ctx: LayerContext, weights: torch.Tensor) -> dict[str, torch.Tensor]:
    """[H, n] token importances the loss table can be scaled to (`IMPORTANCES`): the policy's own
    (the window queries' attention, max-pooled over `pool_kernel` tokens), the same unpooled, and
    the attention the held-out continuation pays (`weights`: what the measurement sees; an oracle)."""
    unpooled = dataclasses.replace(ctx, cfg=ctx.cfg.replace(pool_kernel=1))
    return {"window": ctx.importance()[0], "window_unpooled": unpooled.importance()[0], "continuation": weights}


def allocation(
    cap: Captured, n: int, layers: dict[str, MixedDimLayer], reference: torch.Tensor, weights: torch.Tensor
) -> tuple[dict[str, dict[str, Any]], LayerContext, MixedChoice]:
    """mixeddimkv's and snapkv's allocation of one layer's context: predicted loss (mixeddimkv's
    loss table summed over each one's choice) per head and per tier, and with the table's
    importance replaced by each of `importance_variants` ("predicted_by_importance": each option's
    loss is importance x a factor of the option, so the factors are kept and the importance
    swapped); entries per tier, measured output error, and for mixeddimkv the error with its reduced
    tokens evicted instead and `reduction_check`. Also mixeddimkv's LayerContext and choice."""
    d = cap.key.shape[-1]
    args = (cap.query[None, :, :n], cap.key[None, :, :n], cap.value[None, :, :n], None, cap.scale, cap.softcap)
    mixed_ctx = layers["mixeddimkv"].context(*args)
    opts, losses = option_losses(mixed_ctx)
    factors = losses[0] / losses[0, ..., :1].clamp_min(_TINY)  # column 0, eviction, is the importance
    variants = {name: factors * imp[..., None] for name, imp in importance_variants(mixed_ctx, weights).items()}
    out: dict[str, dict[str, Any]] = {}
    choice = None
    for method, layer in layers.items():
        sel = select(mixed_ctx if method == "mixeddimkv" else layer.context(*args))
        loss_by_tier, count_by_tier = chosen_options(opts, losses, sel)
        kd = sel.chosen_dim[0]
        vd = kd if sel.chosen_value_dim is None else sel.chosen_value_dim[0]
        out[method] = {
            "predicted": [sum(col) for col in zip(*loss_by_tier.values(), strict=True)],
            "predicted_per_tier": loss_by_tier,
            "predicted_by_importance": {
                name: _chosen_loss(opts, table, kd, vd).sum(-1).tolist() for name, table in variants.items()
            },
            "entries": count_by_tier,
            "measured": measured_error(cap, n, sel, reference).tolist(),
        }
        if method == "mixeddimkv":
            value_dim = sel.chosen_dim if sel.chosen_value_dim is None else sel.chosen_value_dim
            whole = (sel.chosen_dim == d) & (value_dim == d)
            evicted = Selection(chosen_dim=torch.where(whole, d, 0), tier_dims=(d,))
            out[method]["measured_reduced_evicted"] = measured_error(cap, n, evicted, reference).tolist()
            choice = MixedChoice(sel.chosen_dim[0], value_dim[0], None if sel.basis_k is None else sel.basis_k.float(),
                                 None if sel.basis_v is None else sel.basis_v.float())
            out[method].update(reduction_check(cap, n, mixed_ctx, opts, losses, choice, reference))
    assert choice is not None
    return out, mixed_ctx, choice


def _per_head(tree: Any, head: int) -> Any:
    """The `head`-th entry of every per-head list in a nested dict."""
    if isinstance(tree, dict):
        return {k: _per_head(v, head) for k, v in tree.items()}
    return None if tree is None else tree[head]


@torch.no_grad()
def diagnose_layer(
    cap: Captured, n: int, calibrated: tuple[torch.Tensor, torch.Tensor], moments: dict[str, torch.Tensor],
    metric: torch.Tensor | None, layers: dict[str, MixedDimLayer], key_dims: Sequence[int],
    value_dims: Sequence[int],
) -> list[dict[str, Any]]:
    """Every diagnostic of one layer of one sample: a record per KV head."""
    weights = continuation_attention(cap, n)
    total = cap.key.shape[1]
    reference = dense_attention(cap.query[None, :, n:], cap.key[None], cap.value[None],
                                causal_mask(total - n, total, cap.key.device)[None, None], cap.scale, cap.softcap)[0]
    allocs, ctx, choice = allocation(cap, n, layers, reference, weights)
    reducible = ~ctx.forced()[0]
    keys, values = {}, {}
    for kind, (kb, vb) in basis_kinds(cap, n, calibrated, moments, metric).items():
        keys[kind] = key_errors(cap, n, kb, key_dims, weights, reducible, choice.key_dim)
        values[kind] = value_errors(cap.value[:, :n], vb, value_dims, metric, weights, reducible, choice.value_dim)
    return [
        {"head": h, "key_logit_error": _per_head(keys, h), "value_error": _per_head(values, h),
         "allocations": _per_head(allocs, h)}
        for h in range(cap.key.shape[0])
    ]


def compressed_layers(model: torch.nn.Module) -> list[int]:
    """The layers a MixedDimCache compresses (Gemma 3: the global ones)."""
    cache = MixedDimCache(model.config, MixedDimKVConfig(method="snapkv"))
    return [i for i, layer in enumerate(cache.layers) if isinstance(layer, MixedDimLayer)]


def read_calibrated(path: str | Path, layers: Sequence[int], n_kv: int, head_dim: int) -> dict[int, Basis]:
    """`load_calibrated(path)`, or ValueError (naming the file) when it is not a calibrated-basis
    file or does not hold [n_kv, head_dim, head_dim] bases for every one of `layers`."""
    try:
        bases = load_calibrated(path)
    except (OSError, ValueError) as e:
        raise ValueError(f"calibrated basis {path}: {e}") from None
    except Exception as e:  # safetensors' own error type for a file that is not safetensors
        raise ValueError(f"calibrated basis {path} is not a safetensors file ({e})") from None
    want = (n_kv, head_dim, head_dim)
    for i in layers:
        if i not in bases:
            raise ValueError(f"calibrated basis {path} has no layer {i}; it was made for another model")
        if any(tuple(b.shape) != want for b in bases[i]):
            raise ValueError(f"calibrated basis {path}: layer {i}'s bases are {tuple(bases[i][0].shape)}, this "
                             f"model needs {want}; it was made for another model")
    return bases


def policy_configs(budget: float, basis: str, calibrated_path: str | None) -> dict[str, MixedDimKVConfig]:
    """The two allocations compared: mixeddimkv with its bases as `mdkv eval` would run it, and
    snapkv at the same budget (its window and scores are mixeddimkv's)."""
    mixed = MixedDimKVConfig(method="mixeddimkv", budget=budget, basis=basis,
                             basis_path=calibrated_path if basis == "calibrated" else None)
    return {"mixeddimkv": mixed, "snapkv": MixedDimKVConfig(method="snapkv", budget=budget)}


def diagnose(
    model: torch.nn.Module,
    samples: Sequence[Sample],
    calibration: Iterable[torch.Tensor],
    calibrated_path: str | Path,
    budget: float,
    basis: str = "calibrated",
    model_name: str = "model",
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Diagnostics of every sample (`calibration`: token-id batches [1, N] of text held out of the
    samples, for the query-whitened bases). Returns the JSON record (`write_outputs` adds its
    "summary")."""
    log = log or (lambda msg: None)
    _, _, n_kv, d = model_dims(model.config)
    cfg = MixedDimKVConfig()
    tiers = cfg.resolve_tiers(d)
    # d too: whole keys in the basis, a check that it is complete
    key_dims = sorted({rk for rk, _ in tiers} | {d})
    value_dims = sorted({rv for _, rv in tiers if rv < d})
    start = time.perf_counter()
    moments = calibration_moments(model, calibration)
    calibrated = read_calibrated(calibrated_path, sorted(moments), n_kv, d)
    metrics = {i: o_proj_metric(model, i, n_kv, d) for i in moments}
    log(f"calibration statistics of {len(moments)} compressed layers in {time.perf_counter() - start:.1f} s")
    configs = policy_configs(budget, basis, str(calibrated_path))
    caches = {m: MixedDimCache(model.config, c) for m, c in configs.items()}
    records = []
    for sample in samples:
        t0 = time.perf_counter()
        n = len(sample.context)
        captured = capture_layers(model, sample.context + sample.continuation)
        layers = []
        for i, cap in sorted(captured.items()):
            policy_layers = {m: c.layers[i] for m, c in caches.items()}
            heads = diagnose_layer(cap, n, calibrated[i], {k: v.to(cap.key.device) for k, v in moments[i].items()},
                                   metrics[i], policy_layers, key_dims, value_dims)
            layers.append({"layer": i, "heads": heads})
        seconds = time.perf_counter() - t0
        log(f"sample seed {sample.seed}: {n} + {len(sample.continuation)} tokens, {len(layers)} layers in "
            f"{seconds:.1f} s")
        records.append({"seed": sample.seed, "context_tokens": n, "continuation_tokens": len(sample.continuation),
                        "seconds": seconds, "layers": layers})
    return {
        "model": model_name, "budget": budget, "basis": basis, "calibrated_basis": str(calibrated_path),
        "head_dim": d, "kv_heads": n_kv, "tiers": [list(t) for t in tiers], "key_dims": key_dims,
        "value_dims": value_dims, "kinds": list(KINDS), "methods": list(METHODS), "whiten_eps": WHITEN_EPS,
        "logit_tolerance": LOGIT_TOLERANCE, "o_proj": all(m is not None for m in metrics.values()),
        "samples": records,
    }


# --- summary -------------------------------------------------------------------------------------


def _mean_tree(trees: Sequence[Any]) -> Any:
    """Leafwise mean of nested dicts of the same shape (None leaves left out; all None gives None)."""
    first = trees[0]
    if isinstance(first, dict):
        return {k: _mean_tree([t[k] for t in trees]) for k in first}
    vals = [float(t) for t in trees if t is not None]
    return sum(vals) / len(vals) if vals else None


def _heads(result: dict[str, Any]) -> list[tuple[int, dict[str, Any]]]:
    """(layer, head record) of every sample, layer and head."""
    return [(layer["layer"], h) for s in result["samples"] for layer in s["layers"] for h in layer["heads"]]


def _correlation(x: Sequence[float], y: Sequence[float], rank: bool = False) -> float | None:
    """Pearson's r of x and y (of their ranks with `rank`: Spearman's); None below 3 points or
    without spread."""
    if len(x) < 3:
        return None
    a, b = torch.tensor(x, dtype=torch.float64), torch.tensor(y, dtype=torch.float64)
    if rank:
        a, b = a.argsort().argsort().double(), b.argsort().argsort().double()
    a, b = a - a.mean(), b - b.mean()
    denom = float(a.norm() * b.norm())
    return float((a * b).sum()) / denom if denom > 0 else None


def _points(allocations: Sequence[dict[str, Any]]) -> tuple[list[float], list[float]]:
    """(predicted, measured) of each allocation record."""
    return [a["predicted"] for a in allocations], [a["measured"] for a in allocations]


def _ratio(num: float, den: float) -> float | None:
    return num / den if abs(den) > _TINY else None


def reduction_shares(records: Sequence[dict[str, Any]]) -> dict[str, float | None]:
    """What reducing mixeddimkv's reduced tokens costs as a share of what evicting them would cost,
    predicted (their losses over their importance) and measured ((measured - kept whole) over
    (evicted instead - kept whole)), whole and with only the keys or only the values reduced;
    ratios of sums over `records` (mixeddimkv's allocation records: one per sample, layer and head)."""

    def total(key: str) -> float:
        return sum(r[key] for r in records)

    whole = total("measured_reduced_whole")
    evict = total("measured_reduced_evicted") - whole
    importance = total("reduced_importance")
    return {
        "predicted": _ratio(total("predicted_reduced"), importance),
        "measured": _ratio(total("measured") - whole, evict),
        "predicted_keys_only": _ratio(total("predicted_keys_only"), importance),
        "measured_keys_only": _ratio(total("measured_keys_only") - whole, evict),
        "predicted_values_only": _ratio(total("predicted_values_only"), importance),
        "measured_values_only": _ratio(total("measured_values_only") - whole, evict),
    }


def loss_model_check(heads: Sequence[tuple[int, dict[str, Any]]]) -> dict[str, Any]:
    """Does the loss model rank what it trades correctly? "gain": per (sample, layer, head), snapkv's
    predicted loss minus mixeddimkv's against the same difference of the measured output errors
    (their Pearson and Spearman r, the share of heads where mixeddimkv is better by each, and the
    share where the signs agree, over heads whose allocations differ), and the correlation of
    predicted loss and measured error over both methods' allocations ("pearson_loss"); the same with
    each of `IMPORTANCES` ("by_importance"; "gain" is the policy's own, "window");
    "reduction_cost": `reduction_shares` over every head and per layer."""
    mixed = [h["allocations"]["mixeddimkv"] for _, h in heads]
    snap = [h["allocations"]["snapkv"] for _, h in heads]
    meas = [s["measured"] - m["measured"] for m, s in zip(mixed, snap, strict=True)]

    def gain(key: str) -> dict[str, Any]:
        pred = [s["predicted_by_importance"][key] - m["predicted_by_importance"][key]
                for m, s in zip(mixed, snap, strict=True)]
        differ = [i for i in range(len(pred)) if abs(pred[i]) > 1e-9 or abs(meas[i]) > 1e-9]
        both = [a["predicted_by_importance"][key] for a in mixed + snap], [a["measured"] for a in mixed + snap]
        return {
            "heads": len(differ),
            "pearson": _correlation([pred[i] for i in differ], [meas[i] for i in differ]),
            "spearman": _correlation([pred[i] for i in differ], [meas[i] for i in differ], rank=True),
            "mean_predicted": sum(pred) / max(len(pred), 1),
            "mean_measured": sum(meas) / max(len(meas), 1),
            "better_predicted": _ratio(sum(pred[i] > 0 for i in differ), len(differ)),
            "better_measured": _ratio(sum(meas[i] > 0 for i in differ), len(differ)),
            "sign_agreement": _ratio(sum((pred[i] > 0) == (meas[i] > 0) for i in differ), len(differ)),
            "pearson_loss": _correlation(*both),
            "spearman_loss": _correlation(*both, rank=True),
        }

    by_layer: dict[int, list[dict[str, Any]]] = {}
    for (layer, _), m in zip(heads, mixed, strict=True):
        by_layer.setdefault(layer, []).append(m)
    return {
        "gain": gain("window"),
        "by_importance": {key: gain(key) for key in IMPORTANCES},
        "reduction_cost": reduction_shares(mixed),
        "reduction_cost_per_layer": [
            {"layer": layer, **reduction_shares(records)} for layer, records in sorted(by_layer.items())
        ],
    }


def _tier_elements(label: str) -> int:
    """Key + value dims of a tier label ("16/8", or "8" for 8/8)."""
    dims = [int(x) for x in label.split("/")]
    return dims[0] + dims[-1]


def _tier_name(label: str, head_dim: int) -> str:
    return f"{label} (whole)" if label == str(head_dim) else label


def summarize(result: dict[str, Any]) -> dict[str, Any]:
    """Means over samples, layers and heads of the basis errors; per layer, the predicted and
    measured errors of each allocation (mean over samples and heads) and their correlations; the
    loss model's check (`loss_model_check`); the share of stored prompt entries (and of their
    elements) per tier."""
    heads = _heads(result)
    by_layer: dict[int, list[dict[str, Any]]] = {}
    for layer, h in heads:
        by_layer.setdefault(layer, []).append(h)
    per_layer = [
        {"layer": layer, "allocations": _mean_tree([h["allocations"] for h in hs]),
         "key_logit_error": _mean_tree([h["key_logit_error"] for h in hs])}
        for layer, hs in sorted(by_layer.items())
    ]
    correlation, tiers = {}, {}
    for method in result["methods"]:
        by_layers = _points([r["allocations"][method] for r in per_layer])
        by_heads = _points([h["allocations"][method] for _, h in heads])
        correlation[method] = {
            "pearson_layers": _correlation(*by_layers),
            "pearson_heads": _correlation(*by_heads),
            "spearman_heads": _correlation(*by_heads, rank=True),
        }
        counts: dict[str, int] = {}
        for _, h in heads:
            for label, c in h["allocations"][method]["entries"].items():
                counts[label] = counts.get(label, 0) + c
        all_entries = sum(counts.values())
        stored = all_entries - counts.get("0", 0)
        elements = sum(_tier_elements(k) * c for k, c in counts.items() if k != "0")
        tiers[method] = {
            "stored_shares": {k: c / max(stored, 1) for k, c in counts.items() if k != "0"},
            "element_shares": {k: _tier_elements(k) * c / max(elements, 1) for k, c in counts.items() if k != "0"},
            "evicted_share": counts.get("0", 0) / max(all_entries, 1),
            "predicted_per_tier": _mean_tree([h["allocations"][method]["predicted_per_tier"] for _, h in heads]),
        }
    d = str(result["head_dim"])
    full = {kind: max(h["key_logit_error"][kind][d]["median"] for _, h in heads)
            for kind in result["kinds"]} if int(d) in result["key_dims"] else {}
    return {
        "full_dim_logit_error": full,
        "key_logit_error": _mean_tree([h["key_logit_error"] for _, h in heads]),
        "value_error": _mean_tree([h["value_error"] for _, h in heads]),
        "per_layer": per_layer,
        "correlation": correlation,
        "loss_model": loss_model_check(heads),
        "tiers": tiers,
    }


# --- outputs -------------------------------------------------------------------------------------


def _f(x: float | None, digits: int = 2) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.0f}%"


def markdown(result: dict[str, Any]) -> str:
    """diagnose.md: the summary's tables."""
    s = result["summary"]
    value_dims = result["value_dims"]
    reduced_key_dims = [r for r in result["key_dims"] if r < result["head_dim"]]
    n_layers = len(s["per_layer"])
    seeds = ",".join(str(x["seed"]) for x in result["samples"])
    sample = result["samples"][0]
    lines = [
        f"# mdkv diagnose: {result['model']}",
        "",
        f"{len(result['samples'])} sample(s) (seeds {seeds}) of {sample['context_tokens']} context + "
        f"{sample['continuation_tokens']} continuation tokens; {n_layers} compressed layers x {result['kv_heads']} "
        f"KV heads, head_dim {result['head_dim']}; budget {result['budget']:g}, mixeddimkv's bases: "
        f"{result['basis']}. Every error is measured on the continuation's queries, which no basis and no "
        "allocation saw; means over samples, layers and KV heads.",
        "",
        "## Key logit error: RMS of scale * q . (k - k_hat) over the continuation's queries",
        "",
        f"over the context tokens a tier may hold (not the window): median / mean weighted by the "
        f"continuation's attention / share under {result['logit_tolerance']:g} // attention-weighted mean over "
        "the tokens mixeddimkv stores at r key dims",
        "",
        "| key basis | " + " | ".join(f"r = {r}" for r in reduced_key_dims) + " |",
        "|---|" + "---|" * len(reduced_key_dims),
    ]
    for kind in result["kinds"]:
        cells = [s["key_logit_error"][kind][str(r)] for r in reduced_key_dims]
        lines.append(f"| {kind} | " + " | ".join(
            f"{_f(c['median'])} / {_f(c['weighted'])} / {_pct(c['below'])} // {_f(c['tier'])}" for c in cells) + " |")
    if s["full_dim_logit_error"]:
        lines += ["", f"At r = {result['head_dim']} (keys whole in the basis, as the {result['head_dim']}-key tier "
                  "stores them) the largest per-head median logit error: " + ", ".join(
                      f"{kind} {v:.1e}" for kind, v in s["full_dim_logit_error"].items()) + "."]
    lines += [
        "",
        "## Value error: |v - v_hat| / |v|",
        "",
        "mean over the tokens a tier may hold, plain / through o_proj (query-whitened: values in o_proj's "
        "metric) // attention-weighted mean over the tokens mixeddimkv stores at r value dims",
        "",
        "| value basis | " + " | ".join(f"r = {r}" for r in value_dims) + " |",
        "|---|" + "---|" * len(value_dims),
    ]
    for kind in result["kinds"]:
        cells = [s["value_error"][kind][str(r)] for r in value_dims]
        lines.append(f"| {kind} | " + " | ".join(
            f"{_f(c['mean'])} / {_f(c['o_proj_mean'])} // {_f(c['tier'])}" for c in cells) + " |")
    lines += [
        "",
        f"## Predicted loss vs measured attention-output error at budget {result['budget']:g}",
        "",
        "predicted: mixeddimkv's per-token losses summed over the options an allocation chose (mean over "
        "KV heads); measured: |o - o_hat| / |o| of the continuation's attention outputs (mean over query "
        "heads and tokens); \"evicted instead\": mixeddimkv's whole tokens kept, its reduced ones evicted",
        "",
        "| layer | mixeddimkv predicted | measured | evicted instead | snapkv predicted | measured |",
        "|---|---|---|---|---|---|",
    ]
    mean_row = {"layer": "mean", "allocations": _mean_tree([r["allocations"] for r in s["per_layer"]])}
    for row in [*s["per_layer"], mean_row]:
        m, e = row["allocations"]["mixeddimkv"], row["allocations"]["snapkv"]
        lines.append(f"| {row['layer']} | {_f(m['predicted'], 3)} | {_f(m['measured'], 3)} | "
                     f"{_f(m['measured_reduced_evicted'], 3)} | {_f(e['predicted'], 3)} | {_f(e['measured'], 3)} |")
    corr = s["correlation"]
    lines += ["", "Correlation of predicted and measured: " + "; ".join(
        f"{m}: Pearson {_f(c['pearson_layers'])} over layers, {_f(c['pearson_heads'])} over (sample, layer, head), "
        f"Spearman {_f(c['spearman_heads'])}" for m, c in corr.items()), ""]
    gain, cost = s["loss_model"]["gain"], s["loss_model"]["reduction_cost"]
    lines += [
        "## Loss model check",
        "",
        f"mixeddimkv against snapkv per (sample, layer, KV head), {gain['heads']} heads whose allocations "
        f"differ: mixeddimkv's predicted loss is lower in {_pct(gain['better_predicted'])}, its measured "
        f"error in {_pct(gain['better_measured'])}; the signs agree in {_pct(gain['sign_agreement'])}; Pearson "
        f"of the gains {_f(gain['pearson'])}; mean gain predicted {_f(gain['mean_predicted'], 3)}, measured "
        f"{_f(gain['mean_measured'], 3)}.",
        "",
        "The same with the loss table's importance swapped (the options' cost factors kept): the policy's "
        "(window queries, max-pooled), the window's unpooled, and the attention the held-out continuation "
        "pays (an oracle: what the measurement sees). Correlation of predicted loss and measured error over "
        "both methods' (sample, layer, head) allocations, and of their gains:",
        "",
        "| importance | loss vs error: Pearson | Spearman | gain vs gain: Pearson | Spearman | signs agree | "
        "mixeddimkv better: predicted | measured |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for key, g in s["loss_model"]["by_importance"].items():
        lines.append(f"| {key} | {_f(g['pearson_loss'])} | {_f(g['spearman_loss'])} | {_f(g['pearson'])} | "
                     f"{_f(g['spearman'])} | {_pct(g['sign_agreement'])} | {_pct(g['better_predicted'])} | "
                     f"{_pct(g['better_measured'])} |")
    lines += [
        "",
        "Cost of mixeddimkv's reduced tokens as a share of evicting them: predicted (their losses / their "
        "importance) and measured ((error - error with them whole) / (error with them evicted - error with "
        "them whole)), with both keys and values reduced, only the keys, only the values:",
        "",
        "| layer | predicted | measured | keys only: predicted | measured | values only: predicted | measured |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in [*s["loss_model"]["reduction_cost_per_layer"], {"layer": "all", **cost}]:
        lines.append(f"| {row['layer']} | " + " | ".join(_f(row[k]) for k in (
            "predicted", "measured", "predicted_keys_only", "measured_keys_only", "predicted_values_only",
            "measured_values_only")) + " |")
    tiers = s["tiers"]["mixeddimkv"]
    lines += [
        "",
        "## mixeddimkv's stored prompt entries per tier (key dims/value dims)",
        "",
        "| tier | share of stored entries | share of stored elements | predicted loss (mean per KV head) |",
        "|---|---|---|---|",
    ]
    for label, share in tiers["stored_shares"].items():
        lines.append(f"| {_tier_name(label, result['head_dim'])} | {_pct(share)} | "
                     f"{_pct(tiers['element_shares'][label])} | {_f(tiers['predicted_per_tier'][label], 3)} |")
    snap_evicted = _pct(s["tiers"]["snapkv"]["evicted_share"])
    lines += ["", f"Evicted: {_pct(tiers['evicted_share'])} of prompt entries (predicted loss "
              f"{_f(tiers['predicted_per_tier']['0'], 3)}); snapkv evicts {snap_evicted}.", ""]
    return "\n".join(lines)


def plot_dim(result: dict[str, Any]) -> int:
    """The key dim the figure shows: d/4, the tiers' middle one."""
    dims = result["key_dims"]
    return min(dims, key=lambda r: abs(r - result["head_dim"] // 4))


def write_plot(result: dict[str, Any], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")  # no display on the servers
    import matplotlib.pyplot as plt

    s = result["summary"]
    r = str(plot_dim(result))
    fig, grid = plt.subplots(2, 2, figsize=(13, 9))
    axes = grid.ravel()
    ax = axes[0]
    layers = [row["layer"] for row in s["per_layer"]]
    for j, kind in enumerate(result["kinds"]):
        rows = [row["key_logit_error"][kind][r] for row in s["per_layer"]]
        ax.plot(layers, [c["median"] for c in rows], marker="o", ms=3, color=f"C{j}", label=f"{kind}: median")
        ax.plot(layers, [c["weighted"] for c in rows], "--", color=f"C{j}", label=f"{kind}: attention-weighted")
    ax.set(xlabel="layer", ylabel="RMS logit error over the continuation's queries",
           title=f"key logit error at r = {r} of {result['head_dim']} (tokens a tier may hold)")
    ax.legend(fontsize=7)
    ax = axes[1]
    for method, marker in zip(result["methods"], ("o", "x"), strict=True):
        corr = s["correlation"][method]["pearson_heads"]
        ax.scatter(*_points([h["allocations"][method] for _, h in _heads(result)]), s=10, alpha=0.5, marker=marker,
                   label=f"{method} (r = {_f(corr)})")
    ax.set(xlabel="predicted loss (sum over tokens)", ylabel="measured |o - o_hat| / |o|",
           title=f"per (sample, layer, KV head), budget {result['budget']:g}")
    ax.legend()
    ax = axes[2]
    rows = s["loss_model"]["reduction_cost_per_layer"]
    layers = [row["layer"] for row in rows]
    for part, color in (("", "C0"), ("_keys_only", "C1"), ("_values_only", "C2")):
        name = part.strip("_").replace("_", " ") or "keys and values"
        for side, style in (("predicted", "--"), ("measured", "-")):
            ax.plot(layers, [row[side + part] if row[side + part] is not None else float("nan") for row in rows],
                    style, color=color, marker="o" if side == "measured" else None, ms=3, label=f"{name}: {side}")
    ax.set(xlabel="layer", ylabel="cost of the reduced tokens / cost of evicting them",
           title="loss model: reduced tiers' cost, predicted (dashed) vs measured")
    ax.legend(fontsize=7)
    ax = axes[3]
    tiers = s["tiers"]["mixeddimkv"]
    labels = list(tiers["stored_shares"])
    x = list(range(len(labels)))
    ax.bar([i - 0.2 for i in x], [100 * tiers["stored_shares"][k] for k in labels], 0.4, label="entries")
    ax.bar([i + 0.2 for i in x], [100 * tiers["element_shares"][k] for k in labels], 0.4, label="elements")
    ax.set_xticks(x, [_tier_name(k, result["head_dim"]) for k in labels])
    ax.legend()
    ax.set(xlabel="tier (key dims/value dims)", ylabel="% of the stored prompt entries / elements",
           title=f"mixeddimkv's tiers (evicted: {_pct(tiers['evicted_share'])} of entries)")
    fig.suptitle(f"mdkv diagnose: {result['model']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _rounded(tree: Any, digits: int = 5) -> Any:
    """`tree` with its floats to `digits` significant digits (the JSON's size; float32 sums carry no more)."""
    if isinstance(tree, dict):
        return {k: _rounded(v, digits) for k, v in tree.items()}
    if isinstance(tree, list | tuple):
        return [_rounded(v, digits) for v in tree]
    if isinstance(tree, float) and math.isfinite(tree):
        return float(f"{tree:.{digits}g}")
    return tree


def write_outputs(result: dict[str, Any], out: str | Path, plot: bool = True) -> list[Path]:
    """diagnose.json, diagnose.md and (with `plot`) diagnose_<model>.png in `out`; adds the summary."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    result["summary"] = summarize(result)
    paths = [out / "diagnose.json", out / "diagnose.md"]
    paths[0].write_text(json.dumps(_rounded(result), separators=(",", ":")) + "\n")  # compact: ~300 KB a sample
    paths[1].write_text(markdown(result))
    if plot:
        stem = "".join(c if c.isalnum() or c in "-_." else "_" for c in result["model"])[-48:]
        paths.append(write_plot(result, out / f"diagnose_{stem}.png"))
    return paths


# --- command line --------------------------------------------------------------------------------


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="smollm2", help="'smollm2', 'gemma3-270m' or a Hugging Face model path")
    p.add_argument("--length", type=positive_int, default=2048,
                   help="context tokens per sample (> 128: shorter prompts are stored whole)")
    p.add_argument("--cont", type=positive_int, default=128, help="held-out continuation tokens per sample")
    p.add_argument("--seeds", type=csv_list(non_negative_int), default=[0, 1],
                   help="one sample per seed (the kl task's haystack slices), e.g. 0,1")
    p.add_argument("--budget", type=fraction, default=0.1, help="budget of the two allocations, in (0, 1]")
    p.add_argument("--basis", choices=("calibrated", "prompt"), default="calibrated",
                   help="bases of mixeddimkv's allocation (all three kinds are diagnosed either way)")
    p.add_argument("--calibrated-basis", default=None,
                   help="a file from `mdkv calibrate` (default: the bundled model's, fitted on first use)")
    p.add_argument("--calibration-chunks", type=positive_int, default=CALIBRATION_CHUNKS,
                   help="pieces of the calibration text for the query-whitened bases' statistics")
    p.add_argument("--calibration-tokens", type=positive_int, default=CHUNK_TOKENS,
                   help="tokens per piece (>= 64)")
    p.add_argument("--out", required=True, help="output folder (diagnose.json, diagnose.md, diagnose_<model>.png)")
    p.add_argument("--device", type=device, default="cpu")
    p.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads")


@command("mdkv diagnose")
def run(args: argparse.Namespace) -> int:
    output_folder(args.out, "--out")
    shortest = MixedDimKVConfig().min_compress_tokens + 1
    check(args.calibration_tokens >= 64, f"--calibration-tokens {args.calibration_tokens}: use at least 64")
    check(args.length >= shortest, f"--length {args.length}: use at least {shortest} tokens (shorter prompts are "
          "stored whole: there is no allocation to diagnose)")
    if args.calibrated_basis is not None:
        existing_file(args.calibrated_basis, "--calibrated-basis")
    try:
        assets.check_model_source(args.model)
    except FileNotFoundError as e:
        raise as_usage_error(e) from None
    if args.threads:
        torch.set_num_threads(args.threads)
    start = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - start:6.1f} s] {msg}", file=sys.stderr, flush=True)

    model, tok = assets.load_model(args.model, device=args.device)
    log(f"loaded {args.model}")
    try:
        instances = [T.make_instance("kl", tok, args.length, seed=s, ppl_tokens=args.cont) for s in args.seeds]
    except ValueError as e:
        raise as_usage_error(e) from None
    samples = [Sample(inst.seed, *T.encode(tok, inst)) for inst in instances]
    limit = getattr(model.config.get_text_config(decoder=True), "max_position_embeddings", None)
    longest = max(len(s.context) + len(s.continuation) for s in samples)
    check(limit is None or longest <= limit,
          f"--length {args.length} + --cont {args.cont}: {longest} tokens, over the model's {limit} positions")
    if args.calibrated_basis is not None:
        _, _, n_kv, d = model_dims(model.config)
        try:
            read_calibrated(args.calibrated_basis, compressed_layers(model), n_kv, d)
        except ValueError as e:
            raise as_usage_error(e) from None
    path = args.calibrated_basis or calibrated_basis_file(model, tok, args.model)
    chunks = calibration_chunks(tok, assets.calibration_text(), args.calibration_chunks, args.calibration_tokens)
    batches = [tok(text, return_tensors="pt").input_ids[:, :args.calibration_tokens] for text in chunks]
    result = diagnose(model, samples, batches, path, args.budget, args.basis, args.model, log)
    paths = write_outputs(result, args.out)
    print(paths[1].read_text())
    log(f"wrote {', '.join(str(p) for p in paths)}")
    return 0
