"""Causality of masks: the polarity of a mask node, proven from the ops that built it.

Polarity of a boolean / float mask as it is consumed:
  ALLOW: bool, True = may attend, and the allowed set is inside the causal triangle
  BLOCK: bool, True = masked out, and every future position is masked
  ADD:   float additive, 0 where allowed, very negative at every future position
  NAMED: an un-analysable graph input named like an HF attention mask

`mask_kind` reads a mask bottom-up: graph inputs (triangular buffers, named mask inputs) are the
leaves, and `MASK_RULES` gives, for each canonical op, how the polarity of its operands carries
over to its result (kept by layout ops, flipped by negations, proven by an index comparison or a
triangle, turned additive by where / masked_fill, combined by and / or).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.fx import Node

from mdkv_compile.passes.find_attention.fx import (
    CASTS,
    DUNDER,
    FUNCTION,
    METHOD,
    UpstreamWalk,
    arg,
    canon,
    dtype,
    is_buffer,
    is_op,
    is_param,
    same_size,
    shape,
    sym,
    sym_dims,
    tensor_args,
)
from mdkv_compile.passes.find_attention.provenance import depends_on_param
from mdkv_compile.passes.find_attention.values import NEG_LIMIT, const, ones_like, very_negative, zero_like

ALLOW, BLOCK, ADD, NAMED = "allow", "block", "additive", "named"
WINDOW, NEUTRAL, PADDING = "window", "neutral", "padding"  # only meaningful inside an intersection
_FLIP = {ALLOW: BLOCK, BLOCK: ALLOW}

_MASK_NAME = re.compile(r"(causal_mask|attention_mask|attn_mask|attn_bias|\bmask)", re.I)


class MaskCtx:
    """What reading one site's mask found beside its polarity (proof, bias, window, padding)."""

    def __init__(self, example_inputs: Sequence[Any] | None, placeholders: list[Node]):
        self.example_inputs = example_inputs
        self.placeholders = placeholders
        self.reset()

    def reset(self) -> None:
        self.has_bias = False
        self.proof = ""
        self.window: int | None = None
        self.padding = False
        self.note = ""  # why a recognised causal pattern was rejected

    def real_value(self, node: Node) -> torch.Tensor | None:
        """The real tensor behind a get_attr or an example input (never a FakeTensor)."""
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


def mask_kind(node: Any, ctx: MaskCtx, depth: int = 0) -> str | None:
    """Polarity of a causal mask node (ALLOW / BLOCK / ADD / NAMED), or None if not provable."""
    if not isinstance(node, Node) or depth > 40:
        return None
    if node.op in ("placeholder", "get_attr"):
        return _input_kind(node, ctx)
    rule = MASK_RULES.get(canon(node))  # type: ignore[arg-type]
    return rule(node, ctx, depth) if rule else None


def _input_kind(node: Node, ctx: MaskCtx) -> str | None:
    if is_param(node):
        return None
    # only module buffers: a plain graph input is per-call data, its example proves nothing
    real = ctx.real_value(node) if is_buffer(node) else None
    if real is not None:
        kind = _tri_value(real)
        if kind:
            ctx.proof = ctx.proof or f"lower-triangular buffer {node.name}"
            return kind
    if node.op == "placeholder" and not is_buffer(node) and _MASK_NAME.search(node.name):
        return NAMED
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
    if bool((m[tril] == 0).all()) and bool((m[~tril] <= NEG_LIMIT).all()):
        return ADD
    return None


# ---------------------------------------------------------------------------------------------
# Index comparisons: kv_idx <= q_idx (HF masking_utils, gpt-fast, hand-written)

_UNDECIDED = ("", 0.0)  # an indexing op that names no role: decide by the other readings


def _index_role(node: Any, depth: int = 0) -> tuple[str, float] | None:
    """('q', off) for a column of query positions ([..., Lq, 1]) plus a constant offset added *after*
    the column was formed, ('kv', off) for a row of key positions. Offsets added to the arange
    before indexing are part of the absolute positions (cache offset) and count as 0."""
    if not isinstance(node, Node) or depth > 12:
        return None
    if is_op(node, "add", "sub"):
        a, b = node.args[:2]
        sign = -1.0 if canon(node) == "sub" else 1.0
        c = const(b)
        r = _index_role(a, depth + 1) if c is not None and isinstance(a, Node) else None
        return (r[0], r[1] + sign * c) if r and c is not None else None
    role = _indexing_role(node)
    if role is not _UNDECIDED:
        return role
    # Tensor-method spellings only: torch.reshape(x) is read by its shape below
    if is_op(node, *CASTS, "expand", "view", "reshape", forms=(METHOD,)):
        return _index_role(node.args[0], depth + 1)
    shp = shape(node)
    if shp and len(shp) >= 2:
        if shp[-1] == 1 and shp[-2] > 1:
            return "q", 0.0
        if shp[-2] == 1 and shp[-1] > 1:
            return "kv", 0.0
    return None


