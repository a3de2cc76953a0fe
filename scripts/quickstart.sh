#!/usr/bin/env bash
# Fetches the default small model (SmolLM2-135M-Instruct, Q4_1 GGUF) and asks it a question.
#   scripts/quickstart.sh ["your question"]
set -euo pipefail
cd "$(dirname "$0")/.."
model="$(scripts/fetch-model.sh)"
cargo build --release --bin infer
exec "${CARGO_TARGET_DIR:-target}/release/infer" run "$model" "${1:-What is the capital of France? Answer in one sentence.}" --temperature 0
