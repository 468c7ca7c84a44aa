"""`mdkv eval`: quality of every method x budget x task x length, resumable.

Each *cell* is one (model, method, budget, task, length, depth-or-seed, protocol, prompt style)
point. Finished cells are appended to `<out>/results.jsonl` as soon as they finish; a rerun with
the same `--out` skips them, so an interrupted grid continues where it stopped. `summary.csv`
is rebuilt from the whole JSONL after every run.

Decoding is greedy and written by hand against the cache, so both protocols work:

- query-agnostic (default, kvpress's protocol): prefill the context (compressed at the end of
  this first forward), prefill the question as a chunk over the compressed cache, then decode;
- query-aware: prefill context + question in one forward (the question is in the observation
  window when the prompt is compressed), then decode.

`full` is run once per cell at budget 1.0: it is the reference the report measures gaps against.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import math
import os
import sys
import time
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mdkv_compile import assets
from mdkv_compile.cache import MixedDimCache
from mdkv_compile.config import METHODS, MixedDimKVConfig
from mdkv_compile.eval import tasks as T
from mdkv_compile.hf.calibrate import calibrated_basis_file
from mdkv_compile.hf.patch import patch, unpatch
from mdkv_compile.methods import RECORDS
from mdkv_compile.usage import (
    as_usage_error,
    command,
    device,
    non_negative_int,
    output_folder,
    positive_int,
    unit_interval,
)
from mdkv_compile.usage import csv as csv_list

SMOKE = {
    "model": "smollm2",
    "methods": ["full", "snapkv"],
    "budgets": [0.25],
    "tasks": ["niah", "niah_multikey", "ppl"],
    "lengths": [1024],
    "depths": [0.2, 0.8],
    "seeds": [0],
    "protocols": ["query-agnostic"],
    "ppl_tokens": 64,
}
DEFAULTS = {
    "model": "smollm2",
    "methods": ["full", "streamingllm", "snapkv", "pyramidkv", "ada-snapkv", "lowrank", "mixeddimkv"],
    "budgets": [0.02, 0.05, 0.1, 0.25],
    "tasks": list(T.TASKS),
    "lengths": [1024, 2048, 4096],
    "depths": [0.0, 0.25, 0.5, 0.75, 1.0],
    "seeds": [0, 1],
    "protocols": ["query-agnostic"],
    "ppl_tokens": 256,
}
BUDGET_KINDS = ("fraction", "tokens", "bytes")
KEY_FIELDS = ("model", "method", "budget", "task", "length", "variant", "protocol", "prompt_style")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# Config fields that change how a result is computed, not what it is.
SAME_RESULT_OPTIONS = ("kernel",)


def method_label(method: str, options: dict[str, Any]) -> str:
    """The method name results are keyed and reported by: extra config options make a variant
    (`mixeddimkv[window=16]`), so a rerun with other options never skips or mixes cells.
    `full` ignores options: it is the one reference. Options that choose an implementation of
    the same computation (`kernel`) do not make a variant."""
    options = {k: v for k, v in options.items() if k not in SAME_RESULT_OPTIONS}
    if method == "full" or not options:
        return method
    return f"{method}[{','.join(f'{k}={json.dumps(v)}' for k, v in sorted(options.items()))}]"


def cell_key(rec: dict[str, Any]) -> str:
    """Identity of a cell in the results file (budget normalised so 0.1 and 0.10 match)."""
    parts = [rec[k] for k in KEY_FIELDS]
    parts[2] = f"{float(parts[2]):g}"
    return "|".join(str(p) for p in parts)


@dataclass
class EvalSpec:
    """What to run. Lists are crossed: methods x budgets x (task, length, seed/depth) x protocols."""

    model_name: str
    methods: Sequence[str]
    budgets: Sequence[float]
    tasks: Sequence[str]
    lengths: Sequence[int]
    depths: Sequence[float] = (0.5,)
    seeds: Sequence[int] = (0,)
    protocols: Sequence[str] = ("query-agnostic",)
    prompt_style: str = "continuation"
    budget_kind: str = "fraction"
    ppl_tokens: int = 256
    max_new_tokens: int | None = None  # None: per task (tasks.MAX_NEW_TOKENS)
    head_scores: str | None = None
    options: dict[str, Any] = field(default_factory=dict)  # extra MixedDimKVConfig fields
    # Bases of the methods that store reduced tiers: "prompt" (fitted per prompt, paid from the
    # budget) or "calibrated" (fitted once on text held out of the haystack and shared;
    # `calibrated_path`, set by run_grid for a bundled model or given for another one).
    basis: str = "prompt"
    calibrated_path: str | None = None

    def method_options(self, method: str) -> dict[str, Any]:
        """The config options of a method: `options`, plus the calibrated basis where it stores
        reduced tiers. Its label shows `basis=calibrated`, not the file."""
        options = dict(self.options)
        if self.basis == "calibrated" and RECORDS[method].stores_reduced_tiers:
            options["basis"] = "calibrated"
        return options

    def label(self, method: str) -> str:
        return method_label(method, self.method_options(method))

    def validate(self) -> None:
        bad = [m for m in self.methods if m not in METHODS]
        if bad:
            raise ValueError(f"unknown method(s) {bad}; known: {', '.join(METHODS)}")
        bad = [t for t in self.tasks if t not in T.TASKS]
        if bad:
            raise ValueError(f"unknown task(s) {bad}; known: {', '.join(T.TASKS)}")
        bad = [p for p in self.protocols if p not in T.PROTOCOLS]
        if bad:
            raise ValueError(f"unknown protocol(s) {bad}; known: {', '.join(T.PROTOCOLS)}")
        if self.budget_kind not in BUDGET_KINDS:
            raise ValueError(f"budget kind {self.budget_kind!r} is not one of {BUDGET_KINDS}")
        if self.budget_kind == "fraction" and any(not 0 < b <= 1 for b in self.budgets):
            raise ValueError(f"fraction budgets must lie in (0, 1]; got {list(self.budgets)}")
        needs = [m for m in self.methods if RECORDS[m].needs_head_scores]
        if needs and not self.head_scores:
            raise ValueError(
                f"method(s) {needs} need head scores: run `mdkv profile-heads --model {self.model_name} "
                f"--out heads.json` and pass --head-scores heads.json"
            )
        if self.head_scores and not Path(self.head_scores).is_file():
            raise ValueError(f"--head-scores {self.head_scores}: no such file")
        self._validate_grid()
        if self.basis not in ("prompt", "calibrated"):
            raise ValueError(f"basis {self.basis!r} is not 'prompt' or 'calibrated'")
        if self.calibrated_path and not Path(self.calibrated_path).is_file():
            raise ValueError(f"--calibrated-basis {self.calibrated_path}: no such file")
        self._validate_options()

    def _validate_grid(self) -> None:
        """Lengths, depths, seeds and token counts, before any model is loaded."""
        for name, values in (("lengths", self.lengths), ("seeds", self.seeds), ("depths", self.depths),
                             ("budgets", self.budgets)):
            if not values:
                raise ValueError(f"{name}: an empty list")
        if any(isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in self.lengths):
            raise ValueError(f"lengths must be positive ints (tokens); got {list(self.lengths)}")
        if any(not 0.0 <= d <= 1.0 for d in self.depths):
            raise ValueError(f"depths must lie in [0, 1] (needle position in the haystack); got {list(self.depths)}")
        if any(isinstance(n, bool) or not isinstance(n, int) or n < 0 for n in self.seeds):
            raise ValueError(f"seeds must be non-negative ints; got {list(self.seeds)}")
        if self.budget_kind != "fraction" and any(b < 1 or b != int(b) for b in self.budgets):
            raise ValueError(f"{self.budget_kind} budgets must be positive whole numbers; got {list(self.budgets)}")
        for name in ("ppl_tokens", "max_new_tokens"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be a positive int; got {value!r}")

    def _validate_options(self) -> None:
        """Every --option is a config field this spec does not set itself, and every config of the
        grid is valid (a bad value fails here, not after the model has loaded)."""
        fields = {f.name for f in dataclasses.fields(MixedDimKVConfig)}
        owned = {"method", "budget", "budget_tokens", "budget_bytes", "head_scores"}
        unknown = sorted(set(self.options) - fields)
        if unknown:
            known = ", ".join(sorted(fields - owned))
            raise ValueError(f"unknown option(s) {unknown}; MixedDimKVConfig fields: {known}")
        clash = sorted(set(self.options) & owned)
        if clash:
            raise ValueError(f"option(s) {clash} are set by --methods, --budgets, --budget-kind, --head-scores")
        for method in self.methods:
            for budget in [1.0] if method == "full" else self.budgets:
                # the calibrated file is fitted after the model loads: check the rest with a stand-in
                self.config(method, budget, basis_path=self.calibrated_path or "calibrated.safetensors")

    def config(self, method: str, budget: float, basis_path: str | None = None) -> Any:
        """The config of one cell; `basis_path` stands in for `calibrated_path` (validation)."""
        kw: dict[str, Any] = self.method_options(method)
        if kw.get("basis") == "calibrated" and "basis_path" not in kw:
            path = basis_path or self.calibrated_path
            if not path:
                raise ValueError(f"{method} with calibrated bases needs a calibrated basis file (calibrated_path)")
            kw["basis_path"] = path
        kw["method"] = method
        if method == "full":
            kw["budget"] = 1.0
        elif self.budget_kind == "fraction":
            kw["budget"] = float(budget)
        elif self.budget_kind == "tokens":
            kw["budget_tokens"] = int(budget)
        else:
            kw["budget_bytes"] = int(budget)
        if RECORDS[method].needs_head_scores:
            kw["head_scores"] = self.head_scores
        return MixedDimKVConfig(**kw)

    def cells(self) -> list[tuple[str, float, tuple[str, int, int, float | None], str]]:
        points = T.grid(self.tasks, self.lengths, self.depths, self.seeds)
        out = []
        for method in self.methods:
            budgets = [1.0] if method == "full" else list(self.budgets)
            for budget in budgets:
                for point in points:
                    for protocol in self.protocols:
                        # perplexity scores a continuation after the compressed prefix: one protocol
                        if point[0] in T.CONTINUATION_TASKS and protocol != "query-agnostic":
                            continue
                        out.append((method, budget, point, protocol))
        return out


# --- generation with an explicit cache ----------------------------------------------------------


def stop_token_ids(model: Any, tok: Any) -> set[int]:
    """End-of-turn ids: the generation config's EOS plus the usual chat end markers."""
    ids: set[int] = set()
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for e in eos if isinstance(eos, list | tuple) else [eos]:
        if e is not None:
            ids.add(int(e))
    if tok.eos_token_id is not None:
        ids.add(int(tok.eos_token_id))
    vocab = tok.get_vocab()
    for marker in ("<|im_end|>", "<|eot_id|>", "<|endoftext|>", "</s>", "<end_of_turn>"):
        if marker in vocab:
            ids.add(int(vocab[marker]))
    return ids


