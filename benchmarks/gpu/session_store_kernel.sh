#!/usr/bin/env bash
# The one-launch store kernel (decode = a chunk of one token, merge in the last program) timed on a GPU
# beside the kernels before it, which .gpu/common/base holds (their mdkv_compile; carry .gpu/common).
# Issue 16; results in docs/notes/kernel_notes.md ("v4"). At most 8 files come back from $OUT.
#   bash benchmarks/gpu/session_store_kernel.sh            # about 9 min: the shapes, chunk
#       variants, decoupled tiers (also capped at 168 registers), the HF check, the kernel tests (call 2 of issue 16 also ran the region
#       order and reduced-tier block rows: --tuning reverse_regions=0, block_n_reduced_max=64)
#   bash benchmarks/gpu/session_store_kernel.sh followup   # about 3 min: 128K x 8 and x 1, chunks,
#       fixed split counts at 128K x 1
#   bash benchmarks/gpu/session_store_kernel.sh final      # about 8 min: final defaults, decoupled tiers
#       (uncapped, capped at 168 registers) beside the tree before, and the tiers rows below; one tarball
#   bash benchmarks/gpu/session_store_kernel.sh softmax    # about 7 min: the softmax with one FFMA per
#       logit and unmasked whole blocks beside the tree before it (.gpu/common/base = the previous main):
#       the rows, chunks, decoupled tiers, the 128,16 tiers (the count-bound case), GPU kernel tests
#   bash benchmarks/gpu/session_store_kernel.sh blocks     # about 9 min: decode blocks of 256/512 rows for
#       the narrow tiers, chunks of 64 and 256 at 1 and 2 splits and 64- or 128-row blocks, the kernel tests
#   bash benchmarks/gpu/session_store_kernel.sh chunksplits  # about 8 min, next: the chunk split policy's
#       defaults as a whole, a traced launch (trace_store_kernel.py), 128K x 1 with 64-row full-tier
#       blocks and 4 stages, the decode rows with kept arrival counts (no memset) twice, the kernel tests
#       no call has reached compiled (decoupled tiers, kept counts, the trace, the cache path); call 7
#       ran an earlier form (chunks at 1, 2 and 4 splits, raw benchmarks/results/issue16_chunksplits_h100/)
#   bash benchmarks/gpu/session_store_kernel.sh kept       # about 5 min: chunksplits without its chunk rows
#       (and one batch-1 variant fewer)
#   bash benchmarks/gpu/session_store_kernel.sh merge      # about 9 min: the merge of the rows that
#       exist beside the tree before, its unroll, traced, decoupled tiers, the GPU kernel tests
#   bash benchmarks/gpu/session_store_kernel.sh merge2     # about 8 min: the stepped merge (jit.py and
#       plan.py of commit 2546a46, checked out over this tree) beside the tree before, decode rows and
#       chunks, traced (call 10); `merge2 short`: the decode rows alone
#   bash benchmarks/gpu/session_store_kernel.sh merge3     # about 9 min, next, one tree: the merge's loop as an
#       scf.for (merge_for_loop) beside the while loop, the longest tier split in two, 12 and 16 splits at
#       batch 1, traced, the GPU kernel tests, then the chunks with each loop
#   bash benchmarks/gpu/session_store_kernel.sh tiers      # about 3 min, not run yet: where the time goes
#       by tier width, 128K x 8 and x 1 with the full tier alone and beside one reduced tier of 64 or 16
#       dims (equal bytes per tier, as always), and the default four
set -uo pipefail
export PYTHONUNBUFFERED=1
DEST=${OUT:-benchmarks/results}
mkdir -p "$DEST"
exec > >(tee "$DEST/session.log") 2>&1
python -c "import torch; print(torch.cuda.get_device_name(), torch.__version__)"
NEW=$PWD BASE=$PWD/.gpu/common/base
t0=$(date +%s); el() { echo "[$(( $(date +%s) - t0 )) s] $*"; }
CHUNKS="--chunks 16,64,256 --chunk-batches 8"
new() { PYTHONPATH=$NEW timeout "$1" python -m mdkv_compile.cli bench "${@:2}" 2>&1 | grep -v "^check \|^sweep "; }
base() { (cd "$BASE" && PYTHONPATH=$BASE timeout "$1" python -m mdkv_compile.cli bench --no-compile-check "${@:2}" \
    2>&1 | grep -v "^check "); }
