//! Model configuration: one normalized [`ModelConfig`] for every supported family ([`Architecture`]),
//! read from a HF `config.json` or from GGUF metadata, plus the generation defaults of
//! `generation_config.json`.

use std::path::Path;

use serde::Deserialize;

use crate::error::{Error, Result};

/// The decoder families infer implements: the Llama family shares one config-driven decoder
/// (models/llama.rs), Gemma 2/3 have their own (models/gemma.rs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Architecture {
    /// Llama 2/3/3.1/3.2, SmolLM2 and other `LlamaForCausalLM` models.
    Llama,
    /// Mistral (optionally with a sliding attention window).
    Mistral,
    /// Qwen2 / Qwen2.5 (biases on q/k/v).
    Qwen2,
    /// Qwen3 dense models (RMSNorm on each query and key head, no q/k/v biases).
    Qwen3,
    /// Phi-3 / Phi-3.5 / Phi-4-mini (fused qkv and gate_up projections, LongRoPE, partial rotary).
    Phi3,
    /// Mixtral (Llama/Mistral attention, top-k routed SwiGLU experts).
    Mixtral,
    /// Qwen3-MoE (Qwen3 attention, top-k routed experts).
    Qwen3Moe,
    /// Gemma 2 (logit soft-capping, alternating sliding-window layers, pre/post norms, GELU).
    Gemma2,
    /// Gemma 3, text part (local/global layers with their own rotary bases, q/k norms).
    Gemma3,
}

impl Architecture {
    /// The Gemma decoders (models/gemma.rs).
    pub fn is_gemma(self) -> bool {
        matches!(self, Self::Gemma2 | Self::Gemma3)
    }
}

/// The MLP's gate activation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    Silu,
    /// GELU with the tanh approximation (`gelu_pytorch_tanh`).
    GeluTanh,
}

impl Architecture {
    /// What `model_type` (HF) / `general.architecture` (GGUF) values are accepted, for error messages.
    pub const SUPPORTED: &'static str =
        "llama (Llama 2/3/3.1/3.2, SmolLM2), mistral, mixtral, qwen2 (Qwen2/2.5), qwen3, qwen3_moe (GGUF: qwen3moe), phi3 (Phi-3/3.5), gemma2, gemma3_text (GGUF: gemma3)";

    fn from_name(name: &str) -> Option<Self> {
        match name {
            "llama" | "smollm" | "smollm2" => Some(Self::Llama),
            "mistral" => Some(Self::Mistral),
            "qwen2" => Some(Self::Qwen2),
            "qwen3" => Some(Self::Qwen3),
            "phi3" => Some(Self::Phi3),
            "mixtral" => Some(Self::Mixtral),
            "qwen3_moe" | "qwen3moe" => Some(Self::Qwen3Moe),
            "gemma2" => Some(Self::Gemma2),
            "gemma3_text" | "gemma3" => Some(Self::Gemma3),
            _ => None,
        }
    }
}

/// How rotary position embedding frequencies are scaled for long contexts.
#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    /// Llama 3.1's piecewise frequency scaling.
    Llama3 { factor: f64, low_freq_factor: f64, high_freq_factor: f64, original_max_position_embeddings: f64 },
    /// Positions divided by `factor`.
    Linear { factor: f64 },
    /// Per-frequency divisors given as a tensor (GGUF's `rope_freqs.weight`).
    FreqFactors(Vec<f32>),
    /// LongRoPE (Phi-3 "longrope"/"su"): per-frequency divisors `short` for positions below
    /// `original_max` and `long` from there on (chosen per position, as vLLM does), cos/sin scaled
    /// by `attention_factor`.
    LongRope { short: Vec<f64>, long: Vec<f64>, original_max: f64, attention_factor: f64 },
}