def tier_order(label: str) -> tuple[int, int]:
    """Sort key of a tier label ("0", "64", or "key dims/value dims" such as "64/32")."""
    key, _, value = label.partition("/")
    return int(key), int(value or key)


def dim_fractions(cache: Any) -> dict[str, float] | None:
    """Share of prompt (token, KV head) entries stored in each tier ("0" dropped, "r" both at r dims,
    "rk/rv"), over all layers, from the layers' `selection_counts` (None for caches without them).
    Shows whether a method really mixed dimensions or fell back to eviction ({0, d} only)."""
    totals: dict[str, int] = {}
    for layer in getattr(cache, "layers", []):
        for tier, n in (layer.selection_summary() if hasattr(layer, "selection_summary") else {}).items():
            totals[str(tier)] = totals.get(str(tier), 0) + n
    total = sum(totals.values())
    if not total:
        return None
    return {tier: round(totals[tier] / total, 5) for tier in sorted(totals, key=tier_order) if totals[tier]}


def cache_bytes(cache: Any) -> tuple[int | None, int | None]:
    """(stored, full) bytes as the cache measures them; None where it cannot say."""
    stored = cache.stored_bytes() if hasattr(cache, "stored_bytes") else None
    full = cache.full_bytes() if hasattr(cache, "full_bytes") else None
    return (None if stored is None else int(stored)), (None if full is None else int(full))


