#!/usr/bin/env python3
"""Makes Q8_0, Q4_0, Q4_K_M, Q5_K_M, Q6_K and F16 versions of the test model from its Q4_1 GGUF with llama.cpp's
quantizer (PyPI llama-cpp-python, allow_requantize), for side-by-side speed runs on other formats.

  python scripts/requantize.py ~/.cache/infer/models/SmolLM2-135M-Instruct.Q4_1.gguf
  -> SmolLM2-135M-Instruct.{Q8_0,Q4_0,Q4_K_M,Q5_K_M,Q6_K,F16}-requant.gguf beside it
"""
import ctypes
import os
import sys

import llama_cpp

src = sys.argv[1]
for name, ftype in [
    ("Q8_0", llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0),
    ("Q4_0", llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0),
    ("Q4_K_M", llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M),
    ("Q5_K_M", llama_cpp.LLAMA_FTYPE_MOSTLY_Q5_K_M),
    ("Q6_K", llama_cpp.LLAMA_FTYPE_MOSTLY_Q6_K),
    ("F16", llama_cpp.LLAMA_FTYPE_MOSTLY_F16),
]:
    dst = src.replace(".Q4_1.gguf", f".{name}-requant.gguf")
    p = llama_cpp.llama_model_quantize_default_params()
    p.ftype = ftype
    p.allow_requantize = True
    if llama_cpp.llama_model_quantize(src.encode(), dst.encode(), ctypes.byref(p)) != 0:
        sys.exit(f"quantizing to {name} failed")
    print(dst, os.path.getsize(dst))
