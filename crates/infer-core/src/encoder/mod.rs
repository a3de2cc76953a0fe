//! Encoder models for embeddings from a sentence-transformers folder — `config.json`,
//! `model.safetensors`, `tokenizer.json`, and the pooling of `modules.json` + `1_Pooling/config.json`
//! (CLS, mean, max or last token; `Normalize` when listed). The networks, one short file each:
//! [`bert`] (BERT, RoBERTa and XLM-RoBERTa: the same network; RoBERTa's positions start after the
//! padding id and it has one token type) and [`modernbert`] (RoPE, alternating global and local
//! attention, GLU, long inputs) and [`nomic`] (NomicBERT: RoPE, SwiGLU); [`gguf`] reads BERT, RoBERTa and
//! NomicBERT from GGUF as llama.cpp writes them. Bidirectional attention over each padded batch (inputs sorted by
//! length, at most 16 and 8192 positions per batch; scores in query chunks of at most 64 MiB), no KV
//! cache: candle's tensor ops on the CPU (or the device asked for).
//!
//! Cross-encoders (rerankers): a folder whose `config.json` lists `BertForSequenceClassification`,
//! `RobertaForSequenceClassification`, `XLMRobertaForSequenceClassification` (bge-reranker) or
//! `ModernBertForSequenceClassification` (gte-reranker-modernbert) with
//! one label scores (query, document) pairs: `[CLS] query [SEP] document [SEP]` (RoBERTa: `<s> query
//! </s></s> document </s>`) as the tokenizer's post-processor builds the pair (token types 0 then 1
//! for BERT, all 0 for a model with one token type), the document cut first when the pair is longer
//! than the positions; BERT's pooler (dense + tanh on the first token's state) and classifier, or
//! RoBERTa's classification head (the same: `classifier.dense` + tanh, `classifier.out_proj`), or
//! `ModernBertForSequenceClassification`'s (CLS or mean pooling, dense + GELU + LayerNorm), then
//! sentence-transformers' `CrossEncoder` activation (sigmoid unless the folder configures
//! `Identity`). Such a model has no sentence embeddings.

mod bert;
mod gguf;
mod modernbert;
mod nomic;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};

use crate::error::{Error, Result};
use crate::tokenizer::Tokenizer;

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

/// A (query, document) pair as the model reads it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EncodedPair {
    pub ids: Vec<u32>,
    pub type_ids: Vec<u32>,
    /// Whether the document was cut to fit.
    pub truncated: bool,
}

/// What the shared code needs to know of a network.
struct Dims {
    vocab: usize,
    hidden: usize,
    heads: usize,
    /// Most tokens one input may have.
    max_tokens: usize,
    /// Token types the network has (1: everything is type 0).
    type_vocab: usize,
    /// The id padding positions get (masked out of attention and pooling).
    pad: u32,
}

/// One padded batch of inputs.
struct Batch {
    b: usize,
    /// Longest input's tokens.
    len: usize,
    ids: Tensor,           // [b, len] u32, padded with `Dims::pad`
    types: Option<Tensor>, // [b, len] u32, padded with 0
    mask: Tensor,          // [b, len] f32: 1 for a token, 0 for padding
    pad_bias: Tensor,      // [b, 1, 1, len] f32: 0 for a token, -1e9 for padding (added to attention scores)
}

/// An encoder network: token states of a padded batch and, for a cross-encoder, its one-label logits.
trait Net: Send + Sync {
    fn dims(&self) -> &Dims;
    /// Whether it has a sequence-classification head (then it reranks and has no embeddings).
    fn reranks(&self) -> bool;
    /// The last hidden states [b, len, hidden].
    fn hidden(&self, batch: &Batch) -> Result<Tensor>;
    /// The head's logit of each input [b] from [`hidden`](Self::hidden)'s states; `None` without a head.
    fn logits(&self, x: &Tensor, batch: &Batch) -> Result<Option<Tensor>>;
}

/// Activation functions by transformers' `ACT2FN` names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Act {
    GeluErf,
    GeluTanh,
    Silu,
    Relu,
}

