"""The verdict on one site: the proofs (self-attention, causality) and the first reason that
makes a rewrite unsafe."""

from __future__ import annotations

import re
from typing import Any

import torch
from torch.fx import Node

from mdkv_compile.passes.find_attention.chains import RawSite
from mdkv_compile.passes.find_attention.fx import graph_order, layer_of, root_class, shape, strip_casts
from mdkv_compile.passes.find_attention.gqa import unrepeat
from mdkv_compile.passes.find_attention.masks import NAMED, MaskCtx, mask_kind, padding_kind
from mdkv_compile.passes.find_attention.provenance import projection_sources
from mdkv_compile.passes.find_attention.site import REWRITABLE, SKIPPED, AttentionSite


def judge(raw: RawSite, ctx: MaskCtx, root: torch.nn.Module | None) -> AttentionSite:
    """The site `raw` with its proofs and status (rewritable, or skipped with the reason)."""
    k, v, group = _unrepeated_kv(raw)
    layer = layer_of(raw.output)
    site = AttentionSite(
        kind=raw.kind,
        q=raw.q,
        k=k,
        v=v,
        mask=raw.mask,
        scale=raw.scale,
        is_causal=False,
        output=raw.output,
        replace=_owned_nodes(raw, k, v),
        layer=layer,
        group_size=group,
        dropout_p=raw.dropout_p,
        scale_node=raw.scale_node,
    )
    sources = _prove_self_attention(site, raw)
    self_attn = site.source is not None
    mk = _read_masks(raw, ctx)
    site.mask = raw.mask
    site.causal_proof = _causal_proof(raw, mk, ctx, site, self_attn, root)
    site.is_causal = bool(site.causal_proof)
    site.mask_use = raw.mask_use if raw.mask is not None else None
    site.mask_terms = list(raw.terms) if raw.terms else ([(raw.mask, raw.mask_use)] if raw.mask is not None else [])
    site.padding_mask = ctx.padding
    _read_window(site, ctx, root)
    reason = _skip_reason(raw, site, mk, ctx, sources, root)
    site.status = SKIPPED if reason else REWRITABLE
    site.reason = reason
    return site


def _unrepeated_kv(raw: RawSite) -> tuple[Node, Node, int]:
    """k and v before the GQA repeat, and the number of query heads per kv head."""
    k, gk = unrepeat(strip_casts(raw.k_rep))
    v, gv = unrepeat(strip_casts(raw.v_rep))
    group = max(gk, gv)
    qs, ks = shape(raw.q), shape(k)
    if group == 1 and qs and ks and len(qs) == len(ks) == 4 and ks[1] and qs[1] % ks[1] == 0:
        group = qs[1] // ks[1]  # SDPA enable_gqa: heads differ without an explicit repeat
    return k, v, group


def _owned_nodes(raw: RawSite, k: Node, v: Node) -> list[Node]:
    """The site's nodes plus its repeat / transpose chains, kept only where they die with the
    site (a node with a user outside stays in the graph), in graph order."""
    replace = list(raw.replace)
    for rep, base in ((raw.k_rep, k), (raw.v_rep, v)):
        path: list[Node] = []
        n = rep
        while isinstance(n, Node) and n is not base and len(path) < 8:
            path.append(n)
            n = n.args[0] if n.args and isinstance(n.args[0], Node) else None
        if n is base:  # only a straight repeat/cast chain down to the un-repeated tensor
            replace.extend(p for p in path if p not in replace)
    owned = set(replace)
    changed = True
    while changed:
        changed = False
        for n in list(owned):
            if n is not raw.output and not set(n.users) <= owned:
                owned.discard(n)
                changed = True
    order = graph_order(raw.output.graph)
    return sorted(owned, key=order.__getitem__)


def _prove_self_attention(site: AttentionSite, raw: RawSite) -> tuple[set[Node], set[Node], set[Node]]:
    """Sets the site's cache fields, and `source` when q, k, v share one projection input;
    the projection inputs of q, k and v."""
    q_src, _, _ = projection_sources(raw.q, raw.output)
    k_src, k_cache, k_new = projection_sources(site.k, raw.output)  # type: ignore[arg-type]
    v_src, v_cache, v_new = projection_sources(site.v, raw.output)  # type: ignore[arg-type]
    site.kv_cache = k_cache if k_cache == v_cache else "mixed"
    site.k_new, site.v_new = k_new, v_new
    if bool(q_src) and q_src == k_src == v_src and len(q_src) == 1:
        site.source = next(iter(q_src))
    return q_src, k_src, v_src


def _read_masks(raw: RawSite, ctx: MaskCtx) -> str | None:
    """The polarity of the site's mask. With several terms on the scores (T5: + bias + mask) the
    causal one becomes `raw.mask`; the others must be padding, anything else is an additive bias."""
    ctx.reset()
    mk = mask_kind(raw.mask, ctx) if raw.mask is not None else None
    if len(raw.terms) > 1:
        kinds = [mask_kind(t, ctx) for t, _ in raw.terms]
        causal = [i for i, (k, (_, use)) in enumerate(zip(kinds, raw.terms, strict=True)) if k == use]
        pick = causal[0] if causal else 0
        raw.mask, raw.mask_use = raw.terms[pick]
        mk = kinds[pick]
        for i, (t, _) in enumerate(raw.terms):
            if i != pick and padding_kind(t, ctx) is None and kinds[i] != NAMED:
                ctx.has_bias = True
    return mk


