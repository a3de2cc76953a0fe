//! Encoder models for embeddings: BERT, RoBERTa and XLM-RoBERTa (the same network; RoBERTa's positions
//! start after the padding id and it has one token type) from a sentence-transformers folder — `config.json`, `model.safetensors`,
//! `tokenizer.json`, and the pooling of `modules.json` + `1_Pooling/config.json` (CLS, mean, max or
//! last token; `Normalize` when listed). Bidirectional attention over each padded batch, no KV
//! cache: candle's tensor ops on the CPU (or the device asked for).
//!
//! Cross-encoders (rerankers): a folder whose `config.json` lists `BertForSequenceClassification`,
//! `RobertaForSequenceClassification` or `XLMRobertaForSequenceClassification` (bge-reranker) with
//! one label scores (query, document) pairs: `[CLS] query [SEP] document [SEP]` (RoBERTa: `<s> query
//! </s></s> document </s>`) as the tokenizer's post-processor builds the pair (token types 0 then 1
//! for BERT, all 0 for a model with one token type), the document cut first when the pair is longer
//! than the positions; BERT's pooler (dense + tanh on the first token's state) and classifier, or
//! RoBERTa's classification head (the same: `classifier.dense` + tanh, `classifier.out_proj`), then
//! sentence-transformers' `CrossEncoder` activation (sigmoid unless the folder configures
//! `Identity`). Such a model has no sentence embeddings.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use serde::Deserialize;

use crate::error::{Error, Result};
use crate::tokenizer::Tokenizer;

#[derive(Debug, Clone, Deserialize)]
struct BertConfig {
    model_type: Option<String>,
    vocab_size: usize,
    hidden_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    intermediate_size: usize,
    max_position_embeddings: usize,
    #[serde(default = "one")]
    type_vocab_size: usize,
    #[serde(default = "eps")]
    layer_norm_eps: f64,
    #[serde(default = "gelu")]
    hidden_act: String,
    #[serde(default)]
    pad_token_id: Option<usize>,
    #[serde(default)]
    architectures: Vec<String>,
}

fn one() -> usize {
    1
}
fn eps() -> f64 {
    1e-12
}
fn gelu() -> String {
    "gelu".into()
}

/// How token states become one vector (sentence-transformers' pooling modes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EncoderPooling {
    Cls,
    Mean,
    Max,
    Last,
}

/// What a cross-encoder's logit goes through to become its relevance score (sentence-transformers'
/// `CrossEncoder.activation_fn`: `Sigmoid` by default for one label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScoreActivation {
    Sigmoid,
    Identity,
}

impl ScoreActivation {
    pub fn apply(self, logit: f32) -> f32 {
        match self {
            Self::Sigmoid => 1.0 / (1.0 + (-logit).exp()),
            Self::Identity => logit,
        }
    }
}

/// `BertForSequenceClassification`'s head: the pooler (dense + tanh on the `[CLS]` state) and the
/// one-label classifier.
struct Classifier {
    pooler: (Tensor, Tensor),
    out: (Tensor, Tensor),
    activation: ScoreActivation,
}

/// A (query, document) pair as the model reads it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EncodedPair {
    pub ids: Vec<u32>,
    pub type_ids: Vec<u32>,
    /// Whether the document was cut to fit.
    pub truncated: bool,
}

struct Layer {
    q: (Tensor, Tensor),
    k: (Tensor, Tensor),
    v: (Tensor, Tensor),
    o: (Tensor, Tensor),
    ln1: (Tensor, Tensor),
    up: (Tensor, Tensor),
    down: (Tensor, Tensor),
    ln2: (Tensor, Tensor),
}

/// A loaded encoder with its tokenizer and pooling.
pub struct Encoder {
    /// A short display name (the folder's).
    pub name: String,
    cfg: BertConfig,
    word: Tensor,
    position: Tensor,
    token_type: Tensor,
    ln: (Tensor, Tensor),
    layers: Vec<Layer>,
    /// First position id (RoBERTa / XLM-R: padding id + 1).
    position_offset: usize,
    pub tokenizer: Tokenizer,
    pub pooling: EncoderPooling,
    pub normalize: bool,
    /// A cross-encoder's scoring head (then the model reranks and has no embeddings).
    classifier: Option<Classifier>,
    device: Device,
}

