//! # infer-kernels
//!
//! The compute kernels under infer's engine: the CPU paged-attention kernel that reads and writes the
//! paged KV cache (block tables, fixed-size blocks) and the CPU quantized matmul (GGUF Q4_0/Q4_1/Q8_0
//! weights, 8-bit activations, AVX2 or scalar chosen at run time). The CUDA launchers join these
//! behind the same functions.

pub mod cpu;

pub use cpu::attention::{paged_attention, write_kv, AttentionShape, SeqAttention};
pub use cpu::halfmatmul::{HalfKind, HalfWeight};
pub use cpu::qmatmul::{Isa, QType, QWeight};
