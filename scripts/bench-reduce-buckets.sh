#!/usr/bin/env bash
# Scaling efficiency of the 7B bench on NGPUS GPUs (default 2) for several gradient-bucket sizes
# (FUSELORA_REDUCE_BUCKET_LAYERS: layers per all-reduce during backward; 0 = one reduce after it).
# usage: [NGPUS=N] scripts/bench-reduce-buckets.sh FUSELORA_BIN OUT_DIR [BUCKETS...]
set -uo pipefail
BIN=$1 OUT=$2
shift 2
BUCKETS=${*:-0 1 4 8 16}
NGPUS=${NGPUS:-2}
mkdir -p "$OUT"
export NCCL_NVLS_ENABLE=0 FUSELORA_KERNEL_CACHE=${FUSELORA_KERNEL_CACHE:-$(mktemp -d)}
args=(bench --preset llama2-7b --batch 2 --seq 2048 --warmup 2 --steps 8)
"$BIN" "${args[@]}" --json "$OUT/one.json" > /dev/null 2>&1
for b in $BUCKETS; do
  FUSELORA_REDUCE_BUCKET_LAYERS=$b "$BIN" launch --nproc-per-node "$NGPUS" -- "${args[@]}" --json "$OUT/two-$b.json" > /dev/null 2>&1
done
python3 - "$OUT" "$NGPUS" $BUCKETS <<'PY'
import json, sys
out, n, buckets = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
one = json.load(open(f"{out}/one.json"))
print(f"1 GPU: {one['tokens_per_s']:.0f} tokens/s, median step {one['median_step_s']:.4f} s")
for b in buckets:
    two = json.load(open(f"{out}/two-{b}.json"))
    print(f"{n} GPUs, {b:>2} layers/bucket: {two['tokens_per_s']:.0f} tokens/s, median step {two['median_step_s']:.4f} s, "
          f"efficiency {two['tokens_per_s'] / (n * one['tokens_per_s']):.4f}")
PY
