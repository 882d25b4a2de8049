#!/usr/bin/env bash
# QLoRA against bf16 LoRA on the dequantized weights (issue #12): a random folder of a preset's shape
# (scripts/make-random-model.py, the tests' byte tokenizer), a copy with every projection NF4
# round-tripped through bitsandbytes (scripts/nf4-roundtrip-model.py), then STEPS steps of
# `fuselora train` on the same real text, seed and batches: `quantize = "nf4"` (double quant) on the
# original and `quantize = "none"` on the copy. The two frozen weight sets are the same numbers, so
# the loss curves should agree to bf16 noise; prints the largest relative difference and writes
# both curves as JSON.
# usage: scripts/qlora-vs-dequantized.sh FUSELORA_BIN TEXT.jsonl OUT_DIR [preset] [batch] [seq]
set -euo pipefail
BIN=$(realpath "$1") DATA=$(realpath "$2") OUT=$3
PRESET=${4:-llama-1b} BATCH=${5:-4} SEQ=${6:-1024} STEPS=${STEPS:-100}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "$OUT"
OUT=$(realpath "$OUT")
MODEL=${MODEL_DIR:-/tmp/random-$PRESET}
[ -f "$MODEL/config.json" ] || python3 "$ROOT/scripts/make-random-model.py" "$MODEL" --preset "$PRESET" \
  --tokenizer "$ROOT/tests/fixtures/byte-tokenizer" | tail -1
python3 "$ROOT/scripts/nf4-roundtrip-model.py" "$MODEL" "$MODEL-nf4-roundtrip" | tail -1
run() { # name model quantize
  cat >"$OUT/$1.toml" <<TOML
[model]
path = "$2"
dtype = "bf16"
quantize = "$3"
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
max_steps = $STEPS
lr = 2e-4
warmup_steps = 10
seed = 1
log_steps = 1
[output]
dir = "$OUT/$1"
overwrite = true
TOML
  "$BIN" train --config "$OUT/$1.toml" >"$OUT/$1.log" 2>&1 || { echo "train $1 failed:"; tail -5 "$OUT/$1.log"; exit 1; }
}
run qlora "$MODEL" nf4
run bf16-dequantized "$MODEL-nf4-roundtrip" none
python3 - "$OUT" <<'PY'
import json, pathlib, sys
out = pathlib.Path(sys.argv[1])
def losses(run):
    lines = (json.loads(l) for l in (out / run / "metrics.jsonl").read_text().splitlines() if l.strip())
    return {r["step"]: r["loss"] for r in lines if "loss" in r}
q, b = losses("qlora"), losses("bf16-dequantized")
steps = sorted(set(q) & set(b))
rel = {s: abs(q[s] - b[s]) / abs(b[s]) for s in steps}
worst = max(steps, key=rel.get)
print("| step | QLoRA (nf4) loss | bf16 LoRA on dequantized weights | relative difference |")
print("| --- | --- | --- | --- |")
for s in steps:
    if s == 1 or s % 10 == 0 or s == worst:
        print(f"| {s} | {q[s]:.6f} | {b[s]:.6f} | {rel[s]:.2e} |")
print(f"{len(steps)} steps; largest relative difference {rel[worst]:.2e} at step {worst}; "
      f"identical steps: {sum(q[s] == b[s] for s in steps)}")
(out / "curves.json").write_text(json.dumps({"qlora": q, "bf16_dequantized": b}, indent=1))
PY
