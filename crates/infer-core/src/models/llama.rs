//! The Llama-family decoder (Llama 2/3/3.1/3.2, Mistral, Mixtral, Qwen2/2.5, Qwen3, Qwen3-MoE,
//! Phi-3, SmolLM2), driven by
//! [`ModelConfig`]: RMSNorm, rotary embeddings (with Llama 3 / linear scaling), grouped-query
//! attention over the paged KV cache (optionally windowed, optionally with q/k/v biases or per-head
//! q/k RMSNorm), SwiGLU MLP or routed SwiGLU experts (models/moe.rs), tied or separate output head.

use candle_core::{DType, Device, Tensor};

use super::host::{embed_host, head_host, host_attention_into, HostPath, Workspace};
use super::layers::{
    batch_tensors, check_tokens, grow, output_head, paged_attention_op, silu_mul, silu_mul_fused, wanted_rows, Embeddings, RmsNorm,
    TensorPass,
};
use super::moe::Moe;
use super::rope::{RopeInput, Rotary};
use super::{BatchInput, Decoder};
use crate::config::ModelConfig;
use crate::error::Result;
use crate::kv_cache::PagedKvCache;
use crate::weights::{Linear, WeightSource};

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
            GateUp::Fused(gu) => silu_mul_fused(&gu.forward(x)?),
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

/// A layer's feed-forward block: one MLP, or routed experts.
#[derive(Debug, Clone)]
enum Ffn {
    Dense(Mlp),
    Moe(Moe),
}

#[derive(Debug, Clone)]
struct Layer {
    input_norm: RmsNorm,
    attn: Attention,
    post_norm: RmsNorm,
    ffn: Ffn,
}

/// The decoder.
#[derive(Debug)]
pub struct LlamaModel {
    cfg: ModelConfig,
    embed: Embeddings,
    layers: Vec<Layer>,
    norm: RmsNorm,
    lm_head: Linear,
    rotary: Rotary,
    device: Device,
    dtype: DType,
    /// On the CPU with every weight on infer's kernels: the host path's buffers.
    host: HostPath,
    /// On CUDA with dense weights: the decode step on infer's kernels (cuda_step.rs).
    #[cfg(feature = "cuda")]
    cuda_step: Option<super::cuda_step::CudaStep>,
}

