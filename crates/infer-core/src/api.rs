//! The library's front door: [`ModelBuilder`] loads a model; a [`Session`] generates text from a
//! prompt or a conversation as a stream of [`Chunk`]s.
//!
//! ```no_run
//! use infer_core::{ModelBuilder, SamplingParams};
//!
//! let mut session = ModelBuilder::new("SmolLM2-135M-Instruct.Q4_1.gguf").build()?;
//! let params = SamplingParams { max_tokens: Some(32), ..SamplingParams::greedy() };
//! for chunk in session.chat(&[infer_core::ChatMessage::user("Hi!")], params)? {
//!     print!("{}", chunk?.text);
//! }
//! # Ok::<(), infer_core::Error>(())
//! ```

use std::collections::VecDeque;

use candle_core::Device;

use crate::chat::ChatMessage;
use crate::engine::{Engine, EngineConfig, EngineStats, FinishReason, SeqId};
use crate::error::{Error, Result};
use crate::loader::{self, DTypeChoice, LoadOptions, LoadedModel};
use crate::sampling::SamplingParams;

/// Parses a device name: `cpu`, `cuda`, `cuda:N` or `metal`.
pub fn parse_device(s: &str) -> Result<Device> {
    let s = s.trim().to_ascii_lowercase();
    if s == "cpu" {
        return Ok(Device::Cpu);
    }
    if let Some(rest) = s.strip_prefix("cuda") {
        let ordinal = match rest.strip_prefix(':') {
            Some(n) => {
                n.parse::<usize>().map_err(|_| Error::param("device", format!("`{s}`: the GPU index must be a number, e.g. cuda:0")))?
            }
            None if rest.is_empty() => 0,
            None => return Err(Error::param("device", format!("`{s}` is not one of cpu, cuda[:N], metal"))),
        };
        if !candle_core::utils::cuda_is_available() {
            return Err(Error::Device("this build of infer has no CUDA support; rebuild with `--features cuda` (see the README)".into()));
        }
        return Device::new_cuda(ordinal).map_err(|e| {
            Error::Device(format!("cannot open CUDA device {ordinal}: {e} (is an NVIDIA driver installed and a GPU visible?)"))
        });
    }
    if s == "metal" {
        if !candle_core::utils::metal_is_available() {
            return Err(Error::Device("this build of infer has no Metal support; rebuild with `--features metal` on macOS".into()));
        }
        return Device::new_metal(0).map_err(|e| Error::Device(format!("cannot open the Metal device: {e}")));
    }
    Err(Error::param("device", format!("`{s}` is not one of cpu, cuda[:N], metal")))
}

/// Loads a model: a `.gguf` file, a folder in HF layout, or a Hub id `org/name[@revision]`.
pub struct ModelBuilder {
    spec: String,
    opts: LoadOptions,
    engine: EngineConfig,
    /// A draft model to load next to the model (speculative decoding) and its most drafted tokens.
    draft: Option<(String, usize)>,
}

impl ModelBuilder {
    pub fn new(model: impl Into<String>) -> Self {
        Self { spec: model.into(), opts: LoadOptions::default(), engine: EngineConfig { max_seqs: 1, ..Default::default() }, draft: None }
    }
    /// Device to run on (default: CPU).
    pub fn device(mut self, device: Device) -> Self {
        self.opts.device = device;
        self
    }
    /// Compute dtype (default: auto).
    pub fn dtype(mut self, dtype: DTypeChoice) -> Self {
        self.opts.dtype = dtype;
        self
    }
    /// Which GGUF file of a Hub repo to load.
    pub fn gguf_file(mut self, file: impl Into<String>) -> Self {
        self.opts.gguf_file = Some(file.into());
        self
    }
    /// Show download progress bars.
    pub fn download_progress(mut self, on: bool) -> Self {
        self.opts.download_progress = on;
        self
    }
    /// Called while loading with (done, total) steps.
    pub fn on_progress(mut self, f: impl FnMut(usize, usize) + Send + 'static) -> Self {
        self.opts.progress = Some(Box::new(f));
        self
    }
    /// Quantize safetensors linear weights at load (`q8_0`, `q4_0`, `q4_k`) for the CPU kernels.
    /// Which kernels the model runs on (see [`KernelChoice`](crate::weights::KernelChoice)).
    pub fn kernels(mut self, k: crate::weights::KernelChoice) -> Self {
        self.opts.kernels = k;
        self
    }

