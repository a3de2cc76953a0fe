//! `infer serve`: the OpenAI-compatible HTTP server.

use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::Args;
use infer::{DTypeChoice, EngineConfig, LoadOptions};
use infer_server::ServerConfig;

use crate::ModelArgs;

#[derive(Args)]
pub struct ServeArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// More models to serve beside the first (each a .gguf file, a model folder or a Hub id;
    /// `NAME=PATH` names one). With several models (or a folder holding several .gguf files or model
    /// folders) each request is routed by its `model`; models load at their first request.
    #[arg(value_name = "MODELS")]
    pub more_models: Vec<String>,
    /// Several models: most loaded at once (0: no limit); loading another first unloads the least
    /// recently used idle one.
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub models_max: usize,
    /// Several models: most memory the loaded models' weights may take together, e.g. 8G (each
    /// counted by its files' size; KV caches come on top, see --kv-cache-mem); loading another
    /// first unloads least recently used idle ones until it fits. Default: no limit.
    #[arg(long, value_name = "SIZE")]
    pub models_mem: Option<String>,
    /// Several models: how long a model stays loaded after its last request: e.g. 30s, 5m, 1h;
    /// 0 unloads it as soon as its last request ends; -1 never.
    #[arg(long, value_name = "DURATION", default_value = "5m", allow_hyphen_values = true)]
    pub keep_alive: String,
    /// Several models: seconds a request waits for its model to load (or for room to load it)
    /// before a 503.
    #[arg(long, value_name = "SECS", default_value_t = 600)]
    pub load_timeout: u64,
    /// Address to listen on (loopback by default; 0.0.0.0 for every interface).
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    #[arg(long, default_value_t = 8080)]
    pub port: u16,
    /// Require `Authorization: Bearer KEY` on every /v1 request.
    #[arg(long, env = "INFER_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// The model id clients use (default: the model's name).
    #[arg(long)]
    pub served_model_name: Option<String>,
    /// Most sequences generated at once (continuous batching).
    #[arg(long, default_value_t = 32)]
    pub max_seqs: usize,
    /// Sequences that may wait beyond --max-seqs; further requests get 429.
    #[arg(long, default_value_t = 256)]
    pub max_queue: usize,
    /// KV cache memory, e.g. 512M or 2G (default: room for --max-seqs full contexts, at most half
    /// the memory available once the model is loaded).
    #[arg(long, value_name = "SIZE")]
    pub kv_cache_mem: Option<String>,
    /// Most tokens one engine step processes; longer prompts are prefilled in chunks this size,
    /// interleaved with the other sequences' decode steps (smaller: shorter stalls for running streams).
    #[arg(long, default_value_t = 256)]
    pub max_batch_tokens: usize,
    /// Turn off prefix caching (reuse of the KV blocks of prompt prefixes seen before).
    #[arg(long)]
    pub no_prefix_caching: bool,
    /// Largest request body, e.g. 8M.
    #[arg(long, value_name = "SIZE", default_value = "8M")]
    pub max_body_size: String,
    /// Allow browser requests from these origins (`*` for any). Off by default.
    #[arg(long, value_name = "ORIGIN", num_args = 1..)]
    pub cors: Vec<String>,
    /// Report `usage.prompt_tokens_details.cached_tokens` (off by default: with the shared prefix
    /// cache it tells one client what prompts others sent; clients can also send a `cache_salt`).
    #[arg(long)]
    pub enable_prompt_tokens_details: bool,
    /// How /v1/embeddings pools the model's token states: last (decoder embedding models such as
    /// Qwen3-Embedding) or mean.
    #[arg(long, default_value = "last", value_name = "last|mean")]
    pub pooling: String,
    /// Most open connections; beyond, new ones get 503 and are closed.
    #[arg(long, default_value_t = 512)]
    pub max_connections: usize,
    /// Seconds a client has to send a request's headers (idle keep-alive connections close after
    /// this too).
    #[arg(long, value_name = "SECS", default_value_t = 30)]
    pub header_timeout: u64,
    /// Seconds a client may read nothing of a response before it is disconnected (its sequences
    /// are cancelled and their KV blocks freed).
    #[arg(long, value_name = "SECS", default_value_t = 60)]
    pub write_timeout: u64,
    /// Seconds in-flight requests may finish after SIGINT/SIGTERM before they are cancelled.
    #[arg(long, default_value_t = 10)]
    pub shutdown_timeout: u64,
    /// How the model writes tool calls: hermes, llama3_json, mistral, mistral_v11, phi4_mini_json or
    /// generic (default: recognised from the chat template).
    #[arg(long, value_name = "FORMAT")]
    pub tool_call_parser: Option<String>,
    /// Where `<think>` sections go: `deepseek` (default: `reasoning_content`, as vLLM and llama.cpp)
    /// or `none` (left in the content).
    #[arg(long, value_name = "FORMAT", default_value = "deepseek")]
    pub reasoning_format: String,
}

