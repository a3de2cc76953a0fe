//! # infer-fuzz
//!
//! infer's fuzzer, on stable Rust: an in-tree mutation driver over seed corpora built from the
//! repository's fixtures, for the code untrusted input reaches:
//!
//! - `gguf`: GGUF header, metadata, tokenizer and tensor infos, through the loader;
//! - `safetensors`: a model folder's config.json, safetensors header, shard index, generation and
//!   tokenizer configs, through the loader;
//! - `tokenizer`: tokenizer.json, then encoding and (incremental) decoding;
//! - `template`: chat templates rendered with messages, tools and kwargs;
//! - `request`: the HTTP request of each endpoint, sent to running servers.
//!
//! Each target runs in a child process (this binary again, with `--child`) that writes the current
//! input to a shared page before running it. Panics are caught in the child; an abort, a stack
//! overflow, an allocation above the cap or an input that hangs kills the child, and the parent saves
//! the input from the shared page and starts a new child. Every finding (panic, abort, input slower
//! than `--slow-ms`) is a folder under `--out`, and the exit status is 1 when there is any.
//!
//! ```text
//! infer-fuzz [--target gguf|safetensors|tokenizer|template|request|all] [--execs N | --seconds S]
//!            [--seed N] [--out DIR] [--jobs J]
//! infer-fuzz --target T --replay FINDING_DIR
//! ```

mod alloc;
mod child;
mod findings;
mod fixtures;
mod hook;
mod mutate;
mod shm;
mod targets;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::Parser;

use crate::shm::Word;

#[global_allocator]
static ALLOC: alloc::CappedAlloc = alloc::CappedAlloc;

#[derive(Parser, Debug)]
#[command(name = "infer-fuzz", about = "Fuzzes the parsers untrusted input reaches in infer (stable Rust, in-tree mutation driver).")]
struct Args {
    /// What to fuzz: gguf, safetensors, tokenizer, template, request, or all.
    #[arg(long, default_value = "all")]
    target: String,
    /// Executions per target (default 10000 when --seconds is not given).
    #[arg(long, conflicts_with = "seconds")]
    execs: Option<u64>,
    /// Seconds per target.
    #[arg(long)]
    seconds: Option<u64>,
    /// Seed of the mutations (the same seed replays the same inputs).
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Where findings are written.
    #[arg(long, default_value = "target/fuzz-findings")]
    out: PathBuf,
    /// Targets fuzzed at once (one process each).
    #[arg(long, default_value_t = 1)]
    jobs: usize,
    /// An input slower than this (ms) is a finding.
    #[arg(long, default_value_t = 1000)]
    slow_ms: u64,
    /// An input still running after this many seconds is a hang: the child is killed.
    #[arg(long, default_value_t = 30)]
    hang_secs: u64,
    /// A single allocation above this (MiB) is a finding.
    #[arg(long, default_value_t = 2048)]
    alloc_cap_mb: u64,
    /// Address-space limit of a fuzzing child (MiB).
    #[arg(long, default_value_t = 8192)]
    mem_limit_mb: u64,
    /// Runs one saved finding (a folder of parts, or a file for one-part targets) in this process.
    #[arg(long)]
    replay: Option<PathBuf>,
    #[arg(long, hide = true)]
    child: Option<String>,
    #[arg(long, hide = true)]
    shm: Option<PathBuf>,
    #[arg(long, hide = true, default_value_t = 0)]
    until_ns: u64,
    #[arg(long, hide = true, default_value_t = 0)]
    skip_seeds: u64,
}

/// What one target's run came to.
#[derive(Debug, Default, Clone)]
struct Stats {
    execs: u64,
    panics: u64,
    aborts: u64,
    slow: u64,
    hangs: u64,
    max_ns: u64,
    outcomes: u64,
    wall: Duration,
    restarts: u64,
    /// A failure of the driver itself (a child that dies outside any input).
    error: Option<String>,
}

impl Stats {
    fn findings(&self) -> u64 {
        self.panics + self.aborts + self.slow + u64::from(self.error.is_some())
    }
}

