"""`mdkv report`: markdown tables and PNG plots from `mdkv eval` results.

Reads `results.jsonl` (a file, or the folder holding it) and writes into `--out`:

- `report.md`: per (model, protocol, prompt style): a table per task family of the mean score
  per method x budget with the paired gap to `full` (same task, length, depth/seed), a per-task
  table, and the measured stored fraction of the cache per method x budget;
- `score_vs_budget_<task>.png`: score against budget, one line per method, `full` dashed;
- `niah_heatmap_<method>_<budget>.png`: NIAH grid, context length x needle depth.

Scores are RULER string match in [0, 1] (higher is better) except `ppl` (perplexity of the true
continuation, lower is better; its "gap" is the ratio to full) and `kl` (mean KL(full || method)
of the continuation's next-token distributions in nats, lower is better; full is 0, so no gap).
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from mdkv_compile.config import METHODS
from mdkv_compile.eval.runner import read_results, tier_order
from mdkv_compile.eval.tasks import TASKS
from mdkv_compile.usage import as_usage_error, command, output_folder

FAMILY_ORDER = ("niah", "ruler", "ppl", "kl")
# How a task's score reads: "ppl" and "kl" as they are (lower is better), string match in %.
UNSCALED = ("ppl", "kl")


def _metric(tasks: Iterable[str]) -> str:
    """"ppl" or "kl" when every task in `tasks` is that one, else "match" (string match)."""
    kinds = set(tasks)
    return kinds.pop() if len(kinds) == 1 and next(iter(kinds)) in UNSCALED else "match"


def _mean(xs: Iterable[float | None]) -> float | None:
    vals = [x for x in xs if x is not None]
    return sum(vals) / len(vals) if vals else None


def _pair_key(r: dict[str, Any]) -> tuple:
    return (r["model"], r["task"], int(r["length"]), r["variant"], r["protocol"], r["prompt_style"])


def _method_order(methods: Iterable[str]) -> list[str]:
    def rank(m: str) -> tuple[int, str]:
        base = m.split("[", 1)[0]  # option variants (runner.method_label) sort beside their method
        return (METHODS.index(base) if base in METHODS else len(METHODS), m)

    return sorted(set(methods), key=rank)


def _fmt(v: float | None, metric: str = "match") -> str:
    if v is None:
        return "-"
    return {"ppl": f"{v:.2f}", "kl": f"{v:.4f}"}.get(metric, f"{100 * v:.1f}")


def _fmt_gap(g: float | None, metric: str) -> str:
    if g is None:
        return ""
    return f" (x{g:.2f})" if metric == "ppl" else f" ({100 * g:+.1f})"


def _plotted(v: float, metric: str) -> float:
    return v if metric in UNSCALED else 100 * v


class Table:
    """Scores of one (model, protocol, style) group with paired gaps to `full`."""

    def __init__(self, records: list[dict[str, Any]]) -> None:
        self.records = records
        self.full = {_pair_key(r): r["score"] for r in records if r["method"] == "full"}
        self.methods = _method_order(r["method"] for r in records)
        self.budgets = sorted({float(r["budget"]) for r in records if r["method"] != "full"})

    def cell(self, method: str, budget: float | None, tasks: set[str]) -> tuple[float | None, float | None]:
        """(mean score, paired gap to full) over the records of `tasks`."""
        rs = [
            r for r in self.records
            if r["method"] == method and r["task"] in tasks and (budget is None or float(r["budget"]) == budget)
        ]  # fmt: skip
        score = _mean(r["score"] for r in rs)
        metric = _metric(tasks)
        if method == "full" or not rs or metric == "kl":
            return score, None
        pairs = [(r["score"], self.full.get(_pair_key(r))) for r in rs]
        pairs = [(s, f) for s, f in pairs if f is not None]
        if not pairs:
            return score, None
        if metric == "ppl":
            return score, _mean(s / f for s, f in pairs if f)
        return score, _mean(s - f for s, f in pairs)

    def family_table(self, tasks: set[str]) -> list[str]:
        metric = _metric(tasks)
        head = "| method | " + " | ".join(f"{b:g}" for b in self.budgets) + " |"
        lines = [head, "|" + "---|" * (len(self.budgets) + 1)]
        for m in self.methods:
            if m == "full":
                s, _ = self.cell(m, None, tasks)
                if s is None:
                    continue
                lines.append("| full (budget 1) | " + " | ".join(_fmt(s, metric) for _ in self.budgets) + " |")
                continue
            cells = []
            for b in self.budgets:
                s, g = self.cell(m, b, tasks)
                cells.append(_fmt(s, metric) + _fmt_gap(g, metric))
            if any(c != "-" for c in cells):
                lines.append(f"| {m} | " + " | ".join(cells) + " |")
        return lines

    def task_table(self) -> list[str]:
        tasks = [t for t in TASKS if any(r["task"] == t for r in self.records)]
        lines = ["| method | budget | " + " | ".join(tasks) + " |", "|" + "---|" * (len(tasks) + 2)]
        rows = [("full", None)] + [(m, b) for m in self.methods if m != "full" for b in self.budgets]
        for m, b in rows:
            vals = [self.cell(m, b, {t})[0] for t in tasks]
            if all(v is None for v in vals):
                continue
            lines.append(
                f"| {m} | {'1' if b is None else f'{b:g}'} | "
                + " | ".join(_fmt(v, _metric([t])) for v, t in zip(vals, tasks, strict=True))
                + " |"
            )
        return lines

    def bytes_table(self) -> list[str]:
        lines = [
            "| method | budget | stored fraction | stored MiB | full MiB | prompt entries per stored dim |",
            "|---|---|---|---|---|---|",
        ]
        rows = [("full", None)] + [(m, b) for m in self.methods if m != "full" for b in self.budgets]
        for m, b in rows:
            rs = [r for r in self.records if r["method"] == m and (b is None or float(r["budget"]) == b)]
            st = _mean(r.get("stored_bytes") for r in rs)
            fu = _mean(r.get("full_bytes") for r in rs)
            if not rs or st is None or not fu:
                continue
            frac = _mean(
                r["stored_bytes"] / r["full_bytes"] for r in rs if r.get("stored_bytes") and r.get("full_bytes")
            )
            frac_text = "n/a" if frac is None else f"{frac:.4f}"
            lines.append(
                f"| {m} | {'1' if b is None else f'{b:g}'} | {frac_text} | {st / 2**20:.3f} | {fu / 2**20:.3f} | "
                f"{_dims_text(rs)} |"
            )
        return lines


def _dims_text(rs: list[dict[str, Any]]) -> str:
    """Mean share of prompt entries per stored tier, e.g. `0: 75%, 16/8: 10%, 64: 15%`."""
    fr = [r["dim_fractions"] for r in rs if r.get("dim_fractions")]
    if not fr:
        return "-"
    tiers = sorted({t for f in fr for t in f}, key=tier_order)
    return ", ".join(f"{t}: {100 * sum(f.get(t, 0.0) for f in fr) / len(fr):.0f}%" for t in tiers)


def _groups(records: list[dict[str, Any]]) -> dict[tuple[str, str, str], list[dict[str, Any]]]:
    g: dict[tuple[str, str, str], list[dict[str, Any]]] = defaultdict(list)
    for r in records:
        g[(r["model"], r["protocol"], r["prompt_style"])].append(r)
    return dict(sorted(g.items()))


def write_markdown(records: list[dict[str, Any]], path: Path, plots: list[Path]) -> None:
    out = ["# MixedDimKV evaluation report", ""]
    out.append(
        "Scores: RULER string match in % (fraction of expected strings in the output, higher is better), "
        "mean over tasks, lengths and depths/seeds; in parentheses the paired gap to `full` in points. "
        "`ppl`: perplexity of the true continuation after the compressed prefix (lower is better); "
        "in parentheses the ratio to `full`. `kl`: mean KL(full || method) in nats of the continuation's "
        "next-token distributions (lower is better). Budgets are as given to `mdkv eval` "
        f"(kind: {', '.join(sorted({str(r.get('budget_kind', 'fraction')) for r in records}))}); "
        "the stored-fraction table shows the bytes each method actually kept."
    )
    for (model, protocol, style), rs in _groups(records).items():
        t = Table(rs)
        lengths = sorted({int(r["length"]) for r in rs})
        out += ["", f"## {model} / {protocol} / {style} prompt", "", f"Lengths: {lengths}; {len(rs)} cells.", ""]
        for fam in FAMILY_ORDER:
            tasks = {r["task"] for r in rs if TASKS.get(r["task"]) == fam}
            if not tasks:
                continue
            out += [f"### {fam} ({', '.join(sorted(tasks))})", "", *t.family_table(tasks), ""]
        out += ["### Per task", "", *t.task_table(), ""]
        bt = t.bytes_table()
        if len(bt) > 2:
            out += ["### Measured cache size", "", *bt, ""]
    if plots:
        out += ["## Plots", ""] + [f"![{p.stem}]({p.name})" for p in plots]
    path.write_text("\n".join(out) + "\n")


def write_plots(records: list[dict[str, Any]], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")  # no display on the servers
    import matplotlib.pyplot as plt

    paths: list[Path] = []
    groups = _groups(records)
    multi = len(groups) > 1
    for (model, protocol, style), rs in groups.items():
        suffix = f"_{model}_{protocol}_{style}".replace("/", "-") if multi else ""
        t = Table(rs)
        for task in [k for k in TASKS if any(r["task"] == k for r in rs)]:
            if not t.budgets:
                break
            metric = _metric([task])
            fig, ax = plt.subplots(figsize=(5.5, 3.8))
            for m in t.methods:
                if m == "full":
                    s, _ = t.cell(m, None, {task})
                    # KL spans decades (and full's is 0): a log axis, no line for full
                    if s is not None and metric != "kl":
                        ax.axhline(_plotted(s, metric), color="k", ls="--", lw=1, label="full")
                    continue
                xs, ys = [], []
                for b in t.budgets:
                    s, _ = t.cell(m, b, {task})
                    if s is not None:
                        xs.append(b)
                        ys.append(_plotted(s, metric))
                if xs:
                    ax.plot(xs, ys, marker="o", label=m)
            if len(t.budgets) > 1 and min(t.budgets) > 0:
                ax.set_xscale("log")
            if metric == "kl" and ax.lines:
                ax.set_yscale("log")
            ax.set_xlabel("budget")
            ax.set_ylabel({"ppl": "perplexity (lower is better)", "kl": "KL to full, nats (lower is better)"}
                          .get(metric, "score (%)"))
            ax.set_title(f"{task}: {model}, {protocol}")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
            fig.tight_layout()
            p = out / f"score_vs_budget_{task}{suffix}.png"
            fig.savefig(p, dpi=110)
            plt.close(fig)
            paths.append(p)
        niah = [r for r in rs if r["task"] == "niah" and r.get("depth") is not None]
        combos = sorted({(r["method"], float(r["budget"])) for r in niah}, key=lambda x: (t.methods.index(x[0]), x[1]))
        for m, b in combos:
            cells = [r for r in niah if r["method"] == m and float(r["budget"]) == b]
            lengths = sorted({int(r["length"]) for r in cells})
            depths = sorted({float(r["depth"]) for r in cells})
            grid = [[float("nan")] * len(depths) for _ in lengths]
            acc: dict[tuple[int, int], list[float]] = defaultdict(list)
            for r in cells:
                acc[(lengths.index(int(r["length"])), depths.index(float(r["depth"])))].append(r["score"])
            for (i, j), v in acc.items():
                grid[i][j] = 100 * sum(v) / len(v)
            fig, ax = plt.subplots(figsize=(1.2 + 0.7 * len(depths), 1.2 + 0.5 * len(lengths)))
            im = ax.imshow(grid, vmin=0, vmax=100, cmap="RdYlGn", aspect="auto")
            ax.set_xticks(range(len(depths)), [f"{d:.2f}" for d in depths])
            ax.set_yticks(range(len(lengths)), [str(x) for x in lengths])
            ax.set_xlabel("needle depth")
            ax.set_ylabel("context tokens")
            ax.set_title(f"NIAH {m} @ {b:g}", fontsize=9)
            fig.colorbar(im, ax=ax, label="score (%)")
            fig.tight_layout()
            p = out / f"niah_heatmap_{m}_{b:g}{suffix}.png"
            fig.savefig(p, dpi=110)
            plt.close(fig)
            paths.append(p)
    return paths


def make_report(results: str | Path, out: str | Path | None = None, plots: bool = True) -> Path:
    """Write report.md (and plots) for a results JSONL or its folder; return the markdown path."""
    src = Path(results)
    if src.is_dir():
        src = src / "results.jsonl"
    records = read_results(src)
    if not records:
        raise ValueError(f"no results in {src}; run `mdkv eval --out {src.parent}` first")
    out_dir = Path(out) if out else src.parent / "report"
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = write_plots(records, out_dir) if plots else []
    md = out_dir / "report.md"
    write_markdown(records, md, paths)
    return md


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("results", nargs="?", default="results/eval", help="results.jsonl or the folder holding it")
    p.add_argument("--out", default=None, help="output folder (default: <results folder>/report)")
    p.add_argument("--no-plots", action="store_true", help="markdown only")


@command("mdkv report")
def run(args: argparse.Namespace) -> int:
    if args.out is not None:
        output_folder(args.out, "--out")
    try:
        md = make_report(args.results, args.out, plots=not args.no_plots)
    except ValueError as e:
        raise as_usage_error(e) from None
    print(f"mdkv report: wrote {md} (and plots beside it)", file=sys.stderr)
    return 0
