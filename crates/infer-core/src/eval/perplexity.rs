//! Evaluation on your own data. Perplexity over a text, as llama.cpp's `llama-perplexity` computes
//! it: the tokens (with the model's BOS) are cut into windows of `ctx` tokens, each window's first
//! token is replaced by BOS when the model adds one, and each window scores the log-likelihood of
//! its later tokens —
//! - default: non-overlapping windows, scoring their second half (positions `ctx/2 .. ctx-1`);
//! - with a stride `s`: windows start every `s` tokens and score their last `s` tokens
//!   (llama.cpp's `--ppl-stride`).
//!
//! PPL = exp(mean NLL), with llama.cpp's standard error PPL · sqrt(var(NLL) / (N − 1)). Windows run
//! together in ragged batches, and only the scored rows' logits are computed.

use std::time::Instant;

use candle_core::DType;

use crate::error::{Error, Result};
use crate::kv_cache::{default_cache_dtype, PagedKvCache};
use crate::loader::LoadedModel;
use crate::models::BatchInput;
use crate::sampling::logsumexp;

/// Settings of a perplexity run.
#[derive(Debug, Clone)]
pub struct PerplexityOptions {
    /// Window length in tokens.
    pub ctx: usize,
    /// Distance between window starts (`None`: non-overlapping windows scoring their second half).
    pub stride: Option<usize>,
    /// Most tokens per forward pass (several windows run together).
    pub batch_tokens: usize,
    /// Score at most this many windows.
    pub limit: Option<usize>,
    /// How the KV cache stores keys and values (`None`: the device's default).
    pub kv_cache_dtype: Option<crate::kv_cache::KvDtype>,
}

impl Default for PerplexityOptions {
    fn default() -> Self {
        Self { ctx: 512, stride: None, batch_tokens: 2048, limit: None, kv_cache_dtype: None }
    }
}

/// What a perplexity run measured.
#[derive(Debug, Clone, PartialEq)]
pub struct PerplexityResult {
    pub perplexity: f64,
    /// Standard error of the perplexity (llama.cpp's "±").
    pub std_error: f64,
    /// Tokens whose log-likelihood was scored.
    pub scored_tokens: usize,
    pub windows: usize,
    /// Tokens processed (all window positions) per second.
    pub tokens_per_second: f64,
}

/// One window: where it starts and which of its positions predict a scored token.
#[derive(Debug)]
struct Window {
    start: usize,
    first_scored: usize,
}

/// The windows over `n` tokens.
fn windows(n: usize, opts: &PerplexityOptions) -> Result<Vec<Window>> {
    let ctx = opts.ctx;
    if ctx < 16 {
        return Err(Error::param("ctx", format!("{ctx} tokens is too short a window; use at least 16")));
    }
    if n < ctx {
        return Err(Error::param(
            "ctx",
            format!("the text has {n} tokens, fewer than one window of {ctx}; use a longer text or a smaller --ctx"),
        ));
    }
    let mut w: Vec<Window> = match opts.stride {
        None => (0..n / ctx).map(|i| Window { start: i * ctx, first_scored: ctx / 2 }).collect(),
        Some(s) if s == 0 || s >= ctx => {
            return Err(Error::param("stride", format!("{s} must be between 1 and the window length {ctx} (exclusive)")))
        }
        Some(s) => {
            (0..(n - ctx).div_ceil(s)).map(|i| Window { start: i * s, first_scored: ctx - s - 1 }).filter(|w| w.start + ctx <= n).collect()
        }
    };
    if let Some(l) = opts.limit {
        w.truncate(l.max(1));
    }
    Ok(w)
}

/// Perplexity of `m` on `text`; `progress(done, total)` after each batch of windows.
pub fn perplexity(
    m: &LoadedModel,
    text: &str,
    opts: &PerplexityOptions,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<PerplexityResult> {
    let cfg = m.model.config();
    if opts.ctx > cfg.max_position_embeddings {
        return Err(Error::param("ctx", format!("{} exceeds the model's context of {}", opts.ctx, cfg.max_position_embeddings)));
    }
    let tokens = m.tokenizer.encode(text, true)?;
    // The model's BOS, if its tokenizer adds one (llama.cpp puts it first in every window).
    let with = m.tokenizer.encode("a", true)?;
    let without = m.tokenizer.encode("a", false)?;
    let bos = (with.len() > without.len()).then(|| with[0]);
    let wins = windows(tokens.len(), opts)?;
    let ctx = opts.ctx;
    let per_batch = (opts.batch_tokens / ctx).max(1);
    let device = m.model.device();
    let kv_dtype = opts.kv_cache_dtype.unwrap_or_else(|| default_cache_dtype(&device, m.model.dtype()));
    let block = 16;
    let (mut nll, mut nll2, mut count) = (0f64, 0f64, 0usize);
    let t0 = Instant::now();
    for (bi, group) in wins.chunks(per_batch).enumerate() {
        let mut cache = PagedKvCache::new_on(cfg, block, group.len() * ctx.div_ceil(block), &device, kv_dtype)?;
        let mut batch = BatchInput::default();
        let mut targets = Vec::new();
        for w in group {
            let mut toks = tokens[w.start..w.start + ctx].to_vec();
            if let Some(b) = bos {
                toks[0] = b;
            }
            let mut table = Vec::new();
            cache.reserve(&mut table, ctx)?;
            let row0 = batch.num_tokens();
            batch.push_sequence(&toks, 0, &table, block, crate::models::LogitsWanted::None);
            for j in w.first_scored..ctx - 1 {
                batch.logits_rows.push((row0 + j) as u32);
                targets.push(tokens[w.start + j + 1]);
            }
        }
        let logits = m.model.forward(&batch, &mut cache)?.to_dtype(DType::F32)?.to_vec2::<f32>()?;
        for (row, &t) in logits.iter().zip(&targets) {
            let v = (logsumexp(row) - row[t as usize]) as f64;
            nll += v;
            nll2 += v * v;
            count += 1;
        }
        progress(((bi + 1) * per_batch).min(wins.len()), wins.len());
    }
    let secs = t0.elapsed().as_secs_f64();
    let n = count as f64;
    let mean = nll / n;
    let var = (nll2 / n - mean * mean).max(0.0);
    let ppl = mean.exp();
    Ok(PerplexityResult {
        perplexity: ppl,
        std_error: if count > 1 { ppl * (var / (n - 1.0)).sqrt() } else { f64::NAN },
        scored_tokens: count,
        windows: wins.len(),
        tokens_per_second: (wins.len() * ctx) as f64 / secs.max(1e-9),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_follow_llamacpp() {
        let o = PerplexityOptions { ctx: 512, ..Default::default() };
        let w = windows(1300, &o).unwrap();
        assert_eq!(w.iter().map(|w| (w.start, w.first_scored)).collect::<Vec<_>>(), vec![(0, 256), (512, 256)]);
        let o = PerplexityOptions { ctx: 512, stride: Some(256), ..Default::default() };
        let w = windows(1300, &o).unwrap();
        assert_eq!(w.iter().map(|w| (w.start, w.first_scored)).collect::<Vec<_>>(), vec![(0, 255), (256, 255), (512, 255), (768, 255)]);
        assert!(windows(100, &o).unwrap_err().to_string().contains("fewer than one window"));
        let bad = PerplexityOptions { ctx: 512, stride: Some(512), ..Default::default() };
        assert!(windows(2000, &bad).unwrap_err().to_string().contains("stride"));
    }
}
