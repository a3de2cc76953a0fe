//! Speculative decoding: guess a sequence's next tokens cheaply, then let one forward pass of the
//! model check them all (the engine feeds the drafts after the sequence's last token and keeps them
//! as far as the model itself samples the same tokens; engine.rs `sample_and_append`).
//!
//! Two drafters:
//! - **prompt lookup** (n-gram): the longest suffix of the text so far (up to `max_n` tokens) that
//!   also occurs earlier in the prompt or the answer proposes the tokens that followed it there.
//!   Nothing to load; it pays off when the answer copies from its input (rewriting, extracting,
//!   editing code or a document given in the prompt);
//! - **a draft model**: a smaller model with the same vocabulary runs `k` greedy steps over its
//!   own paged KV cache, one batch for all sequences per step.
//!
//! Both propose one token per position (a point mass), so checking a draft by sampling the model's
//! own token at each position and keeping the draft while they agree is exactly speculative
//! sampling: a drafted token `x` is kept with probability `p(x)`, and when it is not, the token
//! sampled instead follows `p` without `x`, renormalized. Greedy output is the same token for
//! token, and at any temperature the output distribution is the model's.

use std::collections::HashMap;
use std::sync::Arc;

use crate::error::{Error, Result};
use crate::kv_cache::PagedKvCache;
use crate::models::{BatchInput, CausalLm, LogitsWanted};
use crate::sampling::argmax;
use crate::sequence::SeqId;
use crate::tokenizer::Tokenizer;

/// Where drafted tokens come from.
#[derive(Clone)]
pub enum DraftSource {
    /// Prompt lookup: suffixes of `min_n..=max_n` tokens matched earlier in the sequence.
    Ngram { min_n: usize, max_n: usize },
    /// A smaller model sharing the target's vocabulary (checked when the engine starts).
    Model { model: Arc<dyn CausalLm>, tokenizer: Box<Tokenizer> },
}

impl std::fmt::Debug for DraftSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Ngram { min_n, max_n } => write!(f, "Ngram({min_n}..={max_n})"),
            Self::Model { model, .. } => write!(f, "Model({:?})", model.config().architecture),
        }
    }
}

/// Speculative decoding settings of an engine ([`EngineConfig::speculative`](crate::EngineConfig)).
#[derive(Debug, Clone)]
pub struct SpeculativeConfig {
    pub source: DraftSource,
    /// Most tokens drafted per sequence and step (llama.cpp's `--draft-max`).
    pub draft_max: usize,
    /// Drafts shorter than this are not checked (llama.cpp's `--draft-min`).
    pub draft_min: usize,
    /// Drafting stops where a step's decode rows (one per sequence plus its drafts) would pass this
    /// many: the CPU kernels stream each weight block once for up to 16 rows, so rows up to there
    /// cost little more than one; beyond, drafts that are not kept slow the batch down.
    pub max_rows: usize,
}

impl SpeculativeConfig {
    /// Prompt lookup with n-grams of 1 to 4 tokens (an n-gram of one matches only where the last
    /// token is rare enough to be followed the same way; longer ones are tried first).
    pub fn ngram(draft_max: usize) -> Self {
        Self { source: DraftSource::Ngram { min_n: 1, max_n: 4 }, draft_max, draft_min: 1, max_rows: 16 }
    }

    /// A draft model (greedy drafts of up to `draft_max` tokens).
    pub fn draft_model(model: Arc<dyn CausalLm>, tokenizer: Tokenizer, draft_max: usize) -> Self {
        Self { source: DraftSource::Model { model, tokenizer: Box::new(tokenizer) }, draft_max, draft_min: 1, max_rows: 16 }
    }

    pub(crate) fn validate(&self) -> Result<()> {
        if self.draft_max == 0 || self.draft_max > MAX_DRAFT {
            return Err(Error::param("draft_max", format!("{} must be in 1..={MAX_DRAFT}", self.draft_max)));
        }
        if self.draft_min > self.draft_max {
            return Err(Error::param("draft_min", format!("{} is more than draft_max {}", self.draft_min, self.draft_max)));
        }
        if let DraftSource::Ngram { min_n, max_n } = self.source {
            if min_n == 0 || min_n > max_n || max_n > 64 {
                return Err(Error::param("ngram", format!("n-gram sizes {min_n}..={max_n} must satisfy 1 <= min <= max <= 64")));
            }
        }
        Ok(())
    }
}

/// Most tokens one sequence may draft per step.
pub const MAX_DRAFT: usize = 64;

