#!/usr/bin/env bash
# Builds llama.cpp's own binaries (llama-bench, llama-server, llama-quantize, llama-lookup,
# llama-speculative, llama-cli, llama-perplexity) as an independent speed/accuracy reference, from the
# llama.cpp vendored in the PyPI sdist of llama-cpp-python (PyPI is reachable where GitHub is not).
# Idempotent: skips the build when every binary is already there. Prints the bin directory.
#
#   LLAMACPP_DIR        where source, build and binaries go (default: ~/.cache/infer/llamacpp)
#                       binaries: $LLAMACPP_DIR/bin, source: $LLAMACPP_DIR/src (gguf-py lives in
#                       $LLAMACPP_DIR/src/vendor/llama.cpp/gguf-py)
#   LLAMACPP_VERSION    llama-cpp-python version (default: 0.3.36, llama.cpp commit 0c1e570)
#   LLAMACPP_JOBS       ninja -j (default: number of CPUs)
#   LLAMACPP_CMAKE_ARGS extra cmake arguments (e.g. "-DGGML_NATIVE=OFF -DGGML_AVX2=ON")
#   REF_VENV            virtualenv holding cmake, ninja, scikit-build-core and gguf-py's numpy, pyyaml,
#                       tqdm (default: ~/.cache/infer/refvenv)
#
# Takes ~10 minutes on 2 cores. Run it under `nice` when something else shares the machine.
set -euo pipefail
root="${LLAMACPP_DIR:-$HOME/.cache/infer/llamacpp}"
version="${LLAMACPP_VERSION:-0.3.36}"
jobs="${LLAMACPP_JOBS:-$(nproc)}"
venv="${REF_VENV:-$HOME/.cache/infer/refvenv}"
bin="$root/bin"
src="$root/src"
targets=(llama-bench llama-server llama-quantize llama-lookup llama-speculative llama-cli llama-perplexity)

have_all() {
  local t
  for t in "${targets[@]}"; do [ -x "$bin/$t" ] || return 1; done
}
if have_all; then
  echo "$bin"
  exit 0
fi

# Build tools (cmake, ninja) from PyPI, numpy + pyyaml + tqdm for gguf-py (scripts/make_shape_gguf.py),
# and scikit-build-core: `pip download` of
# the sdist prepares its metadata with the package's build backend (--no-build-isolation: this venv's).
if [ ! -x "$venv/bin/python" ]; then
  echo "creating $venv" >&2
  python3 -m venv "$venv"
fi
if ! "$venv/bin/python" -c 'import numpy, yaml, tqdm, scikit_build_core' 2>/dev/null || [ ! -x "$venv/bin/cmake" ] || [ ! -x "$venv/bin/ninja" ]; then
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check cmake ninja numpy pyyaml tqdm scikit-build-core >&2
fi
export PATH="$venv/bin:$PATH"

# Source: the sdist (not `--no-binary :all:`, which would compile cmake itself).
if [ ! -f "$src/vendor/llama.cpp/CMakeLists.txt" ]; then
  tmp="$(mktemp -d)"
  trap 'rm -rf "$tmp"' EXIT
  echo "downloading llama-cpp-python==$version sdist" >&2
  "$venv/bin/python" -m pip download --quiet --disable-pip-version-check --no-deps \
    --no-build-isolation --no-binary llama-cpp-python -d "$tmp" "llama-cpp-python==$version" >&2
  tar -xzf "$tmp"/llama_cpp_python-"$version".tar.gz -C "$tmp"
  mkdir -p "$root"
  rm -rf "$src"
  mv "$tmp/llama_cpp_python-$version" "$src"
fi

lc="$src/vendor/llama.cpp"
build="$root/build"
start=$(date +%s)
# shellcheck disable=SC2086
cmake -S "$lc" -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=Release -DLLAMA_CURL=OFF -DGGML_NATIVE=ON \
  -DLLAMA_BUILD_TESTS=OFF -DBUILD_SHARED_LIBS=OFF ${LLAMACPP_CMAKE_ARGS:-} >&2
# Target names move between llama.cpp versions: build those that exist, say which do not.
available="$(ninja -C "$build" -t targets all | sed -n 's/^\(llama-[A-Za-z0-9_-]*\): .*/\1/p' | sort -u)"
build_targets=()
for t in "${targets[@]}"; do
  if grep -qx "$t" <<<"$available"; then build_targets+=("$t"); else echo "no target $t in this llama.cpp" >&2; fi
done
ninja -C "$build" -j "$jobs" "${build_targets[@]}" >&2
mkdir -p "$bin"
for t in "${build_targets[@]}"; do cp -f "$build/bin/$t" "$bin/$t"; done
echo "built ${build_targets[*]} in $(( $(date +%s) - start )) s" >&2
echo "$bin"
