#!/usr/bin/env bash
# The test suite (what CI runs): installs what the tests need when it is missing, then runs every
# crate's tests, and compiles every CUDA kernel with NVRTC (no GPU needed).
# Usage: scripts/test.sh [extra cargo test args]
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v cargo >/dev/null; then
  echo "error: cargo is not installed; get Rust from https://rustup.rs (1.85 or newer)" >&2
  exit 1
fi

# libnvrtc for the kernel compile check: PyPI's nvidia-cuda-nvrtc ships it for any x86-64 machine.
nvrtc_lib() {
  python3 - <<'PY' 2>/dev/null
import glob, os, nvidia
for root in nvidia.__path__:
    hits = sorted(glob.glob(os.path.join(root, "cu13", "lib", "libnvrtc.so.13")))
    if hits:
        print(hits[0])
        break
PY
}
if [ -z "$(nvrtc_lib)" ]; then
  echo "installing libnvrtc (pip: nvidia-cuda-nvrtc 13.0) for the CUDA kernel compile check"
  python3 -m pip install -q "nvidia-cuda-nvrtc==13.0.*" 2>/dev/null \
    || python3 -m pip install -q --break-system-packages "nvidia-cuda-nvrtc==13.0.*"
fi
FUSELORA_NVRTC_LIB=$(nvrtc_lib)
export FUSELORA_NVRTC_LIB

cargo test --workspace "$@"
cargo test -p kernels --features cuda --test nvrtc_compile "$@"
