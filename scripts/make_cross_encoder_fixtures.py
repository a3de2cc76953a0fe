#!/usr/bin/env python3
"""A tiny random BERT cross-encoder (BertForSequenceClassification, one label) saved by
sentence-transformers' CrossEncoder (tests/fixtures/tiny-cross-encoder: config.json,
model.safetensors, tokenizer.json, config_sentence_transformers.json with the
Sigmoid activation, ...), with the tiny-bert vocabulary, and its reference scores
(expected.json) for infer's reranking tests:

- `pairs`: [query, document] pairs; `input_ids` / `token_type_ids`: transformers' tokenizer of each
  pair with `truncation="only_second"` (the document is cut first) at max_length 64;
- `logits`: AutoModelForSequenceClassification's logit of each pair (one forward pass of all pairs,
  padded); `scores`: sentence_transformers.CrossEncoder.predict (sigmoid of the logit, its default
  for one label) — both checked against each other here;
- `rerank`: for one query and its documents, CrossEncoder.rank's order (corpus ids, best first).

One pair has a document longer than the 64 positions: CrossEncoder truncates "longest_first", which
cuts the longer text (the document) the same way as "only_second" while the query stays shorter.

  python scripts/make_cross_encoder_fixtures.py    # needs torch, transformers, sentence-transformers
"""
import json
import os
import tempfile

import torch
from sentence_transformers import CrossEncoder
from transformers import AutoModelForSequenceClassification, AutoTokenizer, BertConfig, \
    BertForSequenceClassification, BertTokenizerFast

OUT = os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures", "tiny-cross-encoder")
WORDS = ("the a cat sat on mat kitten rested rug quarterly revenue grew dog ran in park sun is bright "
         "model vector text of and to").split()
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS + list("abcdefghijklmnopqrstuvwxyz0123456789.,%!?") + \
        ["##" + c for c in "abcdefghijklmnopqrstuvwxyz0123456789"] + ["##s", "##ed", "##ing"]
QUERY = "where did the cat sit?"
DOCS = ["The cat sat on the mat.", "A kitten rested on the rug.", "Quarterly revenue grew 8%.",
        "the dog ran in the park and the sun is bright", "x",
        " ".join(["the cat sat on the mat and the dog ran in the park"] * 6)]  # > 64 tokens
PAIRS = [[QUERY, d] for d in DOCS] + [["revenue", "Quarterly revenue grew 8%."], ["a", "b"]]
MAX_LEN = 64

torch.manual_seed(0)
with tempfile.TemporaryDirectory() as tmp:
    # transformers 5 reads the vocabulary from `vocab` (a `vocab_file` is ignored: all [UNK])
    tok = BertTokenizerFast(vocab={t: i for i, t in enumerate(VOCAB)}, do_lower_case=True, model_max_length=MAX_LEN)
    cfg = BertConfig(vocab_size=len(VOCAB), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=64, max_position_embeddings=MAX_LEN, initializer_range=0.2, num_labels=1,
                     architectures=["BertForSequenceClassification"])
    model = BertForSequenceClassification(cfg).eval()
    with torch.no_grad():  # LayerNorms away from 1/0 and non-zero biases, so a missing one shows
        for name, p in model.named_parameters():
            if "LayerNorm" in name or name.endswith(".bias"):
                p.copy_(p + 0.3 * torch.randn_like(p))
        model.bert.pooler.dense.weight.mul_(0.15)  # tanh off saturation, so the scores differ
        model.classifier.weight.mul_(4.0)
    model.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    ce = CrossEncoder(tmp, device="cpu", max_length=MAX_LEN)
    ce.save(OUT)
os.remove(os.path.join(OUT, "README.md"))  # the generated model card

ce = CrossEncoder(OUT, device="cpu")
assert ce.tokenizer.get_vocab() == {t: i for i, t in enumerate(VOCAB)}
assert ce.num_labels == 1, ce.num_labels
scores = ce.predict(PAIRS, batch_size=4, convert_to_numpy=True).tolist()
ranked = [r["corpus_id"] for r in ce.rank(QUERY, DOCS)]

tok = AutoTokenizer.from_pretrained(OUT)
hf = AutoModelForSequenceClassification.from_pretrained(OUT).eval()
enc = tok([p[0] for p in PAIRS], [p[1] for p in PAIRS], truncation="only_second", max_length=MAX_LEN)
batch = tok([p[0] for p in PAIRS], [p[1] for p in PAIRS], truncation="only_second", max_length=MAX_LEN,
            padding=True, return_tensors="pt")
with torch.no_grad():
    logits = hf(**batch).logits[:, 0]
assert len(enc["input_ids"][5]) == MAX_LEN, "the long document is cut"
diff = (torch.sigmoid(logits) - torch.tensor(scores)).abs().max().item()
assert diff < 1e-6, f"CrossEncoder.predict != sigmoid(transformers' logits): {diff}"
with open(os.path.join(OUT, "expected.json"), "w") as f:
    json.dump({"query": QUERY, "documents": DOCS, "pairs": PAIRS, "max_length": MAX_LEN,
               "input_ids": enc["input_ids"], "token_type_ids": enc["token_type_ids"],
               "logits": logits.tolist(), "scores": scores, "rerank": ranked}, f)
print("wrote", OUT, sorted(os.listdir(OUT)), "scores", scores, "rank", ranked)