/// Prompt lookup: the tokens that followed the most recent earlier occurrence of the longest
/// suffix of `tokens` of `min_n..=max_n` tokens, at most `max` of them, into `out` (cleared).
/// One backward scan: O(len · max_n) at worst.
pub fn ngram_draft(tokens: &[u32], min_n: usize, max_n: usize, max: usize, out: &mut Vec<u32>) {
    out.clear();
    let len = tokens.len();
    if max == 0 || len < min_n + 1 || min_n == 0 {
        return;
    }
    let last = tokens[len - 1];
    let (mut best_end, mut best_n) = (0, 0);
    // `end`: one past an earlier occurrence's last token; it must leave a token after it.
    for end in (1..len).rev() {
        if tokens[end - 1] != last {
            continue;
        }
        let most = max_n.min(end);
        let mut n = 1;
        while n < most && tokens[end - 1 - n] == tokens[len - 1 - n] {
            n += 1;
        }
        if n > best_n {
            (best_end, best_n) = (end, n);
            if n == max_n {
                break;
            }
        }
    }
    if best_n >= min_n {
        out.extend_from_slice(&tokens[best_end..len.min(best_end + max)]);
    }
}

/// A draft model's state: its KV cache and, per sequence, what that cache holds.
pub(crate) struct DraftModel {
    model: Arc<dyn CausalLm>,
    cache: PagedKvCache,
    seqs: HashMap<SeqId, DraftSeq>,
    logits: Vec<f32>,
    /// Token ids a draft may use (the smaller of the two vocabularies).
    vocab: usize,
    max_batch_tokens: usize,
}

#[derive(Default)]
struct DraftSeq {
    block_table: Vec<u32>,
    /// Tokens of the sequence whose keys and values the draft cache holds.
    computed: usize,
    /// Drafted tokens fed after them last time (valid as far as the sequence kept them).
    fed: Vec<u32>,
}

/// One sequence to draft for: its tokens and how many tokens to draft.
pub(crate) struct DraftWork<'a> {
    pub(crate) id: SeqId,
    pub(crate) tokens: &'a [u32],
    pub(crate) k: usize,
}

/// Vocabularies may differ by padding (Qwen2.5 0.5B and 7B: 151936 and 152064 rows) as long as
/// the tokens both have are the same; llama.cpp allows 128.
const MAX_VOCAB_DIFFERENCE: usize = 128;

impl DraftModel {
    pub(crate) fn new(
        model: Arc<dyn CausalLm>,
        tokenizer: &Tokenizer,
        target: &dyn CausalLm,
        target_tokenizer: &Tokenizer,
        cache: PagedKvCache,
        max_batch_tokens: usize,
    ) -> Result<Self> {
        let (dv, tv) = (model.config().vocab_size, target.config().vocab_size);
        if dv.abs_diff(tv) > MAX_VOCAB_DIFFERENCE {
            return Err(Error::param("draft", format!("the draft model's vocabulary ({dv} tokens) is not the model's ({tv} tokens)")));
        }
        let vocab = dv.min(tv);
        let shared = vocab.min(tokenizer.vocab_size()).min(target_tokenizer.vocab_size());
        for id in 0..shared as u32 {
            let (a, b) = (tokenizer.id_to_token(id), target_tokenizer.id_to_token(id));
            if a != b {
                return Err(Error::param(
                    "draft",
                    format!("the draft model's token {id} is {a:?} where the model's is {b:?}: they need the same tokenizer"),
                ));
            }
        }
        Ok(Self { model, cache, seqs: HashMap::new(), logits: Vec::new(), vocab, max_batch_tokens: max_batch_tokens.max(1) })
    }

    pub(crate) fn cache(&self) -> &PagedKvCache {
        &self.cache
    }

    /// Forgets the sequences not in `live` (finished or cancelled), freeing their blocks.
    pub(crate) fn retain(&mut self, live: impl Fn(SeqId) -> bool) {
        let cache = &mut self.cache;
        self.seqs.retain(|&id, s| {
            let keep = live(id);
            if !keep {
                cache.release(&mut s.block_table);
            }
            keep
        });
    }

