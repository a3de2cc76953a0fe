//! HTTP-level tests of `infer serve` on the real SmolLM2-135M-Instruct Q4_1 GGUF, through reqwest:
//! response shapes, streaming, usage, stop strings, n, seeds, errors, admission control, disconnects,
//! continuous batching (16 concurrent streams = 16 sequential requests), prefix caching, shutdown.

use std::io::Read;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use infer_core::{EngineConfig, LoadOptions};
use infer_server::{BackgroundServer, ServerConfig};
use reqwest::blocking::Client;
use serde_json::{json, Value};

fn model_path() -> Option<PathBuf> {
    infer_core::testing::smollm2()
}

fn start(cfg: ServerConfig) -> Option<BackgroundServer> {
    let path = model_path()?;
    Some(BackgroundServer::start(cfg, move || infer_core::load(path.to_str().unwrap(), LoadOptions::default())).unwrap())
}

fn config() -> ServerConfig {
    ServerConfig {
        engine: EngineConfig { max_context: Some(2048), max_seqs: 16, ..Default::default() },
        report_cached_tokens: true,
        ..Default::default()
    }
}

/// One server shared by the tests that need no special configuration.
fn shared() -> Option<&'static str> {
    static SERVER: OnceLock<Option<(BackgroundServer, String)>> = OnceLock::new();
    SERVER
        .get_or_init(|| {
            let s = start(config())?;
            let url = s.url();
            wait_ready(&url);
            Some((s, url))
        })
        .as_ref()
        .map(|(_, url)| url.as_str())
}

fn client() -> Client {
    Client::builder().timeout(Duration::from_secs(300)).build().unwrap()
}

