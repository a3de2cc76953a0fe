//! ModernBERT (answerdotai/ModernBERT-base and the embedders and rerankers built on it:
//! modernbert-embed, gte-modernbert, gte-reranker-modernbert): token embeddings + LayerNorm (no
//! positions: RoPE in attention), pre-LayerNorm blocks (the first block's attention norm is the
//! identity), one fused `Wqkv`, a GLU MLP (`Wi` gives input and gate halves, act(input) · gate, `Wo`),
//! a final LayerNorm; LayerNorms without biases and linear layers without biases unless the config
//! asks. Attention alternates: every `global_attn_every_n_layers`-th layer (from layer 0) is global
//! with RoPE theta 160000, the others see `|i - j| <= local_attention / 2` with theta 10000 (HF's
//! bidirectional sliding window). The config is read in the Hub's form (`global_attn_every_n_layers`,
//! `global_rope_theta`, `local_rope_theta`) or transformers 5's (`layer_types`, `rope_parameters`).
//!
//! `ModernBertForSequenceClassification` (one label) reranks: the final states pooled as
//! `classifier_pooling` says (`cls` or the masked `mean`), `head.dense` → activation →
//! `head.norm`, then `classifier`.

use candle_core::{DType, Tensor};
use serde::Deserialize;

use super::{attention, layer_norm, linear, Act, Batch, Dims, Net, Rope, Weights};
use crate::error::Result;

#[derive(Debug, Clone, Deserialize)]
pub(super) struct ModernBertConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    #[serde(default = "gelu")]
    pub hidden_activation: String,
    #[serde(default = "max_positions")]
    pub max_position_embeddings: usize,
    #[serde(default = "eps")]
    pub norm_eps: f64,
    #[serde(default)]
    pub norm_bias: bool,
    #[serde(default)]
    pub global_attn_every_n_layers: Option<usize>,
    #[serde(default)]
    pub layer_types: Option<Vec<String>>,
    #[serde(default = "window")]
    pub local_attention: usize,
    #[serde(default)]
    pub global_rope_theta: Option<f64>,
    #[serde(default)]
    pub local_rope_theta: Option<f64>,
    #[serde(default)]
    pub rope_parameters: Option<serde_json::Value>,
    #[serde(default)]
    pub attention_bias: bool,
    #[serde(default)]
    pub mlp_bias: bool,
    #[serde(default = "cls")]
    pub classifier_pooling: String,
    #[serde(default = "gelu")]
    pub classifier_activation: String,
    #[serde(default)]
    pub classifier_bias: bool,
    #[serde(default)]
    pub pad_token_id: Option<usize>,
    #[serde(default)]
    pub architectures: Vec<String>,
}

fn gelu() -> String {
    "gelu".into()
}
fn max_positions() -> usize {
    8192
}
fn eps() -> f64 {
    1e-5
}
fn window() -> usize {
    128
}
fn cls() -> String {
    "cls".into()
}

struct Layer {
    attn_norm: Option<(Tensor, Option<Tensor>)>, // [h] (none in layer 0)
    wqkv: (Tensor, Option<Tensor>),              // [3h, h]
    wo: (Tensor, Option<Tensor>),                // [h, h]
    mlp_norm: (Tensor, Option<Tensor>),
    wi: (Tensor, Option<Tensor>),     // [2 * intermediate, h]: input rows, then gate rows
    mlp_wo: (Tensor, Option<Tensor>), // [h, intermediate]
    /// Half-window of a local layer (`|i - j| <= w`), `None` for a global one.
    window: Option<usize>,
}

struct Head {
    dense: (Tensor, Option<Tensor>), // [h, h]
    act: Act,
    norm: (Tensor, Option<Tensor>),
    out: (Tensor, Option<Tensor>), // [1, h], [1]
    mean: bool,
}

pub(super) struct ModernBert {
    dims: Dims,
    eps: f64,
    act: Act,
    tok: Tensor, // [vocab, h]
    emb_norm: (Tensor, Option<Tensor>),
    layers: Vec<Layer>,
    final_norm: (Tensor, Option<Tensor>),
    /// RoPE of global and local layers.
    rope_global: Rope,
    rope_local: Rope,
    head: Option<Head>,
}

