//! `infer bench`: llama-bench's measurements for infer — prompt processing (`pp N`: one forward pass
//! over N tokens) and text generation (`tg N`: N single-token decode steps), each repeated, reported
//! as tokens/s mean ± standard deviation in llama-bench's table, or as JSON records with its field
//! names (`n_prompt`, `n_gen`, `n_threads`, `avg_ts`, `stddev_ts`, ...) so one script reads both.

use std::path::Path;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::Args;
use infer::kv_cache::KvDtype;
use infer::kv_cache::{default_cache_dtype, parse_cache_dtype, PagedKvCache};
use infer::models::{BatchInput, LogitsWanted};
use infer::{DTypeChoice, LoadOptions, LoadedModel};
use serde_json::json;

#[derive(Args)]
pub struct BenchArgs {
    /// The model (.gguf file, HF folder or Hub id).
    pub model: String,
    /// Prompt lengths to process (comma-separated; 0 skips).
    #[arg(short = 'p', long = "n-prompt", default_value = "512", value_delimiter = ',')]
    pub n_prompt: Vec<usize>,
    /// Tokens to generate (comma-separated; 0 skips).
    #[arg(short = 'n', long = "n-gen", default_value = "128", value_delimiter = ',')]
    pub n_gen: Vec<usize>,
    /// Thread counts (comma-separated; default: the cores this process may use).
    #[arg(short = 't', long = "threads", value_delimiter = ',')]
    pub threads: Vec<usize>,
    /// Repetitions of each test.
    #[arg(short = 'r', long = "repetitions", default_value_t = 5)]
    pub repetitions: usize,
    /// Output: md (table) or json (records with llama-bench's field names).
    #[arg(short = 'o', long = "output", default_value = "md")]
    pub output: String,
    /// Same as `-o json`.
    #[arg(long)]
    pub json: bool,
    /// Which .gguf file to use when MODEL is a Hub repo.
    #[arg(long)]
    pub gguf_file: Option<String>,
    /// Compute dtype for safetensors weights.
    #[arg(long, default_value = "auto")]
    pub dtype: String,
    /// Quantize safetensors weights at load: q8_0, q4_0, q4_k, q5_k or q6_k.
    #[arg(long, value_name = "TYPE")]
    pub quantize: Option<String>,
    /// Device: cpu, cuda, cuda:N or metal.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// KV cache storage: f32, f16 or q8_0 (bf16 on a GPU); default: f32 on the CPU, the model's
    /// dtype on a GPU.
    #[arg(long, value_name = "TYPE")]
    pub kv_cache_dtype: Option<String>,
    /// Also time decode steps that verify K drafted tokens (comma-separated): each of the tg
    /// steps feeds 1 + K tokens and computes their logits; reported as steps/s (`tgN+vK`), to set
    /// against tgN: what checking a draft costs.
    #[arg(long, value_name = "K", value_delimiter = ',')]
    pub verify: Vec<usize>,
    /// Context already in the cache before each test (comma-separated), as llama-bench's `-d`:
    /// prefilled untimed, so `tgN @ dD` times decode steps reading D + N keys.
    #[arg(short = 'd', long = "n-depth", value_delimiter = ',', default_value = "0")]
    pub n_depth: Vec<usize>,
    /// Also time generation through the engine on a real prompt (--prompt-file, chat template,
    /// greedy), without and with speculative decoding: `ngram` (prompt lookup) or a draft model.
    #[arg(long, value_name = "ngram|MODEL")]
    pub draft: Option<String>,
    /// Most tokens drafted per step (with --draft).
    #[arg(long, default_value_t = 8, value_name = "N")]
    pub draft_max: usize,
    /// The prompt for --draft: a text file (the user message of a chat).
    #[arg(long, value_name = "FILE")]
    pub prompt_file: Option<std::path::PathBuf>,
}

fn mean_sd(v: &[f64]) -> (f64, f64) {
    let n = v.len() as f64;
    let mean = v.iter().sum::<f64>() / n;
    let var = if v.len() > 1 { v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0) } else { 0.0 };
    (mean, var.sqrt())
}

