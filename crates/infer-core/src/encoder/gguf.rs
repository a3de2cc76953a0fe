//! BERT and NomicBERT encoders from GGUF as llama.cpp's `convert_hf_to_gguf.py` writes them:
//! architectures `bert` and `nomic-bert` (fused Q/K/V, SwiGLU, RoPE base `nomic-bert.rope.freq_base`),
//! their hyperparameters, the WordPiece vocabulary (`tokenizer.ggml.model` = `bert`, see
//! [`Tokenizer::from_gguf`]), the pooling of `bert.pooling_type` (1 mean, 2 CLS, 3 last; none or absent:
//! mean), vectors L2-normalized as llama.cpp's embeddings are by default (a GGUF does not record
//! sentence-transformers' `Normalize`). Tensors are dequantized to f32 whatever their GGUF type.
//! RoBERTa GGUFs (the same architecture with a byte-level BPE vocabulary, `tokenizer.ggml.model` =
//! `gpt2`; the converter drops the position rows before padding id + 1, so positions start at 0) get
//! RoBERTa's `<s> A </s>` / `<s> A </s></s> B </s>`, as do XLM-R GGUFs (bge-m3, multilingual-e5: a
//! SentencePiece Unigram vocabulary, `t5`, with its precompiled normalization map). Rerankers
//! (`pooling_type` 4) are refused with a message.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};

use super::bert::{Bert, BertConfig};
use super::nomic::{Nomic, NomicConfig};
use super::{Encoder, EncoderPooling, Net, Weights};
use crate::config::GgufMeta;
use crate::error::{Error, Result};
use crate::tokenizer::Tokenizer;
use crate::weights::WeightSource;

/// Whether `path` is a GGUF file (by its name) of architecture `bert` or `nomic-bert` with a vocabulary
/// this loader reads.
pub(super) fn is_bert_gguf(path: &Path) -> bool {
    if !path.extension().is_some_and(|e| e.eq_ignore_ascii_case("gguf")) {
        return false;
    }
    let Ok(src) = WeightSource::gguf(path, Device::Cpu) else { return false };
    let Some((content, _)) = src.gguf_content() else { return false };
    let md = GgufMeta { md: &content.metadata, path };
    matches!(md.string_opt("general.architecture").ok().flatten().as_deref(), Some("bert" | "nomic-bert"))
        && matches!(md.string_opt("tokenizer.ggml.model").ok().flatten().as_deref(), Some("bert" | "gpt2" | "t5"))
}

/// The HF name (without the `bert.` prefix) of a llama.cpp BERT tensor; `None` for tensors the
/// encoder does not use (a classifier head).
fn hf_name(gguf: &str) -> Option<String> {
    let (base, suffix) = gguf.rsplit_once('.')?;
    if !matches!(suffix, "weight" | "bias") {
        return None;
    }
    let mapped = match base {
        "token_embd" => "embeddings.word_embeddings".to_string(),
        "position_embd" => "embeddings.position_embeddings".to_string(),
        "token_types" => "embeddings.token_type_embeddings".to_string(),
        "token_embd_norm" => "embeddings.LayerNorm".to_string(),
        _ => {
            let rest = base.strip_prefix("blk.")?;
            let (layer, tail) = rest.split_once('.')?;
            let layer: usize = layer.parse().ok()?;
            let hf = match tail {
                "attn_q" => "attention.self.query",
                "attn_k" => "attention.self.key",
                "attn_v" => "attention.self.value",
                "attn_qkv" => "attention.self.qkv", // split below
                "attn_output" => "attention.output.dense",
                "attn_output_norm" => "attention.output.LayerNorm",
                "ffn_up" => "intermediate.dense",
                "ffn_down" => "output.dense",
                "layer_output_norm" => "output.LayerNorm",
                _ => return None,
            };
            format!("encoder.layer.{layer}.{hf}")
        }
    };
    Some(format!("{mapped}.{suffix}"))
}