impl Act {
    fn parse(name: &str) -> Option<Self> {
        match name {
            "gelu" => Some(Self::GeluErf),
            "gelu_new" | "gelu_pytorch_tanh" => Some(Self::GeluTanh),
            "silu" | "swish" => Some(Self::Silu),
            "relu" => Some(Self::Relu),
            _ => None,
        }
    }

    fn apply(self, x: &Tensor) -> Result<Tensor> {
        Ok(match self {
            Self::GeluErf => x.gelu_erf()?,
            Self::GeluTanh => x.gelu()?,
            Self::Silu => x.silu()?,
            Self::Relu => x.relu()?,
        })
    }
}

/// `x · wᵀ (+ b)`: x [.., in], w [out, in], b [out].
fn linear(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
    let y = x.broadcast_matmul(&w.t()?)?;
    Ok(match b {
        Some(b) => y.broadcast_add(b)?,
        None => y,
    })
}

/// LayerNorm over the last dimension, without a bias when there is none.
fn layer_norm(x: &Tensor, w: &Tensor, b: Option<&Tensor>, eps: f64) -> Result<Tensor> {
    let zeros;
    let b = match b {
        Some(b) => b,
        None => {
            zeros = w.zeros_like()?;
            &zeros
        }
    };
    Ok(candle_nn::ops::layer_norm(&x.contiguous()?, w, b, eps as f32)?)
}

/// Plain RoPE (rotate-half form, no scaling) of an encoder: the inverse frequencies of a head size
/// and base, and the cos/sin tables of positions 0..len for `candle_nn::rotary_emb::rope`. (The
/// decoders' [`crate::models`] RoPE carries their scaling variants and caches; encoders need none.)
struct Rope {
    inv_freq: Vec<f32>, // [hd / 2]
}

impl Rope {
    fn new(theta: f64, head_dim: usize) -> Self {
        Self { inv_freq: (0..head_dim / 2).map(|i| (1.0 / theta.powf(2.0 * i as f64 / head_dim as f64)) as f32).collect() }
    }

    /// cos and sin [len, hd / 2].
    fn tables(&self, len: usize, dev: &Device) -> Result<(Tensor, Tensor)> {
        let half = self.inv_freq.len();
        let (mut cos, mut sin) = (Vec::with_capacity(len * half), Vec::with_capacity(len * half));
        for p in 0..len {
            for &f in &self.inv_freq {
                let a = p as f32 * f;
                cos.push(a.cos());
                sin.push(a.sin());
            }
        }
        Ok((Tensor::from_vec(cos, (len, half), dev)?, Tensor::from_vec(sin, (len, half), dev)?))
    }
}

/// Scores of this many f32 values at most are held at once (64 MiB): attention runs in query chunks.
const SCORE_BUDGET: usize = 16 << 20;

/// Bidirectional softmax attention of q, k, v [b, heads, len, hd] → [b, heads, len, hd]: `pad_bias`
/// [b, 1, 1, len] added to every score, and with `window = Some(w)` only keys with `|i - j| <= w` seen.
/// Runs in chunks of queries so that a long input never holds its whole [len, len] score matrix.
fn attention(q: &Tensor, k: &Tensor, v: &Tensor, pad_bias: &Tensor, window: Option<usize>, scale: f64) -> Result<Tensor> {
    attention_within(q, k, v, pad_bias, window, scale, SCORE_BUDGET)
}

fn attention_within(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    pad_bias: &Tensor,
    window: Option<usize>,
    scale: f64,
    budget: usize,
) -> Result<Tensor> {
    let (b, heads, len, _) = q.dims4()?;
    let kt = k.t()?.contiguous()?; // [b, heads, hd, len]
    let chunk = (budget / (b * heads * len).max(1)).clamp(1, len.max(1));
    let mut out = Vec::with_capacity(len.div_ceil(chunk));
    let mut start = 0;
    while start < len {
        let n = chunk.min(len - start);
        let qc = q.narrow(2, start, n)?;
        let mut s = (qc.matmul(&kt)? * scale)?.broadcast_add(pad_bias)?; // [b, heads, n, len]
        if let Some(w) = window {
            let bias: Vec<f32> =
                (start..start + n).flat_map(|i| (0..len).map(move |j| if i.abs_diff(j) <= w { 0.0 } else { -1e9 })).collect();
            s = s.broadcast_add(&Tensor::from_vec(bias, (1, 1, n, len), q.device())?)?;
        }
        out.push(candle_nn::ops::softmax_last_dim(&s)?.matmul(v)?);
        start += n;
    }
    if out.len() == 1 {
        return Ok(out.pop().expect("one chunk"));
    }
    Ok(Tensor::cat(&out, 2)?)
}