finish() {  # the JSON of $J in one tarball $1 (at most 8 files come back), then the kernel tests for $2 s
    # (those pytest -k $3 selects, where given)
    tar -czf "$DEST/$1" -C $J .
    [ -n "${2:-}" ] && gpu_tests "$2" "${3:-}"
    el done
    exit 0
}
gpu_tests() {  # the kernel tests compiled for the GPU against float64 references, at most $1 s (-k $2)
    el "kernel tests on the GPU (compiled Triton, float64 references) ${2:+-k '$2'}"
    PYTHONPATH=$NEW timeout "$1" python -m pytest -q -x -p no:cacheprovider tests/test_triton_attention.py \
        ${2:+-k "$2"} 2>&1 | tail -4
}
traced() {  # where a launch's time goes, program by program (the GPU's timer), into $J/trace.json, or with
    # --tuning $1 into $J/trace_$1.json
    el "where a launch's time goes, program by program (GPU timer) ${1:+tuning $1}"
    PYTHONPATH=$NEW timeout 60 python benchmarks/gpu/trace_store_kernel.py --shapes 131072x1,131072x8 \
        ${1:+--tuning $1} --out "$J/trace${1:+_${1//[=,]/_}}.json"
}
decode_tunings() {  # 128K x 8 and x 1 with each --tuning given, this tree
    for t in "$@"; do
        el "this tree, tuning $t"
        new 60 --no-compile-check --shapes 131072x8,131072x1 --tuning $t --out "$J/bench_${t//[=,]/_}.json" | grep "^B="
    done
}
batch1() {  # 128K x 1 with each --tuning given
    for t in "$@"; do
        el "128K x 1, tuning $t"
        new 35 --no-compile-check --shapes 131072x1 --tuning $t --out "$J/bench_b1_${t//[=,]/_}.json" | grep "^B="
    done
}

if [ "${1:-}" = final ]; then
    # The rows the first three calls could not reach: the final defaults together, the policy's default
    # (decoupled) tiers uncapped and capped at 168 registers, and where the time goes by tier width.
    # JSON in one tarball (at most 8 files come back).
    J=/tmp/store_json; mkdir -p $J
    el "tree before: default tiers, then decoupled"
    base 70 --contexts 131072 --batches 8,1 --out $J/bench_base.json | tail -2
    base 70 --contexts 131072 --batches 8,1 --tiers mixeddimkv --out $J/bench_base_decoupled.json | tail -2
    el "this tree, final defaults"
    new 90 --no-compile-check --shapes 131072x8,131072x1 $CHUNKS --out $J/bench_new.json | tail -5
    new 70 --no-compile-check --shapes 131072x8,131072x1 --tiers mixeddimkv --out $J/bench_new_decoupled.json | tail -2
    new 70 --no-compile-check --shapes 131072x8,131072x1 --tiers mixeddimkv --tuning decode_max_registers=168 \
        --out $J/bench_new_decoupled_168.json | tail -2
    for tiers in 128 128,64 128,16; do
        el "this tree, tiers $tiers"
        new 50 --no-compile-check --shapes 131072x8,131072x1 --tiers $tiers \
            --out "$J/bench_tiers_${tiers//,/_}.json" | tail -2
    done
    finish store_final.tar.gz
fi

