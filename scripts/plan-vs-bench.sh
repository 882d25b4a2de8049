#!/usr/bin/env bash
# `fuselora plan` against `fuselora bench` on this GPU: the bench presets (LoRA r=16 on all seven
# projections, bf16) with checkpointing on and off, dense and NF4 (double quant); prints a table of
# predicted vs measured peak memory (the pool peak both report) and tokens/s. Needs an H200 for the `--gpu h200` prediction
# to be the right one (set GPU=a100-80g etc. for another kind).
# usage: scripts/plan-vs-bench.sh [FUSELORA_BIN] [OUT_DIR]
set -euo pipefail
BIN=${1:-target/release/fuselora}
OUT=${2:-plan-vs-bench}
GPU=${GPU:-h200}
mkdir -p "$OUT"
# preset batch seq weights(none|nf4) checkpointing(on|off)
RUNS=(
  "llama2-7b 2 2048 none on" "llama2-7b 2 2048 none off" "llama2-7b 2 2048 nf4 on" "llama2-7b 2 2048 nf4 off"
  "mistral-7b 2 2048 none on" "mistral-7b 2 2048 none off" "mistral-7b 2 2048 nf4 on"
  "llama-1b 4 2048 none on" "llama-1b 4 2048 none off" "llama-1b 4 2048 nf4 on"
  "smollm2-135m 8 2048 none on" "smollm2-135m 8 2048 none off" "smollm2-135m 8 2048 nf4 on"
)
for r in "${RUNS[@]}"; do
  read -r preset batch seq quant ckpt <<<"$r"
  flag=(--quantize "$quant"); [ "$ckpt" = off ] && flag+=(--no-checkpointing)
  name="$OUT/$preset-b$batch-s$seq-$quant-ckpt$ckpt"
  "$BIN" plan --preset "$preset" --batch "$batch" --seq "$seq" "${flag[@]}" --gpu "$GPU" >"$name.plan.txt"
  "$BIN" bench --preset "$preset" --batch "$batch" --seq "$seq" "${flag[@]}" --warmup 2 --steps 10 \
    --json "$name.json" >/dev/null
done
python3 - "$OUT" <<'PY'
import json, pathlib, re, sys
out = pathlib.Path(sys.argv[1])
print("| preset | batch × seq | weights | checkpointing | peak GiB plan | peak GiB bench | error | tokens/s plan | tokens/s bench | error |")
print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
for f in sorted(out.glob("*.json")):
    r = json.loads(f.read_text()); s = r["spec"]
    text = f.with_suffix(".plan.txt").read_text()
    peak = float(re.search(r"what `bench` reports: ([0-9.]+) GiB", text).group(1))
    tps = float(re.search(r"predicted: ([0-9.]+) tokens/s", text).group(1))
    real_peak = r["peak_memory_bytes"] / 2**30
    real_tps = r["tokens_per_s"]
    print(f"| {s['preset']} | {s['batch']} × {s['seq']} | {'nf4' if s.get('quantize') else 'bf16'} "
          f"| {'on' if s['checkpointing'] else 'off'} "
          f"| {peak:.2f} | {real_peak:.2f} | {100*(peak/real_peak-1):+.1f}% "
          f"| {tps:.0f} | {real_tps:.0f} | {100*(tps/real_tps-1):+.1f}% |")
PY
