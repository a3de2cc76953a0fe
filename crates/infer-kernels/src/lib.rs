//! # infer-kernels
//!
//! The compute kernels under infer's engine. On the CPU: paged attention over the paged KV cache
//! (block tables, fixed-size blocks), quantized matmul for GGUF block weights (8-bit activations,
//! AVX2 / AVX2+VNNI / scalar chosen at run time) and F16/BF16 matmul. With the `cuda` feature, the
//! [`cuda`] module launches the repository's `kernels/*.cu` (RMSNorm, RoPE, SiLU·mul, paged
//! attention over the same cache layout, quantized GEMV) as candle custom ops.

pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;

pub use cpu::attention::{paged_attention, write_kv, AttentionShape, KvElem, SeqAttention};
pub use cpu::fused;
pub use cpu::halfmatmul::{HalfKind, HalfWeight};
pub use cpu::qmatmul::{matmul_many, Isa, QType, QWeight};