fn linear(x: &Tensor, (w, b): &(Tensor, Tensor)) -> Result<Tensor> {
    Ok(x.broadcast_matmul(&w.t()?)?.broadcast_add(b)?)
}

fn layer_norm(x: &Tensor, (w, b): &(Tensor, Tensor), eps: f64) -> Result<Tensor> {
    Ok(candle_nn::ops::layer_norm(&x.contiguous()?, w, b, eps as f32)?)
}

/// Whether `dir` holds an encoder this module loads (`config.json` of a BERT-family model).
pub fn is_encoder(dir: &Path) -> bool {
    let Ok(text) = std::fs::read_to_string(dir.join("config.json")) else { return false };
    let Ok(v) = serde_json::from_str::<serde_json::Value>(&text) else { return false };
    matches!(v.get("model_type").and_then(|m| m.as_str()), Some("bert" | "roberta" | "xlm-roberta"))
}

/// Encoder families verified against sentence-transformers.
fn verified(kind: &str) -> bool {
    matches!(kind, "bert" | "roberta" | "xlm-roberta")
}

impl Encoder {
    /// Loads a sentence-transformers (or plain transformers) BERT-family folder.
    pub fn load(dir: &Path, device: &Device) -> Result<Self> {
        let bad = |msg: String| Error::bad_file(dir, msg);
        let cfg_path = dir.join("config.json");
        let text = std::fs::read_to_string(&cfg_path).map_err(|e| Error::io(&cfg_path, e))?;
        let cfg: BertConfig = serde_json::from_str(&text).map_err(|e| Error::bad_file(&cfg_path, e.to_string()))?;
        let kind = cfg.model_type.clone().unwrap_or_default();
        if !verified(&kind) {
            return Err(bad(format!("model_type `{kind}` is not an encoder this loader supports yet (bert, roberta, xlm-roberta)")));
        }
        if cfg.hidden_size == 0 || cfg.num_attention_heads == 0 || !cfg.hidden_size.is_multiple_of(cfg.num_attention_heads) {
            return Err(bad(format!(
                "hidden_size {} is not a multiple of num_attention_heads {}",
                cfg.hidden_size, cfg.num_attention_heads
            )));
        }
        if cfg.num_hidden_layers > 256 || cfg.hidden_size > 65536 || cfg.intermediate_size > 1 << 20 {
            return Err(bad("the config's sizes are out of range".into()));
        }
        if cfg.hidden_act != "gelu" {
            return Err(bad(format!("hidden_act `{}` is not supported (gelu)", cfg.hidden_act)));
        }
        let weights_path = dir.join("model.safetensors");
        let raw = candle_core::safetensors::load(&weights_path, device).map_err(|e| Error::bad_file(&weights_path, e.to_string()))?;
        // Names with or without the `bert.` / `roberta.` prefix of the task heads' checkpoints.
        let mut w: HashMap<String, Tensor> = HashMap::new();
        for (k, v) in raw {
            let k = k.strip_prefix("bert.").or_else(|| k.strip_prefix("roberta.")).unwrap_or(&k).to_string();
            w.insert(k, v.to_dtype(DType::F32)?);
        }
        let h = cfg.hidden_size;
        let get = |name: &str, shape: &[usize]| -> Result<Tensor> {
            let t = w.get(name).ok_or_else(|| bad(format!("tensor `{name}` is missing")))?;
            if t.dims() != shape {
                return Err(bad(format!("tensor `{name}` has shape {:?}, expected {shape:?}", t.dims())));
            }
            Ok(t.clone())
        };
        let pair = |p: &str, out: usize, inp: Option<usize>| -> Result<(Tensor, Tensor)> {
            let wt = match inp {
                Some(i) => get(&format!("{p}.weight"), &[out, i])?,
                None => get(&format!("{p}.weight"), &[out])?,
            };
            Ok((wt, get(&format!("{p}.bias"), &[out])?))
        };
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        for i in 0..cfg.num_hidden_layers {
            let p = format!("encoder.layer.{i}");
            layers.push(Layer {
                q: pair(&format!("{p}.attention.self.query"), h, Some(h))?,
                k: pair(&format!("{p}.attention.self.key"), h, Some(h))?,
                v: pair(&format!("{p}.attention.self.value"), h, Some(h))?,
                o: pair(&format!("{p}.attention.output.dense"), h, Some(h))?,
                ln1: pair(&format!("{p}.attention.output.LayerNorm"), h, None)?,
                up: pair(&format!("{p}.intermediate.dense"), cfg.intermediate_size, Some(h))?,
                down: pair(&format!("{p}.output.dense"), h, Some(cfg.intermediate_size))?,
                ln2: pair(&format!("{p}.output.LayerNorm"), h, None)?,
            });
        }
        let bert_head = cfg.architectures.iter().any(|a| a == "BertForSequenceClassification");
        let roberta_head = cfg
            .architectures
            .iter()
            .any(|a| matches!(a.as_str(), "RobertaForSequenceClassification" | "XLMRobertaForSequenceClassification"));
        // (pooling dense layer, one-label output layer): BERT's pooler + classifier, RoBERTa's head.
        let (dense, out) = if roberta_head { ("classifier.dense", "classifier.out_proj") } else { ("pooler.dense", "classifier") };
        let classifier = if bert_head || roberta_head {
            let labels = w.get(&format!("{out}.weight")).map(|t| t.dims().to_vec()).unwrap_or_default();
            match labels.as_slice() {
                [1, _] => {}
                [n, _] => {
                    return Err(bad(format!(
                        "this sequence classifier has {n} labels; reranking needs a one-label (relevance logit) cross-encoder"
                    )))
                }
                _ => {}
            }
            Some(Classifier { pooler: pair(dense, h, Some(h))?, out: pair(out, 1, Some(h))?, activation: score_activation(dir)? })
        } else {
            None
        };
        let tok_path = dir.join("tokenizer.json");
        let mut tokenizer = Tokenizer::from_file(&tok_path)?;
        if classifier.is_some() {
            // Pairs are cut here (the document first); the file's own truncation or padding would
            // change the inputs behind our back.
            let mut inner = tokenizer.inner().clone();
            inner.with_truncation(None).map_err(|e| Error::bad_file(&tok_path, e.to_string()))?;
            inner.with_padding(None);
            if inner.get_post_processor().is_none() {
                return Err(Error::bad_file(
                    &tok_path,
                    "a cross-encoder's tokenizer needs a post-processor that builds the [CLS] query [SEP] document [SEP] pair",
                ));
            }
            tokenizer = Tokenizer::from_tokenizers(inner);
        }
        let (pooling, normalize) = pooling_config(dir)?;
        let position_offset = if kind == "bert" { 0 } else { cfg.pad_token_id.unwrap_or(1) + 1 };
        Ok(Self {
            name: dir.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_else(|| "encoder".into()),
            word: get("embeddings.word_embeddings.weight", &[cfg.vocab_size, h])?,
            position: get("embeddings.position_embeddings.weight", &[cfg.max_position_embeddings, h])?,
            token_type: get("embeddings.token_type_embeddings.weight", &[cfg.type_vocab_size, h])?,
            ln: pair("embeddings.LayerNorm", h, None)?,
            layers,
            position_offset,
            tokenizer,
            pooling,
            normalize,
            classifier,
            device: device.clone(),
            cfg,
        })
    }

