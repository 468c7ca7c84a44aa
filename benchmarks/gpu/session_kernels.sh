#!/usr/bin/env bash
# One GPU call (about 8 min): the decoupled-tier kernels verified and timed against the tree before
# them (issue 13, "No speed regression"). Carries: .gpu/common (base/ = the tree before, the gguf
# wheel, asset-cache metadata) and .gpu/a (the first half of the SmolLM2 GGUF, parked in /tmp for
# the next call). Writes into $OUT: kernel_tests.log, decode_{base,new,new_decoupled}.json,
# prefill_{base,new}.json, cuda_decode.log.
set -uo pipefail
export PYTHONUNBUFFERED=1
DEST=${OUT:-benchmarks/results}
mkdir -p "$DEST" /tmp/mdkv
cp .gpu/a/* /tmp/mdkv/ 2>/dev/null
python -c "import torch; print(torch.cuda.get_device_name(), torch.__version__)"
NEW=$PWD BASE=$PWD/.gpu/common/base
t0=$(date +%s); el() { echo "[$(( $(date +%s) - t0 )) s] $*"; }

el "kernel tests on the GPU (compiled Triton, float64 references)"
PYTHONPATH=$NEW timeout 220 python -m pytest --durations 5 -q -x -p no:cacheprovider tests/test_triton_attention.py \
    2>&1 | tail -25 | tee "$DEST/kernel_tests.log"
el "HF decode through the kernel vs the torch path"
PYTHONPATH=$NEW timeout 60 python benchmarks/check_cuda_decode.py 2>&1 | tail -8 | tee "$DEST/cuda_decode.log"

el "decode attention, 128K x 8 and x 1, budget 0.0625: tree before, this tree, decoupled tiers"
B="bench --contexts 131072 --batches 8,1 --no-compile-check --rep-ms 200"
(cd "$BASE" && PYTHONPATH=$BASE timeout 120 python -m mdkv_compile.cli $B --tiers 128,64,32,16 --out "$DEST/decode_base.json" | tail -4)
PYTHONPATH=$NEW timeout 120 python -m mdkv_compile.cli $B --tiers 128,64,32,16 --out "$DEST/decode_new.json" | tail -4
PYTHONPATH=$NEW timeout 120 python -m mdkv_compile.cli $B --tiers mixeddimkv --out "$DEST/decode_new_decoupled.json" | tail -4

el "prefill overhead at 32K, batch 1, 32 layers: tree before, this tree"
PYTHONPATH=$BASE timeout 150 python benchmarks/gpu/prefill_overhead.py --out "$DEST/prefill_base.json"
PYTHONPATH=$NEW timeout 150 python benchmarks/gpu/prefill_overhead.py --out "$DEST/prefill_new.json"
el done
