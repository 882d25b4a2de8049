#!/usr/bin/env bash
# Data-parallel CPU training on one machine (or several, with --hostfile): N MPI ranks, each
# training on its share of the batches and summing LoRA gradients with MPI_Allreduce.
# Needs a build with MPI:  cargo build --release --features mpi   (apt: libopenmpi-dev openmpi-bin libclang-dev)
# Usage: scripts/multi/mpirun-cpu.sh NPROC CONFIG.toml [--set key=value ...]
set -euo pipefail
nproc=${1:?usage: $0 NPROC CONFIG.toml [--set key=value ...]}
config=${2:?usage: $0 NPROC CONFIG.toml [--set key=value ...]}
shift 2
fuselora=${FUSELORA:-target/release/fuselora}
# One rank per core group: give each rank an equal share of the cores.
threads=$(( $(nproc) / nproc ))
exec mpirun -np "$nproc" --bind-to none -x RAYON_NUM_THREADS="$(( threads > 0 ? threads : 1 ))" \
  "$fuselora" train --config "$config" "$@"
