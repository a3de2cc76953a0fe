#!/usr/bin/env python3
"""Tiny random ModernBERT encoders for infer's encoder tests (the tokenizer: tiny-bert's WordPiece
vocabulary, so texts become many tokens; ModernBERT's own BPE is just another tokenizer.json):

- tests/fixtures/tiny-modernbert: ModernBertModel in sentence-transformers' layout (mean pooling,
  Normalize; the layout of modernbert-embed / gte-modernbert) and sentence-transformers' own
  embeddings of a few texts (expected.json: `mean` as configured, `cls` and `max` from the same
  token states);
- tests/fixtures/tiny-modernbert-cross-encoder: ModernBertForSequenceClassification (one label,
  classifier_pooling "mean"; gte-reranker-modernbert's head: dense + gelu + LayerNorm, then the
  classifier) saved by sentence-transformers' CrossEncoder, with transformers' pair ids, logits and
  CrossEncoder scores and order (expected.json, as tests/fixtures/tiny-cross-encoder).

Both have 4 layers with global attention every 3rd (layers 0 and 3, RoPE theta 160000) and local
attention between (a window of 8: |i - j| <= 4, RoPE theta 10000), so texts longer than the window
check the local mask; LayerNorms without biases, GLU MLPs, no biases in the linear layers. config.json
is written in the Hub's form (`global_attn_every_n_layers`, `global_rope_theta`, `local_rope_theta`,
as answerdotai/ModernBERT-base has it), which transformers reads; the references come from the
saved folders.

  python scripts/make_modernbert_fixtures.py    # needs torch, transformers, sentence-transformers
"""
import json
import os
import shutil
import tempfile

import torch
from sentence_transformers import CrossEncoder, SentenceTransformer, models
from transformers import (AutoModelForSequenceClassification, AutoTokenizer, ModernBertConfig,
                          ModernBertForSequenceClassification, ModernBertModel, PreTrainedTokenizerFast)

FIX = os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures")
TEXTS = ["The cat sat on the mat.", "A kitten rested on the rug.", "Quarterly revenue grew 8%.",
         "the dog ran in the park and the sun is bright and the cat sat on the mat", "x",
         "quarterly model vector text, the kitten ran to the park, rested on a rug and grew bright"]
QUERY = "where did the cat sit?"
DOCS = TEXTS[:5] + [" ".join(["the cat sat on the mat and the dog ran in the park"] * 12)]  # > 128 tokens
PAIRS = [[QUERY, d] for d in DOCS] + [["revenue", "Quarterly revenue grew 8%."], ["a", "b"]]
MAX_LEN = 128  # = max_position_embeddings
HUB_CONFIG = {  # answerdotai/ModernBERT-base's keys, tiny sizes
    "architectures": ["ModernBertModel"], "model_type": "modernbert", "vocab_size": None,
    "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 4, "num_attention_heads": 4,
    "hidden_activation": "gelu", "max_position_embeddings": 128, "norm_eps": 1e-05, "norm_bias": False,
    "global_attn_every_n_layers": 3, "local_attention": 8, "global_rope_theta": 160000.0,
    "local_rope_theta": 10000.0, "attention_bias": False, "mlp_bias": False, "classifier_pooling": "mean",
    "classifier_activation": "gelu", "classifier_bias": False, "initializer_range": 0.2,
    "pad_token_id": 0, "bos_token_id": 2, "eos_token_id": 3, "cls_token_id": 2, "sep_token_id": 3,
}


def tokenizer(tmp):
    tok = PreTrainedTokenizerFast(tokenizer_file=os.path.join(FIX, "tiny-bert", "tokenizer.json"),
                                  cls_token="[CLS]", sep_token="[SEP]", pad_token="[PAD]", unk_token="[UNK]",
                                  mask_token="[MASK]", model_max_length=MAX_LEN,
                                  model_input_names=["input_ids", "attention_mask"])
    tok.backend_tokenizer.no_truncation()
    tok.backend_tokenizer.no_padding()
    return tok


def randomize(model):
    with torch.no_grad():  # LayerNorms away from 1, so a missing one shows
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(p + 0.3 * torch.randn_like(p))


def save_hub_config(folder, extra):
    cfg = dict(HUB_CONFIG, **extra)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)


def tidy(out):
    if os.path.exists(os.path.join(out, "README.md")):
        os.remove(os.path.join(out, "README.md"))


torch.manual_seed(0)
HUB_CONFIG["vocab_size"] = max(tokenizer(None).get_vocab().values()) + 1  # ids with gaps

# --- tiny-modernbert: embeddings
out = os.path.join(FIX, "tiny-modernbert")
shutil.rmtree(out, ignore_errors=True)
with tempfile.TemporaryDirectory() as tmp:
    tok = tokenizer(tmp)
    cfg = ModernBertConfig(**{k: v for k, v in HUB_CONFIG.items() if k != "model_type"})
    assert cfg.layer_types == ["full_attention", "sliding_attention", "sliding_attention", "full_attention"]
    model = ModernBertModel(cfg).eval()
    randomize(model)
    model.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    save_hub_config(tmp, {})
    word = models.Transformer(tmp, max_seq_length=MAX_LEN)
    st = SentenceTransformer(modules=[word, models.Pooling(32, "mean"), models.Normalize()], device="cpu")
    st.save(out)
