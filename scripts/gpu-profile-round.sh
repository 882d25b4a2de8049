#!/usr/bin/env bash
# One GPU round of the speed work (docs/benchmarks.md records its results): the CUDA-vs-CPU kernel
# checks, the fixtures on the GPU in f32, the attention and GEMM micro-benchmarks, then scripts/bench-gpu.sh with per-op profiles and
# the Hugging Face baseline. Results are packed into OUT/results.tgz after every stage, so a run cut
# short still returns what it measured.
# CPU=0 skips the last stage, the CPU backend against torch on two of the host's cores.
# usage: [CPU=0] scripts/gpu-profile-round.sh FUSELORA_BIN CUDA_MATCHES_CPU_TEST_BIN OUT_DIR
set -uo pipefail
BIN=$1 KTEST=$2 OUT=$3
SCRIPTS=$(cd "$(dirname "$0")" && pwd)
RES=$(mktemp -d)
pack() { tar czf "$OUT/results.tgz.part" -C "$RES" . && mv "$OUT/results.tgz.part" "$OUT/results.tgz"; }
(while sleep 20; do pack; done) &
PACKER=$!
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm --format=csv | tee "$RES/gpu.txt"
echo "== kernels against the CPU"
"$KTEST" --test-threads=1 >"$RES/cuda_matches_cpu.txt" 2>&1
grep -E "^test |test result|panicked|rel err" "$RES/cuda_matches_cpu.txt" | tail -20
echo "== Hugging Face fixtures on the GPU in f32"
"$BIN" check-reference --backend cuda --dtype f32 "$SCRIPTS"/../tests/fixtures/tiny-* \
  >"$RES/check-reference.txt" 2>&1
grep -E "^==|^FAIL|passed," "$RES/check-reference.txt"
echo "== attention and GEMM micro-benchmarks"
"$KTEST" --ignored --nocapture bench_llama2 2>&1 | grep -E "attention|gemm|lm_head" | tee "$RES/micro.txt"
pack
echo "== bench set (profiled) with the HF + PEFT baseline"
PROFILE=1 "$SCRIPTS/bench-gpu.sh" "$BIN" "$RES/bench" | tee "$RES/bench-table.md"
pack
if [ "${CPU:-1}" != 0 ]; then
  # The CPU backend against torch on two of the host's cores (docs/benchmarks.md, issue #20).
  echo "== CPU backend against torch, cores 2,3"
  cpu_args=(--preset smollm2-135m --batch 2 --seq 512 --warmup 1 --steps 3)
  OMP_NUM_THREADS=2 RAYON_NUM_THREADS=2 taskset -c 2,3 "$BIN" bench --backend cpu --dtype f32 \
    --checkpointing off "${cpu_args[@]}" 2>&1 | grep -E "tokens/s|step time" | tee "$RES/cpu-fuselora.txt"
  OMP_NUM_THREADS=2 taskset -c 2,3 python3 "$SCRIPTS/bench-hf-peft.py" --device cpu --no-checkpointing \
    "${cpu_args[@]}" 2>&1 | tail -1 | tee "$RES/cpu-torch.txt"
  pack
fi
kill $PACKER
pack
