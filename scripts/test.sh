#!/usr/bin/env bash
# The test suite: installs what the tests need (when missing), then runs every crate's tests,
# with MPI (the data-parallel tests run real `mpirun -np 2` / `-np 3` CPU trainings).
# Usage: scripts/test.sh [extra cargo test args]
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v cargo >/dev/null; then
  echo "error: cargo is not installed; get Rust from https://rustup.rs (1.85 or newer)" >&2
  exit 1
fi

# Open MPI (mpirun and headers) and libclang (rsmpi's bindings are generated at build time).
apt_packages=(libopenmpi-dev openmpi-bin libclang-dev)
missing=()
for pkg in "${apt_packages[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if ((${#missing[@]})); then
  if [[ $(id -u) -eq 0 ]] && command -v apt-get >/dev/null; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}"
  else
    echo "error: the tests need ${missing[*]}; install them with" >&2
    echo "  sudo apt-get update && sudo apt-get install -y ${apt_packages[*]}" >&2
    exit 1
  fi
fi

# mpirun refuses root unless told; CI containers run as root.
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1

cargo test --workspace --features trainer/mpi,comms/mpi "$@"