    /// Most tokens one input may have.
    pub fn max_tokens(&self) -> usize {
        self.cfg.max_position_embeddings.saturating_sub(self.position_offset)
    }

    pub fn hidden_size(&self) -> usize {
        self.cfg.hidden_size
    }

    /// Whether this is a cross-encoder (scores pairs, has no embeddings).
    pub fn reranks(&self) -> bool {
        self.classifier.is_some()
    }

    /// A cross-encoder's logit → relevance score.
    pub fn score_activation(&self) -> Option<ScoreActivation> {
        self.classifier.as_ref().map(|c| c.activation)
    }

    /// The query's tokens without special tokens (encode it once for many documents).
    pub fn encode_query(&self, query: &str) -> Result<tokenizers::Encoding> {
        self.tokenizer.inner().encode_fast(query, false).map_err(|e| Error::Tokenizer(e.to_string()))
    }

    /// `[CLS] query [SEP] document [SEP]` (the tokenizer's pair template, token types 0 then 1),
    /// the document cut to `max_doc_tokens` and then to what the positions leave. A query that leaves
    /// no room for one document token is an error naming `query`.
    pub fn encode_pair(&self, query: &tokenizers::Encoding, document: &str, max_doc_tokens: Option<usize>) -> Result<EncodedPair> {
        let tk = self.tokenizer.inner();
        let added = tk.get_post_processor().map_or(0, |p| tokenizers::PostProcessor::added_tokens(p, true));
        let room = self.max_tokens().saturating_sub(query.len() + added);
        if room == 0 {
            return Err(Error::param(
                "query",
                format!("{} tokens leave no room for a document in this model's {} positions", query.len(), self.max_tokens()),
            ));
        }
        let room = max_doc_tokens.map_or(room, |m| m.min(room));
        let mut doc = tk.encode_fast(document, false).map_err(|e| Error::Tokenizer(e.to_string()))?;
        let truncated = doc.len() > room;
        if truncated {
            doc.truncate(room, 0, tokenizers::TruncationDirection::Right);
            doc.take_overflowing();
        }
        let enc = tk.post_process(query.clone(), Some(doc), true).map_err(|e| Error::Tokenizer(e.to_string()))?;
        // A model with one token type (RoBERTa) sees 0 everywhere, whatever the template says.
        let type_ids = if self.cfg.type_vocab_size <= 1 { vec![0; enc.len()] } else { enc.get_type_ids().to_vec() };
        Ok(EncodedPair { ids: enc.get_ids().to_vec(), type_ids, truncated })
    }

