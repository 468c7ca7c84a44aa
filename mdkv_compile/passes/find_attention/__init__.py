"""Find attention in Dynamo (torch-level) FX graphs.

The compile pass rewrites causal self-attention sites into `mdkv` operators. This package only
*finds* them and decides whether a rewrite is safe; it never mutates the graph. A site is
"rewritable" only when three facts are proven from the graph itself:

1. self-attention: q, k and v are projected from the same input tensor node (through linear /
   view / transpose / RoPE ops, a KV-cache concat, or a write into a static KV buffer);
2. causality: SDPA `is_causal=True`, a mask built by a recognised causal pattern (index
   comparison `kv_idx <= q_idx`, tril/triu, a lower-triangular buffer), a single-query decode
   step over a concatenated cache, or an HF mask input in a causal decoder;
3. the site is plain attention: constant scale, no dropout, no additive bias (ALiBi / relative
   position) in the mask, probabilities not consumed elsewhere.

Everything else is reported as "skipped" with the first reason that failed.
See docs/compile_pass.md.

Modules, bottom up: fx (the canonical-op table, readers of traced values), values (constants),
provenance (self-attention: projections through caches), masks (causality: mask polarity
rules), scale, gqa, chains (site shapes: SDPA and the manual chain), verdict (proofs and skip
reasons), site (AttentionSite).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch.fx import GraphModule

from mdkv_compile.passes.find_attention.chains import RawSite, manual_site, sdpa_site, softmax_feeds_product
from mdkv_compile.passes.find_attention.fx import is_op
from mdkv_compile.passes.find_attention.masks import MaskCtx
from mdkv_compile.passes.find_attention.site import AttentionSite
from mdkv_compile.passes.find_attention.verdict import judge, unrecognised

__all__ = ["AttentionSite", "find_attention_sites"]


def find_attention_sites(
    gm: GraphModule,
    example_inputs: Sequence[Any] | None = None,
    root: torch.nn.Module | None = None,
) -> list[AttentionSite]:
    """All attention sites in a Dynamo graph, in graph order.

    `example_inputs` (what a torch.compile backend receives) lets the finder read lifted buffers,
    e.g. to verify that a `bias` / `causal_mask` buffer really is lower-triangular.
    `root` (the compiled nn.Module) lets it read attention modules' `is_causal` flag, needed to
    trust an HF attention-mask *input* (a graph placeholder) as causal.
    """
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    ctx = MaskCtx(example_inputs, placeholders)
    sites: list[AttentionSite] = []
    for n in gm.graph.nodes:
        raw: RawSite | None = None
        why: list[str] = []
        if is_op(n, "sdpa"):
            raw = sdpa_site(n)
        elif is_op(n, "softmax"):
            raw = manual_site(n, why)
            if raw is None and (pv := softmax_feeds_product(n)) is not None:
                # looks like attention (softmax(..) @ v) but the chain is not understood: report it
                sites.append(unrecognised(pv, why[0] if why else "chain not understood"))
        if raw is not None:
            sites.append(judge(raw, ctx, root))
    return sites
