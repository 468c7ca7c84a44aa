"""Compression overhead against prefill at one shape, repeated: the `mdkv bench --suite e2e` rows
(`mdkv_compile.bench.e2e.run_config`) of the uncompressed cache, snapkv and mixeddimkv at batch 1,
interleaved `--repeats` times, medians of the prefill seconds. Whichever `mdkv_compile` is first on
PYTHONPATH is timed, so two trees can be compared in one GPU session.

    python benchmarks/gpu/prefill_overhead.py --context 32768 --repeats 3 --out prefill.json
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch

import mdkv_compile
from mdkv_compile.bench.e2e import Config, build_model, run_config

STEPS = 4  # run_config drops the first two decode steps (warm-up) and takes the median of the rest


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--context", type=int, default=32768)
    p.add_argument("--budget", type=float, default=0.0625)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--layers", type=int, default=None)
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args()
    model = build_model(args.layers)
    configs = [Config(1, args.context, "dynamic"), Config(1, args.context, "snapkv", args.budget),
               Config(1, args.context, "mixeddimkv", args.budget)]
    for c in configs:  # warm-up: kernels compiled, libraries loaded
        run_config(model, Config(1, 1024, c.cache, c.budget), STEPS)
    times: dict[str, list[float]] = {c.cache: [] for c in configs}
    for _ in range(args.repeats):
        for c in configs:
            times[c.cache].append(run_config(model, c, STEPS)["prefill_s"])
    med = {k: statistics.median(v) for k, v in times.items()}
    result = {
        "device": torch.cuda.get_device_name(0), "package": str(Path(mdkv_compile.__file__).parent),
        "context": args.context, "budget": args.budget, "prefill_s": times, "median_s": med,
        "overhead": {k: med[k] / med["dynamic"] - 1 for k in med if k != "dynamic"},
    }
    args.out.write_text(json.dumps(result, indent=1))
    print(json.dumps({"package": result["package"], "median_s": med, "overhead": result["overhead"]}))


if __name__ == "__main__":
    main()