/// The configuration the decoder is built from.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    pub architecture: Architecture,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub rope_scaling: Option<RopeScaling>,
    /// Leading dimensions of each head that are rotated (`head_dim` unless a partial rotary factor
    /// says otherwise).
    pub rotary_dim: usize,
    /// GGUF Llama weights have q/k rows permuted for interleaved (GPT-J style) rotary embedding.
    pub rope_interleaved: bool,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    /// Biases on the q/k/v projections (Qwen2).
    pub attention_bias: bool,
    /// RMSNorm over each query and key head before the rotary embedding (Qwen3).
    pub qk_norm: bool,
    /// Sliding attention window, applied to layers `>= sliding_window_from_layer`, or to the layers
    /// `sliding_layers` marks when it is set.
    pub sliding_window: Option<usize>,
    pub sliding_window_from_layer: usize,
    pub sliding_layers: Option<Vec<bool>>,
    pub activation: Activation,
    /// Attention-logit and final-logit soft-capping (Gemma 2).
    pub attn_softcap: Option<f64>,
    pub final_softcap: Option<f64>,
    /// Queries are scaled by `query_pre_attn_scalar^-1/2` instead of `head_dim^-1/2` (Gemma).
    pub query_pre_attn_scalar: Option<f64>,
    /// Mixture of experts: `num_experts` experts of `moe_intermediate_size` (0: dense MLPs), the
    /// top `num_experts_per_tok` of which each token uses, with their routing weights renormalized
    /// to sum to 1 when `norm_topk_prob`; layers in `dense_layers` keep a dense MLP.
    pub num_experts: usize,
    pub num_experts_per_tok: usize,
    pub moe_intermediate_size: usize,
    pub norm_topk_prob: bool,
    pub dense_layers: Vec<usize>,
    /// Rotary base and scaling of the sliding-window layers when they differ (Gemma 3).
    pub local_rope_theta: Option<f64>,
    pub local_rope_scaling: Option<RopeScaling>,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
}

/// Most layers a model file may declare (the largest real models have about 128).
pub const MAX_LAYERS: usize = 1024;
/// Longest context a model file may declare (16M tokens; the longest real ones have 10M).
pub const MAX_CONTEXT: usize = 1 << 24;

/// Refuses an implausible layer count before anything is sized by it.
fn check_layer_count(n: usize, path: &Path) -> Result<()> {
    if n > MAX_LAYERS {
        return Err(Error::bad_file(path, format!("the model declares {n} layers, more than any real model's ({MAX_LAYERS} at most)")));
    }
    Ok(())
}

impl ModelConfig {
    /// The sliding window of layer `layer`, if it has one.
    pub fn window_for_layer(&self, layer: usize) -> Option<usize> {
        match &self.sliding_layers {
            Some(s) => self.sliding_window.filter(|_| s.get(layer).copied().unwrap_or(false)),
            None => self.sliding_window.filter(|_| layer >= self.sliding_window_from_layer),
        }
    }

    /// Whether layer `layer` is a sliding-window (local) layer.
    pub fn is_local_layer(&self, layer: usize) -> bool {
        self.window_for_layer(layer).is_some()
    }

    fn validate(self, path: &Path) -> Result<Self> {
        let bad = |msg: String| Err(Error::bad_file(path, msg));
        // Sizes no real model has: a file claiming them is broken or hostile, and would make the
        // loader or the KV cache allocate without bound.
        for (name, v, max) in [
            ("vocab_size", self.vocab_size, 1 << 22),
            ("hidden_size", self.hidden_size, 1 << 17),
            ("intermediate_size", self.intermediate_size, 1 << 20),
            ("num_attention_heads", self.num_attention_heads, 1 << 12),
            ("num_key_value_heads", self.num_key_value_heads, 1 << 12),
            ("head_dim", self.head_dim, 1 << 12),
            ("max_position_embeddings", self.max_position_embeddings, MAX_CONTEXT),
        ] {
            if v > max {
                return bad(format!("`{name}` is {v}, more than any real model's ({max} at most)"));
            }
        }
        if self.sliding_window == Some(0) {
            return bad("`sliding_window` is 0; a window must hold at least one token".into());
        }
        for (name, v) in [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("num_key_value_heads", self.num_key_value_heads),
            ("head_dim", self.head_dim),
        ] {
            if v == 0 {
                return bad(format!("`{name}` must be positive"));
            }
        }
        if !self.num_attention_heads.is_multiple_of(self.num_key_value_heads) {
            return bad(format!(
                "num_attention_heads ({}) is not a multiple of num_key_value_heads ({})",
                self.num_attention_heads, self.num_key_value_heads
            ));
        }
        if !self.head_dim.is_multiple_of(2) {
            return bad(format!("head_dim ({}) must be even for rotary embeddings", self.head_dim));
        }
        if self.rotary_dim == 0 || !self.rotary_dim.is_multiple_of(2) || self.rotary_dim > self.head_dim {
            return bad(format!("the rotary dimension ({}) must be even and at most head_dim ({})", self.rotary_dim, self.head_dim));
        }
        if let Some(RopeScaling::LongRope { short, long, .. }) = &self.rope_scaling {
            let want = self.rotary_dim / 2;
            if short.len() != want || long.len() != want {
                return bad(format!(
                    "longrope short_factor/long_factor have {}/{} entries; the rotary dimension {} needs {want}",
                    short.len(),
                    long.len(),
                    self.rotary_dim
                ));
            }
        }
        Ok(self)
    }

