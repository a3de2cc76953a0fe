//! The Llama-family decoder (Llama 2/3/3.1/3.2, Mistral, Qwen2/2.5, Qwen3, SmolLM2), driven by
//! [`ModelConfig`]: RMSNorm, rotary embeddings (with Llama 3 / linear scaling), grouped-query
//! attention over the paged KV cache (optionally windowed, optionally with q/k/v biases or per-head
//! q/k RMSNorm), SwiGLU MLP, tied or separate output head.

use candle_core::{DType, Device, Tensor};

use infer_kernels::{paged_attention, write_kv, KvElem, SeqAttention};

use super::rope::{RopeInput, Rotary};
use super::{BatchInput, CausalLm};
use crate::config::ModelConfig;
use crate::error::{Error, Result};
use crate::kv_cache::{LayerKv, PagedKvCache};
use crate::weights::{Linear, WeightSource};

#[derive(Debug, Clone)]
struct RmsNorm {
    weight: Tensor,
    eps: f32,
}

impl RmsNorm {
    fn load(w: &WeightSource, name: &str, dim: usize, eps: f64) -> Result<Self> {
        Ok(Self { weight: w.tensor(name, &[dim])?, eps: eps as f32 })
    }
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        #[cfg(feature = "cuda")]
        if x.device().is_cuda() {
            return Ok(infer_kernels::cuda::rms_norm(&x.contiguous()?, &self.weight, self.eps)?);
        }
        Ok(candle_nn::ops::rms_norm(x, &self.weight, self.eps)?)
    }

    /// `(x + a, norm(x + a))`: the residual add and the norm after it (one kernel on CUDA).
    fn add_forward(&self, x: &Tensor, a: &Tensor) -> Result<(Tensor, Tensor)> {
        #[cfg(feature = "cuda")]
        if x.device().is_cuda() {
            return Ok(infer_kernels::cuda::add_rms_norm(&x.contiguous()?, &a.contiguous()?, &self.weight, self.eps)?);
        }
        let x = (x + a)?;
        let h = self.forward(&x)?;
        Ok((x, h))
    }
}

/// SiLU(gate) · up (one kernel on CUDA).
fn silu_mul(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if gate.device().is_cuda() {
        return Ok(infer_kernels::cuda::silu_mul(&gate.contiguous()?, &up.contiguous()?)?);
    }
    Ok((gate.silu()? * up)?)
}

/// The q/k/v projections: three layers, or one fused `[q; k; v]` layer (Phi-3).
#[derive(Debug, Clone)]
enum Qkv {
    Separate { q: Linear, k: Linear, v: Linear },
    Fused(Linear),
}

/// The gate and up projections: two layers, or one fused `[gate; up]` layer (Phi-3).
#[derive(Debug, Clone)]
enum GateUp {
    Separate { gate: Linear, up: Linear },
    Fused(Linear),
}

impl GateUp {
    /// `silu(x·Wgᵀ) · (x·Wuᵀ)`.
    fn silu_mul(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            GateUp::Separate { gate, up } => {
                let [g, u] = Linear::forward_many([gate, up], x)?;
                silu_mul(&g, &u)
            }
            GateUp::Fused(gu) => {
                let y = gu.forward(x)?;
                #[cfg(feature = "cuda")]
                if y.device().is_cuda() {
                    return Ok(infer_kernels::cuda::silu_mul_fused(&y.contiguous()?)?);
                }
                let n = y.dim(1)? / 2;
                silu_mul(&y.narrow(1, 0, n)?, &y.narrow(1, n, n)?)
            }
        }
    }
}

#[derive(Debug, Clone)]
struct Attention {
    qkv: Qkv,
    o: Linear,
    /// Per-head RMSNorm of queries and keys (Qwen3).
    q_norm: Option<RmsNorm>,
    k_norm: Option<RmsNorm>,
    num_heads: usize,
    num_kv_heads: usize,
    head_dim: usize,
    window: Option<usize>,
}

