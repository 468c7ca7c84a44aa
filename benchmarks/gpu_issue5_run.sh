#!/usr/bin/env bash
# Issue 5, one GPU run (H200, ~6 min): re-verify the kernels, then time
#   (a) a sweep of the decode kernel's launch parameters at 128K x 8, 32K x 32, 8K x 64 (with SDPA over
#       an evicted cache of equal bytes beside each),
#   (b) the chunked-prefill kernel: chunks of 16/64/256 queries after a 32K compressed prompt, batch 1 and 8,
#       against SDPA over the full and the evicted cache with the same causal chunk,
#   (c) the 128K-context batch-8 decode row against full-cache SDPA at budget 0.0625,
# and check the chunk kernel inside HF decoding (launched, same logits as the PyTorch path).
#
# Usage, from the repo root:   bash benchmarks/gpu_issue5_run.sh
# Writes into $OUT if set, else benchmarks/results/:
#   issue5_bench.json      (b) chunk_rows, (a) sweep, (c) rows[0]; issue5_bench.log its stdout
#   issue5_pytest.log      kernel tests on the GPU;   issue5_chunk_check.log  HF chunk check
# Exits non-zero if any step fails (the kernel tests failing stop the run before any timing).
set -euo pipefail
export PYTHONPATH=$PWD
DEST=${OUT:-benchmarks/results}
mkdir -p "$DEST"
t_start=$(date +%s)
failed=()

python -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name())"

echo "== 1/3 kernel tests on the GPU (launch-code refactor re-verified)"
if ! python -m pytest -q tests/test_triton_attention.py 2>&1 | tee "$DEST/issue5_pytest.log"; then
    echo "FAILED: tests/test_triton_attention.py on the GPU; not timing (see $DEST/issue5_pytest.log)" >&2
    exit 1
fi

echo "== 2/3 benchmark: 128K x 8 row, chunk rows, decode-kernel sweep ($(( $(date +%s) - t_start )) s so far)"
# --no-compile-check: the torch.compile check passed in earlier runs and costs ~30 s
if ! python -m mdkv_compile.cli bench --contexts 131072 --batches 8 --budget 0.0625 --rep-ms 50 \
        --chunks 16,64,256 --chunk-batches 1,8 --chunk-context 32768 --chunk-block-m 64,128 \
        --sweep --sweep-shapes 131072x8,32768x32,8192x64 --sweep-rep-ms 40 \
        --no-compile-check --out "$DEST/issue5_bench.json" 2>&1 | tee "$DEST/issue5_bench.log"; then
    failed+=("bench")
fi

echo "== 3/3 chunk kernel inside HF decoding ($(( $(date +%s) - t_start )) s so far)"
if ! python benchmarks/check_cuda_decode.py --chunk 2>&1 | tee "$DEST/issue5_chunk_check.log"; then
    failed+=("chunk check")
fi

echo "== summary ($(( $(date +%s) - t_start )) s total)"
python - "$DEST/issue5_bench.json" <<'EOF' || failed+=("summary")
import json
import sys

r = json.load(open(sys.argv[1]))
bw = r["copy_bandwidth"]["tb_s"]
print(f"copy bandwidth {bw:.3f} TB/s; times are CUDA-graph medians in ms")
for row in r.get("rows", []):
    m = row["methods"]
    full = min(v["ms_graph"] for k, v in m.items() if k.startswith("sdpa_full") and v.get("ms_graph"))
    ev = min(v["ms_graph"] for k, v in m.items() if k.startswith("sdpa_evict") and v.get("ms_graph"))
    pk = m["packed"]
    print(f"decode {row['context']}x{row['batch']}: full SDPA {full:.4f}, evicted SDPA {ev:.4f}, packed "
          f"{pk['ms_graph']:.4f} ({pk['tb_s_graph'] / bw:.0%} of copy) -> full/packed {full / pk['ms_graph']:.2f}x, "
          f"packed/evicted {pk['ms_graph'] / ev:.2f}x")
for row in r.get("chunk_rows", []):
    print(f"chunk L={row['chunk']:3d} B={row['batch']}: full/packed {row['speedup_vs_full'] or 0:.2f}x, "
          f"packed/evicted {row['packed_over_evict'] or 0:.2f}x, ok={row['ok']}, "
          f"sdpa variants agree={row['sdpa_variants_agree']}")
for s in r.get("sweep", []):
    print(f"sweep {s['context']}x{s['batch']}: default {s['default']['ms_graph']:.4f} best {s['best']['ms_graph']:.4f} "
          f"({s['best_fraction_of_copy_bw']:.0%} of copy, {s['best_over_evict']:.2f}x evicted SDPA) "
          f"S={s['best']['splits']} {s['best']['tuning']}")
EOF

if [ ${#failed[@]} -ne 0 ]; then
    echo "FAILED steps: ${failed[*]}" >&2
    exit 1
fi
echo "all steps ok; results in $DEST"
