//! The fuzzer's global allocator: the system's, with a cap on any single allocation. A request above
//! the cap (2 GiB by default; a hostile length field turned into a `Vec` size) is a finding: the
//! size is written to the shared page, a line to stderr, and the process aborts, so the parent saves
//! the input that asked for it. (Beyond one allocation, the child's address space is limited too;
//! see `child::limit_memory`.)

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicPtr, AtomicUsize, Ordering};

pub struct CappedAlloc;

/// Largest single allocation allowed; `usize::MAX` (the default) until a fuzzing child sets it.
static CAP: AtomicUsize = AtomicUsize::new(usize::MAX);
/// The shared page's state word and allocation-size word, when mapped.
static STATE: AtomicPtr<u64> = AtomicPtr::new(std::ptr::null_mut());
static SIZE: AtomicPtr<u64> = AtomicPtr::new(std::ptr::null_mut());

/// Arms the cap; `state`/`size` point into the shared page.
pub fn arm(cap: usize, state: &std::sync::atomic::AtomicU64, size: &std::sync::atomic::AtomicU64) {
    STATE.store(state.as_ptr(), Ordering::SeqCst);
    SIZE.store(size.as_ptr(), Ordering::SeqCst);
    CAP.store(cap, Ordering::SeqCst);
}

#[cold]
fn over_cap(size: usize) -> ! {
    let (state, sz) = (STATE.load(Ordering::SeqCst), SIZE.load(Ordering::SeqCst));
    if !state.is_null() {
        // SAFETY: pointers into the shared mapping, which is never unmapped; plain stores of words
        // the parent reads only after this process is gone.
        unsafe {
            sz.write_volatile(size as u64);
            state.write_volatile(crate::shm::ALLOC_CAP);
        }
    }
    let msg = b"infer-fuzz: allocation above the cap; aborting\n";
    // SAFETY: writing a static buffer to stderr; no allocation here.
    unsafe {
        libc::write(2, msg.as_ptr() as *const libc::c_void, msg.len());
        libc::abort()
    }
}

// SAFETY: forwards to the system allocator; only refuses (by aborting) sizes above the cap.
unsafe impl GlobalAlloc for CappedAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if layout.size() > CAP.load(Ordering::Relaxed) {
            over_cap(layout.size());
        }
        System.alloc(layout)
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if layout.size() > CAP.load(Ordering::Relaxed) {
            over_cap(layout.size());
        }
        System.alloc_zeroed(layout)
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        System.dealloc(ptr, layout)
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if new_size > CAP.load(Ordering::Relaxed) {
            over_cap(new_size);
        }
        System.realloc(ptr, layout, new_size)
    }
}
