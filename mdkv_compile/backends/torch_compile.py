"""The `mixeddimkv` torch.compile backend.

    model = torch.compile(model, backend="mixeddimkv", options={"budget": 0.25})

(`options` are `MixedDimKVConfig` fields.) The backend is found through the
`torch_dynamo_backends` entry point in pyproject.toml; it is not registered again here, since a
second registration under the same name trips Dynamo's duplicate-name assert.

Per Dynamo graph: find attention sites (passes/find_attention/), replace every rewritable
site whose keys come through a concat cache (HF DynamicCache, tuple pasts, hand-written
`torch.cat` caches) by `mdkv::site_attention`, give the model's own cache zero-stride shape
placeholders instead of the concatenated keys/values (the concats are erased); replace every
rewritable site whose keys are a static KV buffer written in place at a position tensor (gpt-fast,
torchtune, HF StaticCache: `buf.index_copy_(2, pos, k)`, `buf[:, :, pos] = k`) by
`mdkv::site_attention_buffer` (the write stays: the buffer is the model's; the op does not read
it); leave every other site as it is (logged with the reason), then hand the graph to Inductor. The compressed state
lives in a per-site registry (`compiled_cache_bytes()`, `reset_sites()`); where and why:
docs/compile_pass.md, "The mixeddimkv backend".
"""

from __future__ import annotations

import dataclasses
import logging
import operator
import types
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx

from mdkv_compile.backends.site_graphs import SiteGraphs, written_inputs
from mdkv_compile.config import MixedDimKVConfig
from mdkv_compile.passes.find_attention import AttentionSite, find_attention_sites
from mdkv_compile.passes.graph_writes import buffer_write, node_value
from mdkv_compile.passes.sites import (  # importing it registers the mdkv site ops
    compiled_cache_bytes,
    compiled_full_bytes,
    register_site,
    reset_sites,
    site_key_prefix,
    site_layers,
)

log = logging.getLogger(__name__)


@dataclass
class RewriteReport:
    """What the backend did to one graph (kept in `LAST_REPORTS` for tests and `explain`)."""

    rewritten: list[str] = field(default_factory=list)  # site keys
    left: list[tuple[str, str]] = field(default_factory=list)  # (location, reason)
    # Rewritten sites whose cache concats were erased, or whose static buffers the cache allocates
    # in the graph (transformers' StaticCache): the graph returns shape placeholders (zero-stride
    # zeros of the concat's or buffer's shape) to the model's own cache instead.
    placeholders: list[str] = field(default_factory=list)  # site keys
    # Rewritten sites whose concats or own buffers stay (the model's cache keeps full keys/values), and why.
    kept_cache: list[tuple[str, str]] = field(default_factory=list)  # (site key, reason)
    # Rewritten sites whose cache is a static KV buffer written in place; the site op only gets the
    # written values and positions. A buffer that is the caller's memory (a module buffer, a cache
    # allocated before compiling) keeps its write and stays truthful.
    buffers: list[str] = field(default_factory=list)  # site keys
    # Rewritten sites whose query length is 1 in this graph (a decode step); the buffer sites among
    # them are CUDA-graph capturable. Any other site may compress a prompt.
    one_token: list[str] = field(default_factory=list)  # site keys


# Reports of the graphs compiled most recently (newest last; bounded).
LAST_REPORTS: list[RewriteReport] = []


def _concat_past(cat: torch.fx.Node, new: torch.fx.Node | None) -> torch.fx.Node | None:
    """The past part of `cat` when it is `torch.cat([past, new], dim=-2)` of rank 4 (past [B, H, S, d]
    or the legacy empty 1-D tensor of HF DynamicLayer's first step), else None."""
    if cat.op != "call_function" or cat.target is not torch.cat or new is None:
        return None
    parts = cat.args[0] if cat.args else cat.kwargs.get("tensors")
    dim = cat.args[1] if len(cat.args) > 1 else cat.kwargs.get("dim", 0)
    if not isinstance(parts, (list, tuple)) or len(parts) != 2 or parts[1] is not new or not isinstance(dim, int):
        return None
    past, out = parts[0], node_value(cat)
    if not isinstance(past, torch.fx.Node) or not isinstance(out, torch.Tensor) or out.dim() != 4 or dim % 4 != 2:
        return None
    pv = node_value(past)
    if not isinstance(pv, torch.Tensor):
        return None
    # shape[0] of a symbolic 1-D tensor is a SymInt: compare only plain ints (no guard installed)
    if pv.dim() == 4 or (pv.dim() == 1 and isinstance(pv.shape[0], int) and pv.shape[0] == 0):
        return past
    return None


