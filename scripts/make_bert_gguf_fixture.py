#!/usr/bin/env python3
r"""The tiny BERT of tests/fixtures/tiny-bert as llama.cpp writes it (tests/fixtures/tiny-bert-gguf:
tiny-bert.f32.gguf, tiny-bert.f16.gguf, made by llama.cpp's own convert_hf_to_gguf.py) and llama.cpp's own
token ids and embeddings of a few texts (expected.json), for infer's GGUF encoder tests; the same for the tiny
RoBERTa of tests/fixtures/tiny-roberta (byte-level BPE, mean pooling + Normalize): tests/fixtures/tiny-roberta-gguf
(tiny-roberta.f32.gguf, expected.json); and the tiny NomicBERT of tests/fixtures/tiny-nomic-bert (the Hub's
nomic-embed-text-v1.5 format, scripts/make_nomic_fixtures.py): tests/fixtures/tiny-nomic-bert-gguf
(tiny-nomic-bert.f32.gguf, arch "nomic-bert", expected.json); and the tiny XLM-RoBERTa of tests/fixtures/tiny-xlmr
(SentencePiece Unigram, scripts/make_xlmr_fixtures.py): tests/fixtures/tiny-xlmr-gguf (tiny-xlmr.f32.gguf, arch
"bert", tokenizer.ggml.model "t5" = llama.cpp's UGM tokenizer, expected.json).

  nice -n 19 ~/.cache/infer/refvenv/bin/python scripts/make_bert_gguf_fixture.py                  # both
  nice -n 19 ~/.cache/infer/refvenv/bin/python scripts/make_bert_gguf_fixture.py --only roberta   # one
  nice -n 19 ~/.cache/infer/refvenv/bin/python scripts/make_bert_gguf_fixture.py --only nomic
  nice -n 19 ~/.cache/infer/refvenv/bin/python scripts/make_bert_gguf_fixture.py --only xlmr     # + sentencepiece,
                                                                                                  #   protobuf

Needs torch, transformers, sentence-transformers and numpy (the ref venv of scripts/requirements-ref.txt),
llama.cpp's source (convert_hf_to_gguf.py, gguf-py) and its llama-embedding and llama-tokenize binaries:
scripts/build-llamacpp.sh's tree, found under $LLAMACPP_DIR (default ~/.cache/infer/llamacpp: src/vendor/llama.cpp,
bin/ or build/bin/). A missing binary is built in $LLAMACPP_DIR/build (`cmake --build build --target ...`,
the existing configuration).

expected.json:
  texts                      tiny-bert/expected.json's texts, then a few with accents, uppercase, punctuation,
                             a literal "[CLS]", a CJK character, a word made of sub-words (tiny-roberta: its
                             expected.json's texts, then a few more made of the BPE training corpus's words)
  llamacpp_ids               llama-tokenize --ids (adds [CLS] ... [SEP], or <s> ... </s>; parses special tokens in
                             the text)
  llamacpp_embeddings        llama-embedding on the f32 GGUF: the pooling the GGUF says (mean), L2-normalized
                             (--embd-normalize 2), printed with 7 decimals; one text per run
  llamacpp_embeddings_f16    the same on the f16 GGUF (tiny-bert only)
  hf_ids                     tokenizer.json's ids with special tokens (transformers' fast tokenizer)
  ids_agree                  llamacpp_ids == hf_ids, per text
  st_embeddings              sentence-transformers' vectors of tiny-bert / tiny-roberta (mean pooling + Normalize)
  cosine_llamacpp_vs_st      cosine(llamacpp_embeddings, st_embeddings), per text
  cosine_llamacpp_f16_vs_st  the same for the f16 GGUF
  max_abs_diff_llamacpp_vs_st
  tokenizer_pre, llamacpp_commit, gguf

The tiny vocabulary's pre-tokenizer hash is unknown to convert_hf_to_gguf.py's get_vocab_base_pre() (it knows
hashes of published tokenizers only) and the conversion stops there; this script then writes `--pre` (default
"bert-bge", what the converter writes for BAAI/bge-small-en-v1.5's hash at its first match) as
tokenizer.ggml.pre. Everything else is the converter's own. llama.cpp ignores tokenizer.ggml.pre for
tokenizer.ggml.model == "bert" (WPM).

tiny-nomic-bert: the converter's NomicBertModel (arch "nomic-bert": no position table, RoPE; Wqkv kept fused as
blk.N.attn_qkv (Q, K, V row blocks); fc11 -> ffn_up, fc12 -> ffn_gate, fc2 -> ffn_down; emb_ln -> token_embd_norm, norm1 ->
attn_output_norm, norm2 -> layer_output_norm; context length 2048 from n_positions 8192 / max_trained_positions 2048),
the tiny-bert tokenizer (WordPiece, `--pre` as for tiny-bert; 128 vocabulary rows, so ids 110..127 become
"[PAD110]".. UNUSED tokens as the Hub model's 30522..30527 do). A transformers that knows model_type "nomic_bert"
natively (>= 5.x) makes the converter's AutoConfig.from_pretrained() succeed with the native class's defaults
(hidden_size 768, 12 layers, ...) beside the Hub's keys (n_embd, n_layer, ...), and the converter takes the
defaults; this script then gives the converter config.json as it is, which is what it reads when transformers
does not know the type (its own fallback). st_embeddings: sentence-transformers with transformers' native
NomicBertModel on the Hub folder (config_kwargs from the Hub keys; weights through transformers' own "nomic_bert"
name conversion), checked against tiny-nomic-bert/expected.json's `mean` (native-format references).

tiny-roberta: the converter's RobertaModel (arch "bert", tokenizer.ggml.model "gpt2" from tokenizer.json, merges,
position_embd without its first pad_token_id + 1 = 2 rows). Its tiny BPE's hash is unknown too; `--roberta-pre`
(default "roberta-bpe", what the converter writes for sentence-transformers/stsb-roberta-base) is written instead.
llama.cpp maps "roberta-bpe" to its GPT-2 pre-tokenizer regex
('s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S), the same as HF's ByteLevel
use_regex) with add_sep = true (overridden by the GGUF's tokenizer.ggml.add_*_token keys).

tiny-xlmr: the converter's XLMRobertaModel (arch "bert"): the vocabulary from sentencepiece.bpe.model (the
`sentencepiece` package; the Hub's bge-m3 folder has it too), ids re-aligned to the fairseq layout (<s>=0, <pad>=1,
</s>=2, <unk>=3, SentencePiece piece i at i + 1; the last row, HF's <mask>, becomes "[PAD<n>]", UNUSED),
tokenizer.ggml.model "t5", tokenizer.ggml.pre "default" (written by the converter, no hash lookup: `--pre` is not
used), scores, token types, add_space_prefix, remove_extra_whitespaces, precompiled_charsmap; position_embd
without its first pad_token_id + 1 = 2 rows as tiny-roberta.
"""
import argparse
import json
import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
FIX = REPO / "tests" / "fixtures"
LLAMACPP = Path(os.environ.get("LLAMACPP_DIR", Path.home() / ".cache" / "infer" / "llamacpp"))
LC = LLAMACPP / "src" / "vendor" / "llama.cpp"
# name: (source folder, output folder, GGUF stem, texts after the source's expected.json texts)
MODELS = {
    "bert": ("tiny-bert", "tiny-bert-gguf", "tiny-bert",
             ["Héllo, WORLD!! naïve café", "unbelievable", "[CLS] text", "The 猫 sat on the mat..."]),
    # only words and characters of make_roberta_fixtures.py's CORPUS (a double space, a digit run, "?")
    "roberta": ("tiny-roberta", "tiny-roberta-gguf", "tiny-roberta",
                ["The cat sat on the rug.", "where did the dog run?", "A kitten  sat in the park 88%"]),
    # RoPE positions past 40: a long text
    "nomic": ("tiny-nomic-bert", "tiny-nomic-bert-gguf", "tiny-nomic-bert",
              ["Héllo, WORLD!! naïve café", "unbelievable", "[CLS] text", "The 猫 sat on the mat...",
               " ".join(["the cat sat on the mat and the dog ran in the park"] * 4)]),
    # SentencePiece Unigram (UGM): double and edge spaces, accents, NFKC, capitals, digits, an unknown character
    "xlmr": ("tiny-xlmr", "tiny-xlmr-gguf", "tiny-xlmr",
             ["Héllo  naïve café, résumé über straße", "  WORLD CAPITALS: Paris, Berlin, Tokyo!  ",
              "Numbers 2024 and 3.14 or 42", "The 猫 sat on the mat", "ｆｕｌｌｗｉｄｔｈ ﬁ unbelievable",
              "<s> the cat", "猫犬 and ☃☃ x"]),
}