class _Runner:
    """Forward passes with explicit positions: a compressed cache holds fewer entries than the
    tokens seen, so positions are counted here rather than read back from the cache."""

    def __init__(self, model: Any, cache: Any, device: torch.device) -> None:
        self.model, self.cache, self.device, self.pos = model, cache, device, 0

    @torch.no_grad()
    def forward(self, ids: Sequence[int], all_logits: bool = False) -> torch.Tensor:
        x = torch.tensor([list(ids)], dtype=torch.long, device=self.device)
        pos = torch.arange(self.pos, self.pos + x.shape[1], device=self.device).unsqueeze(0)
        kw: dict[str, Any] = {} if all_logits else {"logits_to_keep": 1}
        out = self.model(input_ids=x, position_ids=pos, past_key_values=self.cache, use_cache=True, **kw)
        self.pos += x.shape[1]
        return out.logits[0].float()


def greedy_generate(
    model: Any,
    tok: Any,
    cache: Any,
    ctx_ids: Sequence[int],
    q_ids: Sequence[int],
    protocol: str,
    max_new_tokens: int,
    stop_ids: set[int],
    stop_at_newline: bool = False,
) -> dict[str, Any]:
    """Prefill per `protocol`, then greedy-decode. Returns text, token ids, bytes and timings."""
    if protocol not in T.PROTOCOLS:
        raise ValueError(f"protocol {protocol!r} is not one of {T.PROTOCOLS}")
    device = next(model.parameters()).device
    r = _Runner(model, cache, device)
    t0 = time.perf_counter()
    if protocol == "query-aware" or not q_ids:
        logits = r.forward(list(ctx_ids) + list(q_ids))
    else:
        r.forward(ctx_ids)  # first forward: exact attention, then the context is compressed
        logits = r.forward(q_ids)
    stored, full = cache_bytes(cache)
    dims = dim_fractions(cache)
    t1 = time.perf_counter()
    new: list[int] = []
    for _ in range(max_new_tokens):
        nxt = int(logits[-1].argmax())
        if nxt in stop_ids:
            break
        new.append(nxt)
        # single-line answers end at a newline (a leading newline is not the end of the answer)
        if stop_at_newline and "\n" in tok.decode(new).lstrip():
            break
        if len(new) == max_new_tokens:
            break
        logits = r.forward([nxt])
    t2 = time.perf_counter()
    stored_end, full_end = cache_bytes(cache)
    return {
        "prediction": tok.decode(new, skip_special_tokens=True),
        "new_tokens": len(new),
        "stored_bytes": stored,
        "full_bytes": full,
        "dim_fractions": dims,
        "stored_bytes_end": stored_end,
        "full_bytes_end": full_end,
        "prefill_s": t1 - t0,
        "decode_s": t2 - t1,
    }


