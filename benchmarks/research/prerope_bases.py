"""Research measurement (docs/notes/quality_notes.md, section 7): calibrated pre-RoPE against
calibrated post-RoPE key bases for reduced tokens, SmolLM2 or Gemma 3 270M (its global layers) on
CPU, KL(full || method) of 128 teacher-forced continuation tokens after a compressed 2048-token
prefix (4 haystack samples).

Not the product: the packed store cannot hold pre-RoPE keys (a reduced key would have to be rotated
at its own position inside the attention kernels). Here a policy overwrites each reduced token's
key and value with its reconstruction and keeps it at full width, so the bytes are counted by
formula: a reduced token costs rk + rv elements, plus 1 for its position under a pre-RoPE basis.
Bases (`--bases`), per layer and KV head over the calibration essay (held out of the haystack):
uncentred PCA of the post-RoPE keys ("post") or of the un-rotated keys ("pre"), or whole rotary
pairs ("pairs": coordinate planes (i, i + d/2) ranked by E|q_pair|^2 E|k_pair|^2, a post-RoPE basis
that commutes with the rotation, so the store and kernels would need no change).

    python benchmarks/research/prerope_bases.py --out results/research_prerope/kl.json
    MDKV_EXTRA_ASSETS=gemma3-270m python benchmarks/research/prerope_bases.py --model gemma3-270m \
        --out results/research_prerope/kl_gemma3.json
    python benchmarks/research/prerope_bases.py --bases pairs,post --no-fixed-splits \
        --out results/research_prerope/kl_pairs.json
    python benchmarks/research/prerope_bases.py --bases pre --tiers '[[32,32],[16,16],[8,16],[8,8]]' \
        --pool-kernel 1 --budgets 0.05,0.1 --niah --out results/research_prerope/niah_pre_pool1

Two allocations per basis: a fixed split (half the free budget on whole tokens by importance, the
rest on the next tokens at (rk, rv), as fractions of the head dim) and mixeddimkv's own (mass
loss, knapsack per KV head, the default tiers).
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Callable
from pathlib import Path

import torch
from transformers.models.llama.modeling_llama import rotate_half

import mdkv_compile as mdkv
from mdkv_compile import assets, policies
from mdkv_compile import cache as cache_mod
from mdkv_compile.core.allocation import FORCED_LOSS
from mdkv_compile.core.losses import attention_losses, residual_fraction
from mdkv_compile.policies.base import LayerContext, Selection, bookkeeping_units, owner_budget
from mdkv_compile.policies.mixeddim import _solve, options

SIM = "lowrank"  # the method name whose policy this script replaces (its config fields are the tiers')


def top_eigenvectors(m: torch.Tensor) -> torch.Tensor:
    return torch.linalg.eigh(m.double())[1].flip(-1).float()


def project(x: torch.Tensor, basis: torch.Tensor, r: int) -> torch.Tensor:
    return (x @ basis[..., :r]) @ basis[..., :r].transpose(-1, -2)


class Rope:
    """The model's rotary embedding at positions 0..N-1 (a prompt's keys start at position 0)."""

    def __init__(self, model) -> None:
        self.emb = model.model.rotary_emb
        # Gemma 3 keeps one table per layer type; only its global ("full_attention") layers are compressed.
        self.layer_type = {"layer_type": "full_attention"} if hasattr(self.emb, "layer_types") else {}

    def _cos_sin(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        cos, sin = self.emb(torch.zeros(1), torch.arange(n)[None], **self.layer_type)
        return cos[:, None].float(), sin[:, None].float()

    def rotate(self, x: torch.Tensor) -> torch.Tensor:
        cos, sin = self._cos_sin(x.shape[2])
        return x * cos + rotate_half(x) * sin

    def unrotate(self, x: torch.Tensor) -> torch.Tensor:
        cos, sin = self._cos_sin(x.shape[2])
        return x * cos - rotate_half(x) * sin


@torch.no_grad()
def calibrate(model, tokenizer, rope: Rope) -> dict[int, dict[str, torch.Tensor]]:
    """{layer: {"post", "pre", "value": [H, d, d] eigenvectors, descending}} over the calibration essay."""
    moments: dict[int, dict[str, torch.Tensor]] = {}
    original = cache_mod.MixedDimLayer.compress

    def capture(self, query, key, value, *args, **kwargs):
        k, v = key.float(), value.float()
        acc = moments.setdefault(self.layer_idx, {})
        for name, x in (("post", k), ("pre", rope.unrotate(k)), ("value", v)):
            acc[name] = acc.get(name, 0) + torch.einsum("bhnd,bhne->hde", x, x)
        q = query.float().reshape(k.shape[0], k.shape[1], -1, k.shape[-1])  # GQA groups folded into tokens
        acc["query_energy"] = acc.get("query_energy", 0) + q.square().sum((0, 2))
        return original(self, query, key, value, *args, **kwargs)

    ids = tokenizer(assets.calibration_text(), return_tensors="pt").input_ids[0]
    cfg = mdkv.MixedDimKVConfig(budget=1.0, method="full", min_compress_tokens=0)
    cache_mod.MixedDimLayer.compress = capture
    mdkv.patch(model, cfg)
    try:
        for start in range(0, len(ids) - 1024, 2048):
            model(ids[start : start + 2048][None], past_key_values=mdkv.MixedDimCache(model.config, cfg),
                  use_cache=True, logits_to_keep=1)
    finally:
        mdkv.unpatch(model)
        cache_mod.MixedDimLayer.compress = original
    return {layer: {"pairs": rope_pair_basis(acc["query_energy"], acc["post"].diagonal(dim1=-2, dim2=-1)),
                    **{k: top_eigenvectors(m) for k, m in acc.items() if k != "query_energy"}}
            for layer, acc in moments.items()}


def rope_pair_basis(query_energy: torch.Tensor, key_energy: torch.Tensor) -> torch.Tensor:
    """[H, d, d]: coordinate columns, whole rotary pairs (i, i + d/2) in descending order of
    E|q_pair|^2 E|k_pair|^2. A span of whole pairs is invariant under every rotation R(p), so
    selecting pairs commutes with RoPE: a post-RoPE basis that loses nothing to the rotation."""
    h, d = key_energy.shape
    half = d // 2
    score = (query_energy[:, :half] + query_energy[:, half:]) * (key_energy[:, :half] + key_energy[:, half:])
    order = score.argsort(dim=-1, descending=True)  # [H, d/2]
    cols = torch.stack([order, order + half], -1).reshape(h, d)  # pair i -> columns 2i, 2i + 1
    return torch.eye(d)[:, cols].permute(1, 0, 2).contiguous()


def reconstructed_keys(key_f: torch.Tensor, basis: torch.Tensor, r: int, pre: bool, rope: Rope) -> torch.Tensor:
    return rope.rotate(project(rope.unrotate(key_f), basis, r)) if pre else project(key_f, basis, r)


def make_policy(bases: dict, rope: Rope, kind: str, split: tuple[float, float] | None) -> Callable:
    """A policy over reconstructions with the key basis `kind` ("post", "pre" or "pairs"): `split`
    (rk, rv) as fractions of the head dim for the fixed split, None for mixeddimkv's allocation over
    the config's tiers."""
    pre = kind == "pre"

    def policy(ctx: LayerContext) -> Selection:
        d = ctx.head_dim
        key_f, value_f = ctx.float_copy(ctx.key), ctx.float_copy(ctx.value)
        importance = ctx.importance(key_f)
        forced = ctx.forced()[:, None, :].expand(ctx.key.shape[:3])
        key_basis = bases[ctx.layer_idx][kind][None]
        value_basis = bases[ctx.layer_idx]["value"][None]
        units = owner_budget(ctx)
        if split is not None:
            rk, rv = int(split[0] * d), int(split[1] * d)
            rank = importance.masked_fill(forced | ~ctx.valid[:, None, :], -1.0).argsort(dim=-1, descending=True,
                                                                                          stable=True).argsort(dim=-1)
            free = (units - forced.sum(-1) * d).clamp_min(0)
            n_full = (0.5 * free / d).floor()
            n_red = ((free - n_full * d) / ((rk + rv + pre) / 2)).floor()
            valid = ctx.valid[:, None, :] & ~forced
            key_dim = torch.where((rank < n_full[..., None]) | forced, d, 0)
            key_dim = torch.where(valid & (rank >= n_full[..., None]) & (rank < (n_full + n_red)[..., None]), rk,
                                  key_dim)
            value_dim = torch.where(key_dim == rk, rv, key_dim)
        else:
            opts = options(ctx)
            key_dims = sorted({rk for rk, _ in opts if 0 < rk < d})
            value_dims = tuple(sorted({rv for _, rv in opts if 0 < rv < d}))
            w = min(ctx.cfg.window, key_f.shape[2])
            q = ctx.query[:, :, -w:].float().reshape(*key_f.shape[:2], -1, d)
            scale = ctx.scale or 1 / math.sqrt(d)
            logit_rms = torch.stack([
                scale * (q @ (key_f - reconstructed_keys(key_f, key_basis, r, pre, rope)).transpose(-1, -2))
                .square().mean(-2).sqrt() for r in key_dims], -1)
            value_frac = residual_fraction(value_f @ value_basis, value_f.square().sum(-1), value_dims, d)
            losses = attention_losses(importance, logit_rms, tuple(key_dims), value_frac, value_dims, opts,
                                      ctx.cfg.value_weight)
            forced_row = torch.full((len(opts),), FORCED_LOSS)
            forced_row[-1] = 0.0
            losses = torch.where(forced[..., None], forced_row, losses).masked_fill(~ctx.valid[:, None, :, None], 0)
            costs = torch.tensor([rk + rv + (pre if 0 < rk < d else 0) for rk, rv in opts])
            choice, _ = _solve(ctx, losses, 2 * (units - bookkeeping_units(len(opts), 4)), costs)
            key_dim = torch.tensor([rk for rk, _ in opts])[choice]
            value_dim = torch.tensor([rv for _, rv in opts])[choice]
        new_key, new_value = key_f.clone(), value_f.clone()
        for r in set(key_dim.unique().tolist()) - {0, d}:
            new_key = torch.where((key_dim == r)[..., None], reconstructed_keys(key_f, key_basis, r, pre, rope),
                                  new_key)
        for r in set(value_dim.unique().tolist()) - {0, d}:
            new_value = torch.where((value_dim == r)[..., None], project(value_f, value_basis, r), new_value)
        ctx.key.copy_(new_key.to(ctx.key.dtype))
        ctx.value.copy_(new_value.to(ctx.value.dtype))
        STATS.append((int((key_dim > 0).sum()), int(((key_dim > 0) & (key_dim < d)).sum())))
        return Selection(chosen_dim=torch.where(key_dim > 0, d, 0).long(), tier_dims=(d,))

    return policy


