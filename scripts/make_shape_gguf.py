#!/usr/bin/env python3
"""Random-weight GGUFs of real Llama shapes, for speed comparisons (infer vs llama.cpp) at sizes the
135M test model cannot show (batch-1 decode bound by memory bandwidth, prefill by compute).

The weights are random (F16, normal with std --std, norms ones: a trained model's scale, so activations
stay finite), so the text they generate is noise; the tokenizer is the test model's (SmolLM2-135M-Instruct:
vocab 49152, merges, token types, special token ids, chat template), so prompts tokenize normally. The
vocabulary is therefore 49152, not Llama 3's 128256: the embedding and output matrices are smaller than
the real models' (1B: 101M instead of 263M parameters, 1.07 B in all instead of 1.24 B), everything else
has the real shape. Llama 3's rope scaling (rope_freqs) is left out: it changes no cost.

    python3 scripts/make_shape_gguf.py --shape llama-3.2-1b            # F16 + Q4_K_M, Q8_0, Q4_0
    python3 scripts/make_shape_gguf.py --shape llama-3.1-8b --types Q4_K_M --drop-f16

Writes <out>/<shape>-random.<TYPE>.gguf (default out: ~/.cache/infer/models/shapes), the F16 file one
tensor at a time (peak memory: one tensor in f32 + f16, ~1.2 GB for the 8B embedding), then quantizes it with
llama.cpp's llama-quantize. Existing files are kept unless --force. Prints the files and their sizes.

Needs llama.cpp built by scripts/build-llamacpp.sh (its llama-quantize, and gguf-py from its source,
put on sys.path here) and gguf-py's dependencies (numpy, pyyaml, tqdm): that script's virtualenv
(~/.cache/infer/refvenv) has them, and this script re-runs itself with that venv's python when the
current one lacks them. The 1B shape has 1.07 B parameters here: F16 2.00 GiB, Q8_0 1.06 GiB, Q4_K_M 638 MiB,
Q4_0 603 MiB (~2 minutes on 2 cores, most of it Q4_K_M); the 8B F16 file is ~14 GiB.
Environment: LLAMACPP_DIR (default ~/.cache/infer/llamacpp), REF_VENV, INFER_MODELS.
"""
import os
import sys

HOME = os.path.expanduser("~")
LLAMACPP_DIR = os.environ.get("LLAMACPP_DIR", os.path.join(HOME, ".cache/infer/llamacpp"))
REF_VENV = os.environ.get("REF_VENV", os.path.join(HOME, ".cache/infer/refvenv"))
SCRIPTS = os.path.dirname(os.path.abspath(__file__))

try:
    import numpy as np
    import yaml  # noqa: F401  (gguf-py imports it)
except ImportError:
    venv_python = os.path.join(REF_VENV, "bin", "python")
    if os.path.exists(venv_python) and os.path.realpath(sys.prefix) != os.path.realpath(REF_VENV):
        os.execv(venv_python, [venv_python, os.path.abspath(__file__)] + sys.argv[1:])
    sys.exit("needs numpy and pyyaml: run scripts/build-llamacpp.sh (it makes %s) or pip install them" % REF_VENV)

import argparse
import shutil
import subprocess
import time

SHAPES = {
    # name: hidden, layers, heads, kv heads, ffn, rope theta, rms eps, tied output
    "llama-3.2-1b": dict(hidden=2048, layers=16, heads=32, kv_heads=8, ffn=8192,
                         rope_theta=500000.0, rms_eps=1e-5, tied=True, label="1B"),
    "llama-3.1-8b": dict(hidden=4096, layers=32, heads=32, kv_heads=8, ffn=14336,
                         rope_theta=500000.0, rms_eps=1e-5, tied=False, label="8B"),
}
TOKENIZER_MODEL = "SmolLM2-135M-Instruct.Q4_1.gguf"


def human(n):
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024


def llamacpp_bin():
    """llama.cpp's bin dir, building it first when absent (the build script is idempotent)."""
    exe = os.path.join(LLAMACPP_DIR, "bin", "llama-quantize")
    if os.path.exists(exe):
        return os.path.dirname(exe)
    out = subprocess.check_output(["bash", os.path.join(SCRIPTS, "build-llamacpp.sh")], text=True)
    return out.strip().splitlines()[-1]


def tokenizer_source(path):
    if path:
        return path
    models = os.environ.get("INFER_MODELS", os.path.join(HOME, ".cache/infer/models"))
    path = os.path.join(models, TOKENIZER_MODEL)
    if not os.path.exists(path):
        out = subprocess.check_output(["bash", os.path.join(SCRIPTS, "fetch-model.sh")], text=True)
        path = out.strip().splitlines()[-1]
    return path


def tensor_plan(s, vocab):
    """(name, numpy shape, kind) in llama.cpp's order; numpy shape is (rows, cols) = GGUF (ne1, ne0)."""
    h, hd = s["hidden"], s["hidden"] // s["heads"]
    plan = [("token_embd.weight", (vocab, h), "w")]
    for i in range(s["layers"]):
        b = f"blk.{i}."
        plan += [
            (b + "attn_norm.weight", (h,), "norm"),
            (b + "attn_q.weight", (s["heads"] * hd, h), "w"),
            (b + "attn_k.weight", (s["kv_heads"] * hd, h), "w"),
            (b + "attn_v.weight", (s["kv_heads"] * hd, h), "w"),
            (b + "attn_output.weight", (h, s["heads"] * hd), "w"),
            (b + "ffn_norm.weight", (h,), "norm"),
            (b + "ffn_gate.weight", (s["ffn"], h), "w"),
            (b + "ffn_up.weight", (s["ffn"], h), "w"),
            (b + "ffn_down.weight", (h, s["ffn"]), "w"),
        ]
    plan.append(("output_norm.weight", (h,), "norm"))
    if not s["tied"]:
        plan.append(("output.weight", (vocab, h), "w"))
    return plan


