//! A small thread pool for the matmul kernels: between two jobs its workers spin for a short while
//! (then sleep), so the many short parallel regions of a decode step (several per layer) start
//! without a futex wake-up each, as llama.cpp's thread pool does. The calling thread takes part in
//! every job. Sized like rayon's global pool (the CLI's `--threads`); jobs are a count of tasks taken
//! one by one from an atomic counter.

use std::cell::UnsafeCell;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

/// How long an idle worker spins before it sleeps.
const SPIN: Duration = Duration::from_micros(200);

type Task = dyn Fn(usize) + Sync;

struct Shared {
    /// Bumped for every job; workers wait for it to change.
    epoch: AtomicU64,
    /// The current job (valid while `active > 0`; set before `epoch` is bumped).
    job: UnsafeCell<Option<*const Task>>,
    next: AtomicUsize,
    n_tasks: AtomicUsize,
    /// Workers that have not finished the current job.
    active: AtomicUsize,
    panicked: AtomicBool,
    /// Sleeping workers (guarded), and where they sleep.
    sleepers: Mutex<usize>,
    wake: Condvar,
}

// SAFETY: `job` is written only by the thread running `Pool::run`, before the epoch bump that
// publishes it (Release/Acquire), and read by workers only between that bump and their decrement of
// `active`, which `run` waits for before it returns or writes `job` again.
unsafe impl Sync for Shared {}
unsafe impl Send for Shared {}

pub struct Pool {
    shared: Arc<Shared>,
    workers: usize,
    /// One job at a time (nested or concurrent callers run their tasks inline).
    busy: AtomicBool,
}

impl Shared {
    fn work(&self, job: &(dyn Fn(usize) + Sync)) {
        loop {
            let i = self.next.fetch_add(1, Ordering::Relaxed);
            if i >= self.n_tasks.load(Ordering::Relaxed) {
                break;
            }
            job(i);
        }
    }
}

thread_local! {
    static WORKER: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Whether the calling thread is one of the pool's workers (e.g. for a test's counting allocator).
pub fn is_worker() -> bool {
    WORKER.with(|w| w.get())
}