    /// Reads a Hugging Face `config.json`.
    pub fn from_hf_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        Self::from_hf_json(&text, path)
    }

    /// Parses the text of a Hugging Face `config.json` (`path` is used in error messages).
    pub fn from_hf_json(text: &str, path: &Path) -> Result<Self> {
        let de = &mut serde_json::Deserializer::from_str(text);
        let raw: HfConfig = serde_path_to_error::deserialize(de).map_err(|e| {
            let field = e.path().to_string();
            let inner = e.into_inner();
            if field == "." || field.is_empty() {
                Error::bad_file(path, format!("not a valid config.json: {inner}"))
            } else {
                Error::bad_file(path, format!("field `{field}`: {inner}"))
            }
        })?;
        let model_type = raw.model_type.clone().unwrap_or_default();
        let architecture = Architecture::from_name(&model_type).ok_or_else(|| Error::UnsupportedArchitecture {
            arch: if model_type.is_empty() { "<missing model_type>".into() } else { model_type.clone() },
            path: path.to_path_buf(),
            supported: Architecture::SUPPORTED.into(),
        })?;
        // transformers >= 5 moves the rotary settings into `rope_parameters`, per layer type where
        // they differ (Gemma 3: `full_attention` / `sliding_attention`).
        let rope_all = raw.rope_parameters.as_ref().or(raw.rope_scaling.as_ref());
        let (rope, rope_local) = match rope_all {
            Some(r) if r.get("full_attention").is_some() => (r.get("full_attention"), r.get("sliding_attention")),
            _ => (rope_all, None),
        };
        let rope_theta = rope.and_then(|r| r.get("rope_theta")).and_then(|v| v.as_f64()).or(raw.rope_theta).unwrap_or(10_000.0);
        let max_position_embeddings = raw.max_position_embeddings.unwrap_or(4096);
        check_layer_count(raw.num_hidden_layers, path)?;
        let original_max = rope
            .and_then(|r| r.get("original_max_position_embeddings"))
            .and_then(|v| v.as_f64())
            .or(raw.original_max_position_embeddings.map(|v| v as f64));
        let rope_scaling = match rope {
            Some(r) => parse_rope_scaling(r, path, max_position_embeddings as f64, original_max)?,
            None => None,
        };
        let num_attention_heads = raw.num_attention_heads;
        let head_dim = raw.head_dim.unwrap_or(raw.hidden_size / num_attention_heads.max(1));
        let partial =
            rope.and_then(|r| r.get("partial_rotary_factor")).and_then(|v| v.as_f64()).or(raw.partial_rotary_factor).unwrap_or(1.0);
        let local_rope_scaling = match rope_local {
            Some(r) => parse_rope_scaling(r, path, max_position_embeddings as f64, original_max)?,
            None => None,
        };
        let local_rope_theta = rope_local
            .and_then(|r| r.get("rope_theta"))
            .and_then(|v| v.as_f64())
            .or(raw.rope_local_base_freq)
            .or(if architecture == Architecture::Gemma3 { Some(10_000.0) } else { None });
        let sliding_layers = match (&raw.layer_types, architecture) {
            (Some(t), _) => Some(t.iter().map(|t| t == "sliding_attention").collect()),
            (None, Architecture::Gemma2) => Some((0..raw.num_hidden_layers).map(|i| i % 2 == 0).collect()),
            (None, Architecture::Gemma3) => {
                let p = raw.sliding_window_pattern.unwrap_or(6).max(1);
                Some((0..raw.num_hidden_layers).map(|i| (i + 1) % p != 0).collect())
            }
            _ => None,
        };
        let activation = match raw.hidden_activation.as_deref().or(raw.hidden_act.as_deref()) {
            None | Some("silu") | Some("swish") => Activation::Silu,
            Some("gelu_pytorch_tanh") | Some("gelu_tanh") | Some("gelu_new") => Activation::GeluTanh,
            Some(other) => return Err(Error::bad_file(path, format!("activation `{other}` is not supported (silu, gelu_pytorch_tanh)"))),
        };
        let num_experts = raw.num_local_experts.or(raw.num_experts).unwrap_or(0);
        // Qwen3-MoE: layers listed in mlp_only_layers, and those off the decoder_sparse_step, are dense.
        let step = raw.decoder_sparse_step.unwrap_or(1).max(1);
        let dense_layers: Vec<usize> = (0..raw.num_hidden_layers)
            .filter(|&i| raw.mlp_only_layers.as_ref().is_some_and(|l| l.contains(&i)) || (i + 1) % step != 0)
            .collect();
        let (sliding_window, sliding_window_from_layer) = match architecture {
            Architecture::Qwen2 | Architecture::Qwen3 | Architecture::Qwen3Moe if !raw.use_sliding_window.unwrap_or(false) => (None, 0),
            Architecture::Qwen2 | Architecture::Qwen3 | Architecture::Qwen3Moe => (raw.sliding_window, raw.max_window_layers.unwrap_or(0)),
            _ => (raw.sliding_window, 0),
        };
        Self {
            architecture,
            vocab_size: raw.vocab_size,
            hidden_size: raw.hidden_size,
            intermediate_size: raw.intermediate_size,
            num_hidden_layers: raw.num_hidden_layers,
            num_attention_heads,
            num_key_value_heads: raw.num_key_value_heads.unwrap_or(num_attention_heads),
            head_dim,
            rms_norm_eps: raw.rms_norm_eps.unwrap_or(1e-6),
            rope_theta,
            rope_scaling,
            rotary_dim: (head_dim as f64 * partial) as usize,
            rope_interleaved: false,
            max_position_embeddings,
            // Gemma configs tie the head to the embeddings unless they say otherwise.
            tie_word_embeddings: raw.tie_word_embeddings.unwrap_or(architecture.is_gemma()),
            attention_bias: architecture == Architecture::Qwen2 || raw.attention_bias.unwrap_or(false),
            qk_norm: matches!(architecture, Architecture::Qwen3 | Architecture::Qwen3Moe | Architecture::Gemma3),
            sliding_window,
            sliding_window_from_layer,
            sliding_layers,
            num_experts,
            num_experts_per_tok: raw.num_experts_per_tok.unwrap_or(if num_experts > 0 { 2 } else { 0 }),
            moe_intermediate_size: raw.moe_intermediate_size.unwrap_or(raw.intermediate_size),
            // Mixtral always renormalizes the top-k weights; Qwen3-MoE says so in its config.
            norm_topk_prob: architecture == Architecture::Mixtral || raw.norm_topk_prob.unwrap_or(false),
            dense_layers: if num_experts > 0 { dense_layers } else { Vec::new() },
            activation,
            attn_softcap: raw.attn_logit_softcapping,
            final_softcap: raw.final_logit_softcapping,
            query_pre_attn_scalar: raw.query_pre_attn_scalar,
            local_rope_theta,
            local_rope_scaling,
            bos_token_id: raw.bos_token_id,
            eos_token_ids: raw.eos_token_id.map(|e| e.into_vec()).unwrap_or_default(),
        }
        .validate(path)
    }

    /// Builds the config from GGUF metadata and what the file's tensors tell (see [`GgufTensors`]).
    pub fn from_gguf(md: &GgufMeta<'_>, path: &Path, tensors: GgufTensors) -> Result<Self> {
        let GgufTensors { has_output, has_qkv_bias, rope_freqs, rope_factors, embedding_rows } = tensors;
        let arch_name = md.string("general.architecture")?;
        let architecture = Architecture::from_name(&arch_name).ok_or_else(|| Error::UnsupportedArchitecture {
            arch: arch_name.clone(),
            path: path.to_path_buf(),
            supported: Architecture::SUPPORTED.into(),
        })?;
        let key = |k: &str| format!("{arch_name}.{k}");
        let hidden_size = md.usize(&key("embedding_length"))?;
        let num_attention_heads = md.usize(&key("attention.head_count"))?;
        let num_key_value_heads = md.usize_opt(&key("attention.head_count_kv"))?.unwrap_or(num_attention_heads);
        let head_dim = match md.usize_opt(&key("attention.key_length"))? {
            Some(d) => d,
            None => hidden_size / num_attention_heads.max(1),
        };
        let max_position_embeddings = md.usize_opt(&key("context_length"))?.unwrap_or(4096);
        let rope_scaling = match (rope_freqs, md.string_opt(&key("rope.scaling.type"))?) {
            (Some(f), _) => Some(RopeScaling::FreqFactors(f)),
            (None, _) if rope_factors.is_some() => {
                let (long, short) = rope_factors.expect("checked");
                let original_max = md.usize_opt(&key("rope.scaling.original_context_length"))?.unwrap_or(max_position_embeddings) as f64;
                let factor = max_position_embeddings as f64 / original_max;
                let default = if factor <= 1.0 { 1.0 } else { (1.0 + factor.ln() / original_max.ln()).sqrt() };
                Some(RopeScaling::LongRope {
                    short: short.into_iter().map(f64::from).collect(),
                    long: long.into_iter().map(f64::from).collect(),
                    original_max,
                    attention_factor: md.f64_opt(&key("rope.scaling.attn_factor"))?.unwrap_or(default),
                })
            }
            (None, Some(t)) if t == "linear" => Some(RopeScaling::Linear { factor: md.f64(&key("rope.scaling.factor"))? }),
            (None, Some(t)) if t == "none" => None,
            (None, Some(t)) => {
                return Err(Error::bad_file(
                    path,
                    format!("rope scaling type `{t}` is not supported (supported: linear, llama3 via rope_freqs)"),
                ))
            }
            (None, None) => None,
        };
        let eos = md.u32_opt("tokenizer.ggml.eos_token_id")?;
        let num_hidden_layers = md.usize(&key("block_count"))?;
        check_layer_count(num_hidden_layers, path)?;
        // As llama.cpp: Gemma 2 alternates sliding and global layers (even ones slide), Gemma 3 has
        // five sliding layers per global one with a rotary base of 10000, and the 27B models scale
        // queries by (hidden / heads)^-1/2 instead of head_dim^-1/2.
        let sliding_layers = match architecture {
            Architecture::Gemma2 => Some((0..num_hidden_layers).map(|i| i % 2 == 0).collect()),
            Architecture::Gemma3 => Some((0..num_hidden_layers).map(|i| (i + 1) % 6 != 0).collect()),
            _ => None,
        };
        let num_experts = md.usize_opt(&key("expert_count"))?.unwrap_or(0);
        // llama.cpp stores Mixtral as `llama` with experts.
        let architecture = if architecture == Architecture::Llama && num_experts > 0 { Architecture::Mixtral } else { architecture };
        let query_pre_attn_scalar = match (architecture, num_hidden_layers) {
            (Architecture::Gemma2, 46) | (Architecture::Gemma3, 62) => Some((hidden_size / num_attention_heads.max(1)) as f64),
            _ => None,
        };
        Self {
            architecture,
            vocab_size: md.usize_opt(&key("vocab_size"))?.or(embedding_rows).unwrap_or(0),
            hidden_size,
            intermediate_size: md.usize(&key("feed_forward_length"))?,
            num_hidden_layers,
            num_attention_heads,
            num_key_value_heads,
            head_dim,
            rms_norm_eps: md.f64_opt(&key("attention.layer_norm_rms_epsilon"))?.unwrap_or(1e-5),
            rope_theta: md.f64_opt(&key("rope.freq_base"))?.unwrap_or(10_000.0),
            rope_scaling,
            rotary_dim: md.usize_opt(&key("rope.dimension_count"))?.unwrap_or(head_dim),
            // llama.cpp permutes q/k rows for interleaved rotary in `llama`-arch files (Mixtral too).
            rope_interleaved: arch_name == "llama",
            max_position_embeddings,
            tie_word_embeddings: !has_output,
            attention_bias: has_qkv_bias,
            qk_norm: matches!(architecture, Architecture::Qwen3 | Architecture::Qwen3Moe | Architecture::Gemma3),
            sliding_window: md.usize_opt(&key("attention.sliding_window"))?,
            num_experts,
            num_experts_per_tok: md.usize_opt(&key("expert_used_count"))?.unwrap_or(0),
            moe_intermediate_size: match md.usize_opt(&key("expert_feed_forward_length"))? {
                Some(n) => n,
                None => md.usize(&key("feed_forward_length"))?,
            },
            // llama.cpp: Mixtral renormalizes; Qwen3-MoE files carry the flag (`expert_weights_norm`).
            norm_topk_prob: architecture == Architecture::Mixtral
                || md.bool_opt(&key("expert_weights_norm"))?.unwrap_or(architecture == Architecture::Qwen3Moe),
            dense_layers: Vec::new(),
            sliding_window_from_layer: 0,
            sliding_layers,
            activation: if architecture.is_gemma() { Activation::GeluTanh } else { Activation::Silu },
            attn_softcap: md.f64_opt(&key("attn_logit_softcapping"))?,
            final_softcap: md.f64_opt(&key("final_logit_softcapping"))?,
            query_pre_attn_scalar,
            local_rope_theta: if architecture == Architecture::Gemma3 { Some(10_000.0) } else { None },
            local_rope_scaling: None,
            bos_token_id: md.u32_opt("tokenizer.ggml.bos_token_id")?,
            eos_token_ids: eos.into_iter().collect(),
        }
        .validate(path)
    }
}

