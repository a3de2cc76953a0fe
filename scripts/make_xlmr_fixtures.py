#!/usr/bin/env python3
"""A tiny random XLM-RoBERTa encoder with a SentencePiece-Unigram tokenizer like the Hub's XLM-R / bge-m3 folders
(tests/fixtures/tiny-xlmr), for infer's encoder tests and scripts/make_bert_gguf_fixture.py --only xlmr:

- a SentencePiece Unigram model trained here (sentencepiece, nmt_nfkc normalization: a precompiled charsmap,
  dummy prefix, extra whitespace removal, no byte fallback; its own ids <unk>=0, <s>=1, </s>=2, pieces after),
  saved as sentencepiece.bpe.model;
- tokenizer.json from transformers' XLMRobertaConverter on it (the slow->fast conversion of the Hub's folders):
  fairseq ids <s>=0, <pad>=1, </s>=2, <unk>=3, SentencePiece piece i at i + 1, <mask> last; Unigram, normalizer
  Precompiled (+ the converter's whitespace rules), Metaspace "▁" prepend always, `<s> A </s>`,
  `<s> A </s></s> B </s>`;
- XLMRobertaModel (hidden 32, 2 layers, 4 heads, intermediate 64, 66 positions from pad + 1 = 2, one token type,
  vocab = SentencePiece size + 2) in sentence-transformers' layout (mean pooling, Normalize), and
  sentence-transformers' own embeddings of a few texts (expected.json: texts, input_ids, `mean` as configured,
  `cls` and `max` from the same token states), as tests/fixtures/tiny-roberta.

  nice -n 19 ~/.cache/infer/refvenv/bin/python scripts/make_xlmr_fixtures.py   # + sentencepiece, protobuf
"""
import json
import os
import shutil
import tempfile
from types import SimpleNamespace

import torch
from sentence_transformers import SentenceTransformer, models
from transformers import AutoTokenizer, XLMRobertaConfig, XLMRobertaModel

FIX = os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures")
WORDS = ("the cat sat on mat a kitten rested rug quarterly revenue grew dog ran in park and sun is bright where did "
         "sit model vector text of to multilingual models read many languages embeddings map into vectors "
         "unbelievable understanding sentences numbers world capitals paris berlin tokyo héllo naïve café résumé "
         "über straße tokenizer pieces encoder search query document passage retrieval river mountain forest "
         "ocean window garden kitchen station morning evening yesterday tomorrow beautiful wonderful careful "
         "running jumping reading writing singing walking talking thinking building playing learning teaching "
         "government information development environment international education national important "
         "different question answer problem system computer network language science history music family "
         "children teacher student hospital library restaurant weather summer winter autumn spring yellow "
         "purple orange green silver golden quickly slowly happily together between through against").split()
CORPUS = ["The cat sat on the mat.", "A kitten rested on the rug.", "Quarterly revenue grew 8%.",
          "the dog ran in the park and the sun is bright", "where did the cat sit?",
          "model vector text of and to", "Héllo naïve café, résumé über straße.", "Numbers 2024 and 3.14 or 42!",
          "WORLD CAPITALS: Paris, Berlin, Tokyo.", "Unbelievable understanding of sentences",
          "Embeddings map text into vectors.", "Multilingual models read many languages.",
          "The tokenizer splits words into pieces.", "An encoder maps a query and a document to vectors.",
          "Search, retrieval and passage ranking (2023-2025)."]
CORPUS += [" ".join(WORDS[(7 * i + j * 3) % len(WORDS)] for j in range(9)) for i in range(120)]
TEXTS = ["The cat sat on the mat.", "A kitten rested on the rug.", "Quarterly revenue grew 8%.",
         "the dog ran in the park and the sun is bright", "x"]
MAX_POS = 66  # 64 tokens: positions start at padding id + 1 = 2
MAX_LEN = 64


