#!/usr/bin/env bash
# Builds the `fuselora` wheel (pyproject.toml: the binary with --features cuda, manylinux_2_28,
# x86-64) into target/wheels with maturin and zig from PyPI, then checks with auditwheel that the
# binary needs nothing newer than glibc 2.28, and with scripts/cuda-symbols.py that it calls no CUDA
# function newer than 12.0. Needs python3 with venv and PyPI; no Rust toolchain
# beyond cargo. The tools go into target/wheel-tools.
# Usage: scripts/build-wheel.sh [maturin build args, e.g. --profile ci-wheel]
set -euo pipefail
cd "$(dirname "$0")/.."

tools=$PWD/target/wheel-tools
if [ ! -x "$tools/bin/maturin" ] || [ ! -x "$tools/bin/auditwheel" ]; then
  python3 -m venv "$tools"
  # ziglang 0.15 (zig's linker) is one maturin's --zig is tested with.
  "$tools/bin/python" -m pip install -q "maturin>=1.8,<2" "ziglang==0.15.*" "auditwheel>=6"
fi
export PATH="$tools/bin:$PATH"

mkdir -p target/wheels
rm -f target/wheels/fuselora-*.whl
start=$SECONDS
maturin build --zig --out target/wheels "$@"
echo "wheel built in $((SECONDS - start)) s"
wheel=$(ls target/wheels/fuselora-*.whl)
case "$wheel" in
  *manylinux_2_28_x86_64*) ;;
  *) echo "error: $wheel is not tagged manylinux_2_28_x86_64" >&2; exit 1 ;;
esac
# auditwheel reads the binary's symbol versions: fails when it needs a newer glibc than the tag.
auditwheel show "$wheel" | tee target/wheels/auditwheel.txt
tr -s ' \n' ' ' <target/wheels/auditwheel.txt \
  | grep -Eq 'consistent with the following platform tag: "manylinux_2_(1[0-9]|2[0-8])_x86_64"' \
  || { echo "error: auditwheel does not find $wheel manylinux_2_28-consistent" >&2; exit 1; }
# One wheel for CUDA 12.x and 13.x drivers: every CUDA function the binary calls must exist in 12.0.
unpacked=target/wheels/unpacked
rm -rf "$unpacked"
python3 -m zipfile -e "$wheel" "$unpacked"
python3 scripts/cuda-symbols.py "$unpacked"/fuselora-*.data/scripts/fuselora --require-cuda 12000
echo "$wheel"