/// RoBERTa's special tokens around a text (`<s> A </s>`) and a pair (`<s> A </s></s> B </s>`), as
/// llama.cpp adds them for a BPE vocabulary in a `bert` GGUF (BOS, the text, EOS; a pair joined by a
/// separator).
fn roberta_template(tokenizer: Tokenizer, md: &GgufMeta<'_>) -> Result<Tokenizer> {
    let bad = |msg: String| Error::bad_file(md.path, msg);
    let token = |key: &str, default: u32| -> Result<(String, u32)> {
        let id = md.u32_opt(key)?.unwrap_or(default);
        Ok((tokenizer.id_to_token(id).ok_or_else(|| bad(format!("{key} {id} is out of the vocabulary")))?, id))
    };
    let bos = token("tokenizer.ggml.bos_token_id", 0)?;
    let eos = match md.u32_opt("tokenizer.ggml.seperator_token_id")? {
        Some(_) => token("tokenizer.ggml.seperator_token_id", 2)?,
        None => token("tokenizer.ggml.eos_token_id", 2)?,
    };
    let (b, e) = (&bos.0, &eos.0);
    let tk_err = |x: String| Error::Tokenizer(x);
    let post = tokenizers::processors::template::TemplateProcessing::builder()
        .try_single(format!("{b} $A {e}"))
        .and_then(|t| t.try_pair(format!("{b} $A {e} {e} $B {e}")))
        .map_err(tk_err)?
        .special_tokens(if bos.0 == eos.0 { vec![bos] } else { vec![bos, eos] })
        .build()
        .map_err(|x| tk_err(x.to_string()))?;
    let mut inner = tokenizer.inner().clone();
    inner.with_post_processor(Some(post));
    Ok(Tokenizer::from_tokenizers(inner))
}

pub(super) fn load(path: &Path, device: &Device) -> Result<Encoder> {
    let bad = |msg: String| Error::bad_file(path, msg);
    let src = WeightSource::gguf(path, device.clone())?;
    let (content, _) = src.gguf_content().expect("a GGUF source");
    let md = GgufMeta { md: &content.metadata, path };
    let arch = md.string("general.architecture")?;
    if arch != "bert" && arch != "nomic-bert" {
        return Err(bad(format!("architecture `{arch}` is not an encoder this loader reads from GGUF (bert, nomic-bert)")));
    }
    let model = md.string_opt("tokenizer.ggml.model")?.unwrap_or_default();
    if !matches!(model.as_str(), "bert" | "gpt2" | "t5") {
        return Err(bad(format!("a `{arch}` GGUF with a `{model}` tokenizer is not supported (bert, gpt2, t5)")));
    }
    if md.bool_opt(&format!("{arch}.attention.causal"))? == Some(true) {
        return Err(bad(format!("{arch}.attention.causal is true: an encoder attends both ways")));
    }
    let pooling = match md.u32_opt(&format!("{arch}.pooling_type"))? {
        None | Some(0) | Some(1) => EncoderPooling::Mean,
        Some(2) => EncoderPooling::Cls,
        Some(3) => EncoderPooling::Last,
        Some(4) => {
            return Err(bad("pooling_type 4 (rank): rerankers are not read from GGUF yet; load the cross-encoder's folder instead".into()))
        }
        Some(p) => return Err(bad(format!("{arch}.pooling_type {p} is not one of 0-4"))),
    };
    let need = |k: &str| -> Result<usize> {
        md.usize_opt(&format!("{arch}.{k}"))?.ok_or_else(|| bad(format!("GGUF metadata key `{arch}.{k}` is missing")))
    };
    let (h, layers, heads, inter, ctx) = (
        need("embedding_length")?,
        need("block_count")?,
        need("attention.head_count")?,
        need("feed_forward_length")?,
        need("context_length")?,
    );
    if layers > 256 || h > 65536 || inter > 1 << 20 || ctx > 1 << 20 {
        return Err(bad("the model's sizes are out of range".into()));
    }
    let eps = md.f64_opt(&format!("{arch}.attention.layer_norm_epsilon"))?.unwrap_or(1e-12);
    let mut tokenizer = Tokenizer::from_gguf(&md)?;
    if model != "bert" {
        tokenizer = roberta_template(tokenizer, &md)?;
    }
    let net: Box<dyn Net> = if arch == "nomic-bert" {
        // Tensors under the common NomicBERT names, in f32.
        let mut map: HashMap<String, Tensor> = HashMap::new();
        for (name, info) in &content.tensor_infos {
            let Some(c) = nomic_name(name) else { continue };
            map.insert(c, src.tensor(name, info.shape.dims())?.to_dtype(DType::F32)?);
        }
        let dim0 = |k: &str| map.get(k).map(|t| t.dim(0)).transpose();
        let cfg = NomicConfig {
            vocab: dim0("word.weight")?.ok_or_else(|| bad("tensor `token_embd.weight` is missing".into()))?,
            hidden: h,
            heads,
            layers,
            inner: inter,
            max_positions: ctx,
            type_vocab: dim0("types.weight")?.ok_or_else(|| bad("tensor `token_types.weight` is missing".into()))?,
            eps,
            theta: md.f64_opt(&format!("{arch}.rope.freq_base"))?.unwrap_or(1000.0),
            pad: md.u32_opt("tokenizer.ggml.padding_token_id")?.unwrap_or(0) as usize,
        };
        Box::new(Nomic::load(&cfg, &Weights { path: path.to_path_buf(), map })?)
    } else {
        Box::new(bert(&src, content, &md, (h, layers, heads, inter, ctx, eps), device)?)
    };
    Ok(Encoder {
        name: path.file_stem().map(|n| n.to_string_lossy().to_string()).unwrap_or_else(|| "encoder".into()),
        net,
        tokenizer,
        pooling,
        normalize: true,
        activation: None,
        pair_types: false,
        device: device.clone(),
    })
}

