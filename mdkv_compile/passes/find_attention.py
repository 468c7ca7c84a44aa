"""Find attention in Dynamo (torch-level) FX graphs.

The compile pass rewrites causal self-attention sites into `mdkv` operators. This module only
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
"""

from __future__ import annotations

import math
import operator
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch.fx import GraphModule, Node

from mdkv_compile.passes.graph_writes import node_value as _val

__all__ = ["AttentionSite", "find_attention_sites"]

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


# ---------------------------------------------------------------------------------------------
# Op tables. Dynamo graphs keep Python-level targets: functions, operator.*, and method names.

_SDPA_TARGETS = {F.scaled_dot_product_attention, torch._C._nn.scaled_dot_product_attention}
_SOFTMAX_FN = {F.softmax, torch.softmax, torch.nn.functional.softmax, torch.special.softmax}
_MATMUL_FN = {torch.matmul, operator.matmul, torch.bmm}
_DROPOUT_FN = {F.dropout, torch.dropout, torch.nn.functional.dropout}
_LINEAR_FN = {F.linear, torch._C._nn.linear, torch.addmm}
# Ops that keep a tensor's identity for our purposes (layout / dtype / device changes).
_VIEW_METHODS = {
    "view",
    "reshape",
    "transpose",
    "permute",
    "contiguous",
    "to",
    "float",
    "half",
    "bfloat16",
    "type",
    "type_as",
    "unsqueeze",
    "squeeze",
    "flatten",
    "clone",
    "expand",
    "expand_as",
    "__getitem__",
    "bool",
    "detach",
    "t",
    "repeat",
    "repeat_interleave",
    "split",
    "chunk",
    "unflatten",
    "movedim",
}
_VIEW_FNS = {
    torch.reshape,
    torch.transpose,
    torch.permute,
    torch.unsqueeze,
    torch.squeeze,
    torch.flatten,
    torch.clone,
    operator.getitem,
    torch.split,
    torch.chunk,
    torch.repeat_interleave,
    torch.movedim,
    torch.Tensor.contiguous,
}
_CAST_METHODS = {"to", "float", "half", "bfloat16", "type", "type_as", "contiguous", "clone"}
_MUTATING_WRITES = {"index_copy_", "index_put_", "copy_", "scatter_", "__setitem__"}


def _is(node: Any, fns: Iterable[Callable[..., Any]] = (), methods: Iterable[str] = ()) -> bool:
    if not isinstance(node, Node):
        return False
    if node.op == "call_function":
        return node.target in set(fns)
    if node.op == "call_method":
        return node.target in set(methods)
    return False


def _hint(d: Any) -> int | None:
    # never int() a SymInt here: that installs a guard and specialises the graph being compiled
    if isinstance(d, torch.SymInt):
        h = d.node.hint
        return int(h) if h is not None else None
    return int(d)


def _shape(node: Any) -> tuple[int, ...] | None:
    """Sizes of the traced example (hints for symbolic sizes), without adding guards."""
    v = _val(node)
    if isinstance(v, torch.Tensor):
        dims = [_hint(d) for d in v.shape]
        return None if None in dims else tuple(dims)  # type: ignore[arg-type]
    return None


def _dtype(node: Any) -> torch.dtype | None:
    v = _val(node)
    return v.dtype if isinstance(v, torch.Tensor) else None


def _arg(node: Node, i: int, name: str, default: Any = None) -> Any:
    if len(node.args) > i:
        return node.args[i]
    return node.kwargs.get(name, default)


def _const(x: Any) -> float | None:
    """A Python number (or a node Dynamo specialised to one), else None."""
    if isinstance(x, bool):
        return float(x)
    if isinstance(x, (int, float)):
        return float(x)
    if isinstance(x, Node):
        v = _val(x)
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            return float(v)
        if _is(x, (torch.full,)) and tuple(_arg(x, 0, "size", (1,))) == ():  # torch.full([], c)
            return _const(_arg(x, 1, "fill_value"))
        if _is(x, (torch.tensor, torch.scalar_tensor)) and not isinstance(x.args[0], (list, tuple)):
            return _const(x.args[0])
        if x.op == "call_method" and x.target in ("to", "float", "type") and _shape(x) == ():
            return _const(x.args[0])
        if isinstance(v, torch.SymFloat | torch.SymInt):
            # only sizes that are constants for every input: a hint holds for this trace alone
            expr = v.node.expr
            return float(expr) if getattr(expr, "is_number", False) else None
    return None


def _sym(x: Any) -> Any:
    """A size as a sympy expression (symbolic under dynamic shapes) or a number; None if unknown."""
    if isinstance(x, Node):
        x = _val(x)
    if isinstance(x, torch.SymInt | torch.SymFloat):
        return x.node.expr
    if isinstance(x, (int, float)) and not isinstance(x, bool):
        return x
    return None


def _sym_dims(node: Node) -> list[Any] | None:
    v = _val(node)
    return [_sym(d) for d in v.shape] if isinstance(v, torch.Tensor) else None


def _same_size(a: Any, b: Any) -> bool:
    """a == b for every value of the shape symbols, not only for the traced example."""
    if a is None or b is None:
        return False
    try:
        import sympy

        return sympy.simplify(sympy.sympify(a) - sympy.sympify(b)) == 0
    except (TypeError, ValueError, AttributeError):
        return False


def _is_param(node: Any) -> bool:
    return (
        isinstance(node, Node)
        and node.op in ("placeholder", "get_attr")
        and (
            "_parameters_" in node.name or node.type is torch.nn.Parameter or isinstance(_val(node), torch.nn.Parameter)
        )
    )


def _is_buffer(node: Any) -> bool:
    return isinstance(node, Node) and ((node.op == "placeholder" and "_buffers_" in node.name) or node.op == "get_attr")


def _tensor_args(node: Node) -> list[Node]:
    out: list[Node] = []

    def visit(a: Any) -> None:
        if isinstance(a, Node):
            out.append(a)
        elif isinstance(a, (list, tuple)):
            for x in a:
                visit(x)
        elif isinstance(a, dict):
            for x in a.values():
                visit(x)

    visit(node.args)
    visit(node.kwargs)
    return out


# ---------------------------------------------------------------------------------------------
# Location


def _layer_of(node: Node) -> str:
    stack = node.meta.get("nn_module_stack")
    if stack:
        path = list(stack.values())[-1][0]
        path = re.sub(r"^L\['self'\]\.?", "", str(path))
        path = re.sub(r"^L\['(\w+)'\]\.?", r"\1.", path)
        path = re.sub(r"\._modules\['([^']+)'\]", r".\1", path)
        return path or type(list(stack.values())[-1][1]).__name__
    trace = node.meta.get("stack_trace") or ""
    frames = re.findall(r'File "([^"]+)", line (\d+), in (\S+)', trace)
    if frames:
        f, line, fn = frames[-1]
        return f"{fn} ({f.rsplit('/', 1)[-1]}:{line})"
    return node.name


def _root_class(node: Node) -> type | None:
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return None
    cls = list(stack.values())[0][1]
    return cls if isinstance(cls, type) else None