fn worker(shared: Arc<Shared>) {
    WORKER.with(|w| w.set(true));
    let mut seen = 0;
    loop {
        // Wait for the next job: spin, then sleep.
        let start = Instant::now();
        let mut spins = 0u32;
        loop {
            let e = shared.epoch.load(Ordering::Acquire);
            if e != seen {
                seen = e;
                break;
            }
            spins += 1;
            if !spins.is_multiple_of(64) || start.elapsed() < SPIN {
                std::hint::spin_loop();
                continue;
            }
            let mut sleepers = shared.sleepers.lock().unwrap_or_else(|p| p.into_inner());
            if shared.epoch.load(Ordering::Acquire) == seen {
                *sleepers += 1;
                sleepers = shared.wake.wait(sleepers).unwrap_or_else(|p| p.into_inner());
                *sleepers -= 1;
            }
        }
        // SAFETY: see `Shared`: the job stays valid until this worker decrements `active`.
        let job = unsafe { (*shared.job.get()).map(|j| &*j) };
        if let Some(job) = job {
            if std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| shared.work(job))).is_err() {
                shared.panicked.store(true, Ordering::Relaxed);
            }
        }
        shared.active.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Pool {
    fn new(threads: usize) -> Self {
        let shared = Arc::new(Shared {
            epoch: AtomicU64::new(0),
            job: UnsafeCell::new(None),
            next: AtomicUsize::new(0),
            n_tasks: AtomicUsize::new(0),
            active: AtomicUsize::new(0),
            panicked: AtomicBool::new(false),
            sleepers: Mutex::new(0),
            wake: Condvar::new(),
        });
        let workers = threads.saturating_sub(1);
        for i in 0..workers {
            let s = shared.clone();
            std::thread::Builder::new().name(format!("infer-kernel-{i}")).spawn(move || worker(s)).expect("spawning a kernel thread");
        }
        Self { shared, workers, busy: AtomicBool::new(false) }
    }

    /// The pool the kernels use: as many threads as the calling rayon pool has (rayon's global pool,
    /// or the one a caller `install`ed: `infer bench -t 1,2` runs each row in its own), one pool per
    /// thread count, started when first used. (A single pool sized by its first caller ran every
    /// later thread count on the first one's threads.)
    pub fn global() -> &'static Pool {
        const MAX: usize = 512;
        static POOLS: [OnceLock<Pool>; MAX] = [const { OnceLock::new() }; MAX];
        let threads = rayon::current_num_threads().clamp(1, MAX);
        POOLS[threads - 1].get_or_init(|| Pool::new(threads))
    }

    /// Threads a job runs on (the caller included).
    pub fn threads(&self) -> usize {
        self.workers + 1
    }

    /// Runs `f(0) .. f(n - 1)` over the pool and the calling thread; returns when all are done.
    pub fn run(&self, n: usize, f: &(dyn Fn(usize) + Sync)) {
        if n == 0 {
            return;
        }
        if self.workers == 0 || n == 1 || self.busy.swap(true, Ordering::Acquire) {
            (0..n).for_each(f);
            return;
        }
        let s = &*self.shared;
        // SAFETY: the lifetime is erased only for the duration of this call, which waits below
        // until every worker is done with the job.
        let job: *const Task = unsafe { std::mem::transmute::<&(dyn Fn(usize) + Sync), &'static Task>(f) };
        unsafe { *s.job.get() = Some(job) };
        s.next.store(0, Ordering::Relaxed);
        s.n_tasks.store(n, Ordering::Relaxed);
        s.active.store(self.workers, Ordering::Relaxed);
        s.epoch.fetch_add(1, Ordering::Release);
        {
            let sleepers = s.sleepers.lock().unwrap_or_else(|p| p.into_inner());
            if *sleepers > 0 {
                s.wake.notify_all();
            }
        }
        // A panic on this thread must still wait for the workers: they hold a reference to `f`.
        let mine = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| s.work(f)));
        while s.active.load(Ordering::Acquire) != 0 {
            std::hint::spin_loop();
        }
        // SAFETY: every worker is done with the job.
        unsafe { *s.job.get() = None };
        self.busy.store(false, Ordering::Release);
        if let Err(p) = mine {
            std::panic::resume_unwind(p);
        }
        if s.panicked.swap(false, Ordering::Relaxed) {
            panic!("a kernel task panicked");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_global_pool_follows_the_calling_rayon_pool() {
        for t in [1, 3, 2] {
            let rp = rayon::ThreadPoolBuilder::new().num_threads(t).build().unwrap();
            let (threads, ran) = rp.install(|| {
                let pool = Pool::global();
                let ids = Mutex::new(std::collections::HashSet::new());
                let wait = t == 3 && pool.threads() == 3;
                pool.run(16, &|_| {
                    ids.lock().unwrap().insert(std::thread::current().id());
                    // The 3-thread pool is this test's alone: wait (bounded) for a second thread to
                    // take a task. Others may be busy with concurrent tests (a busy pool runs the
                    // job on the caller), so only their size is checked.
                    let t0 = Instant::now();
                    while wait && ids.lock().unwrap().len() < 2 && t0.elapsed() < Duration::from_secs(10) {
                        std::thread::sleep(Duration::from_micros(100));
                    }
                });
                (pool.threads(), ids.into_inner().unwrap().len())
            });
            assert_eq!(threads, t, "the pool for a {t}-thread rayon pool");
            assert!(ran <= t && (t != 3 || ran > 1), "{t} threads: tasks ran on {ran}");
        }
    }

    #[test]
    fn every_task_runs_once_across_many_jobs() {
        let pool = Pool::new(3);
        for n in [0usize, 1, 2, 7, 100, 1000] {
            let hits: Vec<AtomicUsize> = (0..n).map(|_| AtomicUsize::new(0)).collect();
            pool.run(n, &|i| {
                hits[i].fetch_add(1, Ordering::Relaxed);
            });
            assert!(hits.iter().all(|h| h.load(Ordering::Relaxed) == 1), "n = {n}");
        }
        // A panicking task is reported to the caller, and the pool keeps working.
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| pool.run(8, &|i| assert!(i != 5, "task 5"))));
        assert!(r.is_err());
        let ran = AtomicUsize::new(0);
        pool.run(8, &|_| {
            ran.fetch_add(1, Ordering::Relaxed);
        });
        assert_eq!(ran.load(Ordering::Relaxed), 8);
        // After a pause long enough for the workers to sleep, jobs still run everywhere.
        std::thread::sleep(Duration::from_millis(5));
        let sum = AtomicUsize::new(0);
        pool.run(64, &|i| {
            sum.fetch_add(i, Ordering::Relaxed);
        });
        assert_eq!(sum.load(Ordering::Relaxed), 64 * 63 / 2);
    }
}
