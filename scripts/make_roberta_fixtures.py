#!/usr/bin/env python3
"""Tiny random RoBERTa-family encoders for infer's encoder tests, with a byte-level BPE tokenizer
trained here (tokenizers) on a few sentences:

- tests/fixtures/tiny-roberta: RobertaModel in sentence-transformers' layout (mean pooling,
  Normalize) and sentence-transformers' own embeddings of a few texts (expected.json: `mean` as
  configured, `cls` and `max` from the same token states), as tests/fixtures/tiny-bert;
- tests/fixtures/tiny-xlmr-cross-encoder: XLMRobertaForSequenceClassification (one label; the
  head of bge-reranker: dense + tanh + out_proj on <s>) saved by sentence-transformers' CrossEncoder,
  with transformers' pair ids (`<s> q </s></s> d </s>`, the document cut first at 64 positions),
  logits and CrossEncoder scores and order (expected.json, as tests/fixtures/tiny-cross-encoder).

Both have RoBERTa's positions (they start after the padding id: 2, 3, ...) and one token type.

  python scripts/make_roberta_fixtures.py    # needs torch, transformers, sentence-transformers
"""
import json
import os
import tempfile

import torch
from sentence_transformers import CrossEncoder, SentenceTransformer, models
from tokenizers import ByteLevelBPETokenizer
from tokenizers.processors import RobertaProcessing
from transformers import (AutoModelForSequenceClassification, AutoTokenizer, RobertaConfig, RobertaModel,
                          RobertaTokenizerFast, XLMRobertaConfig, XLMRobertaForSequenceClassification)

FIX = os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures")
CORPUS = ["The cat sat on the mat.", "A kitten rested on the rug.", "Quarterly revenue grew 8%.",
          "the dog ran in the park and the sun is bright", "where did the cat sit?",
          "model vector text of and to"] * 4
TEXTS = ["The cat sat on the mat.", "A kitten rested on the rug.", "Quarterly revenue grew 8%.",
         "the dog ran in the park and the sun is bright", "x"]
QUERY = "where did the cat sit?"
DOCS = ["The cat sat on the mat.", "A kitten rested on the rug.", "Quarterly revenue grew 8%.",
        "the dog ran in the park and the sun is bright", "x",
        " ".join(["the cat sat on the mat and the dog ran in the park"] * 6)]  # > 64 tokens
PAIRS = [[QUERY, d] for d in DOCS] + [["revenue", "Quarterly revenue grew 8%."], ["a", "b"]]
MAX_POS = 66  # 64 tokens: positions start at padding id + 1 = 2
MAX_LEN = 64


def tokenizer(tmp):
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(CORPUS, vocab_size=300, min_frequency=1,
                            special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"])
    bpe.post_processor = RobertaProcessing(("</s>", 2), ("<s>", 0))
    path = os.path.join(tmp, "bpe.json")
    bpe.save(path)
    return RobertaTokenizerFast(tokenizer_file=path, model_max_length=MAX_LEN)


def randomize(model):
    with torch.no_grad():  # LayerNorms away from 1/0 and non-zero biases, so a missing one shows
        for name, p in model.named_parameters():
            if "LayerNorm" in name or name.endswith(".bias"):
                p.copy_(p + 0.3 * torch.randn_like(p))


torch.manual_seed(0)
common = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
              max_position_embeddings=MAX_POS, type_vocab_size=1, initializer_range=0.2, pad_token_id=1,
              bos_token_id=0, eos_token_id=2)

# --- tiny-roberta: embeddings
out = os.path.join(FIX, "tiny-roberta")
with tempfile.TemporaryDirectory() as tmp:
    tok = tokenizer(tmp)
    model = RobertaModel(RobertaConfig(vocab_size=len(tok), **common), add_pooling_layer=False).eval()
    randomize(model)
    model.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    word = models.Transformer(tmp, max_seq_length=MAX_LEN)
    st = SentenceTransformer(modules=[word, models.Pooling(32, "mean"), models.Normalize()], device="cpu")
    st.save(out)
for extra in ["README.md"]:
    if os.path.exists(os.path.join(out, extra)):
        os.remove(os.path.join(out, extra))
st = SentenceTransformer(out, device="cpu")
mean = st.encode(TEXTS, convert_to_numpy=True, normalize_embeddings=False).tolist()
feats = st[0].tokenize(TEXTS)
assert (feats["input_ids"] == 3).sum() == 0, "no <unk>: the texts are in the vocabulary"
with torch.no_grad():
    tokens = st[0](dict(feats))["token_embeddings"]
mask = feats["attention_mask"].unsqueeze(-1).bool()
cls = torch.nn.functional.normalize(tokens[:, 0], dim=-1).tolist()
mx = torch.nn.functional.normalize(tokens.masked_fill(~mask, -1e9).max(1).values, dim=-1).tolist()
ids = feats["input_ids"].masked_fill(~feats["attention_mask"].bool(), 0).tolist()  # padding as 0, as tiny-bert
with open(os.path.join(out, "expected.json"), "w") as f:
    json.dump({"texts": TEXTS, "input_ids": ids, "mean": mean, "cls": cls, "max": mx}, f)
print("wrote", out, sorted(os.listdir(out)))

# --- tiny-xlmr-cross-encoder: reranking
out = os.path.join(FIX, "tiny-xlmr-cross-encoder")
with tempfile.TemporaryDirectory() as tmp:
    tok = tokenizer(tmp)
    cfg = XLMRobertaConfig(vocab_size=len(tok), num_labels=1, architectures=["XLMRobertaForSequenceClassification"],
                           **common)
    model = XLMRobertaForSequenceClassification(cfg).eval()
    randomize(model)
    with torch.no_grad():
        model.classifier.dense.weight.mul_(0.15)  # tanh off saturation, so the scores differ
        model.classifier.out_proj.weight.mul_(4.0)
    model.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    ce = CrossEncoder(tmp, device="cpu", max_length=MAX_LEN)
    ce.save(out)
if os.path.exists(os.path.join(out, "README.md")):
    os.remove(os.path.join(out, "README.md"))
ce = CrossEncoder(out, device="cpu")
assert ce.num_labels == 1
scores = ce.predict(PAIRS, batch_size=4, convert_to_numpy=True).tolist()
ranked = [r["corpus_id"] for r in ce.rank(QUERY, DOCS)]
tok = AutoTokenizer.from_pretrained(out)
hf = AutoModelForSequenceClassification.from_pretrained(out).eval()
enc = tok([p[0] for p in PAIRS], [p[1] for p in PAIRS], truncation="only_second", max_length=MAX_LEN)
batch = tok([p[0] for p in PAIRS], [p[1] for p in PAIRS], truncation="only_second", max_length=MAX_LEN,
            padding=True, return_tensors="pt")
with torch.no_grad():
    logits = hf(**batch).logits[:, 0]
assert len(enc["input_ids"][5]) == MAX_LEN, "the long document is cut"
diff = (torch.sigmoid(logits) - torch.tensor(scores)).abs().max().item()
assert diff < 1e-6, f"CrossEncoder.predict != sigmoid(transformers' logits): {diff}"
types = [[0] * len(i) for i in enc["input_ids"]]  # one token type: what the model sees
with open(os.path.join(out, "expected.json"), "w") as f:
    json.dump({"query": QUERY, "documents": DOCS, "pairs": PAIRS, "max_length": MAX_LEN,
               "input_ids": enc["input_ids"], "token_type_ids": types,
               "logits": logits.tolist(), "scores": scores, "rerank": ranked}, f)
print("wrote", out, sorted(os.listdir(out)), "scores", scores, "rank", ranked)
