//! Sampling: turns a row of logits into the next token, with the usual controls (greedy, temperature,
//! top-k, top-p, min-p, repetition/presence/frequency penalties, logit bias) and a seed that makes the
//! choice reproducible.

use std::collections::HashMap;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::error::{Error, Result};

/// Below this temperature sampling is greedy (`1 / t` would overflow the scaled logits).
pub const MIN_TEMPERATURE: f32 = 1e-5;

/// What to generate and how to choose each token. The defaults match llama.cpp's.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    /// Softmax temperature; `0` means greedy (always the most likely token).
    pub temperature: f32,
    /// Keep only the `k` most likely tokens; `0` disables.
    pub top_k: usize,
    /// Keep the smallest set of tokens whose probability adds up to `top_p`; `1` disables.
    pub top_p: f32,
    /// Drop tokens less likely than `min_p` times the most likely one; `0` disables.
    pub min_p: f32,
    /// Divides positive (multiplies negative) logits of tokens already in the prompt or output; `1` disables.
    pub repetition_penalty: f32,
    /// Subtracted once from the logit of every token already generated (OpenAI semantics).
    pub presence_penalty: f32,
    /// Subtracted from a token's logit for every time it was already generated (OpenAI semantics).
    pub frequency_penalty: f32,
    /// Added to the logits of the given token ids.
    pub logit_bias: HashMap<u32, f32>,
    /// Random seed; the same seed with the same inputs gives the same text. `None` picks one.
    pub seed: Option<u64>,
    /// Most tokens to generate; `None` means until end of sequence or the context is full.
    pub max_tokens: Option<usize>,
    /// Generation stops before any of these strings; the string itself is not returned.
    pub stop: Vec<String>,
    /// Keep generating past end-of-sequence tokens.
    pub ignore_eos: bool,
    /// Report this many most likely alternatives (with log-probabilities) for each generated token.
    pub logprobs: Option<usize>,
    /// What the output must match (a JSON schema, a regex, a choice, a grammar); compiled by the
    /// engine when the sequence is added.
    pub constraint: Option<crate::structured::Constraint>,
    /// Prefix-cache namespace (vLLM's `cache_salt`): a sequence reuses cached KV blocks only from
    /// sequences with the same salt, so clients that do not share it cannot learn from cache hits
    /// (or timing) what the others sent. `None` is one namespace of its own.
    pub cache_salt: Option<String>,
    /// Speculative decoding, where the engine does it: most tokens drafted per step for this
    /// request (`Some(0)` turns it off) and fewest worth checking; `None`: the engine's settings.
    pub draft_max: Option<usize>,
    pub draft_min: Option<usize>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 0.8,
            top_k: 40,
            top_p: 0.95,
            min_p: 0.05,
            repetition_penalty: 1.0,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            logit_bias: HashMap::new(),
            seed: None,
            max_tokens: None,
            stop: Vec::new(),
            ignore_eos: false,
            logprobs: None,
            constraint: None,
            cache_salt: None,
            draft_max: None,
            draft_min: None,
        }
    }
}

impl SamplingParams {
    /// Greedy decoding: always the most likely token.
    pub fn greedy() -> Self {
        Self { temperature: 0.0, ..Self::default() }
    }

    /// Checks every value is in range, naming the first that is not.
    pub fn validate(&self, vocab_size: usize) -> Result<()> {
        if !(self.temperature.is_finite() && self.temperature >= 0.0) {
            return Err(Error::param("temperature", format!("{} must be a number >= 0", self.temperature)));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(Error::param("top_p", format!("{} must be in (0, 1]", self.top_p)));
        }
        if !(0.0..=1.0).contains(&self.min_p) {
            return Err(Error::param("min_p", format!("{} must be in [0, 1]", self.min_p)));
        }
        if !(self.repetition_penalty.is_finite() && self.repetition_penalty > 0.0) {
            return Err(Error::param("repetition_penalty", format!("{} must be > 0", self.repetition_penalty)));
        }
        if !(-2.0..=2.0).contains(&self.presence_penalty) {
            return Err(Error::param("presence_penalty", format!("{} must be in [-2, 2]", self.presence_penalty)));
        }
        if !(-2.0..=2.0).contains(&self.frequency_penalty) {
            return Err(Error::param("frequency_penalty", format!("{} must be in [-2, 2]", self.frequency_penalty)));
        }
        if self.max_tokens == Some(0) {
            return Err(Error::param("max_tokens", "must be at least 1"));
        }
        for (&tok, &bias) in &self.logit_bias {
            if tok as usize >= vocab_size {
                return Err(Error::param("logit_bias", format!("token id {tok} is outside the vocabulary (size {vocab_size})")));
            }
            if !bias.is_finite() && bias != f32::NEG_INFINITY {
                return Err(Error::param("logit_bias", format!("bias {bias} for token {tok} is not a number")));
            }
        }
        let most = crate::speculative::MAX_DRAFT;
        if self.draft_max.is_some_and(|n| n > most) {
            return Err(Error::param("draft_max", format!("{} must be at most {most}", self.draft_max.unwrap_or(0))));
        }
        if self.draft_min.is_some_and(|n| n > most) {
            return Err(Error::param("draft_min", format!("{} must be at most {most}", self.draft_min.unwrap_or(0))));
        }
        if self.stop.iter().any(String::is_empty) {
            return Err(Error::param("stop", "stop strings must not be empty"));
        }
        Ok(())
    }
}

