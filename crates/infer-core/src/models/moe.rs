//! Mixture-of-experts feed-forward (Mixtral, Qwen3-MoE): a router picks the top-k SwiGLU experts of
//! each token (softmax over all experts, optionally renormalized over the chosen ones), and the
//! experts run grouped: each expert multiplies only the rows of the tokens routed to it, gathered
//! into one matrix, and its weighted output is scattered back — never a loop over tokens × experts.

use candle_core::{DType, Tensor};

use super::layers::silu_mul;
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
        Ok(Self { router, experts, top_k: cfg.num_experts_per_tok, renormalize: cfg.norm_topk_prob })
    }

    /// `x`: `[tokens, hidden]` → `[tokens, hidden]`.
    pub(crate) fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (t, h) = x.dims2()?;
        let logits = self.router.forward(x)?.to_dtype(DType::F32)?.to_vec2::<f32>()?;
        // Routing on the host (a few floats per token): per expert, its tokens and their weights.
        let n = self.experts.len();
        let mut rows: Vec<Vec<u32>> = vec![Vec::new(); n];
        let mut weights: Vec<Vec<f32>> = vec![Vec::new(); n];
        let mut order: Vec<usize> = (0..n).collect();
        for (tok, l) in logits.iter().enumerate() {
            let max = l.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
            let p: Vec<f32> = l.iter().map(|v| (v - max).exp()).collect();
            let z: f32 = p.iter().sum();
            order.sort_by(|&a, &b| p[b].total_cmp(&p[a]).then(a.cmp(&b)));
            let chosen = &order[..self.top_k];
            let norm = if self.renormalize { chosen.iter().map(|&e| p[e]).sum::<f32>() } else { z };
            for &e in chosen {
                rows[e].push(tok as u32);
                weights[e].push(p[e] / norm);
            }
        }
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
