//! The scheduler decides what each engine step computes, as vLLM v1's does: `Scheduler::schedule`
//! admits waiting sequences whose prompts fit in the KV cache (reusing cached prefix blocks),
//! reserves cache blocks for the step (preempting the youngest sequences when the cache is full) and
//! returns a [`SchedulerOutput`]: which sequences run and how many tokens each feeds. After the
//! forward pass and sampling, `Scheduler::update_from_output` advances each sequence, shares its
//! newly full blocks through the prefix cache and retires the finished ones.
//!
//! Policy: decode steps first, then prefill chunks, within a token budget per step; a sequence's
//! drafted tokens (speculative decoding) ride along after its last token.

use std::collections::VecDeque;

use crate::error::Result;
use crate::kv_cache::PagedKvCache;
use crate::sampling::TokenMask;
use crate::sequence::{SeqId, Sequence};

/// The scheduler's limits.
#[derive(Debug, Clone, Copy)]
pub(crate) struct SchedulerConfig {
    /// Most tokens one step feeds (prompts are prefilled in chunks of at most this many).
    pub(crate) max_batch_tokens: usize,
    /// Most sequences running at once.
    pub(crate) max_seqs: usize,
    /// Reuse the cached blocks of prompt prefixes seen before.
    pub(crate) prefix_caching: bool,
}

/// One sequence's part of a step.
#[derive(Debug, Clone)]
pub struct ScheduledSeq {
    pub id: SeqId,
    /// Tokens of the sequence fed this step, from its first uncomputed token on.
    pub num_tokens: usize,
    /// Drafted tokens fed after them, to verify (only when the step reaches the sequence's end).
    pub num_draft: usize,
    /// Whether the step reaches the sequence's last token, so it samples: `1 + num_draft` rows.
    pub sample: bool,
    /// Tokens allowed at the first sampled row, for a constrained sequence (filled before the
    /// forward pass).
    pub mask: Option<TokenMask>,
}

impl ScheduledSeq {
    /// Logit rows this sequence produces.
    pub fn num_rows(&self) -> usize {
        if self.sample {
            1 + self.num_draft
        } else {
            0
        }
    }
}

/// What one step computes.
#[derive(Debug, Default)]
pub struct SchedulerOutput {
    /// The sequences that run, in batch order.
    pub seqs: Vec<ScheduledSeq>,
    /// Tokens of the step that are prompt (prefill) rather than decode work.
    pub prefill_tokens: usize,
    /// Sequences sent back to the queue to free cache blocks.
    pub preempted: Vec<SeqId>,
}

impl SchedulerOutput {
    pub fn is_empty(&self) -> bool {
        self.seqs.is_empty()
    }
}

/// The waiting queue and the running sequences.
pub(crate) struct Scheduler {
    cfg: SchedulerConfig,
    waiting: VecDeque<Sequence>,
    running: Vec<Sequence>,
    /// Prompt tokens looked up in the prefix cache at admission, and how many were found.
    pub(crate) prefix_lookup_tokens: usize,
    pub(crate) prefix_hit_tokens: usize,
    pub(crate) preemptions: usize,
}

impl Scheduler {
    pub(crate) fn new(cfg: SchedulerConfig) -> Self {
        Self { cfg, waiting: VecDeque::new(), running: Vec::new(), prefix_lookup_tokens: 0, prefix_hit_tokens: 0, preemptions: 0 }
    }

    pub(crate) fn add(&mut self, seq: Sequence) {
        self.waiting.push_back(seq);
    }

    pub(crate) fn num_running(&self) -> usize {
        self.running.len()
    }

    pub(crate) fn num_waiting(&self) -> usize {
        self.waiting.len()
    }

    pub(crate) fn has_work(&self) -> bool {
        !self.running.is_empty() || !self.waiting.is_empty()
    }

    /// The running sequences.
    pub(crate) fn running(&self) -> &[Sequence] {
        &self.running
    }

    /// A running or waiting sequence.
    pub(crate) fn get_mut(&mut self, id: SeqId) -> Option<&mut Sequence> {
        self.running.iter_mut().chain(self.waiting.iter_mut()).find(|s| s.id == id)
    }

    /// Drops a sequence, freeing its cache blocks at once. Unknown ids are ignored.
    pub(crate) fn cancel(&mut self, id: SeqId, cache: &mut PagedKvCache) {
        if let Some(i) = self.running.iter().position(|s| s.id == id) {
            let mut s = self.running.remove(i);
            cache.release(&mut s.block_table);
        }
        self.waiting.retain(|s| s.id != id);
    }

    /// Drops every running sequence, freeing their blocks; returns their ids.
    pub(crate) fn abort_running(&mut self, cache: &mut PagedKvCache) -> Vec<SeqId> {
        let mut ids = Vec::with_capacity(self.running.len());
        for mut s in self.running.drain(..) {
            cache.release(&mut s.block_table);
            ids.push(s.id);
        }
        ids
    }

