#!/usr/bin/env bash
# Installs a CUDA 13.0 build toolchain from PyPI wheels (nvcc, NVVM, headers, cudart) into a cache
# folder, for building `--features cuda` on a machine with no GPU and no system CUDA (CI), and writes
# stub link libraries for the driver and the runtime libraries that cudarc links against (libcuda,
# cublas, cublasLt, curand, nvrtc). The stubs carry the real sonames, so a binary built here loads
# the real libraries on a GPU machine; they are never used at run time. Run it from the repository.
#
# Prints a file of `export` lines to source:   source "$(scripts/cuda-toolchain.sh)"
#
# On a normal machine with the CUDA toolkit installed none of this is needed (see the README).
#   INFER_CUDA_HOME   where the toolchain goes (default: ~/.cache/infer/cuda-13.0)
set -euo pipefail
root="${INFER_CUDA_HOME:-$HOME/.cache/infer/cuda-13.0}"
cu="$root/nvidia/cu13"
if [ ! -x "$cu/bin/nvcc" ] || [ ! -e "$root/.complete" ]; then
  echo "installing the CUDA 13.0 toolchain from PyPI into $root (~130 MB download)..." >&2
  rm -rf "$root"
  mkdir -p "$root"
  # 13.0.x: the lent GPU machines run driver 580 (CUDA 13.0), which JIT-compiles PTX only up to 13.0.
  python3 -m pip install --quiet --disable-pip-version-check --no-deps --target "$root" \
    "nvidia-cuda-nvcc==13.0.88" "nvidia-nvvm==13.0.88" "nvidia-cuda-crt==13.0.88" \
    "nvidia-cuda-runtime==13.0.96" "nvidia-cuda-cccl==13.0.85" >&2
  [ -x "$cu/bin/nvcc" ] || { echo "error: nvcc missing from the nvidia-cuda-nvcc wheel under $cu/bin" >&2; exit 1; }
  # The wheels ship only the versioned runtime; the linker looks for libcudart.so.
  ln -sf libcudart.so.13 "$cu/lib/libcudart.so"
  touch "$root/.complete"
fi
# Link stubs: one function per symbol that cudarc's bindings declare for each library (returning
# CUDA_ERROR_STUB_LIBRARY = 34), under the real sonames. Made again when cudarc's version changes.
cudarc="$(cargo metadata --format-version 1 --features cuda 2>/dev/null | python3 -c '
import json, sys
m = json.load(sys.stdin)
print(next(p["manifest_path"] for p in m["packages"] if p["name"] == "cudarc").rsplit("/", 1)[0])')"
stubs="$cu/lib/stubs"
if [ ! -e "$stubs/.from" ] || [ "$(cat "$stubs/.from")" != "$cudarc" ]; then
  rm -rf "$stubs"
  mkdir -p "$stubs"
  for pair in driver:libcuda.so.1 cublas:libcublas.so.13 cublaslt:libcublasLt.so.13 curand:libcurand.so.10 nvrtc:libnvrtc.so.13; do
    mod="${pair%%:*}" soname="${pair#*:}"
    sed -n 's/^pub unsafe fn \([A-Za-z0-9_]*\)(.*/int \1(void) { return 34; }/p' "$cudarc/src/$mod/sys/mod.rs" | sort -u > "$stubs/$mod.c"
    [ -s "$stubs/$mod.c" ] || { echo "error: no functions found in $cudarc/src/$mod/sys/mod.rs" >&2; exit 1; }
    cc -shared -fPIC -w -Wl,-soname,"$soname" -o "$stubs/${soname%%.so*}.so" "$stubs/$mod.c"
  done
  echo "$cudarc" > "$stubs/.from"
fi
env="$root/env.sh"
cat > "$env" <<EOF
export CUDA_HOME="$cu" CUDA_PATH="$cu" CUDA_ROOT="$cu" NVCC="$cu/bin/nvcc"
export PATH="$cu/bin:\$PATH"
export LIBRARY_PATH="$cu/lib:$cu/lib/stubs\${LIBRARY_PATH:+:\$LIBRARY_PATH}"
export CUDARC_CUDA_VERSION=13000
# No GPU to ask: compile for the H100/H200 (sm_90a); our kernels also embed sm_80 PTX.
export CUDA_COMPUTE_CAP="\${CUDA_COMPUTE_CAP:-90}"
export CUDAFORGE_THREADS="\${CUDAFORGE_THREADS:-2}"
EOF
echo "$env"
