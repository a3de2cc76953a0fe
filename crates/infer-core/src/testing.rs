//! Where the test model lives, for infer's own tests, examples and benchmarks (not part of the
//! stable API).

use std::path::PathBuf;

/// File name of the default small real model (SmolLM2-135M-Instruct, Q4_1 GGUF).
pub const SMOLLM2_FILE: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";

/// The folder `scripts/fetch-model.sh` keeps models in: `$INFER_MODELS`, else `~/.cache/infer/models`.
pub fn models_dir() -> PathBuf {
    std::env::var_os("INFER_MODELS")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cache/infer/models"))
}

/// The test model: `$INFER_TEST_MODEL`, else the fetch script's path. When it is missing the caller
/// skips (with a `SKIPPED` line), except under CI (`$CI` set), where it panics: CI must run every test.
pub fn smollm2() -> Option<PathBuf> {
    let path = std::env::var_os("INFER_TEST_MODEL").map(PathBuf::from).unwrap_or_else(|| models_dir().join(SMOLLM2_FILE));
    if path.exists() {
        return Some(path);
    }
    if std::env::var_os("CI").is_some() {
        panic!("test model {} is missing: run scripts/fetch-model.sh", path.display());
    }
    eprintln!("SKIPPED: test model {} is missing (run scripts/fetch-model.sh)", path.display());
    None
}
