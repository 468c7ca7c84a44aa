"""Where one store-attention launch spends its time, program by program (GPU only; issue 16).

Each program of a traced launch (``packed_decode_attention_triton(..., trace=buf)``) writes the GPU's
nanosecond timer (``%globaltimer``) at its start, after its region's partial is stored, after its
arrival is counted and after the merge (the last program of each owner), with its SM, region, owner and
split. Per shape this prints and writes, as medians over ``--calls`` launches, relative to the first
program's start: when programs start, how long each region's programs work, the arrival (one atomic)
and the merge, and the last merge's end (the launch's span inside the GPU). The untraced and traced
launches are timed as CUDA graphs beside each other, so the trace's own cost shows.

    PYTHONPATH=. python benchmarks/gpu/trace_store_kernel.py --shapes 131072x1,131072x8 --out trace.json
    python benchmarks/gpu/trace_store_kernel.py --plot trace.json   # trace.png: each shape's last launch
"""

from __future__ import annotations

import argparse
import json
import statistics
from typing import Any

import torch

from mdkv_compile.bench.decode import make_packed, parse_tiers, run_tuning, tier_counts
from mdkv_compile.kernels import store_attention as ta
from mdkv_compile.kernels.store_attention.jit import TRACE_FIELDS

BEGIN, WORK, ARRIVE, MERGED, SM, REGION, OWNER, SPLIT = range(TRACE_FIELDS)


def summarise(rows: torch.Tensor) -> dict[str, Any]:
    """One traced launch's rows (int64 [programs, TRACE_FIELDS]) as times in µs from its first start,
    per region slot (one more than the tiers where a tier is read as two: Tuning.split_longest_tier)."""
    n_regions = int(rows[:, REGION].max()) + 1
    t0 = int(rows[:, BEGIN].min())
    us = (rows[:, :MERGED + 1].double() - t0) / 1e3
    merged = rows[:, MERGED] > 0
    end = torch.where(merged, us[:, MERGED], us[:, ARRIVE])
    out: dict[str, Any] = {
        "programs": rows.shape[0],
        "mergers": int(merged.sum()),
        "max_programs_per_sm": int(torch.bincount(rows[:, SM]).max()),
        "start_p50": float(us[:, BEGIN].median()),
        "start_max": float(us[:, BEGIN].max()),
        "last_work_end": float(us[:, WORK].max()),
        "arrive_p50": float((us[:, ARRIVE] - us[:, WORK]).median()),
        "merge_p50": float((us[merged, MERGED] - us[merged, ARRIVE]).median()),
        "merge_max": float((us[merged, MERGED] - us[merged, ARRIVE]).max()),
        "span": float(end.max()),
    }
    for r in range(n_regions):
        sel = rows[:, REGION] == r
        work = us[sel, WORK] - us[sel, BEGIN]
        out[f"region{r}_work_p50"] = float(work.median())
        out[f"region{r}_work_max"] = float(work.max())
        out[f"region{r}_end_max"] = float(us[sel, WORK].max())
    return out


def trace_shape(B: int, n_ctx: int, args: argparse.Namespace, gen: torch.Generator) -> dict[str, Any]:
    import triton.testing as tt

    d, Hq, Hkv = args.head_dim, args.q_heads, args.kv_heads
    tiers = parse_tiers(args.tiers, d)
    counts, _ = tier_counts(n_ctx, args.budget, tiers, d, 2)
    p = make_packed(B, Hkv, d, tiers, counts, args.n_new, torch.bfloat16, gen, "cuda")
    q = torch.randn(B, Hq, 1, d, generator=gen, device="cuda", dtype=torch.bfloat16)
    tuning = run_tuning(args.tuning)
    buf = torch.zeros(1 << 16, TRACE_FIELDS, dtype=torch.int64, device="cuda")

    def call(trace: torch.Tensor | None = None) -> torch.Tensor:
        return ta.packed_decode_attention_triton(q, **p, scale=d**-0.5, tuning=tuning, trace=trace)

    plain, traced = call(), call(buf)
    torch.testing.assert_close(traced, plain, rtol=0, atol=0)  # the trace changes no result
    summaries = []
    for _ in range(args.calls):
        buf.zero_()
        call(buf)
        torch.cuda.synchronize()
        rows = buf[buf[:, BEGIN] > 0].cpu()
        summaries.append(summarise(rows))
    median = {k: statistics.median(s[k] for s in summaries) for k in summaries[0]}
    ms = {"plain": tt.do_bench_cudagraph(call, rep=args.rep_ms, return_mode="median"),
          "traced": tt.do_bench_cudagraph(lambda: call(buf), rep=args.rep_ms, return_mode="median")}
    return dict(batch=B, context=n_ctx, tiers=tiers, counts=counts, ms_graph=ms, median=median,
                last_call=rows.tolist())