/// The common NomicBERT name (see [`super::nomic`]) of a llama.cpp `nomic-bert` tensor.
fn nomic_name(gguf: &str) -> Option<String> {
    let (base, suffix) = gguf.rsplit_once('.')?;
    let mapped = match base {
        "token_embd" => "word".to_string(),
        "token_types" => "types".to_string(),
        "token_embd_norm" => "ln".to_string(),
        _ => {
            let (layer, tail) = base.strip_prefix("blk.")?.split_once('.')?;
            let layer: usize = layer.parse().ok()?;
            let part = match tail {
                "attn_qkv" => "qkv",
                "attn_output" => "o",
                "attn_output_norm" => "ln1",
                "ffn_up" => "up",
                "ffn_gate" => "gate",
                "ffn_down" => "down",
                "layer_output_norm" => "ln2",
                _ => return None,
            };
            format!("layers.{layer}.{part}")
        }
    };
    Some(format!("{mapped}.{suffix}"))
}

/// A `bert` GGUF's network (BERT or RoBERTa).
fn bert(
    src: &WeightSource,
    content: &candle_core::quantized::gguf_file::Content,
    md: &GgufMeta<'_>,
    (h, layers, heads, inter, ctx, eps): (usize, usize, usize, usize, usize, f64),
    device: &Device,
) -> Result<Bert> {
    let path = md.path;
    let bad = |msg: String| Error::bad_file(path, msg);
    // Tensors by their HF names, in f32; a fused Q/K/V split into its three thirds.
    let mut map: HashMap<String, Tensor> = HashMap::new();
    let mut names: Vec<&String> = content.tensor_infos.keys().collect();
    names.sort();
    for name in names {
        let Some(hf) = hf_name(name) else { continue };
        let dims = content.tensor_infos[name].shape.dims().to_vec();
        let t = src.tensor(name, &dims)?.to_dtype(DType::F32)?;
        if let Some(prefix) = hf.strip_suffix(".weight").or_else(|| hf.strip_suffix(".bias")).and_then(|p| p.strip_suffix(".qkv")) {
            let suffix = if hf.ends_with(".weight") { "weight" } else { "bias" };
            if t.dim(0)? != 3 * h {
                return Err(bad(format!("tensor `{name}` has shape {dims:?}, expected {} rows", 3 * h)));
            }
            for (i, part) in ["query", "key", "value"].iter().enumerate() {
                map.insert(format!("{prefix}.{part}.{suffix}"), t.narrow(0, i * h, h)?.contiguous()?);
            }
        } else {
            map.insert(hf, t);
        }
    }
    let vocab = map
        .get("embeddings.word_embeddings.weight")
        .map(|t| t.dim(0))
        .transpose()?
        .ok_or_else(|| bad("tensor `token_embd.weight` is missing".into()))?;
    let types = match map.get("embeddings.token_type_embeddings.weight") {
        Some(t) => t.dim(0)?,
        None => {
            // llama.cpp adds type 0's row only when the file has one.
            map.insert("embeddings.token_type_embeddings.weight".into(), Tensor::zeros((1, h), DType::F32, device)?);
            1
        }
    };
    let cfg = BertConfig {
        model_type: Some("bert".into()),
        vocab_size: vocab,
        hidden_size: h,
        num_hidden_layers: layers,
        num_attention_heads: heads,
        intermediate_size: inter,
        max_position_embeddings: ctx,
        type_vocab_size: types,
        layer_norm_eps: eps,
        hidden_act: "gelu".into(),
        pad_token_id: md.u32_opt("tokenizer.ggml.padding_token_id")?.map(|p| p as usize),
        architectures: Vec::new(),
    };
    Bert::load(&cfg, &Weights { path: path.to_path_buf(), map })
}
