"""What each compression method is: one record per method, the one place that knows their names.

This module sits on the config floor (it imports nothing of the package): `config` validates
`method` against it, and the cache, the policies and the ONNX exporter ask a method's record
instead of listing names. The selection function is named ("module:function" of
`mdkv_compile.policies`), not imported, because the policies sit floors above;
`policies.registry` resolves the names once. A new method is one function in policies/ and one
`Method(...)` line here; the generic tests (budget, bytes, batch, budget 1.0 = unpatched) iterate
`RECORDS` and pick it up.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Method:
    name: str
    select: str  # "module:function" in mdkv_compile.policies: the LayerContext -> Selection policy
    # Per-layer schedule of the budget (policies/base.py, owner_budget): "uniform", or "pyramid"
    # (PyramidKV: lower layers keep more, cfg.pyramid_beta).
    budget_schedule: str = "uniform"
    # HeadKV budgets per KV head from head scores (cfg.head_scores, a `mdkv profile-heads` file).
    needs_head_scores: bool = False
    # Can store tokens below full dimension (reduced tiers with bases): exports carry basis inputs.
    stores_reduced_tiers: bool = False
    # Why the ONNX export cannot take this method (None: it can).
    not_exportable: str | None = None
    # First tokens always kept at full dimension when cfg.sink_tokens is None.
    default_sinks: int = 0

    @property
    def exportable(self) -> bool:
        return self.not_exportable is None


# pyramidkv and headkv are snapkv selection under other per-layer / per-head budgets.
RECORDS: dict[str, Method] = {
    m.name: m
    for m in (
        Method("full", "eviction:full"),
        Method("streamingllm", "eviction:streamingllm", default_sinks=4),
        Method("snapkv", "eviction:snapkv"),
        Method("pyramidkv", "eviction:snapkv", budget_schedule="pyramid"),
        Method("ada-snapkv", "eviction:ada_snapkv"),
        Method("headkv", "eviction:snapkv", needs_head_scores=True),
        Method(
            "lowrank", "mixeddim:lowrank", stores_reduced_tiers=True,
            not_exportable="its rank is chosen per prompt, so the tier list is not fixed at export",
        ),
        # Four sinks: at budgets under the window (1% of 2K tokens) the window alone is kept and the
        # first token's attention sink is lost: KL 1.06 -> 0.12 on Gemma 3, 0.26 on SmolLM2 with them,
        # and within 0.6% at 0.02-0.1 (docs/notes/quality_notes.md, section 13).
        Method("mixeddimkv", "mixeddim:mixeddimkv", stores_reduced_tiers=True, default_sinks=4),
        Method("mixeddimkv-h", "mixeddim:mixeddimkv", needs_head_scores=True, stores_reduced_tiers=True,
               default_sinks=4),
    )
}
METHOD_NAMES: tuple[str, ...] = tuple(RECORDS)


def method(name: str) -> Method:
    """The record of a method name (KeyError naming the known ones)."""
    try:
        return RECORDS[name]
    except KeyError:
        raise KeyError(f"unknown method {name!r}; known: {', '.join(METHOD_NAMES)}") from None
