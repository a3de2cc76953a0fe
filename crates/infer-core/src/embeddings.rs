//! Embeddings from a decoder model (Qwen3-Embedding, llama.cpp's `--embeddings --pooling`): each
//! input's final hidden states (after the last norm) pooled into one vector — the last token's
//! (`Last`, what decoder embedding models are trained for) or the mean over its tokens (`Mean`) —
//! then L2-normalized. Many inputs go through one forward pass as a ragged batch over a scratch KV
//! cache sized for that batch; nothing is kept after.

use crate::error::{Error, Result};
use crate::kv_cache::PagedKvCache;
use crate::models::{BatchInput, CausalLm, LogitsWanted};

/// How the token states of one input become its vector.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pooling {
    /// The last token's state.
    Last,
    /// The mean of all token states.
    Mean,
}

impl std::str::FromStr for Pooling {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "last" => Ok(Self::Last),
            "mean" => Ok(Self::Mean),
            _ => Err(Error::param("pooling", format!("`{s}` is not one of last, mean"))),
        }
    }
}

/// Most tokens one forward pass of [`embed`] takes (inputs are grouped up to this many; a longer
/// input goes through in chunks of this many, its earlier chunks in the scratch cache).
pub const EMBED_BATCH_TOKENS: usize = 2048;

/// Longest input [`embed`] takes: its scratch KV cache is made for the input, beside the engine's.
pub const MAX_EMBED_TOKENS: usize = 8192;

/// The pooled, L2-normalized (when `normalize`) embedding of each input (token ids, each non-empty
/// and within the model's context).
pub fn embed(model: &dyn CausalLm, inputs: &[Vec<u32>], pooling: Pooling, normalize: bool) -> Result<Vec<Vec<f32>>> {
    embed_in_batches(model, inputs, pooling, normalize, EMBED_BATCH_TOKENS)
}

/// [`embed`] with at most `batch_tokens` tokens per forward pass (the results do not depend on it).
pub fn embed_in_batches(
    model: &dyn CausalLm,
    inputs: &[Vec<u32>],
    pooling: Pooling,
    normalize: bool,
    batch_tokens: usize,
) -> Result<Vec<Vec<f32>>> {
    let batch_tokens = batch_tokens.max(1);
    let cfg = model.config();
    let (hidden, vocab, ctx) = (cfg.hidden_size, cfg.vocab_size, cfg.max_position_embeddings);
    for (i, t) in inputs.iter().enumerate() {
        if t.is_empty() {
            return Err(Error::param("input", format!("input {i} is empty")));
        }
        if t.len() > ctx.min(MAX_EMBED_TOKENS) {
            return Err(Error::ContextOverflow { needed: t.len(), limit: ctx.min(MAX_EMBED_TOKENS) });
        }
        if let Some(&bad) = t.iter().find(|&&x| x as usize >= vocab) {
            return Err(Error::param("input", format!("token id {bad} is outside the vocabulary (size {vocab})")));
        }
    }
    let mut out = Vec::with_capacity(inputs.len());
    let mut states = Vec::new();
    let block = 16;
    let mut start = 0;
    while start < inputs.len() {
        // A group of inputs up to the batch size (one input alone when it is longer).
        let mut end = start + 1;
        let mut tokens = inputs[start].len();
        while end < inputs.len() && tokens + inputs[end].len() <= batch_tokens {
            tokens += inputs[end].len();
            end += 1;
        }
        let blocks: usize = inputs[start..end].iter().map(|t| t.len().div_ceil(block)).sum();
        let mut cache = PagedKvCache::new_on(
            cfg,
            block,
            blocks,
            &model.device(),
            crate::kv_cache::default_cache_dtype(&model.device(), model.dtype()),
        )?;
        let want = match pooling {
            Pooling::Last => LogitsWanted::Last,
            Pooling::Mean => LogitsWanted::All,
        };
        if end - start == 1 && inputs[start].len() > batch_tokens {
            // One long input: chunk by chunk; mean pooling keeps every chunk's states.
            let t = &inputs[start];
            let mut table = Vec::new();
            cache.reserve(&mut table, t.len())?;
            let mut all = Vec::with_capacity(if pooling == Pooling::Mean { t.len() * hidden } else { hidden });
            for (c, chunk) in t.chunks(batch_tokens).enumerate() {
                let last = (c + 1) * batch_tokens >= t.len();
                let mut batch = BatchInput { hidden: true, ..Default::default() };
                let w = if pooling == Pooling::Mean || last { want } else { LogitsWanted::None };
                batch.push_sequence(chunk, c * batch_tokens, &table, block, w);
                model.forward_into(&batch, &mut cache, &mut states)?;
                if pooling == Pooling::Mean || last {
                    all.extend_from_slice(&states[..batch.logits_rows.len() * hidden]);
                }
            }
            states = all;
        } else {
            let mut batch = BatchInput { hidden: true, ..Default::default() };
            for t in &inputs[start..end] {
                let mut table = Vec::new();
                cache.reserve(&mut table, t.len())?;
                batch.push_sequence(t, 0, &table, block, want);
            }
            model.forward_into(&batch, &mut cache, &mut states)?;
        }
        let mut row = 0;
        for t in &inputs[start..end] {
            let n = if pooling == Pooling::Mean { t.len() } else { 1 };
            let mut v = vec![0f32; hidden];
            for r in row..row + n {
                for (a, &x) in v.iter_mut().zip(&states[r * hidden..(r + 1) * hidden]) {
                    *a += x;
                }
            }
            v.iter_mut().for_each(|a| *a /= n as f32);
            if normalize {
                let norm = v.iter().map(|x| (*x as f64) * (*x as f64)).sum::<f64>().sqrt() as f32;
                if norm > 0.0 {
                    v.iter_mut().for_each(|a| *a /= norm);
                }
            }
            out.push(v);
            row += n;
        }
        start = end;
    }
    Ok(out)
}
