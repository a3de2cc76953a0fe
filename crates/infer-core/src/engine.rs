//! The engine: sequences join a queue, each [`Engine::step`] schedules a ragged batch (decode steps
//! first, then prefill chunks within a token budget), runs one forward pass over the paged KV cache,
//! samples, and reports new tokens. One prompt is simply a batch of one; many prompts share steps.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::error::{Error, Result};
use crate::kv_cache::{block_hash, BlockHash, PagedKvCache, DEFAULT_BLOCK_SIZE};
use crate::models::{BatchInput, CausalLm, LogitsWanted};
use crate::sampling::{top_logprobs, Sampler, SamplingParams};
use crate::stop::StopMatcher;
use crate::tokenizer::{IncrementalDecoder, Tokenizer};

/// Identifies a sequence inside an engine.
pub type SeqId = u64;

/// Engine limits.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// Tokens per KV cache block.
    pub block_size: usize,
    /// KV cache memory in bytes; `None`: room for `max_seqs` full contexts (on a GPU at most 80% of
    /// its free memory).
    pub kv_cache_bytes: Option<usize>,
    /// Keys and values stored as f32 or f16 (bf16 too on a GPU); `None`: f32 on the CPU, the
    /// model's dtype on a GPU.
    pub kv_cache_dtype: Option<candle_core::DType>,
    /// Most tokens (prompt + generation) one sequence may hold; `None`: the model's trained context.
    pub max_context: Option<usize>,
    /// Most tokens one forward pass processes (long prompts are prefilled in chunks of this size).
    pub max_batch_tokens: usize,
    /// Most sequences running at once.
    pub max_seqs: usize,
    /// Reuse the KV blocks of prompt prefixes seen before (content-hashed full blocks).
    pub prefix_caching: bool,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            block_size: DEFAULT_BLOCK_SIZE,
            kv_cache_bytes: None,
            kv_cache_dtype: None,
            max_context: None,
            max_batch_tokens: 512,
            max_seqs: 16,
            prefix_caching: true,
        }
    }
}

/// Why a sequence ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// An end-of-sequence token or a stop string.
    Stop,
    /// `max_tokens` or the context size was reached.
    Length,
}

impl FinishReason {
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::Stop => "stop",
            Self::Length => "length",
        }
    }
}

/// One generated token of one sequence.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenEvent {
    pub seq_id: SeqId,
    pub token: u32,
    /// Log-probability of `token` under the model.
    pub logprob: f32,
    /// Text that became final with this token (may be empty: an incomplete character or a possible
    /// stop string is held back).
    pub text: String,
    /// Set on the sequence's last event.
    pub finish: Option<FinishReason>,
    /// The most likely tokens at this position with their log-probabilities, most likely first
    /// (as many as [`SamplingParams::logprobs`] asks for).
    pub top_logprobs: Vec<(u32, f32)>,
    /// Prompt tokens whose keys and values came from the prefix cache when the sequence started.
    pub cached_tokens: usize,
}

struct Sequence {
    id: SeqId,
    tokens: Vec<u32>,
    prompt_len: usize,
    computed: usize,
    block_table: Vec<u32>,
    sampler: Sampler,
    max_len: usize,
    decoder: IncrementalDecoder,
    stop: StopMatcher,
    ignore_eos: bool,
    /// Content hashes of the full blocks computed so far (registered in the prefix cache).
    block_hashes: Vec<BlockHash>,
    /// Prompt tokens found in the prefix cache at first admission.
    cached_tokens: Option<usize>,
}

/// Timing and counts of the work done so far.
#[derive(Debug, Clone, Copy, Default)]
pub struct EngineStats {
    pub prompt_tokens: usize,
    pub generated_tokens: usize,
    pub prefill_time: Duration,
    pub decode_time: Duration,
    /// Tokens looked up in the prefix cache when sequences were admitted, and how many were found.
    pub prefix_lookup_tokens: usize,
    pub prefix_hit_tokens: usize,
    /// Sequences sent back to the queue because the KV cache ran out of blocks.
    pub preemptions: usize,
}

