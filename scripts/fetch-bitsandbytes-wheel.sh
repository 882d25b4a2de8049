#!/usr/bin/env bash
# Downloads the bitsandbytes wheel that scripts/bench-hf-peft.py --quantize nf4 needs into .whl/
# (git-ignored) of the repository root, for a GPU machine without network: carry .whl/ there and
# `pip install --no-deps .whl/bitsandbytes-*.whl` (its dependencies, torch and numpy, are there).
# The wheel is py3-none-manylinux x86_64 (bitsandbytes ships its CUDA libraries inside).
# usage: scripts/fetch-bitsandbytes-wheel.sh [DIR]
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
DIR=${1:-$ROOT/.whl}
python3 -m pip download bitsandbytes==0.50.2 --no-deps --only-binary=:all: -d "$DIR"
ls -l "$DIR"/bitsandbytes-*.whl