def sentencepiece_model(path):
    import sentencepiece as spm
    spm.SentencePieceTrainer.train(sentence_iterator=iter(CORPUS * 4), model_prefix=path[:-len(".model")],
                                   vocab_size=300, model_type="unigram", character_coverage=1.0,
                                   hard_vocab_limit=False, normalization_rule_name="nmt_nfkc", num_threads=1,
                                   minloglevel=2)
    os.remove(path[:-len(".model")] + ".vocab")


def tokenizer(tmp):
    from transformers.convert_slow_tokenizer import XLMRobertaConverter
    spm_path = os.path.join(tmp, "sentencepiece.bpe.model")
    sentencepiece_model(spm_path)
    slow = SimpleNamespace(vocab_file=spm_path, add_prefix_space=True, legacy=True,
                           convert_tokens_to_ids=lambda t: {"<s>": 0, "</s>": 2}[t])
    XLMRobertaConverter(slow).converted().save(os.path.join(tmp, "tokenizer.json"))
    with open(os.path.join(tmp, "tokenizer_config.json"), "w") as f:
        json.dump({"tokenizer_class": "XLMRobertaTokenizer", "model_max_length": MAX_LEN, "add_prefix_space": True,
                   "bos_token": "<s>", "eos_token": "</s>", "sep_token": "</s>", "cls_token": "<s>",
                   "unk_token": "<unk>", "pad_token": "<pad>", "mask_token": "<mask>"}, f, indent=2)
    return AutoTokenizer.from_pretrained(tmp)


def randomize(model):
    with torch.no_grad():  # LayerNorms away from 1/0 and non-zero biases, so a missing one shows
        for name, p in model.named_parameters():
            if "LayerNorm" in name or name.endswith(".bias"):
                p.copy_(p + 0.3 * torch.randn_like(p))


torch.manual_seed(0)
out = os.path.join(FIX, "tiny-xlmr")
with tempfile.TemporaryDirectory() as tmp:
    tok = tokenizer(tmp)
    cfg = XLMRobertaConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                           intermediate_size=64, max_position_embeddings=MAX_POS, type_vocab_size=1,
                           initializer_range=0.2, pad_token_id=1, bos_token_id=0, eos_token_id=2,
                           architectures=["XLMRobertaModel"])
    model = XLMRobertaModel(cfg, add_pooling_layer=False).eval()
    randomize(model)
    model.save_pretrained(tmp, safe_serialization=True)
    word = models.Transformer(tmp, max_seq_length=MAX_LEN)
    st = SentenceTransformer(modules=[word, models.Pooling(32, "mean"), models.Normalize()], device="cpu")
    st.save(out)
    # the Hub's folders carry both; llama.cpp's converter reads sentencepiece.bpe.model when it is there
    shutil.copy(os.path.join(tmp, "sentencepiece.bpe.model"), os.path.join(out, "sentencepiece.bpe.model"))
if os.path.exists(os.path.join(out, "README.md")):
    os.remove(os.path.join(out, "README.md"))
st = SentenceTransformer(out, device="cpu")
mean = st.encode(TEXTS, convert_to_numpy=True, normalize_embeddings=False).tolist()
feats = st[0].tokenize(TEXTS)
with torch.no_grad():
    tokens = st[0](dict(feats))["token_embeddings"]
mask = feats["attention_mask"].unsqueeze(-1).bool()
cls = torch.nn.functional.normalize(tokens[:, 0], dim=-1).tolist()
mx = torch.nn.functional.normalize(tokens.masked_fill(~mask, -1e9).max(1).values, dim=-1).tolist()
ids = feats["input_ids"].masked_fill(~feats["attention_mask"].bool(), 0).tolist()  # padding as 0, as tiny-bert
with open(os.path.join(out, "expected.json"), "w") as f:
    json.dump({"texts": TEXTS, "input_ids": ids, "mean": mean, "cls": cls, "max": mx}, f)
print("wrote", out, sorted(os.listdir(out)), "vocab", len(st.tokenizer))
