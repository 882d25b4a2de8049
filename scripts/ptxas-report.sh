#!/usr/bin/env bash
# Registers, spills and shared memory of every kernel (or the named sources) for one architecture,
# without a GPU: NVRTC's PTX (kernels/examples/ptx_dump.rs) assembled by ptxas -v.
# ptxas: python3 -m pip install "nvidia-cuda-nvcc==13.0.*"
# usage: scripts/ptxas-report.sh [ARCH] [NAME...]     e.g. scripts/ptxas-report.sh 90 attention_bwd_hopper
# (90 is assembled for sm_90a, the target the wgmma kernels are compiled for)
set -euo pipefail
ARCH=${1:-90}
shift || true
PTXAS=$(command -v ptxas || python3 -c 'import nvidia, os; print(os.path.join(nvidia.__path__[0], "cu13", "bin", "ptxas"))')
[ -x "$PTXAS" ] || { echo "no ptxas: python3 -m pip install \"nvidia-cuda-nvcc==13.0.*\"" >&2; exit 1; }
DIR=$(mktemp -d)
cargo run --quiet --release -p kernels --features cuda --example ptx_dump -- "$ARCH" "$DIR" "$@" >/dev/null
for ptx in "$DIR"/*.ptx; do
  "$PTXAS" -v --gpu-name "sm_$ARCH$([ "$ARCH" = 90 ] && echo a)" -o /dev/null "$ptx" 2>&1 |
    awk '/Compiling entry function/ {f=$0; sub(/.*function .?/, "", f); sub(/.? for .*/, "", f)}
         /Used [0-9]+ registers/ {printf "%-58s %s\n", f, $0}
         /bytes stack frame/ && !/0 bytes spill stores, 0 bytes spill loads/ {printf "%-58s SPILL %s\n", f, $0}'
done
rm -rf "$DIR"