/// What a GGUF file's tensors tell about its configuration.
#[derive(Debug, Default)]
pub struct GgufTensors {
    /// A separate output head exists (else it is tied to the embeddings).
    pub has_output: bool,
    /// The q/k/v projections have biases.
    pub has_qkv_bias: bool,
    /// `rope_freqs.weight` (Llama 3.1 frequency divisors).
    pub rope_freqs: Option<Vec<f32>>,
    /// `rope_factors_long.weight` and `rope_factors_short.weight` (LongRoPE).
    pub rope_factors: Option<(Vec<f32>, Vec<f32>)>,
    /// Rows of `token_embd.weight`, for files without `{arch}.vocab_size`.
    pub embedding_rows: Option<usize>,
}

fn parse_rope_scaling(r: &serde_json::Value, path: &Path, max_pos: f64, original_max: Option<f64>) -> Result<Option<RopeScaling>> {
    let kind = r.get("rope_type").or_else(|| r.get("type")).and_then(|v| v.as_str()).unwrap_or("default");
    let num = |k: &str| {
        r.get(k).and_then(|v| v.as_f64()).ok_or_else(|| Error::bad_file(path, format!("rope scaling `{kind}` needs a numeric `{k}`")))
    };
    Ok(match kind {
        "default" => None,
        "linear" => Some(RopeScaling::Linear { factor: num("factor")? }),
        "longrope" | "su" => {
            let factors = |k: &str| -> Result<Vec<f64>> {
                r.get(k)
                    .and_then(|v| v.as_array())
                    .and_then(|a| a.iter().map(|x| x.as_f64()).collect::<Option<Vec<_>>>())
                    .ok_or_else(|| Error::bad_file(path, format!("rope scaling `{kind}` needs a numeric array `{k}`")))
            };
            let original_max =
                original_max.ok_or_else(|| Error::bad_file(path, "rope scaling `longrope` needs `original_max_position_embeddings`"))?;
            // As transformers: the factor defaults to max / original positions, and the cos/sin
            // scale to sqrt(1 + ln(factor) / ln(original)).
            let factor = r.get("factor").and_then(|v| v.as_f64()).unwrap_or(max_pos / original_max);
            let attention_factor = r.get("attention_factor").and_then(|v| v.as_f64()).unwrap_or(if factor <= 1.0 {
                1.0
            } else {
                (1.0 + factor.ln() / original_max.ln()).sqrt()
            });
            Some(RopeScaling::LongRope { short: factors("short_factor")?, long: factors("long_factor")?, original_max, attention_factor })
        }
        "llama3" => Some(RopeScaling::Llama3 {
            factor: num("factor")?,
            low_freq_factor: num("low_freq_factor")?,
            high_freq_factor: num("high_freq_factor")?,
            original_max_position_embeddings: num("original_max_position_embeddings")?,
        }),
        other => {
            return Err(Error::bad_file(
                path,
                format!("rope scaling type `{other}` is not supported (supported: default, linear, llama3, longrope)"),
            ))
        }
    })
}