# ---------------------------------------------------------------------------------------------
# Self-attention proof: nearest projections upstream of q / k / v.


def _is_linear(node: Node) -> bool:
    if _is(node, _LINEAR_FN):
        return True
    # x @ W with a lifted parameter (hand-written projections, GPT-2 style Conv1D variants)
    if _is(node, _MATMUL_FN | {torch.mm}, {"matmul", "mm", "__matmul__"}):
        return any(_is_param(a) for a in node.args[:2])
    return False


def _linear_input(node: Node) -> Node | None:
    if node.target is torch.addmm:  # addmm(bias, x, W)
        x = node.args[1]
    elif _is(node, _LINEAR_FN):
        x = node.args[0]
    else:
        a, b = node.args[0], node.args[1]
        x = b if _is_param(a) else a
    # GPT-2 Conv1D flattens x with view(-1, D) before addmm: report the un-flattened tensor.
    while isinstance(x, Node) and _is(x, (torch.reshape,), {"view", "reshape", "contiguous"}):
        x = x.args[0]
    return x if isinstance(x, Node) else None


_ORDER_CACHE: list[tuple[torch.fx.Graph, int, dict[Node, int]]] = []


def _graph_order(graph: torch.fx.Graph) -> dict[Node, int]:
    # one graph cached at a time; the finder never mutates graphs, the node count guards reuse
    n = len(graph.nodes)
    if not _ORDER_CACHE or _ORDER_CACHE[0][0] is not graph or _ORDER_CACHE[0][1] != n:
        _ORDER_CACHE[:] = [(graph, n, {node: i for i, node in enumerate(graph.nodes)})]
    return _ORDER_CACHE[0][2]


_FACTORIES = {torch.zeros, torch.empty, torch.full, torch.zeros_like, torch.empty_like, torch.full_like}


def _buffer_writes(buf: Node, before: Node) -> list[Node]:
    """Values written into `buf` (or a view of it) by in-place ops that run before `before`."""
    order = _graph_order(buf.graph)
    limit = order[before]
    targets = [buf]
    seen: set[Node] = set()
    vals: list[Node] = []
    while targets:
        t = targets.pop()
        if t in seen:
            continue
        seen.add(t)
        for u in t.users:
            if order.get(u, limit) >= limit:
                continue
            if u.op == "call_function" and u.target is operator.setitem and u.args[0] is t:
                if isinstance(u.args[2], Node):
                    vals.append(u.args[2])
            elif u.op == "call_method" and u.target in _MUTATING_WRITES and u.args[0] is t:
                vals.extend(
                    a
                    for a in u.args[1:]
                    if isinstance(a, Node)
                    and _val(a) is not None
                    and isinstance(_val(a), torch.Tensor)
                    and _val(a).is_floating_point()
                )
            elif u.op == "call_function" and u.target in (
                torch.index_copy,
                torch.Tensor.index_copy_,
                torch.index_put,
                torch.Tensor.index_put_,
            ):
                vals.extend(a for a in u.args[1:] if isinstance(a, Node))
            elif _is(u, (operator.getitem,), {"__getitem__", "narrow", "view", "select"}):
                targets.append(u)  # k_cache[:, :, pos].copy_(k) writes through a view
    return vals


def _projection_sources(node: Node, site: Node, budget: int = 4000) -> tuple[set[Node], str, Node | None]:
    """Inputs of the nearest linear projections upstream of `node`.

    Returns (sources, kv_cache kind, new-tokens node). Crosses KV-cache concats (follows every
    part: the past part is a placeholder with no projection) and static-buffer writes.
    """
    sources: set[Node] = set()
    kv_cache = "none"
    new: Node | None = None
    stack = [node]
    seen: set[Node] = set()
    while stack and budget > 0:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        budget -= 1
        if _is_linear(n):
            src = _linear_input(n)
            if src is not None:
                sources.add(src)
            continue
        if n.op in ("placeholder", "get_attr") or _is(n, _FACTORIES, {"new_zeros", "new_empty", "new_full"}):
            # a static cache: a buffer (or one allocated in-graph on first use) written in place
            if _is_param(n):
                continue
            writes = _buffer_writes(n, site)
            if writes:
                kv_cache = "buffer"
                new = new or writes[-1]
                stack.extend(writes)
            continue
        if _is(n, (torch.cat,)) and kv_cache == "none":
            dim = _arg(n, 1, "dim", 0)
            parts = [p for p in n.args[0] if isinstance(p, Node)]
            shp = _shape(n)
            seq_dim = shp is not None and isinstance(dim, int) and len(shp) >= 3 and (dim % len(shp)) == len(shp) - 2
            if seq_dim and len(parts) >= 2:
                kv_cache = "concat"
                new = parts[-1]
        stack.extend(_tensor_args(n))
    if stack:
        return set(), kv_cache, new  # search cut short: a partial set could fake a match
    return sources, kv_cache, new


# ---------------------------------------------------------------------------------------------
# Causality of masks.
#
# Polarity of a boolean / float mask as it is consumed:
#   ALLOW: bool, True = may attend, and the allowed set is inside the causal triangle
#   BLOCK: bool, True = masked out, and every future position is masked
#   ADD:   float additive, 0 where allowed, very negative at every future position
#   NAMED: an un-analysable graph input named like an HF attention mask
ALLOW, BLOCK, ADD, NAMED = "allow", "block", "additive", "named"
WINDOW, NEUTRAL, PADDING = "window", "neutral", "padding"  # only meaningful inside an intersection
_FLIP = {ALLOW: BLOCK, BLOCK: ALLOW}
_NEG_LIMIT = -1e4  # a fill value this negative zeroes the softmax weight in fp16/bf16/fp32

_MASK_NAME = re.compile(r"(causal_mask|attention_mask|attn_mask|attn_bias|\bmask)", re.I)


class _MaskCtx:
    def __init__(self, example_inputs: Sequence[Any] | None, placeholders: list[Node]):
        self.example_inputs = example_inputs
        self.placeholders = placeholders
        self.has_bias = False
        self.proof = ""
        self.window: int | None = None
        self.padding = False
        self.note = ""  # why a recognised causal pattern was rejected

    def real_value(self, node: Node) -> torch.Tensor | None:
        if node.op == "get_attr":
            try:
                obj: Any = node.graph.owning_module
                for part in str(node.target).split("."):
                    obj = getattr(obj, part)
                return obj if isinstance(obj, torch.Tensor) else None
            except AttributeError:
                return None
        if self.example_inputs is None or node not in self.placeholders:
            return None
        i = self.placeholders.index(node)
        if i < len(self.example_inputs) and isinstance(self.example_inputs[i], torch.Tensor):
            t = self.example_inputs[i]
            return None if t.__class__.__name__ == "FakeTensor" else t
        return None


