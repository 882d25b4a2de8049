#!/usr/bin/env bash
# The data-parallel checks under mpirun on a 2-GPU machine (docs/benchmarks.md): the 7B bench on 1 GPU
# and under `mpirun -np 2` (MPI carries NCCL's id), and 20 training steps, 1 rank × accumulation 4
# against 2 mpirun ranks × accumulation 2. Needs a fuselora built with --features cuda,mpi.
# usage: [NGPUS=N] scripts/multi/mpirun-gpu-checks.sh FUSELORA_BIN TEXT.jsonl OUT_DIR
# (the bench runs on NGPUS GPUs, default 2; the training comparison always on 2)
set -uo pipefail
BIN=$(realpath "$1") TEXT=$(realpath "$2") OUT=$3
SCRIPTS=$(cd "$(dirname "$0")/.." && pwd)
WORK=$(mktemp -d)
mkdir -p "$OUT"
export FUSELORA_KERNEL_CACHE=$WORK/kernels NCCL_NVLS_ENABLE=0 OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
mpirun --version | head -n 1
NGPUS=${NGPUS:-2}
mpi_opts=(--bind-to none -x LD_LIBRARY_PATH -x NCCL_NVLS_ENABLE -x FUSELORA_KERNEL_CACHE)
bench=(bench --preset llama2-7b --batch 2 --seq 2048 --warmup 2 --steps 8)
"$BIN" "${bench[@]}" --json "$OUT/bench-1gpu.json" > "$OUT/bench-1gpu.log" 2>&1
mpirun -np "$NGPUS" "${mpi_opts[@]}" "$BIN" "${bench[@]}" --json "$OUT/bench-ngpu-mpirun.json" > "$OUT/bench-ngpu-mpirun.log" 2>&1
echo "mpirun bench exit $?"
python3 - "$OUT" <<'PY'
import json, sys
one, many = (json.load(open(f"{sys.argv[1]}/{n}.json")) for n in ("bench-1gpu", "bench-ngpu-mpirun"))
n = many["ranks"]
print(f"7B bench: 1 GPU {one['tokens_per_s']:.0f} tokens/s, {n} GPUs under mpirun {many['tokens_per_s']:.0f} "
      f"({many['backend']} × {n} ranks); scaling efficiency {many['tokens_per_s'] / (n * one['tokens_per_s']):.4f}")
PY
python3 "$SCRIPTS/make-test-model.py" "$WORK/model" --tokenizer "$SCRIPTS/../tests/fixtures/smollm2-tokenizer" | tail -n 1
cat > "$WORK/run.toml" <<TOML
[model]
path = "$WORK/model"
backend = "cuda"
[data]
train = ["$TEXT"]
max_seq_len = 512
[train]
batch_size = 2
max_steps = 20
lr = 1e-3
warmup_steps = 4
seed = 1
[output]
dir = "$WORK/one"
TOML
"$BIN" train --config "$WORK/run.toml" --set train.grad_accum=4 > "$OUT/train-1gpu.log" 2>&1
mpirun -np 2 "${mpi_opts[@]}" "$BIN" train --config "$WORK/run.toml" --set train.grad_accum=2 --set output.dir="\"$WORK/two\"" > "$OUT/train-2gpu-mpirun.log" 2>&1
echo "mpirun train exit $?"
python3 - "$WORK/one/metrics.jsonl" "$WORK/two/metrics.jsonl" <<'PY'
import json, sys
a, b = ({r["step"]: r["loss"] for r in map(json.loads, open(p)) if "loss" in r} for p in sys.argv[1:3])
rel = max(abs(a[s] - b[s]) / abs(a[s]) for s in a)
print(f"20 steps, 1 GPU × accum 4 vs 2 mpirun ranks × accum 2: max relative loss difference {rel:.2e} "
      f"(last {a[20]:.4f} / {b[20]:.4f})")
PY
