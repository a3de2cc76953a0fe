//! Per-thread buffers the kernels reuse from call to call, so that a decode step allocates nothing
//! once each thread has seen a call at least as large.

use std::cell::RefCell;
use std::thread::LocalKey;

/// A buffer of this thread, reused by every call that names it.
pub(crate) type Buf<T> = LocalKey<RefCell<Vec<T>>>;

/// Runs `f` with this thread's buffer `key`, emptied (its capacity kept). A nested use of the same
/// buffer on one thread (which the kernels do not make) gets a fresh one instead of panicking.
pub(crate) fn with<T: 'static, R>(key: &'static Buf<T>, f: impl FnOnce(&mut Vec<T>) -> R) -> R {
    key.with(|cell| match cell.try_borrow_mut() {
        Ok(mut v) => {
            v.clear();
            f(&mut v)
        }
        Err(_) => f(&mut Vec::new()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    thread_local! { static T: RefCell<Vec<u32>> = const { RefCell::new(Vec::new()) }; }

    #[test]
    fn reuses_capacity_and_survives_nesting() {
        let cap = with(&T, |v| {
            v.extend(0..100);
            // Nested use of the same buffer: a fresh, empty one.
            with(&T, |inner| assert!(inner.is_empty() && inner.capacity() == 0));
            v.capacity()
        });
        with(&T, |v| {
            assert!(v.is_empty(), "handed out emptied");
            assert_eq!(v.capacity(), cap, "capacity kept");
        });
    }
}