/// Which tokens of the vocabulary may be sampled: one bit per token id (32 ids per word, lowest
/// bit first, the layout llguidance's token sets use).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TokenMask {
    words: Vec<u32>,
    vocab: usize,
}

impl TokenMask {
    /// A mask over `vocab` tokens that allows none.
    pub fn none(vocab: usize) -> Self {
        Self { words: vec![0; vocab.div_ceil(32)], vocab }
    }

    /// Allows nothing again (the memory is kept).
    pub fn clear(&mut self) {
        self.words.fill(0);
    }

    pub fn vocab(&self) -> usize {
        self.vocab
    }

    pub fn allow(&mut self, token: u32) {
        if (token as usize) < self.vocab {
            self.words[token as usize / 32] |= 1 << (token % 32);
        }
    }

    pub fn is_allowed(&self, token: u32) -> bool {
        (token as usize) < self.vocab && self.words[token as usize / 32] & (1 << (token % 32)) != 0
    }

    /// Whether any token is allowed.
    pub fn any(&self) -> bool {
        self.words.iter().any(|&w| w != 0)
    }

    /// The bits, 32 tokens per word (bits past the vocabulary must stay 0).
    pub fn words_mut(&mut self) -> &mut [u32] {
        &mut self.words
    }
}

/// The chosen token and its log-probability under the model's (unmodified) distribution.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sampled {
    pub token: u32,
    pub logprob: f32,
}

/// Per-sequence sampling state: the parameters, the random generator, and output token counts.
#[derive(Debug, Clone)]
pub struct Sampler {
    params: SamplingParams,
    rng: StdRng,
    output_counts: HashMap<u32, u32>,
    seen: std::collections::HashSet<u32>,
    /// Per-token buffers, reused: the adjusted logits, the candidates and their probabilities.
    l: Vec<f32>,
    cand: Vec<(u32, f32)>,
    probs: Vec<f32>,
}

impl Sampler {
    /// A sampler for one sequence; `prompt` feeds the repetition penalty.
    pub fn new(params: SamplingParams, prompt: &[u32]) -> Self {
        let seed = params.seed.unwrap_or_else(|| rand::rng().random());
        let seen = if params.repetition_penalty != 1.0 { prompt.iter().copied().collect() } else { Default::default() };
        let (l, cand, probs) = Default::default();
        Self { rng: StdRng::seed_from_u64(seed), params, output_counts: HashMap::new(), seen, l, cand, probs }
    }

    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// Chooses the next token from `logits` (one row over the vocabulary) and records it.
    pub fn sample(&mut self, logits: &[f32]) -> Sampled {
        self.sample_masked(logits, None)
    }

