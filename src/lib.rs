//! # infer
//!
//! Run open-weight LLMs locally: GGUF files, Hugging Face folders (safetensors, sharded, memory-mapped)
//! and Hub ids, on a paged KV cache with a batching engine.
//!
//! ```no_run
//! use infer::{ChatMessage, ModelBuilder, SamplingParams};
//!
//! let mut session = ModelBuilder::new("SmolLM2-135M-Instruct.Q4_1.gguf").build()?;
//! let params = SamplingParams { max_tokens: Some(64), ..SamplingParams::greedy() };
//! for chunk in session.chat(&[ChatMessage::user("What is the capital of France?")], params)? {
//!     print!("{}", chunk?.text);
//! }
//! # Ok::<(), infer::Error>(())
//! ```
//!
//! Lower layers are public too: [`loader`] (resolve and load models), [`engine::Engine`] (add
//! requests, step a ragged batch), [`kv_cache`], [`models`], [`sampling`], [`tokenizer`], [`chat`].

pub use infer_core::*;
