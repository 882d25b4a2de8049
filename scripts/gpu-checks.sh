#!/usr/bin/env bash
# The GPU acceptance checks in one go (what docs/benchmarks.md records), on a machine with an NVIDIA
# GPU, python3 with torch + transformers + peft, and a built `fuselora` (cargo build --release -p
# trainer --features cuda):
#   1. check-reference on the shared fixtures with --backend cuda --dtype f32;
#   2. a 100-step LoRA run on real text (c4 demo) on a small random Llama with the SmolLM2
#      tokenizer: GPU bf16, GPU f16 (loss scaling) and CPU f32, same batches; replayed through
#      transformers + PEFT (scripts/compare-hf-peft.py) and the loss curves compared;
#   3. fuselora bench llama2-7b batch 2 × 2048 with checkpointing, then the HF + PEFT baseline.
# usage: [FIXTURES=tests/fixtures] [SKIP_BENCH=1] scripts/gpu-checks.sh FUSELORA_BIN DATA.jsonl OUT_DIR
set -uo pipefail
BIN=$(realpath "$1") DATA=$(realpath "$2") OUT=$3
SCRIPTS=$(cd "$(dirname "$0")" && pwd)
FIXTURES=${FIXTURES:-$SCRIPTS/../tests/fixtures}
WORK=$(mktemp -d)
export FUSELORA_KERNEL_CACHE=$WORK/kernels
mkdir -p "$OUT"

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/gpu.txt"
python3 "$SCRIPTS/make-test-model.py" "$WORK/model" --tokenizer "$FIXTURES/smollm2-tokenizer" 2>&1 | tail -1

cat > "$WORK/run.toml" <<TOML
[model]
path = "$WORK/model"
[data]
train = ["$DATA"]
max_seq_len = 256
packing = false
[train]
batch_size = 4
grad_accum = 2
max_steps = 100
lr = 1e-3
warmup_steps = 10
seed = 1
log_steps = 1
dump_batches = true
[output]
dir = "$WORK/out-gpu-bf16"
TOML

# The CPU f32 run goes in the background while the GPU works.
"$BIN" train --config "$WORK/run.toml" --set model.backend='"cpu"' --set output.dir="\"$WORK/out-cpu-f32\"" \
  > "$OUT/train-cpu-f32.log" 2>&1 &
CPU_PID=$!

echo "== 1. fixtures on the GPU in f32"
"$BIN" check-reference --backend cuda --dtype f32 "$FIXTURES"/tiny-* "$FIXTURES/nf4-quant" \
  "$FIXTURES/smollm2-tokenizer" 2>&1 | tee "$OUT/check-reference-cuda-f32.log" | grep -E "^==|^FAIL|passed,"

echo "== 2. 100-step runs"
"$BIN" train --config "$WORK/run.toml" --set model.backend='"cuda"' > "$OUT/train-gpu-bf16.log" 2>&1
tail -4 "$OUT/train-gpu-bf16.log"
"$BIN" train --config "$WORK/run.toml" --set model.backend='"cuda"' --set model.dtype='"f16"' \
  --set output.dir="\"$WORK/out-gpu-f16\"" > "$OUT/train-gpu-f16.log" 2>&1
tail -2 "$OUT/train-gpu-f16.log"
wait $CPU_PID
tail -2 "$OUT/train-cpu-f32.log"
python3 "$SCRIPTS/compare-hf-peft.py" --model "$WORK/model" --run "$WORK/out-gpu-bf16" \
  --other "$WORK/out-cpu-f32" --other "$WORK/out-gpu-f16" --json "$OUT/compare-hf-peft.json" 2>&1 | grep -v Warning | tail -16

[ "${SKIP_BENCH:-0}" = 1 ] && exit 0  # the bench set runs apart (scripts/bench-gpu.sh)
echo "== 3. 7B bench"
"$BIN" bench --preset llama2-7b --batch 2 --seq 2048 --warmup 2 --steps 8 --json "$OUT/bench-llama2-7b.json" 2>&1 | tail -9
python3 "$SCRIPTS/bench-hf-peft.py" --preset llama2-7b --batch 2 --seq 2048 --warmup 2 --steps 8 \
  --json "$OUT/bench-hf-peft-llama2-7b.json" 2>&1 | tail -1
