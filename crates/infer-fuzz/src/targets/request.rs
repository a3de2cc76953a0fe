//! The HTTP API: request bodies (and paths) sent to real `infer-server` instances over a loopback
//! socket, so every byte goes through what a client reaches: body limits, JSON parsing, the request
//! types, the conversation and tools checks, constraint compilation, template rendering,
//! tokenizing, sampling parameters, admission, generation and the SSE stream. Three servers run the
//! tiny Llama fixture with different chat templates (Qwen3: hermes tool calls and reasoning;
//! Llama 3.3: JSON tool calls; Mistral Nemo: `[TOOL_CALLS]` and a JSON list), with a 512-token
//! context and two sequences at most (a request for more gets 429 once everything else is checked),
//! so that no valid request generates for long.
//!
//! A 500 (a handler panicked: the server's panic layer answers it), a 503 (the engine stopped), a
//! response that is not HTTP, or a stream cut short is a finding.
//!
//! Seeds: valid bodies for `/v1/chat/completions` (sampling fields, stop, n, logprobs, logit_bias,
//! tools and tool_choice, every structured-output field, chat_template_kwargs, streaming),
//! `/v1/completions` (text, texts, token ids, echo, logprobs), `/tokenize`, `/detokenize`, and the
//! GET endpoints.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use infer_core::{ChatTemplate, EngineConfig, LoadOptions};
use infer_server::{BackgroundServer, ServerConfig};
use serde_json::{json, Value};

use super::{anywhere, normalize, Target};
use crate::fixtures;
use crate::mutate::{Input, PartInfo};

/// How long one request may take before it counts as hung (the parent's watchdog is longer).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(15);
/// The servers' context (tokens).
const CONTEXT: usize = 512;

/// The input's parts (file names of a finding).
pub const PARTS: &[&str] = &["path", "body.json"];

pub struct Request {
    servers: Vec<BackgroundServer>,
}

impl Request {
    pub fn new(work: &Path) -> Result<Self, String> {
        let dir = work.join("tiny-llama");
        std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
        let (_, config, weights) = fixtures::HF_MODELS.iter().find(|(a, _, _)| *a == "llama").expect("llama fixture");
        // A context long enough for the templates' prompts (one token per byte with this tokenizer).
        let mut config: Value = serde_json::from_slice(config).map_err(|e| e.to_string())?;
        config["max_position_embeddings"] = json!(CONTEXT);
        let config = config.to_string();
        for (name, data) in
            [("config.json", config.as_bytes()), ("model.safetensors", *weights), ("tokenizer.json", fixtures::TOKENIZER_JSON)]
        {
            std::fs::write(dir.join(name), data).map_err(|e| format!("{}: {e}", dir.display()))?;
        }
        let mut servers = Vec::new();
        for template in ["qwen3", "llama3.3", "mistral-nemo"] {
            let cfg = ServerConfig {
                served_model_name: Some("fuzz".into()),
                engine: EngineConfig { max_context: Some(CONTEXT), max_seqs: 2, kv_cache_bytes: Some(64 << 20), ..Default::default() },
                max_queue: 0,
                ..Default::default()
            };
            let dir: PathBuf = dir.clone();
            let server = BackgroundServer::start(cfg, move || {
                let mut m = infer_core::load(&dir.to_string_lossy(), LoadOptions::default())?;
                m.chat_template = Some(ChatTemplate::new(fixtures::template(template), "<s>", "</s>")?);
                Ok(m)
            })
            .map_err(|e| format!("cannot start a server: {e}"))?;
            wait_ready(server.addr)?;
            servers.push(server);
        }
        Ok(Self { servers })
    }
}

fn wait_ready(addr: SocketAddr) -> Result<(), String> {
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_secs(120) {
        if let Ok(r) = send(addr, "GET", "/health", b"") {
            if r.status == 200 {
                return Ok(());
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Err("the server did not become ready in 120 s".into())
}

struct Response {
    status: u16,
    chunked: bool,
    body: Vec<u8>,
}

/// One HTTP/1.1 request on a fresh connection (`Connection: close`), read to the end.
fn send(addr: SocketAddr, method: &str, path: &str, body: &[u8]) -> Result<Response, String> {
    let mut s = TcpStream::connect(addr).map_err(|e| format!("connect: {e}"))?;
    s.set_read_timeout(Some(REQUEST_TIMEOUT)).map_err(|e| e.to_string())?;
    s.set_nodelay(true).map_err(|e| e.to_string())?;
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).and_then(|_| s.write_all(body)).map_err(|e| format!("write: {e}"))?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).map_err(|e| format!("read: {e} after {} bytes", raw.len()))?;
    let split = raw.windows(4).position(|w| w == b"\r\n\r\n").ok_or_else(|| format!("no HTTP header in {} bytes", raw.len()))?;
    let head = String::from_utf8_lossy(&raw[..split]).to_ascii_lowercase();
    let status = head
        .strip_prefix("http/1.1 ")
        .and_then(|r| r.get(..3))
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| format!("bad status line: {}", head.lines().next().unwrap_or("")))?;
    Ok(Response { status, chunked: head.contains("transfer-encoding: chunked"), body: raw[split + 4..].to_vec() })
}

