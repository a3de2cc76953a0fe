//! NomicBERT (nomic-ai/nomic-embed-text-v1 and v1.5, Ollama's `nomic-embed-text`): BERT's
//! post-LayerNorm blocks and token types, but RoPE instead of learned positions (rotate-half form,
//! theta `rotary_emb_base`, 1000), one fused Q/K/V projection, a SwiGLU MLP (`down(silu(gate) · up)`)
//! and no biases in the linear layers unless the config asks. Read from the Hub's folders (custom
//! code: `n_embd`, `n_head`, `encoder.layers.N.attn.Wqkv`, `mlp.fc11` (up), `mlp.fc12` (gate),
//! `mlp.fc2`, `norm1`, `norm2`, `emb_ln`), from transformers' own `NomicBertModel` (`hidden_size`,
//! `layers.N.self_attn.{q,k,v,o}_proj`, `mlp.{gate,up,down}_proj`, `post_attention_layernorm`,
//! `post_mlp_layernorm`, `embeddings.LayerNorm`), and from GGUF (`nomic-bert`, see [`super::gguf`]).
//! The loaders bring each form to one set of names (`layers.N.qkv` fused, `layers.N.{o,gate,up,down,ln1,ln2}`,
//! `word`, `types`, `ln`).

use std::collections::HashMap;

use candle_core::Tensor;

use super::{attention, layer_norm, linear, Batch, Dims, Net, Rope, Weights};
use crate::error::Result;

/// The sizes and options of a NomicBERT, whichever form they were read from.
#[derive(Debug, Clone)]
pub(super) struct NomicConfig {
    pub vocab: usize,
    pub hidden: usize,
    pub heads: usize,
    pub layers: usize,
    pub inner: usize,
    pub max_positions: usize,
    pub type_vocab: usize,
    pub eps: f64,
    pub theta: f64,
    pub pad: usize,
}

impl NomicConfig {
    /// From a `config.json` in the Hub's form or transformers'; unsupported options are named.
    pub(super) fn from_json(v: &serde_json::Value, w: &Weights) -> Result<Self> {
        let num = |keys: &[&str]| keys.iter().find_map(|k| v.get(*k).and_then(|x| x.as_u64())).map(|x| x as usize);
        let float = |keys: &[&str]| keys.iter().find_map(|k| v.get(*k).and_then(|x| x.as_f64()));
        let need = |keys: &[&str]| num(keys).ok_or_else(|| w.bad(format!("config.json has no `{}`", keys[0])));
        let flag = |k: &str| v.get(k).and_then(|x| x.as_bool());
        if flag("prenorm") == Some(true) || flag("parallel_block") == Some(true) || flag("use_rms_norm") == Some(true) {
            return Err(w.bad("prenorm, parallel_block and use_rms_norm NomicBERT variants are not supported"));
        }
        if flag("rotary_emb_interleaved") == Some(true) {
            return Err(w.bad("rotary_emb_interleaved: true is not supported"));
        }
        if float(&["rotary_emb_fraction"]).is_some_and(|f| f != 1.0) {
            return Err(w.bad("rotary_emb_fraction other than 1.0 is not supported"));
        }
        if v.get("rotary_scaling_factor").is_some_and(|x| !x.is_null()) {
            return Err(w.bad("rotary_scaling_factor (dynamic NTK RoPE) is not supported"));
        }
        match v.get("activation_function").or_else(|| v.get("hidden_act")).and_then(|a| a.as_str()) {
            None | Some("swiglu" | "silu") => {}
            Some(a) => return Err(w.bad(format!("activation `{a}` is not supported (swiglu)"))),
        }
        for k in ["qkv_proj_bias", "mlp_fc1_bias", "mlp_fc2_bias"] {
            if flag(k) == Some(true) {
                return Err(w.bad(format!("{k}: true is not supported")));
            }
        }
        let hidden = need(&["n_embd", "hidden_size"])?;
        let heads = need(&["n_head", "num_attention_heads"])?;
        if let Some(hd) = num(&["head_dim"]).filter(|&hd| heads == 0 || hd * heads != hidden) {
            return Err(w.bad(format!("head_dim {hd} × {heads} heads is not the hidden size {hidden}")));
        }
        let rope = v.get("rope_parameters").and_then(|p| p.get("rope_theta")).and_then(|t| t.as_f64());
        let layers = need(&["n_layer", "num_hidden_layers"])?;
        // Checked here too: the loader walks the layers (fusing q/k/v) before `Nomic::load` does.
        if layers > 256 {
            return Err(w.bad("the config's sizes are out of range"));
        }
        Ok(Self {
            vocab: need(&["vocab_size"])?,
            hidden,
            heads,
            layers,
            inner: num(&["n_inner", "intermediate_size"]).unwrap_or(4 * hidden),
            max_positions: need(&["n_positions", "max_position_embeddings"])?,
            type_vocab: num(&["type_vocab_size"]).unwrap_or(2),
            eps: float(&["layer_norm_epsilon", "layer_norm_eps"]).unwrap_or(1e-12),
            theta: float(&["rotary_emb_base"]).or(rope).or(float(&["rope_theta"])).unwrap_or(1000.0),
            pad: num(&["pad_token_id"]).unwrap_or(0),
        })
    }
}

