//! GGUF files: header, metadata (typed values, arrays, the tokenizer's vocabulary and merges, the chat
//! template) and tensor infos, through `infer_core::loader::load_files` exactly as `infer run` and
//! `infer serve` load a `.gguf` (config from metadata, tokenizer, template, then the model's tensors),
//! then what a server does with the loaded model (template render, tokenize, detokenize).
//!
//! Seeds: the tiny GGUF fixtures of six architectures, plus variants rewritten here with a chat
//! template, a SentencePiece (`llama`) vocabulary with scores and token types, other pre-tokenizers,
//! and metadata arrays of every value type (nested ones too).

use std::io::Cursor;
use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file::{self, Content, Value};
use candle_core::quantized::QTensor;
use candle_core::Device;
use infer_core::loader::{load_files, ModelFiles};
use infer_core::LoadOptions;

use super::{outcome, Target};
use crate::fixtures;
use crate::mutate::{Input, PartInfo};

/// The input's parts (file names of a finding).
pub const PARTS: &[&str] = &["model.gguf"];

pub struct Gguf {
    work: PathBuf,
    file: PathBuf,
}

impl Gguf {
    pub fn new(work: &Path) -> Result<Self, String> {
        Ok(Self { work: work.to_path_buf(), file: work.join("model.gguf") })
    }
}

/// Reads a GGUF, lets `edit` change its metadata (sorted by key), and writes it again with the same
/// tensors.
fn rewrite(base: &[u8], edit: impl FnOnce(&mut Vec<(String, Value)>)) -> Vec<u8> {
    let mut cur = Cursor::new(base);
    let content = Content::read(&mut cur).expect("fixture GGUF");
    let mut md: Vec<(String, Value)> = content.metadata.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
    md.sort_by(|a, b| a.0.cmp(&b.0));
    edit(&mut md);
    let mut names: Vec<&String> = content.tensor_infos.keys().collect();
    names.sort();
    let tensors: Vec<(String, QTensor)> =
        names.iter().map(|n| ((*n).clone(), content.tensor(&mut cur, n, &Device::Cpu).expect("fixture tensor"))).collect();
    let mdr: Vec<(&str, &Value)> = md.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let tr: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let mut out = Cursor::new(Vec::new());
    gguf_file::write(&mut out, &mdr, &tr).expect("GGUF write");
    out.into_inner()
}

fn set(md: &mut Vec<(String, Value)>, key: &str, v: Value) {
    md.retain(|(k, _)| k != key);
    md.push((key.to_string(), v));
}

fn fixture(arch: &str) -> &'static [u8] {
    fixtures::GGUF_MODELS.iter().find(|(a, _)| *a == arch).map(|(_, b)| *b).expect("GGUF fixture")
}

/// Metadata arrays of every value type, nested ones and strings (the reader's costly paths).
fn typed_arrays(md: &mut Vec<(String, Value)>) {
    set(md, "general.name", Value::String("fuzz seed".into()));
    set(md, "general.tags", Value::Array(vec![Value::String("a".into()), Value::String("text-generation".into())]));
    set(md, "fuzz.u8", Value::Array((0..8).map(Value::U8).collect()));
    set(md, "fuzz.i16", Value::Array((0..4).map(|i| Value::I16(-i)).collect()));
    set(md, "fuzz.u64", Value::Array(vec![Value::U64(0), Value::U64(u64::MAX)]));
    set(md, "fuzz.f64", Value::Array(vec![Value::F64(1.5), Value::F64(f64::NAN)]));
    set(md, "fuzz.bool", Value::Array(vec![Value::Bool(true), Value::Bool(false)]));
    set(md, "fuzz.nested", Value::Array(vec![Value::Array(vec![Value::I64(-1), Value::I64(2)]), Value::Array(vec![])]));
    set(md, "fuzz.scalar_i8", Value::I8(-3));
    set(md, "fuzz.scalar_u16", Value::U16(7));
}