# Uses of a tensor that only read its metadata (the placeholder has the same shape, dtype, device).
_SHAPE_METHODS = {"size", "dim", "numel", "ndimension", "nelement"}
_SHAPE_ATTRS = {"shape", "dtype", "device", "ndim", "is_cuda"}


def _shape_only(user: torch.fx.Node) -> bool:
    if user.op == "call_method" and user.target in _SHAPE_METHODS:
        return True
    if user.op == "call_function" and user.target is getattr and len(user.args) > 1:
        return user.args[1] in _SHAPE_ATTRS
    return user.op == "call_function" and user.target in (
        torch.ops.aten.sym_size.int, torch.ops.aten.sym_numel.default, torch.numel,
    )


def _placeholder(graph: torch.fx.Graph, cat: torch.fx.Node, past: torch.fx.Node, new: torch.fx.Node) -> torch.fx.Node:
    """Nodes (inserted before `cat`) building zeros of `cat`'s shape, dtype and device that hold
    one token: `zeros_like(new[:, :, :1]).expand(-1, -1, S_past + S_new, -1)` (stride 0 on the
    sequence dim). Sizes are read from `past` and `new`, never from `cat`, so `cat` can die."""
    out = node_value(cat)
    with graph.inserting_before(cat):
        one = graph.call_method("narrow", (new, -2, 0, 1))
        base = graph.call_function(
            torch.zeros_like, (one,), {"dtype": out.dtype, "memory_format": torch.contiguous_format}
        )
        length = graph.call_method("size", (new, -2))
        if node_value(past).dim() == 4:
            length = graph.call_function(operator.add, (graph.call_method("size", (past, -2)), length))
        return graph.call_method("expand", (base, -1, -1, length, -1))


def _erase_dead(graph: torch.fx.Graph, node: torch.fx.Node) -> None:
    """Erase `node` and then every input of it left without users (pure calls only)."""
    stack = [node]
    while stack:
        n = stack.pop()
        if n.users or n.op not in ("call_function", "call_method") or n.is_impure():
            continue
        inputs = list(n.all_input_nodes)
        graph.erase_node(n)
        stack.extend(inputs)


def _replace_cache(
    graph: torch.fx.Graph, site: AttentionSite, pasts: tuple[torch.fx.Node, torch.fx.Node]
) -> str | None:
    """After the site is rewritten: give every use of the site's cache concats that escapes the
    graph (outputs: what Dynamo writes back into a DynamicCache layer, a returned past tuple) a
    shape placeholder instead, and erase the concats. Returns why not (None: done). Nothing is
    changed when a concat has a use that reads its values inside the graph."""
    cats = (site.k, site.v)
    for cat in cats:
        others = [u for u in cat.users if u.op != "output" and not _shape_only(u)]
        if others:
            return f"the cache concat {cat.name} is also read by {others[0].name} ({others[0].target}) in the graph"
    for cat, past, new in zip(cats, pasts, (site.k_new, site.v_new), strict=True):
        if not cat.users:
            _erase_dead(graph, cat)
            continue
        ph = _placeholder(graph, cat, past, new)
        for user in list(cat.users):
            user.replace_input_with(cat, ph)
        _erase_dead(graph, cat)
    return None


# In-graph allocations a static KV buffer can come from (transformers' StaticLayer allocates its
# buffers with torch.zeros inside the first compiled call).
_ALLOCATIONS = {torch.zeros, torch.empty, torch.full}
_ALLOCATION_METHODS = {"new_zeros", "new_empty", "new_full"}


def _own_buffer(buf: torch.fx.Node) -> bool:
    """Whether a static KV buffer is the backend's to shrink: allocated in this graph (transformers'
    StaticCache allocates its buffers inside the first compiled call), or the zero-stride
    placeholder an earlier graph returned in place of such a buffer. Any other buffer is the
    caller's memory (a module buffer, a cache allocated before compiling): it keeps its writes and
    stays truthful."""
    if buf.op == "call_function" and buf.target in _ALLOCATIONS:
        return True
    if buf.op == "call_method" and buf.target in _ALLOCATION_METHODS:
        return True
    value = node_value(buf)
    return buf.op == "placeholder" and value.stride(2) == 0 and value.shape[2] > 1


