"""The ops the finder reads, each under one name, and readers of a node's traced value.

Dynamo graphs keep Python-level targets, so one op arrives in up to three spellings: a function
(`torch.mul`, `operator.mul`), a Tensor method (`x.mul(y)`) or a dunder method (`x.__mul__(y)`,
when the source calls it by name). `OPS` lists every spelling once and `canon(node)` names the op,
so the rest of the finder asks for "mul", never for a spelling (the normalisation Inductor's
`split_cat.py` applies before matching). The spellings of an op take their tensor first
(`torch.mul(x, y)`, `x.mul(y)`), so `node.args` reads the same whatever the spelling and `canon`
returns the name only. One exception: the args of `x.where(cond, y)` are read as torch.where's
`(cond, x, y)`, so `x` is taken for the condition. Where the finder reads only some spellings of
an op, the caller says so with `is_op(..., forms=...)`.

The readers never `int()` a SymInt: that would install a guard and specialise the graph being
compiled.
"""

from __future__ import annotations

import operator
import re
from collections.abc import Callable, Collection, Iterable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch.fx import Node

from mdkv_compile.passes.graph_writes import node_value

# canonical name -> (function spellings, method spellings: plain and dunder)
OPS: dict[str, tuple[tuple[Callable[..., Any], ...], tuple[str, ...]]] = {
    # arithmetic; in-place variants are ops of their own
    "add": ((operator.add, torch.add), ("add", "__add__")),
    "add_": ((), ("add_",)),
    "sub": ((operator.sub, torch.sub), ("sub", "__sub__")),
    "rsub": ((torch.rsub,), ("__rsub__",)),
    "mul": ((operator.mul, torch.mul), ("mul", "__mul__")),
    "div": ((operator.truediv, torch.div), ("div", "__truediv__")),
    # products
    "matmul": ((torch.matmul, operator.matmul), ("matmul", "__matmul__")),
    "bmm": ((torch.bmm,), ("bmm",)),
    "mm": ((torch.mm,), ("mm",)),
    "baddbmm": ((torch.baddbmm,), ("baddbmm",)),
    "einsum": ((torch.einsum,), ()),
    "linear": ((F.linear, torch._C._nn.linear), ()),
    "addmm": ((torch.addmm,), ()),
    # attention
    "sdpa": ((F.scaled_dot_product_attention, torch._C._nn.scaled_dot_product_attention), ()),
    "softmax": ((F.softmax, torch.softmax, torch.special.softmax), ("softmax",)),
    "dropout": ((F.dropout, torch.dropout), ()),
    # masks: comparisons, logic, selection, triangles
    "le": ((operator.le, torch.le), ("le", "__le__")),
    "ge": ((operator.ge, torch.ge), ("ge", "__ge__")),
    "lt": ((operator.lt, torch.lt), ("lt", "__lt__")),
    "gt": ((operator.gt, torch.gt), ("gt", "__gt__")),
    "eq": ((operator.eq, torch.eq), ("eq", "__eq__")),
    "ne": ((operator.ne, torch.ne), ("ne", "__ne__")),
    "logical_not": ((torch.logical_not, operator.invert, operator.not_), ("logical_not", "__invert__", "bitwise_not")),
    "logical_and": ((operator.and_, torch.logical_and, torch.bitwise_and), ("logical_and", "__and__", "bitwise_and")),
    "logical_or": ((operator.or_, torch.logical_or, torch.bitwise_or), ("logical_or", "__or__", "bitwise_or")),
    "where": ((torch.where,), ("where",)),
    "masked_fill": ((torch.masked_fill,), ("masked_fill",)),
    "masked_fill_": ((), ("masked_fill_",)),
    "tril": ((torch.tril,), ("tril",)),
    "triu": ((torch.triu,), ("triu",)),
    # indexing and layout
    "getitem": ((operator.getitem,), ("__getitem__",)),
    "getattr": ((getattr,), ()),
    "cat": ((torch.cat,), ()),
    "reshape": ((torch.reshape,), ("reshape",)),
    "view": ((), ("view",)),
    "flatten": ((), ("flatten",)),
    "unsqueeze": ((torch.unsqueeze,), ("unsqueeze",)),
    "squeeze": ((torch.squeeze,), ("squeeze",)),
    "expand": ((), ("expand",)),
    "expand_as": ((), ("expand_as",)),
    "transpose": ((torch.transpose,), ("transpose",)),
    "permute": ((torch.permute,), ("permute",)),
    "t": ((), ("t",)),
    "mT": ((), ("mT",)),
    "repeat_interleave": ((torch.repeat_interleave,), ("repeat_interleave",)),
    "narrow": ((), ("narrow",)),
    "select": ((), ("select",)),
    "contiguous": ((), ("contiguous",)),
    "clone": ((torch.clone,), ("clone",)),
    "detach": ((), ("detach",)),
    # dtype
    **{name: ((), (name,)) for name in ("to", "float", "half", "bfloat16", "type", "type_as", "bool", "int", "long")},
    # factories and constants
    "full": ((torch.full,), ()),
    "full_like": ((torch.full_like,), ()),
    "new_full": ((), ("new_full",)),
    "fill_": ((), ("fill_",)),
    "ones": ((torch.ones,), ()),
    "ones_like": ((torch.ones_like,), ()),
    "new_ones": ((), ("new_ones",)),
    "zeros": ((torch.zeros,), ()),
    "zeros_like": ((torch.zeros_like,), ()),
    "new_zeros": ((), ("new_zeros",)),
    "empty": ((torch.empty,), ()),
    "empty_like": ((torch.empty_like,), ()),
    "new_empty": ((), ("new_empty",)),
    "tensor": ((torch.tensor,), ()),
    "scalar_tensor": ((torch.scalar_tensor,), ()),
    "new_tensor": ((), ("new_tensor",)),
    "arange": ((torch.arange,), ()),
    "finfo": ((torch.finfo,), ()),
}