def _ones_like(node: Any) -> bool:
    if not isinstance(node, Node):
        return False
    if _is(node, (torch.ones, torch.ones_like), {"new_ones"}):
        return True
    if _is(node, (torch.full, torch.full_like), {"new_full", "fill_"}):
        return _const(_arg(node, 1, "fill_value")) == 1.0
    if _is(node, (), _CAST_METHODS | {"bool", "expand", "view", "reshape"}) or _is(node, (torch.reshape,)):
        return _ones_like(node.args[0])
    return False


def _very_negative(x: Any) -> bool:
    c = _const(x)
    if c is not None:
        return c <= _NEG_LIMIT or c == -math.inf
    if isinstance(x, Node):
        if _is(x, (torch.finfo,)):
            return False
        if x.op == "call_function" and x.target is getattr and x.args[1] == "min":
            return True  # torch.finfo(dtype).min
        if _is(x, (torch.tensor, torch.full, torch.scalar_tensor)) or _is(x, (), {"new_full", "new_tensor"}):
            return _very_negative(_arg(x, 1 if x.target in (torch.full, "new_full") else 0, "fill_value"))
    return False


def _zero_like(x: Any) -> bool:
    c = _const(x)
    if c is not None:
        return c == 0.0
    if isinstance(x, Node):
        if _is(x, (torch.zeros, torch.zeros_like), {"new_zeros"}):
            return True
        if _is(x, (torch.tensor, torch.scalar_tensor)):
            return _const(x.args[0]) == 0.0
        if _is(x, (torch.full, torch.full_like), {"new_full"}):
            return _const(_arg(x, 1, "fill_value")) == 0.0
    return False


def _index_role(node: Any, depth: int = 0) -> tuple[str, float] | None:
    """('q', off) for a column of query positions ([..., Lq, 1]) plus a constant offset added *after*
    the column was formed, ('kv', off) for a row of key positions. Offsets added to the arange
    before indexing are part of the absolute positions (cache offset) and count as 0."""
    if not isinstance(node, Node) or depth > 12:
        return None
    if _is(node, (operator.add, operator.sub, torch.add, torch.sub), {"add", "sub", "__add__", "__sub__"}):
        a, b = node.args[:2]
        sign = -1.0 if node.target in (operator.sub, torch.sub, "sub", "__sub__") else 1.0
        c = _const(b)
        if c is not None and isinstance(a, Node):
            r = _index_role(a, depth + 1)
            if r:
                return r[0], r[1] + sign * c
        return None
    if node.op == "call_function" and node.target is operator.getitem and isinstance(node.args[1], tuple):
        idx = node.args[1]
        kept = [i for i, x in enumerate(idx) if x is not None]
        if len(idx) >= 2 and len(kept) == 1 and kept[0] == len(idx) - 2:
            return "q", 0.0  # positions[..., :, None]
        if len(idx) >= 2 and len(kept) == 1 and kept[0] == len(idx) - 1:
            return "kv", 0.0  # positions[..., None, :]
        if kept and all(isinstance(x, slice) or x is None for x in idx):
            return None  # e.g. batch_arange[:, None, None, None]
    if _is(node, (torch.unsqueeze,), {"unsqueeze"}):
        d = _arg(node, 1, "dim")
        nd = len(_shape(node) or ())
        if isinstance(d, int) and nd:
            return ("q" if d % nd == nd - 1 else "kv"), 0.0
    if node.op == "call_method" and node.target in _CAST_METHODS | {"expand", "view", "reshape"}:
        return _index_role(node.args[0], depth + 1)
    shp = _shape(node)
    if shp and len(shp) >= 2:
        if shp[-1] == 1 and shp[-2] > 1:
            return "q", 0.0
        if shp[-2] == 1 and shp[-1] > 1:
            return "kv", 0.0
    return None


def _tri_value(t: torch.Tensor) -> str | None:
    """Classify a real buffer's last two dims: lower-triangular ones / strict-upper / additive."""
    if t.dim() < 2 or t.shape[-1] != t.shape[-2] or t.shape[-1] < 2:
        return None
    m = t.reshape(-1, t.shape[-2], t.shape[-1])[0]
    n = m.shape[-1]
    tril = torch.tril(torch.ones(n, n, dtype=torch.bool, device=m.device))
    if m.dtype == torch.bool or not m.is_floating_point() or bool(((m == 0) | (m == 1)).all()):
        b = m.bool()
        if torch.equal(b, tril):
            return ALLOW
        if torch.equal(b, ~tril):
            return BLOCK
        return None
    if bool((m[tril] == 0).all()) and bool((m[~tril] <= _NEG_LIMIT).all()):
        return ADD
    return None