    /// A cross-encoder's relevance score of each document for the query (the activation of
    /// [`logits`](Self::logits)).
    pub fn rerank(&self, query: &str, documents: &[String]) -> Result<Vec<f32>> {
        let act = self.score_activation().ok_or_else(|| self.not_a_reranker())?;
        let q = self.encode_query(query)?;
        let pairs = documents.iter().map(|d| self.encode_pair(&q, d, None)).collect::<Result<Vec<_>>>()?;
        Ok(self.logits(&pairs)?.into_iter().map(|l| act.apply(l)).collect())
    }

    fn not_a_reranker(&self) -> Error {
        Error::param(
            "model",
            format!("`{}` is not a cross-encoder (a one-label BERT/RoBERTa/XLM-R sequence classifier): it cannot rerank", self.name),
        )
    }

    /// A cross-encoder's raw logit of each pair, 16 pairs per batch (by length, so a batch pads little).
    pub fn logits(&self, pairs: &[EncodedPair]) -> Result<Vec<f32>> {
        let head = self.classifier.as_ref().ok_or_else(|| self.not_a_reranker())?;
        let mut order: Vec<usize> = (0..pairs.len()).collect();
        order.sort_by_key(|&i| pairs[i].ids.len());
        let mut out = vec![0f32; pairs.len()];
        for chunk in order.chunks(16) {
            let ids: Vec<Vec<u32>> = chunk.iter().map(|&i| pairs[i].ids.clone()).collect();
            let types: Vec<Vec<u32>> = chunk.iter().map(|&i| pairs[i].type_ids.clone()).collect();
            let x = self.hidden(&ids, Some(&types))?;
            let cls = x.narrow(1, 0, 1)?.squeeze(1)?;
            let pooled = linear(&cls, &head.pooler)?.tanh()?;
            let logits: Vec<Vec<f32>> = linear(&pooled, &head.out)?.to_vec2()?;
            for (&i, l) in chunk.iter().zip(logits) {
                out[i] = l[0];
            }
        }
        Ok(out)
    }

    /// The pooled (and, as configured, normalized) vector of each text.
    pub fn embed_texts(&self, texts: &[String]) -> Result<Vec<Vec<f32>>> {
        let ids = texts.iter().map(|t| self.tokenizer.encode(t, true)).collect::<Result<Vec<_>>>()?;
        self.embed_ids(&ids)
    }

    /// [`embed_texts`](Self::embed_texts) of token ids (with their special tokens), 16 per batch.
    pub fn embed_ids(&self, inputs: &[Vec<u32>]) -> Result<Vec<Vec<f32>>> {
        if self.reranks() {
            return Err(Error::param(
                "model",
                format!("`{}` is a cross-encoder (a reranker): it scores query-document pairs and has no embeddings", self.name),
            ));
        }
        let mut out = Vec::with_capacity(inputs.len());
        for chunk in inputs.chunks(16) {
            out.extend(self.batch(chunk)?);
        }
        Ok(out)
    }