/// The common name of a Hub-form or transformers-form tensor (`None`: not part of the encoder);
/// transformers' separate q/k/v come back as `layers.N.q` etc. and are fused by [`fuse_qkv`].
pub(super) fn canonical(name: &str) -> Option<String> {
    let (base, suffix) = name.rsplit_once('.')?;
    if !matches!(suffix, "weight" | "bias") {
        return None;
    }
    let mapped = match base {
        "embeddings.word_embeddings" => "word".to_string(),
        "embeddings.token_type_embeddings" => "types".to_string(),
        "emb_ln" | "embeddings.LayerNorm" => "ln".to_string(),
        _ => {
            let rest = base.strip_prefix("encoder.layers.").or_else(|| base.strip_prefix("layers."))?;
            let (layer, tail) = rest.split_once('.')?;
            let layer: usize = layer.parse().ok()?;
            let part = match tail {
                "attn.Wqkv" => "qkv",
                "self_attn.q_proj" => "q",
                "self_attn.k_proj" => "k",
                "self_attn.v_proj" => "v",
                "attn.out_proj" | "self_attn.o_proj" => "o",
                "mlp.fc11" | "mlp.up_proj" => "up",
                "mlp.fc12" | "mlp.gate_proj" => "gate",
                "mlp.fc2" | "mlp.down_proj" => "down",
                "norm1" | "post_attention_layernorm" => "ln1",
                "norm2" | "post_mlp_layernorm" => "ln2",
                _ => return None,
            };
            format!("layers.{layer}.{part}")
        }
    };
    Some(format!("{mapped}.{suffix}"))
}

/// transformers' separate `layers.N.{q,k,v}.weight` as one `layers.N.qkv.weight` (rows q, k, v).
pub(super) fn fuse_qkv(map: &mut HashMap<String, Tensor>, layers: usize) -> Result<()> {
    for i in 0..layers {
        let names = ["q", "k", "v"].map(|p| format!("layers.{i}.{p}.weight"));
        if map.contains_key(&format!("layers.{i}.qkv.weight")) || !names.iter().all(|n| map.contains_key(n)) {
            continue;
        }
        let parts: Vec<Tensor> = names.iter().map(|n| map.remove(n).expect("checked")).collect();
        map.insert(format!("layers.{i}.qkv.weight"), Tensor::cat(&parts, 0)?);
    }
    Ok(())
}

struct Layer {
    qkv: Tensor,           // [3h, h]: q rows, then k, then v
    o: Tensor,             // [h, h]
    ln1: (Tensor, Tensor), // [h], [h]
    gate: Tensor,          // [inner, h]
    up: Tensor,            // [inner, h]
    down: Tensor,          // [h, inner]
    ln2: (Tensor, Tensor),
}

pub(super) struct Nomic {
    dims: Dims,
    eps: f64,
    word: Tensor,  // [vocab, h]
    types: Tensor, // [type_vocab, h]
    ln: (Tensor, Tensor),
    layers: Vec<Layer>,
    rope: Rope,
}