def _mask_kind(node: Any, ctx: _MaskCtx, depth: int = 0) -> str | None:
    """Polarity of a causal mask node (ALLOW / BLOCK / ADD / NAMED), or None if not provable."""
    if not isinstance(node, Node) or depth > 40:
        return None
    rec = lambda n: _mask_kind(n, ctx, depth + 1)  # noqa: E731

    if node.op in ("placeholder", "get_attr"):
        if _is_param(node):
            return None
        # only module buffers: a plain graph input is per-call data, its example proves nothing
        real = ctx.real_value(node) if _is_buffer(node) else None
        if real is not None:
            kind = _tri_value(real)
            if kind:
                ctx.proof = ctx.proof or f"lower-triangular buffer {node.name}"
                return kind
        if node.op == "placeholder" and not _is_buffer(node) and _MASK_NAME.search(node.name):
            return NAMED
        return None

    # index comparison kv_idx <= q_idx (HF masking_utils, gpt-fast, hand-written)
    cmp = {
        operator.le: "le",
        operator.ge: "ge",
        operator.lt: "lt",
        operator.gt: "gt",
        torch.le: "le",
        torch.ge: "ge",
        torch.lt: "lt",
        torch.gt: "gt",
    }
    op = (
        cmp.get(node.target)
        if node.op == "call_function"
        else (
            node.target.strip("_")
            if node.op == "call_method"
            and node.target in ("le", "ge", "lt", "gt", "__le__", "__ge__", "__lt__", "__gt__")
            else None
        )
    )
    if op and len(node.args) >= 2:
        ra, rb = _index_role(node.args[0]), _index_role(node.args[1])
        if ra and rb and {ra[0], rb[0]} == {"q", "kv"}:
            kv, q = (ra, rb) if ra[0] == "kv" else (rb, ra)
            # normalise to "kv_idx OP q_idx + off"
            op = op if ra[0] == "kv" else {"le": "ge", "ge": "le", "lt": "gt", "gt": "lt"}[op]
            off = q[1] - kv[1]
            if op == "le" and off == 0:
                ctx.proof = ctx.proof or "mask: kv_idx <= q_idx"
                return ALLOW
            if op == "lt" and off == 1:
                ctx.proof = ctx.proof or "mask: kv_idx < q_idx + 1"
                return ALLOW
            if op == "gt" and off == 0:
                ctx.proof = ctx.proof or "mask: kv_idx > q_idx masked"
                return BLOCK
            if op in ("gt", "ge") and off < 0:
                # kv_idx > q_idx - W: a sliding window, a restriction on top of causality
                ctx.window = int(-off) if op == "gt" else int(-off) + 1  # keys kept per query
                return WINDOW
        return None

    if _is(node, (torch.tril,), {"tril"}) or _is(node, (torch.triu,), {"triu"}):
        diag = _sym(_arg(node, 1, "diagonal", 0))
        lower = node.target in (torch.tril, "tril")
        base = node.args[0]
        dims = _sym_dims(node)
        # rows are queries, columns keys; with a cache of P = S - T past keys the causal diagonal
        # is P (tril) / P + 1 (triu): any other diagonal drops or leaks keys. Compared symbolically
        # so that a diagonal that only matches the traced sizes is rejected.
        if diag is None or not dims or len(dims) < 2 or dims[-1] is None or dims[-2] is None:
            return None
        past_expr = dims[-1] - dims[-2]
        shp = _shape(node)
        past = float(shp[-1] - shp[-2]) if shp and len(shp) >= 2 else 0.0
        if _same_size(diag, past_expr):
            diag = past
        elif _same_size(diag, past_expr + 1):
            diag = past + 1
        else:
            diag = math.nan
        if diag not in (past, past + 1):
            ctx.note = ctx.note or f"{node.target} diagonal does not match the {int(past)} past keys"
        if _ones_like(base):
            if lower and diag == past:
                ctx.proof = ctx.proof or ("mask: tril(ones)" if not past else f"mask: tril(ones, {int(past)})")
                return ALLOW
            if not lower and diag == past + 1:
                ctx.proof = ctx.proof or f"mask: triu(ones, {int(past) + 1})"
                return BLOCK
        if (
            not lower
            and diag == past + 1
            and _very_negative(
                _arg(base, 1, "fill_value") if isinstance(base, Node) and _is(base, (torch.full,)) else None
            )
        ):
            ctx.proof = ctx.proof or "mask: triu(full(-inf), 1)"
            return ADD
        return None

    # logical negation
    if _is(node, (torch.logical_not, operator.invert, operator.not_), {"logical_not", "__invert__", "bitwise_not"}):
        k = rec(node.args[0])
        return _FLIP.get(k) if k else None
    if _is(node, (operator.eq, torch.eq), {"eq", "__eq__"}) and _const(node.args[1]) == 0.0:
        k = rec(node.args[0])
        return _FLIP.get(k) if k else None
    if _is(node, (operator.ne, torch.ne), {"ne", "__ne__"}) and _const(node.args[1]) == 0.0:
        k = rec(node.args[0])
        return k if k in (ALLOW, BLOCK) else None

    # intersections / unions with padding masks keep the causal guarantee; anything we cannot
    # name (an unknown restriction) makes the mask unprovable
    if _is(node, (operator.and_, torch.logical_and, torch.bitwise_and), {"logical_and", "__and__", "bitwise_and"}):
        kinds = [_combine_operand(a, ctx, depth, ALLOW) for a in node.args[:2]]
        if None in kinds:
            return None
        if ALLOW in kinds:
            return ALLOW
        if NAMED in kinds:
            return NAMED
        return NEUTRAL  # only windows / padding so far: neutral inside a larger intersection
    if _is(node, (operator.or_, torch.logical_or, torch.bitwise_or), {"logical_or", "__or__", "bitwise_or"}):
        kinds = [_combine_operand(a, ctx, depth, BLOCK) for a in node.args[:2]]
        if None in kinds:
            return None
        if BLOCK in kinds:
            return BLOCK
        return NAMED if NAMED in kinds else None

    # bool -> additive conversions
    if _is(node, (torch.where,), {"where"}) and len(node.args) == 3:
        c, a, b = node.args
        k = rec(c)
        # where(allow, 0, -inf) is a pure mask; where(allow, bias, -inf) also carries a bias (T5)
        if k == ALLOW and _very_negative(b):
            ctx.has_bias |= not _zero_like(a)
            return ADD
        if k == BLOCK and _very_negative(a):
            ctx.has_bias |= not _zero_like(b)
            return ADD
        if k == NAMED:
            return NAMED
        return None
    if _is(node, (torch.masked_fill,), {"masked_fill", "masked_fill_"}):
        base, m, val = node.args[0], node.args[1], _arg(node, 2, "value")
        k = rec(m)
        if k == BLOCK and _very_negative(val):
            ctx.has_bias |= not (_zero_like(base) or rec(base) == ADD)
            return ADD
        if k == NAMED:
            return NAMED
        return None
    if _is(node, (operator.mul, torch.mul), {"mul", "__mul__"}):
        a, b = node.args[:2]
        if _dtype(node) == torch.bool:  # bool * bool is an intersection
            kinds = [_combine_operand(x, ctx, depth, ALLOW) for x in (a, b)]
            return None if None in kinds else (ALLOW if ALLOW in kinds else None)
        for x, y in ((a, b), (b, a)):
            k = rec(x) if isinstance(x, Node) else None
            if k == BLOCK and _very_negative(y):  # (1 - allow) * finfo.min
                return ADD
        return None
    if _is(node, (operator.sub, torch.sub, torch.rsub), {"sub", "__rsub__"}) and len(node.args) == 2:
        a, b = node.args
        if _const(a) == 1.0 and isinstance(b, Node):
            k = rec(b)
            return _FLIP.get(k) if k else None
        return None
    if _is(node, (operator.add, torch.add), {"add", "__add__", "add_"}):
        a, b = node.args[:2]
        ka, kb = rec(a), rec(b)
        if ADD in (ka, kb):
            other = b if ka == ADD else a
            if (ka if other is a else kb) not in (ADD, NAMED) and (
                _depends_on_param(other) or not isinstance(other, Node) or _padding_kind(other, ctx) is None
            ):
                ctx.has_bias = True  # ALiBi / relative-position bias, or an unknown additive term
            return ADD
        if NAMED in (ka, kb):
            other = b if ka == NAMED else a
            if _depends_on_param(other):
                ctx.has_bias = True
            return NAMED
        return None

    # shape / dtype / device / slicing ops keep polarity (not transpose/permute: they flip it)
    if _is(node, (operator.getitem, torch.reshape, torch.unsqueeze, torch.squeeze, torch.clone), _MASK_KEEP):
        k = rec(node.args[0])
        if k in (ALLOW, BLOCK, ADD) and node.target is operator.getitem and not _causal_slice(node):
            ctx.note = ctx.note or f"causal mask slice {node.name} is not aligned with the keys"
            return None
        return k
    return None


_MASK_KEEP = {
    "view",
    "reshape",
    "unsqueeze",
    "squeeze",
    "expand",
    "expand_as",
    "contiguous",
    "to",
    "bool",
    "float",
    "half",
    "bfloat16",
    "type",
    "type_as",
    "clone",
    "detach",
    "int",
    "long",
    "__getitem__",
}