fn wait_ready(url: &str) {
    let t0 = Instant::now();
    while client().get(format!("{url}/health")).send().map(|r| r.status().as_u16()).ok() != Some(200) {
        assert!(t0.elapsed() < Duration::from_secs(60), "server never became ready");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn post(url: &str, path: &str, body: &Value) -> (u16, Value) {
    let r = client().post(format!("{url}{path}")).json(body).send().unwrap();
    let status = r.status().as_u16();
    let text = r.text().unwrap();
    (status, serde_json::from_str(&text).unwrap_or_else(|_| panic!("not JSON: {text}")))
}

/// The `data:` payloads of an SSE body.
fn sse_events(url: &str, path: &str, body: &Value) -> Vec<String> {
    let r = client().post(format!("{url}{path}")).json(body).send().unwrap();
    assert_eq!(r.status().as_u16(), 200);
    assert!(r.headers()["content-type"].to_str().unwrap().starts_with("text/event-stream"));
    let text = r.text().unwrap();
    text.split("\n\n").filter(|e| !e.trim().is_empty()).map(|e| e.strip_prefix("data: ").expect("data event").to_string()).collect()
}

fn metric(url: &str, name: &str) -> f64 {
    let text = client().get(format!("{url}/metrics")).send().unwrap().text().unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix(name).and_then(|rest| rest.strip_prefix(' ')).map(|v| v.parse().unwrap()))
        .unwrap_or_else(|| panic!("metric {name} missing"))
}

const FRANCE: &str = "What is the capital of France? Answer in one sentence.";

fn chat_body(q: &str) -> Value {
    json!({"model": "SmolLM2-135M-Instruct.Q4_1.gguf", "messages": [{"role": "user", "content": q}], "temperature": 0})
}

#[test]
fn chat_answer_shape_and_usage() {
    let Some(url) = shared() else { return };
    let (status, r) = post(url, "/v1/chat/completions", &chat_body(FRANCE));
    assert_eq!(status, 200, "{r}");
    assert!(r["id"].as_str().unwrap().starts_with("chatcmpl-"));
    assert_eq!(r["object"], "chat.completion");
    assert_eq!(r["model"], "SmolLM2-135M-Instruct.Q4_1.gguf");
    let c = &r["choices"][0];
    assert_eq!(c["message"]["role"], "assistant");
    assert_eq!(c["message"]["content"], "The capital of France is Paris.");
    assert_eq!(c["finish_reason"], "stop");
    // 42 prompt tokens (as llama.cpp tokenizes the rendered template); 7 answer tokens + <|im_end|>.
    assert_eq!(r["usage"]["prompt_tokens"], 42);
    assert_eq!(r["usage"]["completion_tokens"], 8);
    assert_eq!(r["usage"]["total_tokens"], 50);
    // Content parts work like a string.
    let parts = json!({"messages": [{"role": "user", "content": [{"type": "text", "text": FRANCE}]}], "temperature": 0});
    let (_, r2) = post(url, "/v1/chat/completions", &parts);
    assert_eq!(r2["choices"][0]["message"]["content"], "The capital of France is Paris.");
}

#[test]
fn chat_streaming_matches_and_follows_the_format() {
    let Some(url) = shared() else { return };
    let mut body = chat_body(FRANCE);
    body["stream"] = json!(true);
    body["stream_options"] = json!({"include_usage": true});
    let events = sse_events(url, "/v1/chat/completions", &body);
    assert_eq!(events.last().unwrap(), "[DONE]");
    let chunks: Vec<Value> = events[..events.len() - 1].iter().map(|e| serde_json::from_str(e).unwrap()).collect();
    let id = chunks[0]["id"].as_str().unwrap();
    assert!(chunks.iter().all(|c| c["id"] == id && c["object"] == "chat.completion.chunk"), "one id throughout");
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let usage = chunks.last().unwrap();
    assert_eq!(usage["choices"].as_array().unwrap().len(), 0);
    assert_eq!(usage["usage"]["completion_tokens"], 8);
    assert_eq!(usage["usage"]["prompt_tokens"], 42);
    let fin = &chunks[chunks.len() - 2]["choices"][0];
    assert_eq!(fin["finish_reason"], "stop");
    let text: String = chunks.iter().filter_map(|c| c["choices"][0]["delta"]["content"].as_str()).collect();
    assert_eq!(text, "The capital of France is Paris.");
    assert!(chunks[..chunks.len() - 2].iter().all(|c| c["choices"][0]["finish_reason"].is_null()));
    // Without include_usage there is no usage chunk and no usage field.
    body["stream_options"] = Value::Null;
    let events = sse_events(url, "/v1/chat/completions", &body);
    assert!(events.iter().all(|e| !e.contains("\"usage\"")));
}

#[test]
fn completions_prompts_n_logprobs_and_stream() {
    let Some(url) = shared() else { return };
    let body = json!({"prompt": ["The quick brown fox", "Once upon a time"], "n": 2, "temperature": 0, "max_tokens": 10, "logprobs": 3});
    let (status, r) = post(url, "/v1/completions", &body);
    assert_eq!(status, 200, "{r}");
    assert_eq!(r["object"], "text_completion");
    let ch = r["choices"].as_array().unwrap();
    assert_eq!(ch.len(), 4);
    for (i, c) in ch.iter().enumerate() {
        assert_eq!(c["index"], i);
        assert_eq!(c["finish_reason"], "length");
        let lp = &c["logprobs"];
        assert_eq!(lp["tokens"].as_array().unwrap().len(), 10);
        assert_eq!(lp["tokens"].as_array().unwrap().iter().map(|t| t.as_str().unwrap()).collect::<String>(), c["text"].as_str().unwrap());
        for (k, top) in lp["top_logprobs"].as_array().unwrap().iter().enumerate() {
            assert_eq!(top.as_object().unwrap().len(), 3);
            // Greedy: the chosen token is the most likely one.
            let best = top.as_object().unwrap().values().map(|v| v.as_f64().unwrap()).fold(f64::MIN, f64::max);
            assert!((best - lp["token_logprobs"][k].as_f64().unwrap()).abs() < 1e-6);
        }
    }
    assert_eq!(ch[0]["text"], ch[1]["text"], "greedy choices agree");
    // llama.cpp's greedy continuation (tests/fixtures/smollm2-llamacpp.json).
    assert_eq!(ch[0]["text"], " with a quick brown bear.\n\nThe original");
    assert_ne!(ch[0]["text"], ch[2]["text"]);
    assert_eq!(r["usage"]["prompt_tokens"], 4 + 4);
    assert_eq!(r["usage"]["completion_tokens"], 40);
    // Streaming gives the same text, chunk by chunk, with the final chunk's finish_reason.
    let events =
        sse_events(url, "/v1/completions", &json!({"prompt": "The quick brown fox", "temperature": 0, "max_tokens": 10, "stream": true}));
    let chunks: Vec<Value> = events[..events.len() - 1].iter().map(|e| serde_json::from_str(e).unwrap()).collect();
    let text: String = chunks.iter().map(|c| c["choices"][0]["text"].as_str().unwrap()).collect();
    assert_eq!(text, ch[0]["text"].as_str().unwrap());
    assert_eq!(chunks.last().unwrap()["choices"][0]["finish_reason"], "length");
    // Default max_tokens for completions is OpenAI's 16; echo prepends the prompt.
    let (_, r) = post(url, "/v1/completions", &json!({"prompt": "The quick brown fox", "temperature": 0, "echo": true}));
    assert_eq!(r["usage"]["completion_tokens"], 16);
    assert!(r["choices"][0]["text"].as_str().unwrap().starts_with("The quick brown fox with a quick"));
}

#[test]
fn chat_logprobs() {
    let Some(url) = shared() else { return };
    let mut body = chat_body(FRANCE);
    body["logprobs"] = json!(true);
    body["top_logprobs"] = json!(2);
    let (_, r) = post(url, "/v1/chat/completions", &body);
    let content = r["choices"][0]["logprobs"]["content"].as_array().unwrap();
    assert_eq!(content.len(), 7, "one entry per answer token, not the end token");
    assert_eq!(content.iter().map(|e| e["token"].as_str().unwrap()).collect::<String>(), "The capital of France is Paris.");
    for e in content {
        assert_eq!(e["top_logprobs"].as_array().unwrap().len(), 2);
        assert_eq!(e["top_logprobs"][0]["token"], e["token"]);
        assert!(e["logprob"].as_f64().unwrap() <= 0.0);
    }
}

#[test]
fn stop_strings_and_seeds() {
    let Some(url) = shared() else { return };
    let mut body = chat_body(FRANCE);
    body["stop"] = json!([" Paris", "zzz"]);
    let (_, r) = post(url, "/v1/chat/completions", &body);
    assert_eq!(r["choices"][0]["message"]["content"], "The capital of France is");
    assert_eq!(r["choices"][0]["finish_reason"], "stop");
    let sample = |seed: i64| {
        let body = json!({"prompt": "Write a story about a dragon.", "temperature": 1.0, "seed": seed, "max_tokens": 24, "n": 2});
        let (status, r) = post(url, "/v1/completions", &body);
        assert_eq!(status, 200, "{r}");
        (r["choices"][0]["text"].as_str().unwrap().to_string(), r["choices"][1]["text"].as_str().unwrap().to_string())
    };
    let a = sample(42);
    assert_eq!(a, sample(42), "same seed, same texts");
    assert_ne!(a.0, a.1, "choices of one request differ");
    assert_ne!(a, sample(43));
}

#[test]
fn bad_requests_get_openai_errors() {
    let Some(url) = shared() else { return };
    let check = |status: u16, r: &Value, want: u16, param: Option<&str>| {
        assert_eq!(status, want, "{r}");
        let e = &r["error"];
        assert!(e["message"].as_str().is_some_and(|m| !m.is_empty()), "{r}");
        assert!(e["type"].is_string());
        assert!(e.as_object().unwrap().contains_key("code") && e.as_object().unwrap().contains_key("param"));
        if let Some(p) = param {
            assert_eq!(e["param"], p, "{r}");
        }
    };
    let (s, r) = post(url, "/v1/chat/completions", &json!({"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}));
    check(s, &r, 404, Some("model"));
    assert_eq!(r["error"]["code"], "model_not_found");
    let (s, r) = post(url, "/v1/chat/completions", &json!({"messages": [{"role": "user", "content": "hi"}], "temperature": "warm"}));
    check(s, &r, 400, Some("temperature"));
    let (s, r) = post(url, "/v1/chat/completions", &json!({"messages": [{"role": "user", "content": "hi"}], "top_p": 7}));
    check(s, &r, 400, Some("top_p"));
    let (s, r) = post(url, "/v1/chat/completions", &json!({"messages": "hi"}));
    check(s, &r, 400, Some("messages"));
    let (s, r) = post(url, "/v1/chat/completions", &json!({"messages": []}));
    check(s, &r, 400, Some("messages"));
    let (s, r) = post(url, "/v1/completions", &json!({"prompt": "hi", "max_tokens": 0}));
    check(s, &r, 400, Some("max_tokens"));
    let (s, r) = post(url, "/v1/completions", &json!({"prompt": "hi", "n": 1000}));
    check(s, &r, 400, Some("n"));
    let (s, r) = post(url, "/v1/completions", &json!({"prompt": [1, 2, 999999]}));
    check(s, &r, 400, Some("prompt"));
    // A prompt longer than the context (2048 here).
    let (s, r) = post(url, "/v1/completions", &json!({"prompt": "hello ".repeat(3000)}));
    check(s, &r, 400, Some("prompt"));
    assert_eq!(r["error"]["code"], "context_length_exceeded");
    assert!(r["error"]["message"].as_str().unwrap().contains("context holds 2048"), "{r}");
    // Not JSON; too large; unknown endpoint.
    let resp = client().post(format!("{url}/v1/completions")).body("{not json").send().unwrap();
    let s = resp.status().as_u16();
    check(s, &resp.json().unwrap(), 400, None);
    let big = format!("{{\"prompt\": \"{}\"}}", "a".repeat(9 << 20));
    let resp = client().post(format!("{url}/v1/completions")).body(big).send().unwrap();
    let s = resp.status().as_u16();
    check(s, &resp.json().unwrap(), 413, None);
    let resp = client().get(format!("{url}/v1/nothing")).send().unwrap();
    let s = resp.status().as_u16();
    check(s, &resp.json().unwrap(), 404, None);
    // The server is still fine.
    assert_eq!(post(url, "/v1/chat/completions", &chat_body(FRANCE)).0, 200);
}

#[test]
fn models_tokenize_detokenize() {
    let Some(url) = shared() else { return };
    let r: Value = client().get(format!("{url}/v1/models")).send().unwrap().json().unwrap();
    assert_eq!(r["data"][0]["id"], "SmolLM2-135M-Instruct.Q4_1.gguf");
    let ok = client().get(format!("{url}/v1/models/SmolLM2-135M-Instruct.Q4_1.gguf")).send().unwrap();
    assert_eq!(ok.status().as_u16(), 200);
    assert_eq!(client().get(format!("{url}/v1/models/other")).send().unwrap().status().as_u16(), 404);
    let (_, t) = post(url, "/tokenize", &json!({"content": "Hello world"}));
    assert_eq!(t["tokens"], json!([19556, 905]));
    let (_, d) = post(url, "/detokenize", &json!({"tokens": [19556, 905]}));
    assert_eq!(d["content"], "Hello world");
    let (_, t) = post(url, "/tokenize", &json!({"messages": [{"role": "user", "content": FRANCE}]}));
    assert_eq!(t["count"], 42);
    assert_eq!(post(url, "/detokenize", &json!({"tokens": [99999999]})).0, 400);
}

#[test]
fn sixteen_concurrent_streams_equal_sixteen_sequential_requests() {
    let Some(url) = shared() else { return };
    let topics = [
        "the sea",
        "a mountain",
        "bread",
        "the moon",
        "a cat",
        "winter",
        "a library",
        "coffee",
        "a river",
        "music",
        "a garden",
        "the desert",
        "a bicycle",
        "rain",
        "a castle",
        "friendship",
    ];
    let body = |t: &str| json!({"messages": [{"role": "user", "content": format!("Write one sentence about {t}.")}], "temperature": 0, "max_tokens": 24, "stream": true});
    let collect = |events: Vec<String>| -> String {
        events[..events.len() - 1]
            .iter()
            .map(|e| serde_json::from_str::<Value>(e).unwrap())
            .filter_map(|c| c["choices"][0]["delta"]["content"].as_str().map(str::to_string))
            .collect()
    };
    let sequential: Vec<String> = topics.iter().map(|t| collect(sse_events(url, "/v1/chat/completions", &body(t)))).collect();
    // Watch the running-sequences gauge while the 16 streams run.
    let done = Arc::new(AtomicBool::new(false));
    let watcher = {
        let (done, url) = (done.clone(), url.to_string());
        std::thread::spawn(move || {
            let mut most = 0f64;
            while !done.load(Ordering::SeqCst) {
                most = most.max(metric(&url, "infer_running_sequences"));
                std::thread::sleep(Duration::from_millis(10));
            }
            most
        })
    };
    let handles: Vec<_> = topics
        .iter()
        .map(|t| {
            let (b, url) = (body(t), url.to_string());
            std::thread::spawn(move || sse_events(&url, "/v1/chat/completions", &b))
        })
        .collect();
    let concurrent: Vec<String> = handles.into_iter().map(|h| collect(h.join().unwrap())).collect();
    done.store(true, Ordering::SeqCst);
    let most = watcher.join().unwrap();
    assert!(most >= 8.0, "the streams were not batched together (at most {most} running at once)");
    for (i, (a, b)) in sequential.iter().zip(&concurrent).enumerate() {
        assert_eq!(a, b, "stream {i} ({}) differs", topics[i]);
    }
}

#[test]
fn prefix_cache_is_hit_and_reported() {
    let Some(url) = shared() else { return };
    let system = "You are a meticulous travel guide. You answer questions about cities in Europe with one short, \
                  accurate sentence, and you never invent facts you are not sure about.";
    let ask = |q: &str| {
        let body =
            json!({"messages": [{"role": "system", "content": system}, {"role": "user", "content": q}], "temperature": 0, "max_tokens": 8});
        post(url, "/v1/chat/completions", &body).1
    };
    let before = metric(url, "infer_prefix_cache_hit_tokens_total");
    ask("What is Lisbon known for?");
    let r = ask("What is Vienna known for?");
    let cached = r["usage"]["prompt_tokens_details"]["cached_tokens"].as_u64().unwrap();
    assert!(cached >= 32, "the shared system prompt should come from the cache ({cached} tokens)");
    assert!(metric(url, "infer_prefix_cache_hit_tokens_total") - before >= cached as f64);
    assert!(metric(url, "infer_prefix_cache_hit_rate") > 0.0);
}

#[test]
fn api_key_is_required_and_cors_is_opt_in() {
    let Some(s) = start(ServerConfig { api_key: Some("sekret".into()), cors_origins: vec!["http://app.example".into()], ..config() })
    else {
        return;
    };
    let url = s.url();
    wait_ready(&url);
    let c = client();
    // CORS: the listed origin gets a preflight answer (before any key check); without --cors there is none.
    let pre = c
        .request(reqwest::Method::OPTIONS, format!("{url}/v1/chat/completions"))
        .header("Origin", "http://app.example")
        .header("Access-Control-Request-Method", "POST")
        .header("Access-Control-Request-Headers", "authorization,content-type")
        .send()
        .unwrap();
    assert_eq!(pre.headers().get("access-control-allow-origin").map(|v| v.to_str().unwrap()), Some("http://app.example"));
    let other = c.get(format!("{url}/health")).header("Origin", "http://evil.example").send().unwrap();
    assert!(other.headers().get("access-control-allow-origin").is_none());
    if let Some(shared) = shared() {
        let r = c.get(format!("{shared}/health")).header("Origin", "http://app.example").send().unwrap();
        assert!(r.headers().get("access-control-allow-origin").is_none(), "CORS is off by default");
    }
    let r = c.post(format!("{url}/v1/chat/completions")).json(&chat_body("hi")).send().unwrap();
    assert_eq!(r.status().as_u16(), 401);
    assert_eq!(r.json::<Value>().unwrap()["error"]["code"], "invalid_api_key");
    let r = c.get(format!("{url}/v1/models")).bearer_auth("wrong").send().unwrap();
    assert_eq!(r.status().as_u16(), 401);
    let r = c.get(format!("{url}/v1/models")).bearer_auth("sekret").send().unwrap();
    assert_eq!(r.status().as_u16(), 200);
    assert_eq!(c.get(format!("{url}/health")).send().unwrap().status().as_u16(), 200, "health needs no key");
    // Anthropic's clients send the key as `x-api-key`, and get errors in Anthropic's shape.
    let body = json!({"max_tokens": 4, "messages": [{"role": "user", "content": "hi"}]});
    let r = c.post(format!("{url}/v1/messages")).header("x-api-key", "sekret").json(&body).send().unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let r = c.post(format!("{url}/v1/messages")).header("x-api-key", "wrong").json(&body).send().unwrap();
    assert_eq!(r.status().as_u16(), 401);
    assert_eq!(r.json::<Value>().unwrap()["error"]["type"], "authentication_error");
    s.stop().unwrap();
}

/// `/v1/messages`: Anthropic's message shape, the same text as chat completions, its stream of
/// named events in order with the same text, and errors in its shape naming the field.
#[test]
fn anthropic_messages() {
    let Some(url) = shared() else { return };
    let ask = json!([{"role": "user", "content": "What is the capital of France?"}]);
    // Cut by max_tokens: stop_reason `max_tokens`.
    let (st, chat) = post(url, "/v1/chat/completions", &json!({"messages": ask, "temperature": 0, "max_tokens": 5}));
    assert_eq!(st, 200, "{chat}");
    assert_eq!(chat["choices"][0]["finish_reason"], "length");
    let body = json!({"model": chat["model"], "messages": ask, "temperature": 0, "max_tokens": 5});
    let (st, m) = post(url, "/v1/messages", &body);
    assert_eq!(st, 200, "{m}");
    assert_eq!(m["type"], "message");
    assert_eq!(m["role"], "assistant");
    assert!(m["id"].as_str().unwrap().starts_with("msg_"));
    assert_eq!(m["content"][0]["type"], "text");
    assert_eq!(m["content"][0]["text"], chat["choices"][0]["message"]["content"]);
    assert_eq!(m["stop_reason"], "max_tokens");
    let (_, whole) = post(url, "/v1/messages", &json!({"messages": ask, "temperature": 0, "max_tokens": 40}));
    assert_eq!(whole["stop_reason"], "end_turn", "{whole}");
    assert_eq!(m["usage"]["input_tokens"], chat["usage"]["prompt_tokens"]);
    assert_eq!(m["usage"]["output_tokens"], chat["usage"]["completion_tokens"]);
    // The stream: `event:` names and `data:` payloads of the same type.
    let mut sbody = body.clone();
    sbody["stream"] = json!(true);
    let text = client().post(format!("{url}/v1/messages")).json(&sbody).send().unwrap().text().unwrap();
    let mut kinds = Vec::new();
    let mut streamed = String::new();
    for e in text.split("\n\n").filter(|e| !e.trim().is_empty()) {
        let name = e.lines().find_map(|l| l.strip_prefix("event: ")).expect("named event");
        let data: Value = serde_json::from_str(e.lines().find_map(|l| l.strip_prefix("data: ")).expect("data")).unwrap();
        assert_eq!(data["type"], name, "{e}");
        if name == "content_block_delta" {
            streamed.push_str(data["delta"]["text"].as_str().unwrap());
        }
        if name == "message_delta" {
            assert_eq!(data["delta"]["stop_reason"], m["stop_reason"]);
            assert_eq!(data["usage"]["output_tokens"], m["usage"]["output_tokens"]);
        }
        if kinds.last() != Some(&name.to_string()) {
            kinds.push(name.to_string());
        }
    }
    assert_eq!(
        kinds,
        ["message_start", "content_block_start", "content_block_delta", "content_block_stop", "message_delta", "message_stop"]
    );
    assert_eq!(streamed, m["content"][0]["text"].as_str().unwrap());
    // Errors: Anthropic's shape, the field named.
    for (bad, field) in [
        (json!({"messages": ask}), "max_tokens"),
        (json!({"max_tokens": 5, "messages": ask, "stop_sequences": [""]}), "stop_sequences"),
        (json!({"max_tokens": 5, "messages": [{"role": "user", "content": [{"type": "image"}]}]}), "messages[0].content[0].type"),
    ] {
        let (st, e) = post(url, "/v1/messages", &bad);
        assert_eq!(st, 400, "{e}");
        assert_eq!(e["type"], "error");
        assert_eq!(e["error"]["type"], "invalid_request_error");
        assert!(e["error"]["message"].as_str().unwrap().contains(field), "{e}");
    }
}

/// Starts a long generation and returns the open response after its first event arrived.
fn open_stream(url: &str) -> reqwest::blocking::Response {
    let body = json!({"prompt": "Once upon a time", "max_tokens": 1500, "ignore_eos": true, "stream": true, "temperature": 0});
    let mut r = client().post(format!("{url}/v1/completions")).json(&body).send().unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let mut buf = [0u8; 64];
    assert!(r.read(&mut buf).unwrap() > 0);
    r
}

/// Waits (20 s at most) until the gauge `name` holds `want`: the engine thread sets the gauges after
/// it hands out a step's tokens, so a client may see a token before the gauges change.
fn wait_for(url: &str, name: &str, want: f64) {
    wait_until(url, name, &format!("{want}"), |v| v == want);
}

fn wait_until(url: &str, name: &str, what: &str, ok: impl Fn(f64) -> bool) {
    let t0 = Instant::now();
    loop {
        let v = metric(url, name);
        if ok(v) {
            return;
        }
        assert!(t0.elapsed() < Duration::from_secs(20), "{name} stayed at {v}, expected {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn disconnect_frees_blocks_and_full_queue_answers_429() {
    let Some(s) = start(ServerConfig {
        engine: EngineConfig { max_context: Some(2048), max_seqs: 1, ..Default::default() },
        max_queue: 0,
        ..Default::default()
    }) else {
        return;
    };
    let url = s.url();
    wait_ready(&url);
    let stream = open_stream(&url);
    wait_for(&url, "infer_running_sequences", 1.0);
    wait_until(&url, "infer_kv_blocks_used", ">= 1", |v| v >= 1.0);
    // The only slot is taken and the queue holds nothing: 429 with Retry-After.
    let r = client().post(format!("{url}/v1/chat/completions")).json(&chat_body("hi")).send().unwrap();
    assert_eq!(r.status().as_u16(), 429);
    assert!(r.headers().contains_key("retry-after"));
    assert_eq!(r.json::<Value>().unwrap()["error"]["code"], "rate_limit_exceeded");
    // The client leaves mid-stream: its sequence is cancelled and its blocks freed.
    drop(stream);
    wait_for(&url, "infer_running_sequences", 0.0);
    wait_for(&url, "infer_kv_blocks_used", 0.0);
    assert_eq!(post(&url, "/v1/chat/completions", &chat_body(FRANCE)).0, 200, "the slot is free again");
    s.stop().unwrap();
}

#[test]
fn reaching_the_context_ends_with_length() {
    let Some(s) = start(ServerConfig { engine: EngineConfig { max_context: Some(48), ..Default::default() }, ..Default::default() }) else {
        return;
    };
    let url = s.url();
    wait_ready(&url);
    let (status, r) = post(
        &url,
        "/v1/chat/completions",
        &json!({"messages": [{"role": "user", "content": FRANCE}], "ignore_eos": true, "max_tokens": 500}),
    );
    assert_eq!(status, 200, "{r}");
    assert_eq!(r["choices"][0]["finish_reason"], "length");
    assert_eq!(r["usage"]["total_tokens"], 48, "max_tokens is capped by the context");
    s.stop().unwrap();
}

#[test]
fn health_is_503_while_loading_and_shutdown_ends_streams() {
    let Some(path) = model_path() else { return };
    let cfg = ServerConfig { shutdown_grace: Duration::ZERO, ..config() };
    let s = BackgroundServer::start(cfg, move || {
        std::thread::sleep(Duration::from_millis(1500));
        infer_core::load(path.to_str().unwrap(), LoadOptions::default())
    })
    .unwrap();
    let url = s.url();
    let r = client().get(format!("{url}/health")).send().unwrap();
    assert_eq!(r.status().as_u16(), 503);
    let (status, _) = post(&url, "/v1/chat/completions", &chat_body("hi"));
    assert_eq!(status, 503);
    wait_ready(&url);
    // Shut down with a stream in flight: it ends with an error event, and the server exits cleanly.
    let mut stream = open_stream(&url);
    let t0 = Instant::now();
    let stopper = std::thread::spawn(move || s.stop());
    let mut rest = String::new();
    stream.read_to_string(&mut rest).unwrap();
    assert!(rest.contains("\"error\"") && rest.contains("shutting down"), "{}", &rest[rest.len().saturating_sub(300)..]);
    assert!(rest.trim_end().ends_with("data: [DONE]"));
    stopper.join().unwrap().unwrap();
    assert!(t0.elapsed() < Duration::from_secs(30));
}

#[test]
fn preemption_when_blocks_run_out_keeps_the_text_right() {
    // 8 blocks of 16 tokens (SmolLM2: 737280 bytes each): four sequences of ~60 tokens cannot all fit,
    // so some are preempted mid-generation and recomputed later.
    let Some(s) = start(ServerConfig {
        engine: EngineConfig { max_context: Some(2048), max_seqs: 4, kv_cache_bytes: Some(8 * 737_280), ..Default::default() },
        ..Default::default()
    }) else {
        return;
    };
    let url = s.url();
    wait_ready(&url);
    let prompts = ["Once upon a time", "The history of Rome", "My favourite recipe is", "In the year 3000"];
    let body = |p: &str| json!({"prompt": p, "max_tokens": 48, "temperature": 0, "ignore_eos": true});
    let sequential: Vec<Value> = prompts.iter().map(|p| post(&url, "/v1/completions", &body(p)).1["choices"][0]["text"].clone()).collect();
    let handles: Vec<_> = prompts
        .iter()
        .map(|p| {
            let (b, url) = (body(p), url.clone());
            std::thread::spawn(move || post(&url, "/v1/completions", &b).1["choices"][0]["text"].clone())
        })
        .collect();
    let concurrent: Vec<Value> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    assert!(metric(&url, "infer_preemptions_total") > 0.0, "the cache was large enough: no preemption happened");
    assert_eq!(concurrent, sequential);
    s.stop().unwrap();
}

/// Extreme but valid values: a temperature so small that 1/t overflows is greedy (not NaN
/// probabilities), `max_tokens` of 2^64-1 means "up to the context" (no wrap-around to one token).
#[test]
fn extreme_temperature_and_max_tokens() {
    let Some(url) = shared() else { return };
    let greedy = post(
        url,
        "/v1/chat/completions",
        &json!({"messages": [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}], "temperature": 0}),
    );
    let want = greedy.1["choices"][0]["message"]["content"].as_str().unwrap().to_string();
    for body in [
        json!({"messages": [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}], "temperature": 1e-40}),
        json!({"messages": [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}], "temperature": 0, "max_tokens": u64::MAX}),
        json!({"messages": [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}], "temperature": 0, "max_completion_tokens": u64::MAX}),
    ] {
        let (status, r) = post(url, "/v1/chat/completions", &body);
        assert_eq!(status, 200, "{r}");
        assert_eq!(r["choices"][0]["message"]["content"], want.as_str(), "{body}");
        assert_eq!(r["choices"][0]["finish_reason"], "stop", "{body}");
    }
}

/// A web page cannot reach a local server: bodies it can send without a CORS preflight are refused,
/// and so are requests for another host name (DNS rebinding).
#[test]
fn browser_requests_are_refused() {
    let Some(url) = shared() else { return };
    let body = r#"{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}"#;
    for ct in ["text/plain", "text/plain;charset=UTF-8", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x"] {
        let r = client().post(format!("{url}/v1/chat/completions")).header("Content-Type", ct).body(body).send().unwrap();
        assert_eq!(r.status().as_u16(), 415, "{ct}");
    }
    let r = client().post(format!("{url}/v1/chat/completions")).header("Content-Type", "application/json").body(body).send().unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let r = client().get(format!("{url}/v1/models")).header("Host", "attacker.example:8080").send().unwrap();
    assert_eq!(r.status().as_u16(), 403);
    let v: Value = r.json().unwrap();
    assert!(v["error"]["message"].as_str().unwrap().contains("attacker.example"), "{v}");
    for host in ["localhost:1234", "127.0.0.1", "[::1]:80"] {
        let r = client().get(format!("{url}/v1/models")).header("Host", host).send().unwrap();
        assert_eq!(r.status().as_u16(), 200, "{host}");
    }
}

/// A model whose loading panics ends the server with the error (it does not stay up answering 503).
#[test]
fn a_panic_while_loading_ends_the_server() {
    let s = BackgroundServer::start(config(), || -> infer_core::Result<infer_core::LoadedModel> { panic!("hostile model file") }).unwrap();
    let url = s.url();
    let t0 = Instant::now();
    // The server goes away by itself (before: 503 "loading" forever).
    while client().get(format!("{url}/health")).send().is_ok() {
        assert!(t0.elapsed() < Duration::from_secs(30), "the server stays up after a failed load");
        std::thread::sleep(Duration::from_millis(20));
    }
    let e = s.stop().unwrap_err();
    assert!(e.contains("loading the model failed") && e.contains("hostile model file"), "{e}");
}

/// Stop strings are bounded in length (each is searched at every token of every choice).
#[test]
fn long_stop_strings_are_refused() {
    let Some(url) = shared() else { return };
    let (status, r) = post(url, "/v1/completions", &json!({"prompt": "hi", "stop": ["x".repeat(100_000)], "n": 100}));
    assert_eq!(status, 400, "{r}");
    assert_eq!(r["error"]["param"], "stop", "{r}");
}

/// Many prompts × n is refused before the prompts are copied per choice (it used to cost GBs first).
#[test]
fn too_many_sequences_are_refused_up_front() {
    let Some(url) = shared() else { return };
    let prompts: Vec<Vec<u32>> = (0..50_000).map(|i| vec![1 + i % 100, 2, 3]).collect();
    let t0 = Instant::now();
    let (status, r) = post(url, "/v1/completions", &json!({"prompt": prompts, "n": 128, "max_tokens": 1}));
    assert_eq!(status, 400, "{r}");
    assert_eq!(r["error"]["param"], "prompt", "{r}");
    assert!(r["error"]["message"].as_str().unwrap().contains("6400000 sequences"), "{r}");
    assert!(t0.elapsed() < Duration::from_secs(10));
}

/// Tokenizing huge bodies runs off the async workers: `/health` answers meanwhile.
#[test]
fn tokenizing_does_not_block_other_requests() {
    let Some(url) = shared() else { return };
    let text = "All work and no play makes Jack a dull boy. ".repeat(150_000); // 6.6 MB
    let done = Arc::new(AtomicBool::new(false));
    let workers: Vec<_> = (0..2)
        .map(|_| {
            let (url, text, done) = (url.to_string(), text.clone(), done.clone());
            std::thread::spawn(move || {
                let r = client().post(format!("{url}/tokenize")).json(&json!({"content": text})).send().unwrap();
                done.store(true, Ordering::SeqCst);
                r.status().as_u16()
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    let mut slowest = Duration::ZERO;
    while !done.load(Ordering::SeqCst) {
        let t0 = Instant::now();
        assert_eq!(client().get(format!("{url}/health")).send().unwrap().status().as_u16(), 200);
        slowest = slowest.max(t0.elapsed());
        std::thread::sleep(Duration::from_millis(50));
    }
    for w in workers {
        assert_eq!(w.join().unwrap(), 200);
    }
    assert!(slowest < Duration::from_secs(2), "/health took {slowest:?} while tokenizing");
}

/// A raw connection that sends a streaming completion whose chunks are large (20 top logprobs per
/// token) and then never reads: the socket buffers fill within a few hundred tokens.
fn stalled_reader(url: &str, max_tokens: usize) -> std::net::TcpStream {
    use std::io::Write;
    let addr = url.trim_start_matches("http://");
    let body = json!({"prompt": "Once upon a time", "max_tokens": max_tokens, "ignore_eos": true, "stream": true,
        "temperature": 0, "logprobs": 20})
    .to_string();
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    write!(
        s,
        "POST /v1/completions HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    s
}

/// Reads a raw connection to its end; `true` if the server closed it within `within`.
fn closed_within(s: &mut std::net::TcpStream, within: Duration) -> bool {
    let t0 = Instant::now();
    s.set_read_timeout(Some(Duration::from_millis(200))).unwrap();
    let mut buf = vec![0u8; 1 << 16];
    while t0.elapsed() < within {
        match s.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => {}
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {}
            Err(_) => return true,
        }
    }
    false
}

/// A client that stops reading its stream is disconnected after `write_timeout`: its sequence is
/// cancelled (long before its 1900 tokens), its slot serves the next request (before: every later
/// request got 429 while the engine sat idle).
#[test]
fn a_stalled_reader_is_disconnected_and_frees_its_slot() {
    let Some(s) = start(ServerConfig {
        max_queue: 0,
        engine: EngineConfig { max_context: Some(2048), max_seqs: 1, ..Default::default() },
        // A small send buffer: the stall shows after a few dozen tokens even on a loaded machine.
        connections: infer_server::ConnLimits { write_timeout: Duration::from_secs(1), send_buffer: 4096, ..Default::default() },
        ..Default::default()
    }) else {
        return;
    };
    let url = s.url();
    wait_ready(&url);
    // More choices than the server holds at all: 400 (a 429 would be retried forever).
    let (status, r) = post(&url, "/v1/chat/completions", &json!({"messages": [{"role": "user", "content": "Hi"}], "n": 2}));
    assert_eq!((status, r["error"]["param"].as_str()), (400, Some("n")), "{r}");
    let mut stalled = stalled_reader(&url, 1900);
    wait_for(&url, "infer_running_sequences", 1.0);
    let (status, _) = post(&url, "/v1/completions", &json!({"prompt": "Hi", "max_tokens": 2}));
    assert_eq!(status, 429, "the only slot is taken");
    let t0 = Instant::now();
    while metric(&url, "infer_running_sequences") != 0.0 {
        assert!(t0.elapsed() < Duration::from_secs(90), "the stalled stream was never cut off");
        std::thread::sleep(Duration::from_millis(50));
    }
    let generated = metric(&url, "infer_generation_tokens_total");
    assert!(generated < 1800.0, "the stalled stream ran to its end ({generated} tokens) instead of being cut off");
    let (status, r) = post(&url, "/v1/completions", &json!({"prompt": "Hi", "max_tokens": 2}));
    assert_eq!(status, 200, "{r}");
    wait_for(&url, "infer_kv_blocks_used", 0.0);
    assert!(closed_within(&mut stalled, Duration::from_secs(10)), "the stalled connection is still open");
    s.stop().unwrap();
}

/// Shutdown ends even when a client never reads its stream (before: the server waited for that
/// connection forever).
#[test]
fn shutdown_finishes_despite_a_stalled_reader() {
    let Some(s) = start(ServerConfig { shutdown_grace: Duration::ZERO, ..config() }) else { return };
    let url = s.url();
    wait_ready(&url);
    let _stalled = stalled_reader(&url, 1900);
    wait_for(&url, "infer_running_sequences", 1.0);
    std::thread::sleep(Duration::from_secs(3)); // its buffers fill
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || tx.send(s.stop()));
    let stopped = rx.recv_timeout(Duration::from_secs(20)).expect("the server did not stop within 20 s");
    stopped.unwrap();
}

/// Slow headers are cut off after the header timeout; connections beyond the limit get 503 and the
/// others keep working.
#[test]
fn header_timeout_and_connection_limit() {
    use std::io::Write;
    let Some(s) = start(ServerConfig {
        connections: infer_server::ConnLimits { max_connections: 2, header_read_timeout: Duration::from_secs(1), ..Default::default() },
        ..config()
    }) else {
        return;
    };
    let url = s.url();
    wait_ready(&url);
    std::thread::sleep(Duration::from_millis(1500)); // wait_ready's keep-alive connections time out
    let addr = url.trim_start_matches("http://").to_string();
    // Slowloris: half a request, then nothing.
    let mut slow = std::net::TcpStream::connect(&addr).unwrap();
    write!(slow, "POST /v1/completions HTTP/1.1\r\nHost: {addr}\r\n").unwrap();
    let mut idle = std::net::TcpStream::connect(&addr).unwrap();
    std::thread::sleep(Duration::from_millis(200));
    // A third connection is over the limit.
    let mut third = std::net::TcpStream::connect(&addr).unwrap();
    let _ = write!(third, "GET /health HTTP/1.1\r\nHost: {addr}\r\n\r\n"); // the answer may come first
    let mut answer = String::new();
    third.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let _ = third.read_to_string(&mut answer);
    assert!(answer.starts_with("HTTP/1.1 503") && answer.contains("--max-connections 2"), "{answer}");
    // Both stalled connections are closed by the header timeout.
    assert!(closed_within(&mut slow, Duration::from_secs(10)), "slow headers were never cut off");
    assert!(closed_within(&mut idle, Duration::from_secs(10)), "an idle connection stayed open");
    std::thread::sleep(Duration::from_millis(100));
    let r = client().get(format!("{url}/health")).send().unwrap();
    assert_eq!(r.status().as_u16(), 200);
    s.stop().unwrap();
}

/// The prefix cache as a side channel: by default `cached_tokens` is not reported, and requests with
/// different `cache_salt`s never share cached blocks (the same salt does).
#[test]
fn cached_tokens_are_private_by_default_and_salts_separate_caches() {
    let Some(s) =
        start(ServerConfig { engine: EngineConfig { max_context: Some(2048), max_seqs: 4, ..Default::default() }, ..Default::default() })
    else {
        return;
    };
    let url = s.url();
    wait_ready(&url);
    let secret = "The launch code of the other tenant is 7-4-1-9-9-3, and the meeting with Alice Example is on Thursday \
                  at the harbour office; nobody else may know this.";
    let ask = |salt: Option<&str>, q: &str| {
        let mut body = json!({"messages": [{"role": "system", "content": secret}, {"role": "user", "content": q}], "max_tokens": 2});
        if let Some(salt) = salt {
            body["cache_salt"] = json!(salt);
        }
        let (status, r) = post(&url, "/v1/chat/completions", &body);
        assert_eq!(status, 200, "{r}");
        r
    };
    let hits = || metric(&url, "infer_prefix_cache_hit_tokens_total");
    let r = ask(Some("tenant-a"), "Hello");
    assert!(r["usage"].get("prompt_tokens_details").is_none(), "cached_tokens reported by default: {}", r["usage"]);
    let before = hits();
    ask(Some("tenant-b"), "Hi");
    ask(None, "Hi");
    assert_eq!(hits(), before, "another salt (or none) reused tenant-a's cached prompt");
    ask(Some("tenant-a"), "Hi");
    assert!(hits() >= before + 32.0, "the same salt should hit the cache");
    let body = json!({"messages": [{"role": "user", "content": "Hi"}], "cache_salt": "x".repeat(2000)});
    let (status, r) = post(&url, "/v1/chat/completions", &body);
    assert_eq!((status, r["error"]["param"].as_str()), (400, Some("cache_salt")), "{r}");
    s.stop().unwrap();
}

/// `--draft ngram`: the answers are those of a server without it, the drafted and kept tokens
/// show in /metrics, `speculative.n_max: 0` turns it off for one request, and a bad value is a 400
/// naming the field.
#[test]
fn speculative_decoding_by_flag_and_per_request() {
    let Some(plain) = shared() else { return };
    let mut cfg = config();
    cfg.engine.speculative = Some(infer_core::SpeculativeConfig::ngram(8));
    let Some(s) = start(cfg) else { return };
    let url = s.url();
    wait_ready(&url);
    let doc = "Speculative decoding guesses several tokens ahead and lets one forward pass of the model check them \
               all, keeping the guesses as far as the model agrees with them, so the answer stays the same.";
    let body = |extra: Value| {
        let mut b = json!({"messages": [{"role": "user", "content": format!("Repeat this text exactly:\n\n{doc}")}],
                           "temperature": 0, "max_tokens": 48});
        b.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
        b
    };
    let content = |r: &Value| r["choices"][0]["message"]["content"].as_str().unwrap().to_string();
    let (st, want) = post(plain, "/v1/chat/completions", &body(json!({})));
    assert_eq!(st, 200, "{want}");
    let (st, got) = post(&url, "/v1/chat/completions", &body(json!({})));
    assert_eq!(st, 200, "{got}");
    assert_eq!(content(&got), content(&want));
    // The engine thread updates the metrics after the step that sent the last token: wait until
    // two scrapes agree.
    let settled = || {
        let read = || {
            let names =
                ["infer_spec_decode_draft_tokens_total", "infer_spec_decode_accepted_tokens_total", "infer_spec_decode_acceptance_rate"];
            names.map(|n| metric(&url, n))
        };
        let mut last = read();
        for _ in 0..100 {
            std::thread::sleep(Duration::from_millis(50));
            let now = read();
            if now == last {
                return now;
            }
            last = now;
        }
        last
    };
    let [drafted, kept, rate] = settled();
    assert!(drafted > 0.0 && kept > 0.0 && kept <= drafted, "drafted {drafted}, kept {kept}");
    assert!((rate - kept / drafted).abs() < 1e-9);
    // Off for one request, as an object and as llama.cpp's flat key: same answer, no drafts.
    for off in [json!({"speculative": {"n_max": 0}}), json!({"speculative.n_max": 0})] {
        let (st, r) = post(&url, "/v1/chat/completions", &body(off));
        assert_eq!(st, 200, "{r}");
        assert_eq!(content(&r), content(&want));
        assert_eq!(settled()[0], drafted);
    }
    for (bad, field) in
        [(json!({"speculative": {"n_max": 1000}}), "speculative.n_max"), (json!({"speculative.n_min": -1}), "speculative.n_min")]
    {
        let (st, r) = post(&url, "/v1/chat/completions", &body(bad));
        assert_eq!(st, 400, "{r}");
        assert_eq!(r["error"]["param"], field, "{r}");
    }
}

/// `/v1/responses`: the response object with the same text as chat completions, `incomplete` at
/// `max_output_tokens`, the typed stream in order with the same text, and errors naming the field.
#[test]
fn openai_responses() {
    let Some(url) = shared() else { return };
    let q = "What is the capital of France?";
    let (st, chat) =
        post(url, "/v1/chat/completions", &json!({"messages": [{"role": "user", "content": q}], "temperature": 0, "max_tokens": 5}));
    assert_eq!(st, 200, "{chat}");
    let body = json!({"input": q, "temperature": 0, "max_output_tokens": 5});
    let (st, r) = post(url, "/v1/responses", &body);
    assert_eq!(st, 200, "{r}");
    assert_eq!(r["object"], "response");
    assert_eq!(r["status"], "incomplete");
    assert_eq!(r["incomplete_details"]["reason"], "max_output_tokens");
    assert_eq!(r["output"][0]["type"], "message");
    let text = r["output"][0]["content"][0]["text"].as_str().unwrap();
    assert_eq!(text, chat["choices"][0]["message"]["content"].as_str().unwrap());
    assert_eq!(r["usage"]["output_tokens"], 5);
    assert_eq!(r["usage"]["input_tokens"], chat["usage"]["prompt_tokens"]);
    let (_, whole) = post(url, "/v1/responses", &json!({"input": q, "temperature": 0, "max_output_tokens": 40}));
    assert_eq!(whole["status"], "completed", "{whole}");
    let mut sbody = body.clone();
    sbody["stream"] = json!(true);
    let raw = client().post(format!("{url}/v1/responses")).json(&sbody).send().unwrap().text().unwrap();
    let mut kinds: Vec<String> = Vec::new();
    let mut streamed = String::new();
    for (i, e) in raw.split("\n\n").filter(|e| !e.trim().is_empty()).enumerate() {
        let name = e.lines().find_map(|l| l.strip_prefix("event: ")).expect("named event");
        let data: Value = serde_json::from_str(e.lines().find_map(|l| l.strip_prefix("data: ")).expect("data")).unwrap();
        assert_eq!(data["type"], name);
        assert_eq!(data["sequence_number"], i, "events are numbered in order");
        if name == "response.output_text.delta" {
            streamed.push_str(data["delta"].as_str().unwrap());
        }
        if name == "response.incomplete" {
            assert_eq!(data["response"]["output"][0]["content"][0]["text"], text);
        }
        if kinds.last().map(String::as_str) != Some(name) {
            kinds.push(name.to_string());
        }
    }
    assert_eq!(
        kinds,
        [
            "response.created",
            "response.in_progress",
            "response.output_item.added",
            "response.content_part.added",
            "response.output_text.delta",
            "response.output_text.done",
            "response.content_part.done",
            "response.output_item.done",
            "response.incomplete"
        ]
    );
    assert_eq!(streamed, text);
    for (bad, field) in [
        (json!({"input": "hi", "max_output_tokens": 0}), "max_output_tokens"),
        (json!({"input": [{"role": "user", "content": [{"type": "input_image"}]}]}), "input[0].content[0].type"),
        (json!({"input": "hi", "text": {"format": {"type": "json_schema", "schema": {"type": "banana"}}}}), "text.format.schema"),
    ] {
        let (st, e) = post(url, "/v1/responses", &bad);
        assert_eq!(st, 400, "{e}");
        assert_eq!(e["error"]["param"], field, "{e}");
    }
}

/// `/v1/embeddings`: one vector per input (texts or token ids, batched = alone), unit length,
/// base64 = float, `dimensions` cut and renormalized, usage, and errors naming the field.
#[test]
fn embeddings_endpoint() {
    let Some(url) = shared() else { return };
    let texts = ["The cat sat on the mat.", "A kitten rested on the rug.", "Quarterly revenue grew 8%."];
    let (st, r) = post(url, "/v1/embeddings", &json!({"input": texts}));
    assert_eq!(st, 200, "{r}");
    assert_eq!(r["object"], "list");
    let vecs: Vec<Vec<f64>> =
        r["data"].as_array().unwrap().iter().map(|d| serde_json::from_value(d["embedding"].clone()).unwrap()).collect();
    assert_eq!(vecs.len(), 3);
    assert!(r["data"].as_array().unwrap().iter().enumerate().all(|(i, d)| d["index"] == i && d["object"] == "embedding"));
    let dot = |a: &[f64], b: &[f64]| a.iter().zip(b).map(|(x, y)| x * y).sum::<f64>();
    for v in &vecs {
        assert_eq!(v.len(), 576);
        assert!((dot(v, v) - 1.0).abs() < 1e-5);
    }
    assert!(dot(&vecs[0], &vecs[1]) > dot(&vecs[0], &vecs[2]), "the two cat sentences are closer");
    // Alone, as token ids, and as base64: the same vector.
    let (_, alone) = post(url, "/v1/embeddings", &json!({"input": texts[1], "encoding_format": "float"}));
    let a: Vec<f64> = serde_json::from_value(alone["data"][0]["embedding"].clone()).unwrap();
    assert!(a.iter().zip(&vecs[1]).all(|(x, y)| (x - y).abs() < 1e-4));
    let (_, tok) = post(url, "/tokenize", &json!({"content": texts[1]}));
    let (_, by_ids) = post(url, "/v1/embeddings", &json!({"input": [tok["tokens"]]}));
    assert_eq!(by_ids["usage"]["prompt_tokens"], tok["count"]);
    let (_, b64) = post(url, "/v1/embeddings", &json!({"input": texts[1], "encoding_format": "base64"}));
    let s = b64["data"][0]["embedding"].as_str().unwrap();
    let bytes = {
        let val = |c: u8| "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/".bytes().position(|x| x == c).unwrap() as u32;
        let mut out = Vec::new();
        for q in s.as_bytes().chunks(4) {
            let n = q.iter().filter(|&&c| c != b'=').fold(0u32, |n, &c| n << 6 | val(c)) << (6 * q.iter().filter(|&&c| c == b'=').count());
            let keep = 3 - q.iter().filter(|&&c| c == b'=').count();
            out.extend_from_slice(&n.to_be_bytes()[1..1 + keep]);
        }
        out
    };
    let decoded: Vec<f32> = bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
    assert_eq!(decoded.len(), 576);
    assert!(decoded.iter().zip(&a).all(|(x, y)| (*x as f64 - y).abs() < 1e-6));
    let (_, short) = post(url, "/v1/embeddings", &json!({"input": texts[0], "dimensions": 64}));
    let sv: Vec<f64> = serde_json::from_value(short["data"][0]["embedding"].clone()).unwrap();
    assert_eq!(sv.len(), 64);
    assert!((dot(&sv, &sv) - 1.0).abs() < 1e-5);
    assert_eq!(r["usage"]["prompt_tokens"], r["usage"]["total_tokens"]);
    // A decoder cannot rerank.
    let (st, e) = post(url, "/v1/rerank", &json!({"query": "q", "documents": ["d"]}));
    assert_eq!((st, e["error"]["param"].as_str()), (400, Some("model")), "{e}");
    for (bad, field) in [
        (json!({}), "input"),
        (json!({"input": []}), "input"),
        (json!({"input": "x", "encoding_format": "hex"}), "encoding_format"),
        (json!({"input": "x", "dimensions": 100000}), "dimensions"),
        (json!({"input": [[1, 2], "x"]}), "input[1]"),
        (json!({"input": [[]]}), "input[0]"),
        (json!({"input": [[99999999]]}), "input"),
    ] {
        let (st, e) = post(url, "/v1/embeddings", &bad);
        assert_eq!(st, 400, "{bad}: {e}");
        assert_eq!(e["error"]["param"], field, "{bad}: {e}");
    }
}

/// An encoder served on its own (`infer serve tests/fixtures/tiny-bert`): `/v1/embeddings` gives
/// sentence-transformers' vectors, `/v1/models` lists it, the generation endpoints answer 400.
#[test]
fn an_encoder_serves_embeddings_only() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/tiny-bert");
    let want: Value = serde_json::from_str(&std::fs::read_to_string(dir.join("expected.json")).unwrap()).unwrap();
    let cfg = ServerConfig { served_model_name: Some("tiny-bert".into()), ..config() };
    let d = dir.clone();
    let s = BackgroundServer::start(cfg, move || {
        Ok(infer_server::Loaded::Encoder(Box::new(infer_core::encoder::Encoder::load(&d, &infer_core::Device::Cpu)?)))
    })
    .unwrap();
    let url = s.url();
    wait_ready(&url);
    let (st, r) = post(&url, "/v1/embeddings", &json!({"input": want["texts"], "model": "tiny-bert"}));
    assert_eq!(st, 200, "{r}");
    for (i, d) in r["data"].as_array().unwrap().iter().enumerate() {
        let g: Vec<f64> = serde_json::from_value(d["embedding"].clone()).unwrap();
        let w: Vec<f64> = serde_json::from_value(want["mean"][i].clone()).unwrap();
        let cos: f64 = g.iter().zip(&w).map(|(a, b)| a * b).sum();
        assert!(cos >= 0.9999, "text {i}: cosine {cos}");
    }
    let models = client().get(format!("{url}/v1/models")).send().unwrap().json::<Value>().unwrap();
    assert_eq!(models["data"][0]["id"], "tiny-bert");
    for path in ["/v1/chat/completions", "/v1/messages", "/v1/responses"] {
        let body = json!({"messages": [{"role": "user", "content": "hi"}], "input": "hi", "max_tokens": 4});
        let (st, e) = post(&url, path, &body);
        assert_eq!(st, 400, "{path}: {e}");
    }
    let (st, e) = post(&url, "/v1/completions", &json!({"prompt": "hi"}));
    assert_eq!(st, 400, "{e}");
    assert!(e["error"]["message"].as_str().unwrap().contains("/v1/embeddings"), "{e}");
    // An embedding encoder is no reranker.
    let (st, e) = post(&url, "/v1/rerank", &json!({"query": "q", "documents": ["d"]}));
    assert_eq!((st, e["error"]["param"].as_str()), (400, Some("model")), "{e}");
    assert!(e["error"]["message"].as_str().unwrap().contains("cannot rerank"), "{e}");
    s.stop().unwrap();
}

/// A cross-encoder served on its own (`infer serve tests/fixtures/tiny-cross-encoder`):
/// `/v1/rerank` (and its aliases) gives sentence-transformers' CrossEncoder scores in its rank
/// order, `top_n` and `return_documents` shape the results, bad fields get 400s naming them,
/// embeddings and generation are refused, the API key applies.
#[test]
fn a_cross_encoder_serves_rerank() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/tiny-cross-encoder");
    let want: Value = serde_json::from_str(&std::fs::read_to_string(dir.join("expected.json")).unwrap()).unwrap();
    let cfg = ServerConfig { served_model_name: Some("tiny-ce".into()), api_key: Some("k3y".into()), ..config() };
    let d = dir.clone();
    let s = BackgroundServer::start(cfg, move || {
        Ok(infer_server::Loaded::Encoder(Box::new(infer_core::encoder::Encoder::load(&d, &infer_core::Device::Cpu)?)))
    })
    .unwrap();
    let url = s.url();
    wait_ready(&url);
    let call = |path: &str, body: &Value| -> (u16, Value) {
        let r = client().post(format!("{url}{path}")).bearer_auth("k3y").json(body).send().unwrap();
        (r.status().as_u16(), r.json().unwrap())
    };
    let docs = want["documents"].as_array().unwrap().clone();
    let scores: Vec<f64> = serde_json::from_value(want["scores"].clone()).unwrap();
    let rank: Vec<usize> = serde_json::from_value(want["rerank"].clone()).unwrap();
    let body = json!({"model": "tiny-ce", "query": want["query"], "documents": docs});
    let (st, r) = call("/v1/rerank", &body);
    assert_eq!(st, 200, "{r}");
    assert_eq!(r["model"], "tiny-ce");
    assert!(r["id"].as_str().unwrap().starts_with("rerank-"), "{r}");
    let results = r["results"].as_array().unwrap();
    assert_eq!(results.len(), docs.len());
    let got_rank: Vec<usize> = results.iter().map(|x| x["index"].as_u64().unwrap() as usize).collect();
    assert_eq!(got_rank, rank, "{r}");
    for x in results {
        let i = x["index"].as_u64().unwrap() as usize;
        let score = x["relevance_score"].as_f64().unwrap();
        assert!((score - scores[i]).abs() <= 1e-4, "document {i}: {score} vs {}", scores[i]);
        assert_eq!(x["document"]["text"], docs[i], "{x}");
    }
    let total = r["usage"]["total_tokens"].as_u64().unwrap();
    let ids = want["input_ids"].as_array().unwrap();
    assert_eq!(total, ids[..docs.len()].iter().map(|l| l.as_array().unwrap().len() as u64).sum::<u64>(), "{r}");
    assert_eq!(r["usage"]["prompt_tokens"], total);
    // top_n, return_documents, object documents and the aliases.
    let objects: Vec<Value> = docs.iter().map(|d| json!({"text": d})).collect();
    for path in ["/rerank", "/v1/reranking"] {
        let (st, r) = call(path, &json!({"query": want["query"], "documents": objects, "top_n": 2, "return_documents": false}));
        assert_eq!(st, 200, "{path}: {r}");
        let results = r["results"].as_array().unwrap();
        assert_eq!(results.len(), 2, "{r}");
        assert_eq!(results[0]["index"], rank[0]);
        assert_eq!(results[1]["index"], rank[1]);
        assert!(results[0].get("document").is_none(), "{r}");
    }
    let (_, r) = call("/v1/rerank", &json!({"query": want["query"], "documents": docs, "top_n": 100}));
    assert_eq!(r["results"].as_array().unwrap().len(), docs.len());
    // max_tokens_per_doc cuts every document: fewer tokens.
    let (st, r) = call("/v1/rerank", &json!({"query": want["query"], "documents": docs, "max_tokens_per_doc": 2}));
    assert_eq!(st, 200, "{r}");
    assert!(r["usage"]["total_tokens"].as_u64().unwrap() < total, "{r}");
    // Bad requests name their field.
    let many: Vec<&str> = vec!["x"; 1001];
    let long_query = docs[5].as_str().unwrap();
    for (bad, field) in [
        (json!({"documents": ["a"]}), "query"),
        (json!({"query": "", "documents": ["a"]}), "query"),
        (json!({"query": 3, "documents": ["a"]}), "query"),
        (json!({"query": long_query, "documents": ["a"]}), "query"),
        (json!({"query": "q"}), "documents"),
        (json!({"query": "q", "documents": []}), "documents"),
        (json!({"query": "q", "documents": "a"}), "documents"),
        (json!({"query": "q", "documents": many}), "documents"),
        (json!({"query": "q", "documents": ["a", 7]}), "documents[1]"),
        (json!({"query": "q", "documents": ["a", ""]}), "documents[1]"),
        (json!({"query": "q", "documents": [{"txt": "a"}]}), "documents[0]"),
        (json!({"query": "q", "documents": ["a"], "top_n": -1}), "top_n"),
        (json!({"query": "q", "documents": ["a"], "top_n": "2"}), "top_n"),
        (json!({"query": "q", "documents": ["a"], "return_documents": "yes"}), "return_documents"),
        (json!({"query": "q", "documents": ["a"], "max_tokens_per_doc": 0}), "max_tokens_per_doc"),
    ] {
        let (st, e) = call("/v1/rerank", &bad);
        assert_eq!(st, 400, "{bad}: {e}");
        assert_eq!(e["error"]["param"], field, "{bad}: {e}");
    }
    let (st, e) = call("/v1/rerank", &json!({"model": "other", "query": "q", "documents": ["a"]}));
    assert_eq!(st, 404, "{e}");
    // The API key applies; embeddings and generation are refused.
    let (st, _) = post(&url, "/v1/rerank", &body);
    assert_eq!(st, 401);
    let (st, e) = call("/v1/embeddings", &json!({"input": "hi"}));
    assert_eq!((st, e["error"]["param"].as_str()), (400, Some("model")), "{e}");
    assert!(e["error"]["message"].as_str().unwrap().contains("/v1/rerank"), "{e}");
    let (st, e) = call("/v1/completions", &json!({"prompt": "hi"}));
    assert_eq!(st, 400, "{e}");
    assert!(e["error"]["message"].as_str().unwrap().contains("/v1/rerank"), "{e}");
    s.stop().unwrap();
}

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures").join(name)
}

/// The tiny decoder fixture and the tiny BERT encoder, as `llama` and `bert`; `loads` counts the
/// decoder's loads and `delay` slows each one down.
fn two_models(loads: Arc<std::sync::atomic::AtomicUsize>, delay: Duration) -> Vec<infer_server::ModelSpec> {
    let llama = fixture("tiny-llama");
    let bert = fixture("tiny-bert");
    vec![
        infer_server::ModelSpec::new("llama", move || {
            loads.fetch_add(1, Ordering::SeqCst);
            std::thread::sleep(delay);
            infer_core::load(llama.to_str().unwrap(), LoadOptions::default())
        }),
        infer_server::ModelSpec::new("bert", move || {
            Ok(infer_server::Loaded::Encoder(Box::new(infer_core::encoder::Encoder::load(&bert, &infer_core::Device::Cpu)?)))
        }),
    ]
}

fn multi_config() -> ServerConfig {
    ServerConfig {
        engine: EngineConfig { max_context: Some(256), max_seqs: 8, ..Default::default() },
        keep_alive: None,
        ..Default::default()
    }
}

/// `/v1/models`' state of each model, by id.
fn states(url: &str) -> std::collections::HashMap<String, String> {
    let m = client().get(format!("{url}/v1/models")).send().unwrap().json::<Value>().unwrap();
    m["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| (c["id"].as_str().unwrap().to_string(), c["status"]["value"].as_str().unwrap().to_string()))
        .collect()
}

fn state_of(url: &str, id: &str) -> String {
    states(url)[id].clone()
}

fn complete(url: &str, model: &str) -> (u16, Value) {
    post(url, "/v1/completions", &json!({"model": model, "prompt": "hello", "max_tokens": 3, "temperature": 0}))
}

fn embed(url: &str, model: &str) -> (u16, Value) {
    post(url, "/v1/embeddings", &json!({"model": model, "input": "hello world"}))
}

/// A chat model and an embedding model served side by side: each request goes to its `model`,
/// models load at their first request (`/v1/models` says so), bad or missing names are refused.
#[test]
fn several_models_are_routed_by_model_and_load_on_first_use() {
    let loads = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let s = BackgroundServer::start_models(multi_config(), two_models(loads.clone(), Duration::ZERO)).unwrap();
    let url = s.url();
    // Ready as soon as it listens: nothing is loaded yet.
    assert_eq!(client().get(format!("{url}/health")).send().unwrap().status().as_u16(), 200);
    assert_eq!(states(&url), [("llama".into(), "unloaded".into()), ("bert".into(), "unloaded".into())].into());
    let (st, r) = complete(&url, "llama");
    assert_eq!(st, 200, "{r}");
    assert_eq!(r["model"], "llama");
    assert_eq!(r["usage"]["completion_tokens"], 3);
    assert_eq!((state_of(&url, "llama").as_str(), state_of(&url, "bert").as_str()), ("loaded", "unloaded"));
    let (st, r) = embed(&url, "bert");
    assert_eq!(st, 200, "{r}");
    assert_eq!(r["model"], "bert");
    let want: Value = serde_json::from_str(&std::fs::read_to_string(fixture("tiny-bert").join("expected.json")).unwrap()).unwrap();
    let (st, r) = post(&url, "/v1/embeddings", &json!({"model": "bert", "input": want["texts"][0]}));
    assert_eq!(st, 200, "{r}");
    let g: Vec<f64> = serde_json::from_value(r["data"][0]["embedding"].clone()).unwrap();
    let w: Vec<f64> = serde_json::from_value(want["mean"][0].clone()).unwrap();
    assert!(g.iter().zip(&w).map(|(a, b)| a * b).sum::<f64>() >= 0.9999);
    assert_eq!((state_of(&url, "llama").as_str(), state_of(&url, "bert").as_str()), ("loaded", "loaded"));
    // Both stay loaded and serve again without reloading.
    assert_eq!(complete(&url, "llama").0, 200);
    assert_eq!(loads.load(Ordering::SeqCst), 1);
    let one = client().get(format!("{url}/v1/models/bert")).send().unwrap().json::<Value>().unwrap();
    assert_eq!((one["id"].as_str(), one["status"]["value"].as_str()), (Some("bert"), Some("loaded")), "{one}");
    assert_eq!(client().get(format!("{url}/v1/models/nope")).send().unwrap().status().as_u16(), 404);
    // No `model`: a 400 naming it (and the models); an unknown one: 404 model_not_found.
    let (st, e) = post(&url, "/v1/completions", &json!({"prompt": "hi"}));
    assert_eq!((st, e["error"]["param"].as_str()), (400, Some("model")), "{e}");
    assert!(e["error"]["message"].as_str().unwrap().contains("`llama`, `bert`"), "{e}");
    let (st, e) = embed(&url, "gpt-4o");
    assert_eq!((st, e["error"]["code"].as_str(), e["error"]["param"].as_str()), (404, Some("model_not_found"), Some("model")), "{e}");
    assert!(e["error"]["message"].as_str().unwrap().contains("gpt-4o"), "{e}");
    // Anthropic's error shape for its endpoint.
    let (st, e) = post(&url, "/v1/messages", &json!({"model": "nope", "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}]}));
    assert_eq!((st, e["type"].as_str()), (404, Some("error")), "{e}");
    // A model that cannot serve the endpoint: a 400 naming `model`.
    let (st, e) = post(&url, "/v1/chat/completions", &json!({"model": "bert", "messages": [{"role": "user", "content": "hi"}]}));
    assert_eq!((st, e["error"]["param"].as_str()), (400, Some("model")), "{e}");
    let (st, e) = post(&url, "/v1/rerank", &json!({"model": "llama", "query": "q", "documents": ["d"]}));
    assert_eq!((st, e["error"]["param"].as_str()), (400, Some("model")), "{e}");
    // Tokenizer endpoints route too.
    let (st, t) = post(&url, "/tokenize", &json!({"model": "llama", "content": "hello"}));
    assert_eq!(st, 200, "{t}");
    let (st, d) = post(&url, "/detokenize", &json!({"model": "llama", "tokens": t["tokens"]}));
    assert_eq!(st, 200, "{d}");
    assert!(d["content"].as_str().unwrap().contains("hello"), "{d}");
    s.stop().unwrap();
}

/// `models_max: 1`: loading one model unloads the least recently used idle one; it loads again
/// when asked for.
#[test]
fn models_max_unloads_the_least_recently_used() {
    let loads = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let cfg = ServerConfig { models_max: 1, ..multi_config() };
    let s = BackgroundServer::start_models(cfg, two_models(loads.clone(), Duration::ZERO)).unwrap();
    let url = s.url();
    assert_eq!(complete(&url, "llama").0, 200);
    assert_eq!(state_of(&url, "llama"), "loaded");
    assert_eq!(embed(&url, "bert").0, 200);
    assert_eq!((state_of(&url, "llama").as_str(), state_of(&url, "bert").as_str()), ("unloaded", "loaded"));
    let (st, r) = complete(&url, "llama");
    assert_eq!(st, 200, "{r}");
    assert_eq!((state_of(&url, "llama").as_str(), state_of(&url, "bert").as_str()), ("loaded", "unloaded"));
    assert_eq!(loads.load(Ordering::SeqCst), 2);
    s.stop().unwrap();
}

/// A model idle for `keep_alive` is unloaded, and loads again at the next request.
#[test]
fn keep_alive_unloads_idle_models() {
    let loads = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let cfg = ServerConfig { keep_alive: Some(Duration::from_millis(400)), ..multi_config() };
    let s = BackgroundServer::start_models(cfg, two_models(loads.clone(), Duration::ZERO)).unwrap();
    let url = s.url();
    assert_eq!(complete(&url, "llama").0, 200);
    let done = Instant::now();
    assert_eq!(state_of(&url, "llama"), "loaded");
    while state_of(&url, "llama") != "unloaded" {
        assert!(done.elapsed() < Duration::from_secs(10), "never unloaded");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(done.elapsed() >= Duration::from_millis(350), "unloaded after {:?}", done.elapsed());
    assert_eq!(complete(&url, "llama").0, 200);
    assert_eq!(loads.load(Ordering::SeqCst), 2);
    s.stop().unwrap();
}

/// Requests for a model that is loading wait for it (one load for all); past `load_timeout` they
/// get 503, and a model that fails to load says why.
#[test]
fn requests_for_a_loading_model_wait() {
    let loads = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let s = BackgroundServer::start_models(multi_config(), two_models(loads.clone(), Duration::from_millis(800))).unwrap();
    let url = s.url();
    let handles: Vec<_> = (0..6)
        .map(|_| {
            let url = url.clone();
            std::thread::spawn(move || complete(&url, "llama"))
        })
        .collect();
    let t = Instant::now();
    while state_of(&url, "llama") != "loading" {
        assert!(t.elapsed() < Duration::from_secs(5), "never loading");
        std::thread::sleep(Duration::from_millis(10));
    }
    for h in handles {
        let (st, r) = h.join().unwrap();
        assert_eq!(st, 200, "{r}");
    }
    assert_eq!(loads.load(Ordering::SeqCst), 1);
    s.stop().unwrap();

    let cfg = ServerConfig { load_timeout: Duration::from_millis(200), ..multi_config() };
    let mut specs = two_models(loads.clone(), Duration::from_millis(1500));
    specs.push(infer_server::ModelSpec::new("broken", || -> infer_core::Result<infer_core::LoadedModel> {
        Err(infer_core::Error::Model("no such weights".into()))
    }));
    let s = BackgroundServer::start_models(cfg, specs).unwrap();
    let url = s.url();
    let (st, e) = complete(&url, "llama");
    assert_eq!(st, 503, "{e}");
    assert!(e["error"]["message"].as_str().unwrap().contains("--load-timeout"), "{e}");
    let (st, e) = complete(&url, "broken");
    assert_eq!(st, 503, "{e}");
    assert!(e["error"]["message"].as_str().unwrap().contains("no such weights"), "{e}");
    assert_eq!(state_of(&url, "broken"), "unloaded");
    s.stop().unwrap();
}

/// `models_mem`: models whose sizes together pass it are not loaded at once; the least recently
/// used idle one makes room.
#[test]
fn models_mem_unloads_to_make_room() {
    let loads = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let specs: Vec<_> = two_models(loads.clone(), Duration::ZERO).into_iter().map(|s| s.with_size(60 << 20)).collect();
    let cfg = ServerConfig { models_mem: Some(100 << 20), ..multi_config() };
    let s = BackgroundServer::start_models(cfg, specs).unwrap();
    let url = s.url();
    assert_eq!(complete(&url, "llama").0, 200);
    assert_eq!(embed(&url, "bert").0, 200);
    assert_eq!((state_of(&url, "llama").as_str(), state_of(&url, "bert").as_str()), ("unloaded", "loaded"));
    assert_eq!(complete(&url, "llama").0, 200);
    assert_eq!((state_of(&url, "llama").as_str(), state_of(&url, "bert").as_str()), ("loaded", "unloaded"));
    s.stop().unwrap();
    // Room for both: both stay.
    let specs: Vec<_> = two_models(loads, Duration::ZERO).into_iter().map(|s| s.with_size(40 << 20)).collect();
    let s = BackgroundServer::start_models(ServerConfig { models_mem: Some(100 << 20), ..multi_config() }, specs).unwrap();
    let url = s.url();
    assert_eq!(complete(&url, "llama").0, 200);
    assert_eq!(embed(&url, "bert").0, 200);
    assert_eq!((state_of(&url, "llama").as_str(), state_of(&url, "bert").as_str()), ("loaded", "loaded"));
    s.stop().unwrap();
}

/// Each model has its own `max_seqs + max_queue`: a full model answers 429 while another serves.
#[test]
fn each_model_has_its_own_queue() {
    let Some(path) = model_path() else { return };
    let spec = |name: &str| {
        let p = path.clone();
        infer_server::ModelSpec::new(name, move || infer_core::load(p.to_str().unwrap(), LoadOptions::default()))
    };
    let cfg = ServerConfig {
        engine: EngineConfig { max_context: Some(2048), max_seqs: 1, ..Default::default() },
        max_queue: 0,
        keep_alive: None,
        ..Default::default()
    };
    let s = BackgroundServer::start_models(cfg, vec![spec("a"), spec("b")]).unwrap();
    let url = s.url();
    let body =
        json!({"model": "a", "prompt": "Once upon a time", "max_tokens": 1500, "ignore_eos": true, "stream": true, "temperature": 0});
    let mut stream = client().post(format!("{url}/v1/completions")).json(&body).send().unwrap();
    assert_eq!(stream.status().as_u16(), 200);
    assert!(stream.read(&mut [0u8; 64]).unwrap() > 0);
    let (st, e) = post(&url, "/v1/completions", &json!({"model": "a", "prompt": "hi", "max_tokens": 2}));
    assert_eq!((st, e["error"]["code"].as_str()), (429, Some("rate_limit_exceeded")), "{e}");
    let (st, r) = post(&url, "/v1/completions", &json!({"model": "b", "prompt": "hi", "max_tokens": 2}));
    assert_eq!(st, 200, "{r}");
    drop(stream);
    let t = Instant::now();
    while post(&url, "/v1/completions", &json!({"model": "a", "prompt": "hi", "max_tokens": 2})).0 != 200 {
        assert!(t.elapsed() < Duration::from_secs(10), "the slot was never freed");
        std::thread::sleep(Duration::from_millis(20));
    }
    s.stop().unwrap();
}

/// A model larger than the memory the system has left unloads the idle ones first (and then loads
/// alone).
#[test]
fn a_model_larger_than_free_memory_loads_alone() {
    let loads = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let specs: Vec<_> = two_models(loads, Duration::ZERO).into_iter().map(|s| s.with_size(1 << 60)).collect();
    let s = BackgroundServer::start_models(multi_config(), specs).unwrap();
    let url = s.url();
    assert_eq!(complete(&url, "llama").0, 200);
    assert_eq!(embed(&url, "bert").0, 200);
    assert_eq!((state_of(&url, "llama").as_str(), state_of(&url, "bert").as_str()), ("unloaded", "loaded"));
    s.stop().unwrap();
}

/// A Prometheus sample's value: `name{labels} value` (labels as written, or none).
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|l| l.strip_prefix(series).and_then(|v| v.strip_prefix(' ')).and_then(|v| v.trim().parse().ok()))
}

/// `/metrics` with several models: each engine's gauges under its `model` label, the unlabeled
/// gauges their sum (not the last engine that stepped), `infer_model_loaded` per model; an
/// unloaded model's share leaves the sums and its labeled series go.
#[test]
fn metrics_are_per_model_and_sum_over_models() {
    let llama = fixture("tiny-llama");
    let spec = |name: &str| {
        let llama = llama.clone();
        infer_server::ModelSpec::new(name, move || infer_core::load(llama.to_str().unwrap(), LoadOptions::default()))
    };
    let cfg = ServerConfig { keep_alive: Some(Duration::from_millis(1500)), ..multi_config() };
    let s = BackgroundServer::start_models(cfg, vec![spec("a"), spec("b")]).unwrap();
    let url = s.url();
    let metrics = || client().get(format!("{url}/metrics")).send().unwrap().text().unwrap();
    let m = metrics();
    assert_eq!((sample(&m, r#"infer_model_loaded{model="a"}"#), sample(&m, r#"infer_model_loaded{model="b"}"#)), (Some(0.0), Some(0.0)));
    assert_eq!(sample(&m, "infer_kv_blocks_total"), Some(0.0), "{m}");
    assert_eq!(complete(&url, "a").0, 200);
    assert_eq!(complete(&url, "b").0, 200);
    // The engine updates its gauges after the step that sent the last token (after the response):
    // wait until both are idle.
    let t = Instant::now();
    let (m, a, b) = loop {
        let m = metrics();
        let a = sample(&m, r#"infer_model_kv_blocks_total{model="a"}"#).expect("a's blocks");
        let b = sample(&m, r#"infer_model_kv_blocks_total{model="b"}"#).expect("b's blocks");
        if sample(&m, "infer_kv_blocks_free") == Some(a + b) {
            break (m, a, b);
        }
        assert!(t.elapsed() < Duration::from_secs(10), "never idle: {m}");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(a > 0.0 && b > 0.0, "{m}");
    assert_eq!(sample(&m, "infer_kv_blocks_total"), Some(a + b), "{m}");
    assert_eq!(sample(&m, r#"infer_model_running_sequences{model="a"}"#), Some(0.0));
    assert_eq!(sample(&m, r#"infer_model_loaded{model="b"}"#), Some(1.0));
    // Unloaded after the keep-alive: the sums drop to nothing and the labeled series go.
    let t = Instant::now();
    loop {
        let m = metrics();
        if sample(&m, "infer_kv_blocks_total") == Some(0.0) && sample(&m, r#"infer_model_kv_blocks_total{model="a"}"#).is_none() {
            assert_eq!(sample(&m, r#"infer_model_loaded{model="a"}"#), Some(0.0), "{m}");
            assert!(sample(&m, r#"infer_model_kv_blocks_total{model="b"}"#).is_none(), "{m}");
            break;
        }
        assert!(t.elapsed() < Duration::from_secs(20), "never unloaded: {m}");
        std::thread::sleep(Duration::from_millis(50));
    }
    s.stop().unwrap();
}
