"""The `mixeddimkv` torch.compile backend.

    model = torch.compile(model, backend="mixeddimkv", options={"budget": 0.25})

(`options` are `MixedDimKVConfig` fields.) The backend is found through the
`torch_dynamo_backends` entry point in pyproject.toml; it is not registered again here, since a
second registration under the same name trips Dynamo's duplicate-name assert.

Per Dynamo graph: find attention sites (passes/find_attention.py), replace every rewritable
site whose keys come through a concat cache (HF DynamicCache, tuple pasts, hand-written
`torch.cat` caches) by `mdkv::site_attention`, leave every other site as it is (logged with the
reason), then hand the graph to Inductor. Where the compressed state lives and why:
docs/compile_pass.md, "The mixeddimkv backend".
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx

from mdkv_compile.config import MixedDimKVConfig
from mdkv_compile.ops import library  # registers the mdkv ops
from mdkv_compile.passes.find_attention import AttentionSite, find_attention_sites

log = logging.getLogger(__name__)


@dataclass
class RewriteReport:
    """What the backend did to one graph (kept in `LAST_REPORTS` for tests and `explain`)."""

    rewritten: list[str] = field(default_factory=list)  # site keys
    left: list[tuple[str, str]] = field(default_factory=list)  # (location, reason)


# Reports of the graphs compiled most recently (newest last; bounded).
LAST_REPORTS: list[RewriteReport] = []


def _val(node: Any) -> Any:
    return node.meta.get("example_value", node.meta.get("val")) if isinstance(node, torch.fx.Node) else None


def _why_not(site: AttentionSite) -> str | None:
    """Why a finder-rewritable site is still left alone by this backend (None: rewrite it)."""
    if site.kv_cache == "none":
        return "no KV cache in the graph: nothing to compress (exact attention kept)"
    if site.kv_cache != "concat":
        return f"kv cache kind {site.kv_cache!r} not supported by the backend yet (static buffers)"
    if site.k_new is None or site.v_new is None:
        return "new keys/values of the cache concat not identified"
    shapes = [_val(n) for n in (site.q, site.k, site.v, site.k_new, site.v_new, site.output)]
    if any(not isinstance(s, torch.Tensor) or s.dim() != 4 for s in shapes):
        return "unsupported layout: q/k/v/output not rank 4 [B, H, L, d]"
    if len(site.mask_terms) > 1:
        return "several mask terms on the scores"
    if site.mask is not None and site.mask_use not in ("allow", "block", "additive"):
        return f"mask use {site.mask_use!r}"
    return None


def _site_key(cfg_text: str, site: AttentionSite, index: int) -> str:
    digest = hashlib.sha1(cfg_text.encode()).hexdigest()[:8]
    return f"{digest}:{site.layer or index}"


def rewrite_graph(
    gm: torch.fx.GraphModule, example_inputs: Sequence[Any], cfg: MixedDimKVConfig
) -> RewriteReport:
    """Replace the rewritable sites of `gm` in place by `mdkv::site_attention`."""
    report = RewriteReport()
    sites = find_attention_sites(gm, example_inputs)
    todo: list[AttentionSite] = []
    for i, site in enumerate(sites):
        reason = site.reason if not site.rewritable else _why_not(site)
        if reason is None:
            todo.append(site)
        else:
            report.left.append((site.layer or f"site {i}", reason))
    cfg_text = library.cfg_to_json(cfg)
    graph = gm.graph
    for layer_idx, site in enumerate(todo):
        key = _site_key(cfg_text, site, layer_idx)
        library.register_site(key, cfg, layer_idx, len(todo))
        out_val = _val(site.output)
        with graph.inserting_before(site.output):
            mask = site.mask
            if mask is not None and site.mask_use == "block":
                mask = graph.call_function(torch.logical_not, (mask,))
            # The cache layer reads masks as [B, 1|H, L, S] (padding from the last row): lift a
            # broadcast [L, S] or [B, L, S] mask to rank 4.
            for _ in range(4 - _val(site.mask).dim() if site.mask is not None else 0):
                mask = graph.call_function(torch.unsqueeze, (mask, 0))
            scale = site.scale_node if site.scale_node is not None else site.scale
            new = graph.call_function(
                torch.ops.mdkv.site_attention.default,
                (site.q, site.k, site.v, site.k_new, site.v_new, mask, scale, key),
            )
            if _val(site.q).dtype != out_val.dtype:
                new = graph.call_function(torch.Tensor.to, (new, out_val.dtype))
        site.output.replace_all_uses_with(new)
        for node in reversed(site.replace):
            if not node.users:
                graph.erase_node(node)
        report.rewritten.append(key)
    graph.lint()
    gm.recompile()
    LAST_REPORTS.append(report)
    del LAST_REPORTS[:-16]
    for location, reason in report.left:
        log.info("mixeddimkv: left %s alone: %s", location, reason)
    return report


def mixeddimkv_backend(
    gm: torch.fx.GraphModule,
    example_inputs: Sequence[Any],
    *,
    mode: str | None = None,
    options: dict[str, Any] | None = None,
) -> Callable[..., Any]:
    """torch.compile backend: MixedDimKV rewrite of the attention sites, then Inductor.
    `options` are MixedDimKVConfig fields; `mode` is passed on to Inductor."""
    from torch._inductor.compile_fx import compile_fx

    cfg = MixedDimKVConfig.from_options(options)
    rewrite_graph(gm, example_inputs, cfg)
    if mode is not None:
        from torch._inductor import list_mode_options

        with torch._inductor.config.patch(list_mode_options(mode)):
            return compile_fx(gm, list(example_inputs))
    return compile_fx(gm, list(example_inputs))




def compile_model(model: torch.nn.Module, cfg: MixedDimKVConfig | None = None) -> torch.nn.Module:
    """Compile `model` in place with the mixeddimkv backend under `cfg` (for models that
    `mdkv.patch` cannot reach: hand-written decoders, attention outside transformers' registry).
    Returns the model. Sites the finder cannot prove causal stay exact (see LAST_REPORTS)."""
    import dataclasses

    cfg = cfg or MixedDimKVConfig()
    model.compile(backend="mixeddimkv", options=dataclasses.asdict(cfg))
    return model


__all__ = ["LAST_REPORTS", "RewriteReport", "compile_model", "mixeddimkv_backend", "rewrite_graph"]
