"""`MixedDimKVConfig`: what to compress, how much, and with which method.

Every bad value raises `ValueError` naming the field, the value and what is allowed. Checks that
need the model (does `dims` fit the head dimension?) run in `resolve_dims`, which `patch()` and
`MixedDimCache` call with the model's config.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import os
from dataclasses import dataclass
from typing import Any, NoReturn

from mdkv_compile.methods import METHOD_NAMES, RECORDS

# Method names (public: `mdkv.METHODS`), from the one record per method in methods.py.
METHODS = METHOD_NAMES
BASES = ("prompt", "calibrated")
BASIS_SOLVERS = ("subspace", "eigh")
POOLS = ("head", "layer")
SOLVERS = ("greedy", "exact")
LOSSES = ("attention", "energy")
KERNELS = ("auto", "torch")
DEFAULT_BUDGET = 0.0625
MAX_TIERS = 4  # reduced tiers a store may hold (the kernels' tier slots)


def _fail(name: str, value: Any, allowed: str) -> NoReturn:
    raise ValueError(f"MixedDimKVConfig.{name}={value!r} is invalid: {allowed}")


@dataclass(frozen=True)
class _Number:
    """What a numeric field accepts: ints only or any real, finite, between `low` and `high`."""

    integer: bool
    low: float
    allowed: str  # the error message's "what is allowed"
    low_open: bool = False  # value must be > low (else >= low)
    high: float = math.inf
    optional: bool = False  # None is allowed


# Every numeric field. Integral floats are refused for int fields (31.5 or 32.0 for `window` is
# a mistake, not a value to round), and bools are refused everywhere (True is an int to Python).
_NUMBERS: dict[str, _Number] = {
    "budget": _Number(False, 0.0, "a fraction of the full cache in (0, 1]", low_open=True, high=1.0, optional=True),
    "budget_tokens": _Number(True, 1, "a positive int (full-token equivalents per KV head)", optional=True),
    "budget_bytes": _Number(True, 1, "a positive int (bytes per sequence)", optional=True),
    "window": _Number(True, 1, "a positive int"),
    "pool_kernel": _Number(True, 1, "a positive odd int (centred max-pool)"),
    "sink_tokens": _Number(True, 0, "None or a non-negative int", optional=True),
    "min_compress_tokens": _Number(True, 0, "a non-negative int (0: compress every prompt)"),
    "key_weight": _Number(False, 0.0, "a float in [0, 1]", high=1.0),
    "head_beta": _Number(False, 1.0, "a finite float >= 1 (HeadKV's beta)"),
    "head_temp": _Number(False, 0.0, "a finite positive float", low_open=True),
    "pyramid_beta": _Number(False, 0.0, "a finite positive float", low_open=True),
    "lowrank_dim": _Number(True, 1, "None or a positive int", optional=True),
    "value_weight": _Number(False, 0.0, "a finite float >= 0"),
}

_CHOICES: dict[str, tuple[str, ...]] = {
    "method": METHODS, "basis": BASES, "basis_solver": BASIS_SOLVERS, "pool": POOLS, "solver": SOLVERS,
    "kernel": KERNELS, "loss": LOSSES,
}


def _checked_tiers(tiers: Any, dims: Any) -> tuple[tuple[int, int], ...]:
    """`tiers` as distinct (key dims, value dims) pairs, descending, or ValueError naming the field."""
    ok = isinstance(tiers, list | tuple) and 0 < len(tiers) <= MAX_TIERS and all(
        isinstance(t, list | tuple) and len(t) == 2
        and all(isinstance(r, numbers.Integral) and not isinstance(r, bool) and r > 0 for r in t)
        for t in tiers
    )
    if not ok:
        _fail("tiers", tiers, f"1 to {MAX_TIERS} (key dims, value dims) pairs of positive ints")
    pairs = tuple(sorted({(int(a), int(b)) for a, b in tiers}, reverse=True))
    if len(pairs) != len(tiers):
        _fail("tiers", tiers, "distinct pairs")
    if dims is not None:
        _fail("tiers", tiers, "give tiers or dims, not both")
    return pairs


def _checked_number(name: str, value: Any, rule: _Number) -> int | float | None:
    """The value as a plain int or float, or ValueError naming the field."""
    if value is None and rule.optional:
        return None
    kind = numbers.Integral if rule.integer else numbers.Real
    if isinstance(value, bool) or not isinstance(value, kind) or not math.isfinite(value):
        _fail(name, value, rule.allowed)
    above_low = value > rule.low if rule.low_open else value >= rule.low
    if not (above_low and value <= rule.high):
        _fail(name, value, rule.allowed)
    return int(value) if rule.integer else float(value)


def _checked_dims(dims: Any) -> tuple[int, ...]:
    """`dims` sorted, or ValueError (fitting the head dimension is checked by `resolve_dims`)."""
    values = tuple(dims) if isinstance(dims, list | tuple) else ()
    if not values or not all(isinstance(r, int) and not isinstance(r, bool) and r >= 0 for r in values):
        _fail("dims", dims, "a tuple of non-negative ints containing 0 and the head dimension")
    if len(set(values)) != len(values):
        _fail("dims", dims, "distinct values")
    if 0 not in values:
        _fail("dims", dims, "must contain 0 (evicted tokens)")
    if len(values) < 2:
        _fail("dims", dims, "must contain 0 and the head dimension")
    return tuple(sorted(values))


@dataclass(frozen=True)
class MixedDimKVConfig:
    """Configuration of KV-cache compression.

    Give exactly one budget: `budget` (fraction of the full cache of the prompt, in (0, 1]),
    `budget_tokens` (full-dimension token equivalents per KV head and layer) or `budget_bytes`
    (bytes per sequence over all layers, bases and bookkeeping included). With none, `budget`
    is 0.0625. The budget bounds the prompt's cache; tokens generated after it are stored whole on
    top, by every method (`MixedDimCache.prompt_stored_bytes` leaves them out).

    Short prompts: the budget never takes the last `window` and the first `sink_tokens` valid
    tokens of a prompt (each (row, KV head) keeps at least what stores them at full dimension, so
    a layer stores at most max(budget, window + sinks full tokens) per KV head), and a row of at
    most `min_compress_tokens` valid tokens (or only of window and sinks) is stored uncompressed.
    `lowrank` stores every token at one rank by definition: it gets the same floor of bytes, spent
    on that rank.

    Frozen: change a field with `cfg.replace(...)`, which validates the new values.
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
    # stored at one of these. None with dims None: (d/2, d/2), (d/4, d/8), (d/8, d/8). The cheap
    # tiers keep more key than value dims (a logit error is exponential in the weight, a value
    # error linear); the top tier keeps its values as wide as its keys, because the tokens that
    # take it are the most attended, whose value errors do not average out: with (d, d/2) and
    # (d/2, d/4) tiers SmolLM2 lost a 2K-token needle that SnapKV keeps (docs/notes/quality_notes.md,
    # section 8). At most 4 pairs (the kernels' tier slots).
    tiers: tuple[tuple[int, int], ...] | None = None
    # The last `window` prompt tokens score the others and are kept at full dimension.
    window: int = 32
    pool_kernel: int = 7
    # First tokens always kept at full dimension. None: the method's default (4 for streamingllm, else 0).
    sink_tokens: int | None = None
    # Rows with at most this many valid prompt tokens are stored uncompressed (0: compress every
    # prompt). 128 = 4 default windows: below it the window, kept whole anyway, is over a quarter of
    # the prompt, so compressing saves little (a 128-token SmolLM2 cache is 5.6 MiB in fp32) while
    # every token dropped is a large share of a chat turn (a 42-token question at budget 0.1 lost
    # its answer).
    min_compress_tokens: int = 128
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
        # Frozen: a config cannot change under a cache that uses it; the normalised values are set
        # once, here.
        given = [n for n in ("budget", "budget_tokens", "budget_bytes") if getattr(self, n) is not None]
        if len(given) > 1:
            _fail(given[1], getattr(self, given[1]), f"give only one of budget, budget_tokens, budget_bytes "
                  f"(also got {given[0]}={getattr(self, given[0])!r})")
        if not given:
            object.__setattr__(self, "budget", DEFAULT_BUDGET)
        for name, rule in _NUMBERS.items():
            object.__setattr__(self, name, _checked_number(name, getattr(self, name), rule))
        for name, allowed in _CHOICES.items():
            value = getattr(self, name)
            if not isinstance(value, str) or value not in allowed:
                _fail(name, value, f"one of {', '.join(allowed)}")
        for name in ("basis_path", "head_scores"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, str | os.PathLike):
                _fail(name, value, "None or a file path")
        if self.pool_kernel % 2 == 0:
            _fail("pool_kernel", self.pool_kernel, _NUMBERS["pool_kernel"].allowed)
        if self.dims is not None:
            object.__setattr__(self, "dims", _checked_dims(self.dims))
        if self.basis == "calibrated" and not self.basis_path:
            _fail("basis_path", self.basis_path, "a safetensors file from calibrate() when basis='calibrated'")
        if RECORDS[self.method].needs_head_scores and not self.head_scores:
            _fail("head_scores", self.head_scores, f"a JSON file from `mdkv profile-heads` for method={self.method!r}")
        if self.tiers is not None:
            object.__setattr__(self, "tiers", _checked_tiers(self.tiers, self.dims))

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
        pairs = {(d // 8, d // 8), (d // 4, d // 8), (d // 2, d // 2)}
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