impl LlamaModel {
    /// Builds the model from `w`; `progress` is called after each layer with (done, total).
    pub fn load(cfg: ModelConfig, w: &WeightSource, progress: &mut dyn FnMut(usize, usize)) -> Result<Self> {
        let (h, inter) = (cfg.hidden_size, cfg.intermediate_size);
        let (nh, nkv, hd) = (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim);
        let total = cfg.num_hidden_layers + 2;
        let embed = Embeddings::load(w, "model.embed_tokens.weight", cfg.vocab_size, h)?;
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
                // GGUF files say per layer (a router tensor) which layers have experts.
                ffn: if cfg.num_experts > 0
                    && if w.is_gguf() { w.contains(&format!("blk.{i}.ffn_gate_inp.weight")) } else { !cfg.dense_layers.contains(&i) }
                {
                    Ffn::Moe(Moe::load(&cfg, w, i)?)
                } else {
                    Ffn::Dense(Mlp {
                        gate_up: if fused {
                            GateUp::Fused(w.linear(&format!("{p}.mlp.gate_up_proj"), 2 * inter, h, false)?)
                        } else {
                            GateUp::Separate {
                                gate: w.linear(&format!("{p}.mlp.gate_proj"), inter, h, false)?,
                                up: w.linear(&format!("{p}.mlp.up_proj"), inter, h, false)?,
                            }
                        },
                        down: w.linear(&format!("{p}.mlp.down_proj"), h, inter, false)?,
                    })
                },
            });
            progress(i + 2, total);
        }
        let norm = RmsNorm::load(w, "model.norm.weight", h, cfg.rms_norm_eps)?;
        let lm_head = output_head(&cfg, w)?;
        progress(total, total);
        let rotary = Rotary::new(&cfg, w.device())?;
        let mut model = Self {
            embed,
            layers,
            norm,
            lm_head,
            rotary,
            device: w.device().clone(),
            dtype: w.dtype(),
            cfg,
            host: HostPath::default(),
            #[cfg(feature = "cuda")]
            cuda_step: None,
        };
        model.host = HostPath::new(w, &model.embed, &model.norm, &model.lm_head, model.host_layers());
        #[cfg(feature = "cuda")]
        {
            model.cuda_step = match model.step_weights() {
                Some(sw) => super::cuda_step::CudaStep::new(&sw, &model.device, model.dtype, w.kernels())?,
                None => None,
            };
        }
        Ok(model)
    }

    /// The weights as the CUDA decode step reads them, when every one is a plain tensor and the
    /// layers are dense (no experts).
    #[cfg(feature = "cuda")]
    fn step_weights(&self) -> Option<super::cuda_step::StepWeights<'_>> {
        use super::cuda_step::{StepDims, StepGateUp, StepLayer, StepLinear, StepWeights};
        fn lin(l: &Linear) -> Option<StepLinear<'_>> {
            l.dense().map(|(weight, bias)| StepLinear { weight, bias })
        }
        let Embeddings::Dense(embed) = &self.embed else { return None };
        let mut layers = Vec::with_capacity(self.layers.len());
        for l in &self.layers {
            let a = &l.attn;
            let Ffn::Dense(mlp) = &l.ffn else { return None };
            layers.push(StepLayer {
                input_norm: (&l.input_norm.weight, l.input_norm.eps()),
                qkv: match &a.qkv {
                    Qkv::Separate { q, k, v } => vec![lin(q)?, lin(k)?, lin(v)?],
                    Qkv::Fused(qkv) => vec![lin(qkv)?],
                },
                qk_norm: match (&a.q_norm, &a.k_norm) {
                    (Some(qn), Some(kn)) => Some((&qn.weight, &kn.weight, qn.eps())),
                    (None, None) => None,
                    _ => return None,
                },
                o: lin(&a.o)?,
                post_norm: (&l.post_norm.weight, l.post_norm.eps()),
                gate_up: match &mlp.gate_up {
                    GateUp::Separate { gate, up } => {
                        let (g, u) = (lin(gate)?, lin(up)?);
                        if g.bias.is_some() || u.bias.is_some() {
                            return None;
                        }
                        StepGateUp::Separate(g.weight, u.weight)
                    }
                    GateUp::Fused(gu) => {
                        let gu = lin(gu)?;
                        if gu.bias.is_some() {
                            return None;
                        }
                        StepGateUp::Fused(gu.weight)
                    }
                },
                down: lin(&mlp.down)?,
                window: a.window,
            });
        }
        let c = &self.cfg;
        Some(StepWeights {
            embed,
            layers,
            norm: (&self.norm.weight, self.norm.eps()),
            lm_head: lin(&self.lm_head)?,
            rope: self.rotary.device_freqs()?,
            dims: StepDims {
                hidden: c.hidden_size,
                heads: c.num_attention_heads,
                kv_heads: c.num_key_value_heads,
                head_dim: c.head_dim,
                intermediate: c.intermediate_size,
                vocab: c.vocab_size,
            },
        })
    }

    /// Whether every layer can run on host slices: f32 norms, all linear layers (experts and
    /// routers included) on infer's kernels.
    fn host_layers(&self) -> bool {
        let layer_ok = |l: &Layer| {
            let a = &l.attn;
            let linears_ok = match &a.qkv {
                Qkv::Separate { q, k, v } => q.on_infer_kernels() && k.on_infer_kernels() && v.on_infer_kernels(),
                Qkv::Fused(qkv) => qkv.on_infer_kernels(),
            } && a.o.on_infer_kernels()
                && match &l.ffn {
                    Ffn::Dense(m) => {
                        m.down.on_infer_kernels()
                            && match &m.gate_up {
                                GateUp::Separate { gate, up } => gate.on_infer_kernels() && up.on_infer_kernels(),
                                GateUp::Fused(gu) => gu.on_infer_kernels(),
                            }
                    }
                    Ffn::Moe(moe) => moe.on_infer_kernels(),
                };
            let norms_ok = l.input_norm.has_host_weight()
                && l.post_norm.has_host_weight()
                && a.q_norm.iter().chain(&a.k_norm).all(RmsNorm::has_host_weight);
            linears_ok && norms_ok
        };
        self.layers.iter().all(layer_ok)
    }

    fn attention(&self, layer: usize, x: &Tensor, rope: &RopeInput, pass: &TensorPass<'_>, cache: &mut PagedKvCache) -> Result<Tensor> {
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
        let shape = cache.shape(attn.num_heads, attn.window);
        let out = paged_attention_op(layer, &shape, &q, &k, &v, pass, cache)?;
        attn.o.forward(&out.to_dtype(self.dtype)?)
    }
}

