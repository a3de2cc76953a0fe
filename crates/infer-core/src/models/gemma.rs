//! The Gemma 2 and Gemma 3 (text) decoders: embeddings scaled by √hidden, RMSNorm with `1 + w`
//! weights, a norm before and after both attention and MLP, GELU(tanh)-gated MLP, queries scaled by
//! `query_pre_attn_scalar^-1/2`, sliding-window (local) and global layers, and
//! - Gemma 2: attention-logit and final-logit soft-capping;
//! - Gemma 3: RMSNorm on each query and key head, a rotary base of its own for the local layers.

use candle_core::{DType, Device, Tensor};

use super::host::{embed_host, head_host, host_attention_into, HostPath, Workspace};
use super::layers::{batch_tensors, check_tokens, grow, output_head, paged_attention_op, wanted_rows, Embeddings, RmsNorm, TensorPass};
use super::rope::Rotary;
use super::{BatchInput, Decoder};
use crate::config::{Activation, ModelConfig};
use crate::error::{Error, Result};
use crate::kv_cache::PagedKvCache;
use crate::weights::{Linear, WeightSource};

#[derive(Debug, Clone)]
struct Attention {
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
    q_norm: Option<RmsNorm>,
    k_norm: Option<RmsNorm>,
    window: Option<usize>,
    /// Whether the layer uses the local rotary embedding.
    local: bool,
}

#[derive(Debug, Clone)]
struct Layer {
    input_norm: RmsNorm,
    attn: Attention,
    post_attn_norm: RmsNorm,
    pre_ffn_norm: RmsNorm,
    gate: Linear,
    up: Linear,
    down: Linear,
    post_ffn_norm: RmsNorm,
}

/// A Gemma 2 / Gemma 3 text decoder.
#[derive(Debug)]
pub struct GemmaModel {
    cfg: ModelConfig,
    embed: Embeddings,
    embed_scale: f64,
    layers: Vec<Layer>,
    norm: RmsNorm,
    lm_head: Linear,
    rotary: Rotary,
    local_rotary: Rotary,
    device: Device,
    dtype: DType,
    /// On the CPU with every weight on infer's kernels: the host path's buffers.
    host: HostPath,
}

/// Gemma's RMSNorm multiplies by `1 + w`. GGUF files store `1 + w` already (llama.cpp's converter
/// adds the 1); safetensors store `w`.
fn gemma_norm(w: &WeightSource, name: &str, dim: usize, eps: f64) -> Result<RmsNorm> {
    let mut n = RmsNorm::load(w, name, dim, eps)?;
    if !w.is_gguf() {
        n.weight = (n.weight + 1.0)?;
    }
    Ok(n)
}

/// The HF name, or for a GGUF file the given GGUF name.
fn gguf_or(w: &WeightSource, hf: &str, gguf: &str) -> String {
    if w.is_gguf() {
        gguf.to_string()
    } else {
        hf.to_string()
    }
}

