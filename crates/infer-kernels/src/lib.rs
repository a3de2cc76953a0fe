//! # infer-kernels
//!
//! The compute kernels under infer's engine. Today: the CPU paged-attention kernel that reads and writes
//! the paged KV cache (block tables, fixed-size blocks). The SIMD quantized-matmul kernels, the fused
//! CPU attention and the CUDA launchers replace or join these behind the same functions.

pub mod cpu;

pub use cpu::attention::{paged_attention, write_kv, AttentionShape, SeqAttention};