_BY_FUNCTION: dict[Any, str] = {fn: name for name, (fns, _) in OPS.items() for fn in fns}
_BY_METHOD: dict[str, str] = {m: name for name, (_, methods) in OPS.items() for m in methods}
assert len(_BY_FUNCTION) == len({id(fn) for fns, _ in OPS.values() for fn in fns}), "a function spelled twice in OPS"

FUNCTION, METHOD, DUNDER = "function", "method", "dunder"  # how a call is spelled

# Casts the chain walkers step over: dtype / device / memory-format changes. Read as Tensor
# methods only (`x.float()`, `x.clone()`); `torch.clone(x)` ends a chain.
CASTS = frozenset({"to", "float", "half", "bfloat16", "type", "type_as", "contiguous", "clone"})


def canon(node: Any) -> str | None:
    """The name in `OPS` of the op `node` calls, whatever its spelling; None for anything else."""
    if not isinstance(node, Node):
        return None
    if node.op == "call_function":
        return _BY_FUNCTION.get(node.target)
    if node.op == "call_method":
        return _BY_METHOD.get(node.target)  # type: ignore[arg-type]
    return None


def form(node: Node) -> str:
    """How the call is spelled: FUNCTION, METHOD or DUNDER ("" for a non-call node)."""
    if node.op == "call_function":
        return FUNCTION
    if node.op == "call_method":
        return DUNDER if str(node.target).startswith("__") else METHOD
    return ""


def is_op(node: Any, *names: str, forms: Collection[str] = (FUNCTION, METHOD, DUNDER)) -> bool:
    """Does `node` call one of the ops `names` in one of the spellings `forms`?"""
    return canon(node) in names and form(node) in forms


def is_cast(node: Any) -> bool:
    return is_op(node, *CASTS, forms=(METHOD,))


def strip_casts(node: Any) -> Any:
    while is_cast(node):
        node = node.args[0]
    return node


def arg(node: Node, i: int, name: str, default: Any = None) -> Any:
    """Argument `i` of the call, given positionally or as `name=`."""
    if len(node.args) > i:
        return node.args[i]
    return node.kwargs.get(name, default)


def tensor_args(node: Node) -> list[Node]:
    """Every node among the call's arguments, nested lists and dicts included."""
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
# Traced values