def continuation_logits(
    model: Any, cache: Any, ctx_ids: Sequence[int], cont_ids: Sequence[int]
) -> tuple[torch.Tensor, dict[str, Any]]:
    """Logits [T, V] (float32) that predict each of the T `cont_ids` given the compressed
    `ctx_ids`: the context is prefilled (and compressed), then the continuation is fed as one
    chunk (teacher forcing). Also returns the cache's bytes and dims after the context, and times."""
    if not cont_ids:
        raise ValueError("a continuation task needs a non-empty continuation")
    device = next(model.parameters()).device
    r = _Runner(model, cache, device)
    t0 = time.perf_counter()
    first = r.forward(ctx_ids)[-1:]  # predicts cont_ids[0]
    stored, full = cache_bytes(cache)
    dims = dim_fractions(cache)
    t1 = time.perf_counter()
    rest = r.forward(cont_ids[:-1], all_logits=True) if len(cont_ids) > 1 else first[:0]
    info = {
        "stored_bytes": stored,
        "full_bytes": full,
        "dim_fractions": dims,
        "prefill_s": t1 - t0,
        "decode_s": time.perf_counter() - t1,
    }
    return torch.cat([first, rest], dim=0), info


def continuation_nll(model: Any, cache: Any, ctx_ids: Sequence[int], cont_ids: Sequence[int]) -> dict[str, Any]:
    """Mean NLL (nats/token) and perplexity of `cont_ids` given the compressed `ctx_ids`."""
    logits, info = continuation_logits(model, cache, ctx_ids, cont_ids)
    target = torch.tensor(list(cont_ids), device=logits.device)
    nll = torch.nn.functional.cross_entropy(logits, target, reduction="mean").item()
    return {"nll": nll, "ppl": math.exp(nll), **info}


