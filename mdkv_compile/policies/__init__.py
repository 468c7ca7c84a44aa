"""Compression policies: one interface (`LayerContext -> Selection`), one budget; `select` runs
the config's method (its record: `mdkv_compile.methods`, its function: `registry.POLICIES`)."""

from __future__ import annotations

from mdkv_compile.policies.base import LayerContext, Selection
from mdkv_compile.policies.registry import POLICIES, Policy, select

__all__ = ["POLICIES", "LayerContext", "Policy", "Selection", "select"]
