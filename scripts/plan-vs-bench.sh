#!/usr/bin/env bash
# `fuselora plan` against `fuselora bench` on this GPU: the bench presets (LoRA r=16 on all seven
# projections, bf16) with checkpointing full, offload and off, dense and NF4 (double quant); prints a table of
# predicted vs measured peak memory (the pool peak both report) and tokens/s. Needs an H200 for the `--gpu h200` prediction
# to be the right one (set GPU=a100-80g etc. for another kind).
# REUSE="DIR ..." takes a bench already measured in this session (a `--json` file there whose spec
# matches: preset, batch, seq, quantize, checkpointing) instead of running it again.
# usage: [REUSE="DIR ..."] scripts/plan-vs-bench.sh [FUSELORA_BIN] [OUT_DIR]
set -euo pipefail
BIN=${1:-target/release/fuselora}
OUT=${2:-plan-vs-bench}
GPU=${GPU:-h200}
mkdir -p "$OUT"
# preset batch seq weights(none|nf4) checkpointing(full|offload|off)
RUNS=(
  "llama2-7b 2 2048 none full" "llama2-7b 2 2048 none off" "llama2-7b 2 2048 none offload"
  "llama2-7b 2 2048 nf4 full" "llama2-7b 2 2048 nf4 off" "llama2-7b 2 2048 nf4 offload"
  "mistral-7b 2 2048 none full" "mistral-7b 2 2048 none off" "mistral-7b 2 2048 nf4 full"
  "llama-1b 4 2048 none full" "llama-1b 4 2048 none off" "llama-1b 4 2048 nf4 full"
  "smollm2-135m 8 2048 none full" "smollm2-135m 8 2048 none off" "smollm2-135m 8 2048 nf4 full"
)
[ -n "${ONLY_PRESET:-}" ] && { kept=(); for r in "${RUNS[@]}"; do [[ $r == "$ONLY_PRESET "* ]] && kept+=("$r"); done; RUNS=("${kept[@]}"); }
for r in "${RUNS[@]}"; do
  read -r preset batch seq quant ckpt <<<"$r"
  flag=(--quantize "$quant" --checkpointing "$ckpt")
  name="$OUT/$preset-b$batch-s$seq-$quant-ckpt$ckpt"
  "$BIN" plan --preset "$preset" --batch "$batch" --seq "$seq" "${flag[@]}" --gpu "$GPU" >"$name.plan.txt"
  found=$(python3 - "$preset" "$batch" "$seq" "$quant" "$ckpt" ${REUSE:-} <<'PY'
import json, pathlib, sys
preset, batch, seq, quant, ckpt, *dirs = sys.argv[1:]
for d in dirs:
    for f in sorted(pathlib.Path(d).glob("*.json")):
        try:
            s = json.loads(f.read_text())["spec"]
        except (ValueError, KeyError):
            continue
        if (s["preset"], s["batch"], s["seq"], s["checkpointing"], "nf4" if s.get("quantize") else "none") \
                == (preset, int(batch), int(seq), ckpt, quant):
            print(f)
            sys.exit()
PY
)
  if [ -n "$found" ]; then
    cp "$found" "$name.json"
  else
    "$BIN" bench --preset "$preset" --batch "$batch" --seq "$seq" "${flag[@]}" --warmup 2 --steps 10 \
      --json "$name.json" >/dev/null
  fi
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
          f"| {s['checkpointing']} "
          f"| {peak:.2f} | {real_peak:.2f} | {100*(peak/real_peak-1):+.1f}% "
          f"| {tps:.0f} | {real_tps:.0f} | {100*(tps/real_tps-1):+.1f}% |")
PY
