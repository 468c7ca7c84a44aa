"""The attention scale: scalar factors on q, k or the scores, multiplied into one number."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch.fx import Node

from mdkv_compile.passes.find_attention.fx import is_cast, is_op, shape
from mdkv_compile.passes.find_attention.values import const
from mdkv_compile.passes.graph_writes import node_value


class ScaleAcc:
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
        c = const(x)
        if c is None:
            v = node_value(x)
            if isinstance(v, torch.SymFloat | torch.SymInt) and not inverse and self.node is None:
                self.node = x
                h = v.node.hint
                c = float(h) if h is not None else math.nan
            else:
                self.ok = False  # e.g. a tensor computation: not a number we can pass on
                return
        self.value = self.value / c if inverse else self.value * c

    def finish(self) -> tuple[float, bool, Node | None]:
        """(scale, whether a rewrite can pass it on, the symbolic factor or None)."""
        if self.node is not None:
            hint = node_value(self.node).node.hint
            # the symbolic factor must be the whole scale, or the rewrite would drop the rest
            only = hint is not None and math.isclose(self.value, float(hint))
            return self.value, self.ok and only, self.node
        return self.value, self.ok, None


def strip_scale(node: Any, acc: ScaleAcc) -> Any:
    """Walk up through scalar mul/div and casts (q * s, k / sqrt(d)), accumulating the scale."""
    while isinstance(node, Node):
        if is_cast(node):
            node = node.args[0]
        elif is_op(node, "mul") and len(node.args) == 2:
            a, b = node.args
            if isinstance(a, Node) and not _is_scalarish(a) and _is_scalarish(b):
                acc.mul(b)
                node = a
            elif isinstance(b, Node) and not _is_scalarish(b) and _is_scalarish(a):
                acc.mul(a)
                node = b
            else:
                return node
        elif is_op(node, "div") and len(node.args) == 2:
            a, b = node.args
            if not (isinstance(a, Node) and not _is_scalarish(a) and _is_scalarish(b)):
                return node
            acc.mul(b, inverse=True)
            node = a
        else:
            return node
    return node


def _is_scalarish(x: Any) -> bool:
    """A number, or a tensor of one element."""
    if not isinstance(x, Node):
        return True
    shp = shape(x)
    v = node_value(x)
    return not isinstance(v, torch.Tensor) or shp == () or (shp is not None and math.prod(shp) == 1)