def _indexing_role(node: Node) -> tuple[str, float] | None:
    """The role a `positions[..., :, None]` index or an unsqueeze gives, None for an index that
    gives none, _UNDECIDED for anything else."""
    if is_op(node, "getitem", forms=(FUNCTION,)) and isinstance(node.args[1], tuple):
        idx = node.args[1]
        kept = [i for i, x in enumerate(idx) if x is not None]
        if len(idx) >= 2 and len(kept) == 1 and kept[0] == len(idx) - 2:
            return "q", 0.0  # positions[..., :, None]
        if len(idx) >= 2 and len(kept) == 1 and kept[0] == len(idx) - 1:
            return "kv", 0.0  # positions[..., None, :]
        if kept and all(isinstance(x, slice) or x is None for x in idx):
            return None  # e.g. batch_arange[:, None, None, None]
    if is_op(node, "unsqueeze"):
        d = arg(node, 1, "dim")
        nd = len(shape(node) or ())
        if isinstance(d, int) and nd:
            return ("q" if d % nd == nd - 1 else "kv"), 0.0
    return _UNDECIDED


_MIRRORED = {"le": "ge", "ge": "le", "lt": "gt", "gt": "lt"}
# "kv_idx OP q_idx + off" -> (polarity, proof)
_CAUSAL_COMPARISONS = {
    ("le", 0.0): (ALLOW, "mask: kv_idx <= q_idx"),
    ("lt", 1.0): (ALLOW, "mask: kv_idx < q_idx + 1"),
    ("gt", 0.0): (BLOCK, "mask: kv_idx > q_idx masked"),
}


def _index_comparison(node: Node, ctx: MaskCtx, depth: int) -> str | None:
    if len(node.args) < 2:
        return None
    ra, rb = _index_role(node.args[0]), _index_role(node.args[1])
    if not (ra and rb and {ra[0], rb[0]} == {"q", "kv"}):
        return None
    kv, q = (ra, rb) if ra[0] == "kv" else (rb, ra)
    op = canon(node)
    op = op if ra[0] == "kv" else _MIRRORED[op]  # type: ignore[index]
    off = q[1] - kv[1]
    causal = _CAUSAL_COMPARISONS.get((op, off))  # type: ignore[arg-type]
    if causal:
        ctx.proof = ctx.proof or causal[1]
        return causal[0]
    if op in ("gt", "ge") and off < 0:
        # kv_idx > q_idx - W: a sliding window, a restriction on top of causality
        ctx.window = int(-off) if op == "gt" else int(-off) + 1  # keys kept per query
        return WINDOW
    return None


# ---------------------------------------------------------------------------------------------
# Triangles: tril / triu with a diagonal that matches the cached keys


def _causal_diagonal(node: Node) -> tuple[float, float] | None:
    """(diagonal, past keys) of a tril / triu over [.., queries, keys]; the diagonal is nan unless
    it equals past or past + 1 for every value of the shape symbols."""
    diag = sym(arg(node, 1, "diagonal", 0))
    dims = sym_dims(node)
    if diag is None or not dims or len(dims) < 2 or dims[-1] is None or dims[-2] is None:
        return None
    # rows are queries, columns keys; with a cache of P = S - T past keys the causal diagonal
    # is P (tril) / P + 1 (triu): any other diagonal drops or leaks keys. Compared symbolically
    # so that a diagonal that only matches the traced sizes is rejected.
    past_expr = dims[-1] - dims[-2]
    shp = shape(node)
    past = float(shp[-1] - shp[-2]) if shp and len(shp) >= 2 else 0.0
    if same_size(diag, past_expr):
        return past, past
    if same_size(diag, past_expr + 1):
        return past + 1, past
    return math.nan, past


def _triangle(node: Node, ctx: MaskCtx, depth: int) -> str | None:
    found = _causal_diagonal(node)
    if found is None:
        return None
    diag, past = found
    lower = canon(node) == "tril"
    base = node.args[0]
    if diag not in (past, past + 1):
        ctx.note = ctx.note or f"{node.target} diagonal does not match the {int(past)} past keys"
    if ones_like(base):
        if lower and diag == past:
            ctx.proof = ctx.proof or ("mask: tril(ones)" if not past else f"mask: tril(ones, {int(past)})")
            return ALLOW
        if not lower and diag == past + 1:
            ctx.proof = ctx.proof or f"mask: triu(ones, {int(past) + 1})"
            return BLOCK
    fill = arg(base, 1, "fill_value") if is_op(base, "full") else None
    if not lower and diag == past + 1 and very_negative(fill):
        ctx.proof = ctx.proof or "mask: triu(full(-inf), 1)"
        return ADD
    return None


