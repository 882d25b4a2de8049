#!/usr/bin/env bash
# `fuselora train` on packed real text against `fuselora bench` at the same shape, in one run on
# this GPU: a random folder with the preset's exact shape (scripts/make-random-model.py, the byte
# tokenizer of the tests so every id fits the 32000 vocabulary), the c4 demo texts packed into rows
# of SEQ, batch BATCH, checkpointing CKPT (default auto: both programs choose on this GPU, as
# `train` does by default), AdamW's state and the embedding table on OPT and EMB (device, the
# default, or host); bf16 and NF4 (double quant). Prints one table: tokens/s (all tokens of a step over its time, median of the
# steps after the first three) and peak memory.
# QUANTS="none" (or "nf4") runs one of the two.
# usage: [QUANTS=...] scripts/train-vs-bench.sh FUSELORA_BIN C4_DEMO_JSONL OUT_DIR [preset] [batch] [seq]
set -uo pipefail
BIN=$(realpath "$1") DATA=$(realpath "$2") OUT=$3
PRESET=${4:-llama2-7b} BATCH=${5:-2} SEQ=${6:-2048} STEPS=${STEPS:-16} CKPT=${CKPT:-auto}
OPT=${OPT:-device} EMB=${EMB:-device} QUANTS=${QUANTS:-none nf4}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "$OUT"
OUT=$(realpath "$OUT")
MODEL=${MODEL_DIR:-/tmp/random-$PRESET}
[ -f "$MODEL/config.json" ] || python3 "$ROOT/scripts/make-random-model.py" "$MODEL" --preset "$PRESET" \
  --tokenizer "$ROOT/tests/fixtures/byte-tokenizer" | tail -1
for quant in $QUANTS; do
  cat >"$OUT/train-$quant.toml" <<EOF
[model]
path = "$MODEL"
backend = "cuda"
dtype = "bf16"
quantize = "$quant"
embedding = "$EMB"
[lora]
r = 16
alpha = 16
targets = ["all-linear"]
[data]
train = ["$DATA"]
format = "text"
max_seq_len = $SEQ
packing = true
[train]
batch_size = $BATCH
grad_accum = 1
max_steps = $STEPS
lr = 1e-4
gradient_checkpointing = "$CKPT"
optimizer_state = "$OPT"
log_steps = 1
[output]
dir = "$OUT/train-$quant"
EOF
  "$BIN" train --config "$OUT/train-$quant.toml" >"$OUT/train-$quant.log" 2>&1 \
    || { echo "train $quant failed:"; tail -5 "$OUT/train-$quant.log"; }
  flag=(); [ "$quant" = nf4 ] && flag=(--quantize nf4)
  "$BIN" bench --preset "$PRESET" --batch "$BATCH" --seq "$SEQ" "${flag[@]}" --checkpointing "$CKPT" \
    --optimizer-state "$OPT" --embedding "$EMB" \
    --warmup 2 --steps 10 \
    --json "$OUT/bench-$quant.json" >"$OUT/bench-$quant.txt" 2>&1 \
    || { echo "bench $quant failed:"; tail -5 "$OUT/bench-$quant.txt"; }
done
python3 - "$OUT" $QUANTS <<'PY'
import json, pathlib, statistics, sys
out = pathlib.Path(sys.argv[1])
print("| weights | train tokens/s | bench tokens/s | train / bench | train peak GiB | bench peak GiB | difference | row fill |")
print("| --- | --- | --- | --- | --- | --- | --- | --- |")
for quant in sys.argv[2:]:
    m, b = out / f"train-{quant}" / "metrics.jsonl", out / f"bench-{quant}.json"
    if not m.exists() or not b.exists():
        print(f"| {quant} | failed | | | | | | |")
        continue
    steps = [r for r in map(json.loads, m.read_text().splitlines()) if "eval_loss" not in r]
    tps = statistics.median(r["tokens_per_s"] for r in steps[3:])  # all real tokens of the step
    summary = json.loads((out / f"train-{quant}" / "summary.json").read_text())
    bench = json.loads(b.read_text())
    tp, bp = summary["peak_memory_bytes"] / 2**30, bench["peak_memory_bytes"] / 2**30
    fill = f"{100 * summary['row_fill']:.1f}%"
    print(f"| {'bf16' if quant == 'none' else 'nf4'} | {tps:,.0f} | {bench['tokens_per_s']:,.0f} | "
          f"{tps / bench['tokens_per_s']:.3f} | {tp:.2f} | {bp:.2f} | {tp - bp:+.2f} GiB | {fill} |")
PY
