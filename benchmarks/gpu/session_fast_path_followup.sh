#!/usr/bin/env bash
# One GPU call (about 8 min): the follow-ups of docs/notes/gpu_notes.md section 9 (`floor`, `table`;
# section 12's `steps` and `big`; `bigh100` or `bigh200`, the next: see below).
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
if [ "${1:-}" = steps ]; then
    # About 4 min: the first GPU run of GenerateSteps (a patched model compiled under reduce-overhead
    # replays whole one-token steps behind generate() over an explicit MixedDimCache), beside the eager
    # reference tokens and GraphedDecoder; then the 32-layer rows of plain generate() and the floor
    timeout 280 python benchmarks/check_fast_path.py --paths patch,ro-mixedcache,graphed \
        --out "$DEST/fast_path_steps.json" --path-timeout 260 --timed-timeout 100 2>&1 | grep -v "^W\|Warning" | tail -5
    timeout 280 python benchmarks/check_fast_path.py --big --jobs 1 --paths plain,floor \
        --out "$DEST/fast_path_big_plain.json" --path-timeout 200 --timed-timeout 100 2>&1 | grep -v "^W\|Warning" | tail -4
    exit 0
fi
if [ "${1:-}" = big ]; then
    # About 8 min, on the machine `steps` left warm: the 32-layer, batch 8 x 32K rows of transformers'
    # compiled static cache, reduce-overhead over the static cache and GraphedDecoder
    timeout 570 python benchmarks/check_fast_path.py --big --jobs 1 --paths hf-static-compile,ro-static,graphed \
        --out "$DEST/fast_path_big.json" --path-timeout 280 --timed-timeout 100 2>&1 | grep -v "^W\|Warning" | tail -5
    exit 0
fi
if [ "${1:-}" = bigh200 ]; then
    # About 8 min on an H200 (run with needs_h200: plain generate() and transformers' compiled static
    # cache ran out of memory on an H100 at this shape, section 12): issue 14's 32-layer, batch 8 x 32K
    # rows side by side, with our reduce-overhead path and the step's floor
    timeout 580 python benchmarks/check_fast_path.py --big --jobs 1 --paths plain,hf-static-compile,ro-static,floor \
        --out "$DEST/fast_path_big_h200.json" --path-timeout 240 --timed-timeout 100 2>&1 | grep -v "^W\|Warning" | tail -5
    exit 0
fi
if [ "${1:-}" = bigh100 ]; then
    # About 5 min on an H100: the same rows with the baselines' prompts prefilled 4096 tokens at a time
    # (transformers' prefill_chunk_size, check_fast_path.py --baseline-prefill-chunk): in one pass their
    # prefill does not fit an H100; their decode steps, which the targets compare, are the same steps
    timeout 580 python benchmarks/check_fast_path.py --big --jobs 1 --paths plain,hf-static-compile,ro-static,floor \
        --baseline-prefill-chunk 4096 --timed-only --out "$DEST/fast_path_big_h100.json" --path-timeout 200 \
        --timed-timeout 100 2>&1 | grep -v "^W\|Warning" | tail -8
    exit 0
fi
if [ "${1:-}" = table ]; then
    # About 3 min (H100): issue 14's table in one run on one card, with the default cache under
    # reduce-overhead (its first call runs without CUDA graphs; later calls get the static cache)
    timeout 570 python benchmarks/check_fast_path.py \
        --paths plain,patch,ro-static,ro-default,graphed,hf-static-compile,ro-mixedcache,hf-compile-config \
        --out "$DEST/fast_path_table.json" --path-timeout 260 --timed-timeout 100 2>&1 | grep -v "^W\|Warning" | tail -14
    exit 0
fi
if [ "${1:-}" = floor ]; then
    # About 8 min: (1) the decode step's floor (GraphedDecoder over 16-token prompts: weights and
    # launches) beside plain generate(), the reduce-overhead path and GraphedDecoder: can any step be 5x
    # plain? (3, last) the default-cache peak, summarised on the machine (benchmarks/gpu/peak_blocks.py;
    # the snapshots stay there).
    timeout 240 python benchmarks/check_fast_path.py --paths plain,ro-static,graphed,floor \
        --out "$DEST/fast_path_floor.json" --path-timeout 220 --timed-timeout 100 2>&1 | grep -v "^W\|Warning" | tail -6
    # (3) the store kernel's split cap per owner (Tuning.owner_programs) against per region, one region
    # (an evicted cache in the packed layout) and the policy's decoupled tiers; JSON in one tarball
    mkdir -p /tmp/split
    for tiers in 128 mixeddimkv; do
        for op in none 32; do
            timeout 50 python -m mdkv_compile.cli bench --no-compile-check --shapes 131072x8,131072x1 --tiers $tiers \
                --tuning owner_programs=$op --out "/tmp/split/bench_${tiers}_op$op.json" 2>&1 | grep "^B="
        done
    done
    tar -czf "$DEST/split.tar.gz" -C /tmp/split .
    timeout 220 python benchmarks/check_fast_path.py --paths plain,mdkv-default --memory-history /tmp/mem \
        --out "$DEST/fast_path_memory.json" --path-timeout 200 --timed-timeout 100 2>&1 | grep -v "^W\|Warning" | tail -4
    timeout 60 python benchmarks/gpu/peak_blocks.py /tmp/mem/*.memory.pickle --out "$DEST/peak_blocks.json"
    exit 0
fi
timeout 200 python benchmarks/gpu/profile_fast_path.py --out "$DEST/profile_fast_path.json" 2>&1 \
    | grep -v "^W\|Warning\|warn" | head -16
timeout 200 python benchmarks/check_fast_path.py --paths plain,mdkv-default \
    --memory-history "$DEST/mem" --out "$DEST/fast_path_memory.json" --path-timeout 190 --timed-timeout 100 \
    2>&1 | grep -v "^W\|Warning" | tail -8
timeout 120 python benchmarks/check_fast_path.py --quick --dtype float32 --paths patch,ro-static,graphed \
    --out "$DEST/fast_path_fp32.json" --path-timeout 110 2>&1 | grep -v "^W\|Warning" | tail -5
