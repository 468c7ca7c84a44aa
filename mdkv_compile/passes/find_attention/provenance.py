"""Self-attention proof: the inputs of the nearest linear projections upstream of q, k and v.

The walk crosses KV-cache concats (every part: the past part is a placeholder with no
projection) and in-place writes into static KV buffers (the values written are followed).
"""

from __future__ import annotations

import operator

import torch
from torch.fx import Node

from mdkv_compile.passes.find_attention.fx import (
    FUNCTION,
    UpstreamWalk,
    arg,
    graph_order,
    is_op,
    is_param,
    shape,
    tensor_args,
)
from mdkv_compile.passes.graph_writes import node_value


def _is_linear(node: Node) -> bool:
    """A projection: F.linear / addmm, or x @ W with a lifted parameter (hand-written projections,
    GPT-2 style Conv1D variants)."""
    if is_op(node, "linear", "addmm"):
        return True
    # torch.bmm(x, W) counts, the method spelling x.bmm(W) does not
    if is_op(node, "matmul", "mm") or is_op(node, "bmm", forms=(FUNCTION,)):
        return any(is_param(a) for a in node.args[:2])
    return False


def _linear_input(node: Node) -> Node | None:
    """The tensor a projection (`_is_linear`) projects."""
    if is_op(node, "addmm"):  # addmm(bias, x, W)
        x = node.args[1]
    elif is_op(node, "linear"):
        x = node.args[0]
    else:
        a, b = node.args[0], node.args[1]
        x = b if is_param(a) else a
    # GPT-2 Conv1D flattens x with view(-1, D) before addmm: report the un-flattened tensor.
    while is_op(x, "view", "reshape", "contiguous"):
        x = x.args[0]
    return x if isinstance(x, Node) else None


# The finder's write set: what may store a new token's keys or values into a buffer, so that
# provenance follows the stored values to their projection. It is not graph_writes' set, which
# answers another question (does the graph write into this input, and in a form the backend can
# rewrite): here the functional index_copy / index_put count and the values are collected;
# there index_fill_, masked_scatter_ and writes through as_strided / unfold views count too.
_METHOD_WRITES = {"index_copy_", "index_put_", "copy_", "scatter_", "__setitem__"}
_FUNCTION_WRITES = {torch.index_copy, torch.Tensor.index_copy_, torch.index_put, torch.Tensor.index_put_}
_FACTORIES = ("zeros", "empty", "full", "zeros_like", "empty_like", "full_like", "new_zeros", "new_empty", "new_full")


def _written_values(write: Node, target: Node) -> list[Node] | None:
    """The values `write` stores into `target`, or None when it is no write into `target`.
    Method writes keep their floating-point arguments (index tensors are integers); function
    writes keep every node argument after the first."""
    if write.op == "call_function" and write.target is operator.setitem and write.args[0] is target:
        return [write.args[2]] if isinstance(write.args[2], Node) else []
    if write.op == "call_method" and write.target in _METHOD_WRITES and write.args[0] is target:
        return [a for a in write.args[1:] if isinstance(a, Node) and _is_float_tensor(a)]
    if write.op == "call_function" and write.target in _FUNCTION_WRITES:
        return [a for a in write.args[1:] if isinstance(a, Node)]
    return None


def _is_float_tensor(node: Node) -> bool:
    v = node_value(node)
    return isinstance(v, torch.Tensor) and v.is_floating_point()


def buffer_writes(buf: Node, before: Node) -> list[Node]:
    """Values written into `buf` (or a view of it) by in-place ops that run before `before`."""
    order = graph_order(buf.graph)
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
            written = _written_values(u, t)
            if written is not None:
                vals.extend(written)
            elif is_op(u, "getitem", "narrow", "view", "select"):
                targets.append(u)  # k_cache[:, :, pos].copy_(k) writes through a view
    return vals


def projection_sources(node: Node, site: Node, budget: int = 4000) -> tuple[set[Node], str, Node | None]:
    """Inputs of the nearest linear projections upstream of `node`.

    Returns (sources, kv_cache kind, new-tokens node). Crosses KV-cache concats (follows every
    part: the past part is a placeholder with no projection) and static-buffer writes.
    """
    sources: set[Node] = set()
    kv_cache = "none"
    new: Node | None = None
    walk = UpstreamWalk(node, budget)
    for n in walk:
        if _is_linear(n):
            src = _linear_input(n)
            if src is not None:
                sources.add(src)
            continue
        if n.op in ("placeholder", "get_attr") or is_op(n, *_FACTORIES):
            # a static cache: a buffer (or one allocated in-graph on first use) written in place
            if is_param(n):
                continue
            writes = buffer_writes(n, site)
            if writes:
                kv_cache = "buffer"
                new = new or writes[-1]
                walk.push(writes)
            continue
        if is_op(n, "cat") and kv_cache == "none" and _concat_along_sequence(n):
            kv_cache = "concat"
            new = [p for p in n.args[0] if isinstance(p, Node)][-1]
        walk.push(tensor_args(n))
    if walk.cut_short:
        return set(), kv_cache, new  # a partial set could fake a match
    return sources, kv_cache, new


def _concat_along_sequence(cat: Node) -> bool:
    """A concat of at least two tensors along the sequence axis (-2) of a [.., S, D] layout."""
    dim = arg(cat, 1, "dim", 0)
    parts = [p for p in cat.args[0] if isinstance(p, Node)]
    shp = shape(cat)
    seq_dim = shp is not None and isinstance(dim, int) and len(shp) >= 3 and (dim % len(shp)) == len(shp) - 2
    return seq_dim and len(parts) >= 2


def depends_on_param(node: object, budget: int = 300) -> bool:
    """Is a module parameter upstream of `node` (a learned bias, not a mask)?"""
    walk = UpstreamWalk(node, budget)
    for n in walk:
        if is_param(n):
            return True
        walk.push(tensor_args(n))
    return False