    pub fn quantize(mut self, q: crate::weights::Quantize) -> Self {
        self.opts.quantize = Some(q);
        self
    }
    /// Context size: most tokens (prompt + answer) one sequence may hold.
    pub fn ctx_size(mut self, n: usize) -> Self {
        self.engine.max_context = Some(n);
        self
    }
    /// How the KV cache stores keys and values: f32, f16 or q8_0 (CPU), bf16 (GPU).
    pub fn kv_cache_dtype(mut self, dtype: impl Into<crate::kv_cache::KvDtype>) -> Self {
        self.engine.kv_cache_dtype = Some(dtype.into());
        self
    }
    /// Engine limits (batch size, KV cache memory...).
    pub fn engine_config(mut self, cfg: EngineConfig) -> Self {
        self.engine = cfg;
        self
    }
    /// Speculative decoding (prompt lookup, or a draft model already loaded); see
    /// [`draft_model`](Self::draft_model) to have the builder load one.
    pub fn speculative(mut self, cfg: crate::speculative::SpeculativeConfig) -> Self {
        self.engine.speculative = Some(cfg);
        self
    }
    /// Speculative decoding with a draft model (a `.gguf` file, folder or Hub id with the model's
    /// tokenizer), loaded with the same device, dtype and kernels; at most `draft_max` drafted
    /// tokens per step.
    pub fn draft_model(mut self, spec: impl Into<String>, draft_max: usize) -> Self {
        self.draft = Some((spec.into(), draft_max));
        self
    }
    /// Loads the model and sets up its engine.
    pub fn build(mut self) -> Result<Session> {
        let draft_opts = LoadOptions {
            device: self.opts.device.clone(),
            dtype: self.opts.dtype,
            quantize: self.opts.quantize,
            kernels: self.opts.kernels,
            ..Default::default()
        };
        let model = loader::load(&self.spec, self.opts)?;
        if let Some((spec, draft_max)) = self.draft {
            let d = loader::load(&spec, draft_opts)?;
            let min = self.engine.speculative.as_ref().map_or(1, |s| s.draft_min);
            let mut sc = crate::speculative::SpeculativeConfig::draft_model(d.model, d.tokenizer, draft_max);
            sc.draft_min = min.min(draft_max);
            self.engine.speculative = Some(sc);
        }
        Session::new(model, self.engine)
    }
}

/// A loaded model with its engine.
pub struct Session {
    model: LoadedModel,
    engine: Engine,
}

/// A piece of generated text.
#[derive(Debug, Clone, PartialEq)]
pub struct Chunk {
    /// The token this chunk came with.
    pub token: u32,
    pub logprob: f32,
    /// New text (may be empty while a character or a possible stop string is incomplete).
    pub text: String,
    /// Set on the last chunk.
    pub finish: Option<FinishReason>,
}

impl Session {
    pub fn new(model: LoadedModel, cfg: EngineConfig) -> Result<Self> {
        let engine = Engine::new(model.model.clone(), model.tokenizer.clone(), model.eos_token_ids.clone(), cfg)?;
        Ok(Self { model, engine })
    }

    pub fn model(&self) -> &LoadedModel {
        &self.model
    }

    pub fn engine(&mut self) -> &mut Engine {
        &mut self.engine
    }

    /// Token ids of a conversation rendered with the model's chat template (ready for the answer).
    pub fn chat_prompt(&self, messages: &[ChatMessage]) -> Result<Vec<u32>> {
        let tmpl = self
            .model
            .chat_template
            .as_ref()
            .ok_or_else(|| Error::Model(format!("{} has no chat template; use plain completion (--raw)", self.model.name)))?;
        let text = tmpl.render(messages, true)?;
        self.model.tokenizer.encode(&text, false)
    }

