#!/usr/bin/env python3
"""A tiny random NomicBERT (nomic-ai/nomic-embed-text-v1.5's architecture) for infer's encoder tests:
tests/fixtures/tiny-nomic-bert, a sentence-transformers folder in the HUB's format (the custom-code checkpoint's
config.json keys and tensor names, which llama.cpp's convert_hf_to_gguf.py NomicBertModel reads), with
sentence-transformers' embeddings of a few texts (expected.json: `mean` as configured (mean pooling + Normalize),
`cls` and `max` from the same token states, each L2-normalized; `input_ids` padded to the longest).

  nice -n 19 ~/.cache/infer/refvenv/bin/python scripts/make_nomic_fixtures.py
  # needs torch, transformers >= 5.x (its native NomicBertModel), sentence-transformers
  # then: scripts/make_bert_gguf_fixture.py --only nomic  (tests/fixtures/tiny-nomic-bert-gguf)

The references come from transformers' NATIVE NomicBertModel (model_type "nomic_bert", hidden 32, 4 heads of 8,
2 layers, intermediate 48, RoPE theta 1000 on the whole head (NeoX / rotate-half), post-LN, SwiGLU with silu, no
linear biases) in sentence-transformers, built from a native-format folder; the fixture folder is then rewritten
in the Hub's format. The tokenizer is tests/fixtures/tiny-bert's WordPiece (ids 0..109); the vocabulary is padded
to 128 rows as the Hub's is (pad_vocab_size_multiple 64: 30522 tokens, 30528 rows).

config.json (the Hub's keys, nomic-embed-text-v1.5's values but the sizes; no auto_map, which names remote code):
  n_embd 32 (hidden_size), n_head 4, n_layer 2, n_inner 48 (intermediate_size), vocab_size 128,
  type_vocab_size 2, layer_norm_epsilon 1e-12, rotary_emb_base 1000 (rope theta), rotary_emb_fraction 1.0,
  rotary_emb_interleaved false (rotate-half RoPE), rotary_emb_scale_base null, activation_function "swiglu",
  prenorm false (post-LN), qkv_proj_bias / mlp_fc1_bias / mlp_fc2_bias false, causal false,
  n_positions 8192, max_trained_positions 2048 (the Hub's values; llama.cpp's converter accepts only this pair
  (or 2048/2048 for v2-moe) and writes context length 2048; RoPE has no position table, so nothing has that size).

Native transformers name (HF [out, in])          -> Hub name in model.safetensors
  embeddings.word_embeddings.weight [128, 32]      embeddings.word_embeddings.weight
  embeddings.token_type_embeddings.weight [2, 32]  embeddings.token_type_embeddings.weight
  embeddings.LayerNorm.{weight,bias} [32]          emb_ln.{weight,bias}
  layers.N.self_attn.{q,k,v}_proj.weight [32, 32]  encoder.layers.N.attn.Wqkv.weight [96, 32] = cat(q, k, v, dim 0)
                                                   (the Hub code: rearrange "(three h d)", three = q, k, v)
  layers.N.self_attn.o_proj.weight                 encoder.layers.N.attn.out_proj.weight
  layers.N.post_attention_layernorm.*              encoder.layers.N.norm1.*
  layers.N.mlp.up_proj.weight [48, 32]             encoder.layers.N.mlp.fc11.weight  (up: y = fc11(x))
  layers.N.mlp.gate_proj.weight [48, 32]           encoder.layers.N.mlp.fc12.weight  (gate: y * silu(fc12(x)))
  layers.N.mlp.down_proj.weight [32, 48]           encoder.layers.N.mlp.fc2.weight
  layers.N.post_mlp_layernorm.*                    encoder.layers.N.norm2.*
(transformers' own conversion_mapping "nomic_bert" is this map's inverse; the script loads the Hub folder's tensors
back through it, and through a Hub-code-style forward written here, and checks both against the references.)
"""
import json
import os
import shutil
import tempfile

import torch
from safetensors.torch import load_file, save_file
from sentence_transformers import SentenceTransformer, models
from transformers import NomicBertConfig, NomicBertModel, PreTrainedTokenizerFast

FIX = os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures")
OUT = os.path.join(FIX, "tiny-nomic-bert")
TEXTS = ["The cat sat on the mat.", "A kitten rested on the rug.", "Quarterly revenue grew 8%.",
         "the dog ran in the park and the sun is bright and the cat sat on the mat", "x",
         "quarterly model vector text, the kitten ran to the park, rested on a rug and grew bright"]
