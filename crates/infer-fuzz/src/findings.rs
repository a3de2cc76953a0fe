//! Findings on disk: one folder per finding, `<target>-<kind>-<hash>`, holding the input's parts under
//! their file names (a GGUF finding is a loadable `model.gguf`, a safetensors one a model folder) and
//! `finding.txt` saying what happened and how to replay it.

use std::path::{Path, PathBuf};

use crate::mutate::Input;

/// FNV-1a, for stable folder names.
pub fn hash(b: &[u8]) -> u64 {
    b.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &x| (h ^ x as u64).wrapping_mul(0x0100_0000_01b3))
}

/// Saves a finding; returns its folder. `key` deduplicates (the same key overwrites).
pub fn save(out: &Path, target: &str, kind: &str, key: &str, parts: &[&str], input: &Input, what: &str) -> std::io::Result<PathBuf> {
    let dir = out.join(format!("{target}-{kind}-{:016x}", hash(key.as_bytes())));
    std::fs::create_dir_all(&dir)?;
    for (name, data) in parts.iter().zip(input) {
        std::fs::write(dir.join(name), data)?;
    }
    let text = format!(
        "target: {target}\nkind: {kind}\n{what}\n\nreplay: cargo run --release -p infer-fuzz -- --target {target} --replay {}\n",
        dir.display()
    );
    std::fs::write(dir.join("finding.txt"), text)?;
    Ok(dir)
}

/// Reads a finding folder back as an input (absent parts are empty).
pub fn load(dir: &Path, parts: &[&str]) -> std::io::Result<Input> {
    if dir.is_file() && parts.len() == 1 {
        return Ok(vec![std::fs::read(dir)?]);
    }
    Ok(parts.iter().map(|p| std::fs::read(dir.join(p)).unwrap_or_default()).collect())
}
