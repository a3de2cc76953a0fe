#!/usr/bin/env python3
"""Generate llama.cpp reference values for SmolLM2-135M-Instruct (Q4_1 GGUF).

Writes tests/fixtures/smollm2-llamacpp.json: tokenizer outputs, top-5 log-probabilities of
prefill logits, the rendered chat prompt and greedy answers, all computed by llama.cpp through
the PyPI package llama-cpp-python. The Rust tests compare `infer` against these values.

How to run (from the repository root; building llama-cpp-python from source takes a while):

    python -m venv .venv-ref && .venv-ref/bin/pip install llama-cpp-python numpy \
        && .venv-ref/bin/python scripts/make_llamacpp_refs.py

Options:
    --model PATH   the .gguf file (default: the path printed by scripts/fetch-model.sh)
    --out PATH     output JSON (default: tests/fixtures/smollm2-llamacpp.json)
    --extra-bufts  let llama.cpp use its "extra buffer types" (weight repacking, AMX). Off by
                   default: the references then come from ggml's plain CPU kernels, and a
                   from-source build with -march=native on a CPU that reports AMX crashed with
                   SIGSEGV (general protection fault in ldtilecfg, ggml_backend_amx_mul_mat).
"""

import argparse
import hashlib
import json
import os
import subprocess
import sys

import numpy as np
import llama_cpp
from llamacpp_bufts import disable_extra_bufts
from llama_cpp import Llama

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TOKENIZE_TEXTS = [
    "Hello world! Ünïcödé 你好 🤗 <|im_start|>",
    "In 2024, 3.14159 and 1000000 apples",
    "def f(x):\n    return x  # ok\n\n\n",
    "a  b   c",
    "I'm, you're, it's, we'll",
    "<|im_start|>user\nHi<|im_end|>\n",
]
EXPECTED_FIRST_IDS = [19556, 905, 17, 5549, 246, 94, 25972, 83, 7466, 84, 2756, 216,
                      18645, 250, 48392, 138, 15107, 114, 241, 216, 1]

CHAT_MESSAGES = [{"role": "user",
                  "content": "What is the capital of France? Answer in one sentence."}]
EXPECTED_CHAT_ANSWER = "The capital of France is Paris."

RAW_PROMPTS = ["The quick brown fox", "The capital of France is", "1, 2, 3, 4,"]
ALL_POSITIONS_PROMPT = "The quick brown fox"
RAW_CONTINUATION_TOKENS = 16
CHAT_MAX_TOKENS = 64
TOPK = 5


def default_model_path():
    out = subprocess.run(["bash", os.path.join(ROOT, "scripts", "fetch-model.sh")],
                         check=True, stdout=subprocess.PIPE, text=True).stdout
    return out.strip().splitlines()[-1]


def sha256_file(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def tokenize(llm, text):
    return llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)


def detok(llm, ids, special=False):
    return llm.detokenize(ids, special=special).decode("utf-8", errors="replace")


def top_k(logits_row, k=TOPK):
    x = np.asarray(logits_row, dtype=np.float64)
    m = x.max()
    lp = x - (m + np.log(np.exp(x - m).sum()))
    # Stable sort by descending logprob, ties broken by lower token id.
    order = np.lexsort((np.arange(len(lp)), -lp))[:k]
    return [[int(i), round(float(lp[i]), 6)] for i in order]


def prefill(llm, ids):
    llm.reset()
    llm.eval(ids)
    return np.array(llm.scores[: len(ids)], dtype=np.float64)


def greedy(llm, ids, max_tokens, stop_ids):
    """Plain greedy decoding: argmax of llama.cpp's logits, one token at a time."""
    llm.reset()
    llm.eval(ids)
    out = []
    for _ in range(max_tokens):
        tok = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        if tok in stop_ids:
            break
        out.append(tok)
        llm.eval([tok])
    return out


