//! # infer-core
//!
//! Everything between model files and generated text: configs, loaders (safetensors, GGUF, the
//! Hugging Face Hub), the Llama-family decoder, tokenizers and chat templates, sampling, the paged KV
//! cache and the engine that batches sequences over it.

pub mod api;
pub mod chat;
pub mod config;
pub mod engine;
pub mod error;
pub mod eval;
pub mod hub;
pub mod kv_cache;
pub mod loader;
pub mod models;
pub mod sampling;
pub mod scheduler;
pub mod sequence;
pub mod stop;
#[doc(hidden)]
pub mod testing;
pub mod tokenizer;
pub mod weights;

pub use api::{parse_device, Chunk, ModelBuilder, Session, TextStream};
pub use candle_core::{DType, Device, Tensor};
pub use chat::{ChatMessage, ChatTemplate};
pub use config::{Architecture, ModelConfig};
pub use engine::{Engine, EngineConfig, EngineStats, FinishReason, SeqId, TokenConstraint, TokenEvent};
pub use error::{Error, Result};
pub use loader::{load, DTypeChoice, LoadOptions, LoadedModel};
pub use sampling::{Sampler, SamplingParams, TokenMask};
pub use tokenizer::{IncrementalDecoder, Tokenizer};
pub use weights::{cpu_kernels, Quantize};
