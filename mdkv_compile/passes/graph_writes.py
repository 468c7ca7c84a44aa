"""What an FX graph writes in place, shared by the attention finder, the backend's rewrite
(backends/torch_compile.py) and its CUDA-graph wrapper (backends/site_graphs.py): a node's example
value, which inputs the graph writes into (directly or through a view), and the one write of a
static KV buffer before an attention site."""

from __future__ import annotations

import operator
from typing import Any

import torch
import torch.fx


def node_value(node: Any) -> Any:
    """The example value Dynamo recorded for a node (None for anything else)."""
    return node.meta.get("example_value", node.meta.get("val")) if isinstance(node, torch.fx.Node) else None


# In-place ops that write into a tensor (or through a view of it).
_WRITES = {"index_copy_", "index_put_", "copy_", "scatter_", "index_fill_", "masked_scatter_", "__setitem__"}
_VIEWS = {"narrow", "view", "select", "__getitem__", "as_strided", "unfold"}


def _full_slice(x: Any) -> bool:
    return isinstance(x, slice) and x == slice(None, None, None)


def _write_at_positions(node: torch.fx.Node, buf: torch.fx.Node) -> tuple[torch.fx.Node, torch.fx.Node] | None:
    """(positions, value) when `node` writes `value` into `buf` along dim 2 at a 1-D position
    tensor: `buf[:, :, pos] = value` (optionally `[:, :, pos, :]`) or `buf.index_copy_(2, pos, value)`."""
    if node.op == "call_function" and node.target is operator.setitem and len(node.args) == 3:
        _, index, value = node.args
        if (
            isinstance(index, tuple)
            and len(index) in (3, 4)
            and all(_full_slice(i) for i in (*index[:2], *index[3:]))
            and isinstance(index[2], torch.fx.Node)
            and isinstance(value, torch.fx.Node)
        ):
            return index[2], value
        return None
    is_index_copy = (node.op == "call_method" and node.target == "index_copy_") or (
        node.op == "call_function" and node.target is torch.Tensor.index_copy_
    )
    if is_index_copy and len(node.args) == 4:
        _, dim, pos, value = node.args
        nodes = isinstance(pos, torch.fx.Node) and isinstance(value, torch.fx.Node)
        if isinstance(dim, int) and dim in (2, -2) and nodes:
            return pos, value
    return None


def _is_write(node: torch.fx.Node, target: torch.fx.Node, any_inplace: bool = False) -> bool:
    """Whether `node` writes into `target` (its first argument): one of the cache writes in
    `_WRITES`, or with `any_inplace` any in-place method (`name_`) or an `out=` argument."""
    if node.kwargs.get("out") is target:
        return any_inplace
    if not node.args or node.args[0] is not target:
        return False
    if node.op == "call_function" and node.target is operator.setitem:
        return True
    name = node.target if node.op == "call_method" else getattr(node.target, "__name__", "")
    if not isinstance(name, str):
        return False
    return name in _WRITES or (any_inplace and name.endswith("_") and not name.endswith("__"))


def _is_view(node: torch.fx.Node) -> bool:
    return node.op in ("call_function", "call_method") and (
        getattr(node.target, "__name__", node.target) in _VIEWS or node.target is operator.getitem
    )


def writes_into(node: torch.fx.Node) -> bool:
    """Whether the graph writes into `node`'s tensor in place, directly or through a view of it."""
    return any(_is_write(user, node, any_inplace=True) or (_is_view(user) and writes_into(user)) for user in node.users)


def buffer_write(
    buf: torch.fx.Node, before: torch.fx.Node
) -> tuple[torch.fx.Node, torch.fx.Node, torch.fx.Node] | str:
    """(write node, positions, value) of the one write into the static KV buffer `buf` that precedes `before`
    (an attention site's output), or why the site cannot be rewritten. The site must read the
    buffer itself (rank 4, written on dim 2), and the buffer must get exactly one write before it,
    of a supported form."""
    order = {n: i for i, n in enumerate(buf.graph.nodes)}
    limit = order[before]
    bv = node_value(buf)
    if not isinstance(bv, torch.Tensor) or bv.dim() != 4:
        return "the keys/values read are not a rank-4 KV buffer [B, H, S_max, d]"
    found = []
    for user in buf.users:
        if order[user] >= limit:
            continue
        if _is_write(user, buf):
            found.append(user)
        elif _is_view(user) and any(_is_write(u, user) for u in user.users):
            return f"the KV buffer {buf.name} is written through a view ({user.name}): write form not supported"
    if not found:
        return f"keys/values {buf.name} are not the written KV buffer itself (a slice or copy of it?)"
    if len(found) > 1:
        return f"the KV buffer {buf.name} is written {len(found)} times before the attention"
    write = _write_at_positions(found[0], buf)
    if write is None:
        return (
            f"write form {found[0].target} into {buf.name} not supported (supported: buf[:, :, pos] = x, "
            "buf.index_copy_(2, pos, x))"
        )
    pos, value = write
    pv, vv = node_value(pos), node_value(value)
    if not isinstance(pv, torch.Tensor) or pv.dim() != 1 or pv.is_floating_point() or pv.dtype == torch.bool:
        return "the KV buffer write positions are not a 1-D integer tensor"
    if not isinstance(vv, torch.Tensor) or vv.dim() != 4:
        return "the value written into the KV buffer is not rank 4 [B, H, L, d]"
    return found[0], pos, value