impl Decoder for LlamaModel {
    /// The whole step on host slices in `ws`, the logits into `logits`: the same decoder as
    /// [`Decoder::forward_tensors`]'s tensor path, without a tensor (or any allocation once `ws` has
    /// grown to the batch).
    fn forward_host(&self, batch: &BatchInput, cache: &mut PagedKvCache, ws: &mut Workspace, logits: &mut Vec<f32>) -> Result<()> {
        check_tokens(batch, self.cfg.vocab_size)?;
        let (t, hs) = (batch.num_tokens(), self.cfg.hidden_size);
        embed_host(&self.embed, &batch.tokens, hs, 1.0, &mut ws.x)?;
        self.rotary.tables_into(&batch.positions, &mut ws.cos, &mut ws.sin);
        let seqs = ws.seqs(batch);
        match self.layers.first() {
            Some(l) => l.input_norm.forward_host(&ws.x, grow(&mut ws.h, t * hs)),
            None => grow(&mut ws.h, t * hs).copy_from_slice(&ws.x),
        }
        for (i, layer) in self.layers.iter().enumerate() {
            let attn = &layer.attn;
            let (nh, nkv, hd) = (attn.num_heads, attn.num_kv_heads, attn.head_dim);
            let (q, k, v) = (grow(&mut ws.q, t * nh * hd), grow(&mut ws.k, t * nkv * hd), grow(&mut ws.v, t * nkv * hd));
            match &attn.qkv {
                Qkv::Separate { q: wq, k: wk, v: wv } => Linear::forward_many_host([wq, wk, wv], &ws.h, t, [q, k, v])?,
                Qkv::Fused(wqkv) => {
                    let (nq, nk) = (nh * hd, nkv * hd);
                    let y = grow(&mut ws.tmp, t * (nq + 2 * nk));
                    wqkv.forward_host(&ws.h, t, y)?;
                    for (r, row) in y.chunks_exact(nq + 2 * nk).enumerate() {
                        q[r * nq..(r + 1) * nq].copy_from_slice(&row[..nq]);
                        k[r * nk..(r + 1) * nk].copy_from_slice(&row[nq..nq + nk]);
                        v[r * nk..(r + 1) * nk].copy_from_slice(&row[nq + nk..]);
                    }
                }
            }
            if let (Some(qn), Some(kn)) = (&attn.q_norm, &attn.k_norm) {
                qn.forward_host(&ws.q, grow(&mut ws.tmp, t * nh * hd));
                std::mem::swap(&mut ws.q, &mut ws.tmp);
                kn.forward_host(&ws.k, grow(&mut ws.tmp, t * nkv * hd));
                std::mem::swap(&mut ws.k, &mut ws.tmp);
            }
            self.rotary.apply_host(&mut ws.q, nh, hd, &ws.cos, &ws.sin);
            self.rotary.apply_host(&mut ws.k, nkv, hd, &ws.cos, &ws.sin);
            let shape = cache.shape(nh, attn.window);
            let out = grow(&mut ws.attn, t * nh * hd);
            host_attention_into(ws.isa, cache.layer_mut(i), &ws.q, &ws.k, &ws.v, &batch.slots, &seqs, &shape, out)?;
            attn.o.forward_host(&ws.attn, t, grow(&mut ws.a, t * hs))?;
            layer.post_norm.add_forward_host(&ws.x, &ws.a, grow(&mut ws.x1, t * hs), &mut ws.h);
            std::mem::swap(&mut ws.x, &mut ws.x1);
            match &layer.ffn {
                Ffn::Dense(mlp) => {
                    let inter = self.cfg.intermediate_size;
                    let act = grow(&mut ws.act, t * inter);
                    match &mlp.gate_up {
                        GateUp::Separate { gate, up } => {
                            let (g, u) = (grow(&mut ws.gate, t * inter), grow(&mut ws.up, t * inter));
                            Linear::forward_many_host([gate, up], &ws.h, t, [&mut *g, &mut *u])?;
                            infer_kernels::fused::silu_mul(g, u, inter, act);
                        }
                        GateUp::Fused(gu) => {
                            let y = grow(&mut ws.tmp, t * 2 * inter);
                            gu.forward_host(&ws.h, t, y)?;
                            infer_kernels::fused::silu_mul_fused(y, inter, act);
                        }
                    }
                    mlp.down.forward_host(&ws.act, t, grow(&mut ws.m, t * hs))?;
                }
                Ffn::Moe(moe) => moe.forward_host(&ws.h, hs, grow(&mut ws.m, t * hs), &mut ws.moe)?,
            }
            match self.layers.get(i + 1) {
                Some(next) => {
                    next.input_norm.add_forward_host(&ws.x, &ws.m, grow(&mut ws.x1, t * hs), &mut ws.h);
                    std::mem::swap(&mut ws.x, &mut ws.x1);
                }
                None => ws.x.iter_mut().zip(&ws.m).for_each(|(x, m)| *x += m),
            }
        }
        ws.give_back(seqs);
        let scratch = (&mut ws.x1, &mut ws.h);
        head_host(&ws.x, hs, &batch.logits_rows, &self.norm, &self.lm_head, self.cfg.vocab_size, scratch, batch.hidden, logits)
    }

