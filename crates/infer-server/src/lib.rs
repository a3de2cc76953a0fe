//! # infer-server
//!
//! An OpenAI-compatible HTTP server over infer's engine: `POST /v1/chat/completions` and
//! `/v1/completions` (JSON or server-sent events), `GET /v1/models`, `POST /tokenize` and
//! `/detokenize`, `GET /health` and Prometheus `GET /metrics`. One engine thread batches every
//! request's sequences continuously (they join and leave at each step) over a paged KV cache with
//! prefix caching; handlers only parse, tokenize and stream.

mod anthropic;
mod conn;
mod embeddings;
mod error;
mod metrics;
mod models;
mod openai;
mod rerank;
mod responses;
mod routes;
mod run;
mod worker;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, OnceLock};
use std::time::{Duration, Instant};

use axum::extract::{DefaultBodyLimit, MatchedPath, Request, State};
use axum::http::{header, HeaderValue, Method};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use infer_core::tools::ToolFormat;
use infer_core::{ChatTemplate, ConstraintCompiler, Engine, EngineConfig, LoadedModel, Tokenizer};
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::cors::{AllowOrigin, CorsLayer};

pub use conn::ConnLimits;
pub use error::ApiError;
pub use metrics::Metrics;
pub use models::ModelSpec;

/// Reported as `system_fingerprint`.
pub const FINGERPRINT: &str = concat!("infer-", env!("CARGO_PKG_VERSION"));

/// What the server's loader gives it: the model, and a draft model for speculative decoding (its
/// limits from [`EngineConfig::speculative`], else 8 tokens).
pub struct Models {
    pub main: LoadedModel,
    pub draft: Option<LoadedModel>,
}

/// A loaded model of either kind: a decoder (generation, and embeddings of its hidden states) or an
/// encoder (embeddings only; a cross-encoder: reranking only).
pub enum Loaded {
    Decoder(Box<Models>),
    Encoder(Box<infer_core::encoder::Encoder>),
}

impl From<LoadedModel> for Loaded {
    fn from(main: LoadedModel) -> Self {
        Self::Decoder(Box::new(Models { main, draft: None }))
    }
}

impl From<Models> for Loaded {
    fn from(m: Models) -> Self {
        Self::Decoder(Box::new(m))
    }
}

/// How the server runs.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// The model id clients send and see (default: the loaded model's name).
    pub served_model_name: Option<String>,
    /// Required as `Authorization: Bearer KEY` on /v1 and tokenizer endpoints when set.
    pub api_key: Option<String>,
    /// Engine limits: context, max sequences, KV cache memory, prefix caching.
    pub engine: EngineConfig,
    /// Sequences that may wait beyond `engine.max_seqs` before requests get 429.
    pub max_queue: usize,
    /// Largest request body in bytes (413 beyond).
    pub max_body_bytes: usize,
    /// Origins allowed by CORS (`*` for any); empty: CORS off.
    pub cors_origins: Vec<String>,
    /// On shutdown, how long in-flight requests may finish before they are cancelled.
    pub shutdown_grace: Duration,
    /// How the model writes tool calls; `None`: recognised from its chat template.
    pub tool_call_parser: Option<ToolFormat>,
    /// Split `<think>…</think>` into `reasoning_content` (vLLM's and llama.cpp's default); off: it
    /// stays in the content.
    pub reasoning: bool,
    /// Connections at once, header-read and write timeouts.
    pub connections: ConnLimits,
    /// How `/v1/embeddings` pools a decoder's token states (last token or mean).
    pub pooling: infer_core::embeddings::Pooling,
    /// Report `usage.prompt_tokens_details.cached_tokens` (vLLM's `--enable-prompt-tokens-details`).
    /// Off by default: with a shared prefix cache it tells one client what prompts others sent.
    pub report_cached_tokens: bool,
    /// Several models: most loaded at once (0: no limit); loading another first unloads the least
    /// recently used idle one.
    pub models_max: usize,
    /// Several models: most bytes loaded at once, by the models' [`ModelSpec::size`] (`None`: no
    /// limit); loading another first unloads least recently used idle ones until it fits.
    pub models_mem: Option<u64>,
    /// Several models: how long a model stays loaded after its last request (`None`: for ever).
    pub keep_alive: Option<Duration>,
    /// Several models: how long a request waits for its model to load (or for room to load it)
    /// before a 503.
    pub load_timeout: Duration,
    /// Called (on a blocking thread) once an unloaded model's memory was freed: the CLI hands the
    /// allocator's free pages back to the system.
    pub after_unload: Option<fn()>,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            served_model_name: None,
            api_key: None,
            engine: EngineConfig::default(),
            pooling: infer_core::embeddings::Pooling::Last,
            max_queue: 256,
            max_body_bytes: 8 << 20,
            cors_origins: Vec::new(),
            shutdown_grace: Duration::from_secs(10),
            tool_call_parser: None,
            reasoning: true,
            connections: ConnLimits::default(),
            report_cached_tokens: false,
            models_max: 0,
            models_mem: None,
            keep_alive: Some(Duration::from_secs(300)),
            load_timeout: Duration::from_secs(600),
            after_unload: None,
        }
    }
}

