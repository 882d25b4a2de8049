#!/usr/bin/env bash
# One GPU round of the speed work (docs/benchmarks.md records its results): the CUDA-vs-CPU kernel
# checks, the fixtures on the GPU in f32, the attention and GEMM micro-benchmarks, then scripts/bench-gpu.sh with per-op profiles and
# the Hugging Face baseline. Results are packed into OUT/results.tgz after every stage, so a run cut
# short still returns what it measured.
# usage: scripts/gpu-profile-round.sh FUSELORA_BIN CUDA_MATCHES_CPU_TEST_BIN OUT_DIR
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
kill $PACKER
pack
