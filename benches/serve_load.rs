//! Load benchmark of `infer serve`: N concurrent chat clients (closed loop, streaming) with realistic
//! prompt and answer lengths against an in-process server on the SmolLM2-135M-Instruct Q4_1 GGUF.
//! Reports TTFT, TPOT and ITL (p50/p99) and output tokens/s for N = 1, 4, 16, 64, then the gain of
//! prefix caching (a shared system prompt, cache on vs off).
//!
//!   cargo bench --bench serve_load -- [--model PATH] [--clients 1,4,16,64] [--threads N] [--json FILE]
//!
//! Soak (`--minutes M`, with `--chaos` the hostile mix of issue 18): after a warm-up that uses every KV
//! block once, for M minutes (fractions allowed) 64 streaming chat clients in a closed loop (429s are
//! retried after Retry-After); with `--chaos` about 10% of their requests drop the stream after a few
//! chunks, 3 stalled readers send a long streaming request and never read (their socket's receive
//! buffer kept small; each reconnects after the server's write timeout + 30 s or more, and the last
//! ones, opened at least the write timeout + 20 s before the end, stay open through the final checks), and malformed and oversized requests (bad JSON, wrong types, invalid
//! constraints, non-UTF-8, wrong content types, bodies over the limit, prompts over the context...) go
//! out every ~100 ms, each checked for its documented status. At the end every client drops what it
//! is waiting for. The process RSS is sampled every 2 s. It passes when: no unexpected status or
//! transport error (429 when the server is full is designed, 413 for oversized bodies); every completed
//! stream has all its tokens and `[DONE]`; no request waits 120 s; the server counts no 5xx; at the end
//! (stalled readers still connected) `/metrics` shows 0 running and queued sequences and 0 KV blocks in
//! use, and every admission slot is free again (`--max-seqs + --max-queue` streaming requests are all
//! admitted at once); RSS at the end is at most 10% above its value at minute 5 (at 1/6 of the run when
//! shorter than 30 minutes); the server then stops within its shutdown grace + 10 s. Exits 1 on any
//! failed criterion.
//!
//!   cargo bench --bench serve_load -- --chaos --minutes 30 [--clients 64] [--stalled 3] [--write-timeout 10]
//!       [--grace SECS] [--json FILE]
//!   cargo test --release --workspace --bench serve_load -- --chaos --minutes 1     (the test build's binary)
//!
//! Under `cargo test` (no `--bench`, `--minutes` or `--chaos` argument) it runs one tiny round as a smoke test.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use infer::{EngineConfig, LoadOptions};
use infer_server::{BackgroundServer, ServerConfig};
use serde_json::{json, Value};

const SYSTEM: &str = "You are a friendly and knowledgeable assistant working for a travel agency. You answer questions \
about destinations, transport, food, weather and local customs. Keep answers practical and honest, mention costs \
when you know them, suggest one or two concrete places, and say clearly when you are unsure about a detail. Never \
invent opening hours or prices. If the traveller has children, elderly companions or a tight budget, adapt the advice.";

const TOPICS: &[&str] = &[
    "a weekend in Lisbon with two children",
    "the cheapest way to travel from Paris to Berlin",
    "what to eat in Naples",
    "whether March is a good month for Iceland",
    "hiking near Innsbruck for beginners",
    "a rainy day in Amsterdam",
    "local customs to know before visiting Japan",
    "a budget itinerary for three days in Prague, with museums, a river walk and a cheap but good dinner",
    "night trains in Europe",
    "a quiet beach in Greece in August that is reachable by public transport from Athens",
];

#[derive(Clone, Copy)]
struct Workload {
    /// Each client sends this many requests one after another.
    requests_per_client: usize,
    /// Answer lengths cycle through these (tokens; generation ignores end-of-sequence).
    answer_tokens: &'static [usize],
    shared_system: bool,
}

#[derive(Default)]
struct Sample {
    ttft: f64,
    tpot: Option<f64>,
    itl: Vec<f64>,
    output_tokens: usize,
}

fn pct(v: &mut [f64], p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    v[((v.len() - 1) as f64 * p).round() as usize]
}

async fn one_request(client: &reqwest::Client, url: &str, i: usize, w: Workload) -> Sample {
    let topic = TOPICS[i % TOPICS.len()];
    let mut messages = Vec::new();
    if w.shared_system {
        messages.push(json!({"role": "system", "content": SYSTEM}));
    }
    messages.push(json!({"role": "user", "content": format!("Request {i}: please give me advice about {topic}.")}));
    let body = json!({
        "messages": messages,
        "max_tokens": w.answer_tokens[i % w.answer_tokens.len()],
        "ignore_eos": true,
        "temperature": 0.7,
        "seed": i,
        "stream": true,
        "stream_options": {"include_usage": true},
    });
    let t0 = Instant::now();
    let resp = client.post(format!("{url}/v1/chat/completions")).json(&body).send().await.expect("request sent");
    assert_eq!(resp.status().as_u16(), 200, "server refused a benchmark request");
    let mut stream = resp.bytes_stream();
    let mut buf = String::new();
    let mut s = Sample::default();
    let mut first: Option<Instant> = None;
    let mut last: Option<Instant> = None;
    while let Some(chunk) = stream.next().await {
        buf.push_str(&String::from_utf8_lossy(&chunk.expect("stream chunk")));
        while let Some(end) = buf.find("\n\n") {
            let event: String = buf.drain(..end + 2).collect();
            let Some(data) = event.trim().strip_prefix("data: ") else {
                continue;
            };
            if data == "[DONE]" {
                continue;
            }
            let v: Value = serde_json::from_str(data).expect("chunk is JSON");
            if let Some(u) = v.get("usage").filter(|u| !u.is_null()) {
                s.output_tokens = u["completion_tokens"].as_u64().unwrap_or(0) as usize;
            }
            let has_text = v["choices"][0]["delta"]["content"].as_str().is_some_and(|c| !c.is_empty());
            if has_text {
                let now = Instant::now();
                match last {
                    None => first = Some(now),
                    Some(prev) => s.itl.push(now.duration_since(prev).as_secs_f64()),
                }
                last = Some(now);
            }
        }
    }
    let end = last.unwrap_or_else(Instant::now);
    let first = first.unwrap_or(end);
    s.ttft = first.duration_since(t0).as_secs_f64();
    if s.output_tokens > 1 {
        s.tpot = Some(end.duration_since(first).as_secs_f64() / (s.output_tokens - 1) as f64);
    }
    s
}

struct Round {
    clients: usize,
    requests: usize,
    wall: f64,
    samples: Vec<Sample>,
}

impl Round {
    fn output_tokens(&self) -> usize {
        self.samples.iter().map(|s| s.output_tokens).sum()
    }
    fn summary(&self) -> Value {
        let mut ttft: Vec<f64> = self.samples.iter().map(|s| s.ttft * 1e3).collect();
        let mut tpot: Vec<f64> = self.samples.iter().filter_map(|s| s.tpot).map(|t| t * 1e3).collect();
        let mut itl: Vec<f64> = self.samples.iter().flat_map(|s| s.itl.iter().map(|t| t * 1e3)).collect();
        json!({
            "clients": self.clients,
            "requests": self.requests,
            "output_tokens": self.output_tokens(),
            "wall_s": self.wall,
            "output_tok_per_s": self.output_tokens() as f64 / self.wall,
            "ttft_ms_p50": pct(&mut ttft, 0.5), "ttft_ms_p99": pct(&mut ttft, 0.99),
            "tpot_ms_p50": pct(&mut tpot, 0.5), "tpot_ms_p99": pct(&mut tpot, 0.99),
            "itl_ms_p50": pct(&mut itl, 0.5), "itl_ms_p99": pct(&mut itl, 0.99),
        })
    }
}

