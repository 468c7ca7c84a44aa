"""`mdkv diagnose`: where reduced tiers lose, per layer and KV head (issue 13, "Diagnostics").

Each sample is a `kl` task instance: `length` tokens of the essays and the `cont` tokens after
them. One forward with the full cache captures every compressed layer's post-RoPE queries, keys
and values over context + continuation. The continuation's queries are held out (no basis and no
allocation is built from them) and judge what a store of the context would serve them:

* **bases**, per basis kind and reduced dim of the default tiers (`cfg.resolve_tiers(d)`): the
  logit error `scale * q . (k - k_hat)` of each context key kept at r dims, RMS over the
  continuation's queries of its KV head's group, then the median over tokens, the mean weighted by
  the attention the continuation pays each token, and the share of tokens under `LOGIT_TOLERANCE`;
  and the relative value error |v - v_hat| / |v|, plain and through o_proj.
* **allocations**: the tokens `mixeddimkv` stores at each tier at `budget` (its own policy, run on
  the captured context as the cache runs it) and `snapkv`'s choice at the same budget: the
  predicted loss (the policy's per-token losses, `policies.mixeddim.option_losses`, summed over
  the chosen options) against the measured error |o - o_hat| / |o| of the attention output on the
  continuation's queries (exact attention over context + continuation against attention over the
  packed store + continuation), and how many prompt entries each tier holds.

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
import json
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
from mdkv_compile.core.losses import logit_errors
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
    cap: Captured, n: int, basis: Basis, dims: Sequence[int], weights: torch.Tensor
) -> dict[str, dict[str, list[float]]]:
    """{r: {"median", "weighted", "below": [H]}}: the RMS over the continuation's queries of the
    logit error of each context key kept at r dims in `basis`, summarised over the tokens. With
    A B^T = I the error q . (k - A_r B_r^T k) is the tail (A^T q)[r:] . (B^T k)[r:], which is what
    `core.losses.logit_errors` sums (pre-softcap logits)."""
    synthesis, analysis = basis
    n_kv, d = cap.key.shape[0], cap.key.shape[-1]
    queries = cap.query[:, n:].reshape(n_kv, -1, d)  # the group's continuation queries per KV head
    rms = logit_errors((queries @ synthesis)[None], (cap.key[:, :n] @ analysis)[None], tuple(dims), cap.scale)[0]
    out = {}
    for j, r in enumerate(dims):
        err = rms[..., j]
        out[str(r)] = {
            "median": err.median(-1).values.tolist(),
            "weighted": _weighted(err, weights).tolist(),
            "below": (err < LOGIT_TOLERANCE).float().mean(-1).tolist(),
        }
    return out


def value_errors(
    value: torch.Tensor, basis: Basis, dims: Sequence[int], metric: torch.Tensor | None, weights: torch.Tensor
) -> dict[str, dict[str, list[float] | None]]:
    """{r: {"mean", "weighted", "o_proj_mean", "o_proj_weighted": [H]}}: |v - v_hat| / |v| of each
    context value [H, n, d] kept at r dims in `basis`, and the same measured after o_proj
    (sqrt(e^T M e / v^T M v), `o_proj_metric`; None without one), averaged over the tokens plainly
    and weighted by the continuation's attention."""
    synthesis, analysis = basis
    coef = value @ analysis
    norm = value.norm(dim=-1).clamp_min(_TINY)
    o_norm = None if metric is None else ((value @ metric) * value).sum(-1).clamp_min(_TINY).sqrt()
    out: dict[str, dict[str, list[float] | None]] = {}
    for r in dims:
        err = value - coef[..., :r] @ synthesis[..., :r].transpose(-1, -2)
        rel = err.norm(dim=-1) / norm
        row: dict[str, list[float] | None] = {
            "mean": rel.mean(-1).tolist(), "weighted": _weighted(rel, weights).tolist(),
            "o_proj_mean": None, "o_proj_weighted": None,
        }
        if metric is not None:
            rel_o = ((err @ metric) * err).sum(-1).clamp_min(0).sqrt() / o_norm
            row.update(o_proj_mean=rel_o.mean(-1).tolist(), o_proj_weighted=_weighted(rel_o, weights).tolist())
        out[str(r)] = row
    return out


def measured_error(cap: Captured, n: int, sel: Selection, reference: torch.Tensor) -> torch.Tensor:
    """[H]: |o - o_hat| / |o| of the continuation's attention outputs when the context is stored as
    `sel` chose (the packed store; the continuation itself whole), averaged over the KV head's
    query heads and the continuation's tokens. `reference`: exact attention [Hq, T, d]."""
    store = pack_selection(cap.key[None, :, :n], cap.value[None, :, :n], sel)
    out = attend_packed(cap.query[None, :, n:], store, cap.key[None, :, n:], cap.value[None, :, n:], None,
                        cap.scale, cap.softcap)[0]
    rel = (out - reference).norm(dim=-1) / reference.norm(dim=-1).clamp_min(_TINY)  # [Hq, T]
    return rel.reshape(cap.key.shape[0], -1).mean(-1)


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