    /// [`sample`](Self::sample) among the tokens `mask` allows (all when `None`); the reported
    /// log-probability stays the model's. The mask must allow at least one token.
    pub fn sample_masked(&mut self, logits: &[f32], mask: Option<&TokenMask>) -> Sampled {
        let p = &self.params;
        let logprob_of = logsumexp(logits);
        let mut l = std::mem::take(&mut self.l);
        l.clear();
        l.extend_from_slice(logits);
        for (&tok, &bias) in &p.logit_bias {
            if let Some(x) = l.get_mut(tok as usize) {
                *x += bias;
            }
        }
        if p.repetition_penalty != 1.0 {
            for &tok in &self.seen {
                if let Some(x) = l.get_mut(tok as usize) {
                    *x = if *x > 0.0 { *x / p.repetition_penalty } else { *x * p.repetition_penalty };
                }
            }
        }
        if p.presence_penalty != 0.0 || p.frequency_penalty != 0.0 {
            for (&tok, &n) in &self.output_counts {
                if let Some(x) = l.get_mut(tok as usize) {
                    *x -= p.presence_penalty + p.frequency_penalty * n as f32;
                }
            }
        }
        if let Some(mask) = mask {
            for (chunk, &w) in l.chunks_mut(32).zip(&mask.words) {
                if w != u32::MAX {
                    chunk.iter_mut().enumerate().filter(|(b, _)| w >> b & 1 == 0).for_each(|(_, x)| *x = f32::NEG_INFINITY);
                }
            }
        }
        // Temperatures this small make the softmax overflow: they mean greedy (as in vLLM).
        let greedy = p.temperature < MIN_TEMPERATURE;
        let token = if greedy { argmax(&l) } else { self.sample_stochastic(&l) };
        self.l = l;
        *self.output_counts.entry(token).or_default() += 1;
        if self.params.repetition_penalty != 1.0 {
            self.seen.insert(token);
        }
        Sampled { token, logprob: logits[token as usize] - logprob_of }
    }

    fn sample_stochastic(&mut self, l: &[f32]) -> u32 {
        let p = &self.params;
        let inv_t = 1.0 / p.temperature;
        let (cand, probs) = (&mut self.cand, &mut self.probs);
        cand.clear();
        cand.extend(l.iter().enumerate().filter(|(_, x)| x.is_finite()).map(|(i, &x)| (i as u32, x * inv_t)));
        if cand.is_empty() {
            return argmax(l);
        }
        let all_finite = cand.len() == l.len();
        let max = if all_finite { infer_kernels::fused::max(l) * inv_t } else { cand.iter().fold(f32::NEG_INFINITY, |m, c| m.max(c.1)) };
        // Plain temperature sampling (OpenAI's defaults: no top-k, top-p or min-p) needs no sorting.
        if (p.top_k == 0 || p.top_k >= cand.len()) && p.top_p >= 1.0 && p.min_p <= 0.0 {
            probs.clear();
            probs.extend(cand.iter().map(|c| (c.1 - max).exp()));
            let mut u = self.rng.random::<f32>() * probs.iter().sum::<f32>();
            for (c, &pr) in cand.iter().zip(probs.iter()) {
                u -= pr;
                if u <= 0.0 {
                    return c.0;
                }
            }
            return cand[cand.len() - 1].0;
        }
        // Most likely first; top-k only needs a partial sort.
        let by_logit = |a: &(u32, f32), b: &(u32, f32)| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0));
        let total = if p.top_k > 0 && p.top_k < cand.len() {
            cand.select_nth_unstable_by(p.top_k - 1, by_logit);
            cand.truncate(p.top_k);
            cand.iter().map(|c| (c.1 - max).exp()).sum::<f32>()
        } else if all_finite {
            // The whole vocabulary: the vectorized sum.
            infer_kernels::fused::sum_exp(l, inv_t, max) as f32
        } else {
            cand.iter().map(|c| (c.1 - max).exp()).sum::<f32>()
        };
        let keep = nucleus(cand, probs, max, total, p.top_p, p.min_p);
        let total: f32 = probs[..keep].iter().sum();
        let mut u = self.rng.random::<f32>() * total;
        for i in 0..keep {
            u -= probs[i];
            if u <= 0.0 {
                return cand[i].0;
            }
        }
        cand[keep - 1].0
    }
}