/// What handlers need once the model is loaded.
pub struct Ready {
    pub model_id: String,
    pub tokenizer: Tokenizer,
    pub chat_template: Option<ChatTemplate>,
    pub max_context: usize,
    pub report_cached_tokens: bool,
    pub vocab_size: usize,
    pub eos: Vec<u32>,
    pub defaults: openai::Defaults,
    pub created: u64,
    /// How the model writes tool calls.
    pub tool_format: ToolFormat,
    /// Whether the template knows `<think>` sections (then they go to `reasoning_content`).
    pub thinks: bool,
    /// Tokens that stand for tool-call and reasoning markers (the detokenizer may leave them out).
    pub markers: std::collections::HashMap<u32, String>,
    /// Compiles structured-output constraints; built at the first request that has one.
    compiler: OnceLock<Result<Arc<ConstraintCompiler>, String>>,
    /// What `/v1/embeddings` runs (beside the engine, on a blocking thread).
    pub embedder: Embedder,
    /// Whether the model generates text (an encoder only embeds: the generation endpoints refuse it).
    pub generates: bool,
    /// The engine thread's commands (a decoder's); the thread ends, freeing the engine, once the
    /// last holder of this `Ready` is gone.
    commands: Option<mpsc::Sender<worker::Command>>,
    /// This model's sequences running or queued (admission control: `max_seqs + max_queue` each).
    inflight: AtomicUsize,
}

/// The model behind `/v1/embeddings`.
#[derive(Clone)]
pub enum Embedder {
    /// A decoder's final hidden states, pooled.
    Decoder { model: Arc<dyn infer_core::models::CausalLm>, pooling: infer_core::embeddings::Pooling },
    /// An encoder (BERT family) with its own pooling.
    Encoder(Arc<infer_core::encoder::Encoder>),
}

impl Embedder {
    pub fn hidden_size(&self) -> usize {
        match self {
            Self::Decoder { model, .. } => model.config().hidden_size,
            Self::Encoder(e) => e.hidden_size(),
        }
    }
}

impl Ready {
    /// The constraint compiler over this model's vocabulary (blocking: built at the first call).
    pub fn compiler(&self) -> Result<Arc<ConstraintCompiler>, ApiError> {
        self.compiler
            .get_or_init(|| ConstraintCompiler::new(&self.tokenizer, self.vocab_size, &self.eos).map(Arc::new).map_err(|e| e.to_string()))
            .clone()
            .map_err(ApiError::internal)
    }