# ---------------------------------------------------------------------------------------------
# Polarity transfers: negations and layout ops


@dataclass(frozen=True)
class _Transfer:
    """The result's polarity is `polarity[operand's polarity]`, where the operand is argument
    `operand`; `constant` = (i, c): argument i must be the number c; `arity`: the exact
    number of positional arguments, when it matters."""

    operand: int
    polarity: dict[str, str]
    constant: tuple[int, float] | None = None
    arity: int | None = None


_SAME_BOOL = {ALLOW: ALLOW, BLOCK: BLOCK}
_TRANSFERS = {
    "logical_not": _Transfer(0, _FLIP),
    "eq": _Transfer(0, _FLIP, constant=(1, 0.0)),  # m == 0
    "ne": _Transfer(0, _SAME_BOOL, constant=(1, 0.0)),  # m != 0
    "sub": _Transfer(1, _FLIP, constant=(0, 1.0), arity=2),  # 1 - m
    "rsub": _Transfer(1, _FLIP, constant=(0, 1.0), arity=2),
}


def _transfer(node: Node, ctx: MaskCtx, depth: int) -> str | None:
    t = _TRANSFERS[canon(node)]  # type: ignore[index]
    if t.arity is not None and len(node.args) != t.arity:
        return None
    if t.constant is not None and const(node.args[t.constant[0]]) != t.constant[1]:
        return None
    k = mask_kind(node.args[t.operand], ctx, depth + 1)
    return t.polarity.get(k) if k else None  # type: ignore[arg-type]


def _one_minus(node: Node, ctx: MaskCtx, depth: int) -> str | None:
    if is_op(node, "sub", forms=(DUNDER,)):  # x.__sub__(y) called by name is not read as 1 - m
        return None
    return _transfer(node, ctx, depth)


# shape / dtype / device / slicing ops keep polarity (not transpose/permute: they flip it)
_KEEPS_POLARITY = ("getitem", "reshape", "unsqueeze", "squeeze", "clone", "view", "expand", "expand_as", "contiguous")
_KEEPS_POLARITY += ("to", "bool", "float", "half", "bfloat16", "type", "type_as", "detach", "int", "long")


def _keep(node: Node, ctx: MaskCtx, depth: int) -> str | None:
    k = mask_kind(node.args[0], ctx, depth + 1)
    if k in (ALLOW, BLOCK, ADD) and is_op(node, "getitem", forms=(FUNCTION,)) and not _causal_slice(node):
        ctx.note = ctx.note or f"causal mask slice {node.name} is not aligned with the keys"
        return None
    return k


def _causal_slice(node: Node) -> bool:
    """Does `mask[idx]` keep a causal [.., rows=queries, cols=keys] mask aligned?

    Keys must start at column 0; sliced query rows must be the last T of the K keys (GPT-2's
    `bias[:, :, K-T:K, :K]`). Rows picked by a position tensor (gpt-fast `mask[None, None, pos]`)
    follow the absolute-position convention of a static cache and are accepted.
    """
    base_shape, out_shape = shape(node.args[0]), shape(node)
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
        out_dims = sym_dims(node) or []
        if len(out_dims) < 2 or None in out_dims[-2:]:
            return False
        return same_size(sym(row.start) if row.start is not None else 0, out_dims[-1] - out_dims[-2])
    if isinstance(row, Node):
        return True
    return not isinstance(row, int)  # a single int row drops the query axis: unknown alignment


# ---------------------------------------------------------------------------------------------
# Intersections and unions: padding masks keep the causal guarantee; anything we cannot name
# (an unknown restriction) makes the mask unprovable


def _intersection(node: Node, ctx: MaskCtx, depth: int) -> str | None:
    kinds = [_combine_operand(a, ctx, depth, ALLOW) for a in node.args[:2]]
    if None in kinds:
        return None
    if ALLOW in kinds:
        return ALLOW
    if NAMED in kinds:
        return NAMED
    return NEUTRAL  # only windows / padding so far: neutral inside a larger intersection


def _union(node: Node, ctx: MaskCtx, depth: int) -> str | None:
    kinds = [_combine_operand(a, ctx, depth, BLOCK) for a in node.args[:2]]
    if None in kinds:
        return None
    if BLOCK in kinds:
        return BLOCK
    return NAMED if NAMED in kinds else None


