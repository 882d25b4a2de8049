#!/usr/bin/env bash
# Data-parallel and DPO checks on a machine with 2+ NVIDIA GPUs (what docs/benchmarks.md records):
#   1. 2-rank NCCL training (`fuselora launch`) against 1 rank with the same global batch
#      (1 rank × accumulation 4 = 2 ranks × accumulation 2), 40 bf16 steps on real text;
#   2. `fuselora bench --preset llama2-7b` on 1 GPU and under `fuselora launch` on 2: scaling
#      efficiency = 2-GPU tokens/s ÷ (2 × 1-GPU tokens/s);
#   3. DPO: the first steps on the GPU in bf16 against the CPU in f32;
#   4. check-reference --backend cuda --dtype f32 on the DPO and QLoRA fixtures.
# Needs python3 with torch + transformers (for the test model) and a built fuselora (--features cuda).
# usage: scripts/multi-gpu-checks.sh FUSELORA_BIN TEXT.jsonl DPO.json OUT_DIR
set -uo pipefail
BIN=$(realpath "$1") TEXT=$(realpath "$2") DPO=$(realpath "$3") OUT=$4
SCRIPTS=$(cd "$(dirname "$0")" && pwd)
FIXTURES=$SCRIPTS/../tests/fixtures
WORK=$(mktemp -d)
mkdir -p "$OUT"
export FUSELORA_KERNEL_CACHE=$WORK/kernels NCCL_NVLS_ENABLE=0
# cudarc opens libnccl.so; images often ship only libnccl.so.2.
nccl=$(ls /opt/torch/.venv/lib/python3.12/site-packages/nvidia/nccl/lib/libnccl.so.2 /usr/lib/x86_64-linux-gnu/libnccl.so.2 2>/dev/null | head -n 1)
mkdir -p "$WORK/lib" && ln -sf "$nccl" "$WORK/lib/libnccl.so"
export LD_LIBRARY_PATH=$WORK/lib:${LD_LIBRARY_PATH:-}
nvidia-smi -L | tee "$OUT/gpus.txt"
echo "mpirun: $(command -v mpirun || echo absent)" | tee -a "$OUT/gpus.txt"
python3 "$SCRIPTS/make-test-model.py" "$WORK/model" --tokenizer "$FIXTURES/smollm2-tokenizer" 2>&1 | tail -1

compare_losses() {  # compare_losses A/metrics.jsonl B/metrics.jsonl KEY
  python3 - "$@" <<'PY'
import json, sys
def load(p, key):
    return {r["step"]: r[key] for r in map(json.loads, open(p)) if key in r and "eval_loss" not in r}
a, b = load(sys.argv[1], sys.argv[3]), load(sys.argv[2], sys.argv[3])
steps = sorted(set(a) & set(b))
rel = max(abs(a[s] - b[s]) / max(abs(a[s]), 1e-12) for s in steps)
print(f"{sys.argv[3]}: {len(steps)} steps compared, max relative difference {rel:.2e}; "
      f"first {a[steps[0]]:.4f} / {b[steps[0]]:.4f}, last {a[steps[-1]]:.4f} / {b[steps[-1]]:.4f}")
print("  step " + " ".join(f"{s:>8}" for s in steps[::5]))
print("  A    " + " ".join(f"{a[s]:8.4f}" for s in steps[::5]))
print("  B    " + " ".join(f"{b[s]:8.4f}" for s in steps[::5]))
PY
}

cat > "$WORK/run.toml" <<TOML
[model]
path = "$WORK/model"
backend = "cuda"
[data]
train = ["$TEXT"]
max_seq_len = 512
[train]
batch_size = 2
max_steps = 40
lr = 1e-3
warmup_steps = 4
seed = 1
log_steps = 1
[output]
dir = "$WORK/out"
TOML

echo "== 1. 2-rank NCCL training vs 1 rank, same global batch"
"$BIN" train --config "$WORK/run.toml" --set train.grad_accum=4 --set output.dir="\"$WORK/one\"" > "$OUT/train-1gpu.log" 2>&1
tail -3 "$OUT/train-1gpu.log"
"$BIN" launch --nproc-per-node 2 -- train --config "$WORK/run.toml" --set train.grad_accum=2 \
  --set output.dir="\"$WORK/two\"" > "$OUT/train-2gpu.log" 2>&1
