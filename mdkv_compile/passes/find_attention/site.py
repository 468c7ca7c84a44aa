"""An attention site as the finder reports it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch.fx import Node

REWRITABLE = "rewritable"
SKIPPED = "skipped"


@dataclass
class AttentionSite:
    """One attention computation found in a Dynamo graph.

    q, k, v are graph nodes; k and v are *un-repeated* (before GQA repeat_kv / repeat_interleave),
    i.e. [B, H_kv, S, D] for HF-style layouts, and include the cache (past + new) when the graph
    reads one. `output` is the node whose uses a rewrite redirects; `replace` lists the nodes the
    site owns (repeat_kv, kᵀ, scale ops, scores .. output) in graph order, closed: once `output`'s
    uses are redirected every other node in it is dead. Only `status == "rewritable"` sites are
    guaranteed to have q, k, v set and every field meaningful.
    """

    kind: str  # "sdpa" | "manual"
    q: Node | None  # None only for "unrecognised attention pattern" sites (always skipped)
    k: Node | None
    v: Node | None
    mask: Node | None  # mask as the site consumes it (bool or additive), or None
    scale: float | None  # None: SDPA default 1/sqrt(head_dim); the traced value if scale_node is set
    is_causal: bool  # proven causal (see module docstring), never guessed
    output: Node
    replace: list[Node]
    layer: str  # readable location, e.g. "model.layers.0.self_attn"
    status: str = SKIPPED  # "rewritable" | "skipped"
    reason: str = ""  # why skipped ("" when rewritable)
    group_size: int = 1  # query heads per kv head (GQA/MQA); 1 for MHA
    k_new: Node | None = None  # this step's keys before the cache concat / buffer write
    v_new: Node | None = None
    kv_cache: str = "none"  # "none" | "concat" | "buffer"
    source: Node | None = None  # the common input of the q/k/v projections (self-attention)
    causal_proof: str = ""  # how is_causal was proven, e.g. "mask: kv_idx <= q_idx"
    padding_mask: bool = False  # the mask also has a per-key padding term from a graph input:
    # a rewrite must apply `mask`, not only causality
    mask_use: str | None = None  # how `mask` is applied: "allow" (bool, True = attend), "block"
    # (bool, True = masked out: masked_fill / where(m, -inf, s)) or "additive" (added to the scores)
    mask_terms: list[tuple[Node, str]] = field(default_factory=list)  # every (term, use) applied to
    # the scores, `mask` included (padding terms, biases); a rewrite must apply all of them
    scale_node: Node | None = None  # a symbolic scale (dynamic=True turns HF's float `scaling` into a
    # graph input): a rewrite must pass this node, `scale` only holds its traced value
    dropout_p: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)  # e.g. {"sliding_window": 4}

    @property
    def rewritable(self) -> bool:
        return self.status == REWRITABLE