    /// Admits waiting sequences whose prompts fit, then plans the step: decode steps first, then
    /// prefill chunks within the token budget, with cache room reserved for every token it feeds.
    /// Fails only when a single running sequence cannot get room at all (it is dropped).
    pub(crate) fn schedule(&mut self, cache: &mut PagedKvCache) -> Result<SchedulerOutput> {
        self.admit(cache);
        let mut out = SchedulerOutput::default();
        if self.running.is_empty() {
            return Ok(out);
        }
        let mut order: Vec<usize> = (0..self.running.len()).collect();
        order.sort_by_key(|&i| (self.running[i].is_prefilling(), i));
        let mut budget = self.cfg.max_batch_tokens;
        for i in order {
            if budget == 0 {
                break;
            }
            let Some(seq) = self.running.get(i) else { continue };
            let id = seq.id;
            let n = seq.num_uncomputed().min(budget);
            // Drafts only after the sequence's last token, as far as the budget reaches.
            let num_draft = if n == seq.num_uncomputed() { seq.draft.len().min(budget - n) } else { 0 };
            // Make room, preempting younger sequences if the cache is full.
            while let Some(pos) = self.running.iter().position(|s| s.id == id) {
                let seq = &mut self.running[pos];
                match cache.reserve(&mut seq.block_table, seq.computed + n + num_draft) {
                    Ok(()) => {
                        if n > 1 || seq.computed < seq.prompt_len {
                            out.prefill_tokens += n;
                        }
                        let sample = seq.computed + n == seq.tokens.len();
                        out.seqs.push(ScheduledSeq {
                            id,
                            num_tokens: n,
                            num_draft: if sample { num_draft } else { 0 },
                            sample,
                            mask: None,
                        });
                        budget -= n + num_draft;
                        break;
                    }
                    Err(e) => {
                        let victim_is_self = self.running.last().is_some_and(|s| s.id == id);
                        if self.running.len() == 1 {
                            // Nothing left to free: the sequence cannot continue at all.
                            let mut s = self.running.pop().expect("one running");
                            cache.release(&mut s.block_table);
                            return Err(e);
                        }
                        let victim = self.preempt_youngest(cache);
                        out.seqs.retain(|s| Some(s.id) != victim);
                        out.preempted.extend(victim);
                        if victim_is_self {
                            break;
                        }
                    }
                }
            }
        }
        Ok(out)
    }

    /// Admits waiting sequences (oldest first) while their prompts fit in the free blocks next to
    /// what the running ones still need, pointing each at its longest cached prefix.
    pub(crate) fn admit(&mut self, cache: &mut PagedKvCache) {
        while self.running.len() < self.cfg.max_seqs {
            let Some(mut seq) = self.waiting.pop_front() else { break };
            if self.cfg.prefix_caching {
                seq.computed = cache.match_prefix(&seq.tokens, seq.cache_root, &mut seq.block_table, &mut seq.block_hashes);
            }
            let need = cache.blocks_for(seq.tokens.len() + 1) - seq.block_table.len();
            let reserved: usize =
                self.running.iter().map(|s| cache.blocks_for(s.tokens.len() + 1).saturating_sub(s.block_table.len())).sum();
            if need + reserved > cache.num_free_blocks() && !self.running.is_empty() {
                cache.release(&mut seq.block_table);
                seq.reset_computed();
                self.waiting.push_front(seq);
                break;
            }
            if self.cfg.prefix_caching {
                self.prefix_lookup_tokens += seq.tokens.len();
                self.prefix_hit_tokens += seq.computed;
            }
            seq.cached_tokens.get_or_insert(seq.computed);
            self.running.push(seq);
        }
    }

    /// Frees the youngest running sequence's blocks and puts it back in the queue; it will be
    /// recomputed from its tokens (prompt and generated so far) when re-admitted, reusing whatever
    /// of it is still in the prefix cache.
    fn preempt_youngest(&mut self, cache: &mut PagedKvCache) -> Option<SeqId> {
        let mut s = self.running.pop()?;
        cache.release(&mut s.block_table);
        s.reset_computed();
        self.preemptions += 1;
        let id = s.id;
        self.waiting.push_front(s);
        Some(id)
    }

    /// After the step: each planned sequence holds `num_tokens` more tokens in the cache, plus the
    /// drafted tokens `accepted[i]` says were confirmed (its other drafts are dropped once it has
    /// sampled); its newly
    /// full blocks join the prefix cache; the sequences in `finished` leave, freeing their blocks.
    pub(crate) fn update_from_output(&mut self, plan: &SchedulerOutput, accepted: &[usize], finished: &[SeqId], cache: &mut PagedKvCache) {
        for (p, &acc) in plan.seqs.iter().zip(accepted) {
            let Some(seq) = self.running.iter_mut().find(|s| s.id == p.id) else { continue };
            seq.computed += p.num_tokens + acc;
            if p.num_draft > 0 {
                seq.draft_len = Some(if acc == p.num_draft { p.num_draft + 2 } else { (p.num_draft - 1).max(1) });
            }
            // A prompt chunk short of the end keeps its draft for the step that reaches the end.
            if p.sample {
                seq.draft.clear();
            }
            if self.cfg.prefix_caching {
                cache.commit_full_blocks(&seq.tokens[..seq.computed], seq.cache_root, &seq.block_table, &mut seq.block_hashes);
            }
        }
        for &id in finished {
            if let Some(pos) = self.running.iter().position(|s| s.id == id) {
                let mut done = self.running.remove(pos);
                cache.release(&mut done.block_table);
            }
        }
    }
}
