#!/usr/bin/env bash
# Fetches bitsandbytes for scripts/bench-hf-peft.py --quantize nf4 and scripts/nf4-roundtrip-model.py,
# for a GPU machine without network: downloads the wheel and unpacks it into DIR (default .whl/bnb of
# the repository root, git-ignored) without the libraries of CUDA versions before 13 and of ROCm (the
# wheel ships one per version, 43 MB in all; the GPU machines run CUDA 13), so that it fits in a
# device call's carry. There: `export PYTHONPATH=$PWD/.whl/bnb:$PYTHONPATH` (torch and numpy, its
# dependencies, are installed).
# usage: scripts/fetch-bitsandbytes-wheel.sh [DIR]
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
DIR=${1:-$ROOT/.whl/bnb}
TMP=$(mktemp -d)
python3 -m pip download bitsandbytes==0.50.2 --no-deps --only-binary=:all: -d "$TMP" >/dev/null
rm -rf "$DIR" && mkdir -p "$DIR"
python3 -m zipfile -e "$TMP"/bitsandbytes-*.whl "$DIR"
find "$DIR/bitsandbytes" -name 'libbitsandbytes_*.so' ! -name 'libbitsandbytes_cuda13*.so' -delete
rm -rf "$TMP"
du -sh "$DIR"