def _causal_slice(node: Node) -> bool:
    """Does `mask[idx]` keep a causal [.., rows=queries, cols=keys] mask aligned?

    Keys must start at column 0; sliced query rows must be the last T of the K keys (GPT-2's
    `bias[:, :, K-T:K, :K]`). Rows picked by a position tensor (gpt-fast `mask[None, None, pos]`)
    follow the absolute-position convention of a static cache and are accepted.
    """
    base_shape, out_shape = _shape(node.args[0]), _shape(node)
    idx = node.args[1] if isinstance(node.args[1], tuple) else (node.args[1],)
    if base_shape is None or out_shape is None or len(out_shape) < 2:
        return False
    entries = [e for e in idx if e is not None]
    nd = len(base_shape)
    if Ellipsis in entries:
        i = entries.index(Ellipsis)
        entries = entries[:i] + [slice(None)] * (nd - len(entries) + 1) + entries[i + 1 :]
    entries += [slice(None)] * (nd - len(entries))
    if len(entries) != nd:
        return False
    row, col = entries[-2], entries[-1]
    if isinstance(col, Node) or (isinstance(col, slice) and (col.start not in (None, 0) or col.step not in (None, 1))):
        return False
    if isinstance(row, slice):
        if row.step not in (None, 1):
            return False
        out_dims = _sym_dims(node) or []
        if len(out_dims) < 2 or None in out_dims[-2:]:
            return False
        return _same_size(_sym(row.start) if row.start is not None else 0, out_dims[-1] - out_dims[-2])
    if isinstance(row, Node):
        return True
    return not isinstance(row, int)  # a single int row drops the query axis: unknown alignment


def _combine_operand(node: Any, ctx: _MaskCtx, depth: int, want: str) -> str | None:
    """Classify one operand of a mask intersection (want=ALLOW) or union (want=BLOCK)."""
    if not isinstance(node, Node):
        c = _const(node)
        return NEUTRAL if c is not None and (c == 1.0) == (want == ALLOW) else None
    k = _mask_kind(node, ctx, depth + 1)
    if k == NAMED:
        # a user mask input combined with a proven causal term: the user's padding
        ctx.padding = True
        return NAMED
    if k == want or (k == NEUTRAL and want == ALLOW):
        return k
    if k == WINDOW and want == ALLOW:
        return NEUTRAL  # recorded in ctx.window; the site is skipped for it
    if k is not None:
        return None
    if want == ALLOW and _ones_like(node):
        return NEUTRAL
    return _padding_kind(node, ctx)


def _padding_kind(node: Node, ctx: _MaskCtx, budget: int = 200) -> str | None:
    """A per-key padding term: built from a mask-named graph input (PADDING) or from constant ones
    (NEUTRAL, e.g. OPT's default all-ones mask), indexed by key positions, never by query ones."""
    stack, seen, named = [node], set(), False
    while stack and budget > 0:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        budget -= 1
        if n.op == "placeholder":
            if _is_param(n) or _is_buffer(n) or not _MASK_NAME.search(n.name):
                return None
            named = True
            continue
        if _ones_like(n) or _is(n, (torch.arange,)):
            continue
        r = _index_role(n) if n.op == "call_function" and n.target is operator.getitem else None
        if r and r[0] == "q":
            return None
        stack.extend(_tensor_args(n))
    if stack:
        return None  # budget exhausted: not provable
    if named:
        ctx.padding = True
        return PADDING
    return NEUTRAL


def _depends_on_param(node: Any, budget: int = 300) -> bool:
    stack = [node] if isinstance(node, Node) else []
    seen: set[Node] = set()
    while stack and budget > 0:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        budget -= 1
        if _is_param(n):
            return True
        stack.extend(_tensor_args(n))
    return False


# ---------------------------------------------------------------------------------------------
# GQA / MQA


def _unrepeat(node: Node) -> tuple[Node, int]:
    """Strip repeat_kv (getitem None -> expand -> reshape) or repeat_interleave; (base, group)."""
    n = node
    while _is(n, (), {"contiguous"}):
        n = n.args[0]
    if _is(n, (torch.reshape,), {"reshape", "view", "flatten"}):
        e = n.args[0]
        if _is(e, (), {"expand"}):
            g = e.args[0]
            base = None
            if (
                g.op == "call_function"
                and g.target is operator.getitem
                and isinstance(g.args[1], tuple)
                and None in g.args[1]
            ):
                base = g.args[0]
            elif _is(g, (torch.unsqueeze,), {"unsqueeze"}):
                base = g.args[0]
            if isinstance(base, Node):
                es = _shape(e)
                bs = _shape(base)
                rep = es[2] if es and len(es) == 5 else (es[-3] if es else 1)
                if bs and es and len(es) == len(bs) + 1:
                    rep = es[len(bs) - 2] if len(bs) >= 2 else rep
                return base, int(rep)
    if _is(n, (torch.repeat_interleave,), {"repeat_interleave"}):
        reps = _const(_arg(n, 1, "repeats"))
        if reps is not None:
            return n.args[0], int(reps)
    if _is(n, (), {"expand"}):  # MQA: [B, 1, S, D] -> [B, H, S, D]
        bs, es = _shape(n.args[0]), _shape(n)
        if bs and es and len(bs) == len(es) == 4 and bs[1] == 1 and es[1] > 1:
            return n.args[0], es[1]
    return node, 1


# ---------------------------------------------------------------------------------------------
# Manual chains: softmax is the anchor.


def _strip_casts(node: Any) -> Any:
    while isinstance(node, Node) and node.op == "call_method" and node.target in _CAST_METHODS:
        node = node.args[0]
    return node


def _is_softmax(n: Node) -> bool:
    return _is(n, _SOFTMAX_FN, {"softmax"})


def _is_scores_mm(n: Any) -> bool:
    return _is(n, _MATMUL_FN | {torch.einsum, torch.baddbmm}, {"matmul", "bmm", "__matmul__", "baddbmm"})


def _k_from_kt(kt: Any) -> Node | None:
    """kᵀ -> k when kᵀ is a transpose/permute swapping the last two dims."""
    kt = _strip_casts(kt)
    if not isinstance(kt, Node):
        return None
    if _is(kt, (torch.transpose,), {"transpose"}):
        nd = len(_shape(kt) or ()) or 4
        dims = {int(d) % nd for d in kt.args[1:3]}
        if dims == {nd - 1, nd - 2}:
            return kt.args[0]
    if _is(kt, (torch.permute,), {"permute"}):
        perm = kt.args[1] if isinstance(kt.args[1], (list, tuple)) else kt.args[1:]
        perm = [int(p) for p in perm]
        nd = len(perm)
        if perm == [*range(nd - 2), nd - 1, nd - 2]:
            return kt.args[0]
    if _is(kt, (), {"t"}) or (_is(kt, (), {"mT"})):
        return kt.args[0]
    return None


def _einsum_operands(node: Node) -> tuple[str, list[Node]] | None:
    eq = node.args[0]
    ops = node.args[1:]
    if len(ops) == 1 and isinstance(ops[0], (list, tuple)):
        ops = ops[0]
    if not isinstance(eq, str) or len(ops) != 2:
        return None
    return eq.replace(" ", ""), list(ops)