def hint(d: Any) -> int | None:
    """A size as an int: the traced hint of a SymInt, without a guard; None when it has none."""
    if isinstance(d, torch.SymInt):
        h = d.node.hint
        return int(h) if h is not None else None
    return int(d)


def shape(node: Any) -> tuple[int, ...] | None:
    """Sizes of the traced example (hints for symbolic sizes), without adding guards."""
    v = node_value(node)
    if isinstance(v, torch.Tensor):
        dims = [hint(d) for d in v.shape]
        return None if None in dims else tuple(dims)  # type: ignore[arg-type]
    return None


def dtype(node: Any) -> torch.dtype | None:
    v = node_value(node)
    return v.dtype if isinstance(v, torch.Tensor) else None


def sym(x: Any) -> Any:
    """A size as a sympy expression (symbolic under dynamic shapes) or a number; None if unknown."""
    if isinstance(x, Node):
        x = node_value(x)
    if isinstance(x, torch.SymInt | torch.SymFloat):
        return x.node.expr
    if isinstance(x, (int, float)) and not isinstance(x, bool):
        return x
    return None


def sym_dims(node: Node) -> list[Any] | None:
    v = node_value(node)
    return [sym(d) for d in v.shape] if isinstance(v, torch.Tensor) else None


def same_size(a: Any, b: Any) -> bool:
    """a == b for every value of the shape symbols, not only for the traced example."""
    if a is None or b is None:
        return False
    try:
        import sympy

        return sympy.simplify(sympy.sympify(a) - sympy.sympify(b)) == 0
    except (TypeError, ValueError, AttributeError):
        return False


def is_param(node: Any) -> bool:
    """A lifted (or get_attr) module parameter."""
    return (
        isinstance(node, Node)
        and node.op in ("placeholder", "get_attr")
        and (
            "_parameters_" in node.name
            or node.type is torch.nn.Parameter
            or isinstance(node_value(node), torch.nn.Parameter)
        )
    )


def is_buffer(node: Any) -> bool:
    """A lifted (or get_attr) module buffer."""
    return isinstance(node, Node) and ((node.op == "placeholder" and "_buffers_" in node.name) or node.op == "get_attr")


class UpstreamWalk:
    """Depth-first walk from `start` towards the graph inputs, each node once and at most `budget`
    nodes: iterate it, `push` the nodes to visit next; `cut_short` tells that the budget ran out
    with nodes left to visit (a proof built from a partial walk could be wrong)."""

    def __init__(self, start: Any, budget: int) -> None:
        self.stack: list[Node] = [start] if isinstance(start, Node) else []
        self.seen: set[Node] = set()
        self.budget = budget

    def __iter__(self) -> Iterator[Node]:
        while self.stack and self.budget > 0:
            n = self.stack.pop()
            if n in self.seen:
                continue
            self.seen.add(n)
            self.budget -= 1
            yield n

    def push(self, nodes: Iterable[Node]) -> None:
        self.stack.extend(nodes)

    @property
    def cut_short(self) -> bool:
        return bool(self.stack)


_ORDER_CACHE: list[tuple[torch.fx.Graph, int, dict[Node, int]]] = []


def graph_order(graph: torch.fx.Graph) -> dict[Node, int]:
    """Each node's position in `graph`."""
    # one graph cached at a time; the finder never mutates graphs, the node count guards reuse
    n = len(graph.nodes)
    if not _ORDER_CACHE or _ORDER_CACHE[0][0] is not graph or _ORDER_CACHE[0][1] != n:
        _ORDER_CACHE[:] = [(graph, n, {node: i for i, node in enumerate(graph.nodes)})]
    return _ORDER_CACHE[0][2]


# ---------------------------------------------------------------------------------------------
# Location


def layer_of(node: Node) -> str:
    """A readable location: the module path (e.g. "model.layers.0.self_attn"), else the source line."""
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


def root_class(node: Node) -> type | None:
    """The class of the outermost module the node was traced in."""
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return None
    cls = list(stack.values())[0][1]
    return cls if isinstance(cls, type) else None
