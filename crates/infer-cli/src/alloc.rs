//! The process allocator (mimalloc) and what loading a model leaves behind.
//!
//! Loading reads each tensor of the file into memory and then converts it (repacking for the CPU
//! kernels, dequantizing, moving to the device); the originals are freed, but mimalloc keeps freed
//! memory resident for reuse (its purge delay), and the KV cache and activation buffers allocated
//! next are mostly fresh pages of other sizes. So right after a load the process held the file's
//! tensors twice: `infer run -c 512` on the test model peaked at ~280 MiB where the weights, its
//! KV cache and 150 MB make 266 MiB. Loading therefore runs with immediate purging and ends with a
//! collection; the default delay (which keeps the per-step buffers of decoding cheap) is restored
//! after.

use libmimalloc_sys as mi;

/// `mi_option_purge_delay` in mimalloc v3's option enum (libmimalloc-sys does not export it; v2,
/// which numbers it differently, is only built with the crate's `v2` feature, checked below).
const PURGE_DELAY: mi::mi_option_t = 15;

/// Run `load` with freed memory returned to the system at once, then return what it freed.
pub(crate) fn while_loading<T>(load: impl FnOnce() -> T) -> T {
    // SAFETY: mi_version, mi_option_get/set and mi_collect take no pointers. mi_option_set is a
    // plain store of an aligned `long` that allocating threads read: at worst one purge decision
    // races and uses the other delay.
    if unsafe { mi::mi_version() } / 10000 != 3 {
        return load();
    }
    let delay = unsafe { mi::mi_option_get(PURGE_DELAY) };
    unsafe { mi::mi_option_set(PURGE_DELAY, 0) };
    let out = load();
    unsafe {
        mi::mi_collect(true);
        mi::mi_option_set(PURGE_DELAY, delay);
    }
    out
}

/// Returns the free pages of every heap to the system (after a server unloaded a model).
pub(crate) fn collect() {
    // SAFETY: mi_collect takes no pointers.
    unsafe { mi::mi_collect(true) };
}
