"""Research measurement (docs/notes/quality_notes.md, section 10): two more levers for issue 13,
measured with the product's own policies on the 4 samples of `prerope_bases.py` (SmolLM2, CPU,
KL(full || method) of 128 teacher-forced tokens after a compressed 2048-token prefix, calibrated
bases, the torch attention path).

* `--part scoring`: "observed" importance, the attention every key receives from all the prompt's
  queries, averaged over the queries that can see it (kvpress's ObservedAttentionPress, the best
  press on our KL measure), in place of the last 32 queries' (SnapKV's window), for `snapkv` and
  `mixeddimkv`, max-pool 7 and 1. The window stays forced whole either way.
* `--part tiers`: reduced tiers with very few value dims ((d/2, d/2), (d/4, d/16), (d/8, d/64) and
  (d/2, d/2), (d/4, d/8), (d/8, d/32), (d/16, d/64)) against the default tiers: whether cheap tokens
  that keep mostly their key (their attention mass) pay; and the other way, "wide values"
  ((d/2, d/2), (d/4, d/4), (d/8, d/4), (d/8, d/8)), the set that did best with pre-RoPE keys.

    python benchmarks/research/scoring_and_tiers.py --part scoring --out results/research_prerope/scoring.json
    python benchmarks/research/scoring_and_tiers.py --part tiers --out results/research_prerope/tiers.json
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from prerope_bases import SAMPLES_NOTE, kl_of, kl_setup  # noqa: E402

import mdkv_compile as mdkv  # noqa: E402
from mdkv_compile.core.scoring import softcap_logits, window_importance  # noqa: E402
from mdkv_compile.hf.calibrate import calibrated_basis_file  # noqa: E402
from mdkv_compile.policies import base as policy_base  # noqa: E402

BUDGETS = (0.02, 0.05, 0.1)


def observed_importance(
    query: torch.Tensor, key: torch.Tensor, valid: torch.Tensor, window: int, pool_kernel: int,
    scale: float | None = None, softcap: float | None = None, block: int = 256,
) -> torch.Tensor:
    """`window_importance`'s signature and output [B, H, N], from every valid prompt query (causal),
    each key's received attention summed over query blocks of `block` rows and divided by the
    number of valid queries that see it; `window` is unused (the callers still force it whole)."""
    bsz, n_q_heads, n_tokens, head_dim = query.shape
    n_kv_heads = key.shape[1]
    group = n_q_heads // n_kv_heads
    scale = 1.0 / math.sqrt(head_dim) if scale is None else scale
    key_f = key.float()
    positions = torch.arange(n_tokens, device=key.device)
    total = torch.zeros(bsz, n_kv_heads, n_tokens, device=key.device)
    for start in range(0, n_tokens, block):
        q = query[:, :, start : start + block].float().view(bsz, n_kv_heads, group, -1, head_dim)
        logits = softcap_logits(torch.einsum("bhgwd,bhnd->bhgwn", q, key_f) * scale, softcap)
        rows = positions[start : start + block]
        allowed = (positions[None, :] <= rows[:, None])[None, None, None] & valid[:, None, None, None, :]
        probs = torch.softmax(logits.masked_fill(~allowed, float("-inf")), -1).nan_to_num(0.0)
        total += (probs * valid[:, None, None, start : start + block, None]).sum((2, 3))
    seen_by = valid.flip(-1).cumsum(-1).flip(-1).float().clamp_min(1)  # valid queries at positions >= j
    scores = total / (group * seen_by[:, None, :])
    if pool_kernel > 1:
        scores = F.max_pool1d(scores.reshape(bsz * n_kv_heads, 1, n_tokens), pool_kernel, stride=1,
                              padding=pool_kernel // 2)[..., :n_tokens].reshape(bsz, n_kv_heads, n_tokens)
    return scores.masked_fill(~valid[:, None, :], 0.0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--part", choices=("scoring", "tiers"), required=True)
    p.add_argument("--tier-sets", default=None, help="comma list of the tier sets to run (default: all)")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args()
    model, tokenizer, samples, full = kl_setup("smollm2")
    calibrated = dict(basis="calibrated", basis_path=str(calibrated_basis_file(model, tokenizer, "smollm2")),
                      kernel="torch")
    rows = []

    def record(label: str, cfg: mdkv.MixedDimKVConfig, **extra) -> None:
        kl = kl_of(model, cfg, samples, full)
        rows.append(dict(label=label, budget=cfg.budget, kl=kl, **extra))
        print(f"{label:40s} budget {cfg.budget:<5} KL {kl:.4f}", flush=True)

    if args.part == "scoring":
        try:
            for scoring, fn in (("window", window_importance), ("observed", observed_importance)):
                policy_base.window_importance = fn  # what LayerContext.importance calls on the torch path
                for pool in (7, 1):
                    for budget in BUDGETS:
                        for method in ("snapkv", "mixeddimkv"):
                            record(f"{method}, {scoring}, pool {pool}",
                                   mdkv.MixedDimKVConfig(budget=budget, method=method, pool_kernel=pool, **calibrated),
                                   scoring=scoring, pool=pool, method=method)
        finally:
            policy_base.window_importance = window_importance
    else:
        d = model.config.head_dim
        tier_sets = {"default": None,
                     "few value dims A": ((d // 2, d // 2), (d // 4, d // 16), (d // 8, d // 64)),
                     "few value dims B": ((d // 2, d // 2), (d // 4, d // 8), (d // 8, d // 32), (d // 16, d // 64)),
                     "wide values": ((d // 2, d // 2), (d // 4, d // 4), (d // 8, d // 4), (d // 8, d // 8))}
        for name, tiers in tier_sets.items():
            if args.tier_sets and name not in args.tier_sets.split(","):
                continue
            for budget in BUDGETS:
                record(f"mixeddimkv, tiers {name}", mdkv.MixedDimKVConfig(budget=budget, tiers=tiers, **calibrated),
                       tiers=tiers)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(dict(model="smollm2", samples=SAMPLES_NOTE, part=args.part, rows=rows), indent=1))


if __name__ == "__main__":
    main()