# convert_hf_to_gguf.main() with get_vocab_base_pre() falling back to argv[1] for an unknown hash
CONVERT = r"""
import sys
sys.path.insert(0, sys.argv[2])
sys.path.insert(0, sys.argv[2] + "/gguf-py")
from conversion import base
orig = base.TextModel.get_vocab_base_pre
def get_vocab_base_pre(self, tokenizer, _pre=sys.argv[1]):
    try:
        return orig(self, tokenizer)
    except NotImplementedError:
        base.logger.warning("unknown pre-tokenizer hash: writing tokenizer.ggml.pre = %r", _pre)
        return _pre
base.TextModel.get_vocab_base_pre = get_vocab_base_pre
# a Hub-format NomicBERT config.json (n_embd, n_layer, ...): read as it is, not through a native NomicBertConfig
import json, pathlib
orig_load_hparams = base.ModelBase.load_hparams
def load_hparams(dir_model, is_mistral_format):
    cfg = pathlib.Path(dir_model) / "config.json"
    if not is_mistral_format and cfg.is_file():
        raw = json.loads(cfg.read_text(encoding="utf-8"))
        if raw.get("model_type") == "nomic_bert" and "n_embd" in raw:
            base.logger.warning("Hub-format nomic_bert config: reading config.json as it is")
            return raw
    return orig_load_hparams(dir_model, is_mistral_format)
base.ModelBase.load_hparams = staticmethod(load_hparams)
import convert_hf_to_gguf
sys.argv = ["convert_hf_to_gguf.py"] + sys.argv[3:]
convert_hf_to_gguf.main()
"""