#[derive(Debug, Clone)]
struct Mlp {
    gate_up: GateUp,
    down: Linear,
}

#[derive(Debug, Clone)]
struct Layer {
    input_norm: RmsNorm,
    attn: Attention,
    post_norm: RmsNorm,
    mlp: Mlp,
}

/// The decoder.
#[derive(Debug)]
pub struct LlamaModel {
    cfg: ModelConfig,
    embed: Tensor,
    layers: Vec<Layer>,
    norm: RmsNorm,
    lm_head: Linear,
    rotary: Rotary,
    device: Device,
    dtype: DType,
}

impl LlamaModel {
    /// Builds the model from `w`; `progress` is called after each layer with (done, total).
    pub fn load(cfg: ModelConfig, w: &WeightSource, progress: &mut dyn FnMut(usize, usize)) -> Result<Self> {
        let (h, inter) = (cfg.hidden_size, cfg.intermediate_size);
        let (nh, nkv, hd) = (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim);
        let total = cfg.num_hidden_layers + 2;
        let embed = w.tensor("model.embed_tokens.weight", &[cfg.vocab_size, h])?;
        progress(1, total);
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        for i in 0..cfg.num_hidden_layers {
            let p = format!("model.layers.{i}");
            let bias = cfg.attention_bias;
            // Phi-3 stores [q; k; v] and [gate; up] as single matrices (GGUF: attn_qkv, and ffn_up
            // with both halves).
            let fused = cfg.architecture == crate::config::Architecture::Phi3;
            let qk_norm = |name: &str| -> Result<Option<RmsNorm>> {
                Ok(if cfg.qk_norm { Some(RmsNorm::load(w, name, hd, cfg.rms_norm_eps)?) } else { None })
            };
            layers.push(Layer {
                input_norm: RmsNorm::load(w, &format!("{p}.input_layernorm.weight"), h, cfg.rms_norm_eps)?,
                attn: Attention {
                    qkv: if fused {
                        Qkv::Fused(w.linear(&format!("{p}.self_attn.qkv_proj"), (nh + 2 * nkv) * hd, h, bias)?)
                    } else {
                        Qkv::Separate {
                            q: w.linear(&format!("{p}.self_attn.q_proj"), nh * hd, h, bias)?,
                            k: w.linear(&format!("{p}.self_attn.k_proj"), nkv * hd, h, bias)?,
                            v: w.linear(&format!("{p}.self_attn.v_proj"), nkv * hd, h, bias)?,
                        }
                    },
                    o: w.linear(&format!("{p}.self_attn.o_proj"), h, nh * hd, false)?,
                    q_norm: qk_norm(&format!("{p}.self_attn.q_norm.weight"))?,
                    k_norm: qk_norm(&format!("{p}.self_attn.k_norm.weight"))?,
                    num_heads: nh,
                    num_kv_heads: nkv,
                    head_dim: hd,
                    window: cfg.window_for_layer(i),
                },
                post_norm: RmsNorm::load(w, &format!("{p}.post_attention_layernorm.weight"), h, cfg.rms_norm_eps)?,
                mlp: Mlp {
                    gate_up: if fused {
                        GateUp::Fused(w.linear(&format!("{p}.mlp.gate_up_proj"), 2 * inter, h, false)?)
                    } else {
                        GateUp::Separate {
                            gate: w.linear(&format!("{p}.mlp.gate_proj"), inter, h, false)?,
                            up: w.linear(&format!("{p}.mlp.up_proj"), inter, h, false)?,
                        }
                    },
                    down: w.linear(&format!("{p}.mlp.down_proj"), h, inter, false)?,
                },
            });
            progress(i + 2, total);
        }
        let norm = RmsNorm::load(w, "model.norm.weight", h, cfg.rms_norm_eps)?;
        let lm_head = if !cfg.tie_word_embeddings && w.contains("lm_head.weight") {
            w.linear("lm_head", cfg.vocab_size, h, false)?
        } else {
            // Tied embeddings: the output head is the embedding matrix (kept quantized for GGUF).
            w.linear("model.embed_tokens", cfg.vocab_size, h, false)?
        };
        progress(total, total);
        let rotary = Rotary::new(&cfg, w.device())?;
        Ok(Self { embed, layers, norm, lm_head, rotary, device: w.device().clone(), dtype: w.dtype(), cfg })
    }

