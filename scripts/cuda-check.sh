#!/usr/bin/env bash
# Compile check of the CUDA build on a machine without a GPU: installs the CUDA 13.0 toolchain from
# PyPI (scripts/cuda-toolchain.sh), then builds the `infer` binary and the GPU test binaries with
# `--features cuda` in their own target dir, and copies both to target-gpu/ (ignored by git), with
# bundle.tar.xz packing them for a GPU machine (scripts/gpu/session.sh runs them there). Set
# INFER_SKIP_CUDA_CHECK=1 to skip it.
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
# Test binaries to run on a GPU machine: the kernel tests, and the transformers reference tests
# (INFER_TEST_DEVICE=cuda runs them on the GPU).
test_binary() { # package, test name, file name in target-gpu/
  cargo test --release --features cuda -p "$1" --test "$2" --no-run
  local exe
  exe="$(cargo test --release --features cuda -p "$1" --test "$2" --no-run --message-format=json 2>/dev/null |
    python3 -c 'import json,sys
for l in sys.stdin:
    m = json.loads(l)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["name"] == sys.argv[1]: print(m["executable"])' "$2")"
  [ -n "$exe" ] || { echo "cuda check: the $2 test binary was not built"; exit 1; }
  cp "$exe" "target-gpu/$3"
}
mkdir -p target-gpu
test_binary infer-kernels cuda cuda-kernel-tests
test_binary infer-core hf_reference hf-reference-tests
cp "$CARGO_TARGET_DIR/release/infer" target-gpu/infer
strip target-gpu/infer target-gpu/cuda-kernel-tests target-gpu/hf-reference-tests
# One compressed bundle small enough to carry to a GPU machine (the PTX text packs well).
tar -C target-gpu -cf - infer cuda-kernel-tests hf-reference-tests | xz -T2 -6 > target-gpu/bundle.tar.xz
echo "cuda check: ok in $(( $(date +%s) - start ))s (sm_80 + sm_90a PTX; binaries in target-gpu/, run them on a GPU machine)"
