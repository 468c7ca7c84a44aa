#!/usr/bin/env bash
# One short GPU call (about 3 min): the store kernel after the unrolled merge and the chunk row-block
# rule, beside the kernels before it at 128K x 8 and x 1, and fixed split counts at 128K x 1 (issue 16).
# Carries .gpu/common (base/ = the tree before). Writes into $OUT: bench_base.json, bench_new.json,
# bench_new_s{8,12}.json, session.log.
set -uo pipefail
export PYTHONUNBUFFERED=1
DEST=${OUT:-benchmarks/results}
mkdir -p "$DEST"
exec > >(tee "$DEST/session.log") 2>&1
python -c "import torch; print(torch.cuda.get_device_name(), torch.__version__)"
NEW=$PWD BASE=$PWD/.gpu/common/base
t0=$(date +%s); el() { echo "[$(( $(date +%s) - t0 )) s] $*"; }
new() { PYTHONPATH=$NEW timeout "$1" python -m mdkv_compile.cli bench --no-compile-check "${@:2}" 2>&1 | grep -v "^check "; }

el "tree before"
(cd "$BASE" && PYTHONPATH=$BASE timeout 70 python -m mdkv_compile.cli bench --no-compile-check --contexts 131072 \
    --batches 8,1 --out "$DEST/bench_base.json" 2>&1 | tail -2)
el "this tree"
new 90 --shapes 131072x8,131072x1 --chunks 16,64,256 --chunk-batches 8 --out "$DEST/bench_new.json" | tail -5
for s in 8 12; do
    el "this tree, $s splits at 128K x 1"
    new 40 --shapes 131072x1 --tuning splits=$s --out "$DEST/bench_new_s$s.json" | tail -1
done
el done