/// A checkpoint's tensors by name (without the `bert.` / `roberta.` / `model.` prefix of task-head
/// checkpoints), in f32, with shape-checked lookups that name the file.
struct Weights {
    path: PathBuf,
    map: HashMap<String, Tensor>,
}

impl Weights {
    fn load(path: &Path, device: &Device) -> Result<Self> {
        let raw = candle_core::safetensors::load(path, device).map_err(|e| Error::bad_file(path, e.to_string()))?;
        let mut map = HashMap::with_capacity(raw.len());
        for (k, v) in raw {
            let k = ["bert.", "roberta.", "model."].iter().find_map(|p| k.strip_prefix(p)).unwrap_or(&k).to_string();
            map.insert(k, v.to_dtype(DType::F32)?);
        }
        Ok(Self { path: path.to_path_buf(), map })
    }

    fn bad(&self, msg: impl Into<String>) -> Error {
        Error::bad_file(&self.path, msg)
    }

    fn get(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        let t = self.map.get(name).ok_or_else(|| self.bad(format!("tensor `{name}` is missing")))?;
        if t.dims() != shape {
            return Err(self.bad(format!("tensor `{name}` has shape {:?}, expected {shape:?}", t.dims())));
        }
        Ok(t.clone())
    }

    /// `{p}.weight` ([out, inp], or [out] for a norm) and `{p}.bias` [out].
    fn pair(&self, p: &str, out: usize, inp: Option<usize>) -> Result<(Tensor, Tensor)> {
        let (w, b) = self.maybe_bias(p, out, inp, true)?;
        Ok((w, b.expect("asked for a bias")))
    }

    /// `{p}.weight`, and `{p}.bias` when the config says the layer has one.
    fn maybe_bias(&self, p: &str, out: usize, inp: Option<usize>, bias: bool) -> Result<(Tensor, Option<Tensor>)> {
        let w = match inp {
            Some(i) => self.get(&format!("{p}.weight"), &[out, i])?,
            None => self.get(&format!("{p}.weight"), &[out])?,
        };
        Ok((w, if bias { Some(self.get(&format!("{p}.bias"), &[out])?) } else { None }))
    }

    /// A sequence classifier's output layer must have one label (the relevance logit).
    fn one_label(&self, name: &str) -> Result<()> {
        match self.map.get(name).map(|t| t.dims().to_vec()).as_deref() {
            Some([n, _]) if *n != 1 => {
                Err(self
                    .bad(format!("this sequence classifier has {n} labels; reranking needs a one-label (relevance logit) cross-encoder")))
            }
            _ => Ok(()),
        }
    }
}

/// A loaded encoder with its tokenizer and pooling.
pub struct Encoder {
    /// A short display name (the folder's).
    pub name: String,
    net: Box<dyn Net>,
    pub tokenizer: Tokenizer,
    pub pooling: EncoderPooling,
    pub normalize: bool,
    /// A cross-encoder's logit → score (then the model reranks and has no embeddings).
    activation: Option<ScoreActivation>,
    /// Whether the tokenizer hands the model token types (transformers' `model_input_names` has
    /// `token_type_ids`): else a pair's second part is type 0 too, as transformers runs it.
    pair_types: bool,
    device: Device,
}

/// Encoder families this module loads, by `config.json`'s `model_type`.
const FAMILIES: &[&str] = &["bert", "roberta", "xlm-roberta", "modernbert", "nomic_bert"];