async fn round(url: &str, clients: usize, w: Workload) -> Round {
    let client = reqwest::Client::builder().timeout(Duration::from_secs(1800)).build().unwrap();
    let t0 = Instant::now();
    let tasks: Vec<_> = (0..clients)
        .map(|c| {
            let (client, url) = (client.clone(), url.to_string());
            tokio::spawn(async move {
                let mut out = Vec::new();
                for r in 0..w.requests_per_client {
                    out.push(one_request(&client, &url, c * w.requests_per_client + r, w).await);
                }
                out
            })
        })
        .collect();
    let mut samples = Vec::new();
    for t in tasks {
        samples.extend(t.await.expect("client task"));
    }
    Round { clients, requests: samples.len(), wall: t0.elapsed().as_secs_f64(), samples }
}

fn start(model: &Path, max_seqs: usize, prefix_caching: bool) -> BackgroundServer {
    let cfg = ServerConfig {
        // The same step budget as `infer serve`'s default --max-batch-tokens.
        engine: EngineConfig { max_context: Some(2048), max_seqs, prefix_caching, max_batch_tokens: 256, ..Default::default() },
        max_queue: 1024,
        ..Default::default()
    };
    start_with(model, cfg)
}

fn start_with(model: &Path, cfg: ServerConfig) -> BackgroundServer {
    let path = model.to_path_buf();
    let s = BackgroundServer::start(cfg, move || infer::load(path.to_str().unwrap(), LoadOptions::default())).expect("server starts");
    let t0 = Instant::now();
    while reqwest::blocking::get(format!("{}/health", s.url())).map(|r| r.status().as_u16()).ok() != Some(200) {
        assert!(t0.elapsed() < Duration::from_secs(120), "server did not become ready");
        std::thread::sleep(Duration::from_millis(20));
    }
    s
}

fn row(label: &str, v: &Value) -> String {
    let f = |k: &str| v[k].as_f64().unwrap_or(f64::NAN);
    format!(
        "| {label} | {} | {} | {:.1} | {:.0} / {:.0} | {:.1} / {:.1} | {:.1} / {:.1} |",
        v["clients"],
        v["requests"],
        f("output_tok_per_s"),
        f("ttft_ms_p50"),
        f("ttft_ms_p99"),
        f("tpot_ms_p50"),
        f("tpot_ms_p99"),
        f("itl_ms_p50"),
        f("itl_ms_p99")
    )
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let bench = args.iter().any(|a| a == "--bench");
    let arg = |name: &str| args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).cloned();
    let model = match arg("--model") {
        Some(m) => PathBuf::from(m),
        None => match infer::testing::smollm2() {
            Some(p) => p,
            None => return,
        },
    };
    if !model.exists() {
        eprintln!("error: model {} not found", model.display());
        std::process::exit(1);
    }
    if let Some(t) = arg("--threads") {
        std::env::set_var("RAYON_NUM_THREADS", &t);
    }
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let chaos = args.iter().any(|a| a == "--chaos");
    if chaos || arg("--minutes").is_some() {
        let num = |name: &str, default: f64| arg(name).map_or(default, |v| v.parse().unwrap_or_else(|_| panic!("{name}: a number")));
        let o = SoakOptions {
            minutes: num("--minutes", 1.0),
            clients: num("--clients", 64.0) as usize,
            stalled: num("--stalled", 3.0) as usize,
            chaos,
            grace: Duration::from_secs_f64(num("--grace", 60.0)),
            write_timeout: Duration::from_secs_f64(num("--write-timeout", 10.0)),
        };
        let r = soak(&model, &rt, &o);
        if let Some(path) = arg("--json") {
            std::fs::write(&path, serde_json::to_string_pretty(&r).unwrap()).expect("writing --json");
        }
        rt.shutdown_timeout(Duration::from_secs(1));
        std::process::exit(if r["passed"] == true { 0 } else { 1 });
    }
    if !bench {
        // Smoke run under `cargo test`: two clients, short answers.
        let s = start(&model, 4, true);
        let w = Workload { requests_per_client: 1, answer_tokens: &[4], shared_system: true };
        let r = rt.block_on(round(&s.url(), 2, w));
        assert_eq!(r.output_tokens(), 8);
        println!("serve_load smoke run: {}", r.summary());
        s.stop().unwrap();
        return;
    }
    let clients: Vec<usize> =
        arg("--clients").unwrap_or_else(|| "1,4,16,64".into()).split(',').map(|c| c.trim().parse().expect("--clients: numbers")).collect();
    let max_clients = *clients.iter().max().unwrap();
    let mut results = json!({"model": model.file_name().unwrap().to_string_lossy(), "threads": std::env::var("RAYON_NUM_THREADS").ok(), "rounds": [], "prefix_caching": {}});
    println!("## infer serve load test ({})\n", model.display());
    println!("| workload | clients | requests | output tok/s | TTFT ms p50 / p99 | TPOT ms p50 / p99 | ITL ms p50 / p99 |");
    println!("|---|---|---|---|---|---|---|");
    let mixed = Workload { requests_per_client: 2, answer_tokens: &[32, 64, 96, 48], shared_system: false };
    let s = start(&model, max_clients, true);
    for &n in &clients {
        let r = rt.block_on(round(&s.url(), n, Workload { requests_per_client: if n >= 16 { 1 } else { 2 }, ..mixed }));
        let v = r.summary();
        println!("{}", row("chat, 20-40 prompt / 32-96 answer tokens", &v));
        results["rounds"].as_array_mut().unwrap().push(v);
    }
    s.stop().unwrap();
    // Prefix caching: the same ~90-token system prompt in every request, cache off vs on, with 1
    // client (4 requests in a row) and with 16 clients (2 requests each).
    println!();
    for (n, per_client) in [(1usize, 4usize), (16, 2)] {
        let shared = Workload { requests_per_client: per_client, answer_tokens: &[16], shared_system: true };
        let mut ttft = [0f64; 2];
        for on in [false, true] {
            let s = start(&model, 16, on);
            let v = rt.block_on(round(&s.url(), n, shared)).summary();
            println!("{}", row(if on { "shared system prompt, prefix cache ON" } else { "shared system prompt, prefix cache OFF" }, &v));
            ttft[on as usize] = v["ttft_ms_p50"].as_f64().unwrap();
            results["prefix_caching"][format!("{n}_clients_{}", if on { "on" } else { "off" })] = v;
            s.stop().unwrap();
        }
        println!("prefix caching, {n} client(s): TTFT p50 {:.0} ms -> {:.0} ms ({:.2}x faster)\n", ttft[0], ttft[1], ttft[0] / ttft[1]);
        results["prefix_caching"][format!("{n}_clients_ttft_p50_speedup")] = json!(ttft[0] / ttft[1]);
    }
    if let Some(path) = arg("--json") {
        std::fs::write(&path, serde_json::to_string_pretty(&results).unwrap()).expect("writing --json");
    }
}

// ------------------------------------------------------------------------------------------------
// Soak and chaos (`--minutes M`, `--chaos`)
// ------------------------------------------------------------------------------------------------