/// Sorts the most likely of `cand` (`(token, logit)`, `max` its largest logit, `total` the sum of
/// `exp(logit − max)` over it) first and returns
/// how many of them top-p and min-p keep, their probabilities in `probs`. Only a prefix can be kept,
/// so only a prefix is sorted: 64 candidates, then four times more while top-p and min-p would keep
/// all of it (one pass over the vocabulary each), instead of sorting the whole vocabulary.
fn nucleus(cand: &mut [(u32, f32)], probs: &mut Vec<f32>, max: f32, total: f32, top_p: f32, min_p: f32) -> usize {
    let by_logit = |a: &(u32, f32), b: &(u32, f32)| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0));
    let mut k = cand.len().min(64);
    loop {
        if k < cand.len() {
            cand.select_nth_unstable_by(k - 1, by_logit);
        }
        cand[..k].sort_unstable_by(by_logit);
        probs.clear();
        probs.extend(cand[..k].iter().map(|c| (c.1 - max).exp() / total));
        let mut keep = None;
        if top_p < 1.0 {
            let mut acc = 0.0;
            keep = probs
                .iter()
                .position(|&pr| {
                    acc += pr;
                    acc >= top_p
                })
                .map(|i| i + 1);
        }
        if min_p > 0.0 {
            let floor = probs[0] * min_p;
            let above = probs.iter().take_while(|&&x| x >= floor).count().max(1);
            if above < k {
                keep = Some(keep.map_or(above, |kp| kp.min(above)));
            }
        }
        match keep {
            Some(n) => return n,
            None if k == cand.len() => return k,
            None => k = (k * 4).min(cand.len()),
        }
    }
}

pub(crate) fn argmax(l: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &x) in l.iter().enumerate() {
        if x > l[best] {
            best = i;
        }
    }
    best as u32
}

/// The `k` most likely tokens of a row of logits with their log-probabilities, most likely first.
pub fn top_logprobs(logits: &[f32], k: usize) -> Vec<(u32, f32)> {
    let lse = logsumexp(logits);
    let mut idx: Vec<u32> = (0..logits.len() as u32).collect();
    let by = |a: &u32, b: &u32| logits[*b as usize].total_cmp(&logits[*a as usize]).then(a.cmp(b));
    let k = k.min(idx.len());
    if k == 0 {
        return Vec::new();
    }
    if k < idx.len() {
        idx.select_nth_unstable_by(k - 1, by);
        idx.truncate(k);
    }
    idx.sort_unstable_by(by);
    idx.into_iter().map(|t| (t, logits[t as usize] - lse)).collect()
}

