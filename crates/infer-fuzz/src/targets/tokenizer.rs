//! `tokenizer.json`: loaded with `infer_core::Tokenizer::from_file` as the loader does, then used as
//! the server uses it: encode a text (with and without special tokens), decode the ids, stream them
//! through the incremental detokenizer, and decode ids just past the vocabulary (a model's
//! `vocab_size` may exceed its tokenizer's, and `/detokenize` checks against the former).
//!
//! Seeds: the fixtures' byte-level BPE, and tokenizers built here covering the other models
//! (SentencePiece-style BPE with byte fallback, Unigram with Metaspace, WordPiece, WordLevel) and
//! components (added tokens, normalizer and pre-tokenizer sequences, regex splits, template
//! post-processing, decoder sequences).

use std::path::{Path, PathBuf};

use infer_core::{IncrementalDecoder, Tokenizer};
use serde_json::{json, Value};

use super::{anywhere, outcome, Target};
use crate::fixtures;
use crate::mutate::{Input, PartInfo};

/// The input's parts (file names of a finding).
pub const PARTS: &[&str] = &["tokenizer.json", "text.txt"];

pub struct TokenizerJson {
    work: PathBuf,
    file: PathBuf,
}

impl TokenizerJson {
    pub fn new(work: &Path) -> Result<Self, String> {
        Ok(Self { work: work.to_path_buf(), file: work.join("tokenizer.json") })
    }
}

fn added(id: u32, content: &str, special: bool) -> Value {
    json!({"id": id, "content": content, "single_word": false, "lstrip": false, "rstrip": false, "normalized": !special, "special": special})
}

fn tokenizer(model: Value, normalizer: Value, pre: Value, post: Value, decoder: Value, added_tokens: Vec<Value>) -> Value {
    json!({"version": "1.0", "truncation": null, "padding": null, "added_tokens": added_tokens, "normalizer": normalizer,
        "pre_tokenizer": pre, "post_processor": post, "decoder": decoder, "model": model})
}