tidy(out)
save_hub_config(out, {})
st = SentenceTransformer(out, device="cpu")
assert st[0].auto_model.config.layer_types[1] == "sliding_attention"
mean = st.encode(TEXTS, convert_to_numpy=True, normalize_embeddings=False).tolist()
feats = st[0].tokenize(TEXTS)
assert (feats["input_ids"] == 1).sum() == 0, "no [UNK]"
assert feats["attention_mask"].sum(1).max() > 2 * 4 + 1, "texts longer than the local window"
with torch.no_grad():
    tokens = st[0](dict(feats))["token_embeddings"]
mask = feats["attention_mask"].unsqueeze(-1).bool()
cls = torch.nn.functional.normalize(tokens[:, 0], dim=-1).tolist()
mx = torch.nn.functional.normalize(tokens.masked_fill(~mask, -1e9).max(1).values, dim=-1).tolist()
# The same texts with every attention global: the local window must change the vectors.
hf = ModernBertModel.from_pretrained(out).eval()
glob = ModernBertModel.from_pretrained(out, layer_types=["full_attention"] * 4).eval()
with torch.no_grad():
    a = hf(**{k: v for k, v in feats.items() if k != "token_type_ids"}).last_hidden_state
    b = glob(**{k: v for k, v in feats.items() if k != "token_type_ids"}).last_hidden_state
assert (a - tokens).abs().max() < 1e-5 and (a - b).abs().max() > 1e-2, "the window matters"
with open(os.path.join(out, "expected.json"), "w") as f:
    json.dump({"texts": TEXTS, "input_ids": feats["input_ids"].tolist(), "mean": mean, "cls": cls, "max": mx}, f)
print("wrote", out, sorted(os.listdir(out)))

# --- tiny-modernbert-cross-encoder: reranking
out = os.path.join(FIX, "tiny-modernbert-cross-encoder")
shutil.rmtree(out, ignore_errors=True)
extra = {"architectures": ["ModernBertForSequenceClassification"], "num_labels": 1,
         "id2label": {"0": "LABEL_0"}, "label2id": {"LABEL_0": 0}}
with tempfile.TemporaryDirectory() as tmp:
    tok = tokenizer(tmp)
    cfg = ModernBertConfig(**{k: v for k, v in HUB_CONFIG.items() if k not in ("model_type", "architectures")},
                           num_labels=1, architectures=["ModernBertForSequenceClassification"])
    model = ModernBertForSequenceClassification(cfg).eval()
    randomize(model)
    with torch.no_grad():
        model.classifier.weight.mul_(4.0)  # scores spread out
        model.classifier.bias.add_(0.3)
    model.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    save_hub_config(tmp, extra)
    ce = CrossEncoder(tmp, device="cpu", max_length=MAX_LEN)
    ce.save(out)
tidy(out)
save_hub_config(out, extra)
ce = CrossEncoder(out, device="cpu")
assert ce.num_labels == 1
scores = ce.predict(PAIRS, batch_size=4, convert_to_numpy=True).tolist()
ranked = [r["corpus_id"] for r in ce.rank(QUERY, DOCS)]
tok = AutoTokenizer.from_pretrained(out)
hf = AutoModelForSequenceClassification.from_pretrained(out).eval()
assert hf.config.classifier_pooling == "mean" and hf.config.layer_types[2] == "sliding_attention"
enc = tok([p[0] for p in PAIRS], [p[1] for p in PAIRS], truncation="only_second", max_length=MAX_LEN)
batch = tok([p[0] for p in PAIRS], [p[1] for p in PAIRS], truncation="only_second", max_length=MAX_LEN,
            padding=True, return_tensors="pt")
batch.pop("token_type_ids", None)
with torch.no_grad():
    logits = hf(**batch).logits[:, 0]
assert len(enc["input_ids"][5]) == MAX_LEN, "the long document is cut"
diff = (torch.sigmoid(logits) - torch.tensor(scores)).abs().max().item()
assert diff < 1e-5, f"CrossEncoder.predict != sigmoid(transformers' logits): {diff}"
types = [[0] * len(i) for i in enc["input_ids"]]  # no token types: what the model sees
with open(os.path.join(out, "expected.json"), "w") as f:
    json.dump({"query": QUERY, "documents": DOCS, "pairs": PAIRS, "max_length": MAX_LEN,
               "input_ids": enc["input_ids"], "token_type_ids": types,
               "logits": logits.tolist(), "scores": scores, "rerank": ranked}, f)
print("wrote", out, sorted(os.listdir(out)), "scores", scores, "rank", ranked)
