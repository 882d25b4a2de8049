#!/usr/bin/env bash
# The test suite: installs what the tests need (when missing), then runs every crate's tests.
# Usage: scripts/test.sh [extra cargo test args]
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v cargo >/dev/null; then
  echo "error: cargo is not installed; get Rust from https://rustup.rs (1.85 or newer)" >&2
  exit 1
fi

cargo test --workspace "$@"
