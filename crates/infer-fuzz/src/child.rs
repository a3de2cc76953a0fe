//! The fuzzing child: builds one target, replays its seeds, then mutates inputs from its corpus until
//! its budget is spent. Each input is written to the shared page before it runs (so the parent can
//! save it if the process dies), panics are caught and saved as findings, and each run is timed
//! (over the slow limit: a finding). Inputs with an outcome not seen before join the corpus.

use std::collections::HashSet;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use crate::mutate::{self, Input, PartInfo, Rng};
use crate::shm::{self, Shared, Word};
use crate::{findings, hook, targets};

/// What the parent tells a child.
pub struct ChildArgs {
    pub target: String,
    pub shm: PathBuf,
    pub seed: u64,
    /// Executions left (`None`: until `until_ns`).
    pub execs: Option<u64>,
    /// `CLOCK_MONOTONIC` deadline in ns (0: none).
    pub until_ns: u64,
    /// Seeds already run by earlier children of this target.
    pub skip_seeds: u64,
    pub out: PathBuf,
    pub slow: Duration,
    pub alloc_cap: usize,
    pub mem_limit: u64,
}

/// Most inputs kept (seeds included).
const CORPUS_CAP: usize = 4096;
/// Most slow inputs saved per child (they are usually alike).
const SLOW_SAVED: usize = 16;

/// Caps the child's address space, so that many large allocations end in an abort the parent sees
/// rather than in the machine's OOM killer.
fn limit_memory(bytes: u64) {
    let lim = libc::rlimit { rlim_cur: bytes as libc::rlim_t, rlim_max: bytes as libc::rlim_t };
    // SAFETY: plain system call on a valid struct.
    unsafe { libc::setrlimit(libc::RLIMIT_AS, &lim) };
}

pub fn run(args: ChildArgs) -> i32 {
    hook::install();
    let shared = match Shared::map(&args.shm) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("infer-fuzz child: cannot map {}: {e}", args.shm.display());
            return 2;
        }
    };
    crate::alloc::arm(args.alloc_cap, shared.word(Word::State), shared.word(Word::AllocSize));
    limit_memory(args.mem_limit);
    let work = targets::scratch_dir(&args.target);
    if let Err(e) = std::fs::create_dir_all(&work) {
        eprintln!("infer-fuzz child: cannot create {}: {e}", work.display());
        return 2;
    }
    // The loop runs on a thread with the stack of the server's workers (2 MiB), not main's 8 MiB.
    let w = work.clone();
    let res = std::thread::Builder::new().name("fuzz".into()).stack_size(2 << 20).spawn(move || fuzz(&args, &shared, &w));
    let code = match res.map(|h| h.join()) {
        Ok(Ok(Ok(()))) => 0,
        Ok(Ok(Err(e))) => {
            eprintln!("infer-fuzz child: {e}");
            2
        }
        _ => {
            eprintln!("infer-fuzz child: the fuzzing thread failed: {}", hook::last_panic());
            2
        }
    };
    let _ = std::fs::remove_dir_all(&work);
    // Exit at once: the targets' servers and threads need no orderly shutdown.
    std::process::exit(code)
}

fn fuzz(args: &ChildArgs, shared: &Shared, work: &std::path::Path) -> Result<(), String> {
    let mut target = targets::make(&args.target, work)?;
    let parts = target.parts();
    let seeds = target.seeds();
    let dict = target.dictionary();
    let mut corpus: Vec<Input> = seeds.clone();
    let mut infos: Vec<Vec<PartInfo>> = seeds.iter().map(|s| target.part_info(s)).collect();
    let mut outcomes: HashSet<String> = HashSet::new();
    let mut saved: HashSet<String> = HashSet::new();
    let mut slow_saved = 0;
    let mut rng = Rng::new(args.seed);
    let mut buf = Vec::new();
    let mut done = 0u64;
    loop {
        if args.execs.is_some_and(|n| done >= n) || (args.until_ns != 0 && shm::now_ns() >= args.until_ns) {
            return Ok(());
        }
        let seed_index = args.skip_seeds + done;
        let (input, from_seed) = if (seed_index as usize) < seeds.len() {
            (seeds[seed_index as usize].clone(), true)
        } else {
            let k = rng.below(corpus.len());
            let mut input = corpus[k].clone();
            mutate::mutate(&mut rng, &mut input, &infos[k], &corpus, &dict);
            (input, false)
        };
        done += 1;
        mutate::encode(&input, &mut buf);
        shared.add(Word::Execs, 1);
        shared.begin(&buf);
        let t0 = Instant::now();
        let r = catch_unwind(AssertUnwindSafe(|| target.run(&input)));
        let dt = t0.elapsed();
        shared.end();
        let ns = dt.as_nanos() as u64;
        shared.add(Word::TotalNs, ns);
        shared.word(Word::MaxNs).fetch_max(ns, std::sync::atomic::Ordering::Relaxed);
        let outcome = match r {
            Ok(o) => o,
            Err(_) => {
                shared.add(Word::Panics, 1);
                let msg = hook::last_panic();
                // One finding per panic site (the request target's findings name the server's
                // panic in their message: one per message shape there).
                let key = match msg.split_once(" (thread") {
                    Some((at, _)) if !msg.contains("the server's last panic") => at.to_string(),
                    _ => targets::normalize(&msg),
                };
                if saved.insert(key.clone()) {
                    let what = format!("{msg}\ntime: {dt:?}");
                    if let Err(e) = findings::save(&args.out, &args.target, "panic", &key, parts, &input, &what) {
                        eprintln!("infer-fuzz: cannot save a finding: {e}");
                    }
                }
                "panic".into()
            }
        };
        if dt > args.slow {
            shared.add(Word::Slow, 1);
            if slow_saved < SLOW_SAVED {
                slow_saved += 1;
                let key = format!("{}{}", outcome, findings::hash(&buf));
                let what = format!("took {dt:?} (limit {:?}); outcome: {outcome}", args.slow);
                if let Err(e) = findings::save(&args.out, &args.target, "slow", &key, parts, &input, &what) {
                    eprintln!("infer-fuzz: cannot save a finding: {e}");
                }
            }
        }
        if outcomes.insert(outcome) {
            shared.add(Word::Outcomes, 1);
            if !from_seed {
                let info = target.part_info(&input);
                if corpus.len() < CORPUS_CAP {
                    corpus.push(input);
                    infos.push(info);
                } else {
                    let k = seeds.len() + rng.below(CORPUS_CAP - seeds.len());
                    corpus[k] = input;
                    infos[k] = info;
                }
            }
        }
    }
}
