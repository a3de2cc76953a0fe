//! A target with planted faults, to check that the driver finds each kind: an input holding `PANIC`
//! panics, `ABORT` aborts, `ALLOC` asks for 1 TiB, `STACK` overflows the stack, `SLOW` takes 1.2 s and
//! `HANG` never returns. Not part of `--target all`; `tests/driver.rs` runs it.

use super::{anywhere, Target};
use crate::mutate::{Input, PartInfo};

/// The input's parts (file names of a finding).
pub const PARTS: &[&str] = &["data"];

pub struct Canary;

fn recurse(n: u64) -> u64 {
    let pad = std::hint::black_box([n; 64]);
    if n == 0 {
        0
    } else {
        recurse(n - 1).wrapping_add(pad[n as usize % 64])
    }
}

impl Target for Canary {
    fn parts(&self) -> &'static [&'static str] {
        PARTS
    }

    fn part_info(&self, _: &Input) -> Vec<PartInfo> {
        vec![anywhere(1 << 10)]
    }

    fn seeds(&self) -> Vec<Input> {
        ["harmless", "PANIC", "ABORT", "ALLOC", "STACK", "SLOW", "HANG", "still harmless"]
            .iter()
            .map(|s| vec![s.as_bytes().to_vec()])
            .collect()
    }

    fn dictionary(&self) -> Vec<Vec<u8>> {
        Vec::new()
    }

    fn run(&mut self, input: &Input) -> String {
        let s = String::from_utf8_lossy(&input[0]);
        if s.contains("PANIC") {
            panic!("planted panic");
        }
        if s.contains("ABORT") {
            std::process::abort();
        }
        if s.contains("ALLOC") {
            let v: Vec<u8> = Vec::with_capacity(std::hint::black_box(1 << 40));
            return format!("{}", v.capacity());
        }
        if s.contains("STACK") {
            return recurse(std::hint::black_box(u64::MAX >> 1)).to_string();
        }
        if s.contains("SLOW") {
            std::thread::sleep(std::time::Duration::from_millis(1200));
        }
        if s.contains("HANG") {
            loop {
                std::thread::sleep(std::time::Duration::from_secs(1));
            }
        }
        "ok".into()
    }
}
