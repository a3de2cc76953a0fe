#!/usr/bin/env bash
# Everything to run on a lent GPU machine, in one command (device time is scarce), from the
# repository root with target-gpu/bundle.tar.xz carried (made by scripts/cuda-check.sh --bundle here):
#
#   run(command="GPU_SESSION_BUDGET=400 GPU_BENCH_SKIP=serve bash scripts/gpu/session.sh",
#       carry=["target-gpu/bundle.tar.xz"], timeout_s=430)
#
# With the test model too (CPU vs GPU greedy text on SmolLM2-135M Q4_1): first two back-to-back calls
# that only carry its halves (a call carries at most 64 MiB; what a call carries stays on the warm
# machine for the next), then the session's call:
#
#   run(command="ls -l target-gpu", carry=["target-gpu/model.part1"], timeout_s=60)
#   run(command="ls -l target-gpu", carry=["target-gpu/model.part2"], timeout_s=60)
#   run(command="... bash scripts/gpu/session.sh", carry=["target-gpu/bundle.tar.xz"], ...)
#
# Unpacks the binaries, finds the CUDA runtime libraries (toolkit or PyTorch's wheels), then, each step
# under a time cap so the whole stays inside GPU_SESSION_BUDGET seconds (default 520; the last
# GPU_NCU_SECONDS of it, default 90, kept for step 4):
#   1. the CUDA kernel tests (each kernel against its CPU reference);
#   2. the transformers reference tests on the GPU (INFER_TEST_DEVICE=cuda), again on the tensor path
#      (INFER_TENSOR_PATH=1), and on a failure without graphs / programmatic launches;
#   3. scripts/gpu/bench_gpu.py: roofline, greedy tokens (GPU vs PyTorch vs CPU), infer bench bf16 /
#      Q8_0 / Q4_K and PyTorch on Llama-3.2-1B and Llama-3-8B shapes, serving with 16 and 64 clients
#      (skip parts with GPU_BENCH_SKIP=1b,8b,quant,serve,torch,cpugreedy);
#   4. ncu: per-kernel GPU times of a few 1B decode steps.
# Logs and results go to $OUT (the device tool brings back at most 8 files): env.txt, kernel-tests.log,
# hf-reference-tests.log, bench.log, results.json, summary.md, serve.log, ncu.csv (per-kernel GPU times of
# 1B decode steps, when ncu is there and time is left).
set -uo pipefail
start=$(date +%s)
budget="${GPU_SESSION_BUDGET:-520}"
left() { echo $((budget - ($(date +%s) - start))); }
OUT="${OUT:-/tmp/infer-gpu-out}"
mkdir -p "$OUT"
bin=/tmp/infer-gpu-bin
mkdir -p "$bin"
tar -xJf target-gpu/bundle.tar.xz -C "$bin" || { echo "no target-gpu/bundle.tar.xz: run scripts/cuda-check.sh --bundle and carry it"; exit 1; }
{
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem --format=csv
  nvcc --version 2>/dev/null | tail -1
  # The runtime libraries the binaries link: the CUDA toolkit's, else PyTorch's wheels.
  libdirs=""
  for lib in libcuda.so.1 libcudart.so.13 libcublas.so.13 libcublasLt.so.13 libcurand.so.10 libnvrtc.so.13; do
    # Never the toolkit's compat/ libcuda: it mismatches the installed driver (error 803).
    f="$(find /usr/local/nvidia /usr/lib /usr/lib64 /usr/local /opt /lib \( -name "$lib" -o -name "$lib.*" \) -not -path '*/compat/*' -print 2>/dev/null | head -1)"
    [ -n "$f" ] && libdirs="$libdirs:$(dirname "$f")" && echo "$lib: $f" || echo "warning: $lib not found"
  done
  echo "LD_LIBRARY_PATH+=${libdirs#:}"
  echo "$libdirs" > /tmp/infer-gpu-libdirs
  echo "== ldd (missing)"
  for b in infer cuda-kernel-tests hf-reference-tests; do
    LD_LIBRARY_PATH="${libdirs#:}" ldd "$bin/$b" | grep -i "not found" | sed "s|^|$b: |"
  done
  echo "setup took $(($(date +%s) - start))s"
} 2>&1 | tee "$OUT/env.txt"
libdirs="$(cat /tmp/infer-gpu-libdirs)"
export LD_LIBRARY_PATH="${libdirs#:}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
echo "== kernel tests ($(left)s left)"
timeout -k 5 90 "$bin/cuda-kernel-tests" --test-threads=1 2>&1 | tee "$OUT/kernel-tests.log"
rc=${PIPESTATUS[0]}
echo "kernel tests exit $rc" | tee -a "$OUT/env.txt"
if [ "$rc" != 0 ]; then
  # Which part failed: the same without programmatic dependent launches.
  INFER_CUDA_PDL=0 timeout -k 5 60 "$bin/cuda-kernel-tests" --test-threads=1 2>&1 | grep -E "^test |test result|panicked" |
    sed 's/^/no-pdl: /' >> "$OUT/env.txt"
  echo "kernel tests with INFER_CUDA_PDL=0 exit ${PIPESTATUS[0]}" | tee -a "$OUT/env.txt"