/// Whether `path` holds an encoder this module loads: a folder whose `config.json` names a
/// BERT-family model, or a GGUF file of architecture `bert`.
pub fn is_encoder(path: &Path) -> bool {
    if path.is_file() {
        return gguf::is_bert_gguf(path);
    }
    let dir = path;
    let Ok(text) = std::fs::read_to_string(dir.join("config.json")) else { return false };
    let Ok(v) = serde_json::from_str::<serde_json::Value>(&text) else { return false };
    v.get("model_type").and_then(|m| m.as_str()).is_some_and(|m| FAMILIES.contains(&m))
}

/// Inputs of one batch: at most 16, and at most this many positions (inputs × the longest).
const BATCH_TOKENS: usize = 8192;

/// Consecutive runs of `order` (indices sorted by length) that make one batch each.
fn batches(order: &[usize], len: impl Fn(usize) -> usize) -> Vec<&[usize]> {
    let mut out = Vec::new();
    let mut start = 0;
    while start < order.len() {
        let mut end = start + 1;
        // Sorted by length: the last input of a run is its longest.
        while end < order.len() && end - start < 16 && (end - start + 1) * len(order[end]) <= BATCH_TOKENS {
            end += 1;
        }
        out.push(&order[start..end]);
        start = end;
    }
    out
}

impl Encoder {
    /// Loads a sentence-transformers (or plain transformers) encoder folder, or a BERT GGUF file.
    pub fn load(dir: &Path, device: &Device) -> Result<Self> {
        if dir.is_file() {
            return gguf::load(dir, device);
        }
        let cfg_path = dir.join("config.json");
        let text = std::fs::read_to_string(&cfg_path).map_err(|e| Error::io(&cfg_path, e))?;
        let value: serde_json::Value = serde_json::from_str(&text).map_err(|e| Error::bad_file(&cfg_path, e.to_string()))?;
        let kind = value.get("model_type").and_then(|m| m.as_str()).unwrap_or_default().to_string();
        if !FAMILIES.contains(&kind.as_str()) {
            return Err(Error::bad_file(
                dir,
                format!("model_type `{kind}` is not an encoder this loader supports yet ({})", FAMILIES.join(", ")),
            ));
        }
        let mut w = Weights::load(&dir.join("model.safetensors"), device)?;
        let parse_err = |e: serde_json::Error| Error::bad_file(&cfg_path, e.to_string());
        let net: Box<dyn Net> = match kind.as_str() {
            "modernbert" => Box::new(modernbert::ModernBert::load(&serde_json::from_value(value).map_err(parse_err)?, &w)?),
            "nomic_bert" => {
                let cfg = nomic::NomicConfig::from_json(&value, &w)?;
                let mut map: HashMap<String, Tensor> = w.map.drain().filter_map(|(k, t)| Some((nomic::canonical(&k)?, t))).collect();
                nomic::fuse_qkv(&mut map, cfg.layers)?;
                Box::new(nomic::Nomic::load(&cfg, &Weights { path: w.path.clone(), map })?)
            }
            _ => Box::new(bert::Bert::load(&serde_json::from_value(value).map_err(parse_err)?, &w)?),
        };
        drop(w);
        let activation = if net.reranks() { Some(score_activation(dir)?) } else { None };
        let tok_path = dir.join("tokenizer.json");
        let mut tokenizer = Tokenizer::from_file(&tok_path)?;
        if activation.is_some() {
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
        Ok(Self {
            name: dir.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_else(|| "encoder".into()),
            net,
            tokenizer,
            pooling,
            normalize,
            activation,
            pair_types: pair_types(dir),
            device: device.clone(),
        })
    }

    /// Most tokens one input may have.
    pub fn max_tokens(&self) -> usize {
        self.net.dims().max_tokens
    }

    pub fn hidden_size(&self) -> usize {
        self.net.dims().hidden
    }

    /// Whether this is a cross-encoder (scores pairs, has no embeddings).
    pub fn reranks(&self) -> bool {
        self.activation.is_some()
    }

    /// A cross-encoder's logit → relevance score.
    pub fn score_activation(&self) -> Option<ScoreActivation> {
        self.activation
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
        // A model with one token type (RoBERTa, ModernBERT) sees 0 everywhere, whatever the template says.
        let type_ids = if self.net.dims().type_vocab <= 1 || !self.pair_types { vec![0; enc.len()] } else { enc.get_type_ids().to_vec() };
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
            format!(
                "`{}` is not a cross-encoder (a one-label BERT/RoBERTa/XLM-R/ModernBERT sequence classifier): it cannot rerank",
                self.name
            ),
        )
    }

