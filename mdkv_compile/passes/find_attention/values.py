"""Constant values read from the graph: numbers, all-ones / all-zeros tensors, fills very
negative enough to mask a score."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch.fx import Node

from mdkv_compile.passes.find_attention.fx import arg, canon, is_cast, is_op, shape
from mdkv_compile.passes.graph_writes import node_value

NEG_LIMIT = -1e4  # a fill value this negative zeroes the softmax weight in fp16/bf16/fp32


def const(x: Any) -> float | None:
    """A Python number (or a node Dynamo specialised to one), else None."""
    if isinstance(x, bool):
        return float(x)
    if isinstance(x, (int, float)):
        return float(x)
    if isinstance(x, Node):
        v = node_value(x)
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            return float(v)
        if is_op(x, "full") and tuple(arg(x, 0, "size", (1,))) == ():  # torch.full([], c)
            return const(arg(x, 1, "fill_value"))
        if is_op(x, "tensor", "scalar_tensor") and not isinstance(x.args[0], (list, tuple)):
            return const(x.args[0])
        if is_op(x, "to", "float", "type") and shape(x) == ():
            return const(x.args[0])
        if isinstance(v, torch.SymFloat | torch.SymInt):
            # only sizes that are constants for every input: a hint holds for this trace alone
            expr = v.node.expr
            return float(expr) if getattr(expr, "is_number", False) else None
    return None


def ones_like(node: Any) -> bool:
    """An all-ones tensor (through casts and reshapes)."""
    if not isinstance(node, Node):
        return False
    if is_op(node, "ones", "ones_like", "new_ones"):
        return True
    if is_op(node, "full", "full_like", "new_full", "fill_"):
        return const(arg(node, 1, "fill_value")) == 1.0
    if is_cast(node) or is_op(node, "bool", "expand", "view", "reshape"):
        return ones_like(node.args[0])
    return False


def very_negative(x: Any) -> bool:
    """A fill value that masks a score: -inf, finfo.min or anything at most NEG_LIMIT."""
    c = const(x)
    if c is not None:
        return c <= NEG_LIMIT or c == -math.inf
    if isinstance(x, Node):
        if is_op(x, "finfo"):
            return False
        if is_op(x, "getattr") and x.args[1] == "min":
            return True  # torch.finfo(dtype).min
        if is_op(x, "tensor", "full", "scalar_tensor", "new_full", "new_tensor"):
            return very_negative(arg(x, 1 if canon(x) in ("full", "new_full") else 0, "fill_value"))
    return False


def zero_like(x: Any) -> bool:
    """Zero, or an all-zeros tensor."""
    c = const(x)
    if c is not None:
        return c == 0.0
    if isinstance(x, Node):
        if is_op(x, "zeros", "zeros_like", "new_zeros"):
            return True
        if is_op(x, "tensor", "scalar_tensor"):
            return const(x.args[0]) == 0.0
        if is_op(x, "full", "full_like", "new_full"):
            return const(arg(x, 1, "fill_value")) == 0.0
    return False