class _ScaleAcc:
    """Product of the scalar factors between q·kᵀ and softmax.

    Under dynamic=True Dynamo turns float module attributes (HF `self.scaling`) into graph inputs
    (`scaling_tensor.item()`, a SymFloat). One such factor is allowed when it is the only factor:
    it becomes `scale_node`, which a rewrite passes through as the scale.
    """

    def __init__(self) -> None:
        self.value = 1.0
        self.ok = True
        self.node: Node | None = None

    def mul(self, x: Any, inverse: bool = False) -> None:
        c = _const(x)
        if c is None:
            v = _val(x)
            if isinstance(v, torch.SymFloat | torch.SymInt) and not inverse and self.node is None:
                self.node = x
                h = v.node.hint
                c = float(h) if h is not None else math.nan
            else:
                self.ok = False  # e.g. a tensor computation: not a number we can pass on
                return
        self.value = self.value / c if inverse else self.value * c

    def finish(self) -> tuple[float, bool, Node | None]:
        if self.node is not None:
            hint = _val(self.node).node.hint
            # the symbolic factor must be the whole scale, or the rewrite would drop the rest
            only = hint is not None and math.isclose(self.value, float(hint))
            return self.value, self.ok and only, self.node
        return self.value, self.ok, None


def _strip_scale(node: Any, acc: _ScaleAcc) -> Any:
    """Walk up through scalar mul/div and casts (q * s, k / sqrt(d)), accumulating the scale."""
    while isinstance(node, Node):
        if node.op == "call_method" and node.target in _CAST_METHODS:
            node = node.args[0]
        elif _is(node, (operator.mul, torch.mul), {"mul", "__mul__"}) and len(node.args) == 2:
            a, b = node.args
            if isinstance(a, Node) and not _is_scalarish(a) and _is_scalarish(b):
                acc.mul(b)
                node = a
            elif isinstance(b, Node) and not _is_scalarish(b) and _is_scalarish(a):
                acc.mul(a)
                node = b
            else:
                return node
        elif _is(node, (operator.truediv, torch.div), {"div", "__truediv__"}) and len(node.args) == 2:
            a, b = node.args
            if not (isinstance(a, Node) and not _is_scalarish(a) and _is_scalarish(b)):
                return node
            acc.mul(b, inverse=True)
            node = a
        else:
            return node
    return node


def _is_scalarish(x: Any) -> bool:
    if not isinstance(x, Node):
        return True
    shp = _shape(x)
    v = _val(x)
    return not isinstance(v, torch.Tensor) or shp == () or (shp is not None and math.prod(shp) == 1)


# ---------------------------------------------------------------------------------------------


@dataclass
class _Raw:
    kind: str
    q: Node
    k_rep: Node  # as consumed by the scores op (possibly repeated)
    v_rep: Node
    mask: Node | None
    mask_use: str | None  # how the site consumes the mask: "allow" | "block" | "additive"
    scale: float | None
    scale_ok: bool
    sdpa_causal: bool
    dropout_p: float
    output: Node
    replace: list[Node]
    probs_escape: bool = False
    terms: list[tuple[Node, str]] = field(default_factory=list)
    bad_layout: str = ""
    scale_node: Node | None = None


def _sdpa_raw(n: Node) -> _Raw:
    q, k, v = n.args[0], n.args[1], n.args[2]
    mask = _arg(n, 3, "attn_mask")
    dropout_p = _const(_arg(n, 4, "dropout_p", 0.0)) or 0.0
    is_causal = bool(_arg(n, 5, "is_causal", False))
    scale_arg = _arg(n, 6, "scale", None)
    scale: float | None = None
    scale_ok, scale_node = True, None
    if scale_arg is not None:
        acc = _ScaleAcc()
        acc.mul(scale_arg)
        scale, scale_ok, scale_node = acc.finish()
    use = None
    if isinstance(mask, Node):
        use = ALLOW if _dtype(mask) == torch.bool else ADD
    return _Raw(
        "sdpa",
        q,
        k,
        v,
        mask if isinstance(mask, Node) else None,
        use,
        scale,
        scale_ok,
        is_causal,
        dropout_p,
        n,
        [n],
        scale_node=scale_node,
    )


