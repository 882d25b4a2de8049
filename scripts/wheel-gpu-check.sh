#!/usr/bin/env bash
# The pip wheel on a GPU machine, as a notebook user runs it: installs target/wheels/fuselora-*.whl
# into a fresh virtual environment beside PyTorch's NVIDIA wheels (those of TORCH_VENV, default
# /opt/torch/.venv, made visible through a .pth file as a shared environment would), then runs
# `fuselora bench --preset tiny` on the GPU with no LD_LIBRARY_PATH, twice: finding the libraries
# through the environment's `python3`, and through $VIRTUAL_ENV with no Python on PATH.
# Usage: scripts/wheel-gpu-check.sh [WHEEL] [TORCH_VENV]
set -euo pipefail
cd "$(dirname "$0")/.."
wheel=${1:-$(ls target/wheels/fuselora-*.whl | head -n 1)}
torch_venv=${2:-/opt/torch/.venv}
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
"$torch_venv/bin/python" -m pip list 2>/dev/null | grep -Ei '^(torch|nvidia-(cublas|cuda-nvrtc|nccl))' || true

work=$(mktemp -d)
python=$(readlink -f "$torch_venv/bin/python")
# A venv without its own pip (ensurepip may be missing); the torch venv's pip installs into it.
"$python" -m venv --without-pip "$work/venv"
"$torch_venv/bin/python" -m pip install -q --no-index --no-deps --prefix "$work/venv" "$wheel"
[ -x "$work/venv/bin/fuselora" ] || { echo "error: the wheel put no fuselora in $work/venv/bin" >&2; exit 1; }
torch_site=$("$torch_venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
venv_site=$("$work/venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
echo "$torch_site" >"$venv_site/torch-site.pth"

# Each run: the only library path is the loader's default; "cuda: ... (Python environment)" says
# where cuBLAS and NVRTC came from.
echo "== through python3 (nvidia.__path__ of the fresh venv, which sees $torch_site)"
env -u LD_LIBRARY_PATH -u VIRTUAL_ENV -u CONDA_PREFIX PATH="$work/venv/bin:/usr/bin:/bin" \
  fuselora --version
env -u LD_LIBRARY_PATH -u VIRTUAL_ENV -u CONDA_PREFIX PATH="$work/venv/bin:/usr/bin:/bin" \
  fuselora bench --preset tiny --backend cuda --steps 5 --json "$work/bench-python.json"

echo "== through VIRTUAL_ENV=$torch_venv, no Python on PATH"
mkdir -p "$work/bin-only"
ln -s "$work/venv/bin/fuselora" "$work/bin-only/fuselora"
env -u LD_LIBRARY_PATH -u CONDA_PREFIX VIRTUAL_ENV="$torch_venv" PATH="$work/bin-only" \
  fuselora bench --preset tiny --backend cuda --steps 5 --json "$work/bench-venv.json"
echo "wheel on the GPU: ok ($work)"
