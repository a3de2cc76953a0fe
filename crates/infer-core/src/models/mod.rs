//! Model architectures. One config-driven decoder serves the whole Llama family; each further family
//! gets one file here, built from the shared pieces: layers.rs (the tensor path's building blocks),
//! host.rs (the host path: when each path runs and why both exist), rope.rs, moe.rs. A family
//! implements `Decoder` (its weights, its host-path and tensor-path step); [`CausalLm`], what the
//! engine calls, follows from it.

#[cfg(feature = "cuda")]
mod cuda_step;
pub mod gemma;
mod host;
mod layers;
pub mod llama;
mod moe;
mod rope;

/// Builds the decoder the configuration's architecture calls for.
pub fn load(
    cfg: crate::config::ModelConfig,
    w: &crate::weights::WeightSource,
    progress: &mut dyn FnMut(usize, usize),
) -> crate::Result<std::sync::Arc<dyn CausalLm>> {
    Ok(if cfg.architecture.is_gemma() {
        std::sync::Arc::new(gemma::GemmaModel::load(cfg, w, progress)?)
    } else {
        std::sync::Arc::new(llama::LlamaModel::load(cfg, w, progress)?)
    })
}

use candle_core::Tensor;

/// One sequence's part of a ragged batch.
#[derive(Debug, Clone)]
pub struct SeqBatch {
    /// First row of this sequence's tokens in the batch.
    pub q_start: usize,
    /// Number of new tokens of this sequence in the batch.
    pub q_len: usize,
    /// Tokens in the cache for this sequence once the new ones are written.
    pub context_len: usize,
    /// The sequence's KV cache blocks.
    pub block_table: Vec<u32>,
}

/// A ragged batch: new tokens of several sequences, each at its own position (prefill chunks and
/// decode steps mixed), stacked sequence after sequence.
#[derive(Debug, Clone, Default)]
pub struct BatchInput {
    /// Token ids, `[num_tokens]`.
    pub tokens: Vec<u32>,
    /// Position of each token within its sequence.
    pub positions: Vec<u32>,
    /// KV cache slot of each token.
    pub slots: Vec<usize>,
    /// The sequences, in row order.
    pub seqs: Vec<SeqBatch>,
    /// The rows whose logits are wanted (usually each sequence's last token).
    pub logits_rows: Vec<u32>,
    /// Embeddings: the wanted rows' final hidden states (after the last norm), `[rows, hidden]`,
    /// instead of their logits.
    pub hidden: bool,
}

impl BatchInput {
    /// Appends `tokens` of a sequence that already has `cached` tokens in the cache, computing their
    /// positions and slots from its block table (which must already hold room for them).
    pub fn push_sequence(&mut self, tokens: &[u32], cached: usize, block_table: &[u32], block_size: usize, want_logits: LogitsWanted) {
        let q_start = self.tokens.len();
        for (i, &t) in tokens.iter().enumerate() {
            let pos = cached + i;
            self.tokens.push(t);
            self.positions.push(pos as u32);
            self.slots.push(block_table[pos / block_size] as usize * block_size + pos % block_size);
        }
        match want_logits {
            LogitsWanted::None => {}
            LogitsWanted::Last => self.logits_rows.push((q_start + tokens.len() - 1) as u32),
            LogitsWanted::All => self.logits_rows.extend((q_start..q_start + tokens.len()).map(|r| r as u32)),
            LogitsWanted::LastN(n) => {
                let end = q_start + tokens.len();
                self.logits_rows.extend((end - n.min(tokens.len())..end).map(|r| r as u32))
            }
        }
        self.seqs.push(SeqBatch { q_start, q_len: tokens.len(), context_len: cached + tokens.len(), block_table: block_table.to_vec() });
    }

    pub fn num_tokens(&self) -> usize {
        self.tokens.len()
    }
}

/// Which logits a sequence of a batch needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogitsWanted {
    None,
    Last,
    /// The last `n` rows (a decode step verifying `n - 1` drafted tokens).
    LastN(usize),
    All,
}

