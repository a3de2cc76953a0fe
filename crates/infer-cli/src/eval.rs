//! `infer eval`: compare models on your own data, side by side: perplexity of a text file
//! (llama.cpp's method), or JSON Lines tasks — greedy generation scored by exact match / contains /
//! regex, multiple choice scored by log-likelihood (raw and per character).

use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::Args;
use infer::eval::{
    choice_loglikelihoods, load_jsonl, perplexity, run_generation, score_choice, score_generation, wilson_95, MatchMode, PerplexityOptions,
    TaskItems,
};

use crate::eval_cache::{item_key, model_fingerprint, EvalCache};
use infer::{DTypeChoice, LoadOptions};
use serde_json::json;

#[derive(Args)]
pub struct EvalArgs {
    /// A model to evaluate (repeat for a side-by-side comparison): .gguf file, HF folder or Hub id.
    #[arg(long = "model", required = true, value_name = "MODEL")]
    pub models: Vec<String>,
    /// The data: a plain-text file (perplexity), or JSON Lines of {"prompt" | "messages", "answer"}
    /// (generation) or {"question", "choices", "answer"} (multiple choice).
    #[arg(long)]
    pub data: PathBuf,
    /// Task: auto (from the file), perplexity, generation, choice.
    #[arg(long, default_value = "auto")]
    pub task: String,
    /// Generation: how an answer is scored: exact (after trimming), contains (case-insensitive), regex.
    #[arg(long = "match", default_value = "exact")]
    pub match_mode: String,
    /// Generation: most tokens per answer.
    #[arg(long, default_value_t = 256)]
    pub max_tokens: usize,
    /// Perplexity window length in tokens.
    #[arg(long, default_value_t = 512)]
    pub ctx: usize,
    /// Perplexity: start a window every STRIDE tokens and score its last STRIDE tokens (default:
    /// non-overlapping windows scoring their second half, as llama-perplexity).
    #[arg(long)]
    pub stride: Option<usize>,
    /// Perplexity: KV cache storage (f32, f16 or q8_0 on the CPU; default f32), to measure what a
    /// smaller cache costs.
    #[arg(long, value_name = "TYPE")]
    pub kv_cache_dtype: Option<String>,
    /// Evaluate at most N items (perplexity: windows).
    #[arg(long)]
    pub limit: Option<usize>,
    /// Write the results as JSON to FILE.
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,
    /// Write the results as CSV to FILE.
    #[arg(long, value_name = "FILE")]
    pub csv: Option<PathBuf>,
    /// Do not read or write the results cache (~/.cache/infer/eval, or INFER_EVAL_CACHE).
    #[arg(long)]
    pub no_cache: bool,
    /// Write a self-contained HTML page with bar charts of the metric (with its interval) and the speed.
    #[arg(long, value_name = "FILE.html")]
    pub report: Option<PathBuf>,
    /// CPU threads (default: the cores this process may use).
    #[arg(short = 't', long)]
    pub threads: Option<usize>,
    /// Device: cpu, cuda, cuda:N or metal.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Compute dtype for safetensors weights.
    #[arg(long, default_value = "auto")]
    pub dtype: String,
}

/// One row of the comparison: a model and one metric.
struct Row {
    model: String,
    task: &'static str,
    metric: String,
    value: f64,
    ci: (f64, f64),
    /// Items or tokens the metric is over.
    n: usize,
    tokens_per_second: f64,
    load_secs: f64,
    peak_bytes: Option<u64>,
}

/// Whether the file is JSON Lines (by extension, or a first non-empty line holding a JSON object).
fn looks_like_jsonl(path: &Path) -> Result<bool> {
    if path.extension().is_some_and(|e| e == "jsonl") {
        return Ok(true);
    }
    let f = std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    for line in std::io::BufReader::new(f).lines().take(50) {
        let Ok(line) = line else { return Ok(false) };
        let t = line.trim();
        if !t.is_empty() {
            return Ok(t.starts_with('{') && serde_json::from_str::<serde_json::Value>(t).is_ok_and(|v| v.is_object()));
        }
    }
    Ok(false)
}