def _drop_buffer(graph: torch.fx.Graph, buf: torch.fx.Node, write: torch.fx.Node) -> str | None:
    """After a buffer site is rewritten (the op reads the written values, never the buffer), for a
    buffer of `_own_buffer`: erase the site's write into it and, if it is allocated here, have the
    graph return a zero-stride placeholder of its shape (one position of storage) instead, so the
    cache holds no full-size KV; the next graphs get the placeholder as their input and their
    writes into it are erased the same way. Returns why not (None: done); nothing is changed when
    something else in the graph reads the buffer."""
    others = [u for u in buf.users if u is not write and u.op != "output" and not _shape_only(u)]
    if others:
        return f"the KV buffer {buf.name} is also read by {others[0].name} ({others[0].target})"
    write.replace_all_uses_with(buf)  # an in-place write returns its buffer
    graph.erase_node(write)
    if buf.op != "placeholder":
        with graph.inserting_before(buf.next):  # in order, right after the allocation
            one = graph.call_method("narrow", (buf, 2, 0, 1))
            base = graph.call_function(torch.zeros_like, (one,), {"memory_format": torch.contiguous_format})
            placeholder = graph.call_method("expand", (base, -1, -1, graph.call_method("size", (buf, 2)), -1))
        buf.replace_all_uses_with(placeholder, delete_user_cb=lambda user: user.op == "output")
    return None


def _why_not(site: AttentionSite) -> str | None:
    """Why a finder-rewritable site is still left alone by this backend (None: rewrite it)."""
    if site.kv_cache == "none":
        return "no KV cache in the graph: nothing to compress (exact attention kept)"
    if site.kv_cache not in ("concat", "buffer"):
        return f"kv cache kind {site.kv_cache!r} not supported by the backend"
    if site.k_new is None or site.v_new is None:
        return "new keys/values of the cache not identified"
    shapes = [node_value(n) for n in (site.q, site.k, site.v, site.k_new, site.v_new, site.output)]
    if any(not isinstance(s, torch.Tensor) or s.dim() != 4 for s in shapes):
        return "unsupported layout: q/k/v/output not rank 4 [B, H, L, d]"
    if site.kv_cache == "buffer":
        if site.mask is None:
            return "static KV buffer without a mask (the unwritten positions of the buffer would be read)"
        writes = [buffer_write(buf, site.output) for buf in (site.k, site.v)]
        for w in writes:
            if isinstance(w, str):
                return w
        if writes[0][1] is not writes[1][1]:
            return "keys and values are written into their buffers at different position tensors"
    elif _concat_past(site.k, site.k_new) is None or _concat_past(site.v, site.v_new) is None:
        return "keys/values are not directly torch.cat([past, new], dim=-2) of rank 4"
    if len(site.mask_terms) > 1:
        return "several mask terms on the scores"
    if site.mask is not None and site.mask_use not in ("allow", "block", "additive"):
        return f"mask use {site.mask_use!r}"
    return None


def _site_key(cfg: MixedDimKVConfig, site: AttentionSite, index: int) -> str:
    return f"{site_key_prefix(cfg)}{site.layer or index}"


def traced_module() -> torch.nn.Module | None:
    """The module whose code Dynamo is compiling right now (the `self` of the traced frame: the
    model for `model.compile()` and `torch.compile(model)`), or None outside a Dynamo compile.
    A backend only gets the graph; the module tells the finder which attention modules declare
    themselves causal, which it needs to trust a mask that is a graph input (transformers builds
    the decode step's mask outside the model for a static cache in `generate()`)."""
    try:
        from torch._dynamo.symbolic_convert import InstructionTranslator

        tx = InstructionTranslator.current_tx()
    except (ImportError, AttributeError):  # Dynamo internals moved: fall back to the graph alone
        return None
    root = getattr(tx, "f_locals", {}).get("self") if tx is not None else None
    return root if isinstance(root, torch.nn.Module) else None


