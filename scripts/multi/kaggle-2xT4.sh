#!/usr/bin/env bash
# Kaggle notebooks with 2× T4 (15 GB each, no bf16): two ranks through `fuselora launch`, fp16
# compute (model.dtype = "f16", dynamic loss scaling), a 7B model as QLoRA or a 1-3B model as LoRA.
# In a notebook cell:  !pip install fuselora
#                      !bash scripts/multi/kaggle-2xT4.sh configs/kaggle-2xT4.toml
# The pip-installed binary finds cuBLAS, NVRTC and NCCL in the image's PyTorch wheels by itself (no
# LD_LIBRARY_PATH). FUSELORA=path/to/fuselora runs another build instead.
set -euo pipefail
config=${1:?usage: $0 CONFIG.toml [--set key=value ...]}
shift
fuselora=${FUSELORA:-fuselora}
if ! command -v "$fuselora" >/dev/null; then
  echo "error: $fuselora is not on PATH: run \`pip install fuselora\` (or set FUSELORA to a built binary)" >&2
  exit 1
fi
exec "$fuselora" launch --nproc-per-node 2 -- train --config "$config" --set model.dtype=f16 "$@"