impl GemmaModel {
    /// Builds the model from `w`; `progress` is called after each layer with (done, total).
    pub fn load(cfg: ModelConfig, w: &WeightSource, progress: &mut dyn FnMut(usize, usize)) -> Result<Self> {
        if !cfg.architecture.is_gemma() {
            return Err(Error::Model(format!("{:?} is not a Gemma architecture", cfg.architecture)));
        }
        let (h, nh, nkv, hd, inter) =
            (cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cfg.intermediate_size);
        let eps = cfg.rms_norm_eps;
        let total = cfg.num_hidden_layers + 2;
        let embed = Embeddings::load(w, "model.embed_tokens.weight", cfg.vocab_size, h)?;
        progress(1, total);
        let bias = cfg.attention_bias;
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        for i in 0..cfg.num_hidden_layers {
            let p = format!("model.layers.{i}");
            let qk_norm = |name: &str| -> Result<Option<RmsNorm>> {
                Ok(if cfg.qk_norm { Some(gemma_norm(w, &format!("{p}.self_attn.{name}.weight"), hd, eps)?) } else { None })
            };
            layers.push(Layer {
                input_norm: gemma_norm(w, &format!("{p}.input_layernorm.weight"), h, eps)?,
                attn: Attention {
                    q: w.linear(&format!("{p}.self_attn.q_proj"), nh * hd, h, bias)?,
                    k: w.linear(&format!("{p}.self_attn.k_proj"), nkv * hd, h, bias)?,
                    v: w.linear(&format!("{p}.self_attn.v_proj"), nkv * hd, h, bias)?,
                    o: w.linear(&format!("{p}.self_attn.o_proj"), h, nh * hd, bias)?,
                    q_norm: qk_norm("q_norm")?,
                    k_norm: qk_norm("k_norm")?,
                    window: cfg.window_for_layer(i),
                    local: cfg.is_local_layer(i),
                },
                // In GGUF these two are `post_attention_norm` and `ffn_norm` (the generic mapping
                // gives Llama's post-attention norm, which is the pre-MLP one, the name `ffn_norm`).
                post_attn_norm: gemma_norm(
                    w,
                    &gguf_or(w, &format!("{p}.post_attention_layernorm.weight"), &format!("blk.{i}.post_attention_norm.weight")),
                    h,
                    eps,
                )?,
                pre_ffn_norm: gemma_norm(
                    w,
                    &gguf_or(w, &format!("{p}.pre_feedforward_layernorm.weight"), &format!("blk.{i}.ffn_norm.weight")),
                    h,
                    eps,
                )?,
                gate: w.linear(&format!("{p}.mlp.gate_proj"), inter, h, false)?,
                up: w.linear(&format!("{p}.mlp.up_proj"), inter, h, false)?,
                down: w.linear(&format!("{p}.mlp.down_proj"), h, inter, false)?,
                post_ffn_norm: gemma_norm(
                    w,
                    &gguf_or(w, &format!("{p}.post_feedforward_layernorm.weight"), &format!("blk.{i}.post_ffw_norm.weight")),
                    h,
                    eps,
                )?,
            });
            progress(i + 2, total);
        }
        let norm = gemma_norm(w, "model.norm.weight", h, eps)?;
        let lm_head = output_head(&cfg, w)?;
        progress(total, total);
        let rotary = Rotary::new(&cfg, w.device())?;
        let mut local_cfg = cfg.clone();
        if let Some(theta) = cfg.local_rope_theta {
            local_cfg.rope_theta = theta;
            local_cfg.rope_scaling = cfg.local_rope_scaling.clone();
        }
        let local_rotary = Rotary::new(&local_cfg, w.device())?;
        let mut model = Self {
            embed_scale: (h as f64).sqrt(),
            embed,
            layers,
            norm,
            lm_head,
            rotary,
            local_rotary,
            device: w.device().clone(),
            dtype: w.dtype(),
            cfg,
            host: HostPath::default(),
        };
        model.host = HostPath::new(w, &model.embed, &model.norm, &model.lm_head, model.host_layers());
        Ok(model)
    }

    /// Whether every layer can run on host slices: f32 norms, all linear layers on infer's kernels.
    fn host_layers(&self) -> bool {
        let layer_ok = |l: &Layer| {
            let a = &l.attn;
            [&a.q, &a.k, &a.v, &a.o, &l.gate, &l.up, &l.down].iter().all(|w| w.on_infer_kernels())
                && [&l.input_norm, &l.post_attn_norm, &l.pre_ffn_norm, &l.post_ffn_norm]
                    .into_iter()
                    .chain(&a.q_norm)
                    .chain(&a.k_norm)
                    .all(RmsNorm::has_host_weight)
        };
        self.layers.iter().all(layer_ok)
    }

    /// The attention geometry of a layer: Gemma's query scale and soft-capping.
    fn shape(&self, cache: &PagedKvCache, window: Option<usize>) -> infer_kernels::AttentionShape {
        let hd = self.cfg.head_dim;
        let mut shape = cache.shape(self.cfg.num_attention_heads, window);
        shape.scale = (1.0 / self.cfg.query_pre_attn_scalar.unwrap_or(hd as f64).sqrt()) as f32;
        shape.softcap = self.cfg.attn_softcap.map(|c| c as f32);
        shape
    }