/// Runs sequences over one model and one paged KV cache.
pub struct Engine {
    model: Arc<dyn CausalLm>,
    tokenizer: Tokenizer,
    eos: Vec<u32>,
    cache: PagedKvCache,
    cfg: EngineConfig,
    max_context: usize,
    waiting: VecDeque<Sequence>,
    running: Vec<Sequence>,
    next_id: SeqId,
    stats: EngineStats,
    /// The last step's logits, `[sampled rows, vocab]` (reused from step to step).
    logits: Vec<f32>,
}

impl Engine {
    pub fn new(model: Arc<dyn CausalLm>, tokenizer: Tokenizer, eos_token_ids: Vec<u32>, cfg: EngineConfig) -> Result<Self> {
        let mcfg = model.config();
        let max_context = cfg.max_context.unwrap_or(mcfg.max_position_embeddings).max(2);
        if cfg.max_batch_tokens == 0 || cfg.max_seqs == 0 {
            return Err(Error::param("engine", "max_batch_tokens and max_seqs must be positive"));
        }
        let device = model.device();
        let dtype = cfg.kv_cache_dtype.unwrap_or_else(|| crate::kv_cache::default_cache_dtype(&device, model.dtype()));
        let cache = match cfg.kv_cache_bytes {
            Some(bytes) => PagedKvCache::with_memory_budget_on(mcfg, cfg.block_size, bytes, &device, dtype)?,
            None => PagedKvCache::default_for(mcfg, cfg.block_size, max_context.div_ceil(cfg.block_size) * cfg.max_seqs, &device, dtype)?,
        };
        Ok(Self {
            model,
            tokenizer,
            eos: eos_token_ids,
            cache,
            max_context,
            cfg,
            waiting: VecDeque::new(),
            running: Vec::new(),
            next_id: 0,
            stats: EngineStats::default(),
            logits: Vec::new(),
        })
    }

    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    pub fn model(&self) -> &Arc<dyn CausalLm> {
        &self.model
    }

    pub fn cache(&self) -> &PagedKvCache {
        &self.cache
    }

    /// Most tokens one sequence can hold.
    pub fn max_context(&self) -> usize {
        self.max_context.min(self.cache.capacity_tokens())
    }

    pub fn stats(&self) -> EngineStats {
        self.stats
    }

    pub fn num_running(&self) -> usize {
        self.running.len()
    }

    pub fn num_waiting(&self) -> usize {
        self.waiting.len()
    }

    pub fn has_work(&self) -> bool {
        !self.running.is_empty() || !self.waiting.is_empty()
    }

    /// Queues a prompt; generation starts at the next [`step`](Self::step).
    pub fn add_request(&mut self, prompt: Vec<u32>, params: SamplingParams) -> Result<SeqId> {
        params.validate(self.model.config().vocab_size)?;
        if prompt.is_empty() {
            return Err(Error::param("prompt", "the prompt is empty"));
        }
        let vocab = self.model.config().vocab_size;
        if let Some(&bad) = prompt.iter().find(|&&t| t as usize >= vocab) {
            return Err(Error::param("prompt", format!("token id {bad} is outside the vocabulary (size {vocab})")));
        }
        let limit = self.max_context();
        if prompt.len() >= limit {
            return Err(Error::ContextOverflow { needed: prompt.len() + 1, limit });
        }
        let max_len = match params.max_tokens {
            Some(n) => (prompt.len() + n).min(limit),
            None => limit,
        };
        let id = self.next_id;
        self.next_id += 1;
        let sampler = Sampler::new(params.clone(), &prompt);
        self.waiting.push_back(Sequence {
            id,
            prompt_len: prompt.len(),
            tokens: prompt,
            computed: 0,
            block_table: Vec::new(),
            sampler,
            max_len,
            decoder: IncrementalDecoder::new(),
            stop: StopMatcher::new(params.stop.clone()),
            ignore_eos: params.ignore_eos,
            block_hashes: Vec::new(),
            cached_tokens: None,
        });
        Ok(id)
    }

    /// Drops a sequence, freeing its cache blocks at once. Unknown ids are ignored.
    pub fn cancel(&mut self, id: SeqId) {
        if let Some(i) = self.running.iter().position(|s| s.id == id) {
            let mut s = self.running.remove(i);
            self.cache.release(&mut s.block_table);
        }
        self.waiting.retain(|s| s.id != id);
    }