fn main() {
    let args = Args::parse();
    if let Some(target) = args.child.clone() {
        let code = child::run(child::ChildArgs {
            target,
            shm: args.shm.clone().expect("--shm with --child"),
            seed: args.seed,
            execs: args.execs,
            until_ns: args.until_ns,
            skip_seeds: args.skip_seeds,
            out: args.out.clone(),
            slow: Duration::from_millis(args.slow_ms),
            alloc_cap: (args.alloc_cap_mb << 20) as usize,
            mem_limit: args.mem_limit_mb << 20,
        });
        std::process::exit(code);
    }
    let names: Vec<String> = if args.target == "all" {
        targets::ALL.iter().map(|s| s.to_string()).collect()
    } else {
        args.target.split(',').map(str::to_string).collect()
    };
    if let Some(path) = &args.replay {
        std::process::exit(replay(&names[0], path, Duration::from_millis(args.slow_ms)));
    }
    if let Some(bad) = names.iter().find(|n| !targets::ALL.contains(&n.as_str()) && n.as_str() != "canary") {
        eprintln!("error: unknown target `{bad}`; one of {}, all", targets::ALL.join(", "));
        std::process::exit(2);
    }
    if let Err(e) = std::fs::create_dir_all(&args.out) {
        eprintln!("error: cannot create {}: {e}", args.out.display());
        std::process::exit(2);
    }
    let budget = match (args.execs, args.seconds) {
        (_, Some(s)) => format!("{s} s per target"),
        (n, None) => format!("{} executions per target", n.unwrap_or(10_000)),
    };
    eprintln!("infer-fuzz: {} ({budget}, seed {}, {} at once), findings in {}", names.join(", "), args.seed, args.jobs, args.out.display());
    let args = Arc::new(args);
    let queue = Arc::new(Mutex::new(names.clone()));
    let results: Arc<Mutex<Vec<(String, Stats)>>> = Arc::new(Mutex::new(Vec::new()));
    let workers: Vec<_> = (0..args.jobs.max(1))
        .map(|_| {
            let (args, queue, results) = (args.clone(), queue.clone(), results.clone());
            std::thread::spawn(move || loop {
                let next = {
                    let mut q = queue.lock().expect("queue");
                    (!q.is_empty()).then(|| q.remove(0))
                };
                let Some(name) = next else { return };
                let stats = drive(&name, &args);
                results.lock().expect("results").push((name, stats));
            })
        })
        .collect();
    for w in workers {
        w.join().expect("a driver thread");
    }
    let mut results = results.lock().expect("results").clone();
    results.sort_by_key(|(n, _)| names.iter().position(|x| x == n));
    println!(
        "{:<12} {:>10} {:>8} {:>9} {:>7} {:>7} {:>9} {:>6} {:>13} {:>9}",
        "target", "execs", "secs", "execs/s", "panics", "aborts", "slow>lim", "hangs", "max ms/input", "outcomes"
    );
    let mut total = 0;
    for (name, s) in &results {
        let secs = s.wall.as_secs_f64();
        println!(
            "{:<12} {:>10} {:>8.1} {:>9.0} {:>7} {:>7} {:>9} {:>6} {:>13.1} {:>9}",
            name,
            s.execs,
            secs,
            s.execs as f64 / secs.max(1e-9),
            s.panics,
            s.aborts,
            s.slow,
            s.hangs,
            s.max_ns as f64 / 1e6,
            s.outcomes
        );
        if let Some(e) = &s.error {
            println!("  {name}: {e}");
        }
        total += s.findings();
    }
    if total > 0 {
        println!("{total} finding(s); inputs saved in {}", args.out.display());
        std::process::exit(1);
    }
    println!("no findings");
}

fn describe(status: std::process::ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (status.signal(), status.code()) {
        (Some(s), _) => format!("killed by signal {s}{}", if status.core_dumped() { " (core dumped)" } else { "" }),
        (None, Some(c)) => format!("exit status {c}"),
        _ => "ended".into(),
    }
}

