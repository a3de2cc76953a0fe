//! Mixture-of-experts feed-forward (Mixtral, Qwen3-MoE): a router picks the top-k SwiGLU experts of
//! each token (softmax over all experts, optionally renormalized over the chosen ones), and the
//! experts run grouped: each expert multiplies only the rows of the tokens routed to it, gathered
//! into one matrix, and its weighted output is scattered back — never a loop over tokens × experts.

use candle_core::{DType, Tensor};

use super::layers::{grow, silu_mul};
use crate::config::{Architecture, ModelConfig};
use crate::error::{Error, Result};
use crate::weights::{Linear, WeightSource};

#[derive(Debug, Clone)]
struct Expert {
    gate: Linear,
    up: Linear,
    down: Linear,
}

/// One layer's routed experts.
#[derive(Debug, Clone)]
pub(crate) struct Moe {
    router: Linear,
    experts: Vec<Expert>,
    top_k: usize,
    renormalize: bool,
    /// The experts' hidden size.
    inter: usize,
}

/// What routing decides for a batch: per expert, its tokens and their weights.
#[derive(Debug, Default)]
pub(crate) struct Routes {
    rows: Vec<Vec<u32>>,
    weights: Vec<Vec<f32>>,
    p: Vec<f32>,
    order: Vec<usize>,
}

/// The host path's buffers for a layer of experts (reused from step to step).
#[derive(Debug, Default)]
pub(crate) struct MoeScratch {
    routes: Routes,
    logits: Vec<f32>,
    xe: Vec<f32>,
    g: Vec<f32>,
    u: Vec<f32>,
    act: Vec<f32>,
    ye: Vec<f32>,
}

impl Moe {
    /// Loads layer `layer`'s router and experts (HF per-expert tensors, or GGUF's stacked ones).
    pub(crate) fn load(cfg: &ModelConfig, w: &WeightSource, layer: usize) -> Result<Self> {
        let (h, n, inter) = (cfg.hidden_size, cfg.num_experts, cfg.moe_intermediate_size);
        if cfg.num_experts_per_tok == 0 || cfg.num_experts_per_tok > n {
            return Err(Error::Model(format!("{} experts per token of {n}: the model config is inconsistent", cfg.num_experts_per_tok)));
        }
        let p = format!("model.layers.{layer}");
        // HF names: Mixtral's block_sparse_moe.{gate, experts.E.w1/w3/w2}, Qwen3-MoE's
        // mlp.{gate, experts.E.gate_proj/up_proj/down_proj}.
        let (router, prefix, [g, u, d]) = if cfg.architecture == Architecture::Mixtral {
            (format!("{p}.block_sparse_moe.gate"), format!("{p}.block_sparse_moe.experts"), ["w1.weight", "w3.weight", "w2.weight"])
        } else {
            (format!("{p}.mlp.gate"), format!("{p}.mlp.experts"), ["gate_proj.weight", "up_proj.weight", "down_proj.weight"])
        };
        let router =
            if w.is_gguf() { w.linear(&format!("blk.{layer}.ffn_gate_inp"), n, h, false)? } else { w.linear(&router, n, h, false)? };
        let stacked = |kind: &str, hf: &str, rows: usize, cols: usize| {
            w.expert_linears(&format!("blk.{layer}.ffn_{kind}_exps.weight"), &prefix, hf.trim_end_matches(".weight"), n, rows, cols)
        };
        let gates = stacked("gate", g, inter, h)?;
        let ups = stacked("up", u, inter, h)?;
        let downs = stacked("down", d, h, inter)?;
        let experts = gates.into_iter().zip(ups).zip(downs).map(|((gate, up), down)| Expert { gate, up, down }).collect();
        Ok(Self { router, experts, top_k: cfg.num_experts_per_tok, renormalize: cfg.norm_topk_prob, inter })
    }