def binary(name):
    for d in (LLAMACPP / "bin", LLAMACPP / "build" / "bin"):
        if (d / name).is_file() and os.access(d / name, os.X_OK):
            return d / name
    cmake = Path(sys.executable).parent / "cmake"
    env = dict(os.environ, PATH=f"{cmake.parent}:{os.environ['PATH']}")
    print(f"building {name} in {LLAMACPP / 'build'}", file=sys.stderr)
    subprocess.run([str(cmake) if cmake.exists() else "cmake", "--build", str(LLAMACPP / "build"), "--target", name,
                    "-j", str(os.cpu_count() or 2)], check=True, env=env)
    return LLAMACPP / "build" / "bin" / name


def convert(src, out_dir, stem, outtype, pre):
    out = out_dir / f"{stem}.{outtype}.gguf"
    subprocess.run([sys.executable, "-c", CONVERT, pre, str(LC), str(src), "--outtype", outtype,
                    "--outfile", str(out)], check=True, cwd=LC)
    return out


def llama_ids(tokenize, gguf, text):
    r = subprocess.run([str(tokenize), "-m", str(gguf), "-p", text, "--ids", "--log-disable", "--no-escape"],
                       capture_output=True, text=True, check=True)
    return json.loads(r.stdout.strip().splitlines()[-1])


def llama_embedding(embedding, gguf, text, threads, tries=50):
    # llama-embedding prints through llama.cpp's asynchronous logger, which at exit sometimes drops what it
    # has queued (an empty or cut stdout, exit status 0): run it again until the whole `[[...]]` line is there
    for _ in range(tries):
        r = subprocess.run([str(embedding), "-m", str(gguf), "-p", text, "--embd-output-format", "array",
                            "--embd-normalize", "2", "-t", str(threads), "--no-warmup", "--no-escape"],
                           capture_output=True, text=True)
        if r.returncode != 0:
            sys.exit(f"llama-embedding failed on {text!r}:\n{r.stderr[-4000:]}")
        m = re.search(r"^\[\[[^\]]*\]\]$", r.stdout, re.M)
        if m:
            (vec,) = json.loads(m.group(0))
            return vec
    sys.exit(f"no embedding array in {tries} runs of llama-embedding for {text!r}:\n{r.stdout[-2000:]}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", choices=sorted(MODELS), action="append",
                    help="make only this fixture (repeatable; default: all)")
    ap.add_argument("--pre", default="bert-bge",
                    help="tiny-bert's tokenizer.ggml.pre when the converter does not know the hash")
    ap.add_argument("--roberta-pre", default="roberta-bpe",
                    help="tiny-roberta's tokenizer.ggml.pre when the converter does not know the hash")
    ap.add_argument("--no-f16", action="store_true", help="skip tiny-bert.f16.gguf")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    tokenize, embedding = binary("llama-tokenize"), binary("llama-embedding")
    for name in args.only or list(MODELS):
        pre = args.roberta_pre if name == "roberta" else args.pre
        make(name, pre, f16=name == "bert" and not args.no_f16, threads=args.threads, tokenize=tokenize,
             embedding=embedding)


