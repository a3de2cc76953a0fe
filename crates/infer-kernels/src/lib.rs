//! # infer-kernels
//!
//! The compute kernels under infer's engine. On the CPU: paged attention over the paged KV cache
//! (block tables, fixed-size blocks; a tiled flash-attention kernel for prompts), quantized matmul
//! for GGUF block weights (8-bit activations; AMX-INT8, AVX-512 VNNI, AVX2 or scalar, chosen at run
//! time), F16/BF16 matmul (AMX-BF16 for prompts, AVX-512, AVX2) and fused RMSNorm / SiLU·mul /
//! rotary steps. With the `cuda` feature, the
//! [`cuda`] module launches the repository's `kernels/*.cu` (RMSNorm, RoPE, SiLU·mul, paged
//! attention over the same cache layout, quantized GEMV) as candle custom ops.

pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;

pub use cpu::attention::{
    paged_attention, paged_attention_q8, row_metadata, write_kv, write_kv_q8, AttentionShape, KvElem, SeqAttention, Q8_BLOCK,
};
pub use cpu::fused;
pub use cpu::halfmatmul::{HalfKind, HalfWeight};
pub use cpu::isa::Isa;
pub use cpu::qmatmul::{matmul_many, QType, QWeight};