    /// A cross-encoder's raw logit of each pair, batched by length (so a batch pads little).
    pub fn logits(&self, pairs: &[EncodedPair]) -> Result<Vec<f32>> {
        if !self.reranks() {
            return Err(self.not_a_reranker());
        }
        let mut order: Vec<usize> = (0..pairs.len()).collect();
        order.sort_by_key(|&i| pairs[i].ids.len());
        let mut out = vec![0f32; pairs.len()];
        for chunk in batches(&order, |i| pairs[i].ids.len()) {
            let ids: Vec<&[u32]> = chunk.iter().map(|&i| pairs[i].ids.as_slice()).collect();
            let types: Vec<&[u32]> = chunk.iter().map(|&i| pairs[i].type_ids.as_slice()).collect();
            let batch = self.batch(&ids, Some(&types))?;
            let x = self.net.hidden(&batch)?;
            let logits: Vec<f32> = self.net.logits(&x, &batch)?.ok_or_else(|| self.not_a_reranker())?.to_vec1()?;
            for (&i, l) in chunk.iter().zip(logits) {
                out[i] = l;
            }
        }
        Ok(out)
    }

    /// The pooled (and, as configured, normalized) vector of each text.
    pub fn embed_texts(&self, texts: &[String]) -> Result<Vec<Vec<f32>>> {
        let ids = texts.iter().map(|t| self.tokenizer.encode(t, true)).collect::<Result<Vec<_>>>()?;
        self.embed_ids(&ids)
    }

    /// [`embed_texts`](Self::embed_texts) of token ids (with their special tokens), batched by length.
    pub fn embed_ids(&self, inputs: &[Vec<u32>]) -> Result<Vec<Vec<f32>>> {
        if self.reranks() {
            return Err(Error::param(
                "model",
                format!("`{}` is a cross-encoder (a reranker): it scores query-document pairs and has no embeddings", self.name),
            ));
        }
        let mut order: Vec<usize> = (0..inputs.len()).collect();
        order.sort_by_key(|&i| inputs[i].len());
        let mut out = vec![Vec::new(); inputs.len()];
        for chunk in batches(&order, |i| inputs[i].len()) {
            let ids: Vec<&[u32]> = chunk.iter().map(|&i| inputs[i].as_slice()).collect();
            for (&i, v) in chunk.iter().zip(self.pool(&ids)?) {
                out[i] = v;
            }
        }
        Ok(out)
    }

