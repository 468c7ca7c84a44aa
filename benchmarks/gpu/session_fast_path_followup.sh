#!/usr/bin/env bash
# One GPU call (about 8 min): the follow-ups of docs/notes/gpu_notes.md section 8.
#   1. tokens in float32: the eager MixedDimKV reference, reduce-overhead over the static cache and
#      GraphedDecoder (in bf16 a random model's flat attention leaves the kept tokens to rounding), at
#      --quick shapes (at 4 x 16K the float32 reference's prompt SDPA takes the math kernel: 128 GiB);
#   2. the default-cache compiled paths' prefill peak after compiled prompts dropped their
#      materialised causal mask, with allocator snapshots of the timed calls (memory_viz).
# Writes $OUT/fast_path_fp32.json, $OUT/fast_path_memory.json and $OUT/mem/<path>.memory.pickle.
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
DEST=${OUT:-benchmarks/results}; mkdir -p "$DEST/mem"
python -c "import torch; print(torch.cuda.get_device_name(), torch.__version__)"
timeout 270 python benchmarks/check_fast_path.py --quick --dtype float32 --paths patch,ro-static,graphed \
    --out "$DEST/fast_path_fp32.json" --path-timeout 250 --timed-timeout 100 2>&1 | grep -v "^W\|Warning" | tail -15
timeout 270 python benchmarks/check_fast_path.py --paths plain,mdkv-default,ro-default \
    --memory-history "$DEST/mem" --out "$DEST/fast_path_memory.json" --path-timeout 250 --timed-timeout 100 \
    2>&1 | grep -v "^W\|Warning" | tail -15
