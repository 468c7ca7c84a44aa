"""GQA / MQA: the un-repeated keys and values behind repeat_kv, repeat_interleave or expand."""

from __future__ import annotations

from torch.fx import Node

from mdkv_compile.passes.find_attention.fx import FUNCTION, arg, is_op, shape
from mdkv_compile.passes.find_attention.values import const


def unrepeat(node: Node) -> tuple[Node, int]:
    """Strip repeat_kv (getitem None -> expand -> reshape) or repeat_interleave; (base, group)."""
    n = node
    while is_op(n, "contiguous"):
        n = n.args[0]
    repeated = _repeat_kv(n)
    if repeated is not None:
        return repeated
    if is_op(n, "repeat_interleave"):
        reps = const(arg(n, 1, "repeats"))
        if reps is not None:
            return n.args[0], int(reps)
    if is_op(n, "expand"):  # MQA: [B, 1, S, D] -> [B, H, S, D]
        bs, es = shape(n.args[0]), shape(n)
        if bs and es and len(bs) == len(es) == 4 and bs[1] == 1 and es[1] > 1:
            return n.args[0], es[1]
    return node, 1


def _repeat_kv(n: Node) -> tuple[Node, int] | None:
    """HF repeat_kv: x[:, :, None] (or unsqueeze) -> expand -> reshape; (x, repeats)."""
    if not is_op(n, "reshape", "view", "flatten"):
        return None
    e = n.args[0]
    if not is_op(e, "expand"):
        return None
    g = e.args[0]
    base = None
    if is_op(g, "getitem", forms=(FUNCTION,)) and isinstance(g.args[1], tuple) and None in g.args[1]:
        base = g.args[0]
    elif is_op(g, "unsqueeze"):
        base = g.args[0]
    if not isinstance(base, Node):
        return None
    es = shape(e)
    bs = shape(base)
    rep = es[2] if es and len(es) == 5 else (es[-3] if es else 1)
    if bs and es and len(es) == len(bs) + 1:
        rep = es[len(bs) - 2] if len(bs) >= 2 else rep
    return base, int(rep)