def _causal_proof(
    raw: RawSite, mk: str | None, ctx: MaskCtx, site: AttentionSite, self_attn: bool, root: torch.nn.Module | None
) -> str:
    """How the site is proven causal, "" when it is not."""
    qs = shape(raw.q)
    lq = (qs or (0, 0))[-2] if qs and len(qs) >= 2 else None
    if raw.sdpa_causal:
        return "sdpa is_causal=True"
    if raw.mask is not None and mk is not None and mk == raw.mask_use:
        return ctx.proof or f"mask ({mk})"
    if raw.mask is not None and mk == NAMED and self_attn and _decoder_hint(raw.output, root, site.layer):
        return f"HF mask input '{_mask_root_name(raw.mask)}' in a causal decoder"
    if raw.mask is None and lq == 1 and site.kv_cache == "concat":
        return "single-query decode over a concatenated cache"
    return ""


def _read_window(site: AttentionSite, ctx: MaskCtx, root: torch.nn.Module | None) -> None:
    max_pos = getattr(getattr(root, "config", None), "max_position_embeddings", None)
    if ctx.window is not None and isinstance(max_pos, int) and ctx.window >= max_pos:
        # a window no shorter than the longest sequence the model accepts never drops a key
        site.causal_proof += f" (sliding window {ctx.window} >= max_position_embeddings {max_pos})"
        ctx.window = None
    if ctx.window is not None:
        site.extra["sliding_window"] = ctx.window


def _skip_reason(
    raw: RawSite,
    site: AttentionSite,
    mk: str | None,
    ctx: MaskCtx,
    sources: tuple[set[Node], set[Node], set[Node]],
    root: torch.nn.Module | None,
) -> str:
    """The first reason a rewrite would be unsafe, "" when there is none."""
    if raw.bad_layout:
        return f"unsupported layout: {raw.bad_layout}"
    if site.source is None:
        return _not_self_attention(*sources)
    if not site.is_causal:
        return _not_causal(raw, mk, ctx, _decoder_hint(raw.output, root, site.layer))
    if ctx.window is not None:
        return f"sliding-window mask (window={ctx.window}): the rewrite computes full causal attention"
    checks = (
        (ctx.has_bias, "additive attention bias (ALiBi / relative position) in the mask: not supported"),
        (not raw.scale_ok, "scale is not a compile-time constant"),
        (bool(raw.dropout_p), f"attention dropout p={raw.dropout_p} (training)"),
        (raw.probs_escape, "attention probabilities are used outside the site (output_attentions?)"),
        (site.kv_cache == "mixed", "k and v use different cache mechanisms"),
    )
    return next((reason for failed, reason in checks if failed), "")


def _not_self_attention(q_src: set[Node], k_src: set[Node], v_src: set[Node]) -> str:
    if q_src and k_src and q_src != k_src:
        return f"cross-attention: k/v come from {_names(k_src)}, not the query's input {_names(q_src)}"
    if k_src != v_src and k_src and v_src:
        return f"k and v come from different inputs ({_names(k_src)} vs {_names(v_src)})"
    return "cannot prove self-attention: no common projection input for q, k, v"


def _not_causal(raw: RawSite, mk: str | None, ctx: MaskCtx, declared_causal: bool) -> str:
    if raw.mask is None:
        return "bidirectional: no causal mask"
    if mk is None and ctx.note:
        return f"mask not provably causal: {ctx.note}"
    if mk is None and not declared_causal:
        return "bidirectional: no causal pattern in the mask (padding / full attention)"
    if mk is None:
        return "mask not readable: module is causal but no causal pattern found in its mask"
    if mk == NAMED:
        return "bidirectional: mask input in a module not declared causal"
    return f"mask polarity mismatch ({mk} mask used as {raw.mask_use})"


def _decoder_hint(site_node: Node, root: torch.nn.Module | None, layer: str) -> bool:
    """Is this attention module declared causal? (HF sets `is_causal` on attention modules.)"""
    if root is not None and layer:
        try:
            mod = root.get_submodule(layer)
            if hasattr(mod, "is_causal"):
                return bool(mod.is_causal)
        except AttributeError:
            pass
    cls = root_class(site_node)
    return cls is not None and bool(re.search(r"(ForCausalLM|LMHeadModel)$", cls.__name__))


def _names(nodes: set[Node]) -> str:
    return ", ".join(sorted(n.name for n in nodes))


def _mask_root_name(mask: Node) -> str:
    n: Any = mask
    for _ in range(20):
        if not isinstance(n, Node) or n.op == "placeholder":
            break
        n = next((a for a in n.args if isinstance(a, Node)), None)
    return n.name if isinstance(n, Node) else mask.name


def unrecognised(pv: Node, why: str) -> AttentionSite:
    """A softmax(..) @ v that looks like attention but whose chain is not understood: reported,
    always skipped."""
    return AttentionSite(
        kind="manual",
        q=None,
        k=None,
        v=None,
        mask=None,
        scale=None,
        is_causal=False,
        output=pv,
        replace=[],
        layer=layer_of(pv),
        status=SKIPPED,
        reason=f"unrecognised attention pattern: {why}",
    )