    fn mlp(&self, layer: &Layer, x: &Tensor) -> Result<Tensor> {
        let [g, u] = Linear::forward_many([&layer.gate, &layer.up], x)?;
        let g = match self.cfg.activation {
            Activation::GeluTanh => g.gelu()?,
            Activation::Silu => g.silu()?,
        };
        layer.down.forward(&(g * u)?)
    }
}

impl Decoder for GemmaModel {
    /// The whole step on host slices in `ws` (no allocation once `ws` has grown to the batch): the
    /// same decoder as the tensor path of [`Decoder::forward_tensors`].
    fn forward_host(&self, batch: &BatchInput, cache: &mut PagedKvCache, ws: &mut Workspace, logits: &mut Vec<f32>) -> Result<()> {
        check_tokens(batch, self.cfg.vocab_size)?;
        let (t, hs, inter) = (batch.num_tokens(), self.cfg.hidden_size, self.cfg.intermediate_size);
        let (nh, nkv, hd) = (self.cfg.num_attention_heads, self.cfg.num_key_value_heads, self.cfg.head_dim);
        embed_host(&self.embed, &batch.tokens, hs, self.embed_scale as f32, &mut ws.x)?;
        self.rotary.tables_into(&batch.positions, &mut ws.cos, &mut ws.sin);
        self.local_rotary.tables_into(&batch.positions, &mut ws.cos2, &mut ws.sin2);
        let seqs = ws.seqs(batch);
        for (i, layer) in self.layers.iter().enumerate() {
            let a = &layer.attn;
            layer.input_norm.forward_host(&ws.x, grow(&mut ws.h, t * hs));
            let (q, k, v) = (grow(&mut ws.q, t * nh * hd), grow(&mut ws.k, t * nkv * hd), grow(&mut ws.v, t * nkv * hd));
            Linear::forward_many_host([&a.q, &a.k, &a.v], &ws.h, t, [q, k, v])?;
            if let (Some(qn), Some(kn)) = (&a.q_norm, &a.k_norm) {
                qn.forward_host(&ws.q, grow(&mut ws.tmp, t * nh * hd));
                std::mem::swap(&mut ws.q, &mut ws.tmp);
                kn.forward_host(&ws.k, grow(&mut ws.tmp, t * nkv * hd));
                std::mem::swap(&mut ws.k, &mut ws.tmp);
            }
            let (rotary, cos, sin) = if a.local { (&self.local_rotary, &ws.cos2, &ws.sin2) } else { (&self.rotary, &ws.cos, &ws.sin) };
            rotary.apply_host(&mut ws.q, nh, hd, cos, sin);
            rotary.apply_host(&mut ws.k, nkv, hd, cos, sin);
            let shape = self.shape(cache, a.window);
            let out = grow(&mut ws.attn, t * nh * hd);
            host_attention_into(ws.isa, cache.layer_mut(i), &ws.q, &ws.k, &ws.v, &batch.slots, &seqs, &shape, out)?;
            a.o.forward_host(&ws.attn, t, grow(&mut ws.a, t * hs))?;
            layer.post_attn_norm.forward_host(&ws.a, grow(&mut ws.tmp, t * hs));
            layer.pre_ffn_norm.add_forward_host(&ws.x, &ws.tmp, grow(&mut ws.x1, t * hs), &mut ws.h);
            std::mem::swap(&mut ws.x, &mut ws.x1);
            let (g, u) = (grow(&mut ws.gate, t * inter), grow(&mut ws.up, t * inter));
            Linear::forward_many_host([&layer.gate, &layer.up], &ws.h, t, [&mut *g, &mut *u])?;
            let act = grow(&mut ws.act, t * inter);
            match self.cfg.activation {
                Activation::GeluTanh => infer_kernels::fused::gelu_mul(g, u, inter, act),
                Activation::Silu => infer_kernels::fused::silu_mul(g, u, inter, act),
            }
            layer.down.forward_host(&ws.act, t, grow(&mut ws.m, t * hs))?;
            layer.post_ffn_norm.forward_host(&ws.m, grow(&mut ws.tmp, t * hs));
            ws.x.iter_mut().zip(&ws.tmp).for_each(|(x, m)| *x += m);
        }
        ws.give_back(seqs);
        let scratch = (&mut ws.x1, &mut ws.h);
        head_host(&ws.x, hs, &batch.logits_rows, &self.norm, &self.lm_head, self.cfg.vocab_size, scratch, batch.hidden, logits)?;
        if let (Some(c), false) = (self.cfg.final_softcap, batch.hidden) {
            let c = c as f32;
            logits.iter_mut().for_each(|l| *l = (*l / c).tanh() * c);
        }
        Ok(())
    }

