//! # infer-core
//!
//! Everything between model files and generated text:
//! - [`config`], [`loader`], [`weights`], [`hub`]: model configs (HF `config.json` or GGUF metadata),
//!   loading safetensors (sharded, memory-mapped), GGUF and Hub ids;
//! - [`models`]: the decoders (the Llama family with Mistral, Qwen2/3, Phi-3, Mixtral and Qwen3-MoE;
//!   Gemma 2/3), each with a host path on infer's CPU kernels and a tensor path on candle;
//! - [`tokenizer`], [`chat`]: tokenizers (tokenizer.json or GGUF vocabularies) and chat templates;
//! - [`engine`] with [`scheduler`], [`sequence`], [`kv_cache`], [`sampling`], [`stop`]: the engine
//!   that batches sequences over the paged KV cache (see ARCHITECTURE.md for one request's path);
//! - [`api`]: the library's convenience layer ([`Session`], [`ModelBuilder`]); [`eval`]: `infer eval`.

pub mod api;
pub mod chat;
pub mod config;
pub mod embeddings;
pub mod encoder;
pub mod engine;
pub mod error;
pub mod eval;
pub mod hub;
pub mod kv_cache;
pub mod loader;
pub mod memory;
pub mod models;
pub mod sampling;
pub mod scheduler;
pub mod sequence;
pub mod speculative;
pub mod stop;
pub mod structured;
#[doc(hidden)]
pub mod testing;
pub mod tokenizer;
pub mod tools;
pub mod weights;

pub use api::{parse_device, Chunk, ModelBuilder, Session, TextStream};
pub use candle_core::{DType, Device, Tensor};
pub use chat::{ChatMessage, ChatTemplate};
pub use config::{Architecture, ModelConfig};
pub use engine::{Engine, EngineConfig, EngineStats, FinishReason, SeqId, TokenConstraint, TokenEvent};
pub use error::{Error, Result};
pub use infer_kernels::Isa;
pub use loader::{load, DTypeChoice, LoadOptions, LoadedModel};
pub use sampling::{Sampler, SamplingParams, TokenMask};
pub use speculative::{DraftSource, SpeculativeConfig};
pub use structured::{Constraint, ConstraintCompiler, GrammarConstraint};
pub use tokenizer::{IncrementalDecoder, Tokenizer};
pub use weights::{cpu_kernels, KernelChoice, Quantize};