#[derive(Deserialize)]
#[serde(untagged)]
enum OneOrMany {
    One(u32),
    Many(Vec<u32>),
}

impl OneOrMany {
    fn into_vec(self) -> Vec<u32> {
        match self {
            OneOrMany::One(x) => vec![x],
            OneOrMany::Many(v) => v,
        }
    }
}

#[derive(Deserialize)]
struct HfConfig {
    model_type: Option<String>,
    vocab_size: usize,
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    rms_norm_eps: Option<f64>,
    rope_theta: Option<f64>,
    rope_scaling: Option<serde_json::Value>,
    rope_parameters: Option<serde_json::Value>,
    partial_rotary_factor: Option<f64>,
    layer_types: Option<Vec<String>>,
    #[serde(alias = "_sliding_window_pattern")]
    sliding_window_pattern: Option<usize>,
    hidden_activation: Option<String>,
    hidden_act: Option<String>,
    attn_logit_softcapping: Option<f64>,
    final_logit_softcapping: Option<f64>,
    query_pre_attn_scalar: Option<f64>,
    rope_local_base_freq: Option<f64>,
    num_local_experts: Option<usize>,
    num_experts: Option<usize>,
    num_experts_per_tok: Option<usize>,
    moe_intermediate_size: Option<usize>,
    norm_topk_prob: Option<bool>,
    mlp_only_layers: Option<Vec<usize>>,
    decoder_sparse_step: Option<usize>,
    original_max_position_embeddings: Option<usize>,
    max_position_embeddings: Option<usize>,
    tie_word_embeddings: Option<bool>,
    attention_bias: Option<bool>,
    sliding_window: Option<usize>,
    use_sliding_window: Option<bool>,
    max_window_layers: Option<usize>,
    bos_token_id: Option<u32>,
    eos_token_id: Option<OneOrMany>,
}

