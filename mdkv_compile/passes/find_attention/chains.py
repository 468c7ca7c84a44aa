"""Site shapes: SDPA calls and manual attention chains, read into a `RawSite`.

A manual chain is anchored at softmax and has the shape

    Scores, {Scale | MaskAdd | MaskFill | Where | Cast}*, Softmax, {Cast | Dropout}*, PV

`ABOVE_SOFTMAX` and `BELOW_SOFTMAX` give each element's canonical ops and the step that reads one
node of it; `manual_site` walks up from softmax to the scores product (q @ kᵀ through matmul /
bmm / einsum / baddbmm) and down to P @ V, and explains the first node that fits no element.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.fx import Node

from mdkv_compile.passes.find_attention.fx import (
    FUNCTION,
    METHOD,
    arg,
    canon,
    dtype,
    is_cast,
    is_op,
    shape,
    strip_casts,
    tensor_args,
)
from mdkv_compile.passes.find_attention.masks import ADD, ALLOW, BLOCK
from mdkv_compile.passes.find_attention.scale import ScaleAcc, strip_scale
from mdkv_compile.passes.find_attention.values import const, very_negative, zero_like


@dataclass
class RawSite:
    """An attention computation as read from the graph, before any proof."""

    kind: str  # "sdpa" | "manual"
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


def sdpa_site(n: Node) -> RawSite:
    """The site of an F.scaled_dot_product_attention call."""
    q, k, v = n.args[0], n.args[1], n.args[2]
    mask = arg(n, 3, "attn_mask")
    dropout_p = const(arg(n, 4, "dropout_p", 0.0)) or 0.0
    is_causal = bool(arg(n, 5, "is_causal", False))
    scale_arg = arg(n, 6, "scale", None)
    scale: float | None = None
    scale_ok, scale_node = True, None
    if scale_arg is not None:
        acc = ScaleAcc()
        acc.mul(scale_arg)
        scale, scale_ok, scale_node = acc.finish()
    use = None
    if isinstance(mask, Node):
        use = ALLOW if dtype(mask) == torch.bool else ADD
    mask = mask if isinstance(mask, Node) else None
    return RawSite("sdpa", q, k, v, mask, use, scale, scale_ok, is_causal, dropout_p, n, [n], scale_node=scale_node)


# ---------------------------------------------------------------------------------------------
# The manual shape as data


@dataclass
class _Walk:
    """What walking one manual chain collected."""

    why: list[str]  # the reason the chain is not understood (for the caller)
    below: list[Node]  # softmax, then the casts / dropouts below it
    up: list[Node] = field(default_factory=list)  # the nodes above softmax, walking up
    acc: ScaleAcc = field(default_factory=ScaleAcc)
    mask: Node | None = None
    use: str | None = None
    terms: list[tuple[Node, str]] = field(default_factory=list)  # every mask / bias on the scores
    dropout_p: float = 0.0
    escape: bool = False  # the probabilities are also used outside the chain

    def add_term(self, mask: Node, use: str) -> None:
        self.mask, self.use = mask, use
        self.terms.append((mask, use))


@dataclass(frozen=True)
class Element:
    """One element of the shape: the canonical ops that spell it ("cast": a Tensor-method cast)
    and the step that reads one node of it."""

    ops: tuple[str, ...]
    read: Callable[[Node, _Walk], Any]


def _unknown_op(node: Node) -> str:
    target = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", node.target)
    return f"'{target}' applied to the scores ({node.name}), e.g. soft-capping"


def _up_cast(node: Node, walk: _Walk) -> Node | None:
    return node.args[0]


def _up_scale(node: Node, walk: _Walk) -> Node | None:
    nxt = strip_scale(node, walk.acc)
    if nxt is node:
        walk.why.append(f"scores multiplied by a tensor ({node.name}), not a scalar")
        return None
    walk.up.extend(_between(nxt, node))
    return nxt


def _up_mask_add(node: Node, walk: _Walk) -> Node | None:
    a, b = node.args[:2]
    sa, sb = _leads_to_scores(a), _leads_to_scores(b)
    if sa == sb:
        walk.why.append(f"cannot tell scores from mask in {node.name}")
        return None
    walk.add_term(b if sa else a, ADD)
    return a if sa else b


def _up_mask_fill(node: Node, walk: _Walk) -> Node | None:
    if not very_negative(arg(node, 2, "value")):
        walk.why.append(f"masked_fill with a fill value that does not mask ({node.name})")
        return None
    walk.add_term(node.args[1], BLOCK)
    return node.args[0]


def _up_where(node: Node, walk: _Walk) -> Node | None:
    if len(node.args) != 3:
        walk.why.append(_unknown_op(node))
        return None
    c, a, b = node.args
    if _leads_to_scores(a) and very_negative(b):
        walk.add_term(c, ALLOW)
        return a
    if _leads_to_scores(b) and very_negative(a):
        walk.add_term(c, BLOCK)
        return b
    walk.why.append(f"torch.where that is not a mask ({node.name})")
    return None


def _down_cast(node: Node, walk: _Walk) -> None:
    pass


def _down_dropout(node: Node, walk: _Walk) -> None:
    p = const(arg(node, 1, "p", 0.5)) or 0.0
    walk.dropout_p = p if arg(node, 2, "training", True) else 0.0


SCORES = ("matmul", "bmm", "einsum", "baddbmm")
ABOVE_SOFTMAX = {
    "Cast": Element(("cast",), _up_cast),
    "Scale": Element(("mul", "div"), _up_scale),
    "MaskAdd": Element(("add",), _up_mask_add),
    "MaskFill": Element(("masked_fill", "masked_fill_"), _up_mask_fill),
    "Where": Element(("where",), _up_where),
}
BELOW_SOFTMAX = {
    "Cast": Element(("cast",), _down_cast),
    "Dropout": Element(("dropout",), _down_dropout),
}
PV = ("matmul", "bmm", "einsum")  # P @ V: matmul / bmm with P on the left, or an einsum

_ABOVE = {op: e.read for e in ABOVE_SOFTMAX.values() for op in e.ops}
_BELOW = {op: e.read for e in BELOW_SOFTMAX.values() for op in e.ops}


def _spelled(node: Node) -> str | None:
    return "cast" if is_cast(node) else canon(node)


def _is_scores_product(n: Any) -> bool:
    return is_op(n, *SCORES)


# ---------------------------------------------------------------------------------------------
# The matcher


def manual_site(sm: Node, why: list[str]) -> RawSite | None:
    """The manual chain around softmax `sm`, or None (with a reason appended to `why`)."""
    dim = arg(sm, 1, "dim", None)
    nd = len(shape(sm) or ())
    if dim is not None and nd and isinstance(dim, int) and dim % nd != nd - 1:
        return None
    walk = _Walk(why, below=[sm])
    found = _walk_down(sm, walk)
    if found is None:
        return None
    pv, v_rep = found
    scores = _walk_up(sm, walk)
    if scores is None:
        return None
    operands = _scores_operands(scores, walk)
    if operands is None:
        return None
    q_raw, kt, k_raw, bad_layout = operands
    q = strip_scale(q_raw, walk.acc)
    k = strip_scale(k_raw, walk.acc)
    v = strip_casts(v_rep)
    scale, scale_ok, scale_node = walk.acc.finish()
    chain = [scores, *reversed(walk.up), *walk.below, pv]
    # the scale / transpose / cast nodes between the scores op and the reported q, k, v
    for top, bottom in ((q_raw, q), (kt, k), (v_rep, v)):
        chain[:0] = [n for n in _chain_between(top, bottom) if n not in chain]
    return RawSite(
        "manual",
        q,
        k,
        v,
        walk.mask,
        walk.use,
        scale,
        scale_ok,
        False,
        walk.dropout_p,
        pv,
        chain,
        probs_escape=walk.escape,
        bad_layout=bad_layout,
        terms=walk.terms,
        scale_node=scale_node,
    )


def _below_kind(u: Node, cur: Node) -> str | None:
    """How user `u` of `cur` continues the chain below softmax: an element op, "pv" or None."""
    op = _spelled(u)
    if op in _BELOW:
        return op
    if op in PV and (op == "einsum" or u.args[0] is cur):
        return "pv"
    return None


def _walk_down(sm: Node, walk: _Walk) -> tuple[Node, Node] | None:
    """(P @ V node, v as it enters it) below softmax `sm`."""
    cur = sm
    for _ in range(6):
        users = list(cur.users)
        if len(users) != 1:
            # probabilities also used elsewhere (HF output_attentions, a graph output): follow the
            # one user that continues the chain, remember the escape
            users = [u for u in users if _below_kind(u, cur)]
            if len(users) != 1:
                return None
            walk.escape = True
        u = users[0]
        kind = _below_kind(u, cur)
        if kind == "pv":
            v_rep = _pv_values(u, cur)
            return (u, v_rep) if isinstance(v_rep, Node) else None
        if kind is None:
            return None
        _BELOW[kind](u, walk)
        walk.below.append(u)
        cur = u
    return None


def _pv_values(pv: Node, probs: Node) -> Any:
    """The values `pv` multiplies the probabilities with (None: not a product of them)."""
    if not is_op(pv, "einsum"):
        return pv.args[1]
    eo = _einsum_operands(pv)
    if eo is None or probs not in eo[1]:
        return None
    return eo[1][1] if eo[1][0] is probs else eo[1][0]


def _walk_up(sm: Node, walk: _Walk) -> Node | None:
    """The scores product above softmax `sm`, collecting scale and masks on the way."""
    node: Any = sm.args[0]
    for _ in range(12):
        if not isinstance(node, Node):
            return None
        if _is_scores_product(node):
            return node
        walk.up.append(node)
        read = _ABOVE.get(_spelled(node))  # type: ignore[arg-type]
        if read is None:
            walk.why.append(_unknown_op(node))
            return None
        node = read(node, walk)
        if node is None:  # the step said why
            return None
    walk.why.append("no q @ kᵀ within 12 ops above softmax")
    return None


def _scores_operands(scores: Node, walk: _Walk) -> tuple[Any, Any, Any, str] | None:
    """(q, kᵀ, k, layout problem) as the scores product reads them; q and k still carry their
    scale and casts."""
    if is_op(scores, "einsum"):
        return _einsum_scores_operands(scores)
    if is_op(scores, "baddbmm"):
        bias, q_raw, kt = scores.args[0], scores.args[1], scores.args[2]
        walk.acc.mul(arg(scores, 4, "alpha", 1.0))
        if arg(scores, 3, "beta", 1.0) != 0 and not zero_like(bias):
            walk.add_term(bias, ADD)  # ALiBi-style bias enters here; the mask analysis flags it
    else:
        q_raw, kt = scores.args[0], scores.args[1]
    k_raw = _k_from_kt(strip_scale(kt, walk.acc))
    if k_raw is None:
        return q_raw, kt, kt, "keys are not transposed from a [.., S, D] tensor"
    return q_raw, kt, k_raw, ""


def _einsum_scores_operands(scores: Node) -> tuple[Any, Any, Any, str] | None:
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
    return a, b, b, "" if sb.endswith(c) else f"einsum '{eq}': keys are not [.., S, D]"


def _einsum_operands(node: Node) -> tuple[str, list[Node]] | None:
    """(equation without spaces, [a, b]) of a two-operand einsum."""
    eq = node.args[0]
    ops = node.args[1:]
    if len(ops) == 1 and isinstance(ops[0], (list, tuple)):
        ops = ops[0]
    if not isinstance(eq, str) or len(ops) != 2:
        return None
    return eq.replace(" ", ""), list(ops)


def _k_from_kt(kt: Any) -> Node | None:
    """kᵀ -> k when kᵀ is a transpose/permute swapping the last two dims."""
    kt = strip_casts(kt)
    if not isinstance(kt, Node):
        return None
    if is_op(kt, "transpose"):
        nd = len(shape(kt) or ()) or 4
        dims = {int(d) % nd for d in kt.args[1:3]}
        if dims == {nd - 1, nd - 2}:
            return kt.args[0]
    if is_op(kt, "permute"):
        perm = kt.args[1] if isinstance(kt.args[1], (list, tuple)) else kt.args[1:]
        perm = [int(p) for p in perm]
        nd = len(perm)
        if perm == [*range(nd - 2), nd - 1, nd - 2]:
            return kt.args[0]
    if is_op(kt, "t", "mT"):
        return kt.args[0]
    return None


def _leads_to_scores(x: Any, depth: int = 0) -> bool:
    """Does `x` come from the scores product (through scale, masks and casts)?"""
    if not isinstance(x, Node) or depth > 8:
        return False
    if _is_scores_product(x):
        return True
    # masked_fill as a method follows its input only; the function spelling, input and mask
    if is_cast(x) or is_op(x, "masked_fill", "masked_fill_", forms=(METHOD,)):
        carriers = x.args[:1]
    elif is_op(x, "mul", "div", "add") or is_op(x, "masked_fill", forms=(FUNCTION,)):
        carriers = x.args[:2]
    elif is_op(x, "where"):
        carriers = x.args[1:3]
    else:
        return False
    return any(_leads_to_scores(a, depth + 1) for a in carriers)


def _chain_between(top: Any, bottom: Any, depth: int = 8) -> list[Node]:
    """Nodes from `top` down to (excluding) its ancestor `bottom`, following tensor args."""
    if not isinstance(top, Node) or top is bottom or depth == 0:
        return []
    for a in tensor_args(top):
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


def softmax_feeds_product(sm: Node) -> Node | None:
    """The product softmax `sm` feeds through casts and dropout (attention-like), or None."""
    cur = sm
    for _ in range(6):
        nxt = [u for u in cur.users if is_cast(u) or is_op(u, "dropout", *SCORES)]
        if len(nxt) != 1:
            return None
        if _is_scores_product(nxt[0]):
            return nxt[0]
        cur = nxt[0]
    return None
