"""End-to-end decode, prefill overhead and memory of a Llama-3-8B-shaped model (GPU).

    python benchmarks/bench_e2e.py --out benchmarks/results/e2e_h200.json
    mdkv bench --suite e2e --out ...        # the same benchmark through the CLI

The implementation lives in ``mdkv_compile/bench/e2e.py``.
"""

from __future__ import annotations

import sys

from mdkv_compile.bench.e2e import main

if __name__ == "__main__":
    sys.exit(main())
