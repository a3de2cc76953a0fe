//! CPU kernels.
pub mod attention;
#[cfg(target_arch = "x86_64")]
mod flash_attention;
pub mod fused;
pub mod halfmatmul;
pub mod pool;
pub mod qmatmul;
#[cfg(target_arch = "x86_64")]
pub(crate) mod simd;
