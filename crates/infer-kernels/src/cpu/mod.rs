//! CPU kernels.
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
