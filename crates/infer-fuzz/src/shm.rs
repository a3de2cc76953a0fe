//! The page a fuzzing child shares with its parent: a file mapped `MAP_SHARED` holding counters and
//! the input being run. When the child dies (an abort, a stack overflow, the allocation cap, the
//! kernel's OOM killer), the parent reads the file and knows which input did it and how far the
//! child got; while it runs, the parent watches the start time of the current input to catch hangs.

use std::fs::{File, OpenOptions};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

/// Room for the input being run (inputs are capped below this).
pub const INPUT_CAP: usize = 16 << 20;
const HEADER: usize = 4096;

/// Word indices of the header.
#[derive(Debug, Clone, Copy)]
#[repr(usize)]
pub enum Word {
    /// [`IDLE`], [`RUNNING`] an input, [`ALLOC_CAP`] hit.
    State = 0,
    Execs = 1,
    Panics = 2,
    Slow = 3,
    MaxNs = 4,
    /// `CLOCK_MONOTONIC` time the current input started, in ns.
    StartNs = 5,
    InputLen = 6,
    /// The allocation that hit the cap, in bytes.
    AllocSize = 7,
    TotalNs = 8,
    /// Distinct outcomes seen (the corpus grows on each).
    Outcomes = 9,
}

pub const IDLE: u64 = 0;
pub const RUNNING: u64 = 1;
pub const ALLOC_CAP: u64 = 2;

/// `CLOCK_MONOTONIC` in ns (comparable between processes).
pub fn now_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: `ts` is a valid timespec to write.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Creates the file (zeroed) for a child.
pub fn create(path: &Path) -> std::io::Result<()> {
    let f = OpenOptions::new().read(true).write(true).create(true).truncate(true).open(path)?;
    f.set_len((HEADER + INPUT_CAP) as u64)
}

/// The child's mapping.
pub struct Shared {
    base: *mut u8,
}

// SAFETY: the mapping lives for the whole process (never unmapped) and is accessed through atomics
// (header) or by the single fuzzing thread (input area).
unsafe impl Send for Shared {}
unsafe impl Sync for Shared {}

impl Shared {
    pub fn map(path: &Path) -> std::io::Result<Self> {
        use std::os::fd::AsRawFd;
        let f: File = OpenOptions::new().read(true).write(true).open(path)?;
        // SAFETY: a fresh shared mapping of a file of that length; never unmapped.
        let p = unsafe {
            libc::mmap(std::ptr::null_mut(), HEADER + INPUT_CAP, libc::PROT_READ | libc::PROT_WRITE, libc::MAP_SHARED, f.as_raw_fd(), 0)
        };
        if p == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        Ok(Self { base: p as *mut u8 })
    }

    pub fn word(&self, w: Word) -> &AtomicU64 {
        // SAFETY: inside the header, 8-byte aligned (the mapping is page aligned).
        unsafe { &*(self.base.add(w as usize * 8) as *const AtomicU64) }
    }

    pub fn add(&self, w: Word, v: u64) {
        self.word(w).fetch_add(v, Ordering::Relaxed);
    }

    /// Stores the input about to run (already encoded) and marks it running.
    pub fn begin(&self, encoded: &[u8]) {
        let n = encoded.len().min(INPUT_CAP);
        // SAFETY: the input area holds INPUT_CAP bytes; only this thread writes it.
        unsafe { std::ptr::copy_nonoverlapping(encoded.as_ptr(), self.base.add(HEADER), n) };
        self.word(Word::InputLen).store(n as u64, Ordering::Release);
        self.word(Word::StartNs).store(now_ns(), Ordering::Release);
        self.word(Word::State).store(RUNNING, Ordering::Release);
    }

    pub fn end(&self) {
        self.word(Word::State).store(IDLE, Ordering::Release);
    }
}

/// The parent's view: the header words and the input, read from the file.
pub struct Snapshot {
    pub words: [u64; 10],
    pub input: Vec<u8>,
}

pub fn read(path: &Path, with_input: bool) -> std::io::Result<Snapshot> {
    use std::io::{Read, Seek, SeekFrom};
    let mut f = File::open(path)?;
    let mut head = [0u8; 80];
    f.read_exact(&mut head)?;
    let mut words = [0u64; 10];
    for (i, w) in words.iter_mut().enumerate() {
        *w = u64::from_le_bytes(head[i * 8..i * 8 + 8].try_into().expect("8 bytes"));
    }
    let mut input = Vec::new();
    if with_input {
        let n = (words[Word::InputLen as usize] as usize).min(INPUT_CAP);
        input.resize(n, 0);
        f.seek(SeekFrom::Start(HEADER as u64))?;
        f.read_exact(&mut input)?;
    }
    Ok(Snapshot { words, input })
}
