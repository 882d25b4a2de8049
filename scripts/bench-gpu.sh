#!/usr/bin/env bash
# The standard `fuselora bench` set on a GPU machine with the Hugging Face + PEFT baseline
# (scripts/bench-hf-peft.py) measured in the same run, then one table of both.
# Each run: LoRA r=16 alpha=16 on all seven projections, bf16, 2 warmup + 10 measured steps.
# With PROFILE=1 each fuselora run also times one step op by op (OUT_DIR/<run>.txt holds the table).
# HF=0 skips the baseline (needs python3 with torch, transformers and peft; the QLoRA rows also
# bitsandbytes: scripts/fetch-bitsandbytes-wheel.sh, else they print a skip and show "—").
# A run's flags before `|` go to both programs (bench-hf-peft.py takes --no-checkpointing,
# --quantize), those after it to fuselora only.
# ONLY="name name ..." keeps just those runs (names as in RUNS below).
# usage: [PROFILE=1] [HF=0 | FUSELORA=0] [ONLY=...] scripts/bench-gpu.sh [FUSELORA_BIN] [OUT_DIR]
set -uo pipefail
BIN=${1:-target/release/fuselora}
OUT=${2:-bench-results}
SCRIPTS=$(cd "$(dirname "$0")" && pwd)
mkdir -p "$OUT"
# name preset batch seq [flags for both] [| flags for fuselora only]; runs whose Hugging Face side is
# the same (preset, batch, seq, shared flags) share one baseline run.
RUNS=(
  "llama2-7b llama2-7b 2 2048"
  "llama2-7b-offload llama2-7b 2 2048 | --checkpointing offload"
  "llama2-7b-auto llama2-7b 2 2048 | --checkpointing auto"
  "llama2-7b-no-ckpt llama2-7b 2 2048 --no-checkpointing"
  "mistral-7b mistral-7b 2 2048"
  "mistral-7b-offload mistral-7b 2 2048 | --checkpointing offload"
  "llama2-7b-qlora llama2-7b 2 2048 --quantize nf4"
  "llama2-7b-qlora-offload llama2-7b 2 2048 --quantize nf4 | --checkpointing offload"
  "mistral-7b-qlora mistral-7b 2 2048 --quantize nf4"
  "mistral-7b-qlora-offload mistral-7b 2 2048 --quantize nf4 | --checkpointing offload"
  "llama2-7b-min-memory llama2-7b 2 2048 | --checkpointing offload --optimizer-state host --embedding host"
  "mistral-7b-min-memory mistral-7b 2 2048 | --checkpointing offload --optimizer-state host --embedding host"
  "llama2-7b-qlora-min-memory llama2-7b 2 2048 --quantize nf4 | --checkpointing offload --optimizer-state host --embedding host"
  "mistral-7b-qlora-min-memory mistral-7b 2 2048 --quantize nf4 | --checkpointing offload --optimizer-state host --embedding host"
  "qwen2.5-7b qwen2.5-7b 2 2048"
  "qwen3-8b qwen3-8b 2 2048"
  "llama-1b llama-1b 4 2048"
  "llama-1b-auto llama-1b 4 2048 | --checkpointing auto"
  "smollm2-135m smollm2-135m 8 1024"
  "smollm2-135m-auto smollm2-135m 8 1024 | --checkpointing auto"
)
# split RUN: sets name preset batch seq shared ours hf_key
split() {
  read -r name preset batch seq rest <<<"$1"
  shared=${rest%%|*} ours=""
  [[ $rest == *"|"* ]] && ours=${rest#*|}
  hf_key=$(echo "$preset $batch $seq $shared" | xargs | tr ' ' '_')
}
if [ -n "${ONLY:-}" ]; then
  kept=()
  for r in "${RUNS[@]}"; do
    [[ " $ONLY " == *" ${r%% *} "* ]] && kept+=("$r")
  done
  RUNS=("${kept[@]}")
fi
if [ "${FUSELORA:-1}" != 0 ]; then
  # A GPU table needs a CUDA build (`--version` lists its features): a CPU-only build's "auto"
  # backend would time the CPU, for minutes a row. `--backend cuda` fails where no GPU opens.
  "$BIN" --version 2>/dev/null | grep -q '^features:.*cuda' || {
    echo "$BIN is not a CUDA build (its --version lists no cuda feature): cargo build --release -p trainer --features cuda" >&2
    exit 2
  }
  for r in "${RUNS[@]}"; do
    split "$r"
    "$BIN" bench --backend cuda --preset "$preset" --batch "$batch" --seq "$seq" $shared $ours --warmup 2 --steps 10 \
      ${PROFILE:+--profile} --json "$OUT/fuselora-$name.json" >"$OUT/fuselora-$name.txt" 2>&1 \
      || { echo "fuselora $name failed:"; tail -5 "$OUT/fuselora-$name.txt"; }
  done
fi
if [ "${HF:-1}" != 0 ]; then
  for r in "${RUNS[@]}"; do
    split "$r"
    [ -e "$OUT/hf-$hf_key.json" ] && continue
    python3 "$SCRIPTS/bench-hf-peft.py" --preset "$preset" --batch "$batch" --seq "$seq" \
      $shared --warmup 2 --steps 10 --json "$OUT/hf-$hf_key.json" >"$OUT/hf-$hf_key.txt" 2>&1 \
      || { echo "hf $name failed:"; tail -3 "$OUT/hf-$hf_key.txt"; }
  done
fi
python3 - "$OUT" "${RUNS[@]}" <<'PY'
import json, pathlib, sys
out = pathlib.Path(sys.argv[1])
def load(p):
    return json.loads(p.read_text()) if p.exists() else None
def gib(r, key):
    return f"{r[key] / 2**30:.2f}" if r and r.get(key) else "—"
# Peaks: in tensors (torch.cuda.max_memory_allocated; fuselora's pool) / reserved by the allocator
# (torch.cuda.max_memory_reserved; the CUDA driver's stream-ordered pool behind fuselora's).
print("| run | batch × seq | HF + PEFT tok/s | HF peak GiB (tensors / reserved) | fuselora tok/s | step | MFU "
      "| peak GiB (tensors / reserved) | × HF |")
print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
for spec in sys.argv[2:]:
    name, preset, batch, seq, *rest = spec.split("|")[0].split()
    hf_key = "_".join([preset, batch, seq, *rest])
    f, h = load(out / f"fuselora-{name}.json"), load(out / f"hf-{hf_key}.json")
    hf_tps = f"{h['tokens_per_s']:,.0f}" if h else "—"
    hf_mem = f"{gib(h, 'peak_memory_bytes')} / {gib(h, 'reserved_peak_bytes')}"
    if f:
        mfu = f"{f['mfu'] * 100:.1f}%" if f.get("mfu") is not None else "n/a"
        mem = f"{gib(f, 'peak_memory_bytes')} / {gib(f, 'reserved_peak_bytes')}"
        ratio = f"{f['tokens_per_s'] / h['tokens_per_s']:.2f}×" if h else "—"
        print(f"| {name} | {batch} × {seq} | {hf_tps} | {hf_mem} | {f['tokens_per_s']:,.0f} | "
              f"{f['median_step_s']:.3f} s | {mfu} | {mem} | {ratio} |")
    else:
        print(f"| {name} | {batch} × {seq} | {hf_tps} | {hf_mem} | failed | | | | |")
PY