    /// Drops every running sequence (after a failed step), freeing their blocks; returns their ids.
    pub fn abort_running(&mut self) -> Vec<SeqId> {
        let mut ids = Vec::with_capacity(self.running.len());
        for mut s in self.running.drain(..) {
            self.cache.release(&mut s.block_table);
            ids.push(s.id);
        }
        ids
    }

    /// Points a sequence that is about to start at the cached blocks of its longest cached prefix
    /// (whole blocks, leaving at least one token to compute).
    fn attach_cached_prefix(&mut self, seq: &mut Sequence) {
        debug_assert!(seq.block_table.is_empty() && seq.computed == 0);
        if !self.cfg.prefix_caching {
            return;
        }
        let bs = self.cache.block_size();
        let full = (seq.tokens.len() - 1) / bs;
        let mut parent = 0;
        for i in 0..full {
            let h = block_hash(parent, &seq.tokens[i * bs..(i + 1) * bs]);
            let Some(b) = self.cache.allocator_mut().acquire_cached(h) else { break };
            seq.block_table.push(b);
            seq.block_hashes.push(h);
            parent = h;
        }
        seq.computed = seq.block_table.len() * bs;
    }

    /// Admits waiting sequences whose prompt fits in the free blocks.
    fn admit(&mut self) {
        while self.running.len() < self.cfg.max_seqs {
            let Some(mut seq) = self.waiting.pop_front() else { break };
            self.attach_cached_prefix(&mut seq);
            let need = self.cache.blocks_for(seq.tokens.len() + 1) - seq.block_table.len();
            let reserved: usize =
                self.running.iter().map(|s| self.cache.blocks_for(s.tokens.len() + 1).saturating_sub(s.block_table.len())).sum();
            if need + reserved > self.cache.num_free_blocks() && !self.running.is_empty() {
                self.cache.release(&mut seq.block_table);
                seq.block_hashes.clear();
                seq.computed = 0;
                self.waiting.push_front(seq);
                break;
            }
            if self.cfg.prefix_caching {
                self.stats.prefix_lookup_tokens += seq.tokens.len();
                self.stats.prefix_hit_tokens += seq.computed;
            }
            seq.cached_tokens.get_or_insert(seq.computed);
            self.running.push(seq);
        }
    }

    /// Frees the youngest running sequence's blocks and puts it back in the queue; it will be
    /// recomputed from its tokens (prompt and generated so far) when re-admitted, reusing whatever
    /// of it is still in the prefix cache.
    fn preempt_youngest(&mut self) -> Option<SeqId> {
        let mut s = self.running.pop()?;
        self.cache.release(&mut s.block_table);
        s.computed = 0;
        s.block_hashes.clear();
        self.stats.preemptions += 1;
        let id = s.id;
        self.waiting.push_front(s);
        Some(id)
    }

