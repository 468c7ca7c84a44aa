"""Compression policies by name: one interface (`LayerContext -> Selection`), one budget."""

from __future__ import annotations

from collections.abc import Callable

from mdkv_compile.policies import eviction, mixeddim
from mdkv_compile.policies.base import LayerContext, Selection

Policy = Callable[[LayerContext], Selection]

# pyramidkv and headkv are snapkv selection under other per-layer / per-head budgets, which
# `owner_budget` applies from the config's method and the head shares.
POLICIES: dict[str, Policy] = {
    "full": eviction.full,
    "streamingllm": eviction.streamingllm,
    "snapkv": eviction.snapkv,
    "pyramidkv": eviction.snapkv,
    "ada-snapkv": eviction.ada_snapkv,
    "headkv": eviction.snapkv,
    "lowrank": mixeddim.lowrank,
    "mixeddimkv": mixeddim.mixeddimkv,
    "mixeddimkv-h": mixeddim.mixeddimkv,
}

__all__ = ["POLICIES", "LayerContext", "Policy", "Selection"]
