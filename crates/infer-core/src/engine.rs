//! The engine: sequences join a queue, each [`Engine::step`] has the scheduler plan a ragged batch
//! (decode steps first, then prefill chunks within a token budget; scheduler.rs), runs one forward
//! pass over the paged KV cache, samples, and reports new tokens (sequence.rs turns each into text).
//! One prompt is simply a batch of one; many prompts share steps.

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::error::{Error, Result};
use crate::kv_cache::{CacheLimit, CacheSizing, PagedKvCache, DEFAULT_BLOCK_SIZE};
use crate::models::{BatchInput, CausalLm, LogitsWanted};
use crate::sampling::{top_logprobs, SamplingParams, TokenMask};
use crate::scheduler::{Scheduler, SchedulerConfig, SchedulerOutput};
use crate::sequence::Sequence;
pub use crate::sequence::{FinishReason, SeqId, TokenConstraint, TokenEvent};
use crate::speculative::{ngram_draft, DraftModel, DraftSource, DraftWork, SpeculativeConfig};
use crate::structured::ConstraintCompiler;
use crate::tokenizer::Tokenizer;

/// Engine limits.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// Tokens per KV cache block.
    pub block_size: usize,
    /// KV cache memory in bytes; `None`: room for `max_seqs` full contexts, but at most half the
    /// memory available once the weights are loaded (on a GPU at most 80% of its free memory).
    pub kv_cache_bytes: Option<usize>,
    /// Keys and values stored as f32, f16 or q8_0 (bf16 too on a GPU; q8_0 on the CPU); `None`: f32 on the CPU, the
    /// model's dtype on a GPU.
    pub kv_cache_dtype: Option<crate::kv_cache::KvDtype>,
    /// Most tokens (prompt + generation) one sequence may hold; `None`: the model's trained context.
    pub max_context: Option<usize>,
    /// Most tokens one forward pass processes (long prompts are prefilled in chunks of this size).
    pub max_batch_tokens: usize,
    /// Most sequences running at once.
    pub max_seqs: usize,
    /// Reuse the KV blocks of prompt prefixes seen before (content-hashed full blocks).
    pub prefix_caching: bool,
    /// Compute constrained sequences' token masks on another thread while the forward pass runs
    /// (vLLM's and llguidance's advice); off: just before it.
    pub overlap_masks: bool,
    /// Speculative decoding: draft tokens by prompt lookup or with a draft model and verify them
    /// in the step's forward pass (speculative.rs). `None`: off.
    pub speculative: Option<SpeculativeConfig>,
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
            overlap_masks: true,
            speculative: None,
        }
    }
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
    /// Speculative decoding: drafted tokens the model checked, and how many of them it kept.
    pub draft_tokens: usize,
    pub accepted_draft_tokens: usize,
}

/// Runs sequences over one model and one paged KV cache. Each [`step`](Self::step) reads as vLLM
/// v1's loop: the scheduler plans the step, the plan becomes a ragged batch, the model runs it, each
/// sampled row becomes a token, and the scheduler takes the outcome.
pub struct Engine {
    model: Arc<dyn CausalLm>,
    tokenizer: Tokenizer,
    eos: Vec<u32>,
    cache: PagedKvCache,
    cache_sizing: CacheSizing,
    max_context: usize,
    scheduler: Scheduler,
    next_id: SeqId,
    stats: EngineStats,
    /// The last step's logits, `[sampled rows, vocab]` (reused from step to step).
    logits: Vec<f32>,
    /// Compiles [`SamplingParams::constraint`]s; built at the first one.
    compiler: Option<Arc<ConstraintCompiler>>,
    overlap_masks: bool,
    max_batch_tokens: usize,
    spec: Option<Speculator>,
}