/// Peak resident memory of this process so far (Linux), and a reset of that peak.
fn peak_rss() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

fn reset_peak_rss() {
    // "5" resets the peak resident set size (VmHWM) of the process.
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

pub fn run(args: EvalArgs) -> Result<()> {
    crate::set_threads(args.threads)?;
    if !args.data.is_file() {
        bail!("{}: no such file (--data)", args.data.display());
    }
    let task = match args.task.as_str() {
        "auto" if looks_like_jsonl(&args.data)? => "jsonl",
        "auto" | "perplexity" => "perplexity",
        "generation" | "choice" => "jsonl",
        other => bail!("--task `{other}` is not one of auto, perplexity, generation, choice"),
    };
    let mode: MatchMode = args.match_mode.parse()?;
    let (text, items) = if task == "perplexity" {
        let text = std::fs::read_to_string(&args.data).with_context(|| format!("cannot read {} as UTF-8 text", args.data.display()))?;
        if text.trim().is_empty() {
            bail!("{} is empty: perplexity needs some text", args.data.display());
        }
        (text, None)
    } else {
        let items = load_jsonl(&args.data, args.limit).with_context(|| format!("reading {}", args.data.display()))?;
        match (&items, args.task.as_str()) {
            (TaskItems::Generation(_), "choice") => bail!("{} holds generation items, not multiple choice", args.data.display()),
            (TaskItems::MultipleChoice(_), "generation") => bail!("{} holds multiple-choice items, not generation", args.data.display()),
            _ => {}
        }
        (String::new(), Some(items))
    };
    let device = infer::parse_device(&args.device)?;
    let dtype: DTypeChoice = args.dtype.parse()?;
    let kv_cache_dtype = args.kv_cache_dtype.as_deref().map(infer::kv_cache::parse_cache_dtype).transpose()?;
    let opts = PerplexityOptions { ctx: args.ctx, stride: args.stride, limit: args.limit, kv_cache_dtype, ..Default::default() };
    let mut rows = Vec::new();
    for spec in &args.models {
        reset_peak_rss();
        let t0 = Instant::now();
        let load_opts = || -> Result<LoadOptions> {
            Ok(LoadOptions { device: device.clone(), dtype, kernels: crate::kernels_from_env()?, ..Default::default() })
        };
        let load_options = load_opts()?;
        let model = crate::alloc::while_loading(|| infer::load(spec, load_options)).with_context(|| format!("loading {spec}"))?;
        let load_secs = t0.elapsed().as_secs_f64();
        let bar = indicatif::ProgressBar::new(0).with_style(
            indicatif::ProgressStyle::with_template("{msg} [{bar:30}] {pos}/{len}, {per_sec}, ETA {eta}")
                .expect("valid template")
                .progress_chars("=> "),
        );
        bar.set_message(model.name.clone());
        let b = bar.clone();
        let mut progress = move |done: usize, total: usize| {
            b.set_length(total as u64);
            b.set_position(done as u64);
        };
        if !args.no_cache && crate::eval_cache::cache_dir().is_none() {
            eprintln!("note: results are not cached (no HOME, XDG_CACHE_HOME or INFER_EVAL_CACHE)");
        }
        let mut cache = EvalCache::open(&model_fingerprint(spec, &load_opts()?, &model)?, !args.no_cache)?;
        let cached_before = cache.len();
        let name = model.name.clone();
        let row = |task, metric: String, value, ci, n, tps| Row {
            model: name.clone(),
            task,
            metric,
            value,
            ci,
            n,
            tokens_per_second: tps,
            load_secs,
            peak_bytes: None,
        };
        let mut new_rows = match &items {
            None => {
                let mut parts = vec![
                    "perplexity".to_string(),
                    text.clone(),
                    args.ctx.to_string(),
                    format!("{:?}", args.stride),
                    format!("{:?}", args.limit),
                ];
                // (Only when given, so the keys of earlier results stay valid.)
                parts.extend(kv_cache_dtype.map(|d| format!("kv {d}")));
                let key = item_key(&parts.iter().map(String::as_str).collect::<Vec<_>>());
                let (ppl, se, n, tps) = match cache.get(&key) {
                    Some(v) => (
                        v["perplexity"].as_f64().unwrap_or(f64::NAN),
                        v["std_error"].as_f64().unwrap_or(f64::NAN),
                        v["n"].as_u64().unwrap_or(0) as usize,
                        f64::NAN,
                    ),
                    None => {
                        let r = perplexity(&model, &text, &opts, &mut progress)?;
                        cache.put(&key, json!({"perplexity": r.perplexity, "std_error": r.std_error, "n": r.scored_tokens}))?;
                        (r.perplexity, r.std_error, r.scored_tokens, r.tokens_per_second)
                    }
                };
                vec![row("perplexity", "perplexity".into(), ppl, (ppl - 1.96 * se, ppl + 1.96 * se), n, tps)]
            }
            Some(TaskItems::Generation(g)) => {
                // Answers are cached (scoring them is instant); chunks of 16 run through the engine together.
                let keys: Vec<String> = g
                    .iter()
                    .map(|it| {
                        let msgs = serde_json::to_string(&it.messages).unwrap_or_default();
                        item_key(&["generation", &args.max_tokens.to_string(), &msgs, it.raw_prompt.as_deref().unwrap_or("")])
                    })
                    .collect();
                let todo: Vec<usize> = (0..g.len()).filter(|&i| cache.get(&keys[i]).is_none()).collect();
                let (mut done, mut tokens, mut secs) = (g.len() - todo.len(), 0.0, 0.0);
                for chunk in todo.chunks(16) {
                    let items: Vec<_> = chunk.iter().map(|&i| g[i].clone()).collect();
                    let t0 = Instant::now();
                    let r = run_generation(&model, &items, mode, args.max_tokens, &mut |_, _| {})?;
                    let dt = t0.elapsed().as_secs_f64();
                    tokens += r.tokens_per_second * dt;
                    secs += dt;
                    for (&i, out) in chunk.iter().zip(r.outputs) {
                        cache.put(&keys[i], json!(out))?;
                    }
                    done += chunk.len();
                    progress(done, g.len());
                }
                let outputs: Vec<String> =
                    keys.iter().map(|k| cache.get(k).and_then(|v| v.as_str()).unwrap_or_default().to_string()).collect();
                let correct = score_generation(g, &outputs, mode)?;
                let metric = format!("accuracy ({})", args.match_mode);
                let tps = if secs > 0.0 { tokens / secs } else { f64::NAN };
                vec![row("generation", metric, correct as f64 / g.len() as f64, wilson_95(correct, g.len()), g.len(), tps)]
            }
            Some(TaskItems::MultipleChoice(c)) => {
                let keys: Vec<String> = c.iter().map(|it| item_key(&["choice", &it.question, &it.choices.join("\u{1f}")])).collect();
                let todo: Vec<usize> = (0..c.len()).filter(|&i| cache.get(&keys[i]).is_none()).collect();
                let (mut done, mut tokens, mut secs) = (c.len() - todo.len(), 0usize, 0.0);
                for chunk in todo.chunks(32) {
                    let items: Vec<_> = chunk.iter().map(|&i| c[i].clone()).collect();
                    let t0 = Instant::now();
                    let lls = choice_loglikelihoods(&model, &items, &mut |_, _| {})?;
                    secs += t0.elapsed().as_secs_f64();
                    tokens += lls.tokens;
                    for (&i, ll) in chunk.iter().zip(lls.per_item) {
                        cache.put(&keys[i], json!(ll))?;
                    }
                    done += chunk.len();
                    progress(done, c.len());
                }
                let lls: Vec<Vec<f64>> =
                    keys.iter().map(|k| cache.get(k).and_then(|v| serde_json::from_value(v.clone()).ok()).unwrap_or_default()).collect();
                let (correct, norm, _) = score_choice(c, &lls);
                let tps = if secs > 0.0 { tokens as f64 / secs } else { f64::NAN };
                vec![
                    row("choice", "accuracy".into(), correct as f64 / c.len() as f64, wilson_95(correct, c.len()), c.len(), tps),
                    row("choice", "accuracy (per char)".into(), norm as f64 / c.len() as f64, wilson_95(norm, c.len()), c.len(), tps),
                ]
            }
        };
        if cached_before > 0 && !args.no_cache {
            eprintln!("{}: {cached_before} cached results available", model.name);
        }
        bar.finish_and_clear();
        let peak = peak_rss();
        for r in &mut new_rows {
            r.peak_bytes = peak;
        }
        rows.extend(new_rows);
    }
    print_table(&rows);
    if let Some(path) = &args.json {
        let recs: Vec<_> = rows
            .iter()
            .map(|r| {
                json!({
                    "model": r.model, "task": r.task, "metric": r.metric, "value": r.value, "ci95": [r.ci.0, r.ci.1],
                    "n": r.n, "tokens_per_second": r.tokens_per_second, "peak_memory_bytes": r.peak_bytes,
                    "load_seconds": r.load_secs, "ctx": args.ctx, "stride": args.stride,
                })
            })
            .collect();
        std::fs::write(path, serde_json::to_string_pretty(&recs)? + "\n").with_context(|| format!("writing {}", path.display()))?;
    }
    if let Some(path) = &args.report {
        let report: Vec<_> = rows
            .iter()
            .map(|r| crate::eval_report::ReportRow {
                model: &r.model,
                metric: &r.metric,
                value: r.value,
                ci: r.ci,
                n: r.n,
                tokens_per_second: r.tokens_per_second,
                peak: r.peak_bytes.map(infer::memory::human).unwrap_or_else(|| "n/a".into()),
                load_secs: r.load_secs,
            })
            .collect();
        let title = format!("infer eval: {}", args.data.file_name().map(|f| f.to_string_lossy().to_string()).unwrap_or_default());
        std::fs::write(path, crate::eval_report::html(&title, &report)).with_context(|| format!("writing {}", path.display()))?;
    }
    if let Some(path) = &args.csv {
        let mut out = String::from("model,task,metric,value,ci95_low,ci95_high,n,tokens_per_second,peak_memory_bytes,load_seconds\n");
        let q = |s: &str| format!("\"{}\"", s.replace('"', "\"\""));
        for r in &rows {
            out.push_str(&format!(
                "{},{},{},{},{},{},{},{},{},{}\n",
                q(&r.model),
                r.task,
                q(&r.metric),
                r.value,
                r.ci.0,
                r.ci.1,
                r.n,
                r.tokens_per_second,
                r.peak_bytes.map(|b| b.to_string()).unwrap_or_default(),
                r.load_secs
            ));
        }
        std::fs::write(path, out).with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

fn print_table(rows: &[Row]) {
    println!("| model | task | metric | value | 95% CI | n | tokens/s | peak memory | load time |");
    println!("| --- | --- | --- | ---: | --- | ---: | ---: | ---: | ---: |");
    for r in rows {
        println!(
            "| {} | {} | {} | {:.4} | [{:.4}, {:.4}] | {} | {} | {} | {:.2} s |",
            r.model,
            r.task,
            r.metric,
            r.value,
            r.ci.0,
            r.ci.1,
            r.n,
            if r.tokens_per_second.is_nan() { "cached".to_string() } else { format!("{:.1}", r.tokens_per_second) },
            r.peak_bytes.map(infer::memory::human).unwrap_or_else(|| "n/a".into()),
            r.load_secs
        );
    }
}
