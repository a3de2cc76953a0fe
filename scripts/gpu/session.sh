#!/usr/bin/env bash
# Everything to run on a lent GPU machine, in one command (device time is scarce), from the
# repository root with target-gpu/bundle.tar.xz carried (made by scripts/cuda-check.sh --bundle here):
#
#   run(command="bash scripts/gpu/session.sh", carry=["target-gpu/bundle.tar.xz"])
#
# Unpacks the binaries, finds the CUDA runtime libraries (toolkit or PyTorch's wheels), then:
#   1. the CUDA kernel tests (each kernel against its CPU reference);
#   2. the transformers reference tests on the GPU (INFER_TEST_DEVICE=cuda);
#   3. scripts/gpu/bench_gpu.py: roofline, PyTorch, infer bench bf16 / Q8_0 / Q4_K, greedy tokens,
#      serving with 16 and 64 clients on a Llama-3-8B-shaped model (skip steps with GPU_BENCH_SKIP).
# Logs and results go to $OUT (the device tool brings them back).
set -uo pipefail
OUT="${OUT:-/tmp/infer-gpu-out}"
mkdir -p "$OUT"
bin=/tmp/infer-gpu-bin
mkdir -p "$bin"
tar -xJf target-gpu/bundle.tar.xz -C "$bin" || { echo "no target-gpu/bundle.tar.xz: run scripts/cuda-check.sh --bundle and carry it"; exit 1; }
libdirs=""
for lib in libcuda.so.1 libcudart.so.13 libcublas.so.13 libcublasLt.so.13 libcurand.so.10 libnvrtc.so.13; do
  f="$(find / \( -path /proc -o -path /sys \) -prune -o -name "$lib*" -print 2>/dev/null | head -1)"
  [ -n "$f" ] && libdirs="$libdirs:$(dirname "$f")" || echo "warning: $lib not found"
done
export LD_LIBRARY_PATH="${libdirs#:}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/gpu.txt"
echo "== kernel tests"
"$bin/cuda-kernel-tests" --test-threads=1 2>&1 | tee "$OUT/kernel-tests.log"
echo "== transformers reference tests on the GPU"
INFER_TEST_DEVICE=cuda INFER_FIXTURES="$PWD/tests/fixtures" "$bin/hf-reference-tests" --test-threads=1 --nocapture 2>&1 | tee "$OUT/hf-reference-tests.log"
echo "== benchmarks"
python3 scripts/gpu/bench_gpu.py --infer "$bin/infer" --out "$OUT" --skip "${GPU_BENCH_SKIP:-}" 2>&1 | tee "$OUT/bench.log"