    /// Runs one forward pass over the scheduled batch and returns the tokens it produced.
    pub fn step(&mut self) -> Result<Vec<TokenEvent>> {
        self.admit();
        if self.running.is_empty() {
            return Ok(Vec::new());
        }
        // Decode steps first, then prefill chunks, within the token budget.
        let mut order: Vec<usize> = (0..self.running.len()).collect();
        order.sort_by_key(|&i| (self.running[i].tokens.len() - self.running[i].computed > 1, i));
        let mut budget = self.cfg.max_batch_tokens;
        let mut plan: Vec<(SeqId, usize)> = Vec::new();
        for i in order {
            if budget == 0 {
                break;
            }
            let Some(seq) = self.running.get(i) else { continue };
            let (id, n) = (seq.id, (seq.tokens.len() - seq.computed).min(budget));
            // Make room, preempting younger sequences if the cache is full.
            while let Some(pos) = self.running.iter().position(|s| s.id == id) {
                let seq = &mut self.running[pos];
                let want = seq.computed + n;
                match self.cache.reserve(&mut seq.block_table, want) {
                    Ok(()) => {
                        plan.push((id, n));
                        budget -= n;
                        break;
                    }
                    Err(e) => {
                        let victim_is_self = self.running.last().is_some_and(|s| s.id == id);
                        let only_one = self.running.len() == 1;
                        if only_one {
                            // Nothing left to free: the sequence cannot continue at all.
                            let mut s = self.running.pop().expect("one running");
                            self.cache.release(&mut s.block_table);
                            return Err(e);
                        }
                        let victim = self.preempt_youngest();
                        plan.retain(|(pid, _)| Some(*pid) != victim);
                        if victim_is_self {
                            break;
                        }
                    }
                }
            }
        }
        if plan.is_empty() {
            return Ok(Vec::new());
        }
        let mut batch = BatchInput::default();
        let mut sampled_seqs = Vec::new();
        let mut prefill_tokens = 0;
        for &(id, n) in &plan {
            let seq = self.running.iter().find(|s| s.id == id).expect("planned sequence runs");
            let done = seq.computed + n == seq.tokens.len();
            if n > 1 || seq.computed < seq.prompt_len {
                prefill_tokens += n;
            }
            batch.push_sequence(
                &seq.tokens[seq.computed..seq.computed + n],
                seq.computed,
                &seq.block_table,
                self.cache.block_size(),
                if done { LogitsWanted::Last } else { LogitsWanted::None },
            );
            if done {
                sampled_seqs.push(id);
            }
        }
        let t0 = Instant::now();
        self.model.forward_into(&batch, &mut self.cache, &mut self.logits)?;
        let vocab = self.model.config().vocab_size;
        let elapsed = t0.elapsed();
        if prefill_tokens * 2 > batch.num_tokens() {
            self.stats.prefill_time += elapsed;
        } else {
            self.stats.decode_time += elapsed;
        }
        self.stats.prompt_tokens += prefill_tokens;
        let bs = self.cache.block_size();
        for &(id, n) in &plan {
            if let Some(seq) = self.running.iter_mut().find(|s| s.id == id) {
                seq.computed += n;
                // Full blocks become shareable.
                while self.cfg.prefix_caching && (seq.block_hashes.len() + 1) * bs <= seq.computed {
                    let i = seq.block_hashes.len();
                    let h = block_hash(seq.block_hashes.last().copied().unwrap_or(0), &seq.tokens[i * bs..(i + 1) * bs]);
                    self.cache.allocator_mut().register(seq.block_table[i], h);
                    seq.block_hashes.push(h);
                }
            }
        }
        let mut events = Vec::with_capacity(sampled_seqs.len());
        for (row, id) in sampled_seqs.into_iter().enumerate() {
            let pos = self.running.iter().position(|s| s.id == id).expect("sampled sequence runs");
            let seq = &mut self.running[pos];
            let logits = &self.logits[row * vocab..(row + 1) * vocab];
            let s = seq.sampler.sample(logits);
            let top = match seq.sampler.params().logprobs {
                Some(k) if k > 0 => top_logprobs(logits, k),
                _ => Vec::new(),
            };
            seq.tokens.push(s.token);
            self.stats.generated_tokens += 1;
            let mut text = String::new();
            let mut finish = None;
            let mut cut = false;
            if !seq.ignore_eos && self.eos.contains(&s.token) {
                finish = Some(FinishReason::Stop);
            } else {
                if let Some(piece) = seq.decoder.push(&self.tokenizer, s.token)? {
                    let out = seq.stop.push(&piece);
                    text = out.emit;
                    cut = out.stopped;
                }
                if cut {
                    finish = Some(FinishReason::Stop);
                } else if seq.tokens.len() >= seq.max_len {
                    finish = Some(FinishReason::Length);
                }
            }
            // At the end, release held-back text, unless a stop string cut it off.
            if finish.is_some() && !cut {
                if let Some(rest) = seq.decoder.flush(&self.tokenizer)? {
                    let out = seq.stop.push(&rest);
                    text.push_str(&out.emit);
                    if out.stopped {
                        cut = true;
                        finish = Some(FinishReason::Stop);
                    }
                }
                if !cut {
                    text.push_str(&seq.stop.flush());
                }
            }
            events.push(TokenEvent {
                seq_id: id,
                token: s.token,
                logprob: s.logprob,
                text,
                finish,
                top_logprobs: top,
                cached_tokens: seq.cached_tokens.unwrap_or(0),
            });
            if finish.is_some() {
                let mut done = self.running.remove(pos);
                self.cache.release(&mut done.block_table);
            }
        }
        Ok(events)
    }
}