/// The seeds: each fixture, and rewritten variants.
pub fn seeds() -> Vec<Input> {
    let mut out: Vec<Input> = fixtures::GGUF_MODELS.iter().map(|(_, b)| vec![b.to_vec()]).collect();
    // Qwen3 with its chat template, end-of-turn ids, an explicit alignment and typed arrays.
    out.push(vec![rewrite(fixture("qwen3"), |md| {
        set(md, "tokenizer.chat_template", Value::String(fixtures::template("qwen3").into()));
        set(md, "tokenizer.ggml.eot_token_id", Value::U32(2));
        set(md, "tokenizer.ggml.add_bos_token", Value::Bool(true));
        set(md, "general.alignment", Value::U32(64));
        typed_arrays(md);
    })]);
    // Gemma 2 with a SentencePiece vocabulary: scores, token types (control tokens), no merges.
    out.push(vec![rewrite(fixture("gemma2"), |md| {
        let n = md
            .iter()
            .find(|(k, _)| k == "tokenizer.ggml.tokens")
            .and_then(|(_, v)| v.to_vec().ok().map(|a| a.len()))
            .expect("fixture tokens");
        let mut tokens: Vec<Value> = (0..n).map(|i| Value::String(format!("▁t{i}"))).collect();
        for (i, t) in ["<unk>", "<bos>", "<eos>", "<start_of_turn>", "<end_of_turn>", "▁", "▁t", "t1"].iter().enumerate() {
            tokens[i] = Value::String((*t).into());
        }
        let types: Vec<Value> = (0..n)
            .map(|i| {
                Value::I32(if i < 5 {
                    3
                } else if i < 8 {
                    1
                } else if i % 17 == 0 {
                    4
                } else {
                    1
                })
            })
            .collect();
        set(md, "tokenizer.ggml.model", Value::String("llama".into()));
        set(md, "tokenizer.ggml.tokens", Value::Array(tokens));
        set(md, "tokenizer.ggml.scores", Value::Array((0..n).map(|i| Value::F32(-(i as f32))).collect()));
        set(md, "tokenizer.ggml.token_type", Value::Array(types));
        set(md, "tokenizer.ggml.add_space_prefix", Value::Bool(false));
        set(md, "tokenizer.ggml.unknown_token_id", Value::U32(0));
        md.retain(|(k, _)| k != "tokenizer.ggml.merges");
        let gemma = serde_json::from_str::<serde_json::Value>(fixtures::TEMPLATE_CASES)
            .ok()
            .and_then(|v| v.as_array()?.iter().find(|c| c["name"] == "gemma-style")?["template"].as_str().map(String::from))
            .expect("gemma-style template");
        set(md, "tokenizer.chat_template", Value::String(gemma));
    })]);
    // Phi-3 with llama3's pre-tokenizer and a tools template; Mixtral with smollm's and Llama 3.3's.
    out.push(vec![rewrite(fixture("phi3"), |md| {
        set(md, "tokenizer.ggml.pre", Value::String("llama-bpe".into()));
        set(md, "tokenizer.chat_template", Value::String(fixtures::template("phi4-mini").into()));
    })]);
    out.push(vec![rewrite(fixture("mixtral"), |md| {
        set(md, "tokenizer.ggml.pre", Value::String("smollm".into()));
        set(md, "tokenizer.chat_template", Value::String(fixtures::template("llama3.3").into()));
        set(md, "tokenizer.ggml.eom_token_id", Value::U32(1));
    })]);
    out.push(vec![rewrite(fixture("qwen3moe"), |md| {
        set(md, "tokenizer.ggml.pre", Value::String("qwen2".into()));
        set(md, "tokenizer.chat_template", Value::String(fixtures::template("mistral-small-3.2").into()));
        typed_arrays(md);
    })]);
    out
}

impl Target for Gguf {
    fn parts(&self) -> &'static [&'static str] {
        PARTS
    }

    fn part_info(&self, input: &Input) -> Vec<PartInfo> {
        // Mutations go to the header (metadata and tensor infos) rather than the tensor data.
        let hot = Content::read(&mut Cursor::new(&input[0])).map(|c| c.tensor_data_offset as usize).unwrap_or(usize::MAX);
        vec![PartInfo { hot, max_len: 4 << 20 }]
    }

    fn seeds(&self) -> Vec<Input> {
        seeds()
    }

    fn dictionary(&self) -> Vec<Vec<u8>> {
        let mut d = super::words(&[
            "GGUF",
            "general.alignment",
            "general.architecture",
            "tokenizer.ggml.model",
            "tokenizer.ggml.tokens",
            "tokenizer.ggml.token_type",
            "tokenizer.ggml.scores",
            "tokenizer.ggml.merges",
            "tokenizer.ggml.pre",
            "tokenizer.ggml.bos_token_id",
            "tokenizer.ggml.eos_token_id",
            "tokenizer.ggml.add_bos_token",
            "tokenizer.chat_template",
            "block_count",
            "context_length",
            "embedding_length",
            "feed_forward_length",
            "attention.head_count",
            "attention.head_count_kv",
            "attention.key_length",
            "attention.sliding_window",
            "rope.dimension_count",
            "rope.freq_base",
            "rope.scaling.type",
            "expert_count",
            "expert_used_count",
            "vocab_size",
            "token_embd.weight",
            "output.weight",
            "rope_freqs.weight",
            "blk.0.attn_q.weight",
            "gemma2",
            "gemma3",
            "llama",
            "qwen3moe",
            "phi3",
            "gpt2",
            "{% for x in range(9) %}",
        ]);
        // Value types (u32 little-endian) and GGUF versions.
        for t in 0u32..=13 {
            d.push(t.to_le_bytes().to_vec());
        }
        d
    }

    fn run(&mut self, input: &Input) -> String {
        super::write_or_remove(&self.file, &input[0]);
        let mut opts = LoadOptions::default();
        match load_files(&ModelFiles::Gguf(self.file.clone()), "fuzz", &mut opts) {
            Ok(m) => super::exercise_loaded(&m),
            r => outcome(&r.map(|_| ()), &self.work),
        }
    }
}
