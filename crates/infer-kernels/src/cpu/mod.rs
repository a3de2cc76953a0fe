//! CPU kernels. The layout (each kernel family a folder: the types and dispatch in `mod.rs`, one
//! file per instruction set, the tests in `tests.rs`; the parent owns what its kernel files share):
//!
//! - `isa.rs`: instruction-set detection and capping ([`Isa`](isa::Isa)), weight layouts, AMX.
//! - `qmatmul/`: quantized (GGUF block) weights × f32 activations; `pack.rs` repacks the blocks,
//!   `scalar.rs` is the portable reference.
//! - `halfmatmul/`: F16/BF16 weights × f32 activations; `amx.rs` runs prompts on AMX-BF16.
//! - `attention/`: paged attention; `row.rs` the per-row kernel, `tiled/` the flash-attention
//!   kernels (AVX-512, AVX2).
//! - `fused.rs`: fused element-wise steps (RMSNorm, SiLU·mul, GELU·mul, rotary, softmax sums).
//! - `pool.rs`: the kernels' thread pool; `scratch.rs`: per-thread reused buffers.
//! - `simd.rs`: x86-64 helpers shared by the kernels (horizontal sum, `exp`).
//! - Here: [`NW`] and `OutPtr`, used by several families.
pub mod attention;
pub mod fused;
pub mod halfmatmul;
pub mod isa;
pub mod pool;
pub mod qmatmul;
mod scratch;
#[cfg(target_arch = "x86_64")]
pub(crate) mod simd;

/// Weight rows per group of the wide layout ([`isa::Layout::Wide`]), quantized and 16-bit alike.
pub const NW: usize = 16;

/// Shares the output matrix between the tasks of one kernel call (a matmul's row groups, attention
/// or element-wise rows); each task writes only its own rows.
#[derive(Clone, Copy)]
pub(crate) struct OutPtr(pub(crate) *mut f32);
// SAFETY: tasks write disjoint elements (their own row groups) and the matmul waits for all of them.
unsafe impl Send for OutPtr {}
unsafe impl Sync for OutPtr {}

impl OutPtr {
    /// The element at `i` (a method, so closures capture the whole `Send` wrapper).
    ///
    /// # Safety
    /// `i` must be in bounds of the output and written by one task only.
    #[inline]
    pub(crate) unsafe fn at(self, i: usize) -> *mut f32 {
        self.0.add(i)
    }
}
