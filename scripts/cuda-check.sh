#!/usr/bin/env bash
# The CUDA build on a machine without a GPU, with the CUDA 13.0 toolchain from PyPI
# (scripts/cuda-toolchain.sh).
#
#   scripts/cuda-check.sh            compile check (what the test command runs): nvcc compiles candle's and
#                                    our kernels/*.cu (sm_80 + sm_90a PTX), and `cargo check --features
#                                    cuda` type-checks every target of the workspace, the GPU tests
#                                    included, in the caller's target dir (shared with the main build:
#                                    build scripts and proc macros are not compiled twice)
#   scripts/cuda-check.sh --bundle   the binaries for a GPU machine: one cargo invocation builds the
#                                    `infer` binary and both GPU test binaries (one dependency graph),
#                                    linked against stub libraries, into target-gpu/ (ignored by git) and
#                                    packs them as target-gpu/bundle.tar.xz; scripts/gpu/session.sh runs
#                                    them there. Also splits the test model into target-gpu/model.part1
#                                    and .part2 (carried by two calls before the session's, see there)
#
# Set INFER_SKIP_CUDA_CHECK=1 to skip the compile check.
#   INFER_CUDA_TARGET_DIR   the bundle's target dir (default: ~/.cache/infer-cuda/target; its own, so the
#                           CUDA `infer` binary never replaces the CPU one in the main target dir)
set -euo pipefail
cd "$(dirname "$0")/.."
bundle=0
[ "${1:-}" = --bundle ] && bundle=1
if [ "$bundle" = 0 ] && [ "${INFER_SKIP_CUDA_CHECK:-0}" = 1 ]; then
  echo "cuda check: skipped (INFER_SKIP_CUDA_CHECK=1)"
  exit 0
fi
source "$(scripts/cuda-toolchain.sh)"
start=$(date +%s)
if [ "$bundle" = 0 ]; then
  cargo check --release --workspace --all-targets --features cuda
  echo "cuda check: ok in $(($(date +%s) - start))s (kernels compiled to sm_80 + sm_90a PTX, every target type-checked with --features cuda; scripts/cuda-check.sh --bundle builds the GPU binaries)"
  exit 0
fi
export CARGO_TARGET_DIR="${INFER_CUDA_TARGET_DIR:-$HOME/.cache/infer-cuda/target}"
# The binary and the two test binaries to run on a GPU machine: the kernel tests, and the transformers
# reference tests (INFER_TEST_DEVICE=cuda runs them on the GPU).
targets=(--features infer-cli/cuda,infer-core/cuda,infer-kernels/cuda
  -p infer-cli --bin infer -p infer-kernels --test cuda -p infer-core --test hf_reference)
cargo build --release "${targets[@]}"
mkdir -p target-gpu
cargo build --release "${targets[@]}" --message-format=json 2>/dev/null | python3 -c '
import json, shutil, sys
want = {("bin", "infer"): "infer", ("test", "cuda"): "cuda-kernel-tests", ("test", "hf_reference"): "hf-reference-tests"}
found = set()
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") != "compiler-artifact" or not m.get("executable"):
        continue
    name = want.get((m["target"]["kind"][0], m["target"]["name"]))
    if name:
        shutil.copy(m["executable"], "target-gpu/" + name)
        found.add(name)
missing = set(want.values()) - found
if missing:
    sys.exit("cuda check: not built: " + ", ".join(sorted(missing)))
'
strip target-gpu/infer target-gpu/cuda-kernel-tests target-gpu/hf-reference-tests
# One compressed bundle small enough to carry to a GPU machine (the PTX text packs well).
# The test model travels in two halves, each carried by a call of its own before the session's
# (a call carries at most 64 MiB with the working tree; the model is 94 MiB); its checksum rides in the
# bundle, so the session uses it only when both halves arrived whole.
model="$(scripts/fetch-model.sh)"
rm -f target-gpu/model.part1 target-gpu/model.part2
half=$(( ($(stat -c %s "$model") + 1) / 2 ))
head -c "$half" "$model" > target-gpu/model.part1
tail -c +$((half + 1)) "$model" > target-gpu/model.part2
(cd "$(dirname "$model")" && sha256sum "$(basename "$model")") | awk '{print $1}' > target-gpu/model.sha256
tar -C target-gpu -cf - infer cuda-kernel-tests hf-reference-tests model.sha256 | xz -T2 -6 > target-gpu/bundle.tar.xz
echo "cuda bundle: ok in $(($(date +%s) - start))s (sm_80 + sm_90a PTX; target-gpu/bundle.tar.xz, run it on a GPU machine with scripts/gpu/session.sh)"
