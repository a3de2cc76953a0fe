"""llama.cpp's perplexity of the test model on tests/fixtures/eval/python-docs.txt (through the PyPI
llama-cpp-python's logits), computed as llama-perplexity does: windows of --ctx tokens with BOS first,
scoring the second half of non-overlapping windows, or with a stride the last `stride` tokens of
windows starting every `stride` tokens. PPL = exp(mean NLL) ± PPL·sqrt(var / (N − 1)).

    python scripts/make_eval_refs.py [MODEL.gguf]   # writes tests/fixtures/eval/smollm2-ppl-llamacpp.json
"""
import json
import math
import os
import sys

import numpy as np
import llama_cpp

from llamacpp_bufts import disable_extra_bufts

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEXT = os.path.join(ROOT, "tests", "fixtures", "eval", "python-docs.txt")
OUT = os.path.join(ROOT, "tests", "fixtures", "eval", "smollm2-ppl-llamacpp.json")


def ppl(llm, tokens, ctx, stride):
    bos = llm.token_bos() if llm.tokenize(b"a", add_bos=True) != llm.tokenize(b"a", add_bos=False) else None
    if stride is None:
        wins = [(i * ctx, ctx // 2) for i in range(len(tokens) // ctx)]
    else:
        wins = [(i * stride, ctx - stride - 1) for i in range((len(tokens) - ctx + stride - 1) // stride)]
        wins = [w for w in wins if w[0] + ctx <= len(tokens)]
    nll = []
    for start, first in wins:
        toks = list(tokens[start:start + ctx])
        if bos is not None:
            toks[0] = bos
        llm.reset()
        llm.eval(toks)
        logits = np.array(llm.scores[:ctx], dtype=np.float64)
        for j in range(first, ctx - 1):
            row = logits[j]
            m = row.max()
            lse = m + math.log(np.exp(row - m).sum())
            nll.append(lse - row[tokens[start + j + 1]])
    nll = np.array(nll)
    mean = nll.mean()
    p = math.exp(mean)
    err = p * math.sqrt(max((nll ** 2).mean() - mean ** 2, 0.0) / (len(nll) - 1))
    return {"ctx": ctx, "stride": stride, "windows": len(wins), "scored_tokens": len(nll), "perplexity": p, "std_error": err}


def main():
    model = sys.argv[1] if len(sys.argv) > 1 else os.path.expanduser("~/.cache/infer/models/SmolLM2-135M-Instruct.Q4_1.gguf")
    text = open(TEXT, encoding="utf-8").read()
    disable_extra_bufts()
    llm = llama_cpp.Llama(model_path=model, n_ctx=256, n_batch=256, logits_all=True, n_threads=2, verbose=False)
    tokens = llm.tokenize(text.encode(), add_bos=True, special=False)
    runs = [ppl(llm, tokens, 256, None), ppl(llm, tokens, 256, 128)]
    out = {"model": os.path.basename(model), "llama_cpp_python": llama_cpp.__version__, "text_tokens": len(tokens), "runs": runs}
    with open(OUT, "w") as f:
        json.dump(out, f, indent=1)
        f.write("\n")
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
