//! One request's state inside the engine: its tokens (prompt, then generated), how many of them the KV
//! cache holds, its block table, its sampler, text decoder and stop strings, and optionally drafted
//! tokens to verify and a constraint on what it may generate. `Sequence::append` takes a sampled
//! token and turns it into the [`TokenEvent`] the caller sees: decoded text, stop strings, end of
//! sequence and length limits.

use crate::error::Result;
use crate::kv_cache::BlockHash;
use crate::sampling::{Sampled, Sampler, SamplingParams, TokenMask};
use crate::stop::StopMatcher;
use crate::tokenizer::{IncrementalDecoder, Tokenizer};

/// Identifies a sequence inside an engine.
pub type SeqId = u64;

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

/// Restricts which tokens a sequence may generate (structured output: a grammar, a JSON schema, a
/// choice). The engine asks it for a mask before sampling each of the sequence's tokens and tells
/// it which token was chosen.
pub trait TokenConstraint: Send {
    /// Marks the tokens allowed next in `mask` (cleared to "none allowed" by the caller).
    fn fill_mask(&mut self, mask: &mut TokenMask) -> Result<()>;
    /// Moves past `token`, which was sampled under the last mask.
    fn commit(&mut self, token: u32) -> Result<()>;
}

/// A request inside the engine.
pub(crate) struct Sequence {
    pub(crate) id: SeqId,
    /// Prompt then generated tokens (drafted tokens are not in here until accepted).
    pub(crate) tokens: Vec<u32>,
    pub(crate) prompt_len: usize,
    /// Tokens whose keys and values are in the cache.
    pub(crate) computed: usize,
    pub(crate) block_table: Vec<u32>,
    /// Content hashes of the full blocks computed so far (registered in the prefix cache).
    pub(crate) block_hashes: Vec<BlockHash>,
    /// Where its block hashes start: `0`, or its cache salt's root (its own prefix-cache namespace).
    pub(crate) cache_root: BlockHash,
    /// Prompt tokens found in the prefix cache at first admission.
    pub(crate) cached_tokens: Option<usize>,
    /// Tokens proposed after `tokens` (speculative decoding), verified by the next step that runs
    /// the sequence: fed after its last token, each checked against what the model samples there.
    pub(crate) draft: Vec<u32>,
    /// How many tokens to draft next (speculative decoding; `None`: the most allowed): two more
    /// after a step that kept its whole draft, one fewer after one that did not (the schedule
    /// of Hugging Face's assisted generation), so a text that stops copying stops paying for long
    /// drafts.
    pub(crate) draft_len: Option<usize>,
    /// The request's own draft limits (most, fewest tokens), over the engine's.
    draft_max: Option<usize>,
    draft_min: Option<usize>,
    pub(crate) constraint: Option<Box<dyn TokenConstraint>>,
    pub(crate) sampler: Sampler,
    max_len: usize,
    decoder: IncrementalDecoder,
    stop: StopMatcher,
    ignore_eos: bool,
}

impl Sequence {
    /// A new sequence that may grow to `max_len` tokens.
    pub(crate) fn new(id: SeqId, prompt: Vec<u32>, params: &SamplingParams, max_len: usize) -> Self {
        Self {
            id,
            prompt_len: prompt.len(),
            sampler: Sampler::new(params.clone(), &prompt),
            tokens: prompt,
            computed: 0,
            block_table: Vec::new(),
            block_hashes: Vec::new(),
            cache_root: params.cache_salt.as_deref().map_or(0, crate::kv_cache::salt_root),
            cached_tokens: None,
            draft: Vec::new(),
            draft_len: None,
            draft_max: params.draft_max,
            draft_min: params.draft_min,
            constraint: None,
            max_len,
            decoder: IncrementalDecoder::new(),
            stop: StopMatcher::new(params.stop.clone()),
            ignore_eos: params.ignore_eos,
        }
    }

    /// Most tokens the sequence may hold.
    pub(crate) fn max_len(&self) -> usize {
        self.max_len
    }

    /// Most and fewest tokens to draft per step: the request's limits, else the engine's.
    pub(crate) fn draft_limits(&self, engine_max: usize, engine_min: usize) -> (usize, usize) {
        (self.draft_max.unwrap_or(engine_max), self.draft_min.unwrap_or(engine_min))
    }

    /// Tokens not yet in the cache (the rest of the prompt, or the last sampled token).
    pub(crate) fn num_uncomputed(&self) -> usize {
        self.tokens.len() - self.computed
    }

    /// Whether the cache is missing more than the last token (a prompt, or a recomputation).
    pub(crate) fn is_prefilling(&self) -> bool {
        self.num_uncomputed() > 1
    }

    /// Forgets what the cache held for this sequence (its blocks were released): it will be
    /// recomputed from its tokens.
    pub(crate) fn reset_computed(&mut self) {
        self.computed = 0;
        self.block_hashes.clear();
        self.draft.clear();
    }

    /// Appends a sampled token: its text (held back while it may be part of a stop string or of a
    /// character), and whether the sequence ends with it (end of sequence, a stop string, `max_len`).
    pub(crate) fn append(&mut self, s: Sampled, top_logprobs: Vec<(u32, f32)>, tokenizer: &Tokenizer, eos: &[u32]) -> Result<TokenEvent> {
        self.tokens.push(s.token);
        let mut text = String::new();
        let mut finish = None;
        let mut cut = false;
        if !self.ignore_eos && eos.contains(&s.token) {
            finish = Some(FinishReason::Stop);
        } else {
            if let Some(piece) = self.decoder.push(tokenizer, s.token)? {
                let out = self.stop.push(&piece);
                text = out.emit;
                cut = out.stopped;
            }
            if cut {
                finish = Some(FinishReason::Stop);
            } else if self.tokens.len() >= self.max_len {
                finish = Some(FinishReason::Length);
            }
        }
        // At the end, release held-back text, unless a stop string cut it off.
        if finish.is_some() && !cut {
            if let Some(rest) = self.decoder.flush(tokenizer)? {
                let out = self.stop.push(&rest);
                text.push_str(&out.emit);
                if out.stopped {
                    cut = true;
                    finish = Some(FinishReason::Stop);
                }
            }
            if !cut {
                text.push_str(&self.stop.flush());
            }
        }
        Ok(TokenEvent {
            seq_id: self.id,
            token: s.token,
            logprob: s.logprob,
            text,
            finish,
            top_logprobs,
            cached_tokens: self.cached_tokens.unwrap_or(0),
        })
    }
}