def rewrite_graph(
    gm: torch.fx.GraphModule,
    example_inputs: Sequence[Any],
    cfg: MixedDimKVConfig,
    fixed_region: bool = False,
    root: torch.nn.Module | None = None,
) -> RewriteReport:
    """Replace the rewritable sites of `gm` in place by `mdkv::site_attention` (concat caches) or
    `mdkv::site_attention_buffer` (static KV buffers; with `fixed_region`, decoded tokens go to a
    fixed region written at a device count, which CUDA graphs need: see backends/site_graphs.py).
    `root`: the compiled module (`traced_module()`), for the finder's causality proofs."""
    report = RewriteReport()
    sites = find_attention_sites(gm, example_inputs, root)
    todo: list[AttentionSite] = []
    for i, site in enumerate(sites):
        reason = site.reason if not site.rewritable else _why_not(site)
        if reason is None:
            todo.append(site)
        else:
            report.left.append((site.layer or f"site {i}", reason))
    graph = gm.graph
    for layer_idx, site in enumerate(todo):
        key = _site_key(cfg, site, layer_idx)
        buffer = site.kv_cache == "buffer"
        if buffer:
            (k_write, positions, k_new), (v_write, _, v_new) = (
                buffer_write(site.k, site.output), buffer_write(site.v, site.output)
            )
        else:
            pasts = (_concat_past(site.k, site.k_new), _concat_past(site.v, site.v_new))
        register_site(key, cfg, layer_idx, len(todo))
        out_val = node_value(site.output)
        with graph.inserting_before(site.output):
            mask = site.mask
            if mask is not None and site.mask_use == "block":
                mask = graph.call_function(torch.logical_not, (mask,))
            # The cache layer reads masks as [B, 1|H, L, S] (padding from the last row): lift a
            # broadcast [L, S] or [B, L, S] mask to rank 4.
            for _ in range(4 - node_value(site.mask).dim() if site.mask is not None else 0):
                mask = graph.call_function(torch.unsqueeze, (mask, 0))
            scale = site.scale_node if site.scale_node is not None else site.scale
            if buffer:  # the write into the buffer stays; the op gets what it writes and where
                new = graph.call_function(
                    torch.ops.mdkv.site_attention_buffer.default,
                    (site.q, k_new, v_new, positions, mask, scale, key, fixed_region),
                )
            else:
                new = graph.call_function(
                    torch.ops.mdkv.site_attention.default,
                    (site.q, pasts[0], pasts[1], site.k_new, site.v_new, mask, scale, key, False),
                )
            op = new
            if node_value(site.q).dtype != out_val.dtype:
                new = graph.call_function(torch.Tensor.to, (new, out_val.dtype))
        site.output.replace_all_uses_with(new)
        for node in reversed(site.replace):
            if not node.users:
                graph.erase_node(node)
        report.rewritten.append(key)
        n_queries = node_value(site.q).shape[-2]
        if isinstance(n_queries, int) and n_queries == 1:  # not a SymInt: only ever a one-token step
            report.one_token.append(key)
        if buffer:
            report.buffers.append(key)
            owned = [(buf, w) for buf, w in ((site.k, k_write), (site.v, v_write)) if _own_buffer(buf)]
            why = next((r for r in (_drop_buffer(graph, buf, w) for buf, w in owned) if r), None)
            if why is not None:
                report.kept_cache.append((key, why))
            elif owned:
                report.placeholders.append(key)
            continue
        why = _replace_cache(graph, site, pasts)
        if why is None:
            op.update_arg(8, True)  # the next call's past must be this graph's placeholder
            report.placeholders.append(key)
        else:
            report.kept_cache.append((key, why))
    graph.lint()
    gm.recompile()
    LAST_REPORTS.append(report)
    del LAST_REPORTS[:-16]
    for location, reason in report.left:
        log.info("mixeddimkv: left %s alone: %s", location, reason)
    for key, reason in report.kept_cache:
        log.info("mixeddimkv: %s: the model's cache keeps full keys/values: %s", key, reason)
    return report


