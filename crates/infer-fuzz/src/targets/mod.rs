//! The fuzz targets: each takes an [`Input`] of named parts to the code untrusted input reaches,
//! exactly as infer runs it (files are written to a scratch folder, preferably in `/dev/shm`, and
//! loaded through the loader; requests are sent to a real server over HTTP). A target returns a short
//! description of the outcome (an error message without its numbers); the driver keeps inputs that
//! produce new outcomes. A panic, an abort or a slow input is a finding.

use std::path::{Path, PathBuf};

use crate::mutate::{Input, PartInfo};

pub mod canary;
pub mod gguf;
pub mod request;
pub mod safetensors;
pub mod template;
pub mod tokenizer;

/// One fuzz target.
pub trait Target {
    /// The file name of each part (findings are saved as a folder of these files).
    fn parts(&self) -> &'static [&'static str];
    /// Where mutations should land in each part of `input`.
    fn part_info(&self, input: &Input) -> Vec<PartInfo>;
    /// Valid inputs to start from.
    fn seeds(&self) -> Vec<Input>;
    /// Tokens the mutations insert (key names, keywords).
    fn dictionary(&self) -> Vec<Vec<u8>>;
    /// Runs one input; returns its outcome. Panics on a finding the target itself detects (a server
    /// answering 500).
    fn run(&mut self, input: &Input) -> String;
}

/// The targets `--target all` runs.
pub const ALL: &[&str] = &["gguf", "safetensors", "tokenizer", "template", "request"];

/// Builds target `name`, with `work` as its scratch folder.
pub fn make(name: &str, work: &Path) -> Result<Box<dyn Target>, String> {
    Ok(match name {
        "gguf" => Box::new(gguf::Gguf::new(work)?),
        "safetensors" => Box::new(safetensors::Safetensors::new(work)?),
        "tokenizer" => Box::new(tokenizer::TokenizerJson::new(work)?),
        "template" => Box::new(template::Template::new()),
        "request" => Box::new(request::Request::new(work)?),
        "canary" => Box::new(canary::Canary),
        other => return Err(format!("unknown target `{other}`; one of {}, all", ALL.join(", "))),
    })
}

/// A fresh scratch folder for a process: in `/dev/shm` when it exists (files cost no disk I/O).
pub fn scratch_dir(tag: &str) -> PathBuf {
    let base = Path::new("/dev/shm");
    let base = if base.is_dir() { base.to_path_buf() } else { std::env::temp_dir() };
    base.join(format!("infer-fuzz-{}-{tag}", std::process::id()))
}

/// An outcome from an error message: numbers and the scratch path blanked (so `offset 17` and
/// `offset 18` count as one outcome), at most 120 characters.
pub fn outcome<T, E: std::fmt::Display>(r: &Result<T, E>, work: &Path) -> String {
    match r {
        Ok(_) => "ok".into(),
        Err(e) => normalize(&e.to_string().replace(&*work.to_string_lossy(), "")),
    }
}

pub fn normalize(s: &str) -> String {
    let mut out = String::new();
    let mut digits = false;
    for c in s.chars() {
        if c.is_ascii_digit() {
            if !digits {
                out.push('#');
            }
            digits = true;
        } else {
            digits = false;
            out.push(c);
        }
        if out.len() >= 120 {
            break;
        }
    }
    out
}

/// Writes `data` to `path`, or removes the file when `data` is empty (a part that is absent).
pub fn write_or_remove(path: &Path, data: &[u8]) {
    if data.is_empty() {
        let _ = std::fs::remove_file(path);
    } else {
        std::fs::write(path, data).unwrap_or_else(|e| panic!("infer-fuzz: cannot write {}: {e}", path.display()));
    }
}

/// A part mutated anywhere, up to `max_len` bytes.
pub fn anywhere(max_len: usize) -> PartInfo {
    PartInfo { hot: usize::MAX, max_len }
}

/// Dictionary entries from strings.
pub fn words(list: &[&str]) -> Vec<Vec<u8>> {
    list.iter().map(|s| s.as_bytes().to_vec()).collect()
}

/// JSON fragments every JSON target's dictionary holds.
pub const JSON_WORDS: &[&str] = &[
    "null",
    "true",
    "false",
    "[]",
    "{}",
    "[[[[[[[[",
    "\"\"",
    ",",
    ":",
    "\"\\u0000\"",
    "\"\\ud800\"",
    "1e309",
    "-1",
    "18446744073709551615",
    "4294967296",
    "0.0",
    "-0",
    "\"\\n\"",
];

/// A conversation the loaded models' templates render (system, user, assistant with a tool call,
/// tool result, user).
pub fn sample_conversation() -> Vec<infer_core::ChatMessage> {
    use infer_core::ChatMessage;
    let mut call = ChatMessage::assistant("");
    call.tool_calls =
        vec![serde_json::json!({"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}})];
    let mut result = ChatMessage::new("tool", "{\"temp\": 21}");
    result.tool_call_id = Some("call_1".into());
    result.name = Some("get_weather".into());
    vec![ChatMessage::system("Be brief."), ChatMessage::user("What is the weather in Paris?"), call, result, ChatMessage::user("Thanks!")]
}

/// What the server and `infer run` do with a loaded model before generating: detect the tool format,
/// render the template, tokenize the prompt, detokenize ids one by one.
pub fn exercise_loaded(m: &infer_core::LoadedModel) -> String {
    let mut out = String::from("loaded");
    if let Some(t) = &m.chat_template {
        let _ = infer_core::tools::ToolFormat::detect(t.source());
        match t.render(&sample_conversation(), true) {
            Ok(text) => {
                if let Ok(ids) = m.tokenizer.encode(&text, false) {
                    let mut dec = infer_core::IncrementalDecoder::new();
                    for id in ids.iter().take(256) {
                        let _ = dec.push(&m.tokenizer, *id);
                    }
                    let _ = dec.flush(&m.tokenizer);
                }
                out.push_str(" rendered");
            }
            Err(e) => out.push_str(&format!(" template error {}", normalize(&e.to_string()))),
        }
    }
    let _ = m.tokenizer.encode("Hello world, 123 <|im_start|> héllo ▁x\n\n", true);
    let vocab = m.config().vocab_size as u32;
    let _ = m.tokenizer.decode(&(0..vocab.min(300)).collect::<Vec<_>>(), false);
    out
}

/// The part names of target `name` (without building it).
pub fn make_parts(name: &str) -> &'static [&'static str] {
    match name {
        "gguf" => gguf::PARTS,
        "safetensors" => safetensors::PARTS,
        "tokenizer" => tokenizer::PARTS,
        "template" => template::PARTS,
        "request" => request::PARTS,
        _ => canary::PARTS,
    }
}