def allocation(
    cap: Captured, n: int, layers: dict[str, MixedDimLayer], reference: torch.Tensor
) -> dict[str, dict[str, Any]]:
    """mixeddimkv's and snapkv's allocation of one layer's context: predicted loss (mixeddimkv's
    loss table summed over each one's choice) per head and per tier, entries per tier, measured
    output error, and for mixeddimkv the error with its reduced tokens evicted instead."""
    d = cap.key.shape[-1]
    args = (cap.query[None, :, :n], cap.key[None, :, :n], cap.value[None, :, :n], None, cap.scale, cap.softcap)
    mixed_ctx = layers["mixeddimkv"].context(*args)
    opts, losses = option_losses(mixed_ctx)
    out: dict[str, dict[str, Any]] = {}
    for method, layer in layers.items():
        sel = select(mixed_ctx if method == "mixeddimkv" else layer.context(*args))
        loss_by_tier, count_by_tier = chosen_options(opts, losses, sel)
        out[method] = {
            "predicted": [sum(col) for col in zip(*loss_by_tier.values(), strict=True)],
            "predicted_per_tier": loss_by_tier,
            "entries": count_by_tier,
            "measured": measured_error(cap, n, sel, reference).tolist(),
        }
        if method == "mixeddimkv":
            value_dim = sel.chosen_dim if sel.chosen_value_dim is None else sel.chosen_value_dim
            whole = (sel.chosen_dim == d) & (value_dim == d)
            evicted = Selection(chosen_dim=torch.where(whole, d, 0), tier_dims=(d,))
            out[method]["measured_reduced_evicted"] = measured_error(cap, n, evicted, reference).tolist()
    return out


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
    keys, values = {}, {}
    for kind, (kb, vb) in basis_kinds(cap, n, calibrated, moments, metric).items():
        keys[kind] = key_errors(cap, n, kb, key_dims, weights)
        values[kind] = value_errors(cap.value[:, :n], vb, value_dims, metric, weights)
    total = cap.key.shape[1]
    reference = dense_attention(cap.query[None, :, n:], cap.key[None], cap.value[None],
                                causal_mask(total - n, total, cap.key.device)[None, None], cap.scale, cap.softcap)[0]
    allocs = allocation(cap, n, layers, reference)
    return [
        {"head": h, "key_logit_error": _per_head(keys, h), "value_error": _per_head(values, h),
         "allocations": _per_head(allocs, h)}
        for h in range(cap.key.shape[0])
    ]


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
    key_dims = sorted({rk for rk, _ in tiers if rk < d})
    value_dims = sorted({rv for _, rv in tiers if rv < d})
    start = time.perf_counter()
    moments = calibration_moments(model, calibration)
    calibrated = load_calibrated(calibrated_path)
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