def write_f16(gguf, path, shape_name, s, tok_path, std, seed, ctx_len):
    reader = gguf.GGUFReader(tok_path)
    tok_fields = {k: f for k, f in reader.fields.items() if k.startswith("tokenizer.")}
    vocab = len(tok_fields["tokenizer.ggml.tokens"].data)

    w = gguf.GGUFWriter(path, "llama")
    w.add_type("model")
    w.add_name(f"{shape_name} shape, random weights")
    w.add_size_label(s["label"])
    w.add_description(f"random-weight {shape_name} shape for speed tests (std {std}, seed {seed}); "
                      f"tokenizer from {TOKENIZER_MODEL}")
    w.add_block_count(s["layers"])
    w.add_context_length(ctx_len)
    w.add_embedding_length(s["hidden"])
    w.add_feed_forward_length(s["ffn"])
    w.add_head_count(s["heads"])
    w.add_head_count_kv(s["kv_heads"])
    w.add_rope_freq_base(s["rope_theta"])
    w.add_layer_norm_rms_eps(s["rms_eps"])
    w.add_rope_dimension_count(s["hidden"] // s["heads"])
    w.add_vocab_size(vocab)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    # The tokenizer, key by key with its stored types (arrays keep their element type).
    for key, f in tok_fields.items():
        vtype = f.types[0]
        if vtype == gguf.GGUFValueType.ARRAY:
            w.add_key_value(key, f.contents(), vtype, sub_type=f.types[1])
        else:
            w.add_key_value(key, f.contents(), vtype)

    plan = tensor_plan(s, vocab)
    for name, shape, kind in plan:
        dtype = np.float32 if kind == "norm" else np.float16
        w.add_tensor_info(name, shape, np.dtype(dtype), int(np.prod(shape)) * np.dtype(dtype).itemsize)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()

    rng = np.random.default_rng(seed)
    n_params = 0
    for name, shape, kind in plan:
        if kind == "norm":
            t = np.ones(shape, dtype=np.float32)
        else:
            t = rng.standard_normal(shape, dtype=np.float32)
            t *= std
            t = t.astype(np.float16)
        n_params += t.size
        w.write_tensor_data(t)
        del t
    w.close()
    return n_params, vocab


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", required=True, choices=sorted(SHAPES))
    ap.add_argument("--types", default="Q4_K_M,Q8_0,Q4_0",
                    help="llama-quantize types made from the F16 file (comma-separated; '' for none)")
    ap.add_argument("--out", default=os.path.join(
        os.environ.get("INFER_MODELS", os.path.join(HOME, ".cache/infer/models")), "shapes"))
    ap.add_argument("--tokenizer-gguf", help=f"GGUF whose tokenizer.* keys are copied (default: {TOKENIZER_MODEL})")
    ap.add_argument("--std", type=float, default=0.02, help="standard deviation of the weights")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--ctx-len", type=int, default=8192,
                    help="llama.context_length (the real models say 131072; llama-server's default -c 0 "
                         "sizes its KV cache to it)")
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="llama-quantize threads")
    ap.add_argument("--drop-f16", action="store_true", help="delete the F16 file after quantizing")
    ap.add_argument("--force", action="store_true", help="rewrite files that exist")
    a = ap.parse_args()

    gguf_py = os.path.join(LLAMACPP_DIR, "src", "vendor", "llama.cpp", "gguf-py")
    if not os.path.isdir(gguf_py):
        llamacpp_bin()  # builds llama.cpp, which unpacks its source (gguf-py) too
    sys.path.insert(0, gguf_py)
    import gguf

    s = SHAPES[a.shape]
    os.makedirs(a.out, exist_ok=True)
    base = os.path.join(a.out, f"{a.shape}-random")
    f16 = base + ".F16.gguf"
    types = [t.strip() for t in a.types.split(",") if t.strip() and t.strip().upper() != "F16"]

    to_quantize = [t for t in types if a.force or not os.path.exists(f"{base}.{t}.gguf")]
    if (to_quantize or not a.drop_f16) and (a.force or not os.path.exists(f16)):
        t0 = time.time()
        n_params, vocab = write_f16(gguf, f16 + ".part", a.shape, s, tokenizer_source(a.tokenizer_gguf),
                                    a.std, a.seed, a.ctx_len)
        os.replace(f16 + ".part", f16)
        print(f"wrote {f16}: {n_params / 1e9:.3f} B parameters, vocab {vocab}, {time.time() - t0:.0f} s",
              file=sys.stderr)
    if to_quantize:
        bindir = llamacpp_bin()
        for t in to_quantize:
            out = f"{base}.{t}.gguf"
            t0 = time.time()
            r = subprocess.run([os.path.join(bindir, "llama-quantize"), f16, out + ".part", t, str(a.threads)],
                               capture_output=True, text=True)
            if r.returncode != 0:
                sys.stderr.write(r.stdout[-4000:] + r.stderr[-4000:])
                sys.exit(f"llama-quantize {t} failed ({r.returncode})")
            os.replace(out + ".part", out)
            print(f"quantized {out}: {time.time() - t0:.0f} s", file=sys.stderr)
    if a.drop_f16 and os.path.exists(f16):
        os.remove(f16)

    for t in (["F16"] if not a.drop_f16 else []) + types:
        p = f"{base}.{t}.gguf"
        if os.path.exists(p):
            print(f"{human(os.path.getsize(p)):>10}  {p}")


if __name__ == "__main__":
    main()