/// RoPE theta of `full_attention` / `sliding_attention` layers in transformers 5's
/// `rope_parameters`; only the default (unscaled) RoPE.
fn rope_theta(cfg: &ModernBertConfig, kind: &str, old: Option<f64>, default: f64, w: &Weights) -> Result<f64> {
    let Some(p) = cfg.rope_parameters.as_ref().and_then(|p| p.get(kind)).filter(|p| !p.is_null()) else {
        return Ok(old.unwrap_or(default));
    };
    match p.get("rope_type").and_then(|t| t.as_str()) {
        None | Some("default") => {}
        Some(t) => return Err(w.bad(format!("rope_parameters.{kind}.rope_type `{t}` is not supported (default)"))),
    }
    Ok(p.get("rope_theta").and_then(|t| t.as_f64()).or(old).unwrap_or(default))
}

impl ModernBert {
    pub(super) fn load(cfg: &ModernBertConfig, w: &Weights) -> Result<Self> {
        let (h, heads, inter, n) = (cfg.hidden_size, cfg.num_attention_heads, cfg.intermediate_size, cfg.num_hidden_layers);
        if h == 0 || heads == 0 || !h.is_multiple_of(heads) || !(h / heads).is_multiple_of(2) {
            return Err(w.bad(format!("hidden_size {h} is not a multiple of num_attention_heads {heads} with an even head size")));
        }
        if n > 256 || h > 65536 || inter > 1 << 20 || cfg.max_position_embeddings > 1 << 20 {
            return Err(w.bad("the config's sizes are out of range"));
        }
        let kinds: Vec<bool> = match &cfg.layer_types {
            Some(t) => {
                if t.len() != n {
                    return Err(w.bad(format!("layer_types has {} entries for {n} layers", t.len())));
                }
                t.iter()
                    .map(|k| match k.as_str() {
                        "full_attention" => Ok(true),
                        "sliding_attention" => Ok(false),
                        k => Err(w.bad(format!("layer type `{k}` is not supported (full_attention, sliding_attention)"))),
                    })
                    .collect::<Result<_>>()?
            }
            None => {
                let every = cfg.global_attn_every_n_layers.unwrap_or(3);
                if every == 0 {
                    return Err(w.bad("global_attn_every_n_layers is 0"));
                }
                (0..n).map(|i| i % every == 0).collect()
            }
        };
        let half = cfg.local_attention / 2;
        let theta_g = rope_theta(cfg, "full_attention", cfg.global_rope_theta, 160_000.0, w)?;
        let theta_l = rope_theta(cfg, "sliding_attention", cfg.local_rope_theta, 10_000.0, w)?;
        if !(theta_g > 1.0 && theta_l > 1.0 && theta_g.is_finite() && theta_l.is_finite()) {
            return Err(w.bad("a RoPE theta is out of range"));
        }
        let hd = h / heads;
        let norm = |p: &str| -> Result<(Tensor, Option<Tensor>)> { w.maybe_bias(p, h, None, cfg.norm_bias) };
        let mut layers = Vec::with_capacity(n);
        for (i, &global) in kinds.iter().enumerate() {
            let p = format!("layers.{i}");
            layers.push(Layer {
                attn_norm: if i == 0 { None } else { Some(norm(&format!("{p}.attn_norm"))?) },
                wqkv: w.maybe_bias(&format!("{p}.attn.Wqkv"), 3 * h, Some(h), cfg.attention_bias)?,
                wo: w.maybe_bias(&format!("{p}.attn.Wo"), h, Some(h), cfg.attention_bias)?,
                mlp_norm: norm(&format!("{p}.mlp_norm"))?,
                wi: w.maybe_bias(&format!("{p}.mlp.Wi"), 2 * inter, Some(h), cfg.mlp_bias)?,
                mlp_wo: w.maybe_bias(&format!("{p}.mlp.Wo"), h, Some(inter), cfg.mlp_bias)?,
                window: if global { None } else { Some(half) },
            });
        }
        let head = if cfg.architectures.iter().any(|a| a == "ModernBertForSequenceClassification") {
            w.one_label("classifier.weight")?;
            let mean = match cfg.classifier_pooling.as_str() {
                "mean" => true,
                "cls" => false,
                p => return Err(w.bad(format!("classifier_pooling `{p}` is not supported (cls, mean)"))),
            };
            Some(Head {
                dense: w.maybe_bias("head.dense", h, Some(h), cfg.classifier_bias)?,
                act: Act::parse(&cfg.classifier_activation).ok_or_else(|| {
                    w.bad(format!("classifier_activation `{}` is not supported (gelu, gelu_new, silu, relu)", cfg.classifier_activation))
                })?,
                norm: norm("head.norm")?,
                out: w.maybe_bias("classifier", 1, Some(h), true)?,
                mean,
            })
        } else {
            None
        };
        Ok(Self {
            dims: Dims {
                vocab: cfg.vocab_size,
                hidden: h,
                heads,
                max_tokens: cfg.max_position_embeddings,
                type_vocab: 1,
                pad: cfg.pad_token_id.filter(|&p| p < cfg.vocab_size).unwrap_or(0) as u32,
            },
            eps: cfg.norm_eps,
            act: Act::parse(&cfg.hidden_activation).ok_or_else(|| {
                w.bad(format!("hidden_activation `{}` is not supported (gelu, gelu_new, silu, relu)", cfg.hidden_activation))
            })?,
            tok: w.get("embeddings.tok_embeddings.weight", &[cfg.vocab_size, h])?,
            emb_norm: norm("embeddings.norm")?,
            layers,
            final_norm: norm("final_norm")?,
            rope_global: Rope::new(theta_g, hd),
            rope_local: Rope::new(theta_l, hd),
            head,
        })
    }
}