/// `log(sum(exp(x)))`, computed stably (vectorized: it runs over the vocabulary every token).
pub fn logsumexp(x: &[f32]) -> f32 {
    let m = infer_kernels::fused::max(x);
    if !m.is_finite() {
        return m;
    }
    m + infer_kernels::fused::sum_exp(x, 1.0, m).ln() as f32
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(f: impl FnOnce(&mut SamplingParams)) -> SamplingParams {
        let mut p = SamplingParams { temperature: 1.0, top_k: 0, top_p: 1.0, min_p: 0.0, seed: Some(1), ..Default::default() };
        f(&mut p);
        p
    }

    #[test]
    fn greedy_picks_max_and_reports_logprob() {
        let mut s = Sampler::new(SamplingParams::greedy(), &[]);
        let out = s.sample(&[0.0, 2.0, 1.0]);
        assert_eq!(out.token, 1);
        let expect = 2.0 - (1f32 + 2f32.exp() + 1f32.exp()).ln();
        assert!((out.logprob - expect).abs() < 1e-6);
        let top = top_logprobs(&[0.0, 2.0, 1.0], 2);
        assert_eq!(top.iter().map(|t| t.0).collect::<Vec<_>>(), vec![1, 2]);
        assert!((top[0].1 - expect).abs() < 1e-6);
    }

    #[test]
    fn same_seed_same_tokens_and_different_seed_differs() {
        let logits: Vec<f32> = (0..50).map(|i| (i % 7) as f32 * 0.3).collect();
        let run = |seed| {
            let mut s = Sampler::new(params(|p| p.seed = Some(seed)), &[]);
            (0..40).map(|_| s.sample(&logits).token).collect::<Vec<_>>()
        };
        assert_eq!(run(7), run(7));
        assert_ne!(run(7), run(8));
    }

    #[test]
    fn plain_temperature_sampling_follows_the_softmax() {
        let logits = [2.0f32, 1.0, 0.0, -10.0];
        let mut s = Sampler::new(params(|_| {}), &[]);
        let mut counts = [0usize; 4];
        let n = 20000;
        for _ in 0..n {
            counts[s.sample(&logits).token as usize] += 1;
        }
        let z: f32 = logits.iter().map(|l| l.exp()).sum();
        for (i, &c) in counts.iter().enumerate() {
            let want = logits[i].exp() / z;
            assert!((c as f32 / n as f32 - want).abs() < 0.015, "token {i}: {} vs {want}", c as f32 / n as f32);
        }
    }

    #[test]
    fn top_k_top_p_min_p_restrict_the_support() {
        let logits = [5.0, 4.0, 3.0, 0.0, -1.0];
        for (p, allowed) in [
            (params(|p| p.top_k = 2), vec![0, 1]),
            (params(|p| p.top_p = 0.7), vec![0, 1]),
            (params(|p| p.min_p = 0.3), vec![0, 1]),
            (params(|p| p.top_k = 1), vec![0]),
        ] {
            let mut s = Sampler::new(p.clone(), &[]);
            for _ in 0..200 {
                let t = s.sample(&logits).token;
                assert!(allowed.contains(&t), "{p:?} gave {t}");
            }
        }
    }

    /// The prefix [`nucleus`] keeps is the one a full sort of the vocabulary keeps (the same f32
    /// arithmetic), decided within its first 64 candidates, after growing, and near the whole list.
    #[test]
    fn nucleus_keeps_what_a_full_sort_keeps() {
        let mut seed = 5u64;
        let mut rnd = || {
            seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            (seed >> 33) as f32 / (1u64 << 31) as f32
        };
        let mut kept = Vec::new();
        let cases =
            [(200.0, 0.9, 0.0), (60.0, 0.9, 0.0), (8.0, 0.9, 0.0), (1.0, 0.99, 0.0), (40.0, 1.0, 0.05), (3.0, 0.95, 0.01), (0.2, 1.0, 0.5)];
        for (spread, top_p, min_p) in cases {
            // Peaked like real logits: a few high values, a long flat tail.
            let cand: Vec<(u32, f32)> = (0..5000).map(|i| (i, rnd().powi(8) * spread)).collect();
            let max = cand.iter().fold(f32::NEG_INFINITY, |m, c| m.max(c.1));
            let total: f32 = cand.iter().map(|c| (c.1 - max).exp()).sum();
            // Reference: everything sorted, the rules applied to the whole list.
            let mut sorted = cand.clone();
            sorted.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
            let pr: Vec<f32> = sorted.iter().map(|c| (c.1 - max).exp() / total).collect();
            let mut want = pr.len();
            if top_p < 1.0 {
                let mut acc = 0.0;
                want = pr
                    .iter()
                    .position(|&x| {
                        acc += x;
                        acc >= top_p
                    })
                    .map_or(pr.len(), |i| i + 1);
            }
            if min_p > 0.0 {
                want = want.min(pr.iter().take_while(|&&x| x >= pr[0] * min_p).count().max(1));
            }
            let mut got = cand.clone();
            let mut probs = Vec::new();
            let keep = nucleus(&mut got, &mut probs, max, total, top_p, min_p);
            assert_eq!(keep, want, "spread {spread}, top_p {top_p}, min_p {min_p}");
            assert_eq!(got[..keep], sorted[..keep], "the kept candidates, most likely first");
            kept.push(keep);
        }
        assert!(
            kept.iter().any(|&k| k <= 64) && kept.iter().any(|&k| (65..=1024).contains(&k)) && kept.iter().any(|&k| k > 1024),
            "cases must be decided within 64, after growing and late: {kept:?}"
        );
    }

    #[test]
    fn penalties_and_bias_change_the_greedy_choice() {
        let logits = [2.0, 1.9, 0.0];
        let mut s = Sampler::new(SamplingParams { repetition_penalty: 1.2, ..SamplingParams::greedy() }, &[0]);
        assert_eq!(s.sample(&logits).token, 1, "2.0/1.2 < 1.9");
        let mut s = Sampler::new(SamplingParams { presence_penalty: 0.5, ..SamplingParams::greedy() }, &[]);
        assert_eq!(s.sample(&logits).token, 0);
        assert_eq!(s.sample(&logits).token, 1, "token 0 was penalized after being generated");
        let mut s = Sampler::new(SamplingParams { logit_bias: [(2, 5.0)].into(), ..SamplingParams::greedy() }, &[]);
        assert_eq!(s.sample(&logits).token, 2);
    }

    #[test]
    fn validation_names_the_parameter() {
        let bad = SamplingParams { top_p: 0.0, ..Default::default() };
        assert_eq!(bad.validate(10).unwrap_err().to_string(), "invalid parameter `top_p`: 0 must be in (0, 1]");
        let bad = SamplingParams { logit_bias: [(99, 1.0)].into(), ..Default::default() };
        assert!(bad.validate(10).unwrap_err().to_string().contains("outside the vocabulary"));
        assert!(SamplingParams::default().validate(10).is_ok());
    }
}
