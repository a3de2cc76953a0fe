#!/usr/bin/env python3
"""Reference embeddings of the tiny random decoders for infer's embedding tests: HF transformers'
final hidden states (after the last norm, `last_hidden_state`) of a few token-id inputs, pooled by
the last token and by the mean, L2-normalized, in f32. Writes tests/fixtures/embeddings.json.

  python scripts/make_embedding_refs.py      # needs torch + transformers (scripts/requirements-ref.txt)
"""
import json
import os

import torch
from transformers import AutoModel

ROOT = os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures")
INPUTS = [[1, 5, 9, 200], [1, 17, 33, 45, 90, 120, 7, 64, 250, 3, 11], [3], list(range(1, 40))]
out = {"inputs": INPUTS, "models": {}}
for name in ["tiny-llama", "tiny-qwen3", "tiny-gemma2"]:
    model = AutoModel.from_pretrained(os.path.join(ROOT, name), torch_dtype=torch.float32).eval()
    res = {"last": [], "mean": []}
    with torch.no_grad():
        for ids in INPUTS:
            h = model(torch.tensor([ids])).last_hidden_state[0]
            for kind, v in (("last", h[-1]), ("mean", h.mean(0))):
                res[kind].append(torch.nn.functional.normalize(v, dim=0).tolist())
    out["models"][name] = res
with open(os.path.join(ROOT, "embeddings.json"), "w") as f:
    json.dump(out, f)
print("wrote", os.path.join(ROOT, "embeddings.json"))