/// Server limits of the soak: 64 clients, the stalled readers and the valid requests of the malformed
/// mix exceed `max_seqs + max_queue`, so the designed 429s happen.
const SOAK_MAX_SEQS: usize = 32;
const SOAK_MAX_QUEUE: usize = 40;
const SOAK_CONTEXT: usize = 2048;
/// KV cache of the soak: ~8.7k tokens of SmolLM2-135M in f32 (the 32 running sequences hold ~3-5k), so
/// blocks are evicted and reused all the time, and the warm-up can touch each of them before the clock
/// starts (its pages are committed when first written: RSS would otherwise grow until every block
/// has been used once).
const SOAK_KV_BYTES: usize = 384 << 20;
/// Answer lengths of the streaming clients (tokens, `ignore_eos`).
const SOAK_ANSWERS: [usize; 4] = [16, 32, 64, 128];
/// Share of streaming requests dropped mid-stream under `--chaos`.
const DISCONNECT_SHARE: f64 = 0.10;
/// Receive buffer of a stalled reader's socket (the kernel doubles it): its window fills at once.
const STALL_RCVBUF: u32 = 4096;
/// A stalled reader's request: 4 choices of 256 tokens with 20 alternatives each, ~1.7 MB of events
/// (more than the socket buffers on both sides and hyper's hold), 4 admission slots.
const STALL_TOKENS: usize = 256;
const STALL_CHOICES: usize = 4;
/// A request without its whole answer after this long counts as hung.
const HUNG_AFTER: Duration = Duration::from_secs(120);

/// splitmix64: reproducible choices without a dependency.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Self {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ 0xD1B5_4A32_D192_ED03)
    }
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    fn chance(&mut self, p: f64) -> bool {
        ((self.next() >> 11) as f64 / (1u64 << 53) as f64) < p
    }
}

/// What every task of the soak reports.
#[derive(Default)]
struct Tally {
    /// Request kind → outcome (status or `transport error`) → count.
    outcomes: BTreeMap<String, BTreeMap<String, u64>>,
    /// The first failures, described (all are counted).
    failures: Vec<String>,
    failure_count: u64,
    /// Tokens the streaming clients received (usage of completed streams, text chunks of dropped ones).
    client_tokens: u64,
    streams_completed: u64,
    disconnects: u64,
    designed_429: u64,
    /// One record per stalled-reader connection, closed.
    stalls: Vec<Value>,
}

type Shared = Arc<Mutex<Tally>>;

impl Tally {
    fn count(&mut self, kind: &str, outcome: &str) {
        *self.outcomes.entry(kind.to_string()).or_default().entry(outcome.to_string()).or_default() += 1;
        if outcome.starts_with("429") {
            self.designed_429 += 1;
        }
    }
    fn fail(&mut self, what: String) {
        self.failure_count += 1;
        if self.failures.len() < 40 {
            self.failures.push(what);
        }
    }
}

fn tally(t: &Shared) -> std::sync::MutexGuard<'_, Tally> {
    t.lock().unwrap_or_else(|e| e.into_inner())
}