def mixeddimkv_backend(
    gm: torch.fx.GraphModule,
    example_inputs: Sequence[Any],
    *,
    mode: str | None = None,
    options: dict[str, Any] | None = None,
) -> Callable[..., Any]:
    """torch.compile backend: MixedDimKV rewrite of the attention sites, then Inductor.
    `options` are MixedDimKVConfig fields, plus `"mode"` (torch.compile refuses `mode=` beside
    `options=`); `mode` is passed on to Inductor, except that `"reduce-overhead"` captures decode
    steps itself (backends/site_graphs.py)."""
    if options and "mode" in options:
        options = dict(options)
        mode = options.pop("mode")
    cfg = MixedDimKVConfig.from_options(options)
    graphs = mode == "reduce-overhead"
    root = traced_module()
    report = rewrite_graph(gm, example_inputs, cfg, fixed_region=graphs, root=root)
    if set(report.rewritten) - set(report.one_token):
        # A graph that may compress a prompt: Inductor's buffer reuse would keep its largest buffers
        # (the MLP's) allocated from layer to layer, under the site ops' compression temporaries;
        # freed after their last use, the allocator hands their memory to the compression instead
        # (CPU, 4-layer Llama, 2 x 4096 tokens: prefill peak 152 -> 129 MB with the default cache,
        # 138 -> 97 MB with the static one, against plain generate()'s 146; docs/notes/gpu_notes.md
        # section 10).
        return _inductor(gm, example_inputs, mode, allow_buffer_reuse=False)
    # from here on every rewritten site is a one-token decode step
    if graphs and report.rewritten and report.buffers == report.rewritten and cfg.kernel == "auto":
        # Inductor's own CUDA graphs are never turned on: a replay would skip the site ops' Python
        # state (stale state on the next prompt), and on graphs that write a cache the graphs
        # allocated they crash (segfault after "skipping cudagraphs due to mutated inputs":
        # pytorch/pytorch#192748). Decode steps over static KV buffers get this package's capture.
        written = written_inputs(gm)  # before Inductor, which may change the graph
        return SiteGraphs(_inductor(gm, example_inputs, mode), report.rewritten, written)
    if graphs and not report.rewritten and _replay_fixed_region_steps(root):
        log.info("mixeddimkv: a patched model's graph runs without CUDA graphs of its own; from its next generate() "
                 "call, decode steps over a fixed-region MixedDimCache are replayed whole (GenerateSteps)")
        return _inductor(gm, example_inputs, mode)
    if graphs:
        if not report.rewritten:
            why = "no rewritten attention site"
        elif report.buffers == report.rewritten:
            why = f"kernel={cfg.kernel!r}"
        elif _static_cache_by_default(root):  # a DynamicCache grows every step: no fixed shapes to replay
            why = ("a DynamicCache grows every step; later generate() calls on this model that choose no "
                   "cache get cache_implementation='static': the same compression, with CUDA graphs and no "
                   "full-size KV buffer")
        else:
            why = ("concat-cache attention sites; for CUDA graphs pass cache_implementation='static' to "
                   "generate(): the same compression, and no full-size KV buffer is kept")
        log.warning(
            "mixeddimkv: a graph runs without CUDA graphs (%s; mode='reduce-overhead' captures only "
            "one-token decode steps over static KV buffers, with kernel='auto')", why,
        )
    return _inductor(gm, example_inputs, mode)


def _inductor(gm: torch.fx.GraphModule, example_inputs: Sequence[Any], mode: str | None, **config: Any) -> Callable:
    """Inductor over `gm` under `mode`'s options (none for "reduce-overhead", whose CUDA graphs
    this backend takes itself) and the Inductor `config` given."""
    from torch._inductor import list_mode_options
    from torch._inductor.compile_fx import compile_fx

    options = {} if mode in (None, "reduce-overhead") else dict(list_mode_options(mode))
    with torch._inductor.config.patch({**options, **config}):
        return compile_fx(gm, list(example_inputs))


def _is_mixeddimkv(wrapper: torch.nn.Module) -> bool:
    """Whether an OptimizedModule (what `torch.compile(module, ...)` returns) compiles with this backend."""
    return _wrapper_mode(wrapper) is not None


def _wrapper_mode(wrapper: torch.nn.Module) -> str | None:
    """The `mode` an OptimizedModule compiles with, if its backend is this one (given as torch.compile's
    `mode` or inside `options`); None otherwise."""
    from torch._dynamo.eval_frame import innermost_backend

    ctx = getattr(wrapper, "dynamo_ctx", None)
    if ctx is None or not hasattr(ctx, "callback"):
        return None
    backend = innermost_backend(ctx.callback)
    if getattr(backend, "compiler_fn", backend) is not mixeddimkv_backend:
        return None
    kwargs = getattr(backend, "kwargs", {})
    return kwargs.get("mode") or (kwargs.get("options") or {}).get("mode") or "default"


