#!/usr/bin/env bash
# Data-parallel GPU training under mpirun: one rank per GPU, each binding the GPU of its local
# rank; MPI carries NCCL's id from rank 0, NCCL sums the gradients on the GPUs.
# Needs: cargo build --release --features cuda,mpi
# Usage: scripts/multi/mpirun-gpu.sh NGPUS CONFIG.toml [--set key=value ...]
set -euo pipefail
ngpus=${1:?usage: $0 NGPUS CONFIG.toml [--set key=value ...]}
config=${2:?usage: $0 NGPUS CONFIG.toml [--set key=value ...]}
shift 2
fuselora=${FUSELORA:-target/release/fuselora}
exec mpirun -np "$ngpus" --bind-to none -x LD_LIBRARY_PATH -x NCCL_DEBUG \
  "$fuselora" train --config "$config" "$@"
