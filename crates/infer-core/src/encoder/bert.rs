//! BERT, RoBERTa and XLM-RoBERTa: learned absolute positions (RoBERTa's start after the padding
//! id), token types, post-LayerNorm blocks with biases, GELU; the task heads of
//! `BertForSequenceClassification` (pooler dense + tanh on `[CLS]`, then the classifier) and
//! `(XLM)RobertaForSequenceClassification` (`classifier.dense` + tanh, `classifier.out_proj`).

use candle_core::Tensor;
use serde::Deserialize;

use super::{attention, layer_norm, linear, Batch, Dims, Net, Weights};
use crate::error::Result;

#[derive(Debug, Clone, Deserialize)]
pub(super) struct BertConfig {
    pub model_type: Option<String>,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub intermediate_size: usize,
    pub max_position_embeddings: usize,
    #[serde(default = "one")]
    pub type_vocab_size: usize,
    #[serde(default = "eps")]
    pub layer_norm_eps: f64,
    #[serde(default = "gelu")]
    pub hidden_act: String,
    #[serde(default)]
    pub pad_token_id: Option<usize>,
    #[serde(default)]
    pub architectures: Vec<String>,
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

struct Layer {
    q: (Tensor, Tensor), // [h, h], [h]
    k: (Tensor, Tensor),
    v: (Tensor, Tensor),
    o: (Tensor, Tensor),
    ln1: (Tensor, Tensor),  // [h], [h]
    up: (Tensor, Tensor),   // [intermediate, h], [intermediate]
    down: (Tensor, Tensor), // [h, intermediate], [h]
    ln2: (Tensor, Tensor),
}

/// The sequence-classification head: a dense layer + tanh on the first token's state, then one label.
struct Head {
    dense: (Tensor, Tensor), // [h, h], [h]
    out: (Tensor, Tensor),   // [1, h], [1]
}

pub(super) struct Bert {
    dims: Dims,
    eps: f64,
    word: Tensor,       // [vocab, h]
    position: Tensor,   // [max_positions, h]
    token_type: Tensor, // [type_vocab, h]
    ln: (Tensor, Tensor),
    layers: Vec<Layer>,
    /// First position id (RoBERTa / XLM-R: padding id + 1).
    position_offset: usize,
    head: Option<Head>,
}

impl Bert {
    pub(super) fn load(cfg: &BertConfig, w: &Weights) -> Result<Self> {
        let kind = cfg.model_type.as_deref().unwrap_or_default();
        if cfg.hidden_size == 0 || cfg.num_attention_heads == 0 || !cfg.hidden_size.is_multiple_of(cfg.num_attention_heads) {
            return Err(
                w.bad(format!("hidden_size {} is not a multiple of num_attention_heads {}", cfg.hidden_size, cfg.num_attention_heads))
            );
        }
        if cfg.num_hidden_layers > 256 || cfg.hidden_size > 65536 || cfg.intermediate_size > 1 << 20 {
            return Err(w.bad("the config's sizes are out of range"));
        }
        if cfg.hidden_act != "gelu" {
            return Err(w.bad(format!("hidden_act `{}` is not supported (gelu)", cfg.hidden_act)));
        }
        let (h, inter) = (cfg.hidden_size, cfg.intermediate_size);
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        for i in 0..cfg.num_hidden_layers {
            let p = format!("encoder.layer.{i}");
            layers.push(Layer {
                q: w.pair(&format!("{p}.attention.self.query"), h, Some(h))?,
                k: w.pair(&format!("{p}.attention.self.key"), h, Some(h))?,
                v: w.pair(&format!("{p}.attention.self.value"), h, Some(h))?,
                o: w.pair(&format!("{p}.attention.output.dense"), h, Some(h))?,
                ln1: w.pair(&format!("{p}.attention.output.LayerNorm"), h, None)?,
                up: w.pair(&format!("{p}.intermediate.dense"), inter, Some(h))?,
                down: w.pair(&format!("{p}.output.dense"), h, Some(inter))?,
                ln2: w.pair(&format!("{p}.output.LayerNorm"), h, None)?,
            });
        }
        let bert_head = cfg.architectures.iter().any(|a| a == "BertForSequenceClassification");
        let roberta_head = cfg
            .architectures
            .iter()
            .any(|a| matches!(a.as_str(), "RobertaForSequenceClassification" | "XLMRobertaForSequenceClassification"));
        // (pooling dense layer, one-label output layer): BERT's pooler + classifier, RoBERTa's head.
        let (dense, out) = if roberta_head { ("classifier.dense", "classifier.out_proj") } else { ("pooler.dense", "classifier") };
        let head = if bert_head || roberta_head {
            w.one_label(&format!("{out}.weight"))?;
            Some(Head { dense: w.pair(dense, h, Some(h))?, out: w.pair(out, 1, Some(h))? })
        } else {
            None
        };
        let position_offset = if kind == "bert" { 0 } else { cfg.pad_token_id.unwrap_or(1) + 1 };
        Ok(Self {
            dims: Dims {
                vocab: cfg.vocab_size,
                hidden: h,
                heads: cfg.num_attention_heads,
                max_tokens: cfg.max_position_embeddings.saturating_sub(position_offset),
                type_vocab: cfg.type_vocab_size,
                pad: cfg.pad_token_id.filter(|&p| p < cfg.vocab_size).unwrap_or(0) as u32,
            },
            eps: cfg.layer_norm_eps,
            word: w.get("embeddings.word_embeddings.weight", &[cfg.vocab_size, h])?,
            position: w.get("embeddings.position_embeddings.weight", &[cfg.max_position_embeddings, h])?,
            token_type: w.get("embeddings.token_type_embeddings.weight", &[cfg.type_vocab_size, h])?,
            ln: w.pair("embeddings.LayerNorm", h, None)?,
            layers,
            position_offset,
            head,
        })
    }
}

impl Net for Bert {
    fn dims(&self) -> &Dims {
        &self.dims
    }

