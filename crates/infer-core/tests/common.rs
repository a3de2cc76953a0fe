//! Shared test helpers (included with `mod common;`).
#![allow(dead_code)]

use std::path::PathBuf;

/// The SmolLM2-135M-Instruct Q4_1 GGUF (see `infer_core::testing::smollm2`).
pub fn smollm2() -> Option<PathBuf> {
    infer_core::testing::smollm2()
}

pub fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures").join(name)
}

pub fn llamacpp_refs() -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(fixture("smollm2-llamacpp.json")).unwrap()).unwrap()
}
