//! `infer eval`: compare models on your own data, side by side. This version scores plain-text
//! files by perplexity (llama.cpp's method); JSONL tasks are refused with a clear message.

use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::Args;
use infer::eval::{perplexity, PerplexityOptions, PerplexityResult};
use infer::{DTypeChoice, LoadOptions};
use serde_json::json;

#[derive(Args)]
pub struct EvalArgs {
    /// A model to evaluate (repeat for a side-by-side comparison): .gguf file, HF folder or Hub id.
    #[arg(long = "model", required = true, value_name = "MODEL")]
    pub models: Vec<String>,
    /// The data: a plain-text file (perplexity).
    #[arg(long)]
    pub data: PathBuf,
    /// Task: auto (from the file), perplexity.
    #[arg(long, default_value = "auto")]
    pub task: String,
    /// Perplexity window length in tokens.
    #[arg(long, default_value_t = 512)]
    pub ctx: usize,
    /// Perplexity: start a window every STRIDE tokens and score its last STRIDE tokens (default:
    /// non-overlapping windows scoring their second half, as llama-perplexity).
    #[arg(long)]
    pub stride: Option<usize>,
    /// Evaluate at most N items (perplexity: windows).
    #[arg(long)]
    pub limit: Option<usize>,
    /// Write the results as JSON to FILE.
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,
    /// Write the results as CSV to FILE.
    #[arg(long, value_name = "FILE")]
    pub csv: Option<PathBuf>,
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

/// One model's row of the comparison.
struct Row {
    model: String,
    result: PerplexityResult,
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

fn human_bytes(b: u64) -> String {
    let mib = b as f64 / (1024.0 * 1024.0);
    if mib >= 1024.0 {
        format!("{:.2} GiB", mib / 1024.0)
    } else {
        format!("{mib:.0} MiB")
    }
}

pub fn run(args: EvalArgs) -> Result<()> {
    crate::set_threads(args.threads)?;
    let task = match args.task.as_str() {
        "auto" if looks_like_jsonl(&args.data)? => bail!(
            "{} is JSON Lines: generation and multiple-choice tasks are not supported by this version of infer eval yet; \
             give a plain-text file for perplexity",
            args.data.display()
        ),
        "auto" | "perplexity" => "perplexity",
        other => bail!("--task `{other}` is not one of auto, perplexity"),
    };
    let text = std::fs::read_to_string(&args.data).with_context(|| format!("cannot read {} as UTF-8 text", args.data.display()))?;
    if text.trim().is_empty() {
        bail!("{} is empty: perplexity needs some text", args.data.display());
    }
    let device = infer::parse_device(&args.device)?;
    let dtype: DTypeChoice = args.dtype.parse()?;
    let opts = PerplexityOptions { ctx: args.ctx, stride: args.stride, limit: args.limit, ..Default::default() };
    let mut rows = Vec::new();
    for spec in &args.models {
        reset_peak_rss();
        let t0 = Instant::now();
        let model = infer::load(spec, LoadOptions { device: device.clone(), dtype, ..Default::default() })
            .with_context(|| format!("loading {spec}"))?;
        let load_secs = t0.elapsed().as_secs_f64();
        let bar = indicatif::ProgressBar::new(0).with_style(
            indicatif::ProgressStyle::with_template("{msg} [{bar:30}] {pos}/{len} windows, {per_sec}, ETA {eta}")
                .expect("valid template")
                .progress_chars("=> "),
        );
        bar.set_message(model.name.clone());
        let b = bar.clone();
        let result = perplexity(&model, &text, &opts, &mut |done, total| {
            b.set_length(total as u64);
            b.set_position(done as u64);
        })?;
        bar.finish_and_clear();
        rows.push(Row { model: model.name.clone(), result, load_secs, peak_bytes: peak_rss() });
    }
    print_table(task, &rows);
    if let Some(path) = &args.json {
        let recs: Vec<_> = rows
            .iter()
            .map(|r| {
                let (lo, hi) = ci95(&r.result);
                json!({
                    "model": r.model, "task": task, "metric": "perplexity", "value": r.result.perplexity,
                    "std_error": r.result.std_error, "ci95": [lo, hi], "scored_tokens": r.result.scored_tokens,
                    "windows": r.result.windows, "ctx": args.ctx, "stride": args.stride,
                    "tokens_per_second": r.result.tokens_per_second, "peak_memory_bytes": r.peak_bytes,
                    "load_seconds": r.load_secs,
                })
            })
            .collect();
        std::fs::write(path, serde_json::to_string_pretty(&recs)? + "\n").with_context(|| format!("writing {}", path.display()))?;
    }
    if let Some(path) = &args.csv {
        let mut out = String::from("model,task,metric,value,ci95_low,ci95_high,tokens_per_second,peak_memory_bytes,load_seconds\n");
        for r in &rows {
            let (lo, hi) = ci95(&r.result);
            let name = r.model.replace('"', "\"\"");
            out.push_str(&format!(
                "\"{name}\",{task},perplexity,{},{lo},{hi},{},{},{}\n",
                r.result.perplexity,
                r.result.tokens_per_second,
                r.peak_bytes.map(|b| b.to_string()).unwrap_or_default(),
                r.load_secs
            ));
        }
        std::fs::write(path, out).with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

/// 95% confidence interval of the perplexity (± 1.96 standard errors).
fn ci95(r: &PerplexityResult) -> (f64, f64) {
    (r.perplexity - 1.96 * r.std_error, r.perplexity + 1.96 * r.std_error)
}

fn print_table(task: &str, rows: &[Row]) {
    println!("| model | task | metric | value | 95% CI | tokens/s | peak memory | load time |");
    println!("| --- | --- | --- | ---: | --- | ---: | ---: | ---: |");
    for r in rows {
        let (lo, hi) = ci95(&r.result);
        println!(
            "| {} | {task} | perplexity ({} tokens) | {:.4} | [{lo:.4}, {hi:.4}] | {:.1} | {} | {:.2} s |",
            r.model,
            r.result.scored_tokens,
            r.result.perplexity,
            r.result.tokens_per_second,
            r.peak_bytes.map(human_bytes).unwrap_or_else(|| "n/a".into()),
            r.load_secs
        );
    }
}