def _manual_raw(sm: Node, why: list[str]) -> _Raw | None:
    """The manual chain around softmax `sm`, or None (with a reason appended to `why`)."""
    dim = _arg(sm, 1, "dim", None)
    nd = len(_shape(sm) or ())
    if dim is not None and nd and isinstance(dim, int) and dim % nd != nd - 1:
        return None
    chain: list[Node] = [sm]
    # ---- downstream: casts / dropout -> P @ V
    cur = sm
    dropout_p = 0.0
    escape = False
    pv: Node | None = None
    for _ in range(6):
        users = list(cur.users)
        if len(users) != 1:
            # probabilities also used elsewhere (HF output_attentions, a graph output): follow the
            # one user that continues the chain, remember the escape
            cont = [
                u
                for u in users
                if (u.op == "call_method" and u.target in _CAST_METHODS)
                or _is(u, _DROPOUT_FN)
                or (_is(u, _MATMUL_FN, {"matmul", "bmm", "__matmul__"}) and u.args[0] is cur)
                or _is(u, (torch.einsum,))
            ]
            if len(cont) != 1:
                return None
            escape = True
            users = cont
        u = users[0]
        if u.op == "call_method" and u.target in _CAST_METHODS:
            chain.append(u)
            cur = u
            continue
        if _is(u, _DROPOUT_FN):
            p = _const(_arg(u, 1, "p", 0.5)) or 0.0
            training = _arg(u, 2, "training", True)
            dropout_p = p if training else 0.0
            chain.append(u)
            cur = u
            continue
        if _is(u, _MATMUL_FN, {"matmul", "bmm", "__matmul__"}) and u.args[0] is cur:
            pv = u
            v_rep = u.args[1]
            break
        if _is(u, (torch.einsum,)):
            eo = _einsum_operands(u)
            if eo is None or cur not in eo[1]:
                return None
            pv = u
            v_rep = eo[1][1] if eo[1][0] is cur else eo[1][0]
            break
        return None
    if pv is None or not isinstance(v_rep, Node):
        return None
    chain.append(pv)
    # ---- upstream: mask / scale -> scores
    acc = _ScaleAcc()
    mask: Node | None = None
    use: str | None = None
    terms: list[tuple[Node, str]] = []  # every mask / bias applied to the scores
    node: Any = sm.args[0]
    up: list[Node] = []
    scores: Node | None = None
    for _ in range(12):
        if not isinstance(node, Node):
            return None
        if _is_scores_mm(node):
            scores = node
            break
        up.append(node)
        if node.op == "call_method" and node.target in _CAST_METHODS:
            node = node.args[0]
        elif _is(
            node, (operator.mul, torch.mul, operator.truediv, torch.div), {"mul", "__mul__", "div", "__truediv__"}
        ):
            nxt = _strip_scale(node, acc)
            if nxt is node:
                why.append(f"scores multiplied by a tensor ({node.name}), not a scalar")
                return None
            node = nxt
            up.extend(_between(nxt, up[-1]))
        elif _is(node, (operator.add, torch.add), {"add", "__add__"}):
            a, b = node.args[:2]
            sa, sb = _leads_to_scores(a), _leads_to_scores(b)
            if sa == sb:
                why.append(f"cannot tell scores from mask in {node.name}")
                return None
            mask, use = (b, ADD) if sa else (a, ADD)
            terms.append((mask, use))
            node = a if sa else b
        elif _is(node, (torch.masked_fill,), {"masked_fill", "masked_fill_"}):
            if not _very_negative(_arg(node, 2, "value")):
                why.append(f"masked_fill with a fill value that does not mask ({node.name})")
                return None
            mask, use = node.args[1], BLOCK
            terms.append((mask, use))
            node = node.args[0]
        elif _is(node, (torch.where,), {"where"}) and len(node.args) == 3:
            c, a, b = node.args
            if _leads_to_scores(a) and _very_negative(b):
                mask, use, node = c, ALLOW, a
            elif _leads_to_scores(b) and _very_negative(a):
                mask, use, node = c, BLOCK, b
            else:
                why.append(f"torch.where that is not a mask ({node.name})")
                return None
            terms.append((mask, use))
        else:
            target = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", node.target)
            why.append(f"'{target}' applied to the scores ({node.name}), e.g. soft-capping")
            return None
    if scores is None:
        why.append("no q @ kᵀ within 12 ops above softmax")
        return None
    chain = [scores, *reversed(up), *chain]
    # ---- q and k from the scores op
    bad_layout = ""
    if scores.target is torch.einsum:
        eo = _einsum_operands(scores)
        if eo is None:
            return None
        eq, (a, b) = eo
        ins, out = eq.split("->")
        sa, sb = ins.split(",")
        contracted = (set(sa) & set(sb)) - set(out)
        if len(contracted) != 1 or not sa.endswith(next(iter(contracted))):
            return None
        c = next(iter(contracted))
        q_raw, k_raw = a, b
        kt = k_raw
        if not sb.endswith(c):
            bad_layout = f"einsum '{eq}': keys are not [.., S, D]"
    else:
        if scores.target in (torch.baddbmm, "baddbmm"):
            bias, q_raw, kt = scores.args[0], scores.args[1], scores.args[2]
            acc.mul(_arg(scores, 4, "alpha", 1.0))
            if _arg(scores, 3, "beta", 1.0) != 0 and not _zero_like(bias):
                mask, use = bias, ADD  # ALiBi-style bias enters here; the mask analysis flags it
                terms.append((mask, use))
        else:
            q_raw, kt = scores.args[0], scores.args[1]
        k_raw = _k_from_kt(_strip_scale(kt, acc))
        if k_raw is None:
            k_raw = kt
            bad_layout = "keys are not transposed from a [.., S, D] tensor"
    q = _strip_scale(q_raw, acc)
    k = _strip_scale(k_raw, acc)
    v = _strip_casts(v_rep)
    scale, scale_ok, scale_node = acc.finish()
    # the scale / transpose / cast nodes between the scores op and the reported q, k, v
    for top, bottom in ((q_raw, q), (kt, k), (v_rep, v)):
        chain[:0] = [n for n in _chain_between(top, bottom) if n not in chain]
    return _Raw(
        "manual",
        q,
        k,
        v,
        mask,
        use,
        scale,
        scale_ok,
        False,
        dropout_p,
        pv,
        chain,
        probs_escape=escape,
        bad_layout=bad_layout,
        terms=terms,
        scale_node=scale_node,
    )


def _chain_between(top: Any, bottom: Any, depth: int = 8) -> list[Node]:
    """Nodes from `top` down to (excluding) its ancestor `bottom`, following tensor args."""
    if not isinstance(top, Node) or top is bottom or depth == 0:
        return []
    for a in _tensor_args(top):
        if a is bottom:
            return [top]
        rest = _chain_between(a, bottom, depth - 1)
        if rest:
            return [top, *rest]
    return []


def _between(low: Node, high: Node) -> list[Node]:
    """Nodes strictly between `low` and `high` on a single-arg chain (scale ops stripped)."""
    out: list[Node] = []
    n: Any = high
    while isinstance(n, Node) and n is not low:
        n = next((a for a in n.args if isinstance(a, Node)), None)
        if n is not None and n is not low:
            out.append(n)
    return out


def _leads_to_scores(x: Any, depth: int = 0) -> bool:
    if not isinstance(x, Node) or depth > 8:
        return False
    if _is_scores_mm(x):
        return True
    if x.op == "call_method" and x.target in _CAST_METHODS | {"masked_fill", "masked_fill_"}:
        return _leads_to_scores(x.args[0], depth + 1)
    if _is(
        x,
        (operator.mul, torch.mul, operator.truediv, torch.div, operator.add, torch.add, torch.masked_fill),
        {"mul", "div", "add", "__mul__", "__truediv__", "__add__"},
    ):
        return any(_leads_to_scores(a, depth + 1) for a in x.args[:2])
    if _is(x, (torch.where,), {"where"}):
        return any(_leads_to_scores(a, depth + 1) for a in x.args[1:3])
    return False


# ---------------------------------------------------------------------------------------------


def _decoder_hint(site_node: Node, root: torch.nn.Module | None, layer: str) -> bool:
    """Is this attention module declared causal? (HF sets `is_causal` on attention modules.)"""
    if root is not None and layer:
        try:
            mod = root.get_submodule(layer)
            if hasattr(mod, "is_causal"):
                return bool(mod.is_causal)
        except AttributeError:
            pass
    cls = _root_class(site_node)
    return cls is not None and bool(re.search(r"(ForCausalLM|LMHeadModel)$", cls.__name__))


