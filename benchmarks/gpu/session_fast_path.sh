#!/usr/bin/env bash
# One GPU call (about 6 min): issue 14's table, every generate() path in its own process
# (benchmarks/check_fast_path.py), 8 layers, batch 4 x 16K prompts. Writes $OUT/fast_path_8x16k.json.
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
DEST=${OUT:-benchmarks/results}; mkdir -p "$DEST"
python -c "import torch; print(torch.cuda.get_device_name(), torch.__version__)"
timeout 560 python benchmarks/check_fast_path.py --out "$DEST/fast_path_8x16k.json" --path-timeout 450 \
    --timed-timeout 150 2>&1 | grep -v "^W\|Warning" | tail -60
