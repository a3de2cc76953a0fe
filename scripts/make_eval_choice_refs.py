"""Log-likelihoods of the multiple-choice fixture (tests/fixtures/eval/choice.jsonl) under the tiny
random Llama (tests/fixtures/tiny-llama), computed by hand from transformers' logits: for each choice,
the tokens of `question + " " + choice` past the question's, summed log-softmax of the logits that
predict them. Writes tests/fixtures/eval/tiny-llama-choice-ll.json.

    .venv-ref/bin/python scripts/make_eval_choice_refs.py
"""
import json
import os

import torch
import transformers
from tokenizers import Tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL = os.path.join(ROOT, "tests", "fixtures", "tiny-llama")
ITEMS = os.path.join(ROOT, "tests", "fixtures", "eval", "choice.jsonl")
OUT = os.path.join(ROOT, "tests", "fixtures", "eval", "tiny-llama-choice-ll.json")


@torch.no_grad()
def main():
    tok = Tokenizer.from_file(os.path.join(MODEL, "tokenizer.json"))
    model = transformers.AutoModelForCausalLM.from_pretrained(MODEL, dtype=torch.float32, attn_implementation="eager").eval()
    out = []
    for line in open(ITEMS, encoding="utf-8"):
        item = json.loads(line)
        ctx = tok.encode(item["question"]).ids
        lls = []
        for c in item["choices"]:
            whole = tok.encode(item["question"] + " " + c).ids
            split = len(ctx)
            assert whole[:split] == ctx
            logp = torch.log_softmax(model(torch.tensor([whole])).logits[0].double(), -1)
            lls.append(sum(logp[p - 1, whole[p]].item() for p in range(split, len(whole))))
        out.append(lls)
    with open(OUT, "w") as f:
        json.dump({"model": "tiny-llama", "loglikelihoods": out}, f, indent=1)
        f.write("\n")
    print(out)


if __name__ == "__main__":
    main()