MAX_LEN = 128
HIDDEN, HEADS, LAYERS, INTER, VOCAB, THETA, EPS = 32, 4, 2, 48, 128, 1000.0, 1e-12
HUB_CONFIG = {  # nomic-ai/nomic-embed-text-v1.5's config.json, tiny sizes, without auto_map / _name_or_path
    "activation_function": "swiglu", "architectures": ["NomicBertModel"], "attn_pdrop": 0.0,
    "bos_token_id": None, "causal": False, "dense_seq_output": True, "embd_pdrop": 0.0, "eos_token_id": None,
    "fused_bias_fc": True, "fused_dropout_add_ln": True, "initializer_range": 0.02, "layer_norm_epsilon": EPS,
    "max_trained_positions": 2048, "mlp_fc1_bias": False, "mlp_fc2_bias": False, "model_type": "nomic_bert",
    "n_embd": HIDDEN, "n_head": HEADS, "n_inner": INTER, "n_layer": LAYERS, "n_positions": 8192,
    "pad_vocab_size_multiple": 64, "parallel_block": False, "parallel_block_tied_norm": False, "prenorm": False,
    "qkv_proj_bias": False, "reorder_and_upcast_attn": False, "resid_pdrop": 0.0, "rotary_emb_base": THETA,
    "rotary_emb_fraction": 1.0, "rotary_emb_interleaved": False, "rotary_emb_scale_base": None,
    "rotary_scaling_factor": None, "scale_attn_by_inverse_layer_idx": False, "scale_attn_weights": True,
    "summary_activation": None, "summary_first_dropout": 0.0, "summary_proj_to_labels": True,
    "summary_type": "cls_index", "summary_use_proj": True, "torch_dtype": "float32", "type_vocab_size": 2,
    "use_cache": True, "use_flash_attn": True, "use_rms_norm": False, "use_xentropy": True, "vocab_size": VOCAB,
}


def tokenizer():
    tok = PreTrainedTokenizerFast(tokenizer_file=os.path.join(FIX, "tiny-bert", "tokenizer.json"),
                                  cls_token="[CLS]", sep_token="[SEP]", pad_token="[PAD]", unk_token="[UNK]",
                                  mask_token="[MASK]", model_max_length=MAX_LEN,
                                  model_input_names=["input_ids", "token_type_ids", "attention_mask"])
    tok.backend_tokenizer.no_truncation()
    tok.backend_tokenizer.no_padding()
    return tok


def hub_name(name):
    """Native transformers name -> the Hub checkpoint's (Wqkv handled by the caller)."""
    if name.startswith("embeddings.LayerNorm."):
        return "emb_ln." + name.split(".")[-1]
    if name.startswith("embeddings."):
        return name
    _, n, rest = name.split(".", 2)
    rest = {"self_attn.o_proj.weight": "attn.out_proj.weight", "mlp.up_proj.weight": "mlp.fc11.weight",
            "mlp.gate_proj.weight": "mlp.fc12.weight", "mlp.down_proj.weight": "mlp.fc2.weight",
            "post_attention_layernorm.weight": "norm1.weight", "post_attention_layernorm.bias": "norm1.bias",
            "post_mlp_layernorm.weight": "norm2.weight", "post_mlp_layernorm.bias": "norm2.bias"}[rest]
    return f"encoder.layers.{n}.{rest}"


def to_hub(sd):
    out = {}
    for name, t in sd.items():
        if ".self_attn." in name and name.split(".")[-2] in ("q_proj", "k_proj", "v_proj"):
            continue
        out[hub_name(name)] = t.contiguous()
    for n in range(LAYERS):
        p = f"layers.{n}.self_attn."
        out[f"encoder.layers.{n}.attn.Wqkv.weight"] = torch.cat(
            [sd[p + "q_proj.weight"], sd[p + "k_proj.weight"], sd[p + "v_proj.weight"]], 0).contiguous()
    return dict(sorted(out.items()))