def make(name, pre, f16, threads, tokenize, embedding):
    import numpy as np
    from sentence_transformers import SentenceTransformer
    from transformers import AutoTokenizer

    src_name, out_name, stem, extra_texts = MODELS[name]
    SRC, OUT = FIX / src_name, FIX / out_name
    OUT.mkdir(parents=True, exist_ok=True)
    f32 = convert(SRC, OUT, stem, "f32", pre)
    f16 = convert(SRC, OUT, stem, "f16", pre) if f16 else None

    with open(SRC / "expected.json") as f:
        base_texts = json.load(f)["texts"]
    texts = base_texts + extra_texts
    for t in texts:
        assert "\n" not in t, "llama-embedding splits its prompt at newlines"

    lids = [llama_ids(tokenize, f32, t) for t in texts]
    lemb = [llama_embedding(embedding, f32, t, threads) for t in texts]
    lemb16 = [llama_embedding(embedding, f16, t, threads) for t in texts] if f16 else None

    tok = AutoTokenizer.from_pretrained(str(SRC))
    hf_ids = [tok(t, add_special_tokens=True)["input_ids"] for t in texts]
    if name == "nomic":
        with open(SRC / "config.json") as f:
            hub = json.load(f)
        kw = {"hidden_size": hub["n_embd"], "num_attention_heads": hub["n_head"], "num_hidden_layers": hub["n_layer"],
              "head_dim": hub["n_embd"] // hub["n_head"],
              "intermediate_size": hub["n_inner"], "layer_norm_eps": hub["layer_norm_epsilon"], "hidden_act": "silu",
              "vocab_size": hub["vocab_size"], "type_vocab_size": hub["type_vocab_size"],
              "rope_parameters": {"rope_type": "default", "rope_theta": float(hub["rotary_emb_base"])}}
        st = SentenceTransformer(str(SRC), device="cpu", config_kwargs=kw)
    else:
        st = SentenceTransformer(str(SRC), device="cpu")
    ste = st.encode(texts, convert_to_numpy=True, normalize_embeddings=True)
    if name == "nomic":
        with open(SRC / "expected.json") as f:
            ref = np.asarray(json.load(f)["mean"])
        d = float(np.abs(ste[:len(base_texts)] - ref).max())
        assert d < 1e-5, f"sentence-transformers on the Hub folder != expected.json's mean: {d}"

    def cos(a, b):
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))

    try:
        commit = subprocess.run(["git", "-C", str(LC), "rev-parse", "HEAD"], capture_output=True, text=True,
                                check=True).stdout.strip()
    except (subprocess.CalledProcessError, FileNotFoundError):
        commit = "unknown"
    exp = {
        "texts": texts,
        "llamacpp_ids": lids,
        "llamacpp_embeddings": lemb,
        "hf_ids": hf_ids,
        "ids_agree": [a == b for a, b in zip(lids, hf_ids)],
        "st_embeddings": ste.tolist(),
        "cosine_llamacpp_vs_st": [cos(a, b) for a, b in zip(lemb, ste)],
        "max_abs_diff_llamacpp_vs_st": [float(np.max(np.abs(np.asarray(a) - b))) for a, b in zip(lemb, ste)],
        "gguf": f32.name,
        "pooling": f"mean (from the GGUF's {'nomic-bert' if name == 'nomic' else 'bert'}.pooling_type = 1)",
        "normalize": "l2",
        "tokenizer_pre": "default" if name == "xlmr" else pre,
        "llamacpp_commit": commit,
    }
    if lemb16 is not None:
        exp["llamacpp_embeddings_f16"] = lemb16
        exp["cosine_llamacpp_f16_vs_st"] = [cos(a, b) for a, b in zip(lemb16, ste)]
    with open(OUT / "expected.json", "w") as f:
        json.dump(exp, f)
    for i, t in enumerate(texts):
        print(f"{t!r:40} ids_agree={exp['ids_agree'][i]!s:5} cos={exp['cosine_llamacpp_vs_st'][i]:.7f}"
              + (f" cos_f16={exp['cosine_llamacpp_f16_vs_st'][i]:.7f}" if lemb16 is not None else ""))
    print("wrote", OUT, sorted(os.listdir(OUT)))


if __name__ == "__main__":
    main()