/// The tokenizer.json seeds (also checked by a unit test to load).
pub fn seed_tokenizers() -> Vec<Vec<u8>> {
    let fixture: Value = serde_json::from_slice(fixtures::TOKENIZER_JSON).expect("fixture tokenizer.json");
    let mut out = vec![fixtures::TOKENIZER_JSON.to_vec()];

    // Byte-level BPE with merges, special tokens and every component set.
    let mut bpe = fixture.clone();
    let vocab = bpe["model"]["vocab"].as_object_mut().expect("vocab");
    vocab.insert("he".into(), json!(256));
    vocab.insert("hel".into(), json!(257));
    bpe["model"]["merges"] = json!([["h", "e"], ["he", "l"]]);
    bpe["added_tokens"] = json!([added(258, "<|im_start|>", true), added(259, "<|im_end|>", true), added(260, "<tool_call>", false)]);
    bpe["normalizer"] =
        json!({"type": "Sequence", "normalizers": [{"type": "NFC"}, {"type": "Replace", "pattern": {"String": "\t"}, "content": "    "}]});
    bpe["pre_tokenizer"] = json!({"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": "\\p{N}{1,3}"}, "behavior": "Isolated", "invert": false},
        {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true}]});
    bpe["post_processor"] = json!({"type": "TemplateProcessing",
        "single": [{"SpecialToken": {"id": "<|im_start|>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
        "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"SpecialToken": {"id": "<|im_end|>", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
        "special_tokens": {"<|im_start|>": {"id": "<|im_start|>", "ids": [258], "tokens": ["<|im_start|>"]},
                           "<|im_end|>": {"id": "<|im_end|>", "ids": [259], "tokens": ["<|im_end|>"]}}});
    bpe["decoder"] =
        json!({"type": "Sequence", "decoders": [{"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true}]});
    out.push(bpe.to_string().into_bytes());

    // SentencePiece-style BPE (Llama 2, Mistral): byte fallback, ▁ for spaces.
    let mut v = serde_json::Map::new();
    for (i, t) in ["<unk>", "<s>", "</s>"].iter().enumerate() {
        v.insert((*t).into(), json!(i));
    }
    for b in 0..=255u32 {
        v.insert(format!("<0x{b:02X}>"), json!(3 + b));
    }
    for (i, t) in ["▁", "h", "e", "l", "o", "he", "▁he", "ll", "llo", "▁hello"].iter().enumerate() {
        v.insert((*t).into(), json!(259 + i));
    }
    let spm = tokenizer(
        json!({"type": "BPE", "dropout": null, "unk_token": "<unk>", "continuing_subword_prefix": null, "end_of_word_suffix": null,
            "fuse_unk": true, "byte_fallback": true, "ignore_merges": false, "vocab": v, "merges": ["h e", "▁ he", "l l", "ll o", "▁he llo"]}),
        json!({"type": "Sequence", "normalizers": [{"type": "Prepend", "prepend": "▁"}, {"type": "Replace", "pattern": {"String": " "}, "content": "▁"}]}),
        Value::Null,
        json!({"type": "TemplateProcessing", "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {"<s>": {"id": "<s>", "ids": [1], "tokens": ["<s>"]}}}),
        json!({"type": "Sequence", "decoders": [{"type": "Replace", "pattern": {"String": "▁"}, "content": " "}, {"type": "ByteFallback"},
            {"type": "Fuse"}, {"type": "Strip", "content": " ", "start": 1, "stop": 0}]}),
        vec![added(0, "<unk>", true), added(1, "<s>", true), added(2, "</s>", true)],
    );
    out.push(spm.to_string().into_bytes());

    // Unigram with Metaspace (T5, Gemma-like).
    let unigram = tokenizer(
        json!({"type": "Unigram", "unk_id": 0, "vocab": [["<unk>", 0.0], ["▁", -1.0], ["a", -2.0], ["b", -2.5], ["▁ab", -1.5], ["c", -3.0], ["<pad>", 0.0]], "byte_fallback": false}),
        json!({"type": "Replace", "pattern": {"Regex": " {2,}"}, "content": " "}),
        json!({"type": "Metaspace", "replacement": "▁", "prepend_scheme": "always", "split": true}),
        Value::Null,
        json!({"type": "Metaspace", "replacement": "▁", "prepend_scheme": "always", "split": true}),
        vec![added(0, "<unk>", true), added(6, "<pad>", true)],
    );
    out.push(unigram.to_string().into_bytes());

    // WordPiece (BERT).
    let wordpiece = tokenizer(
        json!({"type": "WordPiece", "unk_token": "[UNK]", "continuing_subword_prefix": "##", "max_input_chars_per_word": 100,
            "vocab": {"[PAD]": 0, "[UNK]": 1, "[CLS]": 2, "[SEP]": 3, "hello": 4, "world": 5, "##s": 6, "un": 7, "##able": 8}}),
        json!({"type": "BertNormalizer", "clean_text": true, "handle_chinese_chars": true, "strip_accents": null, "lowercase": true}),
        json!({"type": "BertPreTokenizer"}),
        json!({"type": "BertProcessing", "sep": ["[SEP]", 3], "cls": ["[CLS]", 2]}),
        json!({"type": "WordPiece", "prefix": "##", "cleanup": true}),
        vec![added(0, "[PAD]", true), added(1, "[UNK]", true), added(2, "[CLS]", true), added(3, "[SEP]", true)],
    );
    out.push(wordpiece.to_string().into_bytes());

    // WordLevel with whitespace and digits splitting.
    let wordlevel = tokenizer(
        json!({"type": "WordLevel", "vocab": {"<unk>": 0, "hello": 1, "world": 2, "1": 3}, "unk_token": "<unk>"}),
        json!({"type": "Lowercase"}),
        json!({"type": "Sequence", "pretokenizers": [{"type": "Whitespace"}, {"type": "Digits", "individual_digits": true}, {"type": "Punctuation", "behavior": "Isolated"}]}),
        Value::Null,
        Value::Null,
        vec![],
    );
    out.push(wordlevel.to_string().into_bytes());
    out
}

const TEXTS: &[&str] = &[
    "Hello world",
    "<|im_start|>user\nhello <|im_end|>\n<|im_start|>assistant\n",
    "héllo wörld 你好 🦀 \u{0}\t\r\n  12345 unable",
    "<s>[INST] hello [/INST]</s> <0x41> ▁hello",
];

impl Target for TokenizerJson {
    fn parts(&self) -> &'static [&'static str] {
        PARTS
    }

    fn part_info(&self, _: &Input) -> Vec<PartInfo> {
        vec![anywhere(1 << 18), anywhere(1 << 14)]
    }

    fn seeds(&self) -> Vec<Input> {
        let toks = seed_tokenizers();
        let mut out = Vec::new();
        for (i, t) in toks.iter().enumerate() {
            out.push(vec![t.clone(), TEXTS[i % TEXTS.len()].as_bytes().to_vec()]);
        }
        out
    }

    fn dictionary(&self) -> Vec<Vec<u8>> {
        let mut d = super::words(&[
            "\"type\": \"BPE\"",
            "\"type\": \"Unigram\"",
            "\"type\": \"WordPiece\"",
            "\"type\": \"WordLevel\"",
            "\"type\": \"Split\"",
            "\"type\": \"ByteLevel\"",
            "\"type\": \"Metaspace\"",
            "\"type\": \"Sequence\"",
            "\"type\": \"Replace\"",
            "\"type\": \"Strip\"",
            "\"type\": \"NFKC\"",
            "\"type\": \"Precompiled\"",
            "\"type\": \"TemplateProcessing\"",
            "\"type\": \"ByteFallback\"",
            "\"type\": \"Fuse\"",
            "{\"Regex\": \"(a*)*b\"}",
            "{\"Regex\": \"\\\\p{L}+|\"}",
            "{\"String\": \"\"}",
            "\"merges\": [",
            "\"vocab\": {",
            "\"added_tokens\": [",
            "\"byte_fallback\": true",
            "\"dropout\": 0.5",
            "\"unk_id\": ",
            "\"special\": true",
            "\"max_input_chars_per_word\": ",
            "\"truncation\": {\"max_length\": 0, \"stride\": 5, \"strategy\": \"LongestFirst\", \"direction\": \"Right\"}",
            "\"padding\": {\"strategy\": {\"Fixed\": 3}, \"direction\": \"Left\", \"pad_to_multiple_of\": 0, \"pad_id\": 0, \"pad_type_id\": 0, \"pad_token\": \"x\"}",
            "<|im_start|>",
            "<0xFF>",
            "▁",
            "\u{FFFD}",
        ]);
        d.extend(super::words(super::JSON_WORDS));
        d
    }

    fn run(&mut self, input: &Input) -> String {
        super::write_or_remove(&self.file, &input[0]);
        let tk = match Tokenizer::from_file(&self.file) {
            Ok(t) => t,
            Err(e) => return outcome(&Err::<(), _>(e), &self.work),
        };
        let text = String::from_utf8_lossy(&input[1]);
        let with = tk.encode(&text, true);
        let _ = tk.encode(&text, false);
        let vocab = tk.vocab_size() as u32;
        if let Ok(ids) = &with {
            let _ = tk.decode(ids, true);
            let _ = tk.decode(ids, false);
            let mut dec = IncrementalDecoder::new();
            for &id in ids.iter().take(512) {
                let _ = dec.push(&tk, id);
            }
            let _ = dec.flush(&tk);
        }
        // Ids from the text's bytes, some past the vocabulary.
        let extra: Vec<u32> = input[1]
            .chunks(2)
            .take(256)
            .map(|c| u32::from(c[0]) << 8 | u32::from(*c.get(1).unwrap_or(&0)))
            .map(|x| x % (vocab + 64))
            .collect();
        let _ = tk.decode(&extra, false);
        for &id in extra.iter().take(16) {
            if let Some(s) = tk.id_to_token(id) {
                let _ = tk.token_to_id(&s);
            }
        }
        match with {
            Ok(ids) => format!("ok {}", ids.len().min(4)),
            Err(e) => outcome(&Err::<(), _>(e), &self.work),
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn every_seed_tokenizer_loads() {
        let dir = super::super::scratch_dir("tokenizer-seeds");
        std::fs::create_dir_all(&dir).unwrap();
        for (i, t) in super::seed_tokenizers().iter().enumerate() {
            let p = dir.join("tokenizer.json");
            std::fs::write(&p, t).unwrap();
            let tk = infer_core::Tokenizer::from_file(&p).unwrap_or_else(|e| panic!("seed {i}: {e}"));
            assert!(!tk.encode("hello world", true).unwrap().is_empty(), "seed {i}");
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