    /// Generation endpoints on an encoder: a 400 pointing at /v1/embeddings.
    pub(crate) fn check_generates(&self) -> Result<(), ApiError> {
        if self.generates {
            return Ok(());
        }
        let what = match &self.embedder {
            Embedder::Encoder(e) if e.reranks() => "a reranking model: it serves /v1/rerank only",
            _ => "an embedding model: it serves /v1/embeddings only",
        };
        Err(ApiError::bad_request(Some("model"), format!("`{}` is {what}", self.model_id)))
    }

    pub(crate) fn check_model(&self, model: Option<&str>) -> Result<(), ApiError> {
        match model {
            Some(m) if !m.is_empty() && m != self.model_id => Err(ApiError::model_not_found(m, &self.model_id)),
            _ => Ok(()),
        }
    }

    fn check_context(&self, prompt_tokens: usize, param: &str) -> Result<(), ApiError> {
        if prompt_tokens >= self.max_context {
            return Err(ApiError::bad_request(
                Some(param),
                format!(
                    "the prompt has {prompt_tokens} tokens but this model's context holds {} (one more is needed for the answer); shorten the prompt or restart the server with a larger --ctx-size",
                    self.max_context
                ),
            )
            .with_code("context_length_exceeded"));
        }
        Ok(())
    }
}

/// State shared by all handlers.
pub struct AppState {
    cfg: ServerConfig,
    /// Bound to a loopback address: requests must name a loopback host (DNS rebinding).
    loopback_only: bool,
    /// The served models (one, loaded at start; or several, loaded on demand).
    models: models::Table,
    metrics: Arc<Metrics>,
    /// Sequences running or queued, all models together (shutdown waits for them).
    inflight: AtomicUsize,
    shutting_down: AtomicBool,
}

impl AppState {
    /// The one model of a single-model server (503 while it loads); with several models, a 400
    /// naming `model` (requests must say which).
    pub(crate) fn ready(&self) -> Result<Arc<Ready>, ApiError> {
        if self.is_shutting_down() {
            return Err(ApiError::unavailable("the server is shutting down"));
        }
        if self.models.multi() {
            return Err(self.models.missing_model());
        }
        self.models
            .single()
            .ok_or_else(|| ApiError::unavailable("the model is still loading; retry shortly (GET /health turns 200 when ready)"))
    }

    /// The model a request names: with one model, that model (a wrong name is a 404, none is fine);
    /// with several, the named one, loaded first if need be (waiting at most `load_timeout`).
    pub(crate) async fn resolve(self: &Arc<Self>, model: Option<&str>) -> Result<Arc<Ready>, ApiError> {
        if !self.models.multi() {
            let ready = self.ready()?;
            ready.check_model(model)?;
            return Ok(ready);
        }
        if self.is_shutting_down() {
            return Err(ApiError::unavailable("the server is shutting down"));
        }
        models::resolve(self, model).await
    }

    fn is_shutting_down(&self) -> bool {
        self.shutting_down.load(Ordering::SeqCst)
    }
}

fn router(state: Arc<AppState>) -> Router {
    let protected = Router::new()
        .route("/v1/chat/completions", post(routes::chat_completions))
        .route("/v1/completions", post(routes::completions))
        .route("/v1/messages", post(anthropic::messages))
        .route("/v1/responses", post(responses::responses))
        .route("/v1/embeddings", post(embeddings::embeddings))
        .route("/v1/rerank", post(rerank::rerank))
        .route("/rerank", post(rerank::rerank))
        .route("/v1/reranking", post(rerank::rerank))
        .route("/v1/models", get(routes::list_models))
        .route("/v1/models/{*id}", get(routes::get_model))
        .route("/tokenize", post(routes::tokenize))
        .route("/detokenize", post(routes::detokenize))
        .route_layer(middleware::from_fn_with_state(state.clone(), require_api_key));
    let mut app = Router::new()
        .route("/health", get(routes::health))
        .route("/metrics", get(routes::metrics))
        .merge(protected)
        .fallback(routes::not_found)
        .route_layer(middleware::from_fn_with_state(state.clone(), count_requests))
        .layer(middleware::from_fn_with_state(state.clone(), browser_guard))
        .layer(DefaultBodyLimit::max(state.cfg.max_body_bytes))
        .layer(CatchPanicLayer::custom(|_| ApiError::internal("internal error while handling the request").into_response()));
    if !state.cfg.cors_origins.is_empty() {
        let origins = &state.cfg.cors_origins;
        let allow = if origins.iter().any(|o| o == "*") {
            AllowOrigin::any()
        } else {
            AllowOrigin::list(origins.iter().filter_map(|o| HeaderValue::from_str(o).ok()))
        };
        app = app.layer(
            CorsLayer::new()
                .allow_origin(allow)
                .allow_methods([Method::GET, Method::POST, Method::OPTIONS])
                .allow_headers([header::AUTHORIZATION, header::CONTENT_TYPE]),
        );
    }
    app.with_state(state)
}

