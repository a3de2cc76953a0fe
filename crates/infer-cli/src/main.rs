//! `infer`: run open-weight LLMs locally.

use std::io::{IsTerminal, Read, Write};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{anyhow, bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use infer::{ChatMessage, DTypeChoice, EngineStats, ModelBuilder, SamplingParams, Session};

mod alloc;
mod bench;
mod eval;
mod eval_cache;
mod eval_report;
mod serve;

/// mimalloc keeps freed memory for reuse: the per-step activation buffers of a forward pass are
/// large enough that the system allocator maps and unmaps them every time (page faults and zeroing
/// were ~10% of a 512-token prefill).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(name = "infer", version, about = "Run open-weight LLMs locally: GGUF files, Hugging Face folders and Hub ids.", long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Generate an answer to one prompt and stream it to stdout.
    ///
    /// Chat models get the prompt wrapped in their chat template (use --raw for plain completion).
    /// Without PROMPT, the prompt is read from stdin.
    Run {
        #[command(flatten)]
        model: ModelArgs,
        /// The prompt (read from stdin when omitted).
        prompt: Option<String>,
        /// Plain text completion: do not apply the chat template.
        #[arg(long)]
        raw: bool,
        /// System prompt (chat models).
        #[arg(long)]
        system: Option<String>,
        #[command(flatten)]
        sampling: SamplingArgs,
        #[command(flatten)]
        tools: ToolArgs,
    },
    /// Interactive chat with history. Commands: /clear, /system TEXT, /exit. Ctrl-C stops an answer.
    Chat {
        #[command(flatten)]
        model: ModelArgs,
        /// Initial system prompt.
        #[arg(long)]
        system: Option<String>,
        #[command(flatten)]
        sampling: SamplingArgs,
        #[command(flatten)]
        tools: ToolArgs,
    },
    /// Print the embedding of each TEXT (one JSON array per line): a decoder's final hidden states
    /// pooled (--pooling) and L2-normalized, or an encoder's as it is configured: a folder (BERT,
    /// RoBERTa, XLM-R, ModernBERT, with sentence-transformers' pooling config) or a BERT GGUF
    /// (llama.cpp's pooling key, L2-normalized).
    Embed {
        #[command(flatten)]
        model: ModelArgs,
        /// The texts (read from stdin, one per line, when none are given).
        texts: Vec<String>,
        /// last (decoder embedding models such as Qwen3-Embedding) or mean.
        #[arg(long, default_value = "last", value_name = "last|mean")]
        pooling: String,
    },
    /// Score each DOCUMENT's relevance to the query with a cross-encoder folder (BERT, RoBERTa,
    /// XLM-R or ModernBERT sequence classification, one label): one `index<TAB>score<TAB>document` line each, best first.
    /// The score is sentence-transformers' CrossEncoder score (the sigmoid of the logit by default).
    Rerank {
        #[command(flatten)]
        model: ModelArgs,
        /// The query.
        #[arg(long, short)]
        query: String,
        /// The documents (read from stdin, one per line, when none are given).
        documents: Vec<String>,
        /// Print only the best N.
        #[arg(long)]
        top_n: Option<usize>,
    },
    /// Download a model from the Hugging Face Hub into the HF cache (HF_HOME, HF_TOKEN, HF_ENDPOINT).
    Pull {
        /// Hub id: org/name[@revision].
        model: String,
        /// Which GGUF file of the repo to fetch.
        #[arg(long)]
        gguf_file: Option<String>,
    },
    /// List the models in the Hugging Face cache.
    List,
    /// Serve the model over an OpenAI-compatible HTTP API (/v1/chat/completions, /v1/completions,
    /// /v1/models, /tokenize, /detokenize, /health, /metrics) with continuous batching and prefix caching.
    Serve(serve::ServeArgs),
    /// Measure prompt processing (pp) and generation (tg) speed like llama-bench (-p, -n, -t, -r, -o json).
    Bench(bench::BenchArgs),
    /// Compare models on your own data: perplexity of a text file (llama.cpp's method), side by side,
    /// with 95% intervals, speed, peak memory and load time (--json, --csv).
    Eval(eval::EvalArgs),
}

