#!/usr/bin/env bash
# Compile check of the CUDA build on a machine without a GPU: installs the CUDA 13.0 toolchain from
# PyPI (scripts/cuda-toolchain.sh), then builds the `infer` binary and the CUDA kernel tests with
# `--features cuda` in their own target dir, and copies both to target-gpu/ (ignored by git), with
# bundle.tar.xz packing them for a GPU machine. Set INFER_SKIP_CUDA_CHECK=1 to skip it.
#
#   INFER_CUDA_TARGET_DIR   the CUDA build's target dir (default: ~/.cache/infer-cuda/target)
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "${INFER_SKIP_CUDA_CHECK:-0}" = 1 ]; then
  echo "cuda check: skipped (INFER_SKIP_CUDA_CHECK=1)"
  exit 0
fi
source "$(scripts/cuda-toolchain.sh)"
export CARGO_TARGET_DIR="${INFER_CUDA_TARGET_DIR:-$HOME/.cache/infer-cuda/target}"
start=$(date +%s)
cargo build --release --features cuda -p infer-cli
cargo test --release --features cuda -p infer-kernels --test cuda --no-run
tests="$(cargo test --release --features cuda -p infer-kernels --test cuda --no-run --message-format=json 2>/dev/null |
  python3 -c 'import json,sys
for l in sys.stdin:
    m = json.loads(l)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["name"] == "cuda": print(m["executable"])')"
[ -n "$tests" ] || { echo "cuda check: the kernel test binary was not built"; exit 1; }
mkdir -p target-gpu
cp "$CARGO_TARGET_DIR/release/infer" target-gpu/infer
cp "$tests" target-gpu/cuda-kernel-tests
strip target-gpu/infer target-gpu/cuda-kernel-tests
# One compressed bundle small enough to carry to a GPU machine (the PTX text packs well).
tar -C target-gpu -cf - infer cuda-kernel-tests | xz -T2 -6 > target-gpu/bundle.tar.xz
echo "cuda check: ok in $(( $(date +%s) - start ))s (sm_80 + sm_90a PTX; binaries in target-gpu/, run them on a GPU machine)"