def summarize(result: dict[str, Any]) -> dict[str, Any]:
    """Means over samples, layers and heads of the basis errors; per layer, the predicted and
    measured errors of each allocation (mean over samples and heads) and their correlations; the
    share of stored prompt entries per tier."""
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
        tiers[method] = {
            "stored_shares": {k: c / max(stored, 1) for k, c in counts.items() if k != "0"},
            "evicted_share": counts.get("0", 0) / max(all_entries, 1),
            "predicted_per_tier": _mean_tree([h["allocations"][method]["predicted_per_tier"] for _, h in heads]),
        }
    return {
        "key_logit_error": _mean_tree([h["key_logit_error"] for _, h in heads]),
        "value_error": _mean_tree([h["value_error"] for _, h in heads]),
        "per_layer": per_layer,
        "correlation": correlation,
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
    key_dims, value_dims = result["key_dims"], result["value_dims"]
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
        f"median over tokens / mean weighted by the continuation's attention / share of tokens under "
        f"{result['logit_tolerance']:g}",
        "",
        "| key basis | " + " | ".join(f"r = {r}" for r in key_dims) + " |",
        "|---|" + "---|" * len(key_dims),
    ]
    for kind in result["kinds"]:
        cells = [s["key_logit_error"][kind][str(r)] for r in key_dims]
        lines.append(f"| {kind} | " + " | ".join(
            f"{_f(c['median'])} / {_f(c['weighted'])} / {_pct(c['below'])}" for c in cells) + " |")
    lines += [
        "",
        "## Value error: |v - v_hat| / |v|",
        "",
        "mean over tokens, plain / through o_proj (query-whitened: values in o_proj's metric)",
        "",
        "| value basis | " + " | ".join(f"r = {r}" for r in value_dims) + " |",
        "|---|" + "---|" * len(value_dims),
    ]
    for kind in result["kinds"]:
        cells = [s["value_error"][kind][str(r)] for r in value_dims]
        lines.append(f"| {kind} | " + " | ".join(f"{_f(c['mean'])} / {_f(c['o_proj_mean'])}" for c in cells) + " |")
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
    tiers = s["tiers"]["mixeddimkv"]
    lines += [
        "## mixeddimkv's stored prompt entries per tier (key dims/value dims)",
        "",
        "| tier | share of stored entries | predicted loss (mean per KV head) |",
        "|---|---|---|",
    ]
    for label, share in tiers["stored_shares"].items():
        lines.append(f"| {label} | {_pct(share)} | {_f(tiers['predicted_per_tier'][label], 3)} |")
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
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.6))
    ax = axes[0]
    layers = [row["layer"] for row in s["per_layer"]]
    for kind in result["kinds"]:
        ax.plot(layers, [row["key_logit_error"][kind][r]["weighted"] for row in s["per_layer"]], marker="o",
                label=kind)
    ax.set(xlabel="layer", ylabel="logit error (attention-weighted RMS)",
           title=f"key logit error at r = {r} of {result['head_dim']}")
    ax.legend()
    ax = axes[1]
    for method, marker in zip(result["methods"], ("o", "x"), strict=True):
        corr = s["correlation"][method]["pearson_heads"]
        ax.scatter(*_points([h["allocations"][method] for _, h in _heads(result)]), s=10, alpha=0.5, marker=marker,
                   label=f"{method} (r = {_f(corr)})")
    ax.set(xlabel="predicted loss (sum over tokens)", ylabel="measured |o - o_hat| / |o|",
           title=f"per (sample, layer, KV head), budget {result['budget']:g}")
    ax.legend()
    ax = axes[2]
    tiers = s["tiers"]["mixeddimkv"]
    labels = list(tiers["stored_shares"])
    ax.bar(labels, [100 * tiers["stored_shares"][k] for k in labels])
    ax.set(xlabel="tier (key dims/value dims)", ylabel="% of stored prompt entries",
           title=f"mixeddimkv's tiers (evicted: {_pct(tiers['evicted_share'])} of entries)")
    fig.suptitle(f"mdkv diagnose: {result['model']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_outputs(result: dict[str, Any], out: str | Path, plot: bool = True) -> list[Path]:
    """diagnose.json, diagnose.md and (with `plot`) diagnose_<model>.png in `out`; adds the summary."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    result["summary"] = summarize(result)
    paths = [out / "diagnose.json", out / "diagnose.md"]
    paths[0].write_text(json.dumps(result, indent=1) + "\n")
    paths[1].write_text(markdown(result))
    if plot:
        stem = "".join(c if c.isalnum() or c in "-_." else "_" for c in result["model"])[-48:]
        paths.append(write_plot(result, out / f"diagnose_{stem}.png"))
    return paths


# --- command line --------------------------------------------------------------------------------


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="smollm2", help="'smollm2', 'gemma3-270m' or a Hugging Face model path")
    p.add_argument("--length", type=positive_int, default=2048, help="context tokens per sample (>= 64)")
    p.add_argument("--cont", type=positive_int, default=128, help="held-out continuation tokens per sample")
    p.add_argument("--seeds", type=csv_list(non_negative_int), default=[0, 1],
                   help="one sample per seed (the kl task's haystack slices), e.g. 0,1")
    p.add_argument("--budget", type=fraction, default=0.1, help="budget of the two allocations, in (0, 1]")
    p.add_argument("--basis", choices=("calibrated", "prompt"), default="calibrated",
                   help="bases of mixeddimkv's allocation (all three kinds are diagnosed either way)")
    p.add_argument("--calibrated-basis", default=None,
                   help="a file from `mdkv calibrate` (default: the bundled model's, fitted on first use)")
    p.add_argument("--calibration-chunks", type=positive_int, default=CALIBRATION_CHUNKS,
                   help=f"pieces of {CHUNK_TOKENS} tokens of the calibration text for the query statistics")
    p.add_argument("--out", required=True, help="output folder (diagnose.json, diagnose.md, diagnose_<model>.png)")
    p.add_argument("--device", type=device, default="cpu")
    p.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads")


@command("mdkv diagnose")
def run(args: argparse.Namespace) -> int:
    output_folder(args.out, "--out")
    check(args.length >= 64, f"--length {args.length}: use at least 64 tokens")
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
    path = args.calibrated_basis or calibrated_basis_file(model, tok, args.model)
    chunks = calibration_chunks(tok, assets.calibration_text(), args.calibration_chunks)
    batches = [tok(text, return_tensors="pt").input_ids[:, :CHUNK_TOKENS] for text in chunks]
    result = diagnose(model, samples, batches, path, args.budget, args.basis, args.model, log)
    paths = write_outputs(result, args.out)
    print(paths[1].read_text())
    log(f"wrote {', '.join(str(p) for p in paths)}")
    return 0