#[derive(Args)]
pub(crate) struct ModelArgs {
    /// The model: a .gguf file, a folder with config.json + *.safetensors + tokenizer.json, or a Hub id org/name[@revision].
    pub model: String,
    /// Which .gguf file to use when MODEL is a Hub repo holding GGUF files.
    #[arg(long)]
    pub gguf_file: Option<String>,
    /// Device: cpu, cuda, cuda:N or metal.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Compute dtype for safetensors weights: auto, f32, f16 or bf16 (auto: f32 on CPU, the checkpoint's on GPU).
    #[arg(long, default_value = "auto")]
    pub dtype: String,
    /// CPU threads (default: the cores this process may use).
    #[arg(short = 't', long)]
    pub threads: Option<usize>,
    /// Context size in tokens (prompt + answer); default: the model's trained context.
    #[arg(short = 'c', long)]
    pub ctx_size: Option<usize>,
    /// Quantize safetensors weights at load: q8_0, q4_0, q4_k, q5_k or q6_k (CPU or CUDA; not Metal).
    #[arg(long, value_name = "TYPE")]
    pub quantize: Option<String>,
    /// KV cache storage: f32, f16 (half the memory) or q8_0 (about a quarter: 8-bit values with a
    /// scale per 32) on the CPU, bf16 on a GPU (default: f32 on the CPU, the model's dtype on a GPU).
    #[arg(long, value_name = "TYPE")]
    pub kv_cache_dtype: Option<String>,
    /// Speculative decoding: `ngram` (prompt lookup: drafts copied from where the text so far
    /// occurred earlier in the prompt or answer; no second model) or a draft model (a .gguf file,
    /// folder or Hub id with the same tokenizer). The output is the same as without it.
    #[arg(long, value_name = "ngram|MODEL")]
    pub draft: Option<String>,
    /// Most tokens drafted per step and sequence.
    #[arg(long, default_value_t = 8, value_name = "N")]
    pub draft_max: usize,
    /// Fewest drafted tokens worth checking (shorter drafts are dropped).
    #[arg(long, default_value_t = 1, value_name = "N")]
    pub draft_min: usize,
}

impl ModelArgs {
    /// The speculative decoding the flags ask for, and the draft model to load (if any).
    pub(crate) fn speculative(&self) -> Result<(Option<infer::SpeculativeConfig>, Option<String>)> {
        let Some(draft) = &self.draft else { return Ok((None, None)) };
        let most = infer::speculative::MAX_DRAFT;
        if self.draft_max == 0 || self.draft_max > most {
            bail!("--draft-max must be in 1..={most}");
        }
        if self.draft_min > self.draft_max {
            bail!("--draft-min ({}) is more than --draft-max ({})", self.draft_min, self.draft_max);
        }
        let mut cfg = infer::SpeculativeConfig::ngram(self.draft_max);
        cfg.draft_min = self.draft_min;
        if draft == "ngram" {
            return Ok((Some(cfg), None));
        }
        // The draft model replaces the source when loaded; these are its limits.
        Ok((Some(cfg), Some(draft.clone())))
    }
}