    fn attention(&self, layer: usize, x: &Tensor, rope: &RopeInput, step: &Step<'_>, cache: &mut PagedKvCache) -> Result<Tensor> {
        let attn = &self.layers[layer].attn;
        let t = x.dim(0)?;
        let [q, k, v] = match &attn.qkv {
            Qkv::Separate { q, k, v } => Linear::forward_many([q, k, v], x)?,
            Qkv::Fused(qkv) => {
                let y = qkv.forward(x)?;
                let (nq, nkv) = (attn.num_heads * attn.head_dim, attn.num_kv_heads * attn.head_dim);
                [y.narrow(1, 0, nq)?.contiguous()?, y.narrow(1, nq, nkv)?.contiguous()?, y.narrow(1, nq + nkv, nkv)?.contiguous()?]
            }
        };
        let mut q = q.reshape((t, attn.num_heads, attn.head_dim))?;
        let mut k = k.reshape((t, attn.num_kv_heads, attn.head_dim))?;
        if let (Some(qn), Some(kn)) = (&attn.q_norm, &attn.k_norm) {
            q = qn.forward(&q)?;
            k = kn.forward(&k)?;
        }
        let v = v.reshape((t, attn.num_kv_heads, attn.head_dim))?;
        let q = self.rotary.apply(&q, rope)?;
        let k = self.rotary.apply(&k, rope)?;
        let out = paged_attention_op(layer, attn, &q, &k, &v, step, cache)?;
        attn.o.forward(&out.to_dtype(self.dtype)?)
    }
}

/// What every layer of one forward pass shares.
struct Step<'a> {
    batch: &'a BatchInput,
    /// With a device cache: the batch's slots and attention metadata, uploaded once.
    #[cfg(feature = "cuda")]
    gpu: Option<(Tensor, infer_kernels::cuda::AttentionMeta)>,
}

impl<'a> Step<'a> {
    fn new(batch: &'a BatchInput, cache: &mut PagedKvCache, device: &Device) -> Result<Self> {
        #[cfg(feature = "cuda")]
        {
            let gpu = if matches!(cache.layer_mut(0), LayerKv::Device { .. }) {
                let slots: Vec<u32> = batch.slots.iter().map(|&s| s as u32).collect();
                let meta = infer_kernels::cuda::AttentionMeta::new(&seq_attention(batch), device)?;
                Some((Tensor::new(slots, device)?, meta))
            } else {
                None
            };
            Ok(Self { batch, gpu })
        }
        #[cfg(not(feature = "cuda"))]
        {
            let _ = (cache, device);
            Ok(Self { batch })
        }
    }
}

fn seq_attention(batch: &BatchInput) -> Vec<SeqAttention<'_>> {
    batch
        .seqs
        .iter()
        .map(|s| SeqAttention { q_start: s.q_start, q_len: s.q_len, context_len: s.context_len, block_table: &s.block_table })
        .collect()
}