def reference_logprobs(model: Any, ctx_ids: Sequence[int], cont_ids: Sequence[int]) -> torch.Tensor:
    """Log-probabilities [T, V] of the full cache under the same two forwards as a compressed run
    (a plain DynamicCache: a patched model attends exactly over it), so a KL against it measures
    the compression alone."""
    from transformers import DynamicCache

    logits, _ = continuation_logits(model, DynamicCache(config=model.config), ctx_ids, cont_ids)
    return logits.log_softmax(-1)


def continuation_kl(
    model: Any, cache: Any, ctx_ids: Sequence[int], cont_ids: Sequence[int], reference: torch.Tensor
) -> dict[str, Any]:
    """Mean KL(full || compressed) in nats over the continuation's next-token distributions, and
    the share of positions whose top-1 token agrees with the full cache's. `reference`: the full
    cache's log-probabilities (`reference_logprobs`)."""
    logits, info = continuation_logits(model, cache, ctx_ids, cont_ids)
    logp = logits.log_softmax(-1)
    ref = reference.to(logp.device)
    kl = (ref.exp() * (ref - logp)).sum(-1)
    agree = (ref.argmax(-1) == logp.argmax(-1)).float()
    return {"kl": kl.mean().item(), "top1_agreement": agree.mean().item(), **info}


# --- the grid ------------------------------------------------------------------------------------


def read_results(path: Path) -> list[dict[str, Any]]:
    """Records of a results JSONL, one per cell (the last one wins when two runs wrote the same
    cell into one folder at once); a torn line (killed mid-write) is ignored."""
    if not path.is_file():
        return []
    recs: dict[str, dict[str, Any]] = {}
    with path.open() as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                rec = json.loads(line)
                recs[cell_key(rec)] = rec
            except (json.JSONDecodeError, KeyError, TypeError, ValueError):
                continue
    return list(recs.values())


SUMMARY_FIELDS = (
    "model", "method", "budget", "task", "family", "length", "protocol", "prompt_style", "n",
    "score", "stored_bytes", "full_bytes", "stored_fraction", "seconds",
)  # fmt: skip