STATS: list[tuple[int, int]] = []


@torch.no_grad()
def kl_of(model, cfg: mdkv.MixedDimKVConfig, samples: list, full: list) -> float:
    """Mean KL(full || method) over the samples' continuation tokens."""
    kls = []
    for (prefix, cont), lp_full in zip(samples, full, strict=True):
        mdkv.patch(model, cfg)
        try:
            cache = mdkv.MixedDimCache(model.config, cfg)
            first = model(prefix[None], past_key_values=cache, use_cache=True, logits_to_keep=1).logits[0]
            pos = torch.arange(len(prefix), len(prefix) + len(cont) - 1)[None]
            rest = model(cont[None, :-1], position_ids=pos, past_key_values=cache, use_cache=True).logits[0]
        finally:
            mdkv.unpatch(model)
        lp = torch.cat([first, rest]).float().log_softmax(-1)
        kls.append(float((lp_full.exp() * (lp_full - lp)).sum(-1).mean()))
    return sum(kls) / len(kls)


SAMPLES_NOTE = "haystack tokens 60000 + 12000 i, i < 4: 2048 + 128"


def kl_setup(model_name: str) -> tuple:
    """The model, its tokenizer, the 4 (prefix, continuation) samples of SAMPLES_NOTE and the full
    cache's log-probabilities of each continuation (what `kl_of` compares against)."""
    torch.set_num_threads(2)
    model, tokenizer = assets.load_model(model_name)
    ids = tokenizer(assets.haystack_text(), return_tensors="pt").input_ids[0]
    samples = [(ids[s : s + 2048], ids[s + 2048 : s + 2176]) for s in range(60000, 108000, 12000)]
    with torch.no_grad():
        full = [model(torch.cat([a, b])[None], use_cache=False).logits[0, len(a) - 1 : -1].float().log_softmax(-1)
                for a, b in samples]
    return model, tokenizer, samples, full


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2", choices=("smollm2", "gemma3-270m"))
    p.add_argument("--pool-kernel", type=int, default=7,
                   help="the importance's max-pool for the simulated policies (snapkv rows keep 7, SnapKV's)")
    p.add_argument("--bases", default="post,pre", help="key bases to compare: post, pre, pairs (RoPE pairs)")
    p.add_argument("--fixed-splits", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--budgets", default="0.02,0.05,0.1")
    p.add_argument("--tiers", default=None, help="mixeddimkv's reduced tiers as JSON, e.g. '[[16,32],[8,16],[8,8]]'")
    p.add_argument("--niah", action="store_true",
                   help="instead of KL: `mdkv eval`'s needle task at 2000 and 4000 tokens (3 depths, both protocols) "
                   "under the first of --bases, results in --out as a folder (the cells are labelled with the "
                   f"method name whose slot the simulation takes, {SIM!r})")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args()
    model, tokenizer, samples, full = kl_setup(args.model)
    rope = Rope(model)
    bases = calibrate(model, tokenizer, rope)
    rows = []
    tiers = None if args.tiers is None else tuple(tuple(t) for t in json.loads(args.tiers))
    if args.niah:
        from mdkv_compile.eval import runner

        policies.POLICIES[SIM] = make_policy(bases, rope, args.bases.split(",")[0], None)
        budgets = [float(b) for b in args.budgets.split(",")]
        spec = runner.EvalSpec(model_name=args.model, methods=[SIM], budgets=budgets, tasks=["niah"],
                               lengths=[2000, 4000], depths=[0.25, 0.5, 0.75], seeds=[1],
                               protocols=["query-agnostic", "query-aware"],
                               options={"pool_kernel": args.pool_kernel, "tiers": tiers})
        print(runner.run_grid(model, tokenizer, spec, args.out, fail_fast=True))
        return

    def record(label: str, budget: float, cfg: mdkv.MixedDimKVConfig) -> None:
        STATS.clear()
        kl = kl_of(model, cfg, samples, full)
        kept, reduced = sum(s[0] for s in STATS), sum(s[1] for s in STATS)
        rows.append(dict(label=label, budget=budget, kl=kl, reduced_share=reduced / kept if kept else None))
        print(f"{label:44s} budget {budget:<5} KL {kl:.4f}", flush=True)

    kinds = args.bases.split(",")
    label = {"post": "post-RoPE", "pre": "pre-RoPE", "pairs": "RoPE pairs"}
    for split in ((1 / 4, 1 / 4), (1 / 2, 1 / 8), (1 / 4, 1 / 8), (1 / 8, 1 / 8)) if args.fixed_splits else ():
        for kind in kinds:
            policies.POLICIES[SIM] = make_policy(bases, rope, kind, split)
            record(f"fixed split k d/{round(1 / split[0])} v d/{round(1 / split[1])}, {label[kind]}", 0.05,
                   mdkv.MixedDimKVConfig(budget=0.05, method=SIM, pool_kernel=args.pool_kernel))
    for budget in map(float, args.budgets.split(",")):
        record("snapkv", budget, mdkv.MixedDimKVConfig(budget=budget, method="snapkv"))
        for kind in kinds:
            policies.POLICIES[SIM] = make_policy(bases, rope, kind, None)
            record(f"mixeddimkv allocation, {label[kind]}", budget,
                   mdkv.MixedDimKVConfig(budget=budget, method=SIM, pool_kernel=args.pool_kernel, tiers=tiers))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps(dict(model=args.model, pool_kernel=args.pool_kernel, tiers=tiers, samples=SAMPLES_NOTE, rows=rows),
                   indent=1)
    )


if __name__ == "__main__":
    main()