/// Parses a keep-alive: `-1` (never: `None`), `0`, `300` (seconds), `500ms`, `30s`, `5m`, `1h`.
pub fn parse_keep_alive(s: &str) -> Result<Option<Duration>> {
    let t = s.trim();
    if t.starts_with('-') {
        return Ok(None);
    }
    let split = t.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let num: f64 = num.parse().with_context(|| format!("`{s}` is not a duration; write e.g. 30s, 5m, 1h, 0 or -1"))?;
    let secs = match unit.trim() {
        "" | "s" => num,
        "ms" => num / 1000.0,
        "m" => num * 60.0,
        "h" => num * 3600.0,
        _ => bail!("`{s}`: unknown unit `{unit}`; use ms, s, m or h"),
    };
    Ok(Some(Duration::from_secs_f64(secs)))
}

/// The models to serve and their names: `NAME=PATH` as named; a folder with no config.json that
/// holds several .gguf files or model folders, one model each (named by file stem or folder name);
/// else the path's file stem, or a Hub id as written.
pub fn model_list(specs: &[String]) -> Result<Vec<(String, String)>> {
    let mut out = Vec::new();
    for spec in specs {
        if let Some((name, path)) = spec.split_once('=').filter(|(n, p)| !n.is_empty() && !p.is_empty() && !n.contains('/')) {
            out.push((name.to_string(), path.to_string()));
            continue;
        }
        let p = std::path::Path::new(spec);
        if p.is_dir() && !p.join("config.json").exists() {
            let mut found = Vec::new();
            for e in std::fs::read_dir(p).with_context(|| format!("reading {spec}"))? {
                let path = e?.path();
                let gguf = path.extension().is_some_and(|x| x.eq_ignore_ascii_case("gguf"));
                if gguf || (path.is_dir() && path.join("config.json").exists()) {
                    found.push(path);
                }
            }
            if found.len() >= 2 {
                found.sort();
                for f in found {
                    let name = f.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
                    out.push((name, f.to_string_lossy().into_owned()));
                }
                continue;
            }
        }
        let name =
            if p.exists() { p.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| spec.clone()) } else { spec.clone() };
        out.push((name, spec.clone()));
    }
    Ok(out)
}

/// Parses `512M`, `2G`, `1.5GiB`, `1000000` into bytes.
pub fn parse_size(s: &str) -> Result<usize> {
    let t = s.trim();
    let split = t.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let num: f64 = num.parse().with_context(|| format!("`{s}` is not a size; write e.g. 512M or 2G"))?;
    let mult = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "k" | "kb" | "kib" => 1024.0,
        "m" | "mb" | "mib" => 1024.0 * 1024.0,
        "g" | "gb" | "gib" => 1024.0 * 1024.0 * 1024.0,
        _ => bail!("`{s}`: unknown unit `{unit}`; use K, M or G"),
    };
    Ok((num * mult) as usize)
}