/// Keeps web pages out of a local server: a POST whose body a page can send without a CORS preflight
/// (`text/plain`, form encodings) is refused (415), and on a loopback-only server a request naming
/// another host (a DNS-rebinding page) is refused (403).
async fn browser_guard(State(st): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    use axum::http::StatusCode;
    if st.loopback_only {
        let host = req.headers().get(header::HOST).and_then(|h| h.to_str().ok()).unwrap_or("");
        let name = match host.strip_prefix('[') {
            Some(v6) => v6.split(']').next().unwrap_or(""),
            None => host.rsplit_once(':').map_or(host, |(h, _)| h),
        };
        let local =
            name.is_empty() || name.eq_ignore_ascii_case("localhost") || name.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback());
        if !local {
            return ApiError::status(
                StatusCode::FORBIDDEN,
                format!("Host `{host}` is not this loopback server's; run `infer serve --host 0.0.0.0` to accept requests for other names"),
            )
            .into_response();
        }
    }
    if req.method() == Method::POST {
        let ct = req.headers().get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("").to_ascii_lowercase();
        let essence = ct.split(';').next().unwrap_or("").trim();
        if matches!(essence, "text/plain" | "application/x-www-form-urlencoded" | "multipart/form-data") {
            return ApiError::status(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                format!("send the body as `Content-Type: application/json`, not `{essence}`"),
            )
            .into_response();
        }
    }
    next.run(req).await
}

async fn require_api_key(State(st): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    if let Some(key) = &st.cfg.api_key {
        // `Authorization: Bearer KEY` (OpenAI's clients) or `x-api-key: KEY` (Anthropic's).
        let bearer = req.headers().get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()).and_then(|v| v.strip_prefix("Bearer "));
        let given = bearer.or_else(|| req.headers().get("x-api-key").and_then(|v| v.to_str().ok()));
        // Compare in time independent of where the strings differ.
        let ok = given.is_some_and(|g| g.len() == key.len() && g.bytes().zip(key.bytes()).fold(0u8, |acc, (a, b)| acc | (a ^ b)) == 0);
        if !ok {
            if req.uri().path().starts_with("/v1/messages") {
                return anthropic::AnthropicError(ApiError::unauthorized()).into_response();
            }
            return ApiError::unauthorized().into_response();
        }
    }
    next.run(req).await
}

async fn count_requests(State(st): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    let endpoint = req.extensions().get::<MatchedPath>().map(|p| p.as_str().to_string()).unwrap_or_else(|| "other".into());
    let resp = next.run(req).await;
    st.metrics.requests.with_label_values(&[endpoint.as_str(), resp.status().as_str()]).inc();
    resp
}

