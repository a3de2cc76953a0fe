#!/usr/bin/env python3
"""A tiny random BERT in sentence-transformers' layout (tests/fixtures/tiny-bert: config.json,
model.safetensors, tokenizer.json, modules.json, 1_Pooling/config.json mean pooling, 2_Normalize) and
sentence-transformers' own embeddings of a few texts (expected.json: `mean` as the model is
configured; `cls` and `max` from the same token states), for infer's encoder tests.

  python scripts/make_encoder_fixtures.py    # needs torch, transformers, sentence-transformers
"""
import json
import os
import tempfile

import torch
from sentence_transformers import SentenceTransformer, models
from transformers import BertConfig, BertModel, BertTokenizerFast

OUT = os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures", "tiny-bert")
WORDS = ("the a cat sat on mat kitten rested rug quarterly revenue grew dog ran in park sun is bright "
         "model vector text of and to").split()
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS + list("abcdefghijklmnopqrstuvwxyz0123456789.,%!?") + \
        ["##" + c for c in "abcdefghijklmnopqrstuvwxyz0123456789"] + ["##s", "##ed", "##ing"]
TEXTS = ["The cat sat on the mat.", "A kitten rested on the rug.", "Quarterly revenue grew 8%.",
         "the dog ran in the park and the sun is bright", "x"]

torch.manual_seed(0)
with tempfile.TemporaryDirectory() as tmp:
    # transformers 5 reads the vocabulary from `vocab` (a `vocab_file` is ignored: every word [UNK])
    tok = BertTokenizerFast(vocab={t: i for i, t in enumerate(VOCAB)}, do_lower_case=True)
    cfg = BertConfig(vocab_size=len(VOCAB), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=64, max_position_embeddings=64, initializer_range=0.2)
    bert = BertModel(cfg, add_pooling_layer=False).eval()
    with torch.no_grad():  # LayerNorms away from 1/0, so a missing one shows
        for name, p in bert.named_parameters():
            if "LayerNorm" in name:
                p.copy_(p + 0.3 * torch.randn_like(p))
    bert.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    word = models.Transformer(tmp, max_seq_length=64)
    st = SentenceTransformer(modules=[word, models.Pooling(32, "mean"), models.Normalize()], device="cpu")
    st.save(OUT)
st = SentenceTransformer(OUT, device="cpu")
assert st.tokenizer.get_vocab() == {t: i for i, t in enumerate(VOCAB)}
mean = st.encode(TEXTS, convert_to_numpy=True, normalize_embeddings=False).tolist()
feats = st[0].tokenize(TEXTS)
with torch.no_grad():
    tokens = st[0](dict(feats))["token_embeddings"]
mask = feats["attention_mask"].unsqueeze(-1).bool()
cls = torch.nn.functional.normalize(tokens[:, 0], dim=-1).tolist()
mx = torch.nn.functional.normalize(tokens.masked_fill(~mask, -1e9).max(1).values, dim=-1).tolist()
with open(os.path.join(OUT, "expected.json"), "w") as f:
    json.dump({"texts": TEXTS, "input_ids": feats["input_ids"].tolist(), "mean": mean, "cls": cls, "max": mx}, f)
print("wrote", OUT, sorted(os.listdir(OUT)))