fi
echo "== transformers reference tests on the GPU ($(left)s left)"
INFER_TEST_DEVICE=cuda INFER_FIXTURES="$PWD/tests/fixtures" timeout -k 5 120 "$bin/hf-reference-tests" --test-threads=1 2>&1 |
  tee "$OUT/hf-reference-tests.log"
rc=${PIPESTATUS[0]}
echo "hf reference tests exit $rc" | tee -a "$OUT/env.txt"
# The decode steps above ran on the CUDA decode step; the tensor path (candle ops) keeps its own
# check every session, and on a failure the step's parts are told apart.
knobs="INFER_TENSOR_PATH=1"
[ "$rc" != 0 ] && knobs="INFER_TENSOR_PATH=1 INFER_CUDA_PDL=0 INFER_CUDA_GRAPH=0"
for knob in $knobs; do
  env "$knob" INFER_TEST_DEVICE=cuda INFER_FIXTURES="$PWD/tests/fixtures" timeout -k 5 60 "$bin/hf-reference-tests" \
    --test-threads=1 2>&1 | grep -E "^test |test result|panicked" | sed "s/^/$knob: /" >> "$OUT/env.txt"
  echo "hf reference tests with $knob exit ${PIPESTATUS[0]}" | tee -a "$OUT/env.txt"
done
# The test model, when both halves were carried (and match the checksum packed with the binaries):
# greedy text on the GPU (candle's quantized kernels for Q4_1) against the CPU.
if [ -f target-gpu/model.part1 ] && [ -f target-gpu/model.part2 ]; then
  mkdir -p /tmp/infer-gpu-models
  cat target-gpu/model.part1 target-gpu/model.part2 > /tmp/infer-gpu-models/smollm2.gguf
  if [ "$(sha256sum < /tmp/infer-gpu-models/smollm2.gguf | awk '{print $1}')" = "$(cat "$bin/model.sha256" 2>/dev/null)" ]; then
    echo "== test model: greedy text, GPU vs CPU ($(left)s left)"
    prompt="The three primary colors are"
    for dev in cuda cpu; do
      timeout -k 5 60 "$bin/infer" run /tmp/infer-gpu-models/smollm2.gguf "$prompt" --raw --temperature 0 -n 48 --device "$dev" \
        > "/tmp/greedy-$dev.txt" 2>> "$OUT/env.txt"
    done
    if cmp -s /tmp/greedy-cuda.txt /tmp/greedy-cpu.txt; then
      echo "test model greedy text: GPU = CPU ($(wc -w < /tmp/greedy-cpu.txt) words)" | tee -a "$OUT/env.txt"
    else
      { echo "test model greedy text: GPU != CPU"; echo "cuda: $(cat /tmp/greedy-cuda.txt)"; echo "cpu:  $(cat /tmp/greedy-cpu.txt)"; } |
        tee -a "$OUT/env.txt"
    fi
  else
    echo "test model: halves do not match the checksum (carry both with the same bundle)" | tee -a "$OUT/env.txt"
  fi
fi
echo "== benchmarks ($(left)s left)"
ncu_bin="$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)"
ncu_time=$([ -n "$ncu_bin" ] && echo "${GPU_NCU_SECONDS:-90}" || echo 0)
PYTHONUNBUFFERED=1 python3 scripts/gpu/bench_gpu.py --infer "$bin/infer" --out "$OUT" --budget "$(($(left) - ncu_time))" \
  --skip "${GPU_BENCH_SKIP:-}" 2>&1 | tee "$OUT/bench.log"
# Per-kernel GPU times of a few 1B decode steps (ncu reads the counters on these machines; clocks left
# alone): how many launches a token takes, how much of its wall time the GPU is busy, and per kernel
# the bytes it read, its registers and how many warps it kept active.
if [ -n "$ncu_bin" ] && [ -d /tmp/infer-gpu-models/1b ] && [ "$(left)" -gt 45 ]; then
  echo "== ncu: kernels of 1B decode steps ($(left)s left)"
  timeout -k 5 $(($(left) - 15)) "$ncu_bin" --clock-control none --csv -c 400 \
    --metrics gpu__time_duration.sum,dram__bytes_read.sum,launch__registers_per_thread,sm__warps_active.avg.pct_of_peak_sustained_active \
    "$bin/infer" bench /tmp/infer-gpu-models/1b --device cuda --dtype bf16 -p 0 -n 4 -r 1 > "$OUT/ncu.csv" 2>> "$OUT/env.txt"
  echo "ncu exit $? ($(wc -l < "$OUT/ncu.csv") lines)" | tee -a "$OUT/env.txt"
fi
echo "session took $(($(date +%s) - start))s" | tee -a "$OUT/env.txt"