def _combine_operand(node: Any, ctx: MaskCtx, depth: int, want: str) -> str | None:
    """Classify one operand of a mask intersection (want=ALLOW) or union (want=BLOCK)."""
    if not isinstance(node, Node):
        c = const(node)
        return NEUTRAL if c is not None and (c == 1.0) == (want == ALLOW) else None
    k = mask_kind(node, ctx, depth + 1)
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
    if want == ALLOW and ones_like(node):
        return NEUTRAL
    return padding_kind(node, ctx)


def padding_kind(node: Node, ctx: MaskCtx, budget: int = 200) -> str | None:
    """A per-key padding term: built from a mask-named graph input (PADDING) or from constant ones
    (NEUTRAL, e.g. OPT's default all-ones mask), indexed by key positions, never by query ones."""
    walk, named = UpstreamWalk(node, budget), False
    for n in walk:
        if n.op == "placeholder":
            if is_param(n) or is_buffer(n) or not _MASK_NAME.search(n.name):
                return None
            named = True
            continue
        if ones_like(n) or is_op(n, "arange"):
            continue
        r = _index_role(n) if is_op(n, "getitem", forms=(FUNCTION,)) else None
        if r and r[0] == "q":
            return None
        walk.push(tensor_args(n))
    if walk.cut_short:
        return None  # not provable
    if named:
        ctx.padding = True
        return PADDING
    return NEUTRAL


# ---------------------------------------------------------------------------------------------
# Bool -> additive conversions and sums


def _where(node: Node, ctx: MaskCtx, depth: int) -> str | None:
    if len(node.args) != 3:
        return None
    c, a, b = node.args
    k = mask_kind(c, ctx, depth + 1)
    # where(allow, 0, -inf) is a pure mask; where(allow, bias, -inf) also carries a bias (T5)
    if k == ALLOW and very_negative(b):
        ctx.has_bias |= not zero_like(a)
        return ADD
    if k == BLOCK and very_negative(a):
        ctx.has_bias |= not zero_like(b)
        return ADD
    return NAMED if k == NAMED else None


def _masked_fill(node: Node, ctx: MaskCtx, depth: int) -> str | None:
    base, m, val = node.args[0], node.args[1], arg(node, 2, "value")
    k = mask_kind(m, ctx, depth + 1)
    if k == BLOCK and very_negative(val):
        ctx.has_bias |= not (zero_like(base) or mask_kind(base, ctx, depth + 1) == ADD)
        return ADD
    return NAMED if k == NAMED else None


def _product(node: Node, ctx: MaskCtx, depth: int) -> str | None:
    a, b = node.args[:2]
    if dtype(node) == torch.bool:  # bool * bool is an intersection
        kinds = [_combine_operand(x, ctx, depth, ALLOW) for x in (a, b)]
        return None if None in kinds else (ALLOW if ALLOW in kinds else None)
    for x, y in ((a, b), (b, a)):
        k = mask_kind(x, ctx, depth + 1) if isinstance(x, Node) else None
        if k == BLOCK and very_negative(y):  # (1 - allow) * finfo.min
            return ADD
    return None


def _sum(node: Node, ctx: MaskCtx, depth: int) -> str | None:
    a, b = node.args[:2]
    ka, kb = mask_kind(a, ctx, depth + 1), mask_kind(b, ctx, depth + 1)
    if ADD in (ka, kb):
        other = b if ka == ADD else a
        if (ka if other is a else kb) not in (ADD, NAMED) and (
            depends_on_param(other) or not isinstance(other, Node) or padding_kind(other, ctx) is None
        ):
            ctx.has_bias = True  # ALiBi / relative-position bias, or an unknown additive term
        return ADD
    if NAMED in (ka, kb):
        other = b if ka == NAMED else a
        if depends_on_param(other):
            ctx.has_bias = True
        return NAMED
    return None


MaskRule = Callable[[Node, MaskCtx, int], str | None]

# canonical op -> how the polarity of its operands carries over to its result
MASK_RULES: dict[str, MaskRule] = {
    **dict.fromkeys(("le", "ge", "lt", "gt"), _index_comparison),
    "tril": _triangle,
    "triu": _triangle,
    "logical_not": _transfer,
    "eq": _transfer,
    "ne": _transfer,
    "sub": _one_minus,
    "rsub": _one_minus,
    "logical_and": _intersection,
    "logical_or": _union,
    "where": _where,
    "masked_fill": _masked_fill,
    "masked_fill_": _masked_fill,
    "mul": _product,
    "add": _sum,
    "add_": _sum,
    **dict.fromkeys(_KEEPS_POLARITY, _keep),
}