fn tail(path: &Path, n: usize) -> String {
    let text = std::fs::read(path).map(|b| String::from_utf8_lossy(&b).into_owned()).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Fuzzes one target with as many children as it takes.
fn drive(name: &str, args: &Args) -> Stats {
    let start = Instant::now();
    let until_ns = args.seconds.map_or(0, |s| shm::now_ns() + s * 1_000_000_000);
    let execs = if args.seconds.is_some() { None } else { Some(args.execs.unwrap_or(10_000)) };
    let shm_path = targets::scratch_dir(&format!("{name}.shm"));
    let err_path = targets::scratch_dir(&format!("{name}.stderr"));
    let exe = std::env::current_exe().expect("the fuzzer's own path");
    let parts = targets::make_parts(name);
    let mut st = Stats::default();
    let mut last_report = Instant::now();
    loop {
        let left = execs.map(|n| n.saturating_sub(st.execs));
        if left == Some(0) || (until_ns != 0 && shm::now_ns() >= until_ns) {
            break;
        }
        if let Err(e) = shm::create(&shm_path) {
            st.error = Some(format!("cannot create {}: {e}", shm_path.display()));
            break;
        }
        let seed = args.seed.wrapping_add(st.restarts.wrapping_mul(0x9E37_79B9_7F4A_7C15)) ^ findings::hash(name.as_bytes());
        let mut cmd = Command::new(&exe);
        cmd.args(["--child", name, "--seed", &seed.to_string(), "--skip-seeds", &st.execs.to_string()])
            .args(["--until-ns", &until_ns.to_string(), "--slow-ms", &args.slow_ms.to_string()])
            .args(["--alloc-cap-mb", &args.alloc_cap_mb.to_string(), "--mem-limit-mb", &args.mem_limit_mb.to_string()])
            .arg("--shm")
            .arg(&shm_path)
            .arg("--out")
            .arg(&args.out)
            .stdin(Stdio::null())
            .stdout(Stdio::null());
        if let Some(n) = left {
            cmd.args(["--execs", &n.to_string()]);
        }
        match std::fs::File::create(&err_path) {
            Ok(f) => cmd.stderr(f),
            Err(_) => cmd.stderr(Stdio::null()),
        };
        let mut child = match cmd.spawn() {
            Ok(c) => c,
            Err(e) => {
                st.error = Some(format!("cannot start a child: {e}"));
                break;
            }
        };
        let mut hung_for = None;
        let status = loop {
            match child.try_wait() {
                Ok(Some(s)) => break s,
                Ok(None) => {}
                Err(e) => {
                    st.error = Some(format!("waiting for the child: {e}"));
                    let _ = child.kill();
                    break child.wait().expect("a killed child");
                }
            }
            std::thread::sleep(Duration::from_millis(50));
            if let Ok(snap) = shm::read(&shm_path, false) {
                let running = snap.words[Word::State as usize] == shm::RUNNING;
                let elapsed = shm::now_ns().saturating_sub(snap.words[Word::StartNs as usize]);
                if running && elapsed > args.hang_secs * 1_000_000_000 && hung_for.is_none() {
                    hung_for = Some(elapsed);
                    let _ = child.kill();
                }
                if last_report.elapsed() > Duration::from_secs(60) {
                    last_report = Instant::now();
                    let e = st.execs + snap.words[Word::Execs as usize];
                    eprintln!(
                        "  [{name}] {e} execs in {:.0} s, {} panics, {} aborts, {} slow so far",
                        start.elapsed().as_secs_f64(),
                        st.panics + snap.words[Word::Panics as usize],
                        st.aborts,
                        st.slow + snap.words[Word::Slow as usize]
                    );
                }
            }
        };
        let snap = match shm::read(&shm_path, true) {
            Ok(s) => s,
            Err(e) => {
                st.error = Some(format!("cannot read {}: {e}", shm_path.display()));
                break;
            }
        };
        let w = |x: Word| snap.words[x as usize];
        st.execs += w(Word::Execs);
        st.panics += w(Word::Panics);
        st.slow += w(Word::Slow);
        st.max_ns = st.max_ns.max(w(Word::MaxNs));
        st.outcomes = st.outcomes.max(w(Word::Outcomes));
        if status.success() && st.error.is_none() {
            break;
        }
        let state = w(Word::State);
        let how = describe(status);
        if state != shm::RUNNING && state != shm::ALLOC_CAP {
            st.error = Some(format!("the {name} child failed outside any input ({how}):\n{}", tail(&err_path, 20)));
            break;
        }
        let (kind, what) = if let Some(ns) = hung_for {
            st.slow += 1;
            st.hangs += 1;
            st.max_ns = st.max_ns.max(ns);
            ("hang", format!("still running after {:.1} s: killed", ns as f64 / 1e9))
        } else if state == shm::ALLOC_CAP {
            st.aborts += 1;
            ("alloc", format!("asked for one allocation of {} bytes (cap {} MiB); {how}", w(Word::AllocSize), args.alloc_cap_mb))
        } else {
            st.aborts += 1;
            ("abort", format!("the process died: {how}; its last stderr lines:\n{}", tail(&err_path, 20)))
        };
        match mutate::decode(&snap.input) {
            Some(input) => {
                let key = format!("{kind}{}", findings::hash(&snap.input));
                if let Err(e) = findings::save(&args.out, name, kind, &key, parts, &input, &what) {
                    eprintln!("infer-fuzz: cannot save a finding: {e}");
                }
            }
            None => eprintln!("infer-fuzz: [{name}] {kind} ({what}), but the input could not be read back"),
        }
        st.restarts += 1;
        if st.restarts > 200 {
            st.error = Some("more than 200 children died; stopping this target".into());
            break;
        }
    }
    let _ = std::fs::remove_file(&shm_path);
    let _ = std::fs::remove_file(&err_path);
    st.wall = start.elapsed();
    st
}

/// Runs one saved input in this process and says what happened; 1 if it panicked or was slow.
fn replay(name: &str, path: &Path, slow: Duration) -> i32 {
    hook::install();
    let work = targets::scratch_dir(&format!("replay-{name}"));
    if let Err(e) = std::fs::create_dir_all(&work) {
        eprintln!("error: {}: {e}", work.display());
        return 2;
    }
    let code = (|| {
        let mut target = match targets::make(name, &work) {
            Ok(t) => t,
            Err(e) => {
                eprintln!("error: {e}");
                return 2;
            }
        };
        let input = match findings::load(path, target.parts()) {
            Ok(i) => i,
            Err(e) => {
                eprintln!("error: {}: {e}", path.display());
                return 2;
            }
        };
        let t0 = Instant::now();
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| target.run(&input)));
        let dt = t0.elapsed();
        match r {
            Ok(outcome) => {
                println!("{name}: {outcome} ({dt:?})");
                i32::from(dt > slow)
            }
            Err(_) => {
                println!("{name}: {} ({dt:?})", hook::last_panic());
                1
            }
        }
    })();
    let _ = std::fs::remove_dir_all(&work);
    code
}