    /// Drafts for each of `work` (greedy, `k` tokens or fewer), into `out[i]`. A sequence the
    /// draft cache has no room for, or that is past the draft model's context, gets no draft.
    pub(crate) fn draft(&mut self, work: &[DraftWork<'_>], out: &mut [Vec<u32>]) -> Result<()> {
        let max_pos = self.model.config().max_position_embeddings;
        // Which of `work` take part; each gets room for its tokens and k - 1 drafts.
        let mut active: Vec<usize> = Vec::with_capacity(work.len());
        for (i, w) in work.iter().enumerate() {
            out[i].clear();
            let len = w.tokens.len();
            if w.k == 0 || len + w.k > max_pos {
                continue;
            }
            let s = self.seqs.entry(w.id).or_default();
            // What the draft cache holds: the tokens fed before, and the drafts the sequence kept.
            let kept = s.fed.iter().zip(&w.tokens[s.computed.min(len)..]).take_while(|(a, b)| a == b).count();
            s.computed = (s.computed + kept).min(len - 1);
            s.fed.clear();
            if self.cache.reserve(&mut s.block_table, len + w.k - 1).is_err() {
                self.cache.release(&mut s.block_table);
                s.computed = 0;
                continue;
            }
            active.push(i);
        }
        if active.is_empty() {
            return Ok(());
        }
        let bs = self.cache.block_size();
        let vocab = self.model.config().vocab_size;
        // Catch up on the tokens the draft cache lacks (a prompt in chunks), then one token per
        // round; each round's last rows give every sequence its next drafted token.
        let mut pending: Vec<usize> = active.clone();
        while !pending.is_empty() {
            let mut batch = BatchInput::default();
            let mut budget = self.max_batch_tokens;
            let mut rows = Vec::new();
            let mut next = Vec::new();
            for &i in &pending {
                let s = self.seqs.get_mut(&work[i].id).expect("active");
                let tokens = work[i].tokens;
                let n = (tokens.len() - s.computed).min(budget.max(1));
                if budget == 0 {
                    next.push(i);
                    continue;
                }
                let done = s.computed + n == tokens.len();
                let wanted = if done { LogitsWanted::Last } else { LogitsWanted::None };
                batch.push_sequence(&tokens[s.computed..s.computed + n], s.computed, &s.block_table, bs, wanted);
                s.computed += n;
                budget -= n;
                if done {
                    rows.push(i);
                } else {
                    next.push(i);
                }
            }
            self.model.forward_into(&batch, &mut self.cache, &mut self.logits)?;
            for (r, &i) in rows.iter().enumerate() {
                out[i].push(argmax(&self.logits[r * vocab..r * vocab + self.vocab]));
            }
            pending = next;
        }
        // Rounds 2..=k: feed each sequence's last drafted token.
        let mut live: Vec<usize> = active.into_iter().filter(|&i| work[i].k > 1).collect();
        while !live.is_empty() {
            let mut batch = BatchInput::default();
            for &i in &live {
                let s = self.seqs.get_mut(&work[i].id).expect("active");
                let pos = work[i].tokens.len() + s.fed.len();
                let t = *out[i].last().expect("one drafted");
                batch.push_sequence(&[t], pos, &s.block_table, bs, LogitsWanted::Last);
                s.fed.push(t);
            }
            self.model.forward_into(&batch, &mut self.cache, &mut self.logits)?;
            for (r, &i) in live.iter().enumerate() {
                out[i].push(argmax(&self.logits[r * vocab..r * vocab + self.vocab]));
            }
            live.retain(|&i| out[i].len() < work[i].k);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn draft(tokens: &[u32], min_n: usize, max_n: usize, max: usize) -> Vec<u32> {
        let mut out = vec![99];
        ngram_draft(tokens, min_n, max_n, max, &mut out);
        out
    }

    #[test]
    fn lookup_copies_what_followed_the_longest_match() {
        // "1 2 3 4 5 ... 9 2 3": the suffix [2, 3] occurred at 1..3, followed by 4 5.
        assert_eq!(draft(&[1, 2, 3, 4, 5, 9, 2, 3], 1, 4, 2), vec![4, 5]);
        // The longer match wins over a more recent shorter one: [7 2 3] matches at the start only.
        assert_eq!(draft(&[7, 2, 3, 8, 8, 5, 2, 3, 6, 6, 7, 2, 3], 1, 4, 3), vec![8, 8, 5]);
        // Equal lengths: the most recent occurrence.
        assert_eq!(draft(&[2, 3, 4, 2, 3, 5, 2, 3], 2, 4, 1), vec![5]);
        // Runs into the end of the sequence: only what exists is copied.
        assert_eq!(draft(&[5, 6, 5, 6], 1, 4, 8), vec![5, 6]);
    }

    #[test]
    fn no_match_no_draft() {
        assert!(draft(&[1, 2, 3, 4], 1, 4, 8).is_empty());
        // A one-token match does not count when at least two are required.
        assert!(draft(&[1, 2, 3, 9, 3], 2, 4, 8).is_empty());
        assert_eq!(draft(&[1, 2, 3, 9, 3], 1, 4, 8), vec![9, 3]);
        assert!(draft(&[], 1, 4, 8).is_empty());
        assert!(draft(&[3], 1, 4, 8).is_empty());
        assert!(draft(&[1, 2, 1, 2], 1, 4, 0).is_empty());
    }

    #[test]
    fn lookup_matches_a_brute_force_search() {
        let mut rng = 12345u64;
        let mut next = || {
            rng = rng.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            (rng >> 60) as u32 % 5
        };
        for _ in 0..300 {
            let len = 1 + (next() as usize * 7 + next() as usize) % 30;
            let toks: Vec<u32> = (0..len).map(|_| next()).collect();
            let (min_n, max_n) = (1 + next() as usize % 2, 2 + next() as usize % 3);
            // Brute force: every n from max_n down, the most recent earlier occurrence.
            let mut want = Vec::new();
            'outer: for n in (min_n..=max_n).rev() {
                if n >= len {
                    continue;
                }
                let suffix = &toks[len - n..];
                for end in (n..len).rev() {
                    if &toks[end - n..end] == suffix {
                        want = toks[end..len.min(end + 3)].to_vec();
                        break 'outer;
                    }
                }
            }
            assert_eq!(draft(&toks, min_n, max_n, 3), want, "{toks:?} n {min_n}..={max_n}");
        }
    }
}