pub fn run(args: ServeArgs) -> Result<()> {
    crate::set_threads(args.model.threads)?;
    if args.max_seqs == 0 {
        bail!("--max-seqs must be at least 1");
    }
    if args.max_batch_tokens == 0 {
        bail!("--max-batch-tokens must be at least 1");
    }
    if args.max_connections == 0 || args.header_timeout == 0 || args.write_timeout == 0 {
        bail!("--max-connections, --header-timeout and --write-timeout must be at least 1");
    }
    let device = infer::parse_device(&args.model.device)?;
    let dtype: DTypeChoice = args.model.dtype.parse()?;
    if let Some(c) = args.model.ctx_size {
        if c < 2 {
            bail!("--ctx-size must be at least 2");
        }
    }
    let kv_cache_bytes = args.kv_cache_mem.as_deref().map(parse_size).transpose().context("--kv-cache-mem")?;
    let kv_cache_dtype = args.model.kv_cache_dtype.as_deref().map(infer::kv_cache::parse_cache_dtype).transpose()?;
    let max_body_bytes = parse_size(&args.max_body_size).context("--max-body-size")?;
    let (speculative, draft_spec) = args.model.speculative()?;
    let cfg = ServerConfig {
        served_model_name: args.served_model_name.clone(),
        api_key: args.api_key.clone().filter(|k| !k.is_empty()),
        engine: EngineConfig {
            max_context: args.model.ctx_size,
            max_seqs: args.max_seqs,
            kv_cache_bytes,
            kv_cache_dtype,
            max_batch_tokens: args.max_batch_tokens,
            prefix_caching: !args.no_prefix_caching,
            speculative,
            ..Default::default()
        },
        max_queue: args.max_queue,
        max_body_bytes,
        cors_origins: args.cors.clone(),
        shutdown_grace: Duration::from_secs(args.shutdown_timeout),
        report_cached_tokens: args.enable_prompt_tokens_details,
        pooling: args.pooling.parse().map_err(|e| anyhow::anyhow!("--pooling: {e}"))?,
        connections: infer_server::ConnLimits {
            max_connections: args.max_connections,
            header_read_timeout: Duration::from_secs(args.header_timeout),
            write_timeout: Duration::from_secs(args.write_timeout),
            ..Default::default()
        },
        tool_call_parser: match args.tool_call_parser.as_deref() {
            None | Some("auto") => None,
            Some(name) => Some(infer::tools::ToolFormat::from_name(name).ok_or_else(|| {
                anyhow::anyhow!("--tool-call-parser `{name}`: expected one of {}", infer::tools::ToolFormat::NAMES.join(", "))
            })?),
        },
        reasoning: match args.reasoning_format.as_str() {
            "deepseek" | "auto" => true,
            "none" => false,
            other => anyhow::bail!("--reasoning-format `{other}`: expected `deepseek` or `none`"),
        },
        models_max: args.models_max,
        models_mem: args.models_mem.as_deref().map(parse_size).transpose().context("--models-mem")?.map(|b| b as u64),
        keep_alive: parse_keep_alive(&args.keep_alive).context("--keep-alive")?,
        load_timeout: Duration::from_secs(args.load_timeout),
        after_unload: Some(crate::alloc::collect),
    };
    let spec = args.model.model.clone();
    let gguf_file = args.model.gguf_file.clone();
    let quantize = args.model.quantize.as_deref().map(str::parse).transpose()?;
    let kernels = crate::kernels_from_env()?;
    let all: Vec<String> = std::iter::once(args.model.model.clone()).chain(args.more_models.iter().cloned()).collect();
    let list = model_list(&all)?;
    if list.len() > 1 || !args.more_models.is_empty() {
        if args.served_model_name.is_some() {
            bail!("--served-model-name names the one model; with several, name each as NAME=PATH");
        }
        let mut seen = std::collections::HashSet::new();
        if let Some((name, _)) = list.iter().find(|(name, _)| !seen.insert(name.as_str())) {
            bail!("two models are named `{name}`; name them apart as NAME=PATH");
        }
        if draft_spec.is_some() || args.model.gguf_file.is_some() {
            bail!("--draft MODEL and --gguf-file apply to one model; serve several without them (--draft ngram works)");
        }
        let specs = list
            .iter()
            .map(|(name, path)| {
                let (path, device) = (path.clone(), device.clone());
                let size = files_size(std::path::Path::new(&path));
                infer_server::ModelSpec::new(name.clone(), move || load_one(&path, &device, dtype, None, quantize, kernels)).with_size(size)
            })
            .collect();
        let names: Vec<&str> = list.iter().map(|(n, _)| n.as_str()).collect();
        let rt =
            tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().context("starting the async runtime")?;
        return rt.block_on(async move {
            let addr = format!("{}:{}", args.host, args.port);
            let listener = tokio::net::TcpListener::bind(&addr)
                .await
                .with_context(|| format!("cannot listen on {addr} (is another server using the port? pick another with --port)"))?;
            let local = listener.local_addr()?;
            eprintln!(
                "infer serve: {} models ({}), each loaded at its first request; listening on http://{local}",
                names.len(),
                names.join(", ")
            );
            infer_server::serve_models(listener, cfg, specs, shutdown_signal()).await.map_err(anyhow::Error::msg)?;
            eprintln!("infer serve: stopped");
            Ok(())
        });
    }
    let load = move || {
        let dir = std::path::Path::new(&spec);
        if infer::encoder::is_encoder(dir) {
            // An encoder (BERT family): /v1/embeddings only; a cross-encoder
            // (BertForSequenceClassification): /v1/rerank only.
            return Ok(infer_server::Loaded::Encoder(Box::new(infer::encoder::Encoder::load(dir, &device)?)));
        }
        let opts = LoadOptions { device: device.clone(), dtype, gguf_file, quantize, kernels, ..Default::default() };
        let main = crate::alloc::while_loading(|| infer::load(&spec, opts))?;
        let draft = match &draft_spec {
            None => None,
            Some(d) => {
                let opts = LoadOptions { device, dtype, quantize, kernels, ..Default::default() };
                Some(crate::alloc::while_loading(|| infer::load(d, opts))?)
            }
        };
        Ok(infer_server::Loaded::from(infer_server::Models { main, draft }))
    };
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().context("starting the async runtime")?;
    rt.block_on(async move {
        let addr = format!("{}:{}", args.host, args.port);
        let listener = tokio::net::TcpListener::bind(&addr)
            .await
            .with_context(|| format!("cannot listen on {addr} (is another server using the port? pick another with --port)"))?;
        let local = listener.local_addr()?;
        eprintln!("infer serve: loading {} ...; listening on http://{local} (GET /health turns 200 when ready)", args.model.model);
        infer_server::serve(listener, cfg, load, shutdown_signal()).await.map_err(anyhow::Error::msg)?;
        eprintln!("infer serve: stopped");
        Ok(())
    })
}

