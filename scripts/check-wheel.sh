#!/usr/bin/env bash
# The wheel as a user gets it: installs target/wheels/fuselora-*.whl (scripts/build-wheel.sh) into a
# fresh virtual environment, then runs `fuselora --version`, `fuselora import-gguf` on the SmolLM2
# GGUF ($FUSELORA_SMOLLM2_GGUF, set by scripts/test.sh) and a 2-step CPU `train` of the imported
# model on data/demo, from that environment with no Rust toolchain on PATH.
# Usage: scripts/check-wheel.sh
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD

wheel=$(ls target/wheels/fuselora-*.whl)
work=$root/target/wheel-check
rm -rf "$work"
python3 -m venv "$work/venv"
"$work/venv/bin/python" -m pip install -q --no-index "$wheel"

# Only the venv, the system tools and the Python that made the venv on PATH: no cargo, no rustc.
python_dir=$(dirname "$(readlink -f "$(command -v python3)")")
clean_path=$work/venv/bin:$python_dir:/usr/bin:/bin
in_venv() { env -i HOME="$HOME" PATH="$clean_path" VIRTUAL_ENV="$work/venv" "$@"; }
if in_venv sh -c 'command -v cargo || command -v rustc'; then
  echo "error: a Rust toolchain is on the check's PATH ($clean_path)" >&2
  exit 1
fi
fuselora=$(in_venv sh -c 'command -v fuselora')
[ "$fuselora" = "$work/venv/bin/fuselora" ] || { echo "error: fuselora on PATH is $fuselora" >&2; exit 1; }

version=$(in_venv fuselora --version)
echo "$version"
grep -q '^CUDA: bindings for CUDA 1[0-9]\.[0-9]' <<<"$version" || { echo "error: the wheel's binary has no CUDA backend" >&2; exit 1; }
grep -q '^features: cuda$' <<<"$version" || { echo "error: the wheel's features are not exactly cuda" >&2; exit 1; }

if [ -z "${FUSELORA_SMOLLM2_GGUF:-}" ]; then
  echo "wheel check: skipped import-gguf and train (no SmolLM2 GGUF: FUSELORA_SMOLLM2_GGUF is unset)"
  exit 0
fi
in_venv fuselora import-gguf "$FUSELORA_SMOLLM2_GGUF" --out "$work/model"
in_venv fuselora train --config "$root/configs/demo-smollm2.toml" \
  --set model.path="$work/model" --set model.backend=cpu --set model.dtype=f32 \
  --set train.max_steps=2 --set data.max_seq_len=128 --set "data.validation=[]" \
  --set output.dir="$work/run"
python3 - "$work/run/summary.json" <<'PY'
import json, math, sys
s = json.load(open(sys.argv[1]))
assert s["steps"] == 2, f"steps = {s['steps']}, expected 2"
assert s["backend"].startswith("cpu"), s["backend"]
print(f"wheel check: 2 CPU steps from the installed wheel, summary {sys.argv[1]}")
PY
