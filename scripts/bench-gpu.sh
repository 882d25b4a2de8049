#!/usr/bin/env bash
# The standard `fuselora bench` set on a GPU machine, then a table of the results.
# Each preset runs with LoRA r=16 alpha=16 on all seven projections, bf16, checkpointing on,
# 2 warmup + 10 measured steps; JSON results go to OUT_DIR (default bench-results/).
# usage: scripts/bench-gpu.sh [FUSELORA_BIN] [OUT_DIR]
set -euo pipefail
BIN=${1:-target/release/fuselora}
OUT=${2:-bench-results}
mkdir -p "$OUT"
# preset batch seq
RUNS=(
  "llama2-7b 2 2048"
  "mistral-7b 2 2048"
  "qwen2.5-7b 2 2048"
  "qwen3-8b 2 2048"
  "llama-1b 4 2048"
  "smollm2-135m 8 2048"
)
for r in "${RUNS[@]}"; do
  read -r preset batch seq <<<"$r"
  "$BIN" bench --preset "$preset" --batch "$batch" --seq "$seq" --warmup 2 --steps 10 \
    --json "$OUT/$preset-b$batch-s$seq.json" >/dev/null
done
python3 - "$OUT" <<'PY'
import json, pathlib, sys
print(f"| preset | batch × seq | tokens/s | step (median) | model TFLOP/s | MFU | peak GiB |")
print(f"| --- | --- | --- | --- | --- | --- | --- |")
for f in sorted(pathlib.Path(sys.argv[1]).glob("*.json")):
    r = json.loads(f.read_text()); s = r["spec"]
    mfu = f"{r['mfu']*100:.1f}%" if r.get("mfu") is not None else "n/a"
    peak = f"{r['peak_memory_bytes']/2**30:.2f}" if r.get("peak_memory_bytes") else "n/a"
    print(f"| {s['preset']} | {s['batch']} × {s['seq']} | {r['tokens_per_s']:.0f} | {r['median_step_s']:.3f} s "
          f"| {r['model_tflops']:.0f} | {mfu} | {peak} |")
PY