/// Builds what handlers need from a loaded model: for a decoder its engine too (to run on the
/// engine thread, with the receiving end of `Ready`'s commands).
#[allow(clippy::type_complexity)]
fn setup(
    cfg: &ServerConfig,
    loaded: Loaded,
    name: Option<String>,
) -> infer_core::Result<(Option<(Engine, mpsc::Receiver<worker::Command>)>, Ready)> {
    let created = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    let (mut m, draft) = match loaded {
        Loaded::Decoder(m) => (m.main, m.draft),
        Loaded::Encoder(e) => {
            let ready = Ready {
                model_id: name.unwrap_or_else(|| e.name.clone()),
                tokenizer: e.tokenizer.clone(),
                chat_template: None,
                max_context: e.max_tokens(),
                report_cached_tokens: false,
                vocab_size: e.tokenizer.vocab_size(),
                eos: Vec::new(),
                defaults: openai::Defaults::default(),
                created,
                tool_format: ToolFormat::detect(""),
                thinks: false,
                markers: Default::default(),
                compiler: OnceLock::new(),
                embedder: Embedder::Encoder(Arc::from(e)),
                generates: false,
                commands: None,
                inflight: AtomicUsize::new(0),
            };
            return Ok((None, ready));
        }
    };
    let mut engine_cfg = cfg.engine.clone();
    if let Some(d) = draft {
        let (draft_max, draft_min) = engine_cfg.speculative.as_ref().map_or((8, 1), |s| (s.draft_max, s.draft_min));
        let mut sc = infer_core::SpeculativeConfig::draft_model(d.model, d.tokenizer, draft_max);
        sc.draft_min = draft_min;
        engine_cfg.speculative = Some(sc);
    }
    let engine = Engine::new(m.model.clone(), m.tokenizer.clone(), m.eos_token_ids.clone(), engine_cfg)?;
    let gc = &m.generation_config;
    let d = openai::Defaults::default();
    let defaults = openai::Defaults {
        temperature: gc.temperature.unwrap_or(d.temperature),
        top_p: gc.top_p.unwrap_or(d.top_p),
        top_k: gc.top_k.unwrap_or(d.top_k),
        repetition_penalty: gc.repetition_penalty.unwrap_or(d.repetition_penalty),
    };
    let template_src = m.chat_template.as_ref().map(|t| t.source().to_string()).unwrap_or_default();
    let (commands, rx) = mpsc::channel();
    let ready = Ready {
        tool_format: cfg.tool_call_parser.unwrap_or_else(|| ToolFormat::detect(&template_src)),
        thinks: cfg.reasoning && template_src.contains("<think>"),
        compiler: OnceLock::new(),
        markers: infer_core::tools::MARKERS.iter().filter_map(|&mk| m.tokenizer.token_to_id(mk).map(|id| (id, mk.to_string()))).collect(),
        model_id: name.unwrap_or_else(|| m.name.clone()),
        tokenizer: m.tokenizer.clone(),
        chat_template: m.chat_template.take(),
        max_context: engine.max_context(),
        report_cached_tokens: cfg.report_cached_tokens,
        vocab_size: m.config().vocab_size,
        eos: m.eos_token_ids.clone(),
        defaults,
        embedder: Embedder::Decoder { model: m.model.clone(), pooling: cfg.pooling },
        generates: true,
        created,
        commands: Some(commands),
        inflight: AtomicUsize::new(0),
    };
    Ok((Some((engine, rx)), ready))
}

