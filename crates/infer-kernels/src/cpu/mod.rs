//! CPU kernels.
pub mod attention;
#[cfg(target_arch = "x86_64")]
mod flash_attention;
pub mod fused;
#[cfg(target_arch = "x86_64")]
mod half_amx;
pub mod halfmatmul;
pub mod pool;
pub mod qmatmul;
mod scratch;
#[cfg(target_arch = "x86_64")]
pub(crate) mod simd;
