"""Decode attention over the packed store vs SDPA (full cache and evicted cache of equal bytes).

    python benchmarks/bench_decode_attention.py --out benchmarks/results/decode_h200.json
    mdkv bench --out ...            # the same benchmark through the CLI

The implementation lives in ``mdkv_compile/bench/decode.py`` (so the installed ``mdkv`` command has it);
this script is the entry point the benchmarks folder documents.
"""

from __future__ import annotations

import sys

from mdkv_compile.bench.decode import main

if __name__ == "__main__":
    sys.exit(main())