/// Loads a model on a new thread (which then runs its engine until the model is unloaded) and
/// hands the result to `done` (still on that thread, before the engine runs).
/// `alive` is dropped when the thread ends.
pub(crate) fn spawn_model<F>(
    cfg: ServerConfig,
    metrics: Arc<Metrics>,
    load: models::LoadFn,
    name: Option<String>,
    alive: Option<mpsc::Sender<()>>,
    done: F,
) -> Result<(), String>
where
    F: FnOnce(Result<Arc<Ready>, String>) + Send + 'static,
{
    std::thread::Builder::new()
        .name("infer-engine".into())
        .spawn(move || {
            let _alive = alive;
            let started = Instant::now();
            let run = || setup(&cfg, load()?, name);
            let built = std::panic::catch_unwind(std::panic::AssertUnwindSafe(run)).unwrap_or_else(|p| {
                let msg = p.downcast_ref::<String>().cloned().or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()));
                Err(infer_core::Error::Model(format!("loading the model failed: {}", msg.unwrap_or_else(|| "internal error".into()))))
            });
            match built {
                Ok((Some((engine, rx)), ready)) => {
                    tracing::info!(
                        "model `{}` ready in {:.1}s: context {} tokens; {}",
                        ready.model_id,
                        started.elapsed().as_secs_f64(),
                        ready.max_context,
                        engine.cache_sizing()
                    );
                    let model = ready.model_id.clone();
                    done(Ok(Arc::new(ready)));
                    worker::run(engine, rx, metrics, &model);
                    tracing::info!("engine stopped");
                }
                Ok((None, ready)) => {
                    let serves = match &ready.embedder {
                        Embedder::Encoder(e) if e.reranks() => "reranking (/v1/rerank) only",
                        _ => "embeddings only",
                    };
                    tracing::info!(
                        "encoder `{}` ready in {:.1}s: {serves}, inputs up to {} tokens",
                        ready.model_id,
                        started.elapsed().as_secs_f64(),
                        ready.max_context
                    );
                    done(Ok(Arc::new(ready)));
                }
                Err(e) => done(Err(e.to_string())),
            }
        })
        .map(|_| ())
        .map_err(|e| format!("cannot start the engine thread: {e}"))
}

/// Loads the model on the engine thread and serves `listener` until `shutdown` resolves; then new
/// requests get 503, in-flight ones may finish for `shutdown_grace`, the rest are cancelled (each
/// stream ends with an error event) and the function returns. A model that fails to load ends it
/// with that error.
pub async fn serve<L, M, S>(listener: tokio::net::TcpListener, cfg: ServerConfig, load: L, shutdown: S) -> Result<(), String>
where
    L: FnOnce() -> infer_core::Result<M> + Send + 'static,
    M: Into<Loaded>,
    S: Future<Output = ()> + Send + 'static,
{
    let once = std::sync::Mutex::new(Some(load));
    let load: models::LoadFn = Arc::new(move || {
        let f = once.lock().unwrap_or_else(|e| e.into_inner()).take();
        f.ok_or_else(|| infer_core::Error::Model("the model was loaded already".into()))?().map(Into::into)
    });
    let name = cfg.served_model_name.clone();
    serve_table(listener, cfg, models::Table::one(load, name), shutdown).await
}

/// Serves several models, each request routed by its `model`: a model loads at the first request
/// for it (requests for a loading model wait, at most `load_timeout`), unloads after `keep_alive`
/// idle, and at most `models_max` are loaded at once (the least recently used idle one is unloaded
/// to make room). `GET /health` is 200 once listening; `/v1/models` gives each model's state.
pub async fn serve_models<S>(listener: tokio::net::TcpListener, cfg: ServerConfig, specs: Vec<ModelSpec>, shutdown: S) -> Result<(), String>
where
    S: Future<Output = ()> + Send + 'static,
{
    if specs.is_empty() {
        return Err("no models to serve".into());
    }
    let mut seen = std::collections::HashSet::new();
    for s in &specs {
        if !seen.insert(s.name.as_str()) {
            return Err(format!("two models are named `{}`; name them apart (NAME=PATH)", s.name));
        }
    }
    serve_table(listener, cfg, models::Table::several(specs), shutdown).await
}