def _static_unless_chosen(model: torch.nn.Module, args: tuple, kwargs: dict[str, Any]) -> dict[str, Any]:
    """`generate()` keyword arguments with `cache_implementation="static"` added where the caller chose
    no cache (no `past_key_values`, no `cache_implementation` in the call or its generation config,
    caching not turned off) and no assisted generation. Under reduce-overhead only a static cache's
    decode steps have the fixed shapes a CUDA graph replays; this backend compresses it exactly as the
    default DynamicCache and gives its buffers zero-stride placeholders, so it costs no memory."""
    from transformers import GenerationConfig

    config = kwargs.get("generation_config")
    if config is None and len(args) > 1 and isinstance(args[1], GenerationConfig):
        config = args[1]
    config = config or getattr(model, "generation_config", None)

    def setting(name: str) -> Any:  # a generation setting: the call's keyword, else the config's
        return kwargs[name] if name in kwargs else getattr(config, name, None)

    chosen = (kwargs.get("past_key_values") is not None or setting("cache_implementation") is not None
              or setting("use_cache") is False)
    # assisted generation (a draft model, prompt lookup, early exit, multi-token prediction) refuses a
    # static cache in transformers
    assisted = kwargs.get("assistant_model") is not None or any(
        setting(name) not in (None, False)
        for name in ("prompt_lookup_num_tokens", "assistant_early_exit", "use_mtp"))
    return kwargs if chosen or assisted else {**kwargs, "cache_implementation": "static"}


def _static_cache_by_default(model: torch.nn.Module | None) -> bool:
    """Give a transformers model compiled in place (`model.compile(backend="mixeddimkv", mode
    reduce-overhead)`) a `generate` that picks the static cache where the caller chose none. Called
    when its first DynamicCache decode step compiles: the cache of the running call is made, so only
    later calls change. True if installed (now or before)."""
    if getattr(model, "_compiled_call_impl", None) is None or not callable(getattr(type(model), "generate", None)):
        return False
    own = vars(model).get("generate")
    if own is not None and getattr(own, "__func__", None) is not _generate_static_by_default:
        return False  # a generate of the instance's own (a patched model's picks its MixedDimCache)
    _install_for_compilation(model, "generate", _generate_static_by_default, _STATIC_BY_DEFAULT)
    return True


def _install_for_compilation(model: torch.nn.Module, name: str, method: Callable, installed: weakref.WeakKeyDictionary
                             ) -> None:
    """`method` bound on the instance as `name`, recorded in `installed` against the model's compiled
    call: it acts while `_same_compilation` holds (a model compiled again gets transformers' own)."""
    if installed.get(model) is not model._compiled_call_impl:
        installed[model] = model._compiled_call_impl
        model.__dict__[name] = types.MethodType(method, model)


def _same_compilation(model: torch.nn.Module, installed: weakref.WeakKeyDictionary) -> bool:
    """Whether the model keeps the compiled call its method in `installed` was installed for."""
    return installed.get(model) is model._compiled_call_impl