def plot(path: str) -> str:
    """Each shape's last traced launch as a timeline (any machine, matplotlib): one line per program,
    sorted by region and start, coloured by region while it works, grey while it counts its arrival,
    black while it merges. Returns the PNG's path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(path) as f:
        data = json.load(f)
    shapes = data["shapes"]
    fig, axes = plt.subplots(1, len(shapes), figsize=(6.5 * len(shapes), 5), squeeze=False)
    for ax, r in zip(axes[0], shapes, strict=True):
        rows = sorted(r["last_call"], key=lambda row: (row[REGION], row[BEGIN]))
        t0 = min(row[BEGIN] for row in rows)
        colours = plt.get_cmap("tab10")
        for y, row in enumerate(rows):
            begin, work, arrive, merged = ((row[i] - t0) / 1e3 for i in (BEGIN, WORK, ARRIVE, MERGED))
            ax.hlines(y, begin, work, color=colours(row[REGION]), linewidth=1)
            ax.hlines(y, work, arrive, color="0.6", linewidth=1)
            if row[MERGED]:
                ax.hlines(y, arrive, merged, color="black", linewidth=2)
        dims = [f"{rk}/{rv}" if rk != rv else str(rk) for rk, rv in r["tiers"]]
        if max(row[REGION] for row in rows) >= len(dims):  # Tuning.split_longest_tier's second slot
            dims.append("longest, 2nd half")
        ax.set_title(f"{r['context'] // 1024}K x {r['batch']}: {len(rows)} programs, regions {', '.join(dims)}\n"
                     f"graph median {r['ms_graph']['plain'] * 1e3:.1f} us, span of this launch "
                     f"{max((row[MERGED] or row[ARRIVE]) - t0 for row in rows) / 1e3:.1f} us", fontsize=9)
        handles = [plt.Line2D([], [], color=colours(i), label=f"works: region {dim}") for i, dim in enumerate(dims)]
        handles += [plt.Line2D([], [], color="0.6", label="counts its arrival"),
                    plt.Line2D([], [], color="black", linewidth=2, label="merges")]
        ax.legend(handles=handles, fontsize=7, loc="lower right")
        ax.set_xlabel("us from the first program's start")
        ax.set_ylabel("program (by region, then start)")
    fig.tight_layout()
    png = path.rsplit(".", 1)[0] + ".png"
    fig.savefig(png, dpi=120)
    return png


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", default="131072x1,131072x8", help="CONTEXTxBATCH list")
    parser.add_argument("--tiers", default="128,64,32,16", help="as mdkv bench --tiers")
    parser.add_argument("--tuning", default="", help="as mdkv bench --tuning")
    parser.add_argument("--budget", type=float, default=0.0625)
    parser.add_argument("--q-heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--n-new", type=int, default=32)
    parser.add_argument("--calls", type=int, default=20, help="traced launches per shape (medians)")
    parser.add_argument("--rep-ms", type=int, default=100)
    parser.add_argument("--out", default="trace_store_kernel.json")
    parser.add_argument("--plot", metavar="JSON", help="only draw the timelines of a written trace (no GPU)")
    args = parser.parse_args()
    if args.plot:
        print(plot(args.plot))
        return
    if not torch.cuda.is_available():
        raise SystemExit("trace_store_kernel.py reads the GPU's timer: it needs a CUDA device")
    gen = torch.Generator(device="cuda").manual_seed(0)
    results = []
    for shape in args.shapes.split(","):
        n_ctx, B = (int(x) for x in shape.split("x"))
        r = trace_shape(B, n_ctx, args, gen)
        m, ms = r["median"], r["ms_graph"]
        regions = " ".join(f"r{i} {m[f'region{i}_work_p50']:.1f}/{m[f'region{i}_work_max']:.1f}"
                           for i in range(len(r["tiers"]) + 1) if f"region{i}_work_p50" in m)
        print(f"{shape}: graph {ms['plain'] * 1e3:.1f} us (traced {ms['traced'] * 1e3:.1f}) | span {m['span']:.1f} us,"
              f" {m['programs']} programs (<= {m['max_programs_per_sm']} per SM), start p50/max"
              f" {m['start_p50']:.1f}/{m['start_max']:.1f}, work p50/max {regions}, last work end"
              f" {m['last_work_end']:.1f}, arrive {m['arrive_p50']:.2f}, merge p50/max {m['merge_p50']:.1f}/"
              f"{m['merge_max']:.1f}", flush=True)
        results.append(r)
    with open(args.out, "w") as f:
        json.dump(dict(device=torch.cuda.get_device_name(), args=vars(args), shapes=results), f)


if __name__ == "__main__":
    main()