fn secs_since(t0: Instant) -> f64 {
    t0.elapsed().as_secs_f64()
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// What one streamed response delivered.
#[derive(Default)]
struct SseRead {
    events: usize,
    text_chunks: u64,
    done: bool,
    usage_tokens: Option<u64>,
    /// An error event, or an event that is not JSON.
    error: Option<String>,
    transport: Option<String>,
    dropped: bool,
}

/// Reads a streamed answer to its end, or drops it after `drop_after` events.
async fn read_sse(resp: reqwest::Response, drop_after: Option<usize>) -> SseRead {
    let mut r = SseRead::default();
    let mut stream = resp.bytes_stream();
    let mut buf: Vec<u8> = Vec::new();
    while let Some(chunk) = stream.next().await {
        match chunk {
            Ok(c) => buf.extend_from_slice(&c),
            Err(e) => {
                r.transport = Some(format!("{e:?}"));
                return r;
            }
        }
        while let Some(end) = find(&buf, b"\n\n") {
            let event: Vec<u8> = buf.drain(..end + 2).collect();
            let text = String::from_utf8_lossy(&event);
            let Some(data) = text.trim().strip_prefix("data: ") else {
                continue;
            };
            r.events += 1;
            if data == "[DONE]" {
                r.done = true;
                continue;
            }
            match serde_json::from_str::<Value>(data) {
                Err(e) => r.error = Some(format!("an event is not JSON ({e}): {data:.200}")),
                Ok(v) => {
                    if let Some(e) = v.get("error") {
                        r.error = Some(format!("error event: {e}"));
                    }
                    if let Some(u) = v.get("usage").filter(|u| !u.is_null()) {
                        r.usage_tokens = u["completion_tokens"].as_u64();
                    }
                    if v["choices"][0]["delta"]["content"].as_str().is_some_and(|c| !c.is_empty()) {
                        r.text_chunks += 1;
                    }
                }
            }
            if drop_after.is_some_and(|k| r.events >= k) {
                r.dropped = true;
                return r;
            }
        }
    }
    r
}

/// How one request went.
enum Attempt {
    Transport(String),
    /// 429, with its Retry-After seconds.
    Busy(u64),
    Status(u16, String),
    Stream(SseRead),
}

/// One streaming chat client in a closed loop until `stop_at`; `current` says what it is doing (to
/// name a request that hangs).
async fn soak_client(c: usize, http: reqwest::Client, url: String, stop_at: Instant, chaos: bool, t: Shared, current: Arc<Mutex<String>>) {
    let t0 = Instant::now();
    let mut rng = Rng::new(c as u64 + 1);
    let mut i = 0usize;
    while Instant::now() < stop_at {
        i += 1;
        let answer = SOAK_ANSWERS[rng.below(SOAK_ANSWERS.len())];
        let drop_after = (chaos && rng.chance(DISCONNECT_SHARE)).then(|| 2 + rng.below(5));
        let kind = if drop_after.is_some() { "stream, dropped mid-stream" } else { "stream" };
        let topic = TOPICS[rng.below(TOPICS.len())];
        let mut messages = Vec::new();
        if rng.chance(0.5) {
            messages.push(json!({"role": "system", "content": SYSTEM}));
        }
        messages.push(json!({"role": "user", "content": format!("Client {c}, request {i}: please give me advice about {topic}.")}));
        let body = json!({
            "messages": messages,
            "max_tokens": answer,
            "ignore_eos": true,
            "temperature": 0.7,
            "seed": c * 1_000_000 + i,
            "stream": true,
            "stream_options": {"include_usage": true},
        });
        let what = format!("client {c} request {i} ({kind}, {answer} tokens, sent at {:.1} s)", secs_since(t0));
        *current.lock().unwrap() = what.clone();
        let attempt = async {
            let resp = match http.post(format!("{url}/v1/chat/completions")).json(&body).send().await {
                Ok(r) => r,
                Err(e) => return Attempt::Transport(format!("{e:?}")),
            };
            match resp.status().as_u16() {
                200 => Attempt::Stream(read_sse(resp, drop_after).await),
                429 => {
                    let after = resp.headers().get("retry-after").and_then(|v| v.to_str().ok()?.parse().ok());
                    Attempt::Busy(after.unwrap_or(1))
                }
                s => Attempt::Status(s, resp.text().await.unwrap_or_default()),
            }
        };
        // Every client stops at `stop_at`, dropping what it is waiting for.
        let started = Instant::now();
        let attempt = match tokio::time::timeout_at((started + HUNG_AFTER).min(stop_at).into(), attempt).await {
            Ok(a) => a,
            Err(_) if started + HUNG_AFTER > stop_at => {
                tally(&t).count(kind, "cut by the end of the run");
                break;
            }
            Err(_) => {
                let mut g = tally(&t);
                g.count(kind, "hung");
                g.fail(format!("hung: {what} had no complete answer after {HUNG_AFTER:?}"));
                continue;
            }
        };
        let mut pause = None;
        {
            let mut g = tally(&t);
            match attempt {
                Attempt::Transport(e) => {
                    g.count(kind, "transport error");
                    g.fail(format!("{what}: transport error: {e}"));
                }
                Attempt::Busy(after) => {
                    g.count(kind, "429 (designed: server full)");
                    // As Retry-After says, with some jitter.
                    pause = Some(Duration::from_millis(after * 1000 + rng.below(250) as u64));
                }
                Attempt::Status(status, text) => {
                    g.count(kind, &status.to_string());
                    g.fail(format!("{what}: status {status}: {text:.300}"));
                }
                Attempt::Stream(r) => {
                    if let Some(e) = &r.transport {
                        g.count(kind, "transport error mid-stream");
                        g.fail(format!("{what}: transport error after {} events: {e}", r.events));
                    } else if let Some(e) = &r.error {
                        g.count(kind, "200, error in the stream");
                        g.fail(format!("{what}: {e}"));
                    } else if r.dropped {
                        g.count(kind, "200, dropped");
                        g.disconnects += 1;
                        g.client_tokens += r.text_chunks;
                    } else if !r.done || r.usage_tokens != Some(answer as u64) {
                        g.count(kind, "200, incomplete");
                        g.fail(format!("{what}: stream ended without all its tokens: [DONE] {}, usage {:?}", r.done, r.usage_tokens));
                    } else {
                        g.count(kind, "200");
                        g.streams_completed += 1;
                        g.client_tokens += answer as u64;
                    }
                }
            }
        }
        if let Some(p) = pause {
            tokio::time::sleep(p).await;
        }
    }
    *current.lock().unwrap() = String::new();
}

/// A malformed, oversized or odd request and the answer it must get.
struct Case {
    kind: &'static str,
    method: reqwest::Method,
    path: &'static str,
    content_type: Option<&'static str>,
    body: Vec<u8>,
    status: u16,
    /// `error.code` the answer must carry.
    code: Option<&'static str>,
    /// `error.param` the answer must name.
    param: Option<&'static str>,
}

fn cases(body_limit: usize) -> Vec<Case> {
    let chat = |kind: &'static str, v: Value, status: u16, param: Option<&'static str>| Case {
        kind,
        method: reqwest::Method::POST,
        path: "/v1/chat/completions",
        content_type: Some("application/json"),
        body: v.to_string().into_bytes(),
        status,
        code: None,
        param,
    };
    let raw = |kind: &'static str, content_type: Option<&'static str>, body: &[u8], status: u16| Case {
        kind,
        method: reqwest::Method::POST,
        path: "/v1/chat/completions",
        content_type,
        body: body.to_vec(),
        status,
        code: None,
        param: None,
    };
    let hi = json!([{"role": "user", "content": "Say hello."}]);
    let with = |extra: Value| {
        let mut v = json!({"messages": hi, "max_tokens": 4});
        for (k, x) in extra.as_object().unwrap() {
            v[k] = x.clone();
        }
        v
    };
    let long_prompt = "word ".repeat(SOAK_CONTEXT + 500);
    let mut oversized = format!("{{\"messages\": [{{\"role\": \"user\", \"content\": \"{}", "a".repeat(body_limit)).into_bytes();
    oversized.extend_from_slice(b"\"}]}");
    vec![
        raw("bad JSON", Some("application/json"), br#"{"messages": [{"role": "user", "content": "hi"}"#, 400),
        raw("JSON that is not an object", Some("application/json"), b"[1, 2, 3]", 400),
        raw("empty body", Some("application/json"), b"", 400),
        raw("non-UTF-8 body", Some("application/json"), b"{\"messages\": [{\"role\": \"user\", \"content\": \"\xff\xfe\xc3\x28\"}]}", 400),
        raw("JSON nested 100,000 deep", Some("application/json"), "[".repeat(100_000).as_bytes(), 400),
        raw("text/plain body", Some("text/plain"), with(json!({})).to_string().as_bytes(), 415),
        raw("form-encoded body", Some("application/x-www-form-urlencoded"), b"messages=hi", 415),
        chat("wrong type: messages a string", json!({"messages": "hi"}), 400, Some("messages")),
        chat("wrong type: temperature a string", with(json!({"temperature": "hot"})), 400, Some("temperature")),
        chat("wrong type: stream a number", with(json!({"stream": 3})), 400, Some("stream")),
        chat("negative max_tokens", with(json!({"max_tokens": -5})), 400, Some("max_tokens")),
        chat("max_tokens 0", with(json!({"max_tokens": 0})), 400, Some("max_tokens")),
        chat("temperature 5", with(json!({"temperature": 5.0})), 400, Some("temperature")),
        chat("n = 0", with(json!({"n": 0})), 400, Some("n")),
        chat("negative top_k", with(json!({"top_k": -5})), 400, Some("top_k")),
        chat("logit_bias key not a token", with(json!({"logit_bias": {"abc": 1}})), 400, Some("logit_bias")),
        chat("top_logprobs 50", with(json!({"logprobs": true, "top_logprobs": 50})), 400, Some("top_logprobs")),
        chat("stop string of 2 KB", with(json!({"stop": "x".repeat(2048)})), 400, Some("stop")),
        chat("unknown role", json!({"messages": [{"role": "wizard", "content": "hi"}]}), 400, None),
        chat("invalid constraint: json_schema missing", with(json!({"response_format": {"type": "json_schema"}})), 400, None),
        chat("invalid constraint: unknown response_format", with(json!({"response_format": {"type": "yaml"}})), 400, None),
        chat("invalid constraint: schema a number", with(json!({"guided_json": 5})), 400, Some("guided_json")),
        chat("invalid constraint: bad regex", with(json!({"guided_regex": "(unclosed"})), 400, Some("guided_regex")),
        chat("invalid constraint: two at once", with(json!({"guided_regex": "a+", "guided_choice": ["a", "b"]})), 400, None),
        Case { code: Some("model_not_found"), ..chat("unknown model", with(json!({"model": "gpt-17"})), 404, Some("model")) },
        Case {
            code: Some("context_length_exceeded"),
            ..chat("prompt longer than the context", json!({"messages": [{"role": "user", "content": long_prompt}]}), 400, Some("messages"))
        },
        chat("unknown fields (ignored)", with(json!({"frobnicate": {"a": [1, 2]}, "x-extra": true})), 200, None),
        chat("max_tokens 2^64-1", json!({"messages": hi, "max_tokens": u64::MAX, "temperature": 0, "stop": ["."]}), 200, None),
        raw("body over the limit", Some("application/json"), &oversized, 413),
        Case {
            path: "/v1/completions",
            ..chat("completions: token id outside the vocabulary", json!({"prompt": [1, 2, 99_999_999]}), 400, Some("prompt"))
        },
        Case {
            path: "/v1/completions",
            ..chat("completions: prompts x n over the limit", json!({"prompt": vec!["hi"; 20], "n": 20}), 400, Some("prompt"))
        },
        Case { path: "/tokenize", ..chat("tokenize: content a number", json!({"content": 5}), 400, Some("content")) },
        Case {
            path: "/detokenize",
            ..chat("detokenize: token outside the vocabulary", json!({"tokens": [99_999_999]}), 400, Some("tokens"))
        },
        Case { method: reqwest::Method::GET, body: Vec::new(), ..chat("GET on a POST endpoint", json!({}), 405, None) },
        Case { path: "/v1/nothing-here", ..chat("unknown endpoint", json!({}), 404, None) },
    ]
}

/// Sends the malformed mix round-robin, one request every ~100 ms, until `stop_at`.
async fn malformed_client(http: reqwest::Client, url: String, stop_at: Instant, body_limit: usize, t: Shared, current: Arc<Mutex<String>>) {
    let t0 = Instant::now();
    let cases = cases(body_limit);
    let mut i = 0usize;
    while Instant::now() < stop_at {
        let case = &cases[i % cases.len()];
        i += 1;
        *current.lock().unwrap() = format!("malformed request {i} ({}, sent at {:.1} s)", case.kind, secs_since(t0));
        let mut req = http.request(case.method.clone(), format!("{url}{}", case.path)).body(case.body.clone()).timeout(HUNG_AFTER);
        if let Some(ct) = case.content_type {
            req = req.header("content-type", ct);
        }
        let kind = format!("malformed: {}", case.kind);
        match req.send().await {
            Err(e) => {
                let mut g = tally(&t);
                g.count(&kind, "transport error");
                g.fail(format!("{kind}: transport error: {e:?}"));
            }
            Ok(resp) => {
                let status = resp.status().as_u16();
                let body: Value = resp.json().await.unwrap_or(Value::Null);
                let mut g = tally(&t);
                if status == 429 && case.status == 200 {
                    g.count(&kind, "429 (designed: server full)");
                } else {
                    g.count(&kind, &status.to_string());
                    let err = &body["error"];
                    let code_ok = case.code.is_none_or(|c| err["code"] == c);
                    let param_ok = case.param.is_none_or(|p| err["param"] == p);
                    if status != case.status || !code_ok || !param_ok {
                        g.fail(format!(
                            "{kind}: expected {} (code {:?}, param {:?}), got {status}: {:.300}",
                            case.status,
                            case.code,
                            case.param,
                            body.to_string()
                        ));
                    }
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    *current.lock().unwrap() = String::new();
}

/// A stalled reader's connection: a streaming request sent, nothing read.
struct Stall {
    reader: usize,
    n: usize,
    stream: tokio::net::TcpStream,
    opened: Instant,
    /// Seconds since the start of the soak.
    opened_at: f64,
}

async fn write_all(s: &tokio::net::TcpStream, mut buf: &[u8]) -> std::io::Result<()> {
    while !buf.is_empty() {
        s.writable().await?;
        match s.try_write(buf) {
            Ok(n) => buf = &buf[n..],
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

async fn open_stall(addr: std::net::SocketAddr, reader: usize, n: usize, t0: Instant) -> std::io::Result<Stall> {
    let sock = tokio::net::TcpSocket::new_v4()?;
    sock.set_recv_buffer_size(STALL_RCVBUF)?;
    let stream = sock.connect(addr).await?;
    let body = json!({
        "messages": [{"role": "user", "content": format!("Stalled reader {reader}, connection {n}: tell me a very long story about {}.", TOPICS[n % TOPICS.len()])}],
        "max_tokens": STALL_TOKENS,
        "n": STALL_CHOICES,
        "ignore_eos": true,
        "temperature": 0.7,
        "logprobs": true,
        "top_logprobs": 20,
        "stream": true,
    })
    .to_string();
    let req = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    write_all(&stream, req.as_bytes()).await?;
    Ok(Stall { reader, n, stream, opened: Instant::now(), opened_at: secs_since(t0) })
}

/// Reads, without waiting, what the server sent a stalled reader, closes the connection and describes it.
fn close_stall(s: Stall) -> Value {
    let held = s.opened.elapsed().as_secs_f64();
    let mut got: Vec<u8> = Vec::new();
    let mut buf = vec![0u8; 1 << 16];
    let end = loop {
        match s.stream.try_read(&mut buf) {
            Ok(0) => break "closed by the server",
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break "open",
            Err(_) => break "reset by the server",
        }
    };
    let status = got.split(|&b| b == b'\r').next().map(|l| String::from_utf8_lossy(l).to_string()).unwrap_or_default();
    json!({
        "reader": s.reader,
        "connection": s.n,
        "opened_at_s": (s.opened_at * 10.0).round() / 10.0,
        "held_s": (held * 10.0).round() / 10.0,
        "status_line": status,
        "bytes_received": got.len(),
        "response_complete": find(&got, b"data: [DONE]").is_some(),
        "connection_at_close": end,
    })
}

/// A stalled reader: opens a never-read streaming request (again a second later if it got 429), holds
/// it for `hold`, closes it and opens the next. The last one, opened at least `last_open_by` before the
/// end when it is not the first (so that a server that cuts stalled clients has done so by then), is
/// held to the end and returned, still unread, for the final checks.
async fn stall_reader(
    reader: usize,
    addr: std::net::SocketAddr,
    stop_at: Instant,
    hold: Duration,
    last_open_by: Duration,
    t: Shared,
) -> Option<Stall> {
    let t0 = Instant::now();
    let mut n = 0;
    let mut held = false;
    while Instant::now() < stop_at && (!held || Instant::now() + last_open_by < stop_at) {
        n += 1;
        let s = match open_stall(addr, reader, n, t0).await {
            Ok(s) => s,
            Err(e) => {
                {
                    let mut g = tally(&t);
                    g.count("stalled reader", "transport error");
                    g.fail(format!("stalled reader {reader}, connection {n}: {e}"));
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        // Its status line, peeked (left in the socket's buffer): a 429 is retried a second later.
        let mut head = [0u8; 12];
        if let Ok(Ok(12)) = tokio::time::timeout(Duration::from_secs(5), s.stream.peek(&mut head)).await {
            if &head == b"HTTP/1.1 429" {
                tally(&t).count("stalled reader", "429 (designed: server full)");
                drop(s);
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        }
        tally(&t).count("stalled reader", "opened, never read");
        held = true;
        if s.opened + hold + last_open_by >= stop_at {
            tokio::time::sleep_until(stop_at.into()).await;
            return Some(s);
        }
        tokio::time::sleep_until((s.opened + hold).into()).await;
        let rec = close_stall(s);
        tally(&t).stalls.push(rec);
    }
    tokio::time::sleep_until(stop_at.into()).await;
    None
}

fn rss_kb() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| s.lines().find_map(|l| l.strip_prefix("VmRSS:").and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())))
        .unwrap_or(0)
}

/// A metric's value in the Prometheus text (unlabelled metrics).
fn metric(text: &str, name: &str) -> Option<f64> {
    text.lines().find_map(|l| {
        let (k, v) = l.split_once(' ')?;
        if k == name {
            v.trim().parse().ok()
        } else {
            None
        }
    })
}

/// The `infer_requests_total` lines of 5xx answers.
fn server_5xx_lines(text: &str) -> Vec<String> {
    text.lines().filter(|l| l.starts_with("infer_requests_total{") && l.contains("status=\"5")).map(str::to_string).collect()
}

/// 5xx answers counted by `infer_requests_total` since `before` (a scrape after the server became
/// ready: `/health` answers 503 while the model loads, by design), by endpoint and status.
fn server_5xx_since(before: &str, now: &str) -> (u64, Vec<String>) {
    let count = |text: &str, series: &str| -> f64 {
        server_5xx_lines(text).iter().find_map(|l| l.rsplit_once(' ').filter(|(k, _)| *k == series)?.1.parse().ok()).unwrap_or(0.0)
    };
    let mut total = 0;
    let mut lines = Vec::new();
    for l in server_5xx_lines(now) {
        let Some((series, _)) = l.rsplit_once(' ') else { continue };
        let n = (count(now, series) - count(before, series)) as u64;
        if n > 0 {
            total += n;
            lines.push(format!("{series} +{n}"));
        }
    }
    (total, lines)
}

async fn scrape(http: &reqwest::Client, url: &str) -> String {
    match http.get(format!("{url}/metrics")).timeout(Duration::from_secs(10)).send().await {
        Ok(r) => r.text().await.unwrap_or_default(),
        Err(_) => String::new(),
    }
}

/// Whether the server is idle: (running, queued, KV blocks in use).
fn idle(m: &str) -> (f64, f64, f64) {
    let g = |n| metric(m, n).unwrap_or(f64::NAN);
    (g("infer_running_sequences"), g("infer_queue_length"), g("infer_kv_blocks_used"))
}

/// Sends `limit` streaming requests at once and holds every answer until all have come: all 200 means
/// every admission slot was free. Returns (admitted, refused with 429, other outcomes).
async fn capacity_probe(http: &reqwest::Client, url: &str, limit: usize) -> (usize, usize, Vec<String>) {
    let sends = (0..limit).map(|i| {
        let body = json!({
            "messages": [{"role": "user", "content": format!("Probe {i}: count to five.")}],
            "max_tokens": 1000,
            "ignore_eos": true,
            "stream": true,
        });
        http.post(format!("{url}/v1/chat/completions")).json(&body).send()
    });
    let answers = futures_util::future::join_all(sends).await;
    let (mut ok, mut busy, mut other) = (0, 0, Vec::new());
    for a in &answers {
        match a {
            Ok(r) if r.status() == 200 => ok += 1,
            Ok(r) if r.status() == 429 => busy += 1,
            Ok(r) => other.push(r.status().to_string()),
            Err(e) => other.push(format!("transport error: {e:?}")),
        }
    }
    drop(answers);
    (ok, busy, other)
}

/// Touches every KV block once (distinct ~1100-token prompts, 4 at a time, until 90% of the blocks
/// have been used) and builds the constraint compiler, so that RSS at the reference point is the steady state.
async fn warm_up(http: &reqwest::Client, url: &str) -> String {
    let t0 = Instant::now();
    let m = scrape(http, url).await;
    let total = metric(&m, "infer_kv_blocks_total").unwrap_or(0.0);
    let constrained = json!({"messages": [{"role": "user", "content": "Name a colour."}], "max_tokens": 4, "guided_regex": "[a-z]+"});
    let _ = http.post(format!("{url}/v1/chat/completions")).json(&constrained).send().await;
    let mut round = 0;
    let mut cached = 0.0;
    while round < 20 && cached < 0.9 * total {
        // A distinct start makes every block of the prompt distinct (block hashes chain).
        let sends = (0..4).map(|i| {
            let text = format!("Warm-up {}: {}", round * 4 + i, "the quick brown fox jumps over the lazy dog. ".repeat(100));
            let body = json!({"messages": [{"role": "user", "content": text}], "max_tokens": 1});
            http.post(format!("{url}/v1/chat/completions")).json(&body).send()
        });
        let answers = futures_util::future::join_all(sends).await;
        if let Some(bad) = answers.iter().find(|a| !a.as_ref().is_ok_and(|r| r.status() == 200)) {
            return format!("stopped: a warm-up request got {bad:?}");
        }
        round += 1;
        cached = metric(&scrape(http, url).await, "infer_kv_blocks_cached").unwrap_or(0.0);
    }
    format!(
        "{round} rounds of 4 distinct long prompts, {cached} of {total} KV blocks used once, in {:.1} s; RSS {:.0} MiB",
        t0.elapsed().as_secs_f64(),
        rss_kb() as f64 / 1024.0
    )
}

struct SoakOptions {
    minutes: f64,
    clients: usize,
    stalled: usize,
    chaos: bool,
    grace: Duration,
    write_timeout: Duration,
}

/// Runs the soak; prints its summary and returns the results with `"passed"`.
fn soak(model: &Path, rt: &tokio::runtime::Runtime, o: &SoakOptions) -> Value {
    let body_limit = ServerConfig::default().max_body_bytes;
    let shutdown_grace = Duration::from_secs(5);
    let cfg = ServerConfig {
        engine: EngineConfig {
            max_context: Some(SOAK_CONTEXT),
            max_seqs: SOAK_MAX_SEQS,
            prefix_caching: true,
            max_batch_tokens: 256,
            kv_cache_bytes: Some(SOAK_KV_BYTES),
            ..Default::default()
        },
        max_queue: SOAK_MAX_QUEUE,
        max_body_bytes: body_limit,
        shutdown_grace,
        connections: infer_server::ConnLimits { write_timeout: o.write_timeout, ..Default::default() },
        ..Default::default()
    };
    let limit = SOAK_MAX_SEQS + SOAK_MAX_QUEUE;
    let rss_start = rss_kb();
    let began = Instant::now();
    let server = start_with(model, cfg);
    let (url, addr) = (server.url(), server.addr);
    let run = Duration::from_secs_f64(o.minutes * 60.0);
    // RSS reference: minute 5 of a 30-minute run; 1/6 of the run when shorter.
    let ref_at = Duration::from_secs(300).min(run / 6);
    // Each stalled connection is held long enough for the server to cut it (its write timeout after
    // the buffers fill), at most 2 minutes.
    let hold = (run / 20).min(Duration::from_secs(120)).max(o.write_timeout + Duration::from_secs(30));
    let last_open_by = o.write_timeout + Duration::from_secs(20);
    let stalled = if o.chaos { o.stalled } else { 0 };
    println!(
        "## infer serve soak{} ({}): {:.1} min, {} streaming clients{}\n",
        if o.chaos { " with chaos" } else { "" },
        model.display(),
        o.minutes,
        o.clients,
        if o.chaos {
            format!(", {:.0}% dropped mid-stream, {stalled} stalled readers (reconnecting every {} s), malformed/oversized requests every ~100 ms", DISCONNECT_SHARE * 100.0, hold.as_secs())
        } else {
            String::new()
        }
    );
    println!(
        "server: --max-seqs {SOAK_MAX_SEQS} --max-queue {SOAK_MAX_QUEUE} --ctx-size {SOAK_CONTEXT} --max-batch-tokens 256 --kv-cache-mem {} MiB, body limit {} MiB, write timeout {} s; RSS reference at {:.0} s",
        SOAK_KV_BYTES >> 20,
        body_limit >> 20,
        o.write_timeout.as_secs_f64(),
        ref_at.as_secs_f64()
    );
    let t: Shared = Arc::default();
    let http = reqwest::Client::builder().timeout(Duration::from_secs(600)).build().unwrap();
    let result = rt.block_on(async {
        let warm = warm_up(&http, &url).await;
        println!("warm-up: {warm}");
        let t0 = Instant::now();
        let stop_at = t0 + run;
        let m0 = scrape(&http, &url).await;
        let gen0 = metric(&m0, "infer_generation_tokens_total").unwrap_or(0.0);
        // RSS and gauges every 2 s; a progress line every minute (every 10 s for runs under 5 minutes).
        let samples: Arc<Mutex<Vec<Value>>> = Arc::default();
        let sampling = Arc::new(std::sync::atomic::AtomicBool::new(true));
        let sampler = {
            let (samples, sampling, http, url, t) = (samples.clone(), sampling.clone(), http.clone(), url.clone(), t.clone());
            let every = if run < Duration::from_secs(300) { 5 } else { 30 };
            tokio::spawn(async move {
                let mut k = 0u64;
                while sampling.load(std::sync::atomic::Ordering::SeqCst) {
                    let m = scrape(&http, &url).await;
                    let (running, queued, kv) = idle(&m);
                    let rss = rss_kb();
                    let s = secs_since(t0);
                    samples.lock().unwrap().push(json!({"t_s": (s * 10.0).round() / 10.0, "rss_kb": rss, "running": running, "queued": queued, "kv_blocks_used": kv}));
                    if k.is_multiple_of(every) {
                        let g = tally(&t);
                        let requests: u64 = g.outcomes.values().flat_map(|o| o.values()).sum();
                        eprintln!(
                            "  [{s:6.0} s] RSS {:.0} MiB, running {running}, queued {queued}, KV blocks in use {kv}, requests {requests}, failures {}",
                            rss as f64 / 1024.0,
                            g.failure_count
                        );
                    }
                    k += 1;
                    tokio::time::sleep(Duration::from_secs(2)).await;
                }
            })
        };
        let mut currents = Vec::new();
        let mut tasks = Vec::new();
        for c in 0..o.clients {
            let cur = Arc::new(Mutex::new(String::new()));
            currents.push(cur.clone());
            tasks.push(tokio::spawn(soak_client(c, http.clone(), url.clone(), stop_at, o.chaos, t.clone(), cur)));
        }
        if o.chaos {
            let cur = Arc::new(Mutex::new(String::new()));
            currents.push(cur.clone());
            tasks.push(tokio::spawn(malformed_client(http.clone(), url.clone(), stop_at, body_limit, t.clone(), cur)));
        }
        let stalls: Vec<_> = (0..stalled).map(|k| tokio::spawn(stall_reader(k, addr, stop_at, hold, last_open_by, t.clone()))).collect();
        // The end: every client stops at `stop_at` (a task still running 10 s later is stuck).
        let mut hung = Vec::new();
        for (task, cur) in tasks.into_iter().zip(&currents) {
            if tokio::time::timeout_at((stop_at + Duration::from_secs(10)).into(), task).await.is_err() {
                let what = cur.lock().unwrap().clone();
                tally(&t).fail(format!("stuck: {what} did not stop at the end of the run"));
                hung.push(what);
            }
        }
        let mut open_stalls = Vec::new();
        for s in stalls {
            if let Ok(Some(s)) = s.await {
                open_stalls.push(s);
            }
        }
        let clients_done = secs_since(t0);
        // Final checks, the stalled readers still connected: the server idle, every slot free.
        let checks_from = Instant::now();
        let deadline = checks_from + o.grace;
        let m_first = scrape(&http, &url).await;
        let mut m = m_first.clone();
        while idle(&m) != (0.0, 0.0, 0.0) && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(250)).await;
            m = scrape(&http, &url).await;
        }
        let idle_after = checks_from.elapsed().as_secs_f64();
        let mut probe = capacity_probe(&http, &url, limit).await;
        while probe.0 < limit && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_secs(1)).await;
            probe = capacity_probe(&http, &url, limit).await;
        }
        let probe_after = checks_from.elapsed().as_secs_f64();
        // The probe's sequences are cancelled when its answers are dropped.
        let settle = Instant::now() + Duration::from_secs(10);
        let mut m_end = scrape(&http, &url).await;
        while idle(&m_end) != (0.0, 0.0, 0.0) && Instant::now() < settle {
            tokio::time::sleep(Duration::from_millis(250)).await;
            m_end = scrape(&http, &url).await;
        }
        sampling.store(false, std::sync::atomic::Ordering::SeqCst);
        sampler.abort();
        let rss_end = rss_kb();
        let generated = metric(&m_end, "infer_generation_tokens_total").unwrap_or(0.0) - gen0;
        let r = json!({
            "clients_done_s": clients_done,
            "hung": hung,
            "metrics_at_end_of_clients": {"running": idle(&m_first).0, "queued": idle(&m_first).1, "kv_blocks_used": idle(&m_first).2},
            "idle_after_s": idle_after,
            "probe": {"limit": limit, "admitted": probe.0, "refused_429": probe.1, "other": probe.2, "after_s": probe_after},
            "metrics_end": {
                "running": idle(&m_end).0, "queued": idle(&m_end).1, "kv_blocks_used": idle(&m_end).2,
                "kv_blocks_total": metric(&m_end, "infer_kv_blocks_total"),
                "preemptions": metric(&m_end, "infer_preemptions_total"),
                "server_5xx": server_5xx_since(&m0, &m_end).0,
                "server_5xx_lines": server_5xx_since(&m0, &m_end).1,
                "generation_tokens": generated,
            },
            "rss_end_kb": rss_end,
            "samples": samples.lock().unwrap().clone(),
            "run_s": run.as_secs_f64(),
            "open_stalls": open_stalls.len(),
        });
        (r, open_stalls)
    });
    let (mut r, open_stalls) = result;
    // Shutdown with the stalled readers still connected.
    let stop_started = Instant::now();
    let (done_tx, done_rx) = std::sync::mpsc::channel();
    let stopper = std::thread::spawn(move || {
        let res = server.stop();
        let _ = done_tx.send(());
        res
    });
    let stop_limit = shutdown_grace + Duration::from_secs(10);
    let stopped_in = done_rx.recv_timeout(stop_limit).ok().map(|_| stop_started.elapsed().as_secs_f64());
    // Then the stalled readers see what they got.
    let closed: Vec<Value> = rt.block_on(async { open_stalls.into_iter().map(close_stall).collect() });
    if stopped_in.is_none() && done_rx.recv_timeout(Duration::from_secs(30)).is_err() {
        eprintln!("error: the server did not stop, even after the stalled readers left");
        std::process::exit(1);
    }
    let stop_result = stopper.join().unwrap_or_else(|_| Err("server thread panicked".into()));
    r["shutdown_s"] = json!(stopped_in);
    r["shutdown_result"] = json!(format!("{stop_result:?}"));
    let g = tally(&t);
    let mut stalls = g.stalls.clone();
    stalls.extend(closed.iter().map(|c| {
        let mut c = c.clone();
        c["kept_through_final_checks"] = json!(true);
        c
    }));
    // RSS reference: the sample nearest `ref_at`.
    let samples = r["samples"].as_array().cloned().unwrap_or_default();
    let at = |s: f64| {
        samples
            .iter()
            .min_by(|a, b| (a["t_s"].as_f64().unwrap() - s).abs().total_cmp(&(b["t_s"].as_f64().unwrap() - s).abs()))
            .and_then(|x| x["rss_kb"].as_u64())
            .unwrap_or(0)
    };
    let rss_ref = at(ref_at.as_secs_f64());
    let rss_end = r["rss_end_kb"].as_u64().unwrap_or(0);
    let rss_max = samples.iter().filter_map(|x| x["rss_kb"].as_u64()).max().unwrap_or(0);
    let run_s = run.as_secs_f64();
    let end = &r["metrics_end"];
    let probe = &r["probe"];
    let hung: u64 = g.outcomes.values().filter_map(|o| o.get("hung")).sum();
    let stuck = r["hung"].as_array().map_or(0, Vec::len);
    let mut criteria: Vec<(String, bool, String)> = vec![
        ("no unexpected status, transport error or broken stream".into(), g.failure_count == 0, format!("{} failures", g.failure_count)),
        (
            "no request hung, no client stuck".into(),
            hung == 0 && stuck == 0,
            format!("{hung} requests without their answer after {} s, {stuck} clients stuck", HUNG_AFTER.as_secs()),
        ),
        (
            "no 5xx counted by the server".into(),
            end["server_5xx"] == 0,
            format!("{} 5xx in infer_requests_total {}", end["server_5xx"], end["server_5xx_lines"]),
        ),
        (
            "0 running, 0 queued, 0 KV blocks in use at the end".into(),
            end["running"] == 0.0 && end["queued"] == 0.0 && end["kv_blocks_used"] == 0.0,
            format!("running {}, queued {}, KV blocks in use {}", end["running"], end["queued"], end["kv_blocks_used"]),
        ),
        (
            format!("every admission slot free at the end ({limit} streams admitted at once, stalled readers still connected)"),
            probe["admitted"] == limit,
            format!("{} admitted, {} refused (429), other {}", probe["admitted"], probe["refused_429"], probe["other"]),
        ),
        (
            format!("RSS at the end within 10% of RSS at {:.0} s", ref_at.as_secs_f64()),
            rss_ref > 0 && (rss_end as f64) <= rss_ref as f64 * 1.10,
            format!(
                "{:.1} MiB -> {:.1} MiB ({:+.1}%)",
                rss_ref as f64 / 1024.0,
                rss_end as f64 / 1024.0,
                (rss_end as f64 / rss_ref as f64 - 1.0) * 100.0
            ),
        ),
        (
            format!("server stops within {} s, stalled readers connected", stop_limit.as_secs()),
            stopped_in.is_some() && stop_result.is_ok(),
            match stopped_in {
                Some(s) => format!("{s:.1} s: {stop_result:?}"),
                None => "did not stop in time".into(),
            },
        ),
    ];
    if o.chaos {
        let opened = g.outcomes.get("stalled reader").and_then(|o| o.get("opened, never read")).copied().unwrap_or(0);
        let complete = stalls.iter().filter(|s| s["response_complete"] == true).count();
        criteria.push((
            "stalled readers really stalled (no response read to its end)".into(),
            opened > 0 && complete == 0,
            format!("{opened} connections, {complete} got their whole answer"),
        ));
    }
    let passed = criteria.iter().all(|c| c.1);

    // The summary.
    println!("\n| request kind | outcomes |");
    println!("|---|---|");
    for (kind, outs) in &g.outcomes {
        let o: Vec<String> = outs.iter().map(|(k, n)| format!("{k}: {n}")).collect();
        println!("| {kind} | {} |", o.join(", "));
    }
    let total: u64 = g.outcomes.values().flat_map(|o| o.values()).sum();
    let malformed: u64 = g.outcomes.iter().filter(|(k, _)| k.starts_with("malformed")).flat_map(|(_, o)| o.values()).sum();
    println!(
        "\n{total} requests ({malformed} malformed/odd) in {run_s:.0} s; streams completed {}, dropped mid-stream {}, designed 429s {}",
        g.streams_completed, g.disconnects, g.designed_429
    );
    println!(
        "tokens: {} received by the clients ({:.1} tok/s), {} generated by the server ({:.1} tok/s, stalled readers and probes included)",
        g.client_tokens,
        g.client_tokens as f64 / run_s,
        end["generation_tokens"],
        end["generation_tokens"].as_f64().unwrap_or(0.0) / run_s
    );
    println!("\nstalled readers ({} connections):", stalls.len());
    println!("| reader | connection | opened at s | held s | status | bytes received | answer complete | connection at close |");
    println!("|---|---|---|---|---|---|---|---|");
    for s in &stalls {
        println!(
            "| {} | {}{} | {} | {} | {} | {} | {} | {} |",
            s["reader"],
            s["connection"],
            if s["kept_through_final_checks"] == true { " (kept to the end)" } else { "" },
            s["opened_at_s"],
            s["held_s"],
            s["status_line"].as_str().unwrap_or(""),
            s["bytes_received"],
            s["response_complete"],
            s["connection_at_close"].as_str().unwrap_or("")
        );
    }
    let step = (samples.len() / 12).max(1);
    let mut shown: Vec<String> = samples
        .iter()
        .step_by(step)
        .map(|x| format!("{:.0} s: {:.0}", x["t_s"].as_f64().unwrap_or(0.0), x["rss_kb"].as_f64().unwrap_or(0.0) / 1024.0))
        .collect();
    shown.push(format!("end: {:.0}", rss_end as f64 / 1024.0));
    println!("\nRSS MiB (before the server: {:.0}; max {:.0}): {}", rss_start as f64 / 1024.0, rss_max as f64 / 1024.0, shown.join(", "));
    println!(
        "after the clients ({:.1} s): running {}, queued {}, KV blocks in use {}; idle after {:.1} s more; probe after {:.1} s",
        r["clients_done_s"].as_f64().unwrap_or(0.0),
        r["metrics_at_end_of_clients"]["running"],
        r["metrics_at_end_of_clients"]["queued"],
        r["metrics_at_end_of_clients"]["kv_blocks_used"],
        r["idle_after_s"].as_f64().unwrap_or(0.0),
        r["probe"]["after_s"].as_f64().unwrap_or(0.0)
    );
    println!(
        "final /metrics: infer_running_sequences {}, infer_queue_length {}, infer_kv_blocks_used {} (of {}), preemptions {}, 5xx {}",
        end["running"], end["queued"], end["kv_blocks_used"], end["kv_blocks_total"], end["preemptions"], end["server_5xx"]
    );
    if !g.failures.is_empty() {
        println!("\nfailures ({} in all, the first {}):", g.failure_count, g.failures.len());
        for f in &g.failures {
            println!("  - {f}");
        }
    }
    println!("\n| criterion | result | |");
    println!("|---|---|---|");
    for (name, ok, detail) in &criteria {
        println!("| {name} | {} | {detail} |", if *ok { "pass" } else { "FAIL" });
    }
    let took = began.elapsed().as_secs_f64();
    println!("\nsoak {} in {took:.0} s (model load, warm-up, run, final checks, shutdown)", if passed { "PASSED" } else { "FAILED" });
    r["total_s"] = json!(took);
    r["model"] = json!(model.file_name().unwrap().to_string_lossy());
    r["minutes"] = json!(o.minutes);
    r["clients"] = json!(o.clients);
    r["chaos"] = json!(o.chaos);
    r["outcomes"] = json!(g.outcomes);
    r["failures"] = json!(g.failures);
    r["failure_count"] = json!(g.failure_count);
    r["client_tokens"] = json!(g.client_tokens);
    r["streams_completed"] = json!(g.streams_completed);
    r["disconnects"] = json!(g.disconnects);
    r["designed_429"] = json!(g.designed_429);
    r["stalls"] = json!(stalls);
    r["rss"] = json!({"start_kb": rss_start, "ref_at_s": ref_at.as_secs_f64(), "ref_kb": rss_ref, "end_kb": rss_end, "max_kb": rss_max});
    r["criteria"] = criteria.iter().map(|(n, ok, d)| json!({"criterion": n, "passed": ok, "detail": d})).collect();
    r["passed"] = json!(passed);
    r
}