/// The path part as a request target: printable ASCII kept, the rest percent-encoded.
fn request_target(raw: &[u8]) -> String {
    let mut out = String::from("/");
    for &b in raw.iter().take(2048) {
        if out.len() == 1 && b == b'/' {
            continue;
        }
        if (0x21..0x7f).contains(&b) && b != b'%' {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn seeds() -> Vec<(&'static str, Value)> {
    let user = json!([{"role": "user", "content": "Hi"}]);
    let tools = json!([{"type": "function", "function": {"name": "get_weather", "description": "Weather of a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "unit": {"enum": ["c", "f"]}}, "required": ["city"]}}}]);
    let history = json!([{"role": "developer", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "Weather in Paris?"}]},
        {"role": "assistant", "content": null, "tool_calls": [{"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}]},
        {"role": "tool", "tool_call_id": "call_1", "name": "get_weather", "content": "21"},
        {"role": "assistant", "content": "21 degrees", "reasoning_content": "easy"},
        {"role": "user", "content": "Thanks"}]);
    let chat = "/v1/chat/completions";
    let cmpl = "/v1/completions";
    vec![
        (chat, json!({"messages": user, "max_tokens": 4})),
        (
            chat,
            json!({"model": "fuzz", "messages": history, "max_completion_tokens": 3, "temperature": 0.7, "top_p": 0.9, "top_k": 5, "min_p": 0.05,
            "presence_penalty": 0.5, "frequency_penalty": -0.5, "repetition_penalty": 1.1, "seed": 7, "stop": ["\n", "x"], "n": 2,
            "logit_bias": {"5": 10, "7": -100}, "user": "u"}),
        ),
        (
            chat,
            json!({"messages": user, "max_tokens": 3, "logprobs": true, "top_logprobs": 2, "stream": true, "stream_options": {"include_usage": true}}),
        ),
        (chat, json!({"messages": history, "max_tokens": 8, "tools": tools, "tool_choice": "auto", "parallel_tool_calls": false})),
        (chat, json!({"messages": user, "max_tokens": 8, "tools": tools, "tool_choice": "required", "stream": true})),
        (
            chat,
            json!({"messages": user, "max_tokens": 8, "tools": tools, "tool_choice": {"type": "function", "function": {"name": "get_weather"}}}),
        ),
        (chat, json!({"messages": user, "max_tokens": 6, "response_format": {"type": "json_object"}})),
        (
            chat,
            json!({"messages": user, "max_tokens": 6, "response_format": {"type": "json_schema", "json_schema": {"name": "answer",
            "schema": {"type": "object", "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 9}, "b": {"type": "array", "items": {"type": "string", "maxLength": 3}, "maxItems": 2}}, "required": ["a"]}}}}),
        ),
        (chat, json!({"messages": user, "max_tokens": 6, "structured_outputs": {"regex": "[a-z]{1,5}"}})),
        (
            chat,
            json!({"messages": user, "max_tokens": 6, "structured_outputs": {"choice": ["yes", "no"]}, "chat_template_kwargs": {"enable_thinking": false}}),
        ),
        (chat, json!({"messages": user, "max_tokens": 6, "structured_outputs": {"grammar": "start: \"a\"+ \"b\""}})),
        (chat, json!({"messages": user, "max_tokens": 6, "guided_json": "{\"type\": \"string\", \"pattern\": \"^x+$\"}"})),
        (chat, json!({"messages": user, "max_tokens": 6, "guided_choice": ["a", "b"], "stream": true})),
        (chat, json!({"messages": user, "max_tokens": 6, "grammar": "root ::= \"yes\" | \"no\""})),
        (cmpl, json!({"prompt": "Hello", "max_tokens": 4})),
        (cmpl, json!({"prompt": ["Hello", "World"], "max_tokens": 2, "n": 2, "echo": true, "logprobs": 2, "seed": 1})),
        (cmpl, json!({"prompt": [1, 2, 3], "max_tokens": 3, "stream": true, "stream_options": {"include_usage": true}, "stop": "a"})),
        (cmpl, json!({"prompt": [[1, 2], [3, 4, 5]], "max_tokens": 2, "temperature": 0, "ignore_eos": true})),
        (cmpl, json!({"prompt": "x", "max_tokens": 5, "guided_regex": "[0-9]+", "echo": true})),
        (cmpl, json!({"prompt": "x", "max_tokens": 5, "json_schema": {"type": "object"}, "guided_grammar": "start: \"z\""})),
        ("/tokenize", json!({"content": "hello world", "add_special": false})),
        ("/tokenize", json!({"prompt": "hello", "model": "fuzz"})),
        ("/tokenize", json!({"messages": history})),
        ("/detokenize", json!({"tokens": [1, 2, 3, 255]})),
        ("/v1/models", json!({})),
        ("/v1/models/fuzz", json!({})),
        ("/health", json!({})),
        ("/metrics", json!({})),
    ]
}

impl Target for Request {
    fn parts(&self) -> &'static [&'static str] {
        PARTS
    }

    fn part_info(&self, _: &Input) -> Vec<PartInfo> {
        vec![anywhere(256), anywhere(1 << 16)]
    }

    fn seeds(&self) -> Vec<Input> {
        seeds().into_iter().map(|(p, b)| vec![p.as_bytes().to_vec(), b.to_string().into_bytes()]).collect()
    }

    fn dictionary(&self) -> Vec<Vec<u8>> {
        let mut d = super::words(&[
            "\"messages\": ",
            "\"role\": \"tool\"",
            "\"role\": \"assistant\"",
            "\"content\": null",
            "\"content\": [{\"type\": \"text\", \"text\": \"x\"}]",
            "\"content\": [{\"type\": \"image_url\"}]",
            "\"tool_calls\": [{\"function\": {\"name\": \"f\", \"arguments\": 1}}]",
            "\"tools\": [{\"type\": \"function\", \"function\": {\"name\": \"f\", \"parameters\": {\"type\": \"object\"}}}]",
            "\"tool_choice\": \"required\"",
            "\"tool_choice\": \"none\"",
            "\"max_tokens\": ",
            "\"max_completion_tokens\": ",
            "\"temperature\": ",
            "\"top_p\": ",
            "\"top_k\": ",
            "\"min_p\": ",
            "\"seed\": ",
            "\"n\": ",
            "\"stop\": ",
            "\"logit_bias\": {\"1\": ",
            "\"logprobs\": true",
            "\"top_logprobs\": ",
            "\"stream\": true",
            "\"echo\": true",
            "\"prompt\": ",
            "\"tokens\": [",
            "\"response_format\": {\"type\": \"json_schema\", \"json_schema\": {\"schema\": ",
            "{\"type\": \"object\", \"properties\": {\"a\": {\"$ref\": \"#\"}}}",
            "{\"type\": \"string\", \"pattern\": \"(a|b)*c{3,9}\"}",
            "{\"anyOf\": [{\"type\": \"integer\"}, {\"type\": \"null\"}]}",
            "\"structured_outputs\": {\"regex\": \"",
            "\"grammar\": \"",
            "start: ",
            "::=",
            "\"chat_template_kwargs\": {\"messages\": 1}",
            "/v1/chat/completions",
            "/v1/completions",
            "/tokenize",
            "/detokenize",
            "/v1/models/",
            "%00",
            "<|im_start|>",
            "<tool_call>",
            "[TOOL_CALLS]",
            "<think>",
        ]);
        d.extend(super::words(super::JSON_WORDS));
        d
    }

    fn run(&mut self, input: &Input) -> String {
        let path = request_target(&input[0]);
        let body = &input[1];
        let get = ["/v1/models", "/health", "/metrics"].iter().any(|p| path.starts_with(p));
        let server = &self.servers[body.len() % self.servers.len()];
        let r = send(server.addr, if get { "GET" } else { "POST" }, &path, if get { b"" } else { body })
            .unwrap_or_else(|e| panic!("no valid HTTP answer to {path}: {e}"));
        let text = String::from_utf8_lossy(&r.body);
        if r.status == 500 || r.status == 503 {
            panic!("{path} answered {}: {text}; the server's last panic: {}", r.status, crate::hook::last_panic());
        }
        if r.chunked && !r.body.ends_with(b"0\r\n\r\n") {
            panic!("{path}: the chunked response ended early ({} bytes)", r.body.len());
        }
        let message = serde_json::from_slice::<Value>(&r.body)
            .ok()
            .and_then(|v| v["error"]["message"].as_str().map(|m| m.chars().take(60).collect::<String>()))
            .unwrap_or_default();
        let endpoint =
            ["/v1/chat/completions", "/v1/completions", "/v1/models/", "/v1/models", "/tokenize", "/detokenize", "/health", "/metrics"]
                .into_iter()
                .find(|e| path.starts_with(e))
                .unwrap_or("other");
        normalize(&format!("{} {endpoint} {message}", r.status))
    }
}