#[derive(Args, Clone)]
struct SamplingArgs {
    /// Most tokens to generate (default: until the model stops or the context is full).
    #[arg(short = 'n', long)]
    max_tokens: Option<usize>,
    /// Sampling temperature; 0 = greedy.
    #[arg(long, default_value_t = 0.8)]
    temperature: f32,
    /// Keep the K most likely tokens (0 = off).
    #[arg(long, default_value_t = 40)]
    top_k: usize,
    /// Nucleus sampling threshold (1 = off).
    #[arg(long, default_value_t = 0.95)]
    top_p: f32,
    /// Drop tokens below MIN_P × the top probability (0 = off).
    #[arg(long, default_value_t = 0.05)]
    min_p: f32,
    /// Penalize tokens already in the prompt or answer (1 = off).
    #[arg(long, alias = "repeat-penalty", default_value_t = 1.0)]
    repetition_penalty: f32,
    /// OpenAI-style presence penalty, -2..2.
    #[arg(long, default_value_t = 0.0)]
    presence_penalty: f32,
    /// OpenAI-style frequency penalty, -2..2.
    #[arg(long, default_value_t = 0.0)]
    frequency_penalty: f32,
    /// Random seed (same seed, same text).
    #[arg(short = 's', long)]
    seed: Option<u64>,
    /// Stop before this string (repeatable).
    #[arg(long)]
    stop: Vec<String>,
    /// Add BIAS to token ID's logit, as ID=BIAS (repeatable); -inf bans the token.
    #[arg(long, value_name = "ID=BIAS")]
    logit_bias: Vec<String>,
    /// Keep generating past end-of-sequence tokens.
    #[arg(long)]
    ignore_eos: bool,
    /// Output valid under this JSON schema (a file, or the schema itself).
    #[arg(long, value_name = "FILE|JSON", group = "constraint")]
    json_schema: Option<String>,
    /// Output is any JSON object.
    #[arg(long, group = "constraint")]
    json: bool,
    /// Output matches this regular expression.
    #[arg(long, value_name = "REGEX", group = "constraint")]
    regex: Option<String>,
    /// Output follows this grammar file (llguidance's Lark syntax, or llama.cpp's GBNF).
    #[arg(long, value_name = "FILE", group = "constraint")]
    grammar: Option<std::path::PathBuf>,
    /// Output is one of these comma-separated strings.
    #[arg(long, value_name = "A,B,...", group = "constraint")]
    choice: Option<String>,
}

#[derive(Args, Clone)]
struct ToolArgs {
    /// Tools the model may call: a JSON file with OpenAI's `tools` list. Calls are shown as
    /// `[call NAME] {arguments}`; in `chat`, `/tool TEXT` answers the last call.
    #[arg(long, value_name = "FILE")]
    tools: Option<std::path::PathBuf>,
    /// auto, none, required, or a tool's name (default: auto).
    #[arg(long, value_name = "CHOICE", default_value = "auto")]
    tool_choice: String,
}

/// The tools and tool choice the flags give, if any.
fn tool_setup(args: &ToolArgs) -> Result<Option<(Vec<infer::tools::Tool>, infer::tools::ToolChoice)>> {
    let Some(path) = &args.tools else { return Ok(None) };
    let text = std::fs::read_to_string(path).with_context(|| format!("--tools: cannot read {}", path.display()))?;
    let list: Vec<serde_json::Value> =
        serde_json::from_str(&text).with_context(|| format!("--tools: {} is not a JSON list of tools", path.display()))?;
    let tools = infer::tools::parse_tools(&list).map_err(|(at, msg)| anyhow!("--tools: {at}: {msg}"))?;
    let choice = match args.tool_choice.as_str() {
        c @ ("auto" | "none" | "required") => serde_json::Value::from(c),
        name => serde_json::json!({"type": "function", "function": {"name": name}}),
    };
    let choice = infer::tools::parse_tool_choice(Some(&choice), &tools).map_err(|m| anyhow!("--tool-choice: {m}"))?;
    Ok(Some((tools, choice)))
}

impl SamplingArgs {
    /// The structured-output constraint the flags ask for.
    fn constraint(&self) -> Result<Option<infer::Constraint>> {
        use infer::Constraint;
        if let Some(s) = &self.json_schema {
            let text = if s.trim_start().starts_with('{') {
                s.clone()
            } else {
                std::fs::read_to_string(s).with_context(|| format!("--json-schema: cannot read `{s}`"))?
            };
            let v: serde_json::Value = serde_json::from_str(&text).with_context(|| "--json-schema: not valid JSON")?;
            return Ok(Some(Constraint::JsonSchema(v)));
        }
        if self.json {
            return Ok(Some(Constraint::JsonObject));
        }
        if let Some(r) = &self.regex {
            return Ok(Some(Constraint::Regex(r.clone())));
        }
        if let Some(p) = &self.grammar {
            let src = std::fs::read_to_string(p).with_context(|| format!("--grammar: cannot read {}", p.display()))?;
            return Ok(Some(Constraint::grammar(&src)));
        }
        if let Some(c) = &self.choice {
            return Ok(Some(Constraint::Choice(c.split(',').map(String::from).collect())));
        }
        Ok(None)
    }