    fn reranks(&self) -> bool {
        self.head.is_some()
    }

    fn hidden(&self, batch: &Batch) -> Result<Tensor> {
        let (b, len, h, heads) = (batch.b, batch.len, self.dims.hidden, self.dims.heads);
        let hd = h / heads;
        let dev = batch.ids.device();
        let positions: Vec<u32> = (0..len as u32).map(|p| p + self.position_offset as u32).collect();
        let pos = Tensor::from_vec(positions, len, dev)?;
        let x = self.word.embedding(&batch.ids.flatten_all()?)?.reshape((b, len, h))?; // [b, len, h]
        let x = x.broadcast_add(&self.position.embedding(&pos)?)?;
        let x = match &batch.types {
            None => x.broadcast_add(&self.token_type.get(0)?)?,
            Some(types) => (x + self.token_type.embedding(&types.flatten_all()?)?.reshape((b, len, h))?)?,
        };
        let mut x = layer_norm(&x, &self.ln.0, Some(&self.ln.1), self.eps)?;
        let scale = 1.0 / (hd as f64).sqrt();
        for l in &self.layers {
            // [b, len, h] → [b, heads, len, hd]
            let split = |t: Tensor| -> Result<Tensor> { Ok(t.reshape((b, len, heads, hd))?.transpose(1, 2)?.contiguous()?) };
            let q = split(linear(&x, &l.q.0, Some(&l.q.1))?)?;
            let k = split(linear(&x, &l.k.0, Some(&l.k.1))?)?;
            let v = split(linear(&x, &l.v.0, Some(&l.v.1))?)?;
            let a = attention(&q, &k, &v, &batch.pad_bias, None, scale)?.transpose(1, 2)?.contiguous()?.reshape((b, len, h))?;
            x = layer_norm(&(linear(&a, &l.o.0, Some(&l.o.1))? + &x)?, &l.ln1.0, Some(&l.ln1.1), self.eps)?;
            let m = linear(&linear(&x, &l.up.0, Some(&l.up.1))?.gelu_erf()?, &l.down.0, Some(&l.down.1))?;
            x = layer_norm(&(m + &x)?, &l.ln2.0, Some(&l.ln2.1), self.eps)?;
        }
        Ok(x)
    }

    fn logits(&self, x: &Tensor, _batch: &Batch) -> Result<Option<Tensor>> {
        let Some(head) = &self.head else { return Ok(None) };
        let cls = x.narrow(1, 0, 1)?.squeeze(1)?; // [b, h]
        let pooled = linear(&cls, &head.dense.0, Some(&head.dense.1))?.tanh()?;
        Ok(Some(linear(&pooled, &head.out.0, Some(&head.out.1))?.squeeze(1)?))
    }
}