if [ "${1:-}" = softmax ]; then
    J=/tmp/store_json; mkdir -p $J
    for tree in base new; do
        el "$tree: bench tiers, chunks"
        $tree 110 --no-compile-check --shapes 131072x8,131072x1 $CHUNKS --out $J/bench_$tree.json | tail -5
        el "$tree: decoupled tiers; tiers 128,16"
        $tree 70 --no-compile-check --shapes 131072x8,131072x1 --tiers mixeddimkv --out $J/bench_${tree}_decoupled.json | tail -2
        $tree 50 --no-compile-check --shapes 131072x8,131072x1 --tiers 128,16 --out $J/bench_${tree}_128_16.json | tail -2
    done
    el "this tree, bench tiers and chunks again (order effects)"
    new 110 --no-compile-check --shapes 131072x8,131072x1 $CHUNKS --out $J/bench_new_again.json | tail -5
    finish store_softmax.tar.gz 150
fi

if [ "${1:-}" = blocks ]; then
    # About 9 min. (1) Decode blocks of the narrow tiers (Tuning.decode_block_n_reduced_max): at 128 rows
    # a 16-dim block moves 8 KiB, so at 128K x 1 its programs walk 16 short blocks each (8 splits),
    # twice the full tier's count. Prediction: 256/512 rows cut 128K x 1 by 10-30% if that chain of
    # blocks is what it waits on, less at x 8 (nearer the bandwidth); the 168-register cap spills 48 B
    # at 256 and 1.2 KiB at 512 (resources.py), uncapped 256 takes 245 registers (two programs per SM).
    # (2) the chunk of 64 (1.85x evicted after call 6) with one split and with 128-row blocks, and of
    # 256 beside; (3) the kernel tests.
    J=/tmp/store_json; mkdir -p $J
    for t in "" decode_block_n_reduced_max=256 decode_block_n_reduced_max=512 \
             decode_block_n_reduced_max=256,decode_max_registers=none; do
        el "decode, tuning '$t'"
        new 60 --no-compile-check --shapes 131072x8,131072x1 --tuning "$t" --out "$J/bench_dec_${t//[=,]/_}.json" | tail -2
    done
    for t in "" decode_block_n_reduced_max=256; do
        el "decode, decoupled tiers, tuning '$t'"
        new 60 --no-compile-check --shapes 131072x8,131072x1 --tiers mixeddimkv --tuning "$t" \
            --out "$J/bench_decoupled_${t//[=,]/_}.json" | tail -2
    done
    for s in 1 2; do
        el "chunks, $s splits"
        new 80 --no-compile-check --shapes 131072x8 --chunks 64,256 --chunk-batches 8 --chunk-block-m 64,128 \
            --tuning splits=$s --out $J/bench_chunks_s$s.json | grep "^chunk"
    done
    finish store_blocks.tar.gz 150
fi

if [ "${1:-}" = chunksplits ]; then
    # About 8 min. Call 7 (kernel_notes) timed chunks with fixed split counts and chose
    # Tuning.chunk_programs_per_sm from them: the defaults as a whole (chunks of 16 / 64 / 256 after 32K
    # at batch 8; expected 1.04x / 1.28x / 1.50x evicted SDPA), a traced launch at 128K x 1 and x 8,
    # batch-1 launch parameters, then the kernel tests no call has reached compiled.
    J=/tmp/store_json; mkdir -p $J
    el "defaults: decode and chunks"
    new 100 --no-compile-check --shapes 131072x8,131072x1 --chunks 16,64,256 --chunk-batches 8 \
        --out $J/bench_defaults.json | grep "^chunk\|^B="
    traced
    # 128K x 1: shorter chains for the narrow tiers changed nothing in call 7 (uncapped 256-row blocks:
    # 0.0224 against 0.0222 ms), so the full tier's programs (8 blocks of 32 rows) may set the time; or
    # each program's chain of dependent blocks, with two blocks in flight: more stages
    batch1 block_n_full=64 num_stages=4 num_stages=4,block_n_full=64
    # every bench row times the launch with kept arrival counts (no memset node) beside the default;
    # a second run of the decode rows shows how far the difference stands above run-to-run noise
    el "decode rows again (counts kept beside the memset)"
    new 40 --no-compile-check --shapes 131072x8,131072x1 --out $J/bench_defaults_again.json | grep "^B="
    finish store_chunksplits.tar.gz 120 "decoupled or kept_arrival or trace or cache_chunk"
