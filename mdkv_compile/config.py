"""`MixedDimKVConfig`: what to compress, how much, and with which method.

Every bad value raises `ValueError` naming the field, the value and what is allowed. Checks that
need the model (does `dims` fit the head dimension?) run in `resolve_dims`, which `patch()` and
`MixedDimCache` call with the model's config.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from mdkv_compile.methods import METHOD_NAMES, RECORDS

# Method names (public: `mdkv.METHODS`), from the one record per method in methods.py.
METHODS = METHOD_NAMES
BASES = ("prompt", "calibrated")
BASIS_SOLVERS = ("subspace", "eigh")
POOLS = ("head", "layer")
SOLVERS = ("greedy", "exact")
LOSSES = ("attention", "energy")
KERNELS = ("auto", "torch")
MAX_TIERS = 4  # reduced tiers a store may hold (the kernels' tier slots)


def _fail(name: str, value: Any, allowed: str) -> None:
    raise ValueError(f"MixedDimKVConfig.{name}={value!r} is invalid: {allowed}")


@dataclass
class MixedDimKVConfig:
    """Configuration of KV-cache compression.

    Give exactly one budget: `budget` (fraction of the full cache of the prompt, in (0, 1]),
    `budget_tokens` (full-dimension token equivalents per KV head and layer) or `budget_bytes`
    (bytes per sequence over all layers, bases and bookkeeping included). With none, `budget`
    is 0.0625.
    """

    budget: float | None = None
    budget_tokens: int | None = None
    budget_bytes: int | None = None
    method: str = "mixeddimkv"
    # Candidate stored dimensions per token, keys and values alike; must contain 0 and the head
    # dimension. None: (0, d/8, d/4, d/2, d) for the model's head dimension d (lowrank's ranks;
    # mixeddimkv's tiers when `tiers` is None and `dims` is given).
    dims: tuple[int, ...] | None = None
    # mixeddimkv's reduced tiers as (key dims, value dims) pairs: a token is evicted, kept whole or
    # stored at one of these. None with dims None: (d/8, d/8), (d/4, d/8), (d/2, d/4), (d, d/2):
    # keys keep twice the dims of values (logit errors cost more than value errors, measured in
    # docs/notes/quality_notes.md); at most 4 pairs (the kernels' tier slots).
    tiers: tuple[tuple[int, int], ...] | None = None
    # The last `window` prompt tokens score the others and are kept at full dimension.
    window: int = 32
    pool_kernel: int = 7
    # First tokens always kept at full dimension. None: the method's default (4 for streamingllm, else 0).
    sink_tokens: int | None = None
    basis: str = "prompt"
    basis_path: str | None = None  # safetensors file from `mdkv_compile.hf.calibrate.calibrate`
    # How a prompt basis is computed: "subspace" (a few sync-free subspace iterations, within ~1-2%
    # of the exact basis' captured energy; core/bases.py) or "eigh" (exact eigenvectors; on CUDA
    # a slow batched Jacobi solver that synchronises). Calibration always uses eigh.
    basis_solver: str = "subspace"
    pool: str = "head"
    # Per-token loss of a reduced dimension: "attention" (error it puts into the attention output,
    # from the window queries' logit error and the value error) or "energy" (importance-weighted
    # residual energy of key and value, mixed by key_weight).
    loss: str = "attention"
    # The attention loss's weight of a value's relative error against a key's mass bias.
    value_weight: float = 0.3
    key_weight: float = 0.5
    head_scores: str | None = None  # JSON from `mdkv profile-heads` (headkv, mixeddimkv-h)
    # HeadKV: each head keeps 1 - 1/beta of its uniform budget; the rest is pooled over the model
    # and handed out by head score (policies/base.py, owner_budget).
    head_beta: float = 1.2
    head_temp: float = 1.0
    pyramid_beta: float = 20.0
    # Rank of `lowrank` (Palu-like: every token at one dimension). None: chosen from the budget.
    lowrank_dim: int | None = None
    solver: str = "greedy"
    # Triton kernels: "auto" uses them on CUDA (decode attention for one-token steps; window scoring
    # and logit errors at compression, kernels/compression.py), "torch" always uses the PyTorch
    # references (core/attention.py, core/scoring.py, core/losses.py).
    kernel: str = "auto"

    def __post_init__(self) -> None:
        given = [n for n in ("budget", "budget_tokens", "budget_bytes") if getattr(self, n) is not None]
        if len(given) > 1:
            _fail(given[1], getattr(self, given[1]), f"give only one of budget, budget_tokens, budget_bytes "
                  f"(also got {given[0]}={getattr(self, given[0])!r})")
        if not given:
            self.budget = 0.0625
        if self.budget is not None:
            if isinstance(self.budget, bool) or not isinstance(self.budget, int | float) or not (
                0.0 < float(self.budget) <= 1.0
            ):
                _fail("budget", self.budget, "a fraction of the full cache in (0, 1]")
            self.budget = float(self.budget)
        if self.budget_tokens is not None and (
            isinstance(self.budget_tokens, bool) or not isinstance(self.budget_tokens, int) or self.budget_tokens < 1
        ):
            _fail("budget_tokens", self.budget_tokens, "a positive int (full-token equivalents per KV head)")
        if self.budget_bytes is not None and (
            isinstance(self.budget_bytes, bool) or not isinstance(self.budget_bytes, int) or self.budget_bytes < 1
        ):
            _fail("budget_bytes", self.budget_bytes, "a positive int (bytes per sequence)")
        if self.method not in METHODS:
            _fail("method", self.method, f"one of {', '.join(METHODS)}")
        if self.dims is not None:
            dims = tuple(self.dims) if isinstance(self.dims, list | tuple) else None
            if not dims or not all(isinstance(r, int) and not isinstance(r, bool) and r >= 0 for r in dims):
                _fail("dims", self.dims, "a tuple of non-negative ints containing 0 and the head dimension")
            if len(set(dims)) != len(dims):
                _fail("dims", self.dims, "distinct values")
            if 0 not in dims:
                _fail("dims", self.dims, "must contain 0 (evicted tokens)")
            if len(dims) < 2:
                _fail("dims", self.dims, "must contain 0 and the head dimension")
            self.dims = tuple(sorted(dims))
        for name in ("window", "pool_kernel"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                _fail(name, value, "a positive int")
        if self.pool_kernel % 2 == 0:
            _fail("pool_kernel", self.pool_kernel, "an odd int (centred max-pool)")
        if self.sink_tokens is not None and (
            isinstance(self.sink_tokens, bool) or not isinstance(self.sink_tokens, int) or self.sink_tokens < 0
        ):
            _fail("sink_tokens", self.sink_tokens, "None or a non-negative int")
        if self.basis not in BASES:
            _fail("basis", self.basis, f"one of {', '.join(BASES)}")
        if self.basis_solver not in BASIS_SOLVERS:
            _fail("basis_solver", self.basis_solver, f"one of {', '.join(BASIS_SOLVERS)}")
        if self.basis == "calibrated" and not self.basis_path:
            _fail("basis_path", self.basis_path, "a safetensors file from calibrate() when basis='calibrated'")
        if self.pool not in POOLS:
            _fail("pool", self.pool, f"one of {', '.join(POOLS)}")
        if self.solver not in SOLVERS:
            _fail("solver", self.solver, f"one of {', '.join(SOLVERS)}")
        if self.kernel not in KERNELS:
            _fail("kernel", self.kernel, f"one of {', '.join(KERNELS)}")
        if self.loss not in LOSSES:
            _fail("loss", self.loss, f"one of {', '.join(LOSSES)}")
        if not 0.0 <= self.key_weight <= 1.0:
            _fail("key_weight", self.key_weight, "a float in [0, 1]")
        if self.head_beta < 1.0:
            _fail("head_beta", self.head_beta, "a float >= 1 (HeadKV's beta)")
        if self.head_temp <= 0:
            _fail("head_temp", self.head_temp, "a positive float")
        if self.pyramid_beta <= 0:
            _fail("pyramid_beta", self.pyramid_beta, "a positive float")
        if RECORDS[self.method].needs_head_scores and not self.head_scores:
            _fail("head_scores", self.head_scores, f"a JSON file from `mdkv profile-heads` for method={self.method!r}")
        if self.lowrank_dim is not None and (not isinstance(self.lowrank_dim, int) or self.lowrank_dim < 1):
            _fail("lowrank_dim", self.lowrank_dim, "None or a positive int")
        if isinstance(self.value_weight, bool) or not isinstance(self.value_weight, int | float) or not (
            0.0 <= self.value_weight < float("inf")
        ):
            _fail("value_weight", self.value_weight, "a non-negative finite float")
        if self.tiers is not None:
            self._check_tiers()

    def _check_tiers(self) -> None:
        tiers = self.tiers
        ok = isinstance(tiers, list | tuple) and 0 < len(tiers) <= MAX_TIERS and all(
            isinstance(t, list | tuple) and len(t) == 2
            and all(isinstance(r, int) and not isinstance(r, bool) and r > 0 for r in t)
            for t in tiers
        )
        if not ok:
            _fail("tiers", tiers, f"1 to {MAX_TIERS} (key dims, value dims) pairs of positive ints")
        pairs = tuple(sorted({(int(a), int(b)) for a, b in tiers}, reverse=True))
        if len(pairs) != len(tiers):
            _fail("tiers", tiers, "distinct pairs")
        if self.dims is not None:
            _fail("tiers", tiers, "give tiers or dims, not both")
        object.__setattr__(self, "tiers", pairs)

    # --- derived values -------------------------------------------------------------------------

    @property
    def sinks(self) -> int:
        if self.sink_tokens is not None:
            return self.sink_tokens
        return RECORDS[self.method].default_sinks

    def resolve_dims(self, head_dim: int) -> tuple[int, ...]:
        """Candidate dims for a model with this head dimension (checked against it)."""
        if self.dims is None:
            return tuple(sorted({0, head_dim // 8, head_dim // 4, head_dim // 2, head_dim}))
        if max(self.dims) != head_dim or any(r > head_dim for r in self.dims):
            raise ValueError(
                f"MixedDimKVConfig.dims={self.dims!r} does not fit this model: its head dimension is "
                f"{head_dim}, so dims must contain 0 and {head_dim} and nothing larger"
            )
        return self.dims

    def resolve_tiers(self, head_dim: int) -> tuple[tuple[int, int], ...]:
        """mixeddimkv's reduced tiers (key dims, value dims) for a model with this head dimension,
        descending (checked against it): every pair with both dims in 1..d except (d, d)."""
        d = head_dim
        if self.tiers is not None:
            bad = [t for t in self.tiers if max(t) > d or t == (d, d)]
            if bad:
                raise ValueError(
                    f"MixedDimKVConfig.tiers={self.tiers!r} does not fit this model: its head dimension is {d}, "
                    f"so each pair needs dims in 1..{d} and ({d}, {d}) is the whole token, not a tier"
                )
            return self.tiers
        if self.dims is not None:
            return tuple((r, r) for r in sorted(self.resolve_dims(d), reverse=True) if 0 < r < d)
        pairs = {(d // 8, d // 8), (d // 4, d // 8), (d // 2, d // 4), (d, d // 2)}
        return tuple(sorted((p for p in pairs if min(p) > 0), reverse=True))

    def replace(self, **changes: Any) -> MixedDimKVConfig:
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_options(cls, options: dict[str, Any] | None) -> MixedDimKVConfig:
        """Build from a `torch.compile(..., options=...)` dict; unknown keys are an error."""
        options = dict(options or {})
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise ValueError(f"unknown MixedDimKVConfig option(s) {unknown}; known: {sorted(known)}")
        if isinstance(options.get("dims"), list):
            options["dims"] = tuple(options["dims"])
        if isinstance(options.get("tiers"), list):
            options["tiers"] = tuple(tuple(t) for t in options["tiers"])
        return cls(**options)