/// Pseudo-random token ids (llama-bench also feeds random tokens).
fn tokens(n: usize, vocab: usize, seed: u64) -> Vec<u32> {
    let mut x = seed.wrapping_mul(0x9E3779B97F4A7C15) | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x % vocab as u64) as u32
        })
        .collect()
}

/// Seconds for one forward pass over `n` prompt tokens (empty cache).
/// A KV cache for `n` tokens where the model runs.
fn new_cache(m: &LoadedModel, n: usize, kv: Option<KvDtype>) -> Result<PagedKvCache> {
    let device = m.model.device();
    let dtype = kv.unwrap_or_else(|| default_cache_dtype(&device, m.model.dtype()));
    Ok(PagedKvCache::new_on(m.config(), 16, n.div_ceil(16) + 1, &device, dtype)?)
}

/// Fills the first `depth` positions of `table`'s sequence (untimed), in passes of 512 tokens.
fn prefill(m: &LoadedModel, cache: &mut PagedKvCache, table: &[u32], depth: usize, seed: u64) -> Result<()> {
    let toks = tokens(depth, m.config().vocab_size, seed ^ 0x5eed);
    let mut logits = Vec::new();
    for start in (0..depth).step_by(512) {
        let mut batch = BatchInput::default();
        batch.push_sequence(&toks[start..(start + 512).min(depth)], start, table, 16, LogitsWanted::Last);
        m.model.forward_into(&batch, cache, &mut logits)?;
    }
    Ok(())
}

/// Seconds for one forward pass over `n` prompt tokens after `depth` tokens of context.
fn run_pp(m: &LoadedModel, n: usize, depth: usize, kv: Option<KvDtype>, seed: u64) -> Result<f64> {
    let cfg = m.config();
    let mut cache = new_cache(m, depth + n, kv)?;
    let mut table = Vec::new();
    cache.reserve(&mut table, depth + n)?;
    prefill(m, &mut cache, &table, depth, seed)?;
    let mut batch = BatchInput::default();
    batch.push_sequence(&tokens(n, cfg.vocab_size, seed), depth, &table, 16, LogitsWanted::Last);
    let t0 = Instant::now();
    m.model.forward_into(&batch, &mut cache, &mut Vec::new())?;
    Ok(t0.elapsed().as_secs_f64())
}

/// Seconds for `n` decode steps after `depth` tokens of context, each feeding one token plus
/// `verify` drafted ones (their logits too) and keeping the first: the cache grows by one token per
/// step.
fn run_tg(m: &LoadedModel, n: usize, depth: usize, verify: usize, kv: Option<KvDtype>, seed: u64) -> Result<f64> {
    let cfg = m.config();
    let mut cache = new_cache(m, depth + n + verify, kv)?;
    let mut table = Vec::new();
    cache.reserve(&mut table, depth + n + verify)?;
    prefill(m, &mut cache, &table, depth, seed)?;
    let toks = tokens(n + verify, cfg.vocab_size, seed);
    let mut logits = Vec::new();
    let t0 = Instant::now();
    for i in 0..n {
        let mut batch = BatchInput::default();
        let want = if verify == 0 { LogitsWanted::Last } else { LogitsWanted::LastN(verify + 1) };
        batch.push_sequence(&toks[i..i + 1 + verify], depth + i, &table, 16, want);
        m.model.forward_into(&batch, &mut cache, &mut logits)?;
    }
    Ok(t0.elapsed().as_secs_f64())
}

/// Generation through the engine on `prompt` (greedy, at most `n` tokens), with the speculative
/// decoding of `spec` if any: (tokens per second of decoding, tokens, drafted, kept).
fn run_engine(
    m: &LoadedModel,
    prompt: &[u32],
    n: usize,
    kv: Option<KvDtype>,
    spec: Option<infer::SpeculativeConfig>,
) -> Result<(f64, usize, usize, usize)> {
    let cfg = infer::EngineConfig {
        max_seqs: 1,
        max_context: Some(prompt.len() + n + 1),
        kv_cache_dtype: kv,
        speculative: spec,
        ..Default::default()
    };
    let mut engine = infer::Engine::new(m.model.clone(), m.tokenizer.clone(), m.eos_token_ids.clone(), cfg)?;
    let params = infer::SamplingParams { max_tokens: Some(n), ..infer::SamplingParams::greedy() };
    engine.add_request(prompt.to_vec(), params)?;
    while engine.has_work() {
        engine.step()?;
    }
    let s = engine.stats();
    let rate = s.generated_tokens.saturating_sub(1) as f64 / s.decode_time.as_secs_f64().max(1e-9);
    Ok((rate, s.generated_tokens, s.draft_tokens, s.accepted_draft_tokens))
}

