#!/usr/bin/env bash
# One GPU call (about 9 min): the one-launch store kernel (decode = a chunk of one token, merge in the
# last program) checked on the GPU and timed beside the kernels before it (issue 16). Carries
# .gpu/common (base/ = the tree before: its mdkv_compile). Writes into $OUT: kernel_tests.log,
# bench_{base,new,new_forward}.json and their logs, cuda_decode.log.
set -uo pipefail
export PYTHONUNBUFFERED=1
DEST=${OUT:-benchmarks/results}
mkdir -p "$DEST"
python -c "import torch; print(torch.cuda.get_device_name(), torch.__version__)"
NEW=$PWD BASE=$PWD/.gpu/common/base
t0=$(date +%s); el() { echo "[$(( $(date +%s) - t0 )) s] $*"; }
SHAPES="--shapes 131072x8,131072x1,32768x32,8192x64"
CHUNKS="--chunks 16,64,256 --chunk-batches 8"

el "kernel tests on the GPU (compiled Triton, float64 references)"
PYTHONPATH=$NEW timeout 200 python -m pytest -q -x -p no:cacheprovider tests/test_triton_attention.py \
    2>&1 | tail -6 | tee "$DEST/kernel_tests.log"

el "tree before: decode shapes and chunks"
(cd "$BASE" && PYTHONPATH=$BASE timeout 150 python -m mdkv_compile.cli bench --contexts 131072 --batches 8,1 \
    --no-compile-check --out "$DEST/bench_base.json" > "$DEST/bench_base.log" 2>&1)
(cd "$BASE" && PYTHONPATH=$BASE timeout 100 python -m mdkv_compile.cli bench --contexts 32768 --batches 32 \
    --no-compile-check $CHUNKS --out "$DEST/bench_base_32k.json" > "$DEST/bench_base_32k.log" 2>&1)
tail -6 "$DEST/bench_base.log" "$DEST/bench_base_32k.log"

el "this tree: decode shapes (with the torch.compile check) and chunk variants"
PYTHONPATH=$NEW timeout 200 python -m mdkv_compile.cli bench $SHAPES $CHUNKS --chunk-block-m 64,128 --chunk-warps 8,4 \
    --out "$DEST/bench_new.json" > "$DEST/bench_new.log" 2>&1
tail -12 "$DEST/bench_new.log"

el "this tree, regions launched in slot order"
PYTHONPATH=$NEW timeout 60 python -m mdkv_compile.cli bench --shapes 131072x8,131072x1 --no-compile-check \
    --tuning reverse_regions=0 --out "$DEST/bench_new_forward.json" > "$DEST/bench_new_forward.log" 2>&1
tail -3 "$DEST/bench_new_forward.log"

el "HF decode and chunks through the kernel vs the torch path"
PYTHONPATH=$NEW timeout 90 python benchmarks/check_cuda_decode.py 2>&1 | tail -4 | tee "$DEST/cuda_decode.log"
PYTHONPATH=$NEW timeout 90 python benchmarks/check_cuda_decode.py --chunk 2>&1 | tail -8 | tee -a "$DEST/cuda_decode.log"
el done