    /// A conversation with tools the model may call: the prompt's token ids (tools given to the
    /// template, or described in a system message for templates without tool syntax), the format
    /// the model writes calls in, and the constraint `choice` asks for (set it as
    /// [`SamplingParams::constraint`]; parse the answer with [`crate::tools::OutputParser`]).
    pub fn tool_prompt(
        &mut self,
        messages: &[ChatMessage],
        tools: &[crate::tools::Tool],
        choice: &crate::tools::ToolChoice,
    ) -> Result<(Vec<u32>, crate::tools::ToolFormat, Option<crate::structured::Constraint>)> {
        use crate::tools::{self, ToolFormat};
        let tmpl = self
            .model
            .chat_template
            .as_ref()
            .ok_or_else(|| Error::Model(format!("{} has no chat template, so it cannot call tools", self.model.name)))?;
        let format = ToolFormat::detect(tmpl.source());
        let mut msgs = messages.to_vec();
        let listed = tools::prepare_messages(&mut msgs, tools, choice, format);
        let text = tmpl.render_with(&msgs, true, &listed, &serde_json::Map::new())?;
        let ids = self.model.tokenizer.encode(&text, false)?;
        let compiler = self.engine.constraint_compiler()?;
        let grammar = if tools.is_empty() { None } else { tools::tool_grammar(format, tools, choice, true, &|t| compiler.special_ref(t))? };
        Ok((ids, format, grammar.map(crate::structured::Constraint::Lark)))
    }

    /// Token ids of a plain prompt (with BOS if the model adds one).
    pub fn raw_prompt(&self, prompt: &str) -> Result<Vec<u32>> {
        self.model.tokenizer.encode(prompt, true)
    }

    /// Generates an answer to a conversation.
    pub fn chat(&mut self, messages: &[ChatMessage], params: SamplingParams) -> Result<TextStream<'_>> {
        let ids = self.chat_prompt(messages)?;
        self.generate_ids(ids, params)
    }

    /// Continues a plain text prompt.
    pub fn complete(&mut self, prompt: &str, params: SamplingParams) -> Result<TextStream<'_>> {
        let ids = self.raw_prompt(prompt)?;
        self.generate_ids(ids, params)
    }

    /// Generates from prompt token ids.
    pub fn generate_ids(&mut self, prompt: Vec<u32>, params: SamplingParams) -> Result<TextStream<'_>> {
        let before = self.engine.stats();
        let id = self.engine.add_request(prompt, params)?;
        Ok(TextStream { engine: &mut self.engine, id, pending: VecDeque::new(), done: false, before })
    }
}

/// The chunks of one generation, produced as the engine steps. Dropping it cancels the generation.
pub struct TextStream<'a> {
    engine: &'a mut Engine,
    id: SeqId,
    pending: VecDeque<Chunk>,
    done: bool,
    before: EngineStats,
}

impl TextStream<'_> {
    /// Counts and timings of this generation so far.
    pub fn stats(&self) -> EngineStats {
        let now = self.engine.stats();
        EngineStats {
            prompt_tokens: now.prompt_tokens - self.before.prompt_tokens,
            generated_tokens: now.generated_tokens - self.before.generated_tokens,
            prefill_time: now.prefill_time - self.before.prefill_time,
            decode_time: now.decode_time - self.before.decode_time,
            prefix_lookup_tokens: now.prefix_lookup_tokens - self.before.prefix_lookup_tokens,
            prefix_hit_tokens: now.prefix_hit_tokens - self.before.prefix_hit_tokens,
            preemptions: now.preemptions - self.before.preemptions,
            draft_tokens: now.draft_tokens - self.before.draft_tokens,
            accepted_draft_tokens: now.accepted_draft_tokens - self.before.accepted_draft_tokens,
        }
    }

    /// Collects the remaining text.
    pub fn text(self) -> Result<String> {
        let mut s = String::new();
        for c in self {
            s.push_str(&c?.text);
        }
        Ok(s)
    }
}

impl Iterator for TextStream<'_> {
    type Item = Result<Chunk>;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            if let Some(c) = self.pending.pop_front() {
                return Some(Ok(c));
            }
            if self.done {
                return None;
            }
            match self.engine.step() {
                Ok(events) => {
                    if events.is_empty() && !self.engine.has_work() {
                        self.done = true;
                    }
                    for e in events.into_iter().filter(|e| e.seq_id == self.id) {
                        self.done |= e.finish.is_some();
                        self.pending.push_back(Chunk { token: e.token, logprob: e.logprob, text: e.text, finish: e.finish });
                    }
                }
                Err(e) => {
                    self.done = true;
                    return Some(Err(e));
                }
            }
        }
    }
}

impl Drop for TextStream<'_> {
    fn drop(&mut self) {
        if !self.done {
            self.engine.cancel(self.id);
        }
    }
}