fi

if [ "${1:-}" = kept ]; then
    # About 5 min, the short form of `chunksplits`: the decode rows with kept arrival counts twice, the
    # traced launch, two batch-1 variants, the GPU tests of kept counts, the trace and the cache path
    J=/tmp/store_json; mkdir -p $J
    # the first run compiles the kernels on a fresh machine: 50 s were too few there (call 8)
    el "decode rows (counts kept beside the memset)"
    new 100 --no-compile-check --shapes 131072x8,131072x1 --out $J/bench_defaults.json | grep "^B="
    traced
    batch1 block_n_full=64 num_stages=4
    el "decode rows again"
    new 60 --no-compile-check --shapes 131072x8,131072x1 --out $J/bench_defaults_again.json | grep "^B="
    finish store_kept.tar.gz 80 "kept_arrival or trace or cache_chunk"
fi

if [ "${1:-}" = merge ]; then
    # About 9 min. The merge holds the rows that exist (4 query heads, not a 16-row block) and issues
    # basis_v's load first (.gpu/common/base = the tree before): the decode rows beside the tree before,
    # the merge's unroll (its loads of that many splits in flight together), the merge traced, the
    # policy's decoupled tiers, then the GPU kernel tests
    J=/tmp/store_json; mkdir -p $J
    # the first run of each tree compiles the kernels on a fresh machine (100 s)
    el "tree before: decode rows"
    base 100 --shapes 131072x8,131072x1 --out $J/bench_base.json | grep "^B="
    el "this tree: decode rows (narrow merge, unroll 1)"
    new 100 --no-compile-check --shapes 131072x8,131072x1 --out $J/bench_new.json | grep "^B="
    decode_tunings merge_unroll=8 merge_unroll=4 narrow_merge=0
    traced
    traced merge_unroll=8
    el "decoupled tiers: tree before, this tree"
    base 50 --shapes 131072x8,131072x1 --tiers mixeddimkv --out $J/bench_base_decoupled.json | grep "^B="
    new 50 --no-compile-check --shapes 131072x8,131072x1 --tiers mixeddimkv --out $J/bench_new_decoupled.json \
        | grep "^B="
    finish store_merge.tar.gz 90 "decode or merge or tuning or kept or decoupled"
fi

if [ "${1:-}" = merge2 ]; then
    # About 8 min: this tree beside the tree before (.gpu/common/base) at 128K x 8 and x 1 and the chunks
    # of 16 / 64 / 256 after 32K, merge_unroll 2 and 8, traced, then the float64 GPU kernel tests. Written
    # for the merge in [splits, rows, columns] steps (commit 2546a46; docs/notes/kernel_notes.md "Call 10")
    # (`merge2 short`: the decode rows alone)
    J=/tmp/store_json; mkdir -p $J
    [ "${2:-}" = short ] && CHUNKS=""
    el "tree before: decode rows ${CHUNKS:+and chunks}"
    base 130 --shapes 131072x8,131072x1 $CHUNKS --out $J/bench_base.json | grep "^B=\|^chunk"
    el "this tree: decode rows ${CHUNKS:+and chunks}"
    new 130 --no-compile-check --shapes 131072x8,131072x1 $CHUNKS --out $J/bench_new.json | grep "^B=\|^chunk"
    decode_tunings merge_unroll=2 merge_unroll=8
    traced
    finish store_merge2.tar.gz 100 "float64 or many_splits"