/// Generation defaults from `generation_config.json`.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct GenerationConfig {
    #[serde(default, deserialize_with = "one_or_many")]
    pub eos_token_id: Vec<u32>,
    pub bos_token_id: Option<u32>,
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    pub top_k: Option<usize>,
    pub repetition_penalty: Option<f32>,
    pub do_sample: Option<bool>,
}

fn one_or_many<'de, D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Vec<u32>, D::Error> {
    Ok(Option::<OneOrMany>::deserialize(d)?.map(OneOrMany::into_vec).unwrap_or_default())
}

impl GenerationConfig {
    /// Reads `generation_config.json`.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let de = &mut serde_json::Deserializer::from_str(&text);
        serde_path_to_error::deserialize(de).map_err(|e| Error::bad_file(path, format!("field `{}`: {}", e.path(), e.inner())))
    }
}

/// Typed access to GGUF metadata with errors that name the file and the key.
pub struct GgufMeta<'a> {
    pub(crate) md: &'a std::collections::HashMap<String, candle_core::quantized::gguf_file::Value>,
    pub(crate) path: &'a Path,
}

impl GgufMeta<'_> {
    fn get(&self, key: &str) -> Option<&candle_core::quantized::gguf_file::Value> {
        self.md.get(key)
    }
    fn missing(&self, key: &str) -> Error {
        Error::bad_file(self.path, format!("GGUF metadata key `{key}` is missing"))
    }
    fn wrong(&self, key: &str, e: candle_core::Error) -> Error {
        Error::bad_file(self.path, format!("GGUF metadata key `{key}` has the wrong type: {e}"))
    }
    pub fn string_opt(&self, key: &str) -> Result<Option<String>> {
        self.get(key).map(|v| v.to_string().cloned().map_err(|e| self.wrong(key, e))).transpose()
    }
    pub fn string(&self, key: &str) -> Result<String> {
        self.string_opt(key)?.ok_or_else(|| self.missing(key))
    }
    pub fn u64_opt(&self, key: &str) -> Result<Option<u64>> {
        use candle_core::quantized::gguf_file::Value as V;
        self.get(key)
            .map(|v| match v {
                V::U8(x) => Ok(*x as u64),
                V::U16(x) => Ok(*x as u64),
                V::U32(x) => Ok(*x as u64),
                V::U64(x) => Ok(*x),
                V::I8(x) if *x >= 0 => Ok(*x as u64),
                V::I16(x) if *x >= 0 => Ok(*x as u64),
                V::I32(x) if *x >= 0 => Ok(*x as u64),
                V::I64(x) if *x >= 0 => Ok(*x as u64),
                other => {
                    Err(Error::bad_file(self.path, format!("GGUF metadata key `{key}` should be a non-negative integer, found {other:?}")))
                }
            })
            .transpose()
    }
    pub fn usize_opt(&self, key: &str) -> Result<Option<usize>> {
        Ok(self.u64_opt(key)?.map(|x| x as usize))
    }
    pub fn usize(&self, key: &str) -> Result<usize> {
        self.usize_opt(key)?.ok_or_else(|| self.missing(key))
    }
    pub fn u32_opt(&self, key: &str) -> Result<Option<u32>> {
        Ok(self.u64_opt(key)?.map(|x| x as u32))
    }
    pub fn bool_opt(&self, key: &str) -> Result<Option<bool>> {
        self.get(key).map(|v| v.to_bool().map_err(|e| self.wrong(key, e))).transpose()
    }
    pub fn f64_opt(&self, key: &str) -> Result<Option<f64>> {
        use candle_core::quantized::gguf_file::Value as V;
        self.get(key)
            .map(|v| match v {
                V::F32(x) => Ok(*x as f64),
                V::F64(x) => Ok(*x),
                other => Err(Error::bad_file(self.path, format!("GGUF metadata key `{key}` should be a float, found {other:?}"))),
            })
            .transpose()
    }
    pub fn f64(&self, key: &str) -> Result<f64> {
        self.f64_opt(key)?.ok_or_else(|| self.missing(key))
    }
    pub fn string_array(&self, key: &str) -> Result<Option<Vec<String>>> {
        let Some(v) = self.get(key) else { return Ok(None) };
        let arr = v.to_vec().map_err(|e| self.wrong(key, e))?;
        arr.iter().map(|x| x.to_string().cloned().map_err(|e| self.wrong(key, e))).collect::<Result<Vec<_>>>().map(Some)
    }
    pub fn f32_array(&self, key: &str) -> Result<Option<Vec<f32>>> {
        use candle_core::quantized::gguf_file::Value as V;
        let Some(v) = self.get(key) else { return Ok(None) };
        let arr = v.to_vec().map_err(|e| self.wrong(key, e))?;
        arr.iter()
            .map(|x| match x {
                V::F32(f) => Ok(*f),
                V::F64(f) => Ok(*f as f32),
                other => Err(Error::bad_file(self.path, format!("GGUF metadata key `{key}` should hold floats, found {other:?}"))),
            })
            .collect::<Result<Vec<_>>>()
            .map(Some)
    }
    pub fn i32_array(&self, key: &str) -> Result<Option<Vec<i32>>> {
        use candle_core::quantized::gguf_file::Value as V;
        let Some(v) = self.get(key) else { return Ok(None) };
        let arr = v.to_vec().map_err(|e| self.wrong(key, e))?;
        arr.iter()
            .map(|x| match x {
                V::I32(i) => Ok(*i),
                V::U32(i) => Ok(*i as i32),
                V::I8(i) => Ok(*i as i32),
                V::U8(i) => Ok(*i as i32),
                other => Err(Error::bad_file(self.path, format!("GGUF metadata key `{key}` should hold integers, found {other:?}"))),
            })
            .collect::<Result<Vec<_>>>()
            .map(Some)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gemma3_reads_layer_types_and_per_type_rope() {
        let text = r#"{"model_type":"gemma3_text","vocab_size":10,"hidden_size":8,"intermediate_size":8,"num_hidden_layers":3,
            "num_attention_heads":2,"head_dim":4,"sliding_window":512,"query_pre_attn_scalar":24,"final_logit_softcapping":null,
            "layer_types":["sliding_attention","full_attention","sliding_attention"],"hidden_activation":"gelu_pytorch_tanh",
            "rope_parameters":{"full_attention":{"rope_type":"linear","factor":8.0,"rope_theta":1000000.0},
                               "sliding_attention":{"rope_type":"default","rope_theta":10000.0}}}"#;
        let c = ModelConfig::from_hf_json(text, Path::new("config.json")).unwrap();
        assert_eq!(c.architecture, Architecture::Gemma3);
        assert_eq!((c.window_for_layer(0), c.window_for_layer(1), c.window_for_layer(2)), (Some(512), None, Some(512)));
        assert_eq!((c.rope_theta, c.local_rope_theta), (1e6, Some(1e4)));
        assert_eq!(c.rope_scaling, Some(RopeScaling::Linear { factor: 8.0 }));
        assert_eq!(c.local_rope_scaling, None);
        assert_eq!((c.query_pre_attn_scalar, c.final_softcap), (Some(24.0), None));
        assert!(c.qk_norm && c.tie_word_embeddings && c.activation == Activation::GeluTanh);
    }

    #[test]
    fn wrong_field_type_names_the_field() {
        let text = r#"{"model_type":"llama","vocab_size":10,"hidden_size":"big","intermediate_size":8,"num_hidden_layers":1,"num_attention_heads":1}"#;
        let err = ModelConfig::from_hf_json(text, Path::new("m/config.json")).unwrap_err().to_string();
        assert!(err.starts_with("m/config.json: field `hidden_size`: invalid type: string \"big\""), "{err}");
    }

    #[test]
    fn unknown_architecture_lists_supported() {
        let text = r#"{"model_type":"gpt_neox","vocab_size":10,"hidden_size":8,"intermediate_size":8,"num_hidden_layers":1,"num_attention_heads":1}"#;
        let err = ModelConfig::from_hf_json(text, Path::new("config.json")).unwrap_err().to_string();
        assert!(err.contains("unsupported model architecture `gpt_neox`") && err.contains("qwen2"), "{err}");
    }

    #[test]
    fn llama3_rope_and_eos_list() {
        let text = r#"{"model_type":"llama","vocab_size":10,"hidden_size":8,"intermediate_size":8,"num_hidden_layers":1,
            "num_attention_heads":2,"num_key_value_heads":1,"eos_token_id":[1,2],"rope_theta":500000.0,
            "rope_scaling":{"rope_type":"llama3","factor":8.0,"low_freq_factor":1.0,"high_freq_factor":4.0,"original_max_position_embeddings":8192}}"#;
        let c = ModelConfig::from_hf_json(text, Path::new("config.json")).unwrap();
        assert_eq!(c.eos_token_ids, vec![1, 2]);
        assert_eq!(c.head_dim, 4);
        assert_eq!(c.rope_theta, 500000.0);
        assert!(matches!(c.rope_scaling, Some(RopeScaling::Llama3 { factor, .. }) if factor == 8.0));
    }

    #[test]
    fn unsupported_rope_scaling_is_an_error() {
        let text = r#"{"model_type":"llama","vocab_size":10,"hidden_size":8,"intermediate_size":8,"num_hidden_layers":1,
            "num_attention_heads":2,"rope_scaling":{"type":"yarn","factor":4.0}}"#;
        let err = ModelConfig::from_hf_json(text, Path::new("config.json")).unwrap_err().to_string();
        assert!(err.contains("rope scaling type `yarn` is not supported"), "{err}");
    }
}
