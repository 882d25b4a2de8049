#!/usr/bin/env bash
# Kaggle notebooks with 2× T4 (15 GB each, no bf16): two ranks through `fuselora launch`, fp16
# compute (model.dtype = "f16", dynamic loss scaling), a 7B model as QLoRA or a 1-3B model as LoRA.
# In a notebook cell:  !bash scripts/multi/kaggle-2xT4.sh configs/kaggle-2xT4.toml
# Needs: cargo build --release --features cuda (NCCL comes with the Kaggle image's PyTorch).
set -euo pipefail
config=${1:?usage: $0 CONFIG.toml [--set key=value ...]}
shift
fuselora=${FUSELORA:-target/release/fuselora}
# PyTorch's wheel ships libnccl.so.2; fuselora loads libnccl.so, so point a link at it.
nccl_dir=$(python3 -c 'import nvidia.nccl, os; print(os.path.join(nvidia.nccl.__path__[0], "lib"))' 2>/dev/null || true)
if [[ -n "$nccl_dir" && -e "$nccl_dir/libnccl.so.2" ]]; then
  link_dir=$(mktemp -d)
  ln -s "$nccl_dir/libnccl.so.2" "$link_dir/libnccl.so"
  export LD_LIBRARY_PATH="$link_dir:$nccl_dir:${LD_LIBRARY_PATH:-}"
fi
exec "$fuselora" launch --nproc-per-node 2 -- train --config "$config" --set model.dtype=f16 "$@"