fn model_bytes(spec: &str) -> u64 {
    let p = Path::new(spec);
    if p.is_file() {
        return p.metadata().map(|m| m.len()).unwrap_or(0);
    }
    std::fs::read_dir(p)
        .map(|d| {
            d.flatten()
                .filter(|e| e.path().extension().is_some_and(|x| x == "safetensors"))
                .filter_map(|e| e.metadata().ok())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0)
}

/// The largest CPU cache in bytes (the last level), from Linux's sysfs; `None` elsewhere.
fn last_level_cache_bytes() -> Option<usize> {
    let mut best: Option<(u32, usize)> = None;
    for i in 0..16 {
        let dir = format!("/sys/devices/system/cpu/cpu0/cache/index{i}");
        let Ok(level) = std::fs::read_to_string(format!("{dir}/level")) else { break };
        let Ok(size) = std::fs::read_to_string(format!("{dir}/size")) else { continue };
        let (Ok(level), Some(bytes)) = (level.trim().parse::<u32>(), cache_size(&size)) else { continue };
        if best.is_none_or(|(l, _)| level > l) {
            best = Some((level, bytes));
        }
    }
    best.map(|(_, b)| b)
}

/// A sysfs cache size ("48K", "480M", "491520K") in bytes.
fn cache_size(s: &str) -> Option<usize> {
    let s = s.trim();
    let (digits, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let mult = match unit {
        "" => 1,
        "K" => 1 << 10,
        "M" => 1 << 20,
        "G" => 1 << 30,
        _ => return None,
    };
    digits.parse::<usize>().ok()?.checked_mul(mult)
}

/// Bytes of the buffer `read_bandwidth` reads: four times the last-level cache (STREAM's rule, so
/// the passes come from memory even where a VM reports a huge L3: 480 MiB on the Xeon here, where
/// 1.9 GiB measured 32-35 GB/s, as 512 MiB had), at least 512 MiB and at most 4 GiB.
fn bandwidth_buffer_bytes(llc: Option<usize>) -> usize {
    llc.map_or(0, |c| c.saturating_mul(4)).clamp(512 << 20, 4 << 30)
}

/// Memory read bandwidth in bytes/s with `threads` threads: each sums its share of a buffer far
/// larger than the caches ([`bandwidth_buffer_bytes`]), best of three passes, as the weights are
/// read in decoding. (Wider loads, software prefetching or several streams per thread measured no
/// faster on the machines tried.)
fn read_bandwidth(threads: usize) -> f64 {
    let words = bandwidth_buffer_bytes(last_level_cache_bytes()) / 8;
    let mut buf = vec![0u64; words];
    for (i, w) in buf.iter_mut().enumerate() {
        *w = i as u64;
    }
    let chunk = words.div_ceil(threads);
    let mut best = f64::MAX;
    let mut sink = 0u64;
    for _ in 0..3 {
        let t0 = Instant::now();
        sink ^= std::thread::scope(|s| {
            let hs: Vec<_> = buf
                .chunks(chunk)
                .map(|c| {
                    s.spawn(move || {
                        // Eight independent sums, so the loads are not serialized by one add chain.
                        let mut acc = [0u64; 8];
                        for w in c.chunks_exact(8) {
                            for j in 0..8 {
                                acc[j] = acc[j].wrapping_add(w[j]);
                            }
                        }
                        acc.iter().fold(0, |a, &b| a ^ b)
                    })
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap_or(0)).fold(0, |a, b| a ^ b)
        });
        best = best.min(t0.elapsed().as_secs_f64());
    }
    std::hint::black_box(sink);
    (words * 8) as f64 / best
}

/// Bytes of weights one decode step reads: the file, less the token embedding table when the
/// output head has its own (only one row of it is read per token).
fn bytes_per_token(m: &LoadedModel, file_bytes: u64, params: u64) -> f64 {
    let c = m.config();
    let emb = (c.vocab_size * c.hidden_size) as f64;
    let per_param = file_bytes as f64 / params.max(1) as f64;
    if c.tie_word_embeddings {
        file_bytes as f64
    } else {
        file_bytes as f64 - emb * per_param
    }
}

/// Parameters from the config (embeddings, attention, MLP, norms, head).
fn model_params(m: &LoadedModel) -> u64 {
    let c = m.config();
    let (h, i, l, v) = (c.hidden_size as u64, c.intermediate_size as u64, c.num_hidden_layers as u64, c.vocab_size as u64);
    let (q, kv) = ((c.num_attention_heads * c.head_dim) as u64, (c.num_key_value_heads * c.head_dim) as u64);
    let per_layer = h * q + 2 * h * kv + q * h + 3 * h * i + 2 * h;
    v * h + l * per_layer + h + if c.tie_word_embeddings { 0 } else { v * h }
}

pub fn run(args: BenchArgs) -> Result<()> {
    let json_out = args.json || args.output == "json";
    if !json_out && args.output != "md" {
        bail!("-o {}: expected md or json", args.output);
    }
    if args.repetitions == 0 {
        bail!("-r must be at least 1");
    }
    let threads = if args.threads.is_empty() {
        vec![std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)]
    } else {
        args.threads.clone()
    };
    if threads.contains(&0) {
        bail!("-t: thread counts must be at least 1");
    }
    let max_threads = *threads.iter().max().expect("one thread count");
    // candle sizes its loops from RAYON_NUM_THREADS; the global pool is the largest count.
    std::env::set_var("RAYON_NUM_THREADS", max_threads.to_string());
    let dtype: DTypeChoice = args.dtype.parse()?;
    let quantize = args.quantize.as_deref().map(str::parse).transpose()?;
    let device = infer::parse_device(&args.device)?;
    let kv = args.kv_cache_dtype.as_deref().map(parse_cache_dtype).transpose()?;
    let backend = if device.is_cuda() {
        "CUDA"
    } else if device.is_metal() {
        "Metal"
    } else {
        "CPU"
    };
    // The table names the CPU kernel path too (AMX, AVX-512, AVX2, scalar); the JSON keeps
    // llama-bench's `backends` and adds `cpu_kernels`.
    let kernels = crate::kernels_from_env()?;
    let cpu_kernels = kernels.isa().name();
    let backend_md = if backend == "CPU" { format!("CPU ({cpu_kernels})") } else { backend.to_string() };
    let opts = LoadOptions { device, dtype, gguf_file: args.gguf_file.clone(), quantize, kernels, ..Default::default() };
    let model = crate::alloc::while_loading(|| infer::load(&args.model, opts))?;
    let kv_type = kv.unwrap_or_else(|| default_cache_dtype(&model.model.device(), model.model.dtype()));
    let kv_name = kv_type.name();
    let name = Path::new(&args.model).file_name().map(|f| f.to_string_lossy().to_string()).unwrap_or_else(|| args.model.clone());
    let size = model_bytes(&args.model);
    let params = model_params(&model);
    // (prompt tokens, generated tokens, drafted tokens verified per step, depth)
    let mut tests: Vec<(usize, usize, usize, usize)> = Vec::new();
    for &d in &args.n_depth {
        tests.extend(args.n_prompt.iter().filter(|&&p| p > 0).map(|&p| (p, 0, 0, d)));
        for &n in args.n_gen.iter().filter(|&&n| n > 0) {
            tests.push((0, n, 0, d));
            tests.extend(args.verify.iter().filter(|&&k| k > 0).map(|&k| (0, n, k, d)));
        }
    }
    let max_ctx = model.config().max_position_embeddings;
    if let Some(&(p, n, k, d)) = tests.iter().find(|&&(p, n, k, d)| d + p.max(n + k) > max_ctx) {
        bail!("test of {} tokens exceeds the model's context ({max_ctx})", d + p.max(n + k));
    }
    let spec = match &args.draft {
        None => None,
        Some(d) => {
            let most = infer::speculative::MAX_DRAFT;
            if args.draft_max == 0 || args.draft_max > most {
                bail!("--draft-max must be in 1..={most}");
            }
            let path = args.prompt_file.as_ref().context("--draft needs --prompt-file (the text to answer)")?;
            let text = std::fs::read_to_string(path).with_context(|| format!("--prompt-file: cannot read {}", path.display()))?;
            let tmpl = model.chat_template.as_ref().context("--draft: the model has no chat template")?;
            let rendered = tmpl.render(&[infer::ChatMessage::user(text)], true)?;
            let prompt = model.tokenizer.encode(&rendered, false)?;
            let cfg = if d == "ngram" {
                infer::SpeculativeConfig::ngram(args.draft_max)
            } else {
                let dm = crate::alloc::while_loading(|| {
                    infer::load(d, LoadOptions { device: model.device.clone(), dtype, quantize, kernels, ..Default::default() })
                })?;
                infer::SpeculativeConfig::draft_model(dm.model, dm.tokenizer, args.draft_max)
            };
            Some((prompt, cfg))
        }
    };
    if !json_out {
        println!("| model | size | params | backend | threads | test | t/s |");
        println!("| --- | ---: | ---: | --- | ---: | ---: | ---: |");
    }
    let mut records = Vec::new();
    let weight_bytes = bytes_per_token(&model, size, params);
    // What each token of context takes in the KV cache (keys and values of every layer).
    let kv_per_token = PagedKvCache::bytes_per_block_of(model.config(), 16, kv_type) / 16;
    if !json_out {
        eprintln!("KV cache {kv_name}: {:.1} KiB per token of context", kv_per_token as f64 / 1024.0);
    }
    for &t in &threads {
        let pool = rayon::ThreadPoolBuilder::new().num_threads(t).build().context("starting the thread pool")?;
        // Decoding streams the weights once per step: its rate against the machine's.
        let bandwidth = if backend == "CPU" && tests.iter().any(|&(p, _, _, _)| p == 0) { Some(read_bandwidth(t)) } else { None };
        for &(p, n, k, d) in &tests {
            let run = |seed| if p > 0 { run_pp(&model, p, d, kv, seed) } else { run_tg(&model, n, d, k, kv, seed) };
            // One warm-up run, as llama-bench does.
            pool.install(|| run(0))?;
            let mut secs = Vec::with_capacity(args.repetitions);
            for r in 0..args.repetitions {
                secs.push(pool.install(|| run(r as u64 + 1))?);
            }
            let ts: Vec<f64> = secs.iter().map(|s| (p + n) as f64 / s).collect();
            // A plain decode row's bandwidth is measured again right after it, and the higher of
            // the two is the ceiling: this machine's bandwidth drifts by ±25% between minutes.
            let bandwidth = match bandwidth {
                Some(b) if (p, k, d) == (0, 0, 0) => Some(b.max(read_bandwidth(t))),
                b => b,
            };
            let ns: Vec<u64> = secs.iter().map(|s| (s * 1e9) as u64).collect();
            let (avg_ts, sd_ts) = mean_sd(&ts);
            let (avg_ns, sd_ns) = mean_sd(&ns.iter().map(|&x| x as f64).collect::<Vec<_>>());
            let test = match (p, k) {
                (0, 0) => format!("tg{n}"),
                (0, k) => format!("tg{n}+v{k}"),
                _ => format!("pp{p}"),
            };
            let test = if d > 0 { format!("{test} @ d{d}") } else { test };
            if json_out {
                records.push(json!({
                    "build_commit": env!("CARGO_PKG_VERSION"),
                    "cpu_info": "",
                    "backends": backend,
                    "cpu_kernels": cpu_kernels,
                    "model_filename": args.model,
                    "model_type": format!("{:?}", model.config().architecture).to_lowercase(),
                    "model_size": size,
                    "model_n_params": params,
                    "n_batch": p.max(1),
                    "n_ubatch": p.max(1),
                    "n_threads": t,
                    "type_k": kv_name,
                    "type_v": kv_name,
                    "n_prompt": p,
                    "n_gen": n,
                    "n_depth": d,
                    "n_verify": k,
                    "kv_bytes_per_token": kv_per_token,
                    "weights_read_gbps": (p == 0).then(|| weight_bytes * avg_ts / 1e9),
                    "read_bandwidth_gbps": bandwidth.map(|b| b / 1e9),
                    "test_time": chrono_now(),
                    "avg_ns": avg_ns as u64,
                    "stddev_ns": sd_ns as u64,
                    "avg_ts": avg_ts,
                    "stddev_ts": sd_ts,
                    "samples_ns": ns,
                    "samples_ts": ts,
                }));
            } else {
                println!(
                    "| {name} | {:.2} MiB | {:.2} M | {backend_md} | {t} | {test} | {avg_ts:.2} ± {sd_ts:.2} |",
                    size as f64 / (1 << 20) as f64,
                    params as f64 / 1e6
                );
                if let (0, 0, 0, Some(bw)) = (p, k, d, bandwidth) {
                    let used = weight_bytes * avg_ts;
                    eprintln!(
                        "{test}: weights read at {:.1} GB/s = {:.0}% of the {:.1} GB/s this machine reads with {t} threads",
                        used / 1e9,
                        100.0 * used / bw,
                        bw / 1e9
                    );
                }
            }
        }
        // Generation on the prompt, without and with drafts, alternated.
        if let Some((prompt, cfg)) = &spec {
            let n = args.n_gen.iter().copied().find(|&n| n > 0).unwrap_or(128);
            let label = if args.draft.as_deref() == Some("ngram") { "ngram".to_string() } else { "draft model".to_string() };
            let (mut plain, mut drafted, mut counts) = (Vec::new(), Vec::new(), (0, 0, 0));
            pool.install(|| run_engine(&model, prompt, n, kv, Some(cfg.clone())))?;
            for _ in 0..args.repetitions {
                plain.push(pool.install(|| run_engine(&model, prompt, n, kv, None))?.0);
                let (rate, toks, d, a) = pool.install(|| run_engine(&model, prompt, n, kv, Some(cfg.clone())))?;
                drafted.push(rate);
                counts = (toks, d, a);
            }
            for (test, ts) in [(format!("gen{n} chat"), &plain), (format!("gen{n} chat +{label}"), &drafted)] {
                let (avg_ts, sd_ts) = mean_sd(ts);
                if json_out {
                    records.push(json!({
                        "model_filename": args.model, "n_threads": t, "test": test, "n_prompt": prompt.len(),
                        "n_gen": counts.0, "draft_tokens": counts.1, "accepted_draft_tokens": counts.2,
                        "avg_ts": avg_ts, "stddev_ts": sd_ts, "samples_ts": ts,
                    }));
                } else {
                    println!(
                        "| {name} | {:.2} MiB | {:.2} M | {backend_md} | {t} | {test} | {avg_ts:.2} ± {sd_ts:.2} |",
                        size as f64 / (1 << 20) as f64,
                        params as f64 / 1e6
                    );
                }
            }
            if !json_out {
                eprintln!(
                    "gen: {} prompt tokens, {} generated; drafts: {} of {} kept ({:.0}%)",
                    prompt.len(),
                    counts.0,
                    counts.2,
                    counts.1,
                    100.0 * counts.2 as f64 / counts.1.max(1) as f64
                );
            }
        }
    }
    if json_out {
        println!("{}", serde_json::to_string_pretty(&records)?);
    }
    Ok(())
}

fn chrono_now() -> String {
    let secs = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    format!("{secs}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bandwidth_buffer_is_four_last_level_caches_within_bounds() {
        assert_eq!(cache_size("491520K\n"), Some(480 << 20));
        assert_eq!(cache_size("32M"), Some(32 << 20));
        assert_eq!(cache_size("48K"), Some(48 << 10));
        assert_eq!(cache_size("1G"), Some(1 << 30));
        assert_eq!(cache_size("12"), Some(12));
        for bad in ["", "K", "32X", "-4K", "99999999999999999999999G"] {
            assert_eq!(cache_size(bad), None, "{bad:?}");
        }
        assert_eq!(bandwidth_buffer_bytes(Some(480 << 20)), 1920 << 20);
        assert_eq!(bandwidth_buffer_bytes(Some(32 << 20)), 512 << 20);
        assert_eq!(bandwidth_buffer_bytes(None), 512 << 20);
        assert_eq!(bandwidth_buffer_bytes(Some(usize::MAX)), 4 << 30);
    }
}