async fn serve_table<S>(listener: tokio::net::TcpListener, cfg: ServerConfig, table: models::Table, shutdown: S) -> Result<(), String>
where
    S: Future<Output = ()> + Send + 'static,
{
    let metrics = Arc::new(Metrics::new());
    let loopback_only = listener.local_addr().is_ok_and(|a| a.ip().is_loopback());
    let state = Arc::new(AppState {
        cfg,
        loopback_only,
        models: table,
        metrics: metrics.clone(),
        inflight: AtomicUsize::new(0),
        shutting_down: AtomicBool::new(false),
    });
    let (loaded_tx, loaded_rx) = tokio::sync::oneshot::channel::<Result<(), String>>();
    if state.models.multi() {
        let _ = loaded_tx.send(Ok(()));
        tokio::spawn(models::reaper(Arc::downgrade(&state)));
    } else {
        let st = state.clone();
        let load = state.models.single_load();
        let name = state.cfg.served_model_name.clone();
        spawn_model(state.cfg.clone(), metrics, load, name, None, move |r| {
            let r = r.map(|ready| st.models.set_single(ready));
            let _ = loaded_tx.send(r);
        })?;
    }

    let st = state.clone();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let signal = async move {
        shutdown.await;
        st.shutting_down.store(true, Ordering::SeqCst);
        let _ = stop_tx.send(());
    };
    let st = state.clone();
    let drain = async move {
        let deadline = Instant::now() + st.cfg.shutdown_grace;
        let busy = st.inflight.load(Ordering::SeqCst);
        if busy > 0 {
            tracing::info!("shutting down: letting {busy} sequences finish (up to {:?})", st.cfg.shutdown_grace);
        }
        while st.inflight.load(Ordering::SeqCst) > 0 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        if st.inflight.load(Ordering::SeqCst) > 0 {
            for ready in st.models.loaded() {
                if let Some(c) = &ready.commands {
                    let _ = c.send(worker::Command::AbortAll("the server is shutting down".into()));
                }
            }
        }
    };
    tokio::spawn(signal);
    let app = router(state.clone());
    let limits = state.cfg.connections;
    drop(state);
    let server = conn::serve_connections(
        listener,
        app,
        limits,
        async move {
            let _ = stop_rx.await;
        },
        drain,
    );
    tokio::pin!(server);
    tokio::select! {
        () = &mut server => return Ok(()),
        loaded = loaded_rx => match loaded {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(e),
            Err(_) => return Err("the engine thread stopped while loading the model".into()),
        }
    }
    server.await;
    Ok(())
}

/// A server running on its own threads (for tests, benchmarks and embedding).
pub struct BackgroundServer {
    pub addr: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<Result<(), String>>>,
}

impl BackgroundServer {
    /// Binds `127.0.0.1` on a free port and serves there until [`stop`](Self::stop) or drop.
    pub fn start<L, M>(cfg: ServerConfig, load: L) -> std::io::Result<Self>
    where
        L: FnOnce() -> infer_core::Result<M> + Send + 'static,
        M: Into<Loaded> + 'static,
    {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
        let listener = rt.block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))?;
        let addr = listener.local_addr()?;
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::spawn(move || {
            rt.block_on(serve(listener, cfg, load, async move {
                let _ = stopped.await;
            }))
        });
        Ok(Self { addr, stop: Some(stop), thread: Some(thread) })
    }

    /// Like [`start`](Self::start), serving several models (see [`serve_models`]).
    pub fn start_models(cfg: ServerConfig, specs: Vec<ModelSpec>) -> std::io::Result<Self> {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
        let listener = rt.block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))?;
        let addr = listener.local_addr()?;
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::spawn(move || {
            rt.block_on(serve_models(listener, cfg, specs, async move {
                let _ = stopped.await;
            }))
        });
        Ok(Self { addr, stop: Some(stop), thread: Some(thread) })
    }

    /// `http://127.0.0.1:PORT`
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Shuts down (gracefully) and returns how the server ended.
    pub fn stop(mut self) -> Result<(), String> {
        self.stop.take().map(|s| s.send(()));
        self.thread.take().map(|t| t.join().unwrap_or_else(|_| Err("server thread panicked".into()))).unwrap_or(Ok(()))
    }
}

impl Drop for BackgroundServer {
    fn drop(&mut self) {
        self.stop.take().map(|s| s.send(()));
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
