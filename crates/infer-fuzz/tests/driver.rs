//! The fuzzer end to end: a short run of every target finds nothing (this is the fuzzing step of the
//! test command), and the planted faults of the `canary` target are each found and saved, so a
//! driver that stopped catching panics, aborts, huge allocations, stack overflows, slow inputs or
//! hangs would fail here.

use std::path::{Path, PathBuf};
use std::process::Command;

fn out_dir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("infer-fuzz-test-{}-{tag}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

fn fuzz(args: &[&str], out: &Path) -> (i32, String) {
    let o = Command::new(env!("CARGO_BIN_EXE_infer-fuzz")).args(args).arg("--out").arg(out).output().expect("run infer-fuzz");
    let text = format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
    (o.status.code().unwrap_or(-1), text)
}

fn findings(out: &Path) -> Vec<String> {
    let mut v: Vec<String> =
        std::fs::read_dir(out).map(|d| d.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect()).unwrap_or_default();
    v.sort();
    v
}

/// A short fuzz of every target (2,000 inputs each): no panic, abort or slow input.
#[test]
fn short_run_of_every_target_finds_nothing() {
    let out = out_dir("short");
    let (code, text) = fuzz(&["--target", "all", "--execs", "2000", "--jobs", "2", "--seed", "1"], &out);
    println!("{text}");
    assert_eq!(code, 0, "findings: {:?}\n{text}", findings(&out));
    for t in ["gguf", "safetensors", "tokenizer", "template", "request"] {
        let line = text.lines().find(|l| l.starts_with(t)).unwrap_or_else(|| panic!("no summary line for {t}:\n{text}"));
        let execs: u64 = line.split_whitespace().nth(1).and_then(|n| n.parse().ok()).expect("execs");
        assert_eq!(execs, 2000, "{line}");
    }
    let _ = std::fs::remove_dir_all(&out);
}

/// Each planted fault is found and its input saved.
#[test]
fn planted_faults_are_found() {
    let out = out_dir("canary");
    // Exactly the eight seeds: harmless, PANIC, ABORT, ALLOC, STACK, SLOW, HANG, harmless.
    let (code, text) = fuzz(&["--target", "canary", "--execs", "8", "--hang-secs", "3"], &out);
    assert_eq!(code, 1, "{text}");
    let found = findings(&out);
    for kind in ["canary-panic-", "canary-abort-", "canary-alloc-", "canary-slow-", "canary-hang-"] {
        assert!(found.iter().any(|f| f.starts_with(kind)), "no {kind}* in {found:?}\n{text}");
    }
    // The abort and the stack overflow: two aborts; the inputs saved are the ones that did it.
    let aborts: Vec<&String> = found.iter().filter(|f| f.starts_with("canary-abort-")).collect();
    assert_eq!(aborts.len(), 2, "{found:?}");
    let mut saved: Vec<String> = aborts.iter().map(|f| std::fs::read_to_string(out.join(f).join("data")).unwrap()).collect();
    saved.sort();
    assert_eq!(saved, ["ABORT", "STACK"]);
    let line = text.lines().find(|l| l.starts_with("canary")).expect("summary line");
    let cols: Vec<&str> = line.split_whitespace().collect();
    // execs, panics, aborts (abort, allocation, stack overflow), slow (1.2 s and the hang), hangs.
    assert_eq!((cols[1], cols[4], cols[5], cols[6], cols[7]), ("8", "1", "3", "2", "1"), "{line}");
    let _ = std::fs::remove_dir_all(&out);
}
