#!/usr/bin/env bash
# The quality grid of issue 13 on the GPU, SmolLM2-135M (fp32, exact torch attention over the store).
#   bash benchmarks/gpu/session_grid.sh kl     # kl task, 2048-token prefix, every method x budget, windows
#   bash benchmarks/gpu/session_grid.sh ppl    # perplexity at 4000 tokens + NIAH/RULER-style at 4000
# The model's GGUF reaches the GPU machine in two halves (a call carries at most 64 MiB): the first
# parked in /tmp/mdkv by session_kernels.sh, the second carried in .gpu/b. The asset cache is rebuilt
# under /tmp/mdkvcache from .gpu/common/cache. Results: $OUT/<part>.tar.gz (results folders).
set -uo pipefail
export PYTHONUNBUFFERED=1 MDKV_CACHE_DIR=/tmp/mdkvcache
DEST=${OUT:-/tmp/out}; mkdir -p "$DEST"
python -m pip install -q --no-index --no-deps --target /tmp/site .gpu/common/gguf-*.whl 2>&1 | tail -1
export PYTHONPATH=$PWD:/tmp/site
G=$MDKV_CACHE_DIR/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
if [ ! -f "$G" ]; then
  mkdir -p $MDKV_CACHE_DIR && cp -r .gpu/common/cache/. $MDKV_CACHE_DIR/
  cp .gpu/b/* /tmp/mdkv/ 2>/dev/null
  cat /tmp/mdkv/gguf.00 /tmp/mdkv/gguf.01 > "$G" || exit 3
fi
sha256sum "$G"
R=/tmp/res; mkdir -p $R
E="python -m mdkv_compile.cli eval --model smollm2 --device cuda --dtype float32 --option kernel=\"torch\" --quiet"
HS="--head-scores results/heads/smollm2_retrieval_reasoning.json"
M=full,snapkv,mixeddimkv,ada-snapkv,headkv,mixeddimkv-h,streamingllm,pyramidkv,lowrank  # most wanted first: a cut-off run loses the tail
t0=$(date +%s); el() { echo "[$(( $(date +%s) - t0 )) s] $*"; }
case "$1" in
kl)
  el "kl grid"
  timeout 270 $E --methods $M $HS --budgets 0.01,0.02,0.05,0.0625,0.1,0.25 --tasks kl --lengths 2048 --seeds 1,2,3,4,5,6 \
     --ppl-tokens 128 --protocols query-agnostic --out $R/gpu_smollm2_kl
  el "window and value-weight sweeps (defaults chosen by measurement)"
  for opt in window=16 window=64; do
    timeout 45 $E --methods snapkv,mixeddimkv --budgets 0.02,0.05,0.1 --tasks kl --lengths 2048 --seeds 1,2,3,4,5,6 \
       --ppl-tokens 128 --protocols query-agnostic --option $opt --out $R/gpu_smollm2_sweep
  done
  for opt in value_weight=0.1 value_weight=1.0; do
    timeout 35 $E --methods mixeddimkv --budgets 0.02,0.05,0.1 --tasks kl --lengths 2048 --seeds 1,2,3,4,5,6 \
       --ppl-tokens 128 --protocols query-agnostic --option $opt --out $R/gpu_smollm2_sweep
  done
  ;;
ppl)
  el "ppl grid"
  timeout 110 $E --methods $M $HS --budgets 0.02,0.0625,0.1 --tasks ppl --lengths 4000 --seeds 0,1 \
     --ppl-tokens 256 --protocols query-agnostic --out $R/gpu_smollm2_ppl
  el "the Triton kernel on the same cells (default kernel): same KL as the torch path?"
  timeout 150 python -m mdkv_compile.cli eval --model smollm2 --device cuda --dtype float32 --quiet \
     --methods mixeddimkv,snapkv --budgets 0.05,0.1 --tasks kl --lengths 2048 --seeds 1,2 --ppl-tokens 128 \
     --protocols query-agnostic --out $R/gpu_smollm2_kl_triton
  el "needle / RULER-style grid"
  timeout 190 $E --methods $M $HS --budgets 0.05,0.1,0.25 --tasks niah,niah_multikey --lengths 4000 \
     --depths 0.25,0.5,0.75 --seeds 1,2 --protocols query-aware --out $R/gpu_smollm2_niah
  ;;
esac
el "report"
for d in $R/*; do python -m mdkv_compile.cli report $d --out $d/report >/dev/null 2>&1 || echo "report failed: $d"; done
tar -czf "$DEST/$1.tar.gz" -C $R .
el done