impl Nomic {
    /// From tensors under the common names (see the module's notes).
    pub(super) fn load(cfg: &NomicConfig, w: &Weights) -> Result<Self> {
        let (h, heads, inner) = (cfg.hidden, cfg.heads, cfg.inner);
        if h == 0 || heads == 0 || !h.is_multiple_of(heads) || !(h / heads).is_multiple_of(2) {
            return Err(w.bad(format!("hidden size {h} is not a multiple of {heads} heads with an even head size")));
        }
        if cfg.layers > 256 || h > 65536 || inner > 1 << 20 || cfg.max_positions > 1 << 20 || cfg.type_vocab == 0 {
            return Err(w.bad("the config's sizes are out of range"));
        }
        if !(cfg.theta > 1.0 && cfg.theta.is_finite()) {
            return Err(w.bad(format!("RoPE base {} is out of range", cfg.theta)));
        }
        let pair = |p: &str| -> Result<(Tensor, Tensor)> { w.pair(p, h, None) };
        let mut layers = Vec::with_capacity(cfg.layers);
        for i in 0..cfg.layers {
            let p = format!("layers.{i}");
            layers.push(Layer {
                qkv: w.get(&format!("{p}.qkv.weight"), &[3 * h, h])?,
                o: w.get(&format!("{p}.o.weight"), &[h, h])?,
                ln1: pair(&format!("{p}.ln1"))?,
                gate: w.get(&format!("{p}.gate.weight"), &[inner, h])?,
                up: w.get(&format!("{p}.up.weight"), &[inner, h])?,
                down: w.get(&format!("{p}.down.weight"), &[h, inner])?,
                ln2: pair(&format!("{p}.ln2"))?,
            });
        }
        let hd = h / heads;
        Ok(Self {
            dims: Dims {
                vocab: cfg.vocab,
                hidden: h,
                heads,
                max_tokens: cfg.max_positions,
                type_vocab: cfg.type_vocab,
                pad: if cfg.pad < cfg.vocab { cfg.pad as u32 } else { 0 },
            },
            eps: cfg.eps,
            word: w.get("word.weight", &[cfg.vocab, h])?,
            types: w.get("types.weight", &[cfg.type_vocab, h])?,
            ln: pair("ln")?,
            layers,
            rope: Rope::new(cfg.theta, hd),
        })
    }
}

impl Net for Nomic {
    fn dims(&self) -> &Dims {
        &self.dims
    }

    fn reranks(&self) -> bool {
        false
    }

    fn hidden(&self, batch: &Batch) -> Result<Tensor> {
        let (b, len, h, heads) = (batch.b, batch.len, self.dims.hidden, self.dims.heads);
        let hd = h / heads;
        let dev = batch.ids.device();
        let x = self.word.embedding(&batch.ids.flatten_all()?)?.reshape((b, len, h))?; // [b, len, h]
        let x = match &batch.types {
            None => x.broadcast_add(&self.types.get(0)?)?,
            Some(t) => (x + self.types.embedding(&t.flatten_all()?)?.reshape((b, len, h))?)?,
        };
        let mut x = layer_norm(&x, &self.ln.0, Some(&self.ln.1), self.eps)?;
        let (cos, sin) = self.rope.tables(len, dev)?; // [len, hd / 2] each
        let scale = 1.0 / (hd as f64).sqrt();
        for l in &self.layers {
            let qkv = linear(&x, &l.qkv, None)?.reshape((b, len, 3, heads, hd))?; // [b, len, 3, heads, hd]
            let part = |i: usize| -> Result<Tensor> { Ok(qkv.narrow(2, i, 1)?.squeeze(2)?.transpose(1, 2)?.contiguous()?) };
            let q = candle_nn::rotary_emb::rope(&part(0)?, &cos, &sin)?; // [b, heads, len, hd]
            let k = candle_nn::rotary_emb::rope(&part(1)?, &cos, &sin)?;
            let a = attention(&q, &k, &part(2)?, &batch.pad_bias, None, scale)?.transpose(1, 2)?.contiguous()?.reshape((b, len, h))?;
            x = layer_norm(&(x + linear(&a, &l.o, None)?)?, &l.ln1.0, Some(&l.ln1.1), self.eps)?;
            let m = (linear(&x, &l.gate, None)?.silu()? * linear(&x, &l.up, None)?)?;
            x = layer_norm(&(x + linear(&m, &l.down, None)?)?, &l.ln2.0, Some(&l.ln2.1), self.eps)?;
        }
        Ok(x)
    }

    fn logits(&self, _x: &Tensor, _batch: &Batch) -> Result<Option<Tensor>> {
        Ok(None)
    }
}