/// The engine's speculative decoding state: its settings, the draft model if any, and buffers.
struct Speculator {
    cfg: SpeculativeConfig,
    model: Option<DraftModel>,
    drafts: Vec<Vec<u32>>,
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
        let (cache, cache_sizing) = match cfg.kv_cache_bytes {
            Some(bytes) => {
                let cache = PagedKvCache::with_memory_budget_on(mcfg, cfg.block_size, bytes, &device, dtype)?;
                let blocks = cache.num_blocks();
                let bytes = blocks * PagedKvCache::bytes_per_block_of(mcfg, cfg.block_size, dtype);
                let limit = CacheLimit::Requested;
                let sizing = CacheSizing { blocks, block_size: cfg.block_size, dtype, bytes, max_context, max_seqs: cfg.max_seqs, limit };
                (cache, sizing)
            }
            None => PagedKvCache::default_for(mcfg, cfg.block_size, max_context, cfg.max_seqs, &device, dtype)?,
        };
        let spec = match cfg.speculative {
            None => None,
            Some(sc) => {
                sc.validate()?;
                let model = match &sc.source {
                    DraftSource::Ngram { .. } => None,
                    DraftSource::Model { model: draft, tokenizer: dtok } => {
                        let ddevice = draft.device();
                        let ddtype = cfg.kv_cache_dtype.unwrap_or_else(|| crate::kv_cache::default_cache_dtype(&ddevice, draft.dtype()));
                        let dctx = max_context.min(draft.config().max_position_embeddings);
                        let (dcache, _) = PagedKvCache::default_for(draft.config(), cfg.block_size, dctx, cfg.max_seqs, &ddevice, ddtype)?;
                        Some(DraftModel::new(draft.clone(), dtok, model.as_ref(), &tokenizer, dcache, cfg.max_batch_tokens)?)
                    }
                };
                Some(Speculator { cfg: sc, model, drafts: Vec::new() })
            }
        };
        let scheduler = Scheduler::new(SchedulerConfig {
            max_batch_tokens: cfg.max_batch_tokens,
            max_seqs: cfg.max_seqs,
            prefix_caching: cfg.prefix_caching,
        });
        Ok(Self {
            model,
            tokenizer,
            eos: eos_token_ids,
            cache,
            cache_sizing,
            max_context,
            scheduler,
            next_id: 0,
            stats: EngineStats::default(),
            logits: Vec::new(),
            compiler: None,
            overlap_masks: cfg.overlap_masks,
            max_batch_tokens: cfg.max_batch_tokens,
            spec,
        })
    }

    /// The draft model's KV cache, when speculative decoding uses one.
    pub fn draft_cache(&self) -> Option<&PagedKvCache> {
        self.spec.as_ref().and_then(|s| s.model.as_ref()).map(|m| m.cache())
    }

    /// How the KV cache was sized (its `Display` is the line the CLI and the server print).
    pub fn cache_sizing(&self) -> &CacheSizing {
        &self.cache_sizing
    }

    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    /// The end-of-sequence token ids.
    pub fn eos_token_ids(&self) -> &[u32] {
        &self.eos
    }

    /// The compiler of structured-output constraints over this model's vocabulary (built at the
    /// first call; shared, so a server can compile requests' constraints off the engine thread).
    pub fn constraint_compiler(&mut self) -> Result<Arc<ConstraintCompiler>> {
        if let Some(c) = &self.compiler {
            return Ok(c.clone());
        }
        let c = Arc::new(ConstraintCompiler::new(&self.tokenizer, self.model.config().vocab_size, &self.eos)?);
        self.compiler = Some(c.clone());
        Ok(c)
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
        EngineStats {
            prefix_lookup_tokens: self.scheduler.prefix_lookup_tokens,
            prefix_hit_tokens: self.scheduler.prefix_hit_tokens,
            preemptions: self.scheduler.preemptions,
            ..self.stats
        }
    }

    pub fn num_running(&self) -> usize {
        self.scheduler.num_running()
    }

    pub fn num_waiting(&self) -> usize {
        self.scheduler.num_waiting()
    }

    pub fn has_work(&self) -> bool {
        self.scheduler.has_work()
    }

    /// Queues a prompt; generation starts at the next [`step`](Self::step).
    pub fn add_request(&mut self, prompt: Vec<u32>, params: SamplingParams) -> Result<SeqId> {
        self.add_constrained_request(prompt, params, None)
    }

    /// [`add_request`](Self::add_request) with a constraint on the tokens it may generate (each
    /// token is sampled among those the constraint allows). Without one, `params.constraint` (if
    /// any) is compiled here.
    pub fn add_constrained_request(
        &mut self,
        prompt: Vec<u32>,
        params: SamplingParams,
        constraint: Option<Box<dyn TokenConstraint>>,
    ) -> Result<SeqId> {
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
            Some(n) => prompt.len().saturating_add(n).min(limit),
            None => limit,
        };
        let constraint = match (constraint, &params.constraint) {
            (Some(c), _) => Some(c),
            (None, Some(spec)) => Some(Box::new(self.constraint_compiler()?.compile(spec)?) as Box<dyn TokenConstraint>),
            (None, None) => None,
        };
        let id = self.next_id;
        self.next_id += 1;
        let mut seq = Sequence::new(id, prompt, &params, max_len);
        seq.constraint = constraint;
        self.scheduler.add(seq);
        Ok(id)
    }

    /// Proposes `draft` as the tokens that follow sequence `id`'s last token (speculative
    /// decoding): its next step feeds them after that token and keeps those the model itself
    /// samples there, so the output is what it would have been without them. Replaces an earlier
    /// draft; drafts past the sequence's length limit are cut.
    pub fn propose_draft(&mut self, id: SeqId, mut draft: Vec<u32>) -> Result<()> {
        let vocab = self.model.config().vocab_size;
        if let Some(&bad) = draft.iter().find(|&&t| t as usize >= vocab) {
            return Err(Error::param("draft", format!("token id {bad} is outside the vocabulary (size {vocab})")));
        }
        let limit = self.max_context();
        let seq = self.scheduler.get_mut(id).ok_or_else(|| Error::param("draft", format!("no sequence {id}")))?;
        draft.truncate(limit.saturating_sub(seq.tokens.len() + 1));
        seq.draft = draft;
        Ok(())
    }

    /// Drops a sequence, freeing its cache blocks at once. Unknown ids are ignored.
    pub fn cancel(&mut self, id: SeqId) {
        self.scheduler.cancel(id, &mut self.cache);
    }

    /// Drops every running sequence (after a failed step), freeing their blocks; returns their ids.
    pub fn abort_running(&mut self) -> Vec<SeqId> {
        self.scheduler.abort_running(&mut self.cache)
    }

    /// One step: plan → batch → forward (constrained sequences' masks computed meanwhile) → sample
    /// → append. Returns the tokens it produced.
    pub fn step(&mut self) -> Result<Vec<TokenEvent>> {
        if self.spec.is_some() {
            // Drafting is decode work (a draft model's steps count with the steps they save).
            let t0 = Instant::now();
            // Admitted first, so that prompts starting now get drafts too.
            self.scheduler.admit(&mut self.cache);
            self.propose_drafts()?;
            self.stats.decode_time += t0.elapsed();
        }
        let mut plan = self.scheduler.schedule(&mut self.cache)?;
        if plan.is_empty() {
            return Ok(Vec::new());
        }
        let batch = self.build_batch(&plan);
        self.forward_and_masks(&batch, &mut plan)?;
        let (events, accepted, finished) = self.sample_and_append(&mut plan)?;
        self.scheduler.update_from_output(&plan, &accepted, &finished, &mut self.cache);
        Ok(events)
    }

    /// Drafts tokens for the running sequences whose next step samples and that have none yet,
    /// within the step's row limit (speculative.rs).
    fn propose_drafts(&mut self) -> Result<()> {
        let spec = self.spec.as_mut().expect("speculative decoding is on");
        let limit = self.max_context.min(self.cache.capacity_tokens());
        let running = self.scheduler.running();
        if let Some(m) = spec.model.as_mut() {
            m.retain(|id| running.iter().any(|s| s.id == id));
        }
        // Sequences whose next step reaches their end: decoding ones, and prompts that fit in a
        // step (the lookup then drafts from the prompt itself).
        let max_batch = self.max_batch_tokens;
        let ready = |s: &Sequence| s.draft.is_empty() && (1..=max_batch).contains(&s.num_uncomputed());
        let sampling = running.iter().filter(|s| ready(s)).count();
        if sampling == 0 {
            return Ok(());
        }
        // Rows the step may spend on drafts, shared evenly among those sequences.
        let per_seq = spec.cfg.max_rows.saturating_sub(sampling) / sampling;
        let mut work = Vec::new();
        for s in running.iter().filter(|s| ready(s)) {
            let (max, min) = s.draft_limits(spec.cfg.draft_max, spec.cfg.draft_min);
            // Room left for drafts plus the token sampled after them.
            let room = s.max_len().min(limit).saturating_sub(s.tokens.len() + 1);
            let k = max.min(s.draft_len.unwrap_or(max)).min(per_seq).min(room);
            if k == 0 || k < min {
                continue;
            }
            work.push(DraftWork { id: s.id, tokens: &s.tokens, k });
        }
        if work.is_empty() {
            return Ok(());
        }
        spec.drafts.resize_with(work.len().max(spec.drafts.len()), Vec::new);
        if let Some(m) = spec.model.as_mut() {
            m.draft(&work, &mut spec.drafts)?;
        } else if let DraftSource::Ngram { min_n, max_n } = spec.cfg.source {
            for (w, out) in work.iter().zip(spec.drafts.iter_mut()) {
                ngram_draft(w.tokens, min_n, max_n, w.k, out);
            }
        }
        let ids: Vec<SeqId> = work.iter().map(|w| w.id).collect();
        drop(work);
        for (i, id) in ids.into_iter().enumerate() {
            let seq = self.scheduler.get_mut(id).expect("running");
            let (_, min) = seq.draft_limits(spec.cfg.draft_max, spec.cfg.draft_min);
            if spec.drafts[i].len() >= min.max(1) {
                seq.draft.clear();
                seq.draft.extend_from_slice(&spec.drafts[i]);
            }
        }
        Ok(())
    }

    /// Runs the forward pass and fills the mask of each constrained sequence's first sampled row:
    /// on another thread during the pass (`overlap_masks`), else before it.
    fn forward_and_masks(&mut self, batch: &BatchInput, plan: &mut SchedulerOutput) -> Result<()> {
        let vocab = self.model.config().vocab_size;
        let mut taken: Vec<(usize, Box<dyn TokenConstraint>)> = Vec::new();
        for (i, p) in plan.seqs.iter().enumerate().filter(|(_, p)| p.sample) {
            let seq = self.scheduler.get_mut(p.id).expect("planned sequences run");
            if let Some(c) = seq.constraint.take() {
                taken.push((i, c));
            }
        }
        if taken.is_empty() {
            return self.forward(batch, plan.prefill_tokens);
        }
        let fill = |taken: &mut Vec<(usize, Box<dyn TokenConstraint>)>| -> Vec<Result<TokenMask>> {
            taken
                .iter_mut()
                .map(|(_, c)| {
                    let mut m = TokenMask::none(vocab);
                    c.fill_mask(&mut m).map(|()| m)
                })
                .collect()
        };
        let (forward, masks) = if self.overlap_masks {
            std::thread::scope(|s| {
                let masks = s.spawn(|| fill(&mut taken));
                let forward = self.forward(batch, plan.prefill_tokens);
                (forward, masks.join().unwrap_or_else(|_| vec![Err(Error::Constraint("computing a token mask failed".into()))]))
            })
        } else {
            let masks = fill(&mut taken);
            (self.forward(batch, plan.prefill_tokens), masks)
        };
        let mut rows = Vec::with_capacity(taken.len());
        for (i, c) in taken {
            let seq = self.scheduler.get_mut(plan.seqs[i].id).expect("planned sequences run");
            seq.constraint = Some(c);
            rows.push(i);
        }
        forward?;
        for (i, m) in rows.into_iter().zip(masks) {
            plan.seqs[i].mask = Some(m?);
        }
        Ok(())
    }

    /// The plan as a ragged batch: each sequence's uncomputed tokens (then its drafts) at their
    /// positions, with the logits of every row it samples.
    fn build_batch(&mut self, plan: &SchedulerOutput) -> BatchInput {
        let mut batch = BatchInput::default();
        let bs = self.cache.block_size();
        for p in &plan.seqs {
            let seq = self.scheduler.get_mut(p.id).expect("planned sequences run");
            let fed = &seq.tokens[seq.computed..seq.computed + p.num_tokens];
            if p.num_draft == 0 {
                let wanted = if p.sample { LogitsWanted::Last } else { LogitsWanted::None };
                batch.push_sequence(fed, seq.computed, &seq.block_table, bs, wanted);
            } else {
                let mut tokens = fed.to_vec();
                tokens.extend_from_slice(&seq.draft[..p.num_draft]);
                batch.push_sequence(&tokens, seq.computed, &seq.block_table, bs, LogitsWanted::LastN(p.num_draft + 1));
            }
        }
        batch
    }

    fn forward(&mut self, batch: &BatchInput, prefill_tokens: usize) -> Result<()> {
        let t0 = Instant::now();
        self.model.forward_into(batch, &mut self.cache, &mut self.logits)?;
        let elapsed = t0.elapsed();
        if prefill_tokens * 2 > batch.num_tokens() {
            self.stats.prefill_time += elapsed;
        } else {
            self.stats.decode_time += elapsed;
        }
        self.stats.prompt_tokens += prefill_tokens;
        Ok(())
    }

    /// Samples every sampled row in plan order and appends the tokens to their sequences: a
    /// sequence with drafts goes on while the model's token equals the draft at that row. Returns
    /// the events, how many drafted tokens each planned sequence had confirmed, and the finished
    /// sequences.
    fn sample_and_append(&mut self, plan: &mut SchedulerOutput) -> Result<(Vec<TokenEvent>, Vec<usize>, Vec<SeqId>)> {
        let vocab = self.model.config().vocab_size;
        let mut events = Vec::with_capacity(plan.seqs.len());
        let mut accepted = vec![0; plan.seqs.len()];
        let mut finished = Vec::new();
        let mut row = 0;
        for (p, acc) in plan.seqs.iter_mut().zip(&mut accepted) {
            let rows = p.num_rows();
            let seq = self.scheduler.get_mut(p.id).expect("planned sequences run");
            let mut mask = p.mask.take();
            for j in 0..rows {
                let logits = &self.logits[(row + j) * vocab..(row + j + 1) * vocab];
                if let (true, Some(c)) = (j > 0, seq.constraint.as_mut()) {
                    let m = mask.get_or_insert_with(|| TokenMask::none(vocab));
                    m.clear();
                    c.fill_mask(m)?;
                }
                if mask.as_ref().is_some_and(|m| !m.any()) {
                    return Err(Error::Model(format!("the constraint of sequence {} allows no token", seq.id)));
                }
                let s = seq.sampler.sample_masked(logits, mask.as_ref());
                if let Some(c) = seq.constraint.as_mut() {
                    c.commit(s.token)?;
                }
                let top = match seq.sampler.params().logprobs {
                    Some(k) if k > 0 => top_logprobs(logits, k),
                    _ => Vec::new(),
                };
                let event = seq.append(s, top, &self.tokenizer, &self.eos)?;
                if j == 0 {
                    self.stats.draft_tokens += p.num_draft;
                }
                self.stats.generated_tokens += 1;
                let done = event.finish.is_some();
                events.push(event);
                if done {
                    finished.push(p.id);
                    break;
                }
                // The drafted token of this row is confirmed when the model chose it too; then the
                // next row (computed after it) is valid.
                if j < p.num_draft && seq.draft[j] == s.token {
                    *acc += 1;
                    self.stats.accepted_draft_tokens += 1;
                } else {
                    break;
                }
            }
            row += rows;
        }
        Ok((events, accepted, finished))
    }
}
