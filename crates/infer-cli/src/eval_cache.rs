//! Results of `infer eval` kept per (model fingerprint, item) in `~/.cache/infer/eval/`
//! (`INFER_EVAL_CACHE` elsewhere, `--no-cache` off), appended as items finish, so a rerun after
//! Ctrl-C continues where it stopped and a finished one costs nothing.
//!
//! The model fingerprint hashes every file the model was loaded from (weights, config, tokenizer,
//! tokenizer config, generation config, chat template; for the weights their sizes and first and
//! last MiB, as a full hash of many gigabytes would take longer than some evaluations), the chat
//! template and end-of-sequence tokens in effect, and the settings that change results (device,
//! dtype, kernels); the item key hashes the task, its settings and the item itself.
//!
//! Without `HOME` (or `XDG_CACHE_HOME`, or `INFER_EVAL_CACHE`) nothing is cached: the fallback of a
//! shared temporary folder would let other users plant results.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use infer::loader::ModelFiles;
use infer::{LoadOptions, LoadedModel};
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

/// A fingerprint of the model `spec` loaded with `opts` as `model` (see the module docs).
pub fn model_fingerprint(spec: &str, opts: &LoadOptions, model: &LoadedModel) -> Result<String> {
    let mut h = Sha256::new();
    let resolve = LoadOptions { device: opts.device.clone(), dtype: opts.dtype, gguf_file: opts.gguf_file.clone(), ..Default::default() };
    match infer::loader::resolve(spec, &resolve).with_context(|| format!("finding the files of {spec}"))? {
        ModelFiles::Gguf(p) => fingerprint_file(&mut h, &p)?,
        ModelFiles::Hf { config, weights, tokenizer, tokenizer_config, generation_config, chat_template } => {
            let files = [Some(config), Some(tokenizer), tokenizer_config, generation_config, chat_template];
            for f in weights.iter().chain(files.iter().flatten()) {
                h.update(f.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_default().as_bytes());
                fingerprint_file(&mut h, f)?;
            }
        }
    }
    let template = model.chat_template.as_ref().map(|t| t.source()).unwrap_or("");
    let settings = format!(
        "{:?}|{:?}|{:?}|{:?}|{:?}|{:?}|{}",
        opts.device,
        opts.dtype,
        opts.quantize,
        opts.kernels,
        model.model.dtype(),
        model.eos_token_ids,
        model.tokenizer.vocab_size()
    );
    for part in [template, &settings] {
        h.update((part.len() as u64).to_le_bytes());
        h.update(part.as_bytes());
    }
    Ok(hex(h.finalize()))
}

/// Where results are cached: `INFER_EVAL_CACHE`, else `$XDG_CACHE_HOME/infer/eval`, else
/// `$HOME/.cache/infer/eval`; `None` when none is set.
pub fn cache_dir() -> Option<PathBuf> {
    let nonempty = |v: &str| std::env::var_os(v).filter(|s| !s.is_empty()).map(PathBuf::from);
    nonempty("INFER_EVAL_CACHE")
        .or_else(|| nonempty("XDG_CACHE_HOME").map(|d| d.join("infer/eval")))
        .or_else(|| nonempty("HOME").map(|d| d.join(".cache/infer/eval")))
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
        let Some(dir) = cache_dir().filter(|_| enabled) else {
            return Ok(Self { entries: HashMap::new(), file: None, path: PathBuf::new() });
        };
        let path = dir.join(format!("{fingerprint}.jsonl"));
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