echo "launch exit $?"; tail -4 "$OUT/train-2gpu.log"
compare_losses "$WORK/one/metrics.jsonl" "$WORK/two/metrics.jsonl" loss | tee "$OUT/ddp-compare.txt"
# The same 1-GPU run again: how far bf16 runs drift with nothing changed but the reduction order
# inside the kernels (cuBLAS/atomics), the yardstick for the 2-GPU difference.
"$BIN" train --config "$WORK/run.toml" --set train.grad_accum=4 --set output.dir="\"$WORK/one-again\"" > /dev/null 2>&1
compare_losses "$WORK/one/metrics.jsonl" "$WORK/one-again/metrics.jsonl" loss | sed 's/^/1 GPU twice: /' | tee -a "$OUT/ddp-compare.txt"
"$BIN" train --config "$WORK/run.toml" --set train.grad_accum=4 --set model.dtype='"f32"' --set output.dir="\"$WORK/one-f32\"" > /dev/null 2>&1
"$BIN" launch --nproc-per-node 2 -- train --config "$WORK/run.toml" --set train.grad_accum=2 --set model.dtype='"f32"' \
  --set output.dir="\"$WORK/two-f32\"" > /dev/null 2>&1
compare_losses "$WORK/one-f32/metrics.jsonl" "$WORK/two-f32/metrics.jsonl" loss | sed 's/^/f32, 1 vs 2 GPUs: /' | tee -a "$OUT/ddp-compare.txt"
cp "$WORK/one/metrics.jsonl" "$OUT/metrics-1gpu.jsonl"; cp "$WORK/two/metrics.jsonl" "$OUT/metrics-2gpu.jsonl"

echo "== 2. 7B bench, 1 and 2 GPUs"
"$BIN" bench --preset llama2-7b --batch 2 --seq 2048 --warmup 2 --steps 8 --json "$OUT/bench-7b-1gpu.json" 2>&1 | tail -8
"$BIN" launch --nproc-per-node 2 -- bench --preset llama2-7b --batch 2 --seq 2048 --warmup 2 --steps 8 \
  --json "$OUT/bench-7b-2gpu.json" 2>&1 | grep -v "^\[rank 1\]" | tail -8
python3 - "$OUT/bench-7b-1gpu.json" "$OUT/bench-7b-2gpu.json" <<'PY' | tee "$OUT/scaling.txt"
import json, sys
one, two = (json.load(open(p)) for p in sys.argv[1:3])
print(f"tokens/s: 1 GPU {one['tokens_per_s']:.0f}, 2 GPUs {two['tokens_per_s']:.0f}; "
      f"scaling efficiency {two['tokens_per_s'] / (2 * one['tokens_per_s']):.4f}")
PY

echo "== 3. DPO, GPU bf16 vs CPU f32"
cat > "$WORK/dpo.toml" <<TOML
[model]
path = "$WORK/model"
[data]
train = ["$DPO"]
[train]
batch_size = 4
max_steps = 4
lr = 1e-3
seed = 1
log_steps = 1
[method]
name = "dpo"
max_prompt_len = 128
max_len = 256
[output]
dir = "$WORK/dpo-gpu"
TOML
"$BIN" train --config "$WORK/dpo.toml" --set model.backend='"cuda"' > "$OUT/dpo-gpu.log" 2>&1; tail -3 "$OUT/dpo-gpu.log"
"$BIN" train --config "$WORK/dpo.toml" --set model.backend='"cpu"' --set output.dir="\"$WORK/dpo-cpu\"" > "$OUT/dpo-cpu.log" 2>&1; tail -3 "$OUT/dpo-cpu.log"
for key in loss "rewards/margins" "logps/chosen"; do
  compare_losses "$WORK/dpo-cpu/metrics.jsonl" "$WORK/dpo-gpu/metrics.jsonl" "$key"
done | tee "$OUT/dpo-compare.txt"

echo "== 4. fixtures on the GPU in f32"
"$BIN" check-reference --backend cuda --dtype f32 "$FIXTURES/tiny-llama-dpo" "$FIXTURES/tiny-llama-qlora" \
  "$FIXTURES/nf4-quant" "$FIXTURES/tiny-llama" 2>&1 | tee "$OUT/check-reference-cuda.log" | grep -E "^==|^FAIL|passed,"