    fn forward_tensors(&self, batch: &BatchInput, cache: &mut PagedKvCache) -> Result<Tensor> {
        let (ids, positions) = batch_tensors(batch, self.cfg.vocab_size, &self.device)?;
        let n = batch.tokens.len();
        let rope_global = self.rotary.prepare(&positions, &batch.positions, self.dtype)?;
        let rope_local = self.local_rotary.prepare(&positions, &batch.positions, self.dtype)?;
        let pass = TensorPass::new(batch, cache, &self.device)?;
        let (nh, nkv, hd) = (self.cfg.num_attention_heads, self.cfg.num_key_value_heads, self.cfg.head_dim);
        // The embedding scale is rounded to the activations' dtype first, as transformers does.
        let embed_scale =
            Tensor::new(self.embed_scale as f32, &self.device)?.to_dtype(self.dtype)?.to_dtype(DType::F64)?.to_scalar::<f64>()?;
        let mut x = (self.embed.select(&ids)? * embed_scale)?;
        for (i, layer) in self.layers.iter().enumerate() {
            let a = &layer.attn;
            let h = layer.input_norm.forward(&x)?;
            let [q, k, v] = Linear::forward_many([&a.q, &a.k, &a.v], &h)?;
            let mut q = q.reshape((n, nh, hd))?;
            let mut k = k.reshape((n, nkv, hd))?;
            let v = v.reshape((n, nkv, hd))?;
            if let (Some(qn), Some(kn)) = (&a.q_norm, &a.k_norm) {
                q = qn.forward(&q)?;
                k = kn.forward(&k)?;
            }
            let (rotary, rope) = if a.local { (&self.local_rotary, &rope_local) } else { (&self.rotary, &rope_global) };
            let q = rotary.apply(&q, rope)?;
            let k = rotary.apply(&k, rope)?;
            let shape = self.shape(cache, a.window);
            let out = paged_attention_op(i, &shape, &q, &k, &v, &pass, cache)?;
            let out = a.o.forward(&out.to_dtype(self.dtype)?)?;
            let (x1, h) = layer.pre_ffn_norm.add_forward(&x, &layer.post_attn_norm.forward(&out)?)?;
            let m = layer.post_ffn_norm.forward(&self.mlp(layer, &h)?)?;
            x = (x1 + m)?;
        }
        let Some(x) = wanted_rows(&x, batch)? else {
            return Ok(Tensor::zeros((0, self.cfg.vocab_size), DType::F32, &self.device)?);
        };
        let x = self.norm.forward(&x)?;
        if batch.hidden {
            return Ok(x.to_dtype(DType::F32)?.contiguous()?);
        }
        let logits = self.lm_head.forward(&x)?.to_dtype(DType::F32)?;
        let logits = match self.cfg.final_softcap {
            Some(c) => ((logits / c)?.tanh()? * c)?,
            None => logits,
        };
        Ok(logits.contiguous()?)
    }

    fn parts(&self) -> (&ModelConfig, &Device, DType, &HostPath) {
        (&self.cfg, &self.device, self.dtype, &self.host)
    }
}