    fn forward_tensors(&self, batch: &BatchInput, cache: &mut PagedKvCache) -> Result<Tensor> {
        let (ids, positions) = batch_tensors(batch, self.cfg.vocab_size, &self.device)?;
        let rope = self.rotary.prepare(&positions, &batch.positions, self.dtype)?;
        let pass = TensorPass::new(batch, cache, &self.device)?;
        let mut x = self.embed.select(&ids)?;
        let mut h = match self.layers.first() {
            Some(l) => l.input_norm.forward(&x)?,
            None => x.clone(),
        };
        for (i, layer) in self.layers.iter().enumerate() {
            let a = self.attention(i, &h, &rope, &pass, cache)?;
            // Residual adds fused with the norm that follows each (one kernel on CUDA).
            let (x1, h1) = layer.post_norm.add_forward(&x, &a)?;
            let m = match &layer.ffn {
                Ffn::Dense(mlp) => mlp.down.forward(&mlp.gate_up.silu_mul(&h1)?)?,
                Ffn::Moe(moe) => moe.forward(&h1)?,
            };
            match self.layers.get(i + 1) {
                Some(next) => (x, h) = next.input_norm.add_forward(&x1, &m)?,
                None => x = (x1 + m)?,
            }
        }
        let Some(x) = wanted_rows(&x, batch)? else {
            return Ok(Tensor::zeros((0, self.cfg.vocab_size), DType::F32, &self.device)?);
        };
        let x = self.norm.forward(&x)?;
        if batch.hidden {
            return Ok(x.to_dtype(DType::F32)?.contiguous()?);
        }
        Ok(self.lm_head.forward(&x)?.to_dtype(DType::F32)?.contiguous()?)
    }

    fn parts(&self) -> (&ModelConfig, &Device, DType, &HostPath) {
        (&self.cfg, &self.device, self.dtype, &self.host)
    }

    #[cfg(feature = "cuda")]
    fn forward_step(&self, batch: &BatchInput, cache: &mut PagedKvCache, logits: &mut Vec<f32>) -> Option<Result<()>> {
        self.cuda_step.as_ref()?.run(batch, cache, logits)
    }
}