def render_chat(llm, messages):
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    template = llm.metadata["tokenizer.chat_template"]
    bos = llm._model.token_get_text(llm.token_bos())
    eos = llm._model.token_get_text(llm.token_eos())
    # Same environment settings as llama-cpp-python's Jinja2ChatFormatter and HF transformers.
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    return env.from_string(template).render(messages=messages, bos_token=bos,
                                            eos_token=eos, add_generation_prompt=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--extra-bufts", action="store_true")
    ap.add_argument("--out", default=os.path.join(ROOT, "tests", "fixtures",
                                                   "smollm2-llamacpp.json"))
    args = ap.parse_args()
    model = args.model or default_model_path()

    if not args.extra_bufts:
        disable_extra_bufts()

    llm = Llama(model_path=model, n_ctx=2048, logits_all=True, n_threads=2, seed=0,
                verbose=False)
    md = llm.metadata
    bos_id, eos_id = int(llm.token_bos()), int(llm.token_eos())
    im_end = tokenize(llm, "<|im_end|>")
    assert len(im_end) == 1, im_end
    stop_ids = {eos_id, im_end[0]}

    ref = {
        "llama_cpp_python_version": llama_cpp.__version__,
        "model_file": os.path.basename(model),
        "model_sha256": sha256_file(model),
        "n_vocab": int(llm.n_vocab()),
        "llama_params": {"n_ctx": 2048, "logits_all": True, "n_threads": 2, "seed": 0,
                         "use_extra_bufts": bool(llm.model_params.use_extra_bufts)},
    }

    # 1/2. Tokenizer.
    toks = [{"text": t, "ids": tokenize(llm, t)} for t in TOKENIZE_TEXTS]
    assert toks[0]["ids"] == EXPECTED_FIRST_IDS, toks[0]["ids"]
    for t in toks:
        # llama-cpp-python's detokenize() drops control tokens unless special=True.
        t["detokenized"] = detok(llm, t["ids"])
        t["detokenized_special"] = detok(llm, t["ids"], special=True)
    ref["tokenize"] = toks
    ref["tokenize_no_special"] = [
        {"text": t, "ids": llm.tokenize(t.encode("utf-8"), add_bos=False, special=False)}
        for t in (TOKENIZE_TEXTS[0], TOKENIZE_TEXTS[-1])]
    hi_bos = llm.tokenize(b"Hi", add_bos=True, special=True)
    hi_nobos = llm.tokenize(b"Hi", add_bos=False, special=True)
    ref["special_tokens"] = {
        "bos_id": bos_id,
        "eos_id": eos_id,
        "bos_text": llm._model.token_get_text(bos_id),
        "eos_text": llm._model.token_get_text(eos_id),
        "im_end_id": im_end[0],
        "metadata": {k: md.get(k) for k in (
            "tokenizer.ggml.model", "tokenizer.ggml.pre", "tokenizer.ggml.add_bos_token",
            "tokenizer.ggml.add_eos_token", "tokenizer.ggml.add_space_prefix",
            "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id",
            "tokenizer.ggml.unknown_token_id", "tokenizer.ggml.padding_token_id")},
        "tokenize_Hi_add_bos_true": hi_bos,
        "tokenize_Hi_add_bos_false": hi_nobos,
        "add_bos_prepends_bos": len(hi_bos) > len(hi_nobos) and hi_bos[0] == bos_id,
    }

    # 4 (prompt). Chat template rendering.
    chat_prompt = render_chat(llm, CHAT_MESSAGES)
    chat_ids = tokenize(llm, chat_prompt)

    # 3. Top-5 log-probabilities at the last prompt position (and all positions for one).
    tl = []
    for text, ids in [(p, tokenize(llm, p)) for p in RAW_PROMPTS] + [(chat_prompt, chat_ids)]:
        scores = prefill(llm, ids)
        entry = {"text": text, "ids": ids, "top5": top_k(scores[-1])}
        if text == ALL_POSITIONS_PROMPT:
            entry["top5_all_positions"] = [top_k(row) for row in scores]
        tl.append(entry)
    ref["top_logprobs"] = tl

    # 4. Greedy chat answer, manual argmax loop and create_chat_completion.
    gen = greedy(llm, chat_ids, CHAT_MAX_TOKENS, stop_ids)
    gen_text = detok(llm, gen)
    assert gen_text == EXPECTED_CHAT_ANSWER, repr(gen_text)
    llm.reset()
    cc = llm.create_chat_completion(messages=CHAT_MESSAGES, temperature=0, top_k=1,
                                    repeat_penalty=1.0, max_tokens=CHAT_MAX_TOKENS)
    cc_text = cc["choices"][0]["message"]["content"]
    assert cc_text == gen_text, (cc_text, gen_text)
    ref["chat"] = {
        "messages": CHAT_MESSAGES,
        "template": md["tokenizer.chat_template"],
        "prompt": chat_prompt,
        "prompt_ids": chat_ids,
        "max_tokens": CHAT_MAX_TOKENS,
        "stop_ids": sorted(stop_ids),
        "generated_ids": gen,
        "generated_text": gen_text,
        "create_chat_completion_text": cc_text,
        "create_chat_completion_finish_reason": cc["choices"][0].get("finish_reason"),
        "create_chat_completion_usage": cc.get("usage"),
    }

    # 5. Greedy raw continuation (no template, no stop tokens).
    raw_ids = tokenize(llm, ALL_POSITIONS_PROMPT)
    cont = greedy(llm, raw_ids, RAW_CONTINUATION_TOKENS, set())
    ref["raw_continuation"] = {
        "text": ALL_POSITIONS_PROMPT,
        "ids": raw_ids,
        "n_tokens": RAW_CONTINUATION_TOKENS,
        "generated_ids": cont,
        "generated_text": detok(llm, cont),
    }

    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as f:
        json.dump(ref, f, indent=1, ensure_ascii=False)
        f.write("\n")
    print(f"wrote {args.out} ({os.path.getsize(args.out)} bytes)", file=sys.stderr)


if __name__ == "__main__":
    main()