    fn batch(&self, inputs: &[Vec<u32>]) -> Result<Vec<Vec<f32>>> {
        let x = self.hidden(inputs, None)?;
        let mut out = Vec::with_capacity(inputs.len());
        for (i, t) in inputs.iter().enumerate() {
            let n = t.len();
            let states = x.get(i)?.narrow(0, 0, n)?;
            let v = match self.pooling {
                EncoderPooling::Cls => states.get(0)?,
                EncoderPooling::Last => states.get(n - 1)?,
                EncoderPooling::Mean => states.mean(0)?,
                EncoderPooling::Max => states.max(0)?,
            };
            let mut v: Vec<f32> = v.to_vec1()?;
            if self.normalize {
                let norm = v.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt() as f32;
                if norm > 0.0 {
                    v.iter_mut().for_each(|x| *x /= norm);
                }
            }
            out.push(v);
        }
        Ok(out)
    }

    /// The last hidden states `[batch, longest, hidden]` of a padded batch; token types 0 unless given.
    fn hidden(&self, inputs: &[Vec<u32>], type_ids: Option<&[Vec<u32>]>) -> Result<Tensor> {
        let (h, heads) = (self.cfg.hidden_size, self.cfg.num_attention_heads);
        let hd = h / heads;
        let len = inputs.iter().map(Vec::len).max().unwrap_or(0);
        for (i, t) in inputs.iter().enumerate() {
            if t.is_empty() {
                return Err(Error::param("input", format!("input {i} is empty")));
            }
            if t.len() > self.max_tokens() {
                return Err(Error::ContextOverflow { needed: t.len(), limit: self.max_tokens() });
            }
            if let Some(&bad) = t.iter().find(|&&x| x as usize >= self.cfg.vocab_size) {
                return Err(Error::param("input", format!("token id {bad} is outside the vocabulary (size {})", self.cfg.vocab_size)));
            }
            if let Some(types) = type_ids {
                let ty = types.get(i).filter(|ty| ty.len() == t.len());
                let ty = ty.ok_or_else(|| Error::param("input", format!("input {i} has no token type for each token")))?;
                if let Some(&bad) = ty.iter().find(|&&x| x as usize >= self.cfg.type_vocab_size) {
                    return Err(Error::Model(format!("token type {bad} is outside the model's {} types", self.cfg.type_vocab_size)));
                }
            }
        }
        let b = inputs.len();
        let pad = self.cfg.pad_token_id.unwrap_or(0) as u32;
        let mut ids = Vec::with_capacity(b * len);
        let mut mask = Vec::with_capacity(b * len);
        for t in inputs {
            ids.extend(t.iter().copied().chain(std::iter::repeat_n(pad, len - t.len())));
            mask.extend((0..len).map(|j| if j < t.len() { 1f32 } else { 0.0 }));
        }
        let dev = &self.device;
        let ids = Tensor::from_vec(ids, (b, len), dev)?;
        let mask = Tensor::from_vec(mask, (b, len), dev)?;
        let positions: Vec<u32> = (0..len as u32).map(|p| p + self.position_offset as u32).collect();
        let pos = Tensor::from_vec(positions, len, dev)?;
        let x = self.word.embedding(&ids.flatten_all()?)?.reshape((b, len, h))?;
        let x = x.broadcast_add(&self.position.embedding(&pos)?)?;
        let x = match type_ids {
            None => x.broadcast_add(&self.token_type.get(0)?)?,
            Some(types) => {
                let mut flat = Vec::with_capacity(b * len);
                for ty in types {
                    flat.extend(ty.iter().copied().chain(std::iter::repeat_n(0, len - ty.len())));
                }
                let types = Tensor::from_vec(flat, b * len, dev)?;
                (x + self.token_type.embedding(&types)?.reshape((b, len, h))?)?
            }
        };
        let mut x = layer_norm(&x, &self.ln, self.cfg.layer_norm_eps)?;
        // Padding keys get -1e9 before the softmax: [b, 1, 1, len].
        let bias = ((mask.clone() - 1.0)? * 1e9)?.reshape((b, 1, 1, len))?;
        let scale = 1.0 / (hd as f64).sqrt();
        for l in &self.layers {
            let split = |t: Tensor| -> Result<Tensor> { Ok(t.reshape((b, len, heads, hd))?.transpose(1, 2)?.contiguous()?) };
            let q = split(linear(&x, &l.q)?)?;
            let k = split(linear(&x, &l.k)?)?;
            let v = split(linear(&x, &l.v)?)?;
            let s = (q.matmul(&k.t()?.contiguous()?)? * scale)?.broadcast_add(&bias)?;
            let p = candle_nn::ops::softmax_last_dim(&s)?;
            let a = p.matmul(&v)?.transpose(1, 2)?.contiguous()?.reshape((b, len, h))?;
            x = layer_norm(&(linear(&a, &l.o)? + &x)?, &l.ln1, self.cfg.layer_norm_eps)?;
            let m = linear(&linear(&x, &l.up)?.gelu_erf()?, &l.down)?;
            x = layer_norm(&(m + &x)?, &l.ln2, self.cfg.layer_norm_eps)?;
        }
        Ok(x)
    }
}