def _generate_static_by_default(model: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
    """`generate` installed by `_static_cache_by_default`: while the model keeps the compilation it was
    installed for, a call that chooses no cache gets the static one; otherwise transformers' own."""
    if _same_compilation(model, _STATIC_BY_DEFAULT):
        kwargs = _static_unless_chosen(model, args, kwargs)
    return type(model).generate(model, *args, **kwargs)


# model -> the compiled call its `generate` was installed for (weak: the entry goes with the model)
_STATIC_BY_DEFAULT: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _replay_fixed_region_steps(model: torch.nn.Module | None) -> bool:
    """Give a model patched by `mdkv.patch` and compiled in place under reduce-overhead a
    `get_compiled_call` that returns `GenerateSteps`: transformers asks for it in every `generate()`
    over a compileable cache (a fixed-region MixedDimCache), before the prompt's forward, so the first
    call that compiles the model keeps transformers' own. The attention of a patched model runs
    outside the graphs (27 graph breaks at 8 layers), so only a capture of the whole step, as
    `GraphedDecoder` makes, replays it. True if installed (now or before)."""
    from mdkv_compile.hf.patch import patched_config

    if (getattr(model, "_compiled_call_impl", None) is None or patched_config(model) is None
            or not hasattr(type(model), "get_compiled_call")):
        return False
    _install_for_compilation(model, "get_compiled_call", _generate_steps_call, _STEPS_FOR)
    return True


def _generate_steps_call(model: torch.nn.Module, compile_config: Any) -> Callable[..., Any]:
    """`get_compiled_call` installed by `_replay_fixed_region_steps`: GenerateSteps over transformers'
    own compiled call while the model keeps the patch and the compilation it was installed for."""
    from mdkv_compile.hf.cuda_graphs import GenerateSteps
    from mdkv_compile.hf.patch import patched_config

    fallback = type(model).get_compiled_call(model, compile_config)
    if not _same_compilation(model, _STEPS_FOR) or patched_config(model) is None:
        return fallback
    return GenerateSteps(model, fallback)


# model -> the compiled call its `get_compiled_call` was installed for
_STEPS_FOR: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _generate_compiled(wrapper: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
    """`generate` of what `torch.compile(model, backend="mixeddimkv", ...)` returns.

    The wrapper (torch's OptimizedModule) hands every attribute it lacks to the model, so its
    `generate` would be the model's own, whose forward calls never go through the wrapper: the
    plain model would run, compressing nothing. Here the model's calls go through the wrapper's
    compilation for the length of the call, exactly as after `model.compile(backend=..., options=...)`
    (`nn.Module.compile` sets `_compiled_call_impl` the same way); a model compiled in place already
    keeps its own. Under reduce-overhead a call that chooses no cache gets the static one
    (`_static_unless_chosen`)."""
    model = wrapper._orig_mod
    mode = _wrapper_mode(wrapper)
    if mode is None or model._compiled_call_impl is not None:
        return model.generate(*args, **kwargs)
    if mode == "reduce-overhead":
        kwargs = _static_unless_chosen(model, args, kwargs)
    call = _COMPILED_CALLS.get(wrapper)
    if call is None:  # one compiled callable per wrapper: Dynamo's cache entries stay valid across calls
        call = _COMPILED_CALLS[wrapper] = wrapper.dynamo_ctx(model._call_impl)
    model._compiled_call_impl = call
    try:
        return model.generate(*args, **kwargs)
    finally:
        model._compiled_call_impl = None


_COMPILED_CALLS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _give_wrappers_generate(module: torch.nn.Module, name: str, submodule: Any) -> None:
    """Module-registration hook (all modules): an OptimizedModule being made around a model with a
    `generate` gets its own `generate` (`_generate_compiled`). It is installed on every such wrapper
    (the backend is not known yet when torch builds it: `dynamo_ctx` is set after the model is
    registered) and defers to the model's own for other backends. Pickling and deep copies rebuild
    the wrapper through its constructor, which runs this hook again."""
    if name != "_orig_mod" or not callable(getattr(type(submodule), "generate", None)):
        return
    from torch._dynamo.eval_frame import OptimizedModule

    if isinstance(module, OptimizedModule):
        # the instance dict: OptimizedModule.__setattr__ would set it on the model
        module.__dict__["generate"] = types.MethodType(_generate_compiled, module)


# Installed when this module is imported: `torch.compile(..., backend="mixeddimkv")` imports it
# (the entry point) before it builds the wrapper.
torch.nn.modules.module.register_module_module_registration_hook(_give_wrappers_generate)


def ensure_registered() -> None:
    """Register the backend under its name where no `torch_dynamo_backends` entry point provides it:
    the package run from a source tree that was not pip-installed (as on a lent GPU machine)."""
    from torch._dynamo.backends.registry import list_backends, register_backend

    if "mixeddimkv" not in list_backends(exclude_tags=()):
        register_backend(name="mixeddimkv")(mixeddimkv_backend)


def compile_model(model: torch.nn.Module, cfg: MixedDimKVConfig | None = None) -> torch.nn.Module:
    """Compile `model` in place with the mixeddimkv backend under `cfg` (for models that
    `mdkv.patch` cannot reach: hand-written decoders, attention outside transformers' registry).
    Returns the model. Sites the finder cannot prove causal stay exact (see LAST_REPORTS)."""
    cfg = cfg or MixedDimKVConfig()
    model.compile(backend="mixeddimkv", options=dataclasses.asdict(cfg))
    return model


__all__ = [
    "LAST_REPORTS",
    "RewriteReport",
    "compile_model",
    "compiled_cache_bytes",
    "compiled_full_bytes",
    "ensure_registered",
    "mixeddimkv_backend",
    "reset_sites",
    "rewrite_graph",
    "site_layers",
]