    /// Routes each token (a row of `logits`, `[tokens, experts]`) to its top-k experts, into `r`
    /// (whose memory is reused).
    fn route(&self, logits: &[f32], r: &mut Routes) {
        let n = self.experts.len();
        r.rows.resize_with(n, Vec::new);
        r.weights.resize_with(n, Vec::new);
        // An expert gets at most one row per token: room for that, so a batch no larger than an
        // earlier one never grows these, however it is routed.
        let t = logits.len() / n;
        r.rows.iter_mut().for_each(|v| {
            v.clear();
            v.reserve(t)
        });
        r.weights.iter_mut().for_each(|v| {
            v.clear();
            v.reserve(t)
        });
        r.order.clear();
        r.order.extend(0..n);
        for (tok, l) in logits.chunks_exact(n).enumerate() {
            let max = l.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
            r.p.clear();
            r.p.extend(l.iter().map(|v| (v - max).exp()));
            let (p, order) = (&r.p, &mut r.order);
            let z: f32 = p.iter().sum();
            // A total order (ties by expert index), so the in-place unstable sort is deterministic.
            order.sort_unstable_by(|&a, &b| p[b].total_cmp(&p[a]).then(a.cmp(&b)));
            let chosen = &order[..self.top_k];
            let norm = if self.renormalize { chosen.iter().map(|&e| p[e]).sum::<f32>() } else { z };
            for &e in chosen {
                r.rows[e].push(tok as u32);
                r.weights[e].push(p[e] / norm);
            }
        }
    }

    /// Whether every weight runs on infer's CPU kernels (for [`forward_host`](Self::forward_host)).
    pub(crate) fn on_infer_kernels(&self) -> bool {
        self.router.on_infer_kernels()
            && self.experts.iter().all(|e| e.gate.on_infer_kernels() && e.up.on_infer_kernels() && e.down.on_infer_kernels())
    }

    /// [`forward`](Self::forward) on host rows: `x`, `out`: `[tokens, hidden]`.
    pub(crate) fn forward_host(&self, x: &[f32], h: usize, out: &mut [f32], s: &mut MoeScratch) -> Result<()> {
        let t = x.len() / h;
        let n = self.experts.len();
        self.router.forward_host(x, t, grow(&mut s.logits, t * n))?;
        self.route(&s.logits, &mut s.routes);
        // Room for an expert that gets every token (the same reasoning as in `route`).
        for (v, width) in [(&mut s.xe, h), (&mut s.g, self.inter), (&mut s.u, self.inter), (&mut s.act, self.inter), (&mut s.ye, h)] {
            grow(v, t * width);
        }
        out.fill(0.0);
        for (e, expert) in self.experts.iter().enumerate() {
            let (rows, weights) = (&s.routes.rows[e], &s.routes.weights[e]);
            let m = rows.len();
            if m == 0 {
                continue;
            }
            let xe = grow(&mut s.xe, m * h);
            for (dst, &r) in xe.chunks_exact_mut(h).zip(rows) {
                dst.copy_from_slice(&x[r as usize * h..(r as usize + 1) * h]);
            }
            let (g, u) = (grow(&mut s.g, m * self.inter), grow(&mut s.u, m * self.inter));
            Linear::forward_many_host([&expert.gate, &expert.up], xe, m, [&mut *g, &mut *u])?;
            let act = grow(&mut s.act, m * self.inter);
            infer_kernels::fused::silu_mul(g, u, self.inter, act);
            let ye = grow(&mut s.ye, m * h);
            expert.down.forward_host(act, m, ye)?;
            for ((y, &r), &w) in ye.chunks_exact(h).zip(rows).zip(weights) {
                out[r as usize * h..(r as usize + 1) * h].iter_mut().zip(y).for_each(|(o, &v)| *o += w * v);
            }
        }
        Ok(())
    }

    /// `x`: `[tokens, hidden]` → `[tokens, hidden]`.
    pub(crate) fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (t, h) = x.dims2()?;
        // Routing on the host (a few floats per token).
        let logits = self.router.forward(x)?.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        let mut routes = Routes::default();
        self.route(&logits, &mut routes);
        let Routes { rows, weights, .. } = routes;
        let mut out = Tensor::zeros((t, h), x.dtype(), x.device())?;
        for (e, expert) in self.experts.iter().enumerate() {
            if rows[e].is_empty() {
                continue;
            }
            let idx = Tensor::new(rows[e].as_slice(), x.device())?;
            let xe = x.index_select(&idx, 0)?;
            let [g, u] = Linear::forward_many([&expert.gate, &expert.up], &xe)?;
            let ye = expert.down.forward(&silu_mul(&g, &u)?)?;
            let we = Tensor::new(weights[e].as_slice(), x.device())?.to_dtype(ye.dtype())?.unsqueeze(1)?;
            out = out.index_add(&idx, &ye.broadcast_mul(&we)?, 0)?;
        }
        Ok(out)
    }
}
