//! Results of `infer eval` kept per (model fingerprint, item) in `~/.cache/infer/eval/`
//! (`INFER_EVAL_CACHE` elsewhere, `--no-cache` off), appended as items finish, so a rerun after
//! Ctrl-C continues where it stopped and a finished one costs nothing.
//!
//! The model fingerprint hashes the weights files' sizes and their first and last MiB (a full hash
//! of many gigabytes would take longer than some evaluations); the item key hashes the task, its
//! settings and the item itself.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

pub struct EvalCache {
    entries: HashMap<String, Value>,
    file: Option<File>,
    path: PathBuf,
}

fn hex(d: impl AsRef<[u8]>) -> String {
    d.as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

/// Hash of a file's size, first and last MiB.
fn fingerprint_file(h: &mut Sha256, path: &Path) -> Result<()> {
    let mut f = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let len = f.metadata()?.len();
    h.update(len.to_le_bytes());
    let mut buf = vec![0u8; (1 << 20).min(len as usize)];
    f.read_exact(&mut buf)?;
    h.update(&buf);
    if len > buf.len() as u64 {
        f.seek(SeekFrom::Start(len - buf.len() as u64))?;
        f.read_exact(&mut buf)?;
        h.update(&buf);
    }
    Ok(())
}

/// A fingerprint of the model `spec` names: a file, a folder (its weights, config and tokenizer), or
/// a Hub id (the id itself).
pub fn model_fingerprint(spec: &str) -> Result<String> {
    let mut h = Sha256::new();
    let p = Path::new(spec);
    if p.is_file() {
        fingerprint_file(&mut h, p)?;
    } else if p.is_dir() {
        let mut files: Vec<PathBuf> = std::fs::read_dir(p)?
            .flatten()
            .map(|e| e.path())
            .filter(|f| {
                let name = f.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_default();
                name.ends_with(".safetensors") || name.ends_with(".gguf") || name == "config.json" || name == "tokenizer.json"
            })
            .collect();
        files.sort();
        for f in files {
            h.update(f.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_default().as_bytes());
            fingerprint_file(&mut h, &f)?;
        }
    } else {
        h.update(spec.as_bytes());
    }
    Ok(hex(h.finalize()))
}

/// The key of one item under given task settings.
pub fn item_key(parts: &[&str]) -> String {
    let mut h = Sha256::new();
    for p in parts {
        h.update((p.len() as u64).to_le_bytes());
        h.update(p.as_bytes());
    }
    hex(h.finalize())
}

impl EvalCache {
    /// The cache of one model (`enabled: false` keeps nothing).
    pub fn open(fingerprint: &str, enabled: bool) -> Result<Self> {
        let dir = match std::env::var_os("INFER_EVAL_CACHE") {
            Some(d) => PathBuf::from(d),
            None => std::env::var_os("HOME").map(PathBuf::from).unwrap_or_else(std::env::temp_dir).join(".cache/infer/eval"),
        };
        let path = dir.join(format!("{fingerprint}.jsonl"));
        if !enabled {
            return Ok(Self { entries: HashMap::new(), file: None, path });
        }
        std::fs::create_dir_all(&dir).with_context(|| format!("creating the eval cache {}", dir.display()))?;
        let mut entries = HashMap::new();
        if let Ok(f) = File::open(&path) {
            // A line cut short by Ctrl-C is skipped: its item runs again.
            for line in BufReader::new(f).lines().map_while(|l| l.ok()) {
                if let Ok(v) = serde_json::from_str::<Value>(&line) {
                    if let (Some(k), Some(r)) = (v["key"].as_str(), v.get("result")) {
                        entries.insert(k.to_string(), r.clone());
                    }
                }
            }
        }
        let file = OpenOptions::new().create(true).append(true).open(&path).with_context(|| format!("opening {}", path.display()))?;
        Ok(Self { entries, file: Some(file), path })
    }

    pub fn get(&self, key: &str) -> Option<&Value> {
        self.entries.get(key)
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Records a result at once (one line, flushed).
    pub fn put(&mut self, key: &str, result: Value) -> Result<()> {
        if let Some(f) = &mut self.file {
            writeln!(f, "{}", json!({"key": key, "result": result})).with_context(|| format!("writing {}", self.path.display()))?;
            f.flush()?;
        }
        self.entries.insert(key.to_string(), result);
        Ok(())
    }
}