/// Writes this batch's keys/values into the cache and attends over it: the CPU kernels over a host
/// cache, the CUDA kernels over a device cache.
fn paged_attention_op(
    layer: usize,
    attn: &Attention,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    step: &Step<'_>,
    cache: &mut PagedKvCache,
) -> Result<Tensor> {
    let shape = cache.shape(attn.num_heads, attn.window);
    match cache.layer_mut(layer) {
        LayerKv::Host { k: kc, v: vc } => host_attention(q, k, v, kc, vc, step, &shape),
        LayerKv::HostF16 { k: kc, v: vc } => host_attention(q, k, v, kc, vc, step, &shape),
        #[cfg(feature = "cuda")]
        LayerKv::Device { k: kc, v: vc } => {
            use infer_kernels::cuda;
            let (slots, meta) = step.gpu.as_ref().ok_or_else(|| Error::Model("device KV cache without step metadata".into()))?;
            let dt = kc.dtype();
            cuda::write_cache(kc, &k.to_dtype(dt)?, slots)?;
            cuda::write_cache(vc, &v.to_dtype(dt)?, slots)?;
            let out = cuda::paged_attention(&q.to_dtype(dt)?, kc, vc, meta, &shape)?;
            let (t, nh, hd) = q.dims3()?;
            Ok(out.reshape((t, nh * hd))?)
        }
        #[cfg(not(feature = "cuda"))]
        LayerKv::Device { .. } => Err(Error::Model("a device KV cache needs a build with the cuda feature".into())),
    }
}

/// The CPU kernels over a host cache of f32 or f16.
fn host_attention<E: KvElem>(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    kc: &mut [E],
    vc: &mut [E],
    step: &Step<'_>,
    shape: &infer_kernels::AttentionShape,
) -> Result<Tensor> {
    let (t, nh, hd) = q.dims3()?;
    let to_vec = |x: &Tensor| -> Result<Vec<f32>> { Ok(x.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?) };
    let (qv, kv, vv) = (to_vec(q)?, to_vec(k)?, to_vec(v)?);
    write_kv(&kv, &vv, &step.batch.slots, shape, kc, vc);
    let mut out = vec![0.0f32; t * nh * hd];
    paged_attention(&qv, kc, vc, &seq_attention(step.batch), shape, &mut out);
    Ok(Tensor::from_vec(out, (t, nh * hd), q.device())?)
}

impl CausalLm for LlamaModel {
    fn forward(&self, batch: &BatchInput, cache: &mut PagedKvCache) -> Result<Tensor> {
        let n = batch.tokens.len();
        if n == 0 {
            return Err(Error::Model("empty batch".into()));
        }
        if let Some(&bad) = batch.tokens.iter().find(|&&t| t as usize >= self.cfg.vocab_size) {
            return Err(Error::Model(format!("token id {bad} is outside the vocabulary (size {})", self.cfg.vocab_size)));
        }
        let ids = Tensor::new(batch.tokens.as_slice(), &self.device)?;
        let positions = Tensor::new(batch.positions.as_slice(), &self.device)?;
        let rope = self.rotary.prepare(&positions, &batch.positions, self.dtype)?;
        let step = Step::new(batch, cache, &self.device)?;
        let mut x = self.embed.index_select(&ids, 0)?;
        let mut h = match self.layers.first() {
            Some(l) => l.input_norm.forward(&x)?,
            None => x.clone(),
        };
        for (i, layer) in self.layers.iter().enumerate() {
            let a = self.attention(i, &h, &rope, &step, cache)?;
            // Residual adds fused with the norm that follows each (one kernel on CUDA).
            let (x1, h1) = layer.post_norm.add_forward(&x, &a)?;
            let m = layer.mlp.down.forward(&layer.mlp.gate_up.silu_mul(&h1)?)?;
            match self.layers.get(i + 1) {
                Some(next) => (x, h) = next.input_norm.add_forward(&x1, &m)?,
                None => x = (x1 + m)?,
            }
        }
        if batch.logits_rows.is_empty() {
            // Only prefill chunks that do not reach their sequence's end: no logits wanted.
            return Ok(Tensor::zeros((0, self.cfg.vocab_size), DType::F32, &self.device)?);
        }
        let rows = Tensor::new(batch.logits_rows.as_slice(), &self.device)?;
        let x = x.index_select(&rows, 0)?;
        let x = self.norm.forward(&x)?;
        Ok(self.lm_head.forward(&x)?.to_dtype(DType::F32)?.contiguous()?)
    }

    fn config(&self) -> &ModelConfig {
        &self.cfg
    }

    fn device(&self) -> Device {
        self.device.clone()
    }

    fn dtype(&self) -> DType {
        self.dtype
    }
}
