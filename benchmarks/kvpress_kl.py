"""kvpress side by side: every kvpress press and our methods on the same `kl` samples (issue 13).

    bash benchmarks/kvpress/setup.sh                 # once: kvpress's own venv (/work/kvpress-venv)
    PYTHONPATH=. .venv/bin/python benchmarks/kvpress_kl.py --out results/kvpress_kl
    # options: --length 2048 --continuation 128 --seeds 0,1,2,3 --budgets 0.02,0.05,0.1
    #          --presses 'SnapKVPress,KnormPress' --methods snapkv,mixeddimkv --kvpress-venv DIR

What it does, in this order (run with the project's venv; kvpress runs in its own, because it pins
transformers<5.3 and the project 5.17):

1. writes the samples to <out>/samples.json: for each seed, the context and continuation token ids
   exactly as our `kl` task builds them (`tasks.make_instance("kl", ...)`, `tasks.encode`);
2. computes our full-cache logits on each sample (`runner.continuation_logits` over a DynamicCache);
3. runs benchmarks/kvpress/run_presses.py under the kvpress venv, phase `reference`: the same GGUF
   model under transformers 5.2 gives its full-cache logits (saved in <out>/_work/, not committed)
   and checks that a press at compression ratio 0 gives KL 0. Here the two sides' full-cache
   logits are compared: max |logit difference| above --logit-tol stops the run;
4. runs run_presses.py phase `presses`: each press x budget x seed, KL(full || press) and top-1
   agreement with the same two forwards as our runner -> <out>/kvpress.jsonl (budget = fraction of
   tokens kept, compression ratio = 1 - budget);
5. runs our methods on the same samples through `runner.run_grid` (the `mdkv eval --tasks kl` code)
   -> <out>/ours/results.jsonl; mixeddimkv twice, with per-prompt bases (paid from the budget) and
   with the calibrated bases (`mdkv eval`'s default; shared, not counted in the cache's bytes);
6. writes <out>/combined.json and <out>/table.md: mean KL and top-1 per method x budget, and
   mixeddimkv's KL over the best kvpress press's at each budget.

Every step is resumable: finished cells on both sides are skipped on a rerun with the same --out
(the samples must not change; a different --length, --continuation or --seeds needs a new --out).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch

from mdkv_compile import assets
from mdkv_compile.eval import runner as R
from mdkv_compile.eval import tasks as T

HERE = Path(__file__).resolve().parent
RUN_PRESSES = HERE / "kvpress" / "run_presses.py"
DEFAULT_PRESSES = (
    "SnapKVPress,SnapKVPress(window_size=32),StreamingLLMPress,ExpectedAttentionPress,TOVAPress,"
    "AdaKVPress(SnapKVPress),ObservedAttentionPress,KnormPress"
)
DEFAULT_METHODS = "snapkv,ada-snapkv,streamingllm,mixeddimkv"
MODEL = "smollm2"


def log(msg: str) -> None:
    print(f"[kvpress_kl {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def make_samples(tok: Any, length: int, continuation: int, seeds: list[int]) -> list[dict[str, Any]]:
    samples = []
    for seed in seeds:
        inst = T.make_instance("kl", tok, length, seed=seed, ppl_tokens=continuation)
        ctx, cont = T.encode(tok, inst)
        samples.append({"seed": seed, "offset": inst.meta["offset"], "context_ids": ctx, "continuation_ids": cont})
    return samples


def write_samples(out: Path, args: argparse.Namespace, samples: list[dict[str, Any]]) -> Path:
    path = out / "samples.json"
    data = {
        "task": "kl", "model": MODEL, "length": args.length, "continuation": args.continuation,
        "gguf_dir": str(assets.cache_dir() / "smollm2"), "gguf_file": assets.SMOLLM2_GGUF, "samples": samples,
    }  # fmt: skip
    if path.is_file():
        old = json.loads(path.read_text())
        if old["samples"] != samples:
            raise SystemExit(f"{path} holds other samples (another --length/--continuation/--seeds or haystack): "
                             f"use a new --out or remove the folder")  # fmt: skip
    path.write_text(json.dumps(data))
    return path


def kvpress_python(venv: str) -> str:
    py = Path(venv) / "bin" / "python"
    if not py.is_file():
        raise SystemExit(f"no kvpress venv at {venv}: run `bash benchmarks/kvpress/setup.sh` (or pass --kvpress-venv)")
    return str(py)


def run_kvpress(py: str, phase: str, samples: Path, work: Path, args: argparse.Namespace, out: Path | None) -> None:
    cmd = [py, str(RUN_PRESSES), phase, "--samples", str(samples), "--work", str(work),
           "--presses", args.presses, "--budgets", args.budgets_str]  # fmt: skip
    if out is not None:
        cmd += ["--out", str(out)]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    log(f"kvpress venv: {' '.join(cmd[1:])}")
    rc = subprocess.run(cmd, env=env).returncode
    if rc:
        raise SystemExit(f"run_presses.py {phase} failed (exit {rc})")


def check_full_logits(ours: dict[int, torch.Tensor], work: Path, tol: float) -> dict[str, Any]:
    """Max |logit difference| and KL between our full-cache logits and kvpress's venv's, per seed."""
    per_seed = {}
    for seed, a in ours.items():
        b = torch.load(work / f"full_sdpa_s{seed}.pt")
        la, lb = a.log_softmax(-1), b.log_softmax(-1)
        per_seed[seed] = {
            "max_abs_logit_diff": (a - b).abs().max().item(),
            "kl": (la.exp() * (la - lb)).sum(-1).mean().item(),
            "top1_agreement": (a.argmax(-1) == b.argmax(-1)).float().mean().item(),
        }
    worst = max(v["max_abs_logit_diff"] for v in per_seed.values())
    res = {"max_abs_logit_diff": worst, "tolerance": tol, "per_seed": per_seed}
    log(f"full-cache logits, ours (transformers 5.17) vs kvpress venv (5.2): max |diff| {worst:.3g}, "
        f"KL {max(v['kl'] for v in per_seed.values()):.3g}")  # fmt: skip
    if not worst <= tol:
        raise SystemExit(f"SANITY CHECK FAILED: full-cache logits differ by {worst:.3g} > --logit-tol {tol}; "
                         f"the two sides do not run the same model")  # fmt: skip
    return res


def run_ours(model: Any, tok: Any, args: argparse.Namespace, out: Path) -> None:
    base = dict(model_name=MODEL, budgets=args.budgets, tasks=["kl"], lengths=[args.length], seeds=args.seeds,
                ppl_tokens=args.continuation)  # fmt: skip
    specs = [R.EvalSpec(methods=args.methods, basis="prompt", **base)]
    if "mixeddimkv" in args.methods and not args.no_calibrated:
        specs.append(R.EvalSpec(methods=["mixeddimkv"], basis="calibrated", **base))
    for spec in specs:
        counts = R.run_grid(model, tok, spec, out, fail_fast=True)
        log(f"ours ({spec.basis} bases): {counts}")


def mean(xs: list[float]) -> float:
    return sum(xs) / len(xs)


def combine(out: Path, args: argparse.Namespace, sanity: dict[str, Any], wall: dict[str, float]) -> dict[str, Any]:
    cells: dict[tuple[str, str, float], list[dict[str, Any]]] = defaultdict(list)
    for line in (out / "kvpress.jsonl").read_text().splitlines():
        r = json.loads(line)
        if r["seed"] in args.seeds and r["budget"] in args.budgets:
            cells[("kvpress", r["press"], r["budget"])].append(
                {"seed": r["seed"], "kl": r["kl"], "top1": r["top1_agreement"], "kept": r["kept_fraction"]}
            )
    for r in R.read_results(out / "ours" / "results.jsonl"):
        if r["seed"] in args.seeds and r["budget"] in args.budgets and r["length"] == args.length:
            stored = r["stored_bytes"] / r["full_bytes"] if r.get("full_bytes") else None
            cells[("ours", r["method"], r["budget"])].append(
                {"seed": r["seed"], "kl": r["kl"], "top1": r["top1_agreement"], "kept": stored}
            )
    rows = []
    for (side, method, budget), rs in sorted(cells.items()):
        rs.sort(key=lambda r: r["seed"])
        kept = [r["kept"] for r in rs if r["kept"] is not None]
        rows.append({
            "side": side, "method": method, "budget": budget, "n": len(rs),
            "kl": mean([r["kl"] for r in rs]), "top1": mean([r["top1"] for r in rs]),
            "stored_fraction": mean(kept) if kept else None, "per_seed": rs,
        })  # fmt: skip
    ratios = {}
    for budget in args.budgets:
        kv = [r for r in rows if r["side"] == "kvpress" and r["budget"] == budget and r["n"] == len(args.seeds)]
        if not kv:
            continue
        best = min(kv, key=lambda r: r["kl"])
        for r in rows:
            if r["side"] == "ours" and r["method"].startswith("mixeddimkv") and r["budget"] == budget:
                ratios.setdefault(r["method"], {})[f"{budget:g}"] = {
                    "best_kvpress": best["method"], "best_kvpress_kl": best["kl"], "kl": r["kl"],
                    "ratio": r["kl"] / best["kl"],
                }  # fmt: skip
    ref = json.loads((out / "_work" / "reference.json").read_text())
    return {
        "task": "kl", "model": MODEL, "length": args.length, "continuation": args.continuation, "seeds": args.seeds,
        "budgets": args.budgets, "kvpress_versions": ref["versions"], "sanity": {**sanity, **{
            k: v for k, v in ref.items() if k != "versions"}},
        "wall_s": wall, "mixeddimkv_over_best_kvpress": ratios, "rows": rows,
    }  # fmt: skip


def table(res: dict[str, Any]) -> str:
    budgets = res["budgets"]
    by = {(r["side"], r["method"]): {} for r in res["rows"]}
    for r in res["rows"]:
        by[(r["side"], r["method"])][r["budget"]] = r
    head = ["side", "method"] + [f"KL @ {b:g}" for b in budgets] + [f"top-1 @ {b:g}" for b in budgets]
    head += ["kept / stored fraction"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    best = {b: min((c[b]["kl"] for (s, _), c in by.items() if s == "kvpress" and b in c), default=None)
            for b in budgets}  # fmt: skip
    for (side, method), cs in by.items():
        kl = []
        for b in budgets:
            if b not in cs:
                kl.append("")
                continue
            v = f"{cs[b]['kl']:.4f}"
            kl.append(f"**{v}**" if side == "kvpress" and cs[b]["kl"] == best[b] else v)
        top = [f"{cs[b]['top1']:.3f}" if b in cs else "" for b in budgets]
        kept = " / ".join(f"{cs[b]['stored_fraction']:.4f}" if b in cs and cs[b]["stored_fraction"] is not None
                          else "-" for b in budgets)  # fmt: skip
        lines.append("| " + " | ".join([side, f"`{method}`", *kl, *top, kept]) + " |")
    lines.append("")
    for method, per in res["mixeddimkv_over_best_kvpress"].items():
        parts = [f"{b}: {v['kl']:.4f} / {v['best_kvpress_kl']:.4f} ({v['best_kvpress']}) = {v['ratio']:.3f}"
                 for b, v in per.items()]  # fmt: skip
        lines.append(f"- `{method}` KL over the best kvpress press's: " + "; ".join(parts))
    s = res["sanity"]
    lines.append(f"- full-cache logits, ours vs kvpress venv: max |diff| {s['max_abs_logit_diff']:.3g} "
                 f"(tolerance {s['tolerance']:g})")  # fmt: skip
    for r in s.get("ratio0", []):
        lines.append(f"- {r['press']} at compression ratio 0: KL {r['kl']:.3g} (seed {r['seed']})")
    if "eager_vs_sdpa_max_abs_logit_diff" in s:
        lines.append(f"- eager vs sdpa full-cache logits (kvpress venv): max |diff| "
                     f"{s['eager_vs_sdpa_max_abs_logit_diff']:.3g}")  # fmt: skip
    n = {r["n"] for r in res["rows"]}
    lines.append(f"- {res['length']}-token contexts, {res['continuation']} continuation tokens, seeds "
                 f"{','.join(map(str, res['seeds']))} (n per cell: {sorted(n)}); kvpress "
                 f"{res['kvpress_versions']['kvpress']}, transformers {res['kvpress_versions']['transformers']}")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="results/kvpress_kl")
    p.add_argument("--length", type=int, default=2048, help="context tokens")
    p.add_argument("--continuation", type=int, default=128, help="continuation tokens scored")
    p.add_argument("--seeds", default="0,1,2,3")
    p.add_argument("--budgets", default="0.02,0.05,0.1", help="fractions kept (kvpress ratio = 1 - budget)")
    p.add_argument("--presses", default=DEFAULT_PRESSES, help="kvpress presses, see run_presses.PRESSES")
    p.add_argument("--methods", default=DEFAULT_METHODS, help="our methods (mixeddimkv also runs calibrated)")
    p.add_argument("--no-calibrated", action="store_true", help="skip mixeddimkv with calibrated bases")
    p.add_argument("--kvpress-venv", default=os.environ.get("KVPRESS_VENV", "/work/kvpress-venv"))
    p.add_argument("--logit-tol", type=float, default=1e-3, help="max |full-cache logit diff| between the sides")
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args(argv)
    args.seeds = [int(s) for s in args.seeds.split(",")]
    args.budgets_str = args.budgets
    args.budgets = [float(b) for b in args.budgets.split(",")]
    args.methods = [m for m in args.methods.split(",") if m]
    py = kvpress_python(args.kvpress_venv)
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    work = out / "_work"
    work.mkdir(parents=True, exist_ok=True)
    (out / ".gitignore").write_text("_work/\n")
    wall: dict[str, float] = {}
    t0 = time.perf_counter()

    model, tok = assets.load_model(MODEL)
    samples = make_samples(tok, args.length, args.continuation, args.seeds)
    samples_path = write_samples(out, args, samples)
    log(f"{len(samples)} samples: {args.length} context + {args.continuation} continuation tokens -> {samples_path}")
    from transformers import DynamicCache

    ours_full = {
        s["seed"]: R.continuation_logits(model, DynamicCache(config=model.config), s["context_ids"],
                                         s["continuation_ids"])[0]
        for s in samples
    }  # fmt: skip
    wall["ours_full"] = time.perf_counter() - t0

    t = time.perf_counter()
    run_kvpress(py, "reference", samples_path, work, args, None)
    sanity = check_full_logits(ours_full, work, args.logit_tol)
    del ours_full
    wall["kvpress_reference"] = time.perf_counter() - t

    t = time.perf_counter()
    run_kvpress(py, "presses", samples_path, work, args, out / "kvpress.jsonl")
    wall["kvpress_presses"] = time.perf_counter() - t

    t = time.perf_counter()
    run_ours(model, tok, args, out / "ours")
    wall["ours"] = time.perf_counter() - t
    wall["total"] = time.perf_counter() - t0

    res = combine(out, args, sanity, wall)
    old = out / "combined.json"
    if old.is_file():  # a resumed run: keep the wall times of the runs that made the earlier cells
        prev = json.loads(old.read_text())
        res["earlier_runs_wall_s"] = [*prev.get("earlier_runs_wall_s", []), prev["wall_s"]]
    old.write_text(json.dumps(res, indent=1))
    md = table(res)
    (out / "table.md").write_text(md)
    print(md)
    log(f"done in {wall['total'] / 60:.1f} min -> {out / 'combined.json'}, {out / 'table.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
