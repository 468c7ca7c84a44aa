#!/usr/bin/env bash
# One GPU call (about 8 min): the follow-ups of docs/notes/gpu_notes.md section 9.
#   1. where the reduce-overhead generate() step's host time goes, with and without
#      torch.inference_mode() (section 9 left that difference open), 8 layers, batch 4 x 16K;
#   2. the default-cache compiled path's prefill peak (16.2 GiB against plain's 14.5), with allocator
#      snapshots of the timed calls (open them at https://pytorch.org/memory_viz);
#   3. tokens in float32 at --quick shapes: the eager MixedDimKV reference, reduce-overhead over the
#      static cache and GraphedDecoder (at 4 x 16K the float32 reference's prompt SDPA takes the
#      math kernel: 128 GiB).
# Writes $OUT/profile_fast_path.json, $OUT/fast_path_memory.json, $OUT/mem/<path>.memory.pickle and
# $OUT/fast_path_fp32.json.
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
DEST=${OUT:-benchmarks/results}; mkdir -p "$DEST/mem"
python -c "import torch; print(torch.cuda.get_device_name(), torch.__version__)"
timeout 200 python benchmarks/gpu/profile_fast_path.py --out "$DEST/profile_fast_path.json" 2>&1 \
    | grep -v "^W\|Warning\|warn" | head -16
timeout 200 python benchmarks/check_fast_path.py --paths plain,mdkv-default \
    --memory-history "$DEST/mem" --out "$DEST/fast_path_memory.json" --path-timeout 190 --timed-timeout 100 \
    2>&1 | grep -v "^W\|Warning" | tail -8
timeout 120 python benchmarks/check_fast_path.py --quick --dtype float32 --paths patch,ro-static,graphed \
    --out "$DEST/fast_path_fp32.json" --path-timeout 110 2>&1 | grep -v "^W\|Warning" | tail -5