/// What the engine needs from a model.
pub trait CausalLm: Send + Sync {
    /// Runs the batch, reading and writing `cache`; returns logits `[logits_rows, vocab]` in f32
    /// (zero rows when none are wanted).
    fn forward(&self, batch: &BatchInput, cache: &mut crate::kv_cache::PagedKvCache) -> crate::Result<Tensor>;
    /// [`forward`](Self::forward) with the logits written into `logits` (`[logits_rows · vocab]`,
    /// resized; its memory reused): the per-step call of the engine and `infer bench`. A decoder on
    /// infer's CPU kernels makes no allocation here once it has run a step at least as large.
    fn forward_into(&self, batch: &BatchInput, cache: &mut crate::kv_cache::PagedKvCache, logits: &mut Vec<f32>) -> crate::Result<()> {
        host::tensor_into(self.forward(batch, cache)?, logits)
    }
    fn config(&self) -> &crate::config::ModelConfig;
    /// Where the model runs (the KV cache is made there).
    fn device(&self) -> candle_core::Device {
        candle_core::Device::Cpu
    }
    /// The activations' dtype (a device KV cache uses it).
    fn dtype(&self) -> candle_core::DType {
        candle_core::DType::F32
    }
}

/// What a decoder family implements (llama.rs, gemma.rs); the engine's [`CausalLm`] follows from it.
pub(crate) trait Decoder: Send + Sync {
    /// The model's config, where its weights live, its activations' dtype, and its host path
    /// (whether the model runs on it is decided at load).
    fn parts(&self) -> (&crate::config::ModelConfig, &candle_core::Device, candle_core::DType, &host::HostPath);
    /// The step on host slices in `ws`, the logits (`[logits_rows · vocab]`) into `logits`.
    fn forward_host(
        &self,
        batch: &BatchInput,
        cache: &mut crate::kv_cache::PagedKvCache,
        ws: &mut host::Workspace,
        logits: &mut Vec<f32>,
    ) -> crate::Result<()>;
    /// The step on candle tensors: logits `[logits_rows, vocab]` in f32.
    fn forward_tensors(&self, batch: &BatchInput, cache: &mut crate::kv_cache::PagedKvCache) -> crate::Result<Tensor>;
    /// A device step that bypasses the tensor path (the CUDA decode step, cuda_step.rs), the logits
    /// into `logits`; `None` when it does not take this batch.
    fn forward_step(
        &self,
        _batch: &BatchInput,
        _cache: &mut crate::kv_cache::PagedKvCache,
        _logits: &mut Vec<f32>,
    ) -> Option<crate::Result<()>> {
        None
    }
}

impl<D: Decoder> CausalLm for D {
    fn forward(&self, batch: &BatchInput, cache: &mut crate::kv_cache::PagedKvCache) -> crate::Result<Tensor> {
        if self.parts().3.is_on() {
            return host::logits_tensor(self, batch, cache);
        }
        let mut logits = Vec::new();
        if let Some(done) = self.forward_step(batch, cache, &mut logits) {
            done?;
            let (cfg, device, ..) = self.parts();
            return Ok(Tensor::from_vec(logits, (batch.logits_rows.len(), cfg.vocab_size), device)?);
        }
        self.forward_tensors(batch, cache)
    }

    fn forward_into(&self, batch: &BatchInput, cache: &mut crate::kv_cache::PagedKvCache, logits: &mut Vec<f32>) -> crate::Result<()> {
        if let Some(done) = self.parts().3.run(|ws| self.forward_host(batch, cache, ws, logits)) {
            return done;
        }
        match self.forward_step(batch, cache, logits) {
            Some(done) => done,
            None => host::tensor_into(self.forward_tensors(batch, cache)?, logits),
        }
    }

    fn config(&self) -> &crate::config::ModelConfig {
        self.parts().0
    }

    fn device(&self) -> candle_core::Device {
        self.parts().1.clone()
    }

    fn dtype(&self) -> candle_core::DType {
        self.parts().2
    }
}