def summarize(records: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean score, bytes and time per (model, method, budget, task, length, protocol, style)."""
    groups: dict[tuple, list[dict[str, Any]]] = defaultdict(list)
    for r in records:
        k = (
            r["model"],
            r["method"],
            float(r["budget"]),
            r["task"],
            int(r["length"]),
            r["protocol"],
            r["prompt_style"],
        )
        groups[k].append(r)

    def mean(vals: list[Any]) -> float | None:
        vals = [v for v in vals if v is not None]
        return sum(vals) / len(vals) if vals else None

    rows = []
    for k in sorted(groups, key=lambda k: (k[0], k[3], k[4], k[5], k[6], k[1], k[2])):
        rs = groups[k]
        stored, full = mean([r.get("stored_bytes") for r in rs]), mean([r.get("full_bytes") for r in rs])
        rows.append(
            dict(zip(SUMMARY_FIELDS[:8], (*k[:4], T.TASKS[k[3]], *k[4:]), strict=True))
            | {
                "n": len(rs),
                "score": mean([r["score"] for r in rs]),
                "stored_bytes": stored,
                "full_bytes": full,
                "stored_fraction": (stored / full) if stored is not None and full else None,
                "seconds": mean([r.get("seconds") for r in rs]),
            }
        )
    return rows


def write_summary(records: list[dict[str, Any]], path: Path) -> None:
    rows = summarize(records)
    tmp = path.with_suffix(".tmp")
    with tmp.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(SUMMARY_FIELDS))
        w.writeheader()
        for row in rows:
            w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
    os.replace(tmp, path)


def run_grid(
    model: Any,
    tok: Any,
    spec: EvalSpec,
    out_dir: str | os.PathLike[str],
    haystack: str | None = None,
    progress: bool = True,
    fail_fast: bool = False,
) -> dict[str, int]:
    """Run every unfinished cell of `spec`; append each result to results.jsonl at once.

    Returns counts: done (this run), skipped (already in the file), failed."""
    from tqdm.auto import tqdm


    spec.validate()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    results_path = out / "results.jsonl"
    done_keys = {cell_key(r) for r in read_results(results_path)}
    stop_ids = stop_token_ids(model, tok)
    haystack = T.default_haystack() if haystack is None else haystack

    todo, skipped = [], 0
    for method, budget, point, protocol in spec.cells():
        task, length, seed, depth = point
        variant = f"d{depth:.2f}" if depth is not None else f"s{seed}"
        key = cell_key(
            {"model": spec.model_name, "method": spec.label(method), "budget": budget,
             "task": task, "length": length, "variant": variant, "protocol": protocol,
             "prompt_style": spec.prompt_style}
        )  # fmt: skip
        if key in done_keys:
            skipped += 1
        else:
            todo.append((method, budget, point, protocol))
    counts = {"done": 0, "skipped": skipped, "failed": 0}
    if not todo:
        if progress:
            print(f"all {skipped} cells already in {results_path}; nothing to do", file=sys.stderr)
        write_summary(read_results(results_path), out / "summary.csv")
        return counts

    if (
        spec.basis == "calibrated" and not spec.calibrated_path
        and any(RECORDS[m].stores_reduced_tiers for m, *_ in todo)
    ):
        start = time.perf_counter()
        spec.calibrated_path = str(calibrated_basis_file(model, tok, spec.model_name))
        if progress:
            print(f"calibrated bases: {spec.calibrated_path} ({time.perf_counter() - start:.1f} s)", file=sys.stderr)
    instances: dict[tuple, T.TaskInstance] = {}
    references: dict[tuple, torch.Tensor] = {}  # kl: the full cache's log-probabilities per point
    patched_with: tuple[str, float] | None = None
    bar = tqdm(todo, desc="mdkv eval", unit="cell", disable=not progress, dynamic_ncols=True)
    try:
        with results_path.open("a") as sink:
            for method, budget, point, protocol in bar:
                task, length, seed, depth = point
                bar.set_postfix_str(f"{method}@{budget:g} {task} {length} {protocol}")
                if point not in instances:
                    instances[point] = T.make_instance(
                        task, tok, length, seed=seed, depth=depth, haystack=haystack,
                        prompt_style=spec.prompt_style, ppl_tokens=spec.ppl_tokens,
                    )  # fmt: skip
                inst = instances[point]
                try:
                    cfg = spec.config(method, budget)
                    if patched_with != (method, budget):
                        patch(model, cfg)
                        patched_with = (method, budget)
                    cache = MixedDimCache(model.config, cfg)
                    ctx_ids, q_ids = T.encode(tok, inst, spec.prompt_style)
                    t0 = time.perf_counter()
                    if task == "ppl":
                        res = continuation_nll(model, cache, ctx_ids, q_ids)
                        score, prediction = res["ppl"], ""
                    elif task == "kl":
                        if point not in references:
                            references[point] = reference_logprobs(model, ctx_ids, q_ids)
                        res = continuation_kl(model, cache, ctx_ids, q_ids, references[point])
                        score, prediction = res["kl"], ""
                    else:
                        n_new = spec.max_new_tokens or inst.max_new_tokens
                        res = greedy_generate(
                            model, tok, cache, ctx_ids, q_ids, protocol, n_new, stop_ids, inst.stop_at_newline
                        )
                        prediction = res.pop("prediction")
                        score = inst.score(prediction)
                    seconds = time.perf_counter() - t0
                except Exception as e:  # noqa: BLE001 - a failing method must not stop the grid
                    if fail_fast:
                        raise
                    counts["failed"] += 1
                    tqdm.write(f"FAILED {method}@{budget:g} {task} L={length} {inst.variant} {protocol}: "
                               f"{type(e).__name__}: {e}")  # fmt: skip
                    continue
                rec = {
                    "model": spec.model_name,
                    "method": spec.label(method),
                    "base_method": method,
                    "budget": float(budget),
                    "budget_kind": "fraction" if method == "full" else spec.budget_kind,
                    "task": task,
                    "family": inst.family,
                    "length": length,
                    "variant": inst.variant,
                    "depth": depth,
                    "seed": seed,
                    "protocol": protocol,
                    "prompt_style": spec.prompt_style,
                    "prompt_tokens": len(ctx_ids) + (0 if task in T.CONTINUATION_TASKS else len(q_ids)),
                    "context_tokens": len(ctx_ids),
                    "score": score,
                    "metric": task if task in T.CONTINUATION_TASKS else "string_match_all",
                    "answers": list(inst.answers),
                    "prediction": prediction,
                    "seconds": seconds,
                    "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                    "options": spec.method_options(method),
                    **res,
                }
                sink.write(json.dumps(rec) + "\n")
                sink.flush()
                counts["done"] += 1
    finally:
        bar.close()
        if patched_with is not None:
            unpatch(model)  # the model object is shared (assets.load_model caches it)
        write_summary(read_results(results_path), out / "summary.csv")
    return counts


# --- command line --------------------------------------------------------------------------------


def _option(s: str) -> tuple[str, Any]:
    if "=" not in s:
        raise argparse.ArgumentTypeError(f"--option wants KEY=VALUE, got {s!r}")
    k, v = s.split("=", 1)
    try:
        return k, json.loads(v)
    except json.JSONDecodeError:
        return k, v


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model",
        default=None,
        help="'smollm2' or 'gemma3-270m' (offline GGUFs, see mdkv_compile/assets.py) or a Hugging Face path "
        "(default smollm2)",
    )
    p.add_argument("--methods", type=csv_list(str), default=None, help="comma list (default: all but head-score ones)")
    p.add_argument("--budgets", type=csv_list(float), default=None, help="comma list, e.g. 0.02,0.05,0.1")
    p.add_argument(
        "--budget-kind",
        choices=BUDGET_KINDS,
        default="fraction",
        help="budgets are fractions of the prompt's full cache, token equivalents per KV head, or bytes",
    )
    p.add_argument("--tasks", type=csv_list(str), default=None, help=f"comma list of {','.join(T.TASKS)}")
    p.add_argument("--lengths", type=csv_list(positive_int), default=None,
                   help="prompt lengths in tokens, e.g. 1024,4096")
    p.add_argument("--depths", type=csv_list(unit_interval), default=None, help="NIAH needle depths in [0,1]")
    p.add_argument("--seeds", type=csv_list(non_negative_int), default=None,
                   help="instances per non-grid task, by seed")
    p.add_argument("--protocols", type=csv_list(str), default=None, help="query-agnostic,query-aware")
    p.add_argument("--prompt-style", choices=T.PROMPT_STYLES, default="continuation")
    p.add_argument("--ppl-tokens", type=positive_int, default=None, help="continuation tokens scored by ppl and kl")
    p.add_argument("--max-new-tokens", type=positive_int, default=None, help="override the per-task decode length")
    p.add_argument("--head-scores", default=None, help="JSON from `mdkv profile-heads` (headkv, mixeddimkv-h)")
    p.add_argument(
        "--basis", choices=("calibrated", "prompt"), default="calibrated",
        help="bases of the methods with reduced tiers: calibrated (fitted once on essays held out of the "
        "haystack, or --calibrated-basis; shared, no budget) or prompt (fitted per prompt, paid from the budget)",
    )
    p.add_argument(
        "--calibrated-basis", default=None, help="a file from `mdkv calibrate` (default: fitted on first use)"
    )
    p.add_argument(
        "--option",
        type=_option,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra MixedDimKVConfig field (JSON value), repeatable, e.g. --option window=16",
    )
    p.add_argument("--out", default="results/eval", help="output folder (results.jsonl, summary.csv)")
    p.add_argument("--device", type=device, default="cpu")
    p.add_argument("--dtype", choices=tuple(DTYPES), default="float32")
    p.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads")
    p.add_argument(
        "--smoke",
        action="store_true",
        help="tiny preset (<3 min on 2 idle CPU cores): smollm2, full+snapkv at 0.25, 1K tokens, "
        "niah (2 depths) + niah_multikey + ppl; other flags override its fields",
    )
    p.add_argument("--fail-fast", action="store_true", help="stop at the first failing cell")
    p.add_argument("--quiet", action="store_true", help="no progress bar")  # fmt: skip


def spec_from_args(args: argparse.Namespace) -> EvalSpec:
    base = SMOKE if args.smoke else DEFAULTS

    def pick(name: str) -> Any:
        v = getattr(args, name)
        return base[name] if v is None else v

    return EvalSpec(
        model_name=pick("model"),
        methods=pick("methods"),
        budgets=pick("budgets"),
        tasks=pick("tasks"),
        lengths=pick("lengths"),
        depths=pick("depths"),
        seeds=pick("seeds"),
        protocols=pick("protocols"),
        prompt_style=args.prompt_style,
        budget_kind=args.budget_kind,
        ppl_tokens=pick("ppl_tokens"),
        max_new_tokens=args.max_new_tokens,
        head_scores=args.head_scores,
        options=dict(args.option),
        basis=args.basis,
        calibrated_path=args.calibrated_basis,
    )


@command("mdkv eval")
def run(args: argparse.Namespace) -> int:
    output_folder(args.out, "--out")
    try:
        spec = spec_from_args(args)
        spec.validate()
        assets.check_model_source(spec.model_name)
    except (ValueError, FileNotFoundError) as e:
        raise as_usage_error(e) from None
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    model, tok = assets.load_model(spec.model_name, dtype=DTYPES[args.dtype], device=args.device)
    counts = run_grid(model, tok, spec, args.out, progress=not args.quiet, fail_fast=args.fail_fast)
    out = Path(args.out)
    print(
        f"mdkv eval: {counts['done']} cells run, {counts['skipped']} already done, {counts['failed']} failed "
        f"in {time.perf_counter() - t0:.0f} s -> {out / 'results.jsonl'}, {out / 'summary.csv'}",
        file=sys.stderr,
    )
    return 1 if counts["failed"] else 0