    fn params(&self) -> Result<SamplingParams> {
        let mut logit_bias = std::collections::HashMap::new();
        for lb in &self.logit_bias {
            let (id, bias) = lb.split_once('=').ok_or_else(|| anyhow!("--logit-bias `{lb}`: expected ID=BIAS, e.g. 15043=-inf"))?;
            let id: u32 = id.trim().parse().map_err(|_| anyhow!("--logit-bias `{lb}`: `{id}` is not a token id"))?;
            let bias: f32 = bias.trim().parse().map_err(|_| anyhow!("--logit-bias `{lb}`: `{bias}` is not a number"))?;
            logit_bias.insert(id, bias);
        }
        Ok(SamplingParams {
            temperature: self.temperature,
            top_k: self.top_k,
            top_p: self.top_p,
            min_p: self.min_p,
            repetition_penalty: self.repetition_penalty,
            presence_penalty: self.presence_penalty,
            frequency_penalty: self.frequency_penalty,
            logit_bias,
            seed: self.seed,
            max_tokens: self.max_tokens,
            stop: self.stop.clone(),
            ignore_eos: self.ignore_eos,
            logprobs: None,
            constraint: self.constraint()?,
            cache_salt: None,
            draft_max: None,
            draft_min: None,
        })
    }
}

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