    fn pool(&self, inputs: &[&[u32]]) -> Result<Vec<Vec<f32>>> {
        let batch = self.batch(inputs, None)?;
        let x = self.net.hidden(&batch)?;
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

    /// Checks and pads inputs (and their token types, 0 unless given) into one batch.
    fn batch(&self, inputs: &[&[u32]], type_ids: Option<&[&[u32]]>) -> Result<Batch> {
        let dims = self.net.dims();
        let len = inputs.iter().map(|t| t.len()).max().unwrap_or(0);
        for (i, t) in inputs.iter().enumerate() {
            if t.is_empty() {
                return Err(Error::param("input", format!("input {i} is empty")));
            }
            if t.len() > dims.max_tokens {
                return Err(Error::ContextOverflow { needed: t.len(), limit: dims.max_tokens });
            }
            if let Some(&bad) = t.iter().find(|&&x| x as usize >= dims.vocab) {
                return Err(Error::param("input", format!("token id {bad} is outside the vocabulary (size {})", dims.vocab)));
            }
            if let Some(types) = type_ids {
                let ty = types.get(i).filter(|ty| ty.len() == t.len());
                let ty = ty.ok_or_else(|| Error::param("input", format!("input {i} has no token type for each token")))?;
                if let Some(&bad) = ty.iter().find(|&&x| x as usize >= dims.type_vocab.max(1)) {
                    return Err(Error::Model(format!("token type {bad} is outside the model's {} types", dims.type_vocab)));
                }
            }
        }
        let b = inputs.len();
        let mut ids = Vec::with_capacity(b * len);
        let mut mask = Vec::with_capacity(b * len);
        for t in inputs {
            ids.extend(t.iter().copied().chain(std::iter::repeat_n(dims.pad, len - t.len())));
            mask.extend((0..len).map(|j| if j < t.len() { 1f32 } else { 0.0 }));
        }
        let dev = &self.device;
        let types = match type_ids {
            Some(types) if dims.type_vocab > 1 => {
                let mut flat = Vec::with_capacity(b * len);
                for ty in types {
                    flat.extend(ty.iter().copied().chain(std::iter::repeat_n(0, len - ty.len())));
                }
                Some(Tensor::from_vec(flat, (b, len), dev)?)
            }
            _ => None,
        };
        let mask = Tensor::from_vec(mask, (b, len), dev)?;
        let pad_bias = ((mask.clone() - 1.0)? * 1e9)?.reshape((b, 1, 1, len))?;
        Ok(Batch { b, len, ids: Tensor::from_vec(ids, (b, len), dev)?, types, mask, pad_bias })
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
    // sentence-transformers 5+ writes `"pooling_mode": "mean"`; earlier versions (most Hub models) one
    // flag per mode. Modes this module cannot compute are refused rather than replaced by mean.
    let modes: Vec<String> = match cfg.get("pooling_mode").and_then(|m| m.as_str()) {
        Some(m) => vec![m.to_string()],
        None => [
            ("pooling_mode_cls_token", "cls"),
            ("pooling_mode_mean_tokens", "mean"),
            ("pooling_mode_max_tokens", "max"),
            ("pooling_mode_lasttoken", "lasttoken"),
            ("pooling_mode_mean_sqrt_len_tokens", "mean_sqrt_len_tokens"),
            ("pooling_mode_weightedmean_tokens", "weightedmean"),
        ]
        .iter()
        .filter(|(k, _)| cfg.get(*k).and_then(|v| v.as_bool()) == Some(true))
        .map(|(_, m)| m.to_string())
        .collect(),
    };
    let pooling = match modes.iter().map(String::as_str).collect::<Vec<_>>().as_slice() {
        [] | ["mean"] => EncoderPooling::Mean,
        ["cls"] => EncoderPooling::Cls,
        ["max"] => EncoderPooling::Max,
        ["lasttoken"] => EncoderPooling::Last,
        other => {
            return Err(Error::bad_file(
                &path,
                format!("pooling {} is not supported (one of cls, mean, max, lasttoken)", other.join(" + ")),
            ))
        }
    };
    Ok((pooling, normalize))
}

/// Whether transformers' tokenizer of the folder returns token types: `model_input_names` of
/// `tokenizer_config.json` when it lists them, else the tokenizer class's default (the BERT-style
/// WordPiece classes return them; the base class and RoBERTa-style classes do not). No
/// `tokenizer_config.json`: types, as BERT's tokenizer gives.
fn pair_types(dir: &Path) -> bool {
    let Ok(text) = std::fs::read_to_string(dir.join("tokenizer_config.json")) else { return true };
    let Ok(cfg) = serde_json::from_str::<serde_json::Value>(&text) else { return true };
    if let Some(names) = cfg.get("model_input_names").and_then(|n| n.as_array()) {
        return names.iter().any(|n| n.as_str() == Some("token_type_ids"));
    }
    let class = cfg.get("tokenizer_class").and_then(|c| c.as_str()).unwrap_or("BertTokenizer");
    ["Bert", "Electra", "MobileBert", "ConvBert", "SqueezeBert", "Funnel", "LayoutLM", "DPR", "Nomic"].iter().any(|p| class.starts_with(p))
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Query chunks give what one pass gives (with padding and a window), and the chunk size follows
    /// the budget.
    #[test]
    fn attention_in_query_chunks_is_attention() {
        let dev = Device::Cpu;
        let (b, heads, len, hd) = (2, 3, 37, 8);
        let q = Tensor::randn(0f32, 1.0, (b, heads, len, hd), &dev).unwrap();
        let k = Tensor::randn(0f32, 1.0, (b, heads, len, hd), &dev).unwrap();
        let v = Tensor::randn(0f32, 1.0, (b, heads, len, hd), &dev).unwrap();
        let mask: Vec<f32> = (0..b * len).map(|i| if i % len < len - 5 * (i / len) { 0.0 } else { -1e9 }).collect();
        let bias = Tensor::from_vec(mask, (b, 1, 1, len), &dev).unwrap();
        for window in [None, Some(4)] {
            let whole = attention_within(&q, &k, &v, &bias, window, 0.3, usize::MAX).unwrap();
            for budget in [1, b * heads * len * 5, b * heads * len * 36] {
                let parts = attention_within(&q, &k, &v, &bias, window, 0.3, budget).unwrap();
                let diff = (&parts - &whole).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
                assert!(diff < 1e-6, "{window:?} {budget}: {diff}");
            }
        }
    }

    /// sentence-transformers' pooling in both of its config forms (`"pooling_mode": "cls"` since
    /// version 5, a flag per mode before); modes it cannot compute are an error, not mean.
    #[test]
    fn pooling_config_reads_both_forms() {
        let dir = std::env::temp_dir().join(format!("infer-pooling-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("1_Pooling")).unwrap();
        let modules = r#"[{"type": "sentence_transformers.models.Transformer", "path": ""},
            {"type": "sentence_transformers.models.Pooling", "path": "1_Pooling"}, {"type": "sentence_transformers.models.Normalize", "path": "2"}]"#;
        std::fs::write(dir.join("modules.json"), modules).unwrap();
        let cases: [(&str, Option<EncoderPooling>); 9] = [
            (r#"{"pooling_mode": "cls"}"#, Some(EncoderPooling::Cls)),
            (r#"{"pooling_mode": "mean"}"#, Some(EncoderPooling::Mean)),
            (r#"{"pooling_mode": "max"}"#, Some(EncoderPooling::Max)),
            (r#"{"pooling_mode": "lasttoken"}"#, Some(EncoderPooling::Last)),
            (r#"{"pooling_mode": "weightedmean"}"#, None),
            (r#"{"pooling_mode_cls_token": true, "pooling_mode_mean_tokens": false}"#, Some(EncoderPooling::Cls)),
            (r#"{"pooling_mode_mean_tokens": true}"#, Some(EncoderPooling::Mean)),
            (r#"{"pooling_mode_lasttoken": true}"#, Some(EncoderPooling::Last)),
            (r#"{"pooling_mode_cls_token": true, "pooling_mode_max_tokens": true}"#, None),
        ];
        for (cfg, want) in cases {
            std::fs::write(dir.join("1_Pooling/config.json"), cfg).unwrap();
            match (pooling_config(&dir), want) {
                (Ok((got, normalize)), Some(want)) => assert_eq!((got, normalize), (want, true), "{cfg}"),
                (Err(e), None) => assert!(e.to_string().contains("not supported"), "{cfg}: {e}"),
                (got, want) => panic!("{cfg}: {:?} vs {want:?}", got.map(|g| g.0)),
            }
        }
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// Batches of inputs sorted by length: at most 16 inputs and BATCH_TOKENS positions each, every
    /// input once, in order.
    #[test]
    fn batches_are_bounded_by_count_and_positions() {
        let lens: Vec<usize> = vec![1, 1, 2, 3, 5, 8, 100, 600, 600, 1000, 4000, 8192, 8192];
        let mut all = Vec::new();
        for (count, lens) in [(40usize, vec![7usize; 40]), (lens.len(), lens.clone())] {
            let order: Vec<usize> = (0..count).collect();
            let got = batches(&order, |i| lens[i]);
            for batch in &got {
                assert!(batch.len() <= 16);
                let longest = batch.iter().map(|&i| lens[i]).max().unwrap();
                assert!(batch.len() == 1 || batch.len() * longest <= BATCH_TOKENS, "{batch:?}");
            }
            assert_eq!(got.concat(), order);
            all.push(got.len());
        }
        assert_eq!(all[0], 3, "40 short inputs: 16 + 16 + 8");
        assert_eq!(all[1], 4, "[1..600 (9 inputs)], [1000, 4000], [8192], [8192]: {all:?}");
    }
}