def hub_forward(w, ids, mask):
    """nomic-embed-text-v1.5's Hub code (modeling_hf_nomic_bert.py, prenorm false, swiglu) on Hub tensor names."""
    ln = lambda x, p: torch.nn.functional.layer_norm(x, (HIDDEN,), w[p + ".weight"], w[p + ".bias"], EPS)
    x = w["embeddings.word_embeddings.weight"][ids] + w["embeddings.token_type_embeddings.weight"][0]
    x = ln(x, "emb_ln")
    b, s = ids.shape
    d = HIDDEN // HEADS
    inv = 1.0 / (THETA ** (torch.arange(0, d, 2, dtype=torch.float32) / d))
    f = torch.arange(s, dtype=torch.float32)[:, None] * inv
    cos, sin = torch.cat([f, f], -1).cos(), torch.cat([f, f], -1).sin()
    rot = lambda t: t * cos + torch.cat([-t[..., d // 2:], t[..., :d // 2]], -1) * sin  # not interleaved
    bias = (1.0 - mask[:, None, None, :].float()) * -1e30
    for n in range(LAYERS):
        p = f"encoder.layers.{n}."
        qkv = (x @ w[p + "attn.Wqkv.weight"].T).view(b, s, 3, HEADS, d)  # "... (three h d)"
        q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))
        a = torch.softmax(rot(q) @ rot(k).transpose(-1, -2) / d ** 0.5 + bias, -1) @ v
        x = ln(x + a.transpose(1, 2).reshape(b, s, HIDDEN) @ w[p + "attn.out_proj.weight"].T, p + "norm1")
        y = (x @ w[p + "mlp.fc11.weight"].T) * torch.nn.functional.silu(x @ w[p + "mlp.fc12.weight"].T)
        x = ln(x + y @ w[p + "mlp.fc2.weight"].T, p + "norm2")
    return x


torch.manual_seed(0)
shutil.rmtree(OUT, ignore_errors=True)
tok = tokenizer()
assert max(tok.get_vocab().values()) < VOCAB
cfg = NomicBertConfig(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                      intermediate_size=INTER, hidden_act="silu", max_position_embeddings=MAX_LEN, type_vocab_size=2,
                      layer_norm_eps=EPS, initializer_range=0.2, pad_token_id=0,
                      rope_parameters={"rope_type": "default", "rope_theta": THETA})
with tempfile.TemporaryDirectory() as tmp:
    model = NomicBertModel(cfg).eval()
    with torch.no_grad():  # LayerNorms away from 1 / 0, so a missing or swapped one shows
        for name, p in model.named_parameters():
            if "norm" in name.lower():
                p.copy_(p + 0.3 * torch.randn_like(p))
        model.embeddings.token_type_embeddings.weight.mul_(3.0)  # row 0 matters
    model.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    word = models.Transformer(tmp, max_seq_length=MAX_LEN)
    st = SentenceTransformer(modules=[word, models.Pooling(HIDDEN, "mean"), models.Normalize()], device="cpu")
    assert type(st[0].auto_model).__name__ == "NomicBertModel"
    mean = st.encode(TEXTS, convert_to_numpy=True, normalize_embeddings=False)
    feats = st[0].tokenize(TEXTS)
    assert (feats["input_ids"] == 1).sum() == 0, "no [UNK]"
    assert feats["attention_mask"].sum(1).max() > 16, "some texts longer than 16 tokens"
    with torch.no_grad():
        tokens = st[0](dict(feats))["token_embeddings"]
    st.save(OUT)
    native_sd = {k: v.detach().clone() for k, v in model.state_dict().items()}

mask = feats["attention_mask"].unsqueeze(-1).bool()
norm = torch.nn.functional.normalize
cls = norm(tokens[:, 0], dim=-1)
mx = norm(tokens.masked_fill(~mask, -1e9).max(1).values, dim=-1)
mn = norm((tokens * mask).sum(1) / mask.sum(1), dim=-1)
assert (mn - torch.from_numpy(mean)).abs().max() < 1e-5

# --- rewrite the folder in the Hub's format
if os.path.exists(os.path.join(OUT, "README.md")):
    os.remove(os.path.join(OUT, "README.md"))
hub = to_hub(native_sd)
assert len(hub) == 4 + LAYERS * 9, sorted(hub)
save_file(hub, os.path.join(OUT, "model.safetensors"), metadata={"format": "pt"})
with open(os.path.join(OUT, "config.json"), "w") as f:
    json.dump(HUB_CONFIG, f, indent=2)

# --- checks: the Hub tensors through a Hub-code-style forward, and back through transformers' conversion_mapping
w = load_file(os.path.join(OUT, "model.safetensors"))
with torch.no_grad():
    ref = hub_forward(w, feats["input_ids"], feats["attention_mask"])
d1 = ((ref - tokens) * mask).abs().max().item()
back = NomicBertModel.from_pretrained(OUT, config=cfg).eval()
with torch.no_grad():
    d2 = ((back(**dict(feats)).last_hidden_state - tokens) * mask).abs().max().item()
assert d1 < 1e-4 and d2 < 1e-5, (d1, d2)
with torch.no_grad():  # fc11 / fc12 swapped must show
    sw = dict(w)
    for n in range(LAYERS):
        p = f"encoder.layers.{n}.mlp."
        sw[p + "fc11.weight"], sw[p + "fc12.weight"] = w[p + "fc12.weight"], w[p + "fc11.weight"]
    assert ((hub_forward(sw, feats["input_ids"], feats["attention_mask"]) - tokens) * mask).abs().max() > 1e-2

with open(os.path.join(OUT, "expected.json"), "w") as f:
    json.dump({"texts": TEXTS, "input_ids": feats["input_ids"].tolist(), "mean": mean.tolist(),
               "cls": cls.tolist(), "max": mx.tolist()}, f)
print(f"hub-forward vs native {d1:.2e}, conversion_mapping vs native {d2:.2e}")
print("wrote", OUT, sorted(os.listdir(OUT)))