fn main() -> ExitCode {
    let cli = Cli::parse();
    // The server says when the model is ready and how its KV cache was sized.
    let default_log = if matches!(cli.command, Command::Serve(_)) { "warn,infer_server=info" } else { "warn" };
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_env("INFER_LOG").unwrap_or_else(|_| default_log.into()))
        .with_writer(std::io::stderr)
        .init();
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<ExitCode> {
    match cli.command {
        Command::Run { model, prompt, raw, system, sampling, tools } => {
            let mut params = sampling.params()?;
            let tools = tool_setup(&tools)?;
            let prompt = match prompt {
                Some(p) => p,
                None => {
                    let mut s = String::new();
                    std::io::stdin().read_to_string(&mut s).context("reading the prompt from stdin")?;
                    s
                }
            };
            let mut session = load(&model)?;
            install_ctrlc()?;
            let ids = if raw || session.model().chat_template.is_none() {
                if !raw {
                    eprintln!("note: {} has no chat template; running plain completion", session.model().name);
                }
                session.raw_prompt(&prompt)?
            } else {
                let mut msgs = Vec::new();
                if let Some(s) = system {
                    msgs.push(ChatMessage::system(s));
                }
                msgs.push(ChatMessage::user(prompt));
                if let Some((tools, choice)) = &tools {
                    let (ids, format, constraint) = session.tool_prompt(&msgs, tools, choice)?;
                    if constraint.is_some() && params.constraint.is_some() {
                        bail!("--tools cannot be combined with --json-schema, --json, --regex, --grammar or --choice");
                    }
                    params.constraint = params.constraint.or(constraint);
                    let parser = infer::tools::OutputParser::new(Some(format), infer::tools::ThinkMode::Off);
                    stream_answer_parsed(&mut session, ids, params, Some(parser))?;
                    return Ok(if INTERRUPTED.load(Ordering::SeqCst) { ExitCode::from(130) } else { ExitCode::SUCCESS });
                }
                session.chat_prompt(&msgs)?
            };
            stream_answer(&mut session, ids, params)?;
            Ok(if INTERRUPTED.load(Ordering::SeqCst) { ExitCode::from(130) } else { ExitCode::SUCCESS })
        }
        Command::Chat { model, system, sampling, tools } => {
            let params = sampling.params()?;
            let tools = tool_setup(&tools)?;
            let mut session = load(&model)?;
            if session.model().chat_template.is_none() {
                bail!("{} has no chat template, so it cannot chat; use `infer run --raw` for plain completion", session.model().name);
            }
            install_ctrlc()?;
            chat_repl(&mut session, system, params, tools)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Embed { model, texts, pooling } => {
            let pooling: infer::embeddings::Pooling = pooling.parse()?;
            let texts = if texts.is_empty() {
                let mut s = String::new();
                std::io::stdin().read_to_string(&mut s).context("reading the texts from stdin")?;
                s.lines().filter(|l| !l.trim().is_empty()).map(str::to_string).collect()
            } else {
                texts
            };
            if texts.is_empty() {
                bail!("no text to embed");
            }
            let dir = std::path::Path::new(&model.model);
            if infer::encoder::is_encoder(dir) {
                // An encoder (BERT family) with sentence-transformers' pooling and normalization.
                set_threads(model.threads)?;
                let enc = infer::encoder::Encoder::load(dir, &infer::parse_device(&model.device)?)?;
                let mut out = std::io::stdout().lock();
                for v in enc.embed_texts(&texts)? {
                    writeln!(out, "{}", serde_json::to_string(&v)?)?;
                }
                return Ok(ExitCode::SUCCESS);
            }
            let session = load(&model)?;
            let m = session.model();
            let ids = texts.iter().map(|t| m.tokenizer.encode(t, true)).collect::<infer::Result<Vec<_>>>()?;
            let vectors = infer::embeddings::embed(m.model.as_ref(), &ids, pooling, true)?;
            let mut out = std::io::stdout().lock();
            for v in vectors {
                writeln!(out, "{}", serde_json::to_string(&v)?)?;
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Rerank { model, query, documents, top_n } => {
            let documents = if documents.is_empty() {
                let mut s = String::new();
                std::io::stdin().read_to_string(&mut s).context("reading the documents from stdin")?;
                s.lines().filter(|l| !l.trim().is_empty()).map(str::to_string).collect()
            } else {
                documents
            };
            if documents.is_empty() {
                bail!("no document to rerank");
            }
            let dir = std::path::Path::new(&model.model);
            if !infer::encoder::is_encoder(dir) {
                bail!("`{}` is not a cross-encoder folder (a config.json with BertForSequenceClassification, (XLM)RobertaForSequenceClassification or ModernBertForSequenceClassification)", model.model);
            }
            set_threads(model.threads)?;
            let enc = infer::encoder::Encoder::load(dir, &infer::parse_device(&model.device)?)?;
            if !enc.reranks() {
                bail!("`{}` is an embedding encoder, not a cross-encoder (a one-label sequence classifier): it cannot rerank", model.model);
            }
            let scores = enc.rerank(&query, &documents)?;
            let mut order: Vec<usize> = (0..scores.len()).collect();
            order.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]).then(a.cmp(&b)));
            let mut out = std::io::stdout().lock();
            for i in order.into_iter().take(top_n.unwrap_or(usize::MAX)) {
                writeln!(out, "{i}\t{:.6}\t{}", scores[i], documents[i])?;
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Pull { model, gguf_file } => {
            let id = infer::hub::HubId::parse(&model).ok_or_else(|| anyhow!("`{model}` is not a Hub id (org/name[@revision])"))?;
            let opts = infer::LoadOptions { gguf_file, download_progress: true, ..Default::default() };
            let files = infer::loader::resolve(&id.to_string(), &opts)?;
            match files {
                infer::loader::ModelFiles::Gguf(p) => println!("{}", p.display()),
                infer::loader::ModelFiles::Hf { config, .. } => println!("{}", config.parent().unwrap_or(&config).display()),
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Bench(args) => {
            bench::run(args)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Serve(args) => {
            serve::run(args)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Eval(args) => {
            eval::run(args)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::List => {
            let models = infer::hub::list_cached_models();
            if models.is_empty() {
                eprintln!("no models in the HF cache ({})", infer::hub::cache().path().display());
            }
            for (id, bytes) in models {
                println!("{id:<60} {:>10.1} MB", bytes as f64 / 1e6);
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

pub(crate) fn set_threads(n: Option<usize>) -> Result<()> {
    let n = match n {
        Some(0) => bail!("--threads must be at least 1"),
        Some(n) => n,
        None => std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
    };
    // candle sizes its parallel loops from RAYON_NUM_THREADS; set it before any pool starts.
    std::env::set_var("RAYON_NUM_THREADS", n.to_string());
    rayon::ThreadPoolBuilder::new().num_threads(n).build_global().context("starting the thread pool")?;
    Ok(())
}

/// The kernel switches of the environment, for comparisons: `INFER_ISA=NAME` caps the CPU kernels'
/// instruction set (scalar, avx2, avx2-vnni, avx512, amx; on aarch64 neon, neon-dotprod),
/// `INFER_TENSOR_PATH=1` runs the tensor path (candle ops) on the CPU or instead of the CUDA decode
/// step, `INFER_CANDLE_QMATMUL=1` keeps candle's quantized matmul; for the CUDA decode step
/// `INFER_CUDA_UNFUSED=1` keeps its norms in separate kernels, `INFER_CUDA_GRAPH=0` launches kernel by
/// kernel, `INFER_CUDA_PDL=0` without programmatic dependent launches. The library reads no
/// environment: these become load options.
pub(crate) fn kernels_from_env() -> Result<infer::KernelChoice> {
    let on = |name: &str| std::env::var_os(name).is_some_and(|v| !v.is_empty() && v != "0");
    let off = |name: &str| std::env::var_os(name).is_some_and(|v| v == "0");
    let max_isa = match std::env::var("INFER_ISA") {
        Ok(name) if !name.is_empty() => Some(infer::Isa::from_name(&name).ok_or_else(|| {
            let names: Vec<&str> = infer::Isa::ALL.iter().map(|i| i.name()).collect();
            anyhow!("INFER_ISA={name:?} is not one of {} (this CPU has up to {})", names.join(", "), infer::cpu_kernels())
        })?),
        _ => None,
    };
    Ok(infer::KernelChoice {
        max_isa,
        tensor_path: on("INFER_TENSOR_PATH"),
        candle_qmatmul: on("INFER_CANDLE_QMATMUL"),
        cuda_unfused: on("INFER_CUDA_UNFUSED"),
        cuda_no_graph: off("INFER_CUDA_GRAPH"),
        cuda_no_pdl: off("INFER_CUDA_PDL"),
    })
}

fn load(args: &ModelArgs) -> Result<Session> {
    set_threads(args.threads)?;
    let device = infer::parse_device(&args.device)?;
    let dtype: DTypeChoice = args.dtype.parse()?;
    let bar = indicatif::ProgressBar::new(0).with_style(
        indicatif::ProgressStyle::with_template("{msg} [{bar:30}] {pos}/{len} {elapsed}").expect("valid template").progress_chars("=> "),
    );
    bar.set_message(format!("loading {}", args.model));
    let b = bar.clone();
    let mut builder =
        ModelBuilder::new(&args.model).device(device).dtype(dtype).download_progress(std::io::stderr().is_terminal()).on_progress(
            move |done, total| {
                b.set_length(total as u64);
                b.set_position(done as u64);
            },
        );
    builder = builder.kernels(kernels_from_env()?);
    if let Some(g) = &args.gguf_file {
        builder = builder.gguf_file(g);
    }
    if let Some(q) = &args.quantize {
        builder = builder.quantize(q.parse()?);
    }
    if let Some(d) = &args.kv_cache_dtype {
        builder = builder.kv_cache_dtype(infer::kv_cache::parse_cache_dtype(d)?);
    }
    if let Some(c) = args.ctx_size {
        if c < 2 {
            bail!("--ctx-size must be at least 2");
        }
        builder = builder.ctx_size(c);
    }
    let (spec, draft_model) = args.speculative()?;
    if let Some(spec) = spec {
        builder = builder.speculative(spec);
    }
    if let Some(d) = draft_model {
        builder = builder.draft_model(d, args.draft_max);
    }
    let t0 = Instant::now();
    let session = alloc::while_loading(|| builder.build());
    bar.finish_and_clear();
    let mut session = session?;
    let cfg = session.model().config();
    eprintln!(
        "loaded {} ({:?}, {} layers, {} heads, vocab {}) in {:.1}s",
        session.model().name,
        cfg.architecture,
        cfg.num_hidden_layers,
        cfg.num_attention_heads,
        cfg.vocab_size,
        t0.elapsed().as_secs_f64()
    );
    eprintln!("{}", session.engine().cache_sizing());
    Ok(session)
}

fn install_ctrlc() -> Result<()> {
    ctrlc::set_handler(|| {
        if INTERRUPTED.swap(true, Ordering::SeqCst) {
            // A second Ctrl-C while the first is being handled: leave now.
            std::process::exit(130);
        }
    })
    .context("installing the Ctrl-C handler")
}

/// Streams one answer to stdout; returns its text. Ctrl-C ends it early.
fn stream_answer(session: &mut Session, ids: Vec<u32>, params: SamplingParams) -> Result<String> {
    Ok(stream_answer_parsed(session, ids, params, None)?.0)
}

/// Prints what an output parser makes of streamed text: content as it comes, tool calls as
/// `[call NAME] {arguments}`, reasoning on stderr.
fn show(out: &mut impl Write, deltas: Vec<infer::tools::OutputDelta>) -> Result<()> {
    use infer::tools::OutputDelta as D;
    for d in deltas {
        match d {
            D::Content(t) => out.write_all(t.as_bytes())?,
            D::Reasoning(t) => eprint!("{t}"),
            D::CallStart { index, name, .. } => write!(out, "{}[call {name}] ", if index > 0 { "\n" } else { "" })?,
            D::CallArguments { fragment, .. } => out.write_all(fragment.as_bytes())?,
        }
    }
    out.flush()?;
    Ok(())
}

/// [`stream_answer`], the text going through `parser` when given (tools); returns the raw text and
/// the parsed answer.
fn stream_answer_parsed(
    session: &mut Session,
    ids: Vec<u32>,
    params: SamplingParams,
    mut parser: Option<infer::tools::OutputParser>,
) -> Result<(String, Option<infer::tools::ParsedOutput>)> {
    INTERRUPTED.store(false, Ordering::SeqCst);
    let markers: std::collections::HashMap<u32, &str> =
        infer::tools::MARKERS.iter().filter_map(|&m| session.model().tokenizer.token_to_id(m).map(|id| (id, m))).collect();
    let mut out = std::io::stdout().lock();
    let mut answer = String::new();
    let mut stream = session.generate_ids(ids, params)?;
    for chunk in stream.by_ref() {
        let chunk = chunk?;
        match parser.as_mut() {
            Some(p) => {
                let piece = match markers.get(&chunk.token) {
                    Some(m) if !chunk.text.ends_with(m) => format!("{}{m}", chunk.text),
                    _ => chunk.text.clone(),
                };
                show(&mut out, p.push(&piece))?;
            }
            None => {
                out.write_all(chunk.text.as_bytes())?;
                out.flush()?;
            }
        }
        answer.push_str(&chunk.text);
        if INTERRUPTED.load(Ordering::SeqCst) {
            break;
        }
    }
    let stats: EngineStats = stream.stats();
    drop(stream);
    let parsed = match parser.as_mut() {
        Some(p) => {
            let (deltas, parsed) = p.finish();
            show(&mut out, deltas)?;
            Some(parsed)
        }
        None => None,
    };
    writeln!(out)?;
    let interrupted = if INTERRUPTED.load(Ordering::SeqCst) { " (stopped)" } else { "" };
    let drafts = match stats.draft_tokens {
        0 => String::new(),
        n => format!(
            " | drafts: {} of {n} kept ({:.0}%)",
            stats.accepted_draft_tokens,
            100.0 * stats.accepted_draft_tokens as f64 / n as f64
        ),
    };
    eprintln!(
        "prompt: {} tokens, {:.1} t/s | generation: {} tokens, {:.1} t/s{drafts}{interrupted}",
        stats.prompt_tokens,
        rate(stats.prompt_tokens, stats.prefill_time),
        stats.generated_tokens,
        rate(stats.generated_tokens.saturating_sub(1), stats.decode_time),
    );
    Ok((answer, parsed))
}

fn rate(n: usize, d: std::time::Duration) -> f64 {
    if d.is_zero() {
        0.0
    } else {
        n as f64 / d.as_secs_f64()
    }
}

fn chat_repl(
    session: &mut Session,
    mut system: Option<String>,
    params: SamplingParams,
    tools: Option<(Vec<infer::tools::Tool>, infer::tools::ToolChoice)>,
) -> Result<()> {
    use rustyline::error::ReadlineError;
    let mut rl = rustyline::DefaultEditor::new().context("starting the line editor")?;
    let history_file = std::env::var_os("HOME").map(|h| std::path::PathBuf::from(h).join(".cache/infer/chat_history"));
    if let Some(h) = &history_file {
        let _ = rl.load_history(h);
    }
    let mut history: Vec<ChatMessage> = Vec::new();
    eprintln!(
        "chat with {} — /clear resets, /system TEXT sets the system prompt, /exit quits; Ctrl-C stops an answer",
        session.model().name
    );
    let seed = Arc::new(params.seed);
    let mut turn = 0u64;
    loop {
        let line = match rl.readline(">>> ") {
            Ok(l) => l,
            Err(ReadlineError::Interrupted) => continue,
            Err(ReadlineError::Eof) => break,
            Err(e) => return Err(e.into()),
        };
        let text = line.trim();
        if text.is_empty() {
            continue;
        }
        let _ = rl.add_history_entry(text);
        match text.split_once(' ').map(|(c, r)| (c, r.trim())).unwrap_or((text, "")) {
            ("/exit" | "/quit" | "/bye", _) => break,
            ("/clear", _) => {
                history.clear();
                eprintln!("(history cleared)");
                continue;
            }
            ("/system", rest) => {
                system = (!rest.is_empty()).then(|| rest.to_string());
                history.clear();
                eprintln!(
                    "{}",
                    if system.is_some() { "(system prompt set; history cleared)" } else { "(system prompt removed; history cleared)" }
                );
                continue;
            }
            ("/help", _) => {
                eprintln!("/clear  forget the conversation\n/system TEXT  set the system prompt (empty: remove)\n/tool TEXT  answer the last tool call with TEXT\n/exit  quit\nCtrl-C stops the current answer; Ctrl-D quits");
                continue;
            }
            ("/tool", rest) => {
                let last = history.last().filter(|m| m.role == "assistant").and_then(|m| m.tool_calls.last());
                let Some(id) = last.and_then(|c| c.get("id")).and_then(|v| v.as_str()).map(String::from) else {
                    eprintln!("(no tool call to answer)");
                    continue;
                };
                let mut result = ChatMessage::new("tool", rest);
                result.tool_call_id = Some(id);
                history.push(result);
            }
            (cmd, _) if cmd.starts_with('/') && cmd.len() > 1 && !cmd[1..].contains('/') => {
                eprintln!("unknown command {cmd}; try /help");
                continue;
            }
            _ => {}
        }
        if !text.starts_with("/tool") {
            history.push(ChatMessage::user(text));
        }
        let mut msgs: Vec<ChatMessage> = system.iter().map(|s| ChatMessage::system(s.clone())).collect();
        msgs.extend(history.iter().cloned());
        // A fixed seed stays reproducible per turn without repeating the same draw every turn.
        let mut p = SamplingParams { seed: seed.map(|s| s.wrapping_add(turn)), ..params.clone() };
        turn += 1;
        let prompt = match &tools {
            Some((tools, choice)) => session.tool_prompt(&msgs, tools, choice).map(|(ids, format, c)| {
                p.constraint = p.constraint.clone().or(c);
                (ids, Some(infer::tools::OutputParser::new(Some(format), infer::tools::ThinkMode::Off)))
            }),
            None => session.chat_prompt(&msgs).map(|ids| (ids, None)),
        };
        let (ids, parser) = match prompt {
            Ok(x) => x,
            Err(e) => {
                history.pop();
                eprintln!("error: {e}");
                continue;
            }
        };
        match stream_answer_parsed(session, ids, p, parser) {
            Ok((_, Some(parsed))) => {
                let mut m = ChatMessage::assistant(parsed.content.trim());
                m.tool_calls = parsed
                    .calls
                    .iter()
                    .map(|c| {
                        let args = serde_json::from_str::<serde_json::Value>(&c.arguments).unwrap_or_default();
                        serde_json::json!({"id": c.id, "type": "function", "function": {"name": c.name, "arguments": args}})
                    })
                    .collect();
                history.push(m);
            }
            Ok((answer, None)) => history.push(ChatMessage::assistant(answer.trim())),
            Err(e) => {
                history.pop();
                eprintln!("error: {e}");
            }
        }
    }
    if let Some(h) = &history_file {
        if let Some(dir) = h.parent() {
            let _ = std::fs::create_dir_all(dir);
        }
        let _ = rl.save_history(h);
    }
    Ok(())
}