/// The bytes of a model's weights on disk: a file's size, or a folder's .gguf, .safetensors and .bin
/// files; 0 for a Hub id (unknown until downloaded).
fn files_size(p: &std::path::Path) -> u64 {
    if p.is_file() {
        return p.metadata().map(|m| m.len()).unwrap_or(0);
    }
    let Ok(dir) = std::fs::read_dir(p) else { return 0 };
    dir.filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|f| f.extension().is_some_and(|x| ["gguf", "safetensors", "bin"].iter().any(|w| x.eq_ignore_ascii_case(w))))
        .filter_map(|f| std::fs::metadata(&f).ok().map(|m| m.len()))
        .sum()
}

/// Loads one model of a several-model server (an encoder folder as an encoder).
fn load_one(
    spec: &str,
    device: &infer::Device,
    dtype: DTypeChoice,
    gguf_file: Option<String>,
    quantize: Option<infer::weights::Quantize>,
    kernels: infer::weights::KernelChoice,
) -> infer::Result<infer_server::Loaded> {
    let dir = std::path::Path::new(spec);
    if infer::encoder::is_encoder(dir) {
        return Ok(infer_server::Loaded::Encoder(Box::new(infer::encoder::Encoder::load(dir, device)?)));
    }
    let opts = LoadOptions { device: device.clone(), dtype, gguf_file, quantize, kernels, ..Default::default() };
    let main = crate::alloc::while_loading(|| infer::load(spec, opts))?;
    Ok(infer_server::Loaded::from(main))
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
    eprintln!("infer serve: shutting down");
}

#[cfg(test)]
mod tests {
    use super::{parse_keep_alive, parse_size};
    use std::time::Duration;

    #[test]
    fn keep_alives() {
        assert_eq!(parse_keep_alive("-1").unwrap(), None);
        assert_eq!(parse_keep_alive("0").unwrap(), Some(Duration::ZERO));
        assert_eq!(parse_keep_alive("5m").unwrap(), Some(Duration::from_secs(300)));
        assert_eq!(parse_keep_alive("90").unwrap(), Some(Duration::from_secs(90)));
        assert_eq!(parse_keep_alive("250ms").unwrap(), Some(Duration::from_millis(250)));
        assert!(parse_keep_alive("5x").is_err());
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("512M").unwrap(), 512 << 20);
        assert_eq!(parse_size("1.5GiB").unwrap(), 3 << 29);
        assert_eq!(parse_size("1000").unwrap(), 1000);
        assert!(parse_size("12X").is_err());
        assert!(parse_size("lots").is_err());
    }
}
