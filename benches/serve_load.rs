//! Load benchmark of `infer serve`: N concurrent chat clients (closed loop, streaming) with realistic
//! prompt and answer lengths against an in-process server on the SmolLM2-135M-Instruct Q4_1 GGUF.
//! Reports TTFT, TPOT and ITL (p50/p99) and output tokens/s for N = 1, 4, 16, 64, then the gain of
//! prefix caching (a shared system prompt, cache on vs off).
//!
//!   cargo bench --bench serve_load -- [--model PATH] [--clients 1,4,16,64] [--threads N] [--json FILE]
//!
//! Under `cargo test` (no `--bench` argument) it runs one tiny round as a smoke test.

use std::path::{Path, PathBuf};
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
            let Some(data) = event.trim().strip_prefix("data: ") else { continue };
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
    let path = model.to_path_buf();
    let cfg = ServerConfig {
        // The same step budget as `infer serve`'s default --max-batch-tokens.
        engine: EngineConfig { max_context: Some(2048), max_seqs, prefix_caching, max_batch_tokens: 256, ..Default::default() },
        max_queue: 1024,
        ..Default::default()
    };
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