def _finish(raw: _Raw, ctx: _MaskCtx, root: torch.nn.Module | None) -> AttentionSite:
    k, gk = _unrepeat(_strip_casts(raw.k_rep))
    v, gv = _unrepeat(_strip_casts(raw.v_rep))
    group = max(gk, gv)
    qs, ks = _shape(raw.q), _shape(k)
    if group == 1 and qs and ks and len(qs) == len(ks) == 4 and ks[1] and qs[1] % ks[1] == 0:
        group = qs[1] // ks[1]  # SDPA enable_gqa: heads differ without an explicit repeat
    layer = _layer_of(raw.output)
    site = AttentionSite(
        kind=raw.kind,
        q=raw.q,
        k=k,
        v=v,
        mask=raw.mask,
        scale=raw.scale,
        is_causal=False,
        output=raw.output,
        replace=list(raw.replace),
        layer=layer,
        group_size=group,
        dropout_p=raw.dropout_p,
        scale_node=raw.scale_node,
    )
    # nodes of the repeat / transpose owned by the site (rewrite can drop them when dead)
    for rep, base in ((raw.k_rep, k), (raw.v_rep, v)):
        path: list[Node] = []
        n = rep
        while isinstance(n, Node) and n is not base and len(path) < 8:
            path.append(n)
            n = n.args[0] if n.args and isinstance(n.args[0], Node) else None
        if n is base:  # only a straight repeat/cast chain down to the un-repeated tensor
            site.replace.extend(p for p in path if p not in site.replace)

    # keep only nodes that die with the site: a node with a user outside stays in the graph
    owned = set(site.replace)
    changed = True
    while changed:
        changed = False
        for n in list(owned):
            if n is not raw.output and not set(n.users) <= owned:
                owned.discard(n)
                changed = True
    order = _graph_order(raw.output.graph)
    site.replace = sorted(owned, key=order.__getitem__)

    # --- self-attention proof
    q_src, _, _ = _projection_sources(raw.q, raw.output)
    k_src, k_cache, k_new = _projection_sources(k, raw.output)
    v_src, v_cache, v_new = _projection_sources(v, raw.output)
    site.kv_cache = k_cache if k_cache == v_cache else "mixed"
    site.k_new, site.v_new = k_new, v_new
    self_attn = bool(q_src) and q_src == k_src == v_src and len(q_src) == 1
    if self_attn:
        site.source = next(iter(q_src))

    # --- causality
    ctx.has_bias, ctx.proof, ctx.window, ctx.padding, ctx.note = False, "", None, False, ""
    mk = _mask_kind(raw.mask, ctx) if raw.mask is not None else None
    if len(raw.terms) > 1:
        # several terms reach the scores (T5: + bias + mask): the causal one is the mask, the others
        # must be padding, anything else is an additive bias
        kinds = [_mask_kind(t, ctx) for t, _ in raw.terms]
        causal = [i for i, (k, (_, use)) in enumerate(zip(kinds, raw.terms, strict=True)) if k == use]
        pick = causal[0] if causal else 0
        raw.mask, raw.mask_use = raw.terms[pick]
        mk = kinds[pick]
        for i, (t, _) in enumerate(raw.terms):
            if i != pick and _padding_kind(t, ctx) is None and kinds[i] != NAMED:
                ctx.has_bias = True
        site.mask = raw.mask
    lq = (qs or (0, 0))[-2] if qs and len(qs) >= 2 else None
    proof = ""
    if raw.sdpa_causal:
        proof = "sdpa is_causal=True"
    elif raw.mask is not None and mk is not None and (mk == raw.mask_use or (mk == ADD and raw.mask_use == ADD)):
        proof = ctx.proof or f"mask ({mk})"
    elif raw.mask is not None and mk == NAMED and self_attn and _decoder_hint(raw.output, root, layer):
        proof = f"HF mask input '{_mask_root_name(raw.mask)}' in a causal decoder"
    elif raw.mask is None and lq == 1 and site.kv_cache == "concat":
        proof = "single-query decode over a concatenated cache"
    site.is_causal = bool(proof)
    site.causal_proof = proof
    site.mask_use = raw.mask_use if raw.mask is not None else None
    site.mask_terms = list(raw.terms) if raw.terms else ([(raw.mask, raw.mask_use)] if raw.mask is not None else [])
    site.padding_mask = ctx.padding
    max_pos = getattr(getattr(root, "config", None), "max_position_embeddings", None)
    if ctx.window is not None and isinstance(max_pos, int) and ctx.window >= max_pos:
        # a window no shorter than the longest sequence the model accepts never drops a key
        site.causal_proof += f" (sliding window {ctx.window} >= max_position_embeddings {max_pos})"
        ctx.window = None
    if ctx.window is not None:
        site.extra["sliding_window"] = ctx.window

    # --- status
    reason = ""
    if raw.bad_layout:
        reason = f"unsupported layout: {raw.bad_layout}"
    elif not self_attn:
        if q_src and k_src and q_src != k_src:
            reason = f"cross-attention: k/v come from {_names(k_src)}, not the query's input {_names(q_src)}"
        elif k_src != v_src and k_src and v_src:
            reason = f"k and v come from different inputs ({_names(k_src)} vs {_names(v_src)})"
        else:
            reason = "cannot prove self-attention: no common projection input for q, k, v"
    elif not site.is_causal:
        declared_causal = _decoder_hint(raw.output, root, layer)
        if raw.mask is None:
            reason = "bidirectional: no causal mask"
        elif mk is None and ctx.note:
            reason = f"mask not provably causal: {ctx.note}"
        elif mk is None and not declared_causal:
            reason = "bidirectional: no causal pattern in the mask (padding / full attention)"
        elif mk is None:
            reason = "mask not readable: module is causal but no causal pattern found in its mask"
        elif mk == NAMED:
            reason = "bidirectional: mask input in a module not declared causal"
        else:
            reason = f"mask polarity mismatch ({mk} mask used as {raw.mask_use})"
    elif ctx.window is not None:
        reason = f"sliding-window mask (window={ctx.window}): the rewrite computes full causal attention"
    elif ctx.has_bias:
        reason = "additive attention bias (ALiBi / relative position) in the mask: not supported"
    elif not raw.scale_ok:
        reason = "scale is not a compile-time constant"
    elif raw.dropout_p:
        reason = f"attention dropout p={raw.dropout_p} (training)"
    elif raw.probs_escape:
        reason = "attention probabilities are used outside the site (output_attentions?)"
    elif site.kv_cache == "mixed":
        reason = "k and v use different cache mechanisms"
    site.status = SKIPPED if reason else REWRITABLE
    site.reason = reason
    return site


def _names(nodes: set[Node]) -> str:
    return ", ".join(sorted(n.name for n in nodes))


def _mask_root_name(mask: Node) -> str:
    n: Any = mask
    for _ in range(20):
        if not isinstance(n, Node) or n.op == "placeholder":
            break
        n = next((a for a in n.args if isinstance(a, Node)), None)
    return n.name if isinstance(n, Node) else mask.name


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
    ctx = _MaskCtx(example_inputs, placeholders)
    sites: list[AttentionSite] = []
    for n in gm.graph.nodes:
        raw: _Raw | None = None
        why: list[str] = []
        if n.op == "call_function" and n.target in _SDPA_TARGETS:
            raw = _sdpa_raw(n)
        elif _is_softmax(n):
            raw = _manual_raw(n, why)
            if raw is None and (pv := _softmax_feeds_matmul(n)) is not None:
                # looks like attention (softmax(..) @ v) but the chain is not understood: report it
                sites.append(_unrecognised(n, pv, why[0] if why else "chain not understood"))
        if raw is not None:
            sites.append(_finish(raw, ctx, root))
    return sites


def _softmax_feeds_matmul(sm: Node) -> Node | None:
    cur = sm
    for _ in range(6):
        nxt = [
            u
            for u in cur.users
            if (u.op == "call_method" and u.target in _CAST_METHODS)
            or _is(u, _DROPOUT_FN)
            or _is_scores_mm(u)
            or _is(u, (torch.einsum,))
        ]
        if len(nxt) != 1:
            return None
        if _is_scores_mm(nxt[0]) or _is(nxt[0], (torch.einsum,)):
            return nxt[0]
        cur = nxt[0]
    return None


def _unrecognised(sm: Node, pv: Node, why: str) -> AttentionSite:
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
        layer=_layer_of(pv),
        status=SKIPPED,
        reason=f"unrecognised attention pattern: {why}",
    )