/// sentence-transformers' pooling (`1_Pooling/config.json`, else mean) and whether `modules.json`
/// lists a `Normalize` module.
fn pooling_config(dir: &Path) -> Result<(EncoderPooling, bool)> {
    let modules: Vec<serde_json::Value> = match std::fs::read_to_string(dir.join("modules.json")) {
        Ok(text) => serde_json::from_str(&text).map_err(|e| Error::bad_file(&dir.join("modules.json"), e.to_string()))?,
        Err(_) => Vec::new(),
    };
    let normalize = modules.iter().any(|m| m.get("type").and_then(|t| t.as_str()).is_some_and(|t| t.ends_with("Normalize")));
    let pool_dir = modules
        .iter()
        .find(|m| m.get("type").and_then(|t| t.as_str()).is_some_and(|t| t.ends_with("Pooling")))
        .and_then(|m| m.get("path").and_then(|p| p.as_str()))
        .unwrap_or("1_Pooling");
    if pool_dir.contains("..") || pool_dir.starts_with('/') {
        return Err(Error::bad_file(&dir.join("modules.json"), format!("pooling path `{pool_dir}` leaves the model folder")));
    }
    let path = dir.join(pool_dir).join("config.json");
    let cfg: serde_json::Value = match std::fs::read_to_string(&path) {
        Ok(text) => serde_json::from_str(&text).map_err(|e| Error::bad_file(&path, e.to_string()))?,
        Err(_) => return Ok((EncoderPooling::Mean, normalize)),
    };
    let on = |k: &str| cfg.get(k).and_then(|v| v.as_bool()) == Some(true);
    let pooling = if on("pooling_mode_cls_token") {
        EncoderPooling::Cls
    } else if on("pooling_mode_lasttoken") {
        EncoderPooling::Last
    } else if on("pooling_mode_max_tokens") {
        EncoderPooling::Max
    } else {
        EncoderPooling::Mean
    };
    Ok((pooling, normalize))
}

/// sentence-transformers' `CrossEncoder` activation: `activation_fn` of
/// `config_sentence_transformers.json` (v5+), else `sentence_transformers.activation_fn` or the older
/// `sbert_ce_default_activation_function` of `config.json`, else sigmoid (its default for one label).
fn score_activation(dir: &Path) -> Result<ScoreActivation> {
    let read = |name: &str| -> Result<Option<serde_json::Value>> {
        let path = dir.join(name);
        match std::fs::read_to_string(&path) {
            Ok(text) => Ok(Some(serde_json::from_str(&text).map_err(|e| Error::bad_file(&path, e.to_string()))?)),
            Err(_) => Ok(None),
        }
    };
    let st = read("config_sentence_transformers.json")?;
    let cfg = read("config.json")?;
    let name = st
        .as_ref()
        .and_then(|v| v.get("activation_fn"))
        .or_else(|| cfg.as_ref().and_then(|v| v.get("sentence_transformers")).and_then(|v| v.get("activation_fn")))
        .or_else(|| cfg.as_ref().and_then(|v| v.get("sbert_ce_default_activation_function")))
        .and_then(|v| v.as_str());
    match name {
        None => Ok(ScoreActivation::Sigmoid),
        Some(n) if n.ends_with(".Sigmoid") || n == "Sigmoid" => Ok(ScoreActivation::Sigmoid),
        Some(n) if n.ends_with(".Identity") || n == "Identity" => Ok(ScoreActivation::Identity),
        Some(n) => Err(Error::bad_file(dir, format!("the cross-encoder's activation `{n}` is not supported (Sigmoid or Identity)"))),
    }
}