fi

if [ "${1:-}" = merge3 ]; then
    # About 9 min, one tree (no tree before needed), the steps most needed first: the JSON goes straight
    # to $DEST, so a call cut short still brings back the steps it finished. Decode rows (128K x 8 and
    # x 1) with the merge's while loop (the default) and its scf.for (Tuning.merge_for_loop: no layout
    # change per split), the longest tier read as two regions (Tuning.split_longest_tier) with each
    # loop, and more splits at batch 1 with the for loop (the cap of 8 was set by the while loop's
    # merge, whose time grew with each split); both new forms traced; the GPU kernel tests (their
    # tuning test takes the for loop too); then the chunk rows with each loop
    J=$(realpath "$DEST")
    decode_tunings merge_for_loop=0 merge_for_loop=1 merge_for_loop=1,split_longest_tier=1 split_longest_tier=1 \
        merge_for_loop=1,max_splits=12 merge_for_loop=1,max_splits=16
    traced merge_for_loop=1
    traced merge_for_loop=1,split_longest_tier=1
    gpu_tests 90 "float64 or many_splits or tuning"
    for t in merge_for_loop=0 merge_for_loop=1; do
        el "chunks, tuning $t"
        new 120 --no-compile-check --shapes 131072x1 $CHUNKS --tuning $t --out "$J/chunks_${t//=/_}.json" \
            | grep "^chunk"
    done
    el done
    exit 0
fi

if [ "${1:-}" = tiers ]; then
    for tiers in 128 128,64 128,16 128,64,32,16; do
        el "this tree, tiers $tiers"
        new 50 --no-compile-check --shapes 131072x8,131072x1 --tiers $tiers \
            --out "$DEST/bench_tiers_${tiers//,/_}.json" | tail -2
    done
    el done
    exit 0
fi

if [ "${1:-}" = followup ]; then
    el "tree before"
    base 70 --contexts 131072 --batches 8,1 --out "$DEST/bench_base.json" | tail -2
    el "this tree"
    new 90 --no-compile-check --shapes 131072x8,131072x1 $CHUNKS --out "$DEST/bench_new.json" | tail -5
    for s in 8 12; do
        el "this tree, $s splits at 128K x 1"
        new 40 --no-compile-check --shapes 131072x1 --tuning splits=$s --out "$DEST/bench_new_s$s.json" | tail -1
    done
    el done
    exit 0
fi

el "tree before (the old bench has no --shapes: three runs)"
base 100 --contexts 131072 --batches 8,1 --out "$DEST/bench_base.json" | tail -2
base 100 --contexts 32768 --batches 32 $CHUNKS --out "$DEST/bench_base_32k.json" | tail -4
base 60 --contexts 8192 --batches 64 --out "$DEST/bench_base_8k.json" | tail -1

el "this tree: the issue's shapes (with the torch.compile check) and chunk variants"
new 200 --shapes 131072x8,131072x1,32768x32,8192x64 $CHUNKS --chunk-block-m 64,128,32 --chunk-warps 4,8 \
    --out "$DEST/bench_new.json" | tail -9
el "the policy's default (decoupled) tiers at 128K x 8: tree before, this tree"
base 60 --contexts 131072 --batches 8 --tiers mixeddimkv --out "$DEST/bench_base_decoupled.json" | tail -1
new 60 --shapes 131072x8 --no-compile-check --tiers mixeddimkv --out "$DEST/bench_new_decoupled.json" | tail -1
new 60 --shapes 131072x8 --no-compile-check --tiers mixeddimkv --tuning decode_max_registers=168 \
    --out "$DEST/bench_new_decoupled_168.json" | tail -1

el "HF chunks and decode through the kernel vs the torch path"
PYTHONPATH=$NEW timeout 100 python benchmarks/check_cuda_decode.py --chunk 2>&1 | grep "cuda chunk"
gpu_tests 150
el done
