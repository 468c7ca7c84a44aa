"""Research measurement (docs/notes/quality_notes.md, section 11): "span protection", unpooled
scoring for what a token keeps and pooled scoring for what losing it costs.

`mixeddimkv` prices every option of a token by its importance, max-pooled over 7 neighbours
(SnapKV's pool), which keeps the neighbours of an important token (the rest of a number) but
spends whole tokens on them. Unpooled scoring (`pool_kernel=1`) lowers KL by about a third and
loses digit-split needles (section 6). Here eviction keeps the pooled price while the reduced
tiers are priced by the token's own (unpooled) importance: a neighbour that matters only through
its span is expensive to drop and cheap to keep at a reduced tier, so the knapsack should keep
spans at low dims and spend whole tokens on what the window really reads.

    python benchmarks/research/span_protection.py --part kl --out results/research_prerope/span_kl.json
    python benchmarks/research/span_protection.py --part niah --out results/research_prerope/span_niah

KL: the 4 samples of `prerope_bases.py` (SmolLM2, CPU, calibrated bases, torch attention path).
NIAH: `mdkv eval`'s `niah` task at 4000 tokens, depths 0.25 / 0.5 / 0.75, both protocols.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from collections.abc import Iterator
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from prerope_bases import SAMPLES_NOTE, kl_of, kl_setup  # noqa: E402

import mdkv_compile as mdkv  # noqa: E402
from mdkv_compile import assets  # noqa: E402
from mdkv_compile.core.scoring import window_importance  # noqa: E402
from mdkv_compile.eval import runner  # noqa: E402
from mdkv_compile.hf.calibrate import calibrated_basis_file  # noqa: E402
from mdkv_compile.policies import mixeddim  # noqa: E402
from mdkv_compile.policies.base import LayerContext  # noqa: E402

BUDGETS = (0.02, 0.05, 0.1)


@contextlib.contextmanager
def span_protection() -> Iterator[None]:
    """Inside: `mixeddimkv`'s attention losses take the unpooled importance for every kept option
    and the pooled one for eviction (a token's loss stays non-increasing over the options: its own
    score is at most its pooled one). The torch scoring path only (kernel="torch")."""
    unpooled: dict[str, torch.Tensor] = {}
    importance, attention_losses = LayerContext.importance, mixeddim.attention_losses

    def both_scores(self: LayerContext, key: torch.Tensor | None = None) -> torch.Tensor:
        unpooled["last"] = window_importance(self.query, self.key if key is None else key, self.valid,
                                             self.cfg.window, 1, self.scale, self.softcap)
        return importance(self, key)

    def span_losses(pooled: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        losses = attention_losses(unpooled["last"], *args, **kwargs)
        losses[..., 0] = pooled.float()  # option (0, 0): eviction
        return losses

    LayerContext.importance, mixeddim.attention_losses = both_scores, span_losses
    try:
        yield
    finally:
        LayerContext.importance, mixeddim.attention_losses = importance, attention_losses


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--part", choices=("kl", "niah"), required=True)
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args()
    if args.part == "kl":
        model, tokenizer, samples, full = kl_setup("smollm2")
        calibrated = dict(basis="calibrated", basis_path=str(calibrated_basis_file(model, tokenizer, "smollm2")),
                          kernel="torch")
        rows = []
        for budget in BUDGETS:
            cfg = mdkv.MixedDimKVConfig(budget=budget, **calibrated)
            with span_protection():
                kl = kl_of(model, cfg, samples, full)
            rows.append(dict(label="mixeddimkv, span protection", budget=budget, kl=kl))
            print(f"mixeddimkv, span protection  budget {budget:<5} KL {kl:.4f}", flush=True)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(dict(model="smollm2", samples=SAMPLES_NOTE, rows=rows), indent=1))
        return
    torch.set_num_threads(2)
    model, tokenizer = assets.load_model("smollm2")
    spec = runner.EvalSpec(model_name="smollm2", methods=["mixeddimkv"], budgets=[0.05, 0.1], tasks=["niah"],
                           lengths=[4000], depths=[0.25, 0.5, 0.75], seeds=[1],
                           protocols=["query-agnostic", "query-aware"], basis="calibrated",
                           calibrated_path=str(calibrated_basis_file(model, tokenizer, "smollm2")),
                           options={"kernel": "torch"})
    with span_protection():
        print(runner.run_grid(model, tokenizer, spec, args.out, fail_fast=True))


if __name__ == "__main__":
    main()
