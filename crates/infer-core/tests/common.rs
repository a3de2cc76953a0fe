//! Shared test helpers (included with `mod common;`).
#![allow(dead_code)]

use std::path::PathBuf;

/// The SmolLM2-135M-Instruct Q4_1 GGUF: `$INFER_TEST_MODEL`, else the cache path `scripts/fetch-model.sh`
/// uses. Under CI the model must be there (the test fails); elsewhere a missing model skips the test.
pub fn smollm2() -> Option<PathBuf> {
    let path = match std::env::var_os("INFER_TEST_MODEL") {
        Some(p) => PathBuf::from(p),
        None => {
            let base = std::env::var_os("INFER_MODELS")
                .map(PathBuf::from)
                .unwrap_or_else(|| PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cache/infer/models"));
            base.join("SmolLM2-135M-Instruct.Q4_1.gguf")
        }
    };
    if path.exists() {
        return Some(path);
    }
    if std::env::var_os("CI").is_some() {
        panic!("test model {} is missing: run scripts/fetch-model.sh", path.display());
    }
    eprintln!("SKIPPED: test model {} is missing (run scripts/fetch-model.sh)", path.display());
    None
}

pub fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures").join(name)
}

pub fn llamacpp_refs() -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(fixture("smollm2-llamacpp.json")).unwrap()).unwrap()
}