fn norm(x: &Tensor, (w, b): &(Tensor, Option<Tensor>), eps: f64) -> Result<Tensor> {
    layer_norm(x, w, b.as_ref(), eps)
}

fn lin(x: &Tensor, (w, b): &(Tensor, Option<Tensor>)) -> Result<Tensor> {
    linear(x, w, b.as_ref())
}

impl Net for ModernBert {
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
        let x = self.tok.embedding(&batch.ids.flatten_all()?)?.reshape((b, len, h))?; // [b, len, h]
        let mut x = norm(&x, &self.emb_norm, self.eps)?;
        let global = self.rope_global.tables(len, dev)?; // [len, hd / 2] each
        let local = self.rope_local.tables(len, dev)?;
        let scale = 1.0 / (hd as f64).sqrt();
        for l in &self.layers {
            let a = match &l.attn_norm {
                Some(n) => norm(&x, n, self.eps)?,
                None => x.clone(),
            };
            let qkv = lin(&a, &l.wqkv)?.reshape((b, len, 3, heads, hd))?; // [b, len, 3, heads, hd]
                                                                          // [b, heads, len, hd] each
            let part = |i: usize| -> Result<Tensor> { Ok(qkv.narrow(2, i, 1)?.squeeze(2)?.transpose(1, 2)?.contiguous()?) };
            let (cos, sin) = if l.window.is_some() { &local } else { &global };
            let q = candle_nn::rotary_emb::rope(&part(0)?, cos, sin)?;
            let k = candle_nn::rotary_emb::rope(&part(1)?, cos, sin)?;
            let v = part(2)?;
            let o = attention(&q, &k, &v, &batch.pad_bias, l.window, scale)?.transpose(1, 2)?.contiguous()?.reshape((b, len, h))?;
            x = (x + lin(&o, &l.wo)?)?;
            let m = lin(&norm(&x, &l.mlp_norm, self.eps)?, &l.wi)?; // [b, len, 2 * intermediate]
            let inter = m.dim(2)? / 2;
            let glu = (self.act.apply(&m.narrow(2, 0, inter)?)? * m.narrow(2, inter, inter)?)?;
            x = (x + lin(&glu, &l.mlp_wo)?)?;
        }
        norm(&x, &self.final_norm, self.eps)
    }

    fn logits(&self, x: &Tensor, batch: &Batch) -> Result<Option<Tensor>> {
        let Some(head) = &self.head else { return Ok(None) };
        let pooled = if head.mean {
            let mask = batch.mask.to_dtype(DType::F32)?.unsqueeze(2)?; // [b, len, 1]
            x.broadcast_mul(&mask)?.sum(1)?.broadcast_div(&mask.sum(1)?)? // [b, h]
        } else {
            x.narrow(1, 0, 1)?.squeeze(1)?
        };
        let y = norm(&head.act.apply(&lin(&pooled, &head.dense)?)?, &head.norm, self.eps)?;
        Ok(Some(lin(&y, &head.out)?.squeeze(1)?))
    }
}
