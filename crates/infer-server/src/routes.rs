//! The HTTP endpoints: OpenAI's chat and text completions (plain JSON or server-sent events), models,
//! tokenize/detokenize, health and metrics.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, State};
use axum::http::{header, StatusCode};
use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures_util::stream::{self, Stream};
use infer_core::structured::Reasoning;
use infer_core::tools::{self, OutputDelta, OutputParser, ThinkMode, ToolChoice, ToolFormat};
use infer_core::{Constraint, FinishReason, TokenConstraint, TokenEvent};
use serde_json::{json, Value};

use crate::error::ApiError;
use crate::openai::{parse, parse_request, ChatParams, CompletionParams, Prompt};
use crate::run::{ChoiceOutput, ChoiceToken, Run};
use crate::worker::NewSeq;
use crate::{AppState, Ready};

/// Legacy completions generate 16 tokens unless told otherwise (OpenAI's default).
const COMPLETIONS_DEFAULT_MAX_TOKENS: usize = 16;

pub(crate) fn json_body(body: Result<Bytes, BytesRejection>) -> Result<Value, ApiError> {
    let bytes = body.map_err(|r| {
        let status = r.status();
        if status == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError { status, ..ApiError::bad_request(None, "request body too large; raise `infer serve --max-body-size` if needed") }
        } else {
            ApiError { status, ..ApiError::bad_request(None, format!("cannot read the request body: {r}")) }
        }
    })?;
    let v: Value = serde_json::from_slice(&bytes).map_err(|e| ApiError::bad_request(None, format!("the body is not valid JSON: {e}")))?;
    if !v.is_object() {
        return Err(ApiError::bad_request(None, "the body must be a JSON object"));
    }
    Ok(v)
}

pub(crate) fn random_id(prefix: &str) -> String {
    use rand::distr::{Alphanumeric, SampleString};
    format!("{prefix}{}", Alphanumeric.sample_string(&mut rand::rng(), 24))
}

pub(crate) fn now_secs() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

/// The same parameters for each of `n` choices, each with its copy of the constraint; with a seed,
/// choice `i` uses `seed + i` so choices differ yet stay reproducible.
fn choices(
    prompt: &[u32],
    params: &infer_core::SamplingParams,
    n: usize,
    constraint: Option<&infer_core::GrammarConstraint>,
) -> Vec<NewSeq> {
    (0..n)
        .map(|i| {
            let mut p = params.clone();
            p.seed = p.seed.map(|s| s.wrapping_add(i as u64));
            let c = constraint.map(|c| Box::new(c.fork()) as Box<dyn TokenConstraint>);
            (prompt.to_vec(), p, c)
        })
        .collect()
}

/// Compiles a request's constraint on a blocking thread (large schemas take a while); the error of
/// an invalid one names `field`.
async fn compile(ready: &Arc<Ready>, c: Constraint, field: String, think: ThinkMode) -> Result<infer_core::GrammarConstraint, ApiError> {
    let r = ready.clone();
    let reasoning = match think {
        ThinkMode::Off => Reasoning::None,
        ThinkMode::Open => Reasoning::Open { close: "</think>".into() },
        ThinkMode::Tagged => Reasoning::Tagged { open: "<think>".into(), close: "</think>".into() },
    };
    tokio::task::spawn_blocking(move || {
        r.compiler()?.compile_with(&c, &reasoning).map_err(|e| ApiError::bad_request(Some(&field), format!("invalid `{field}`: {e}")))
    })
    .await
    .map_err(|e| ApiError::internal(format!("the grammar compiler stopped: {e}")))?
}

/// Runs CPU-heavy request work (template rendering, tokenizing) on the blocking pool, so the async
/// workers keep answering other requests (`/health`, streams) meanwhile.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T, ApiError> + Send + 'static) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(f).await.map_err(|e| ApiError::internal(format!("a request worker failed: {e}")))?
}

/// The constraint compiler, built on a blocking thread at its first use.
async fn compiler(ready: &Arc<Ready>) -> Result<Arc<infer_core::ConstraintCompiler>, ApiError> {
    let r = ready.clone();
    tokio::task::spawn_blocking(move || r.compiler()).await.map_err(|e| ApiError::internal(e.to_string()))?
}

fn finish_str(f: Option<FinishReason>) -> Value {
    f.map(|f| Value::from(f.as_str())).unwrap_or(Value::Null)
}

/// What the response builders need to know about the request.
pub(crate) struct Meta {
    pub(crate) id: String,
    created: u64,
    pub(crate) model: String,
    pub(crate) prompt_tokens: usize,
    chat: bool,
    /// Alternatives per token when logprobs were asked for.
    logprobs: Option<usize>,
    include_usage: bool,
    /// Completions with `echo`: the prompt text of each choice.
    echo: Vec<String>,
    /// Chat: the tool-call format when tools are in play.
    tool_format: Option<ToolFormat>,
    /// Chat: where reasoning may appear.
    think: ThinkMode,
}

impl Meta {
    pub(crate) fn parser(&self) -> OutputParser {
        OutputParser::new(self.tool_format, self.think)
    }
}

/// The text a token adds to what the output parser reads: its text, plus the marker it stands for
/// when the detokenizer leaves special tokens out (`[TOOL_CALLS]`, `<|tool_call|>`).
pub(crate) fn parser_text(ready: &Ready, ev: &TokenEvent) -> String {
    match ready.markers.get(&ev.token) {
        Some(m) if !ev.text.ends_with(m.as_str()) => format!("{}{m}", ev.text),
        _ => ev.text.clone(),
    }
}

fn tool_call_json(index: Option<usize>, id: &str, name: &str, arguments: &str) -> Value {
    let mut v = json!({"id": id, "type": "function", "function": {"name": name, "arguments": arguments}});
    if let Some(i) = index {
        v["index"] = json!(i);
    }
    v
}

/// OpenAI's finish reason: `tool_calls` when the model ended after calling tools.
fn chat_finish(f: Option<FinishReason>, calls: usize) -> Value {
    match f {
        Some(FinishReason::Stop) if calls > 0 => Value::from("tool_calls"),
        f => finish_str(f),
    }
}

/// Token counts; `prompt_tokens_details.cached_tokens` only when the server reports it (it tells a
/// client which prompts others sent, so it is off by default, as in vLLM).
fn usage(ready: &Ready, prompt_tokens: usize, completion_tokens: usize, cached: usize) -> Value {
    let mut u = json!({
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    });
    if ready.report_cached_tokens {
        u["prompt_tokens_details"] = json!({"cached_tokens": cached});
    }
    u
}

fn token_str(ready: &Ready, id: u32) -> String {
    ready.tokenizer.decode(&[id], false).unwrap_or_default()
}

/// Whether a token is the end-of-sequence token that ended a choice (it has no text to report).
pub(crate) fn is_final_eos(ready: &Ready, ev: &TokenEvent) -> bool {
    ev.finish == Some(FinishReason::Stop) && ev.text.is_empty() && ready.eos.contains(&ev.token)
}

fn chat_logprob_entry(ready: &Ready, ev: &TokenEvent) -> Value {
    let entry = |id: u32, lp: f32| {
        let s = token_str(ready, id);
        json!({"token": s, "logprob": lp, "bytes": s.as_bytes()})
    };
    let mut e = entry(ev.token, ev.logprob);
    e["top_logprobs"] = ev.top_logprobs.iter().map(|&(t, lp)| entry(t, lp)).collect();
    e
}

/// Legacy completions' logprobs object for a run of tokens; `offset` is the text offset of the first.
fn completion_logprobs(ready: &Ready, events: &[&TokenEvent], mut offset: usize) -> Value {
    let (mut tokens, mut lps, mut tops, mut offsets) = (vec![], vec![], vec![], vec![]);
    for ev in events {
        let s = token_str(ready, ev.token);
        offsets.push(offset);
        offset += ev.text.len();
        tokens.push(Value::from(s));
        lps.push(Value::from(ev.logprob));
        let top: serde_json::Map<String, Value> = ev.top_logprobs.iter().map(|&(t, lp)| (token_str(ready, t), Value::from(lp))).collect();
        tops.push(Value::Object(top));
    }
    json!({"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets})
}

fn full_response(ready: &Ready, meta: &Meta, outs: Vec<ChoiceOutput>) -> Value {
    let completion_tokens: usize = outs.iter().map(|o| o.tokens.len()).sum();
    let cached = outs.iter().filter_map(|o| o.tokens.first()).map(|t| t.cached_tokens).max().unwrap_or(0);
    let choices: Vec<Value> = outs
        .iter()
        .enumerate()
        .map(|(i, o)| {
            let shown: Vec<&TokenEvent> = o.tokens.iter().filter(|e| !is_final_eos(ready, e)).collect();
            if meta.chat {
                let logprobs = match meta.logprobs {
                    Some(_) => json!({"content": shown.iter().map(|e| chat_logprob_entry(ready, e)).collect::<Vec<_>>(), "refusal": null}),
                    None => Value::Null,
                };
                let mut parser = meta.parser();
                let mut message = if parser.is_plain() {
                    json!({"role": "assistant", "content": o.text, "refusal": null})
                } else {
                    for e in &o.tokens {
                        parser.push(&parser_text(ready, e));
                    }
                    let (_, parsed) = parser.finish();
                    let content = if parsed.calls.is_empty() || !parsed.content.trim().is_empty() {
                        Value::from(parsed.content)
                    } else {
                        Value::Null
                    };
                    let mut m = json!({"role": "assistant", "content": content, "refusal": null});
                    if let Some(r) = parsed.reasoning {
                        m["reasoning_content"] = Value::from(r);
                    }
                    if !parsed.calls.is_empty() {
                        m["tool_calls"] = parsed.calls.iter().map(|c| tool_call_json(None, &c.id, &c.name, &c.arguments)).collect();
                    }
                    m
                };
                let calls = message.get("tool_calls").and_then(Value::as_array).map_or(0, Vec::len);
                if message["content"].is_null() && calls == 0 {
                    message["content"] = Value::from("");
                }
                json!({
                    "index": i,
                    "message": message,
                    "logprobs": logprobs,
                    "finish_reason": chat_finish(o.finish, calls),
                })
            } else {
                let echo = meta.echo.get(i).cloned().unwrap_or_default();
                let logprobs = match meta.logprobs {
                    Some(_) => completion_logprobs(ready, &shown, echo.len()),
                    None => Value::Null,
                };
                json!({"index": i, "text": format!("{echo}{}", o.text), "logprobs": logprobs, "finish_reason": finish_str(o.finish)})
            }
        })
        .collect();
    json!({
        "id": meta.id,
        "object": if meta.chat { "chat.completion" } else { "text_completion" },
        "created": meta.created,
        "model": meta.model,
        "system_fingerprint": crate::FINGERPRINT,
        "choices": choices,
        "usage": usage(ready, meta.prompt_tokens, completion_tokens, cached),
    })
}

/// Turns a run into server-sent events in OpenAI's chunk format.
struct Chunker {
    ready: Arc<Ready>,
    meta: Meta,
    completion_tokens: usize,
    cached: usize,
    /// Text offset per choice (completions logprobs).
    offsets: Vec<usize>,
    /// Chat with tools or reasoning: each choice's output parser.
    parsers: Vec<OutputParser>,
}

impl Chunker {
    fn chunk(&self, choices: Vec<Value>) -> String {
        let mut c = json!({
            "id": self.meta.id,
            "object": if self.meta.chat { "chat.completion.chunk" } else { "text_completion" },
            "created": self.meta.created,
            "model": self.meta.model,
            "system_fingerprint": crate::FINGERPRINT,
            "choices": choices,
        });
        if self.meta.include_usage {
            c["usage"] = Value::Null;
        }
        c.to_string()
    }

    /// The chunks sent before any token: the assistant role (chat) or the echoed prompt (completions).
    fn start(&mut self, n: usize) -> VecDeque<String> {
        (0..n)
            .filter_map(|i| {
                if self.meta.chat {
                    Some(self.chunk(vec![
                        json!({"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": null, "finish_reason": null}),
                    ]))
                } else {
                    let echo = self.meta.echo.get(i).filter(|e| !e.is_empty())?.clone();
                    self.offsets[i] = echo.len();
                    Some(self.chunk(vec![json!({"index": i, "text": echo, "logprobs": null, "finish_reason": null})]))
                }
            })
            .collect()
    }

    /// A chat choice's parsed deltas as chunks (tools or reasoning in play).
    fn parsed_token(&mut self, index: usize, event: TokenEvent) -> Vec<String> {
        let piece = parser_text(&self.ready, &event);
        let mut deltas = self.parsers[index].push(&piece);
        if event.finish.is_some() {
            deltas.extend(self.parsers[index].finish().0);
        }
        let mut logprobs = match self.meta.logprobs {
            Some(_) if !is_final_eos(&self.ready, &event) => json!({"content": [chat_logprob_entry(&self.ready, &event)], "refusal": null}),
            _ => Value::Null,
        };
        let mut out = Vec::new();
        for d in deltas {
            let delta = match d {
                OutputDelta::Content(t) => json!({"content": t}),
                OutputDelta::Reasoning(t) => json!({"reasoning_content": t}),
                OutputDelta::CallStart { index: k, id, name } => json!({"tool_calls": [tool_call_json(Some(k), &id, &name, "")]}),
                OutputDelta::CallArguments { index: k, fragment } => {
                    json!({"tool_calls": [{"index": k, "function": {"arguments": fragment}}]})
                }
            };
            let lp = std::mem::take(&mut logprobs);
            out.push(self.chunk(vec![json!({"index": index, "delta": delta, "logprobs": lp, "finish_reason": null})]));
        }
        if !logprobs.is_null() {
            out.push(self.chunk(vec![json!({"index": index, "delta": {}, "logprobs": logprobs, "finish_reason": null})]));
        }
        if event.finish.is_some() {
            let reason = chat_finish(event.finish, self.parsers[index].num_calls());
            out.push(self.chunk(vec![json!({"index": index, "delta": {}, "logprobs": null, "finish_reason": reason})]));
        }
        out
    }

    fn token(&mut self, step: ChoiceToken) -> Vec<String> {
        let ChoiceToken { index, event } = step;
        self.completion_tokens += 1;
        self.cached = self.cached.max(event.cached_tokens);
        if self.meta.chat && !self.parsers.is_empty() {
            return self.parsed_token(index, event);
        }
        let mut out = Vec::new();
        let eos = is_final_eos(&self.ready, &event);
        if !event.text.is_empty() || (self.meta.logprobs.is_some() && !eos) {
            let choice = if self.meta.chat {
                let logprobs = match self.meta.logprobs {
                    Some(_) => json!({"content": [chat_logprob_entry(&self.ready, &event)], "refusal": null}),
                    None => Value::Null,
                };
                json!({"index": index, "delta": {"content": event.text}, "logprobs": logprobs, "finish_reason": null})
            } else {
                let logprobs = match self.meta.logprobs {
                    Some(_) => completion_logprobs(&self.ready, &[&event], self.offsets[index]),
                    None => Value::Null,
                };
                json!({"index": index, "text": event.text, "logprobs": logprobs, "finish_reason": null})
            };
            self.offsets[index] += event.text.len();
            out.push(self.chunk(vec![choice]));
        }
        if event.finish.is_some() {
            let choice = if self.meta.chat {
                json!({"index": index, "delta": {}, "logprobs": null, "finish_reason": finish_str(event.finish)})
            } else {
                json!({"index": index, "text": "", "logprobs": null, "finish_reason": finish_str(event.finish)})
            };
            out.push(self.chunk(vec![choice]));
        }
        out
    }

    fn end(&self) -> Option<String> {
        self.meta.include_usage.then(|| {
            let mut c: Value = serde_json::from_str(&self.chunk(vec![])).expect("own JSON");
            c["usage"] = usage(&self.ready, self.meta.prompt_tokens, self.completion_tokens, self.cached);
            c.to_string()
        })
    }
}

fn sse(run: Run, mut chunker: Chunker) -> Sse<impl Stream<Item = Result<Event, Infallible>>> {
    let n = run.num_choices();
    let queue = chunker.start(n);
    let events = stream::unfold((run, chunker, queue, false), |(mut run, mut chunker, mut queue, mut done)| async move {
        loop {
            if let Some(data) = queue.pop_front() {
                return Some((Ok(Event::default().data(data)), (run, chunker, queue, done)));
            }
            if done {
                return None;
            }
            match run.next().await {
                Some(Ok(step)) => queue.extend(chunker.token(step)),
                Some(Err(msg)) => {
                    // The stream has started: the error goes out as an event.
                    queue.push_back(ApiError::internal(msg).body().to_string());
                    queue.push_back("[DONE]".into());
                    done = true;
                }
                None => {
                    queue.extend(chunker.end());
                    queue.push_back("[DONE]".into());
                    done = true;
                }
            }
        }
    });
    Sse::new(events)
}

/// Another API's stream of a run (Anthropic's, the Responses API's): its events per token and the
/// event that ends a failed run.
pub(crate) trait EventShape: Send + 'static {
    fn token(&mut self, event: TokenEvent, out: &mut VecDeque<Event>);
    fn failed(&mut self, message: String) -> Event;
}

/// Server-sent events of `run` in `shape`'s API, after the `first` events.
pub(crate) fn shaped_stream<S: EventShape>(
    run: Run,
    shape: S,
    first: VecDeque<Event>,
) -> Sse<impl Stream<Item = Result<Event, Infallible>>> {
    let events = stream::unfold((run, shape, first, false), |(mut run, mut shape, mut queue, mut done)| async move {
        loop {
            if let Some(e) = queue.pop_front() {
                return Some((Ok(e), (run, shape, queue, done)));
            }
            if done {
                return None;
            }
            match run.next().await {
                Some(Ok(step)) => shape.token(step.event, &mut queue),
                Some(Err(msg)) => {
                    queue.push_back(shape.failed(msg));
                    done = true;
                }
                None => done = true,
            }
        }
    });
    Sse::new(events)
}

async fn respond(ready: Arc<Ready>, run: Run, meta: Meta, stream: bool) -> Result<Response, ApiError> {
    if stream {
        let n = run.num_choices();
        let parsers = if meta.chat && !meta.parser().is_plain() { (0..n).map(|_| meta.parser()).collect() } else { Vec::new() };
        let chunker = Chunker { ready, meta, completion_tokens: 0, cached: 0, offsets: vec![0; n], parsers };
        return Ok(sse(run, chunker).into_response());
    }
    let outs = run.collect().await?;
    Ok(Json(full_response(&ready, &meta, outs)).into_response())
}

pub async fn chat_completions(State(st): State<Arc<AppState>>, body: Result<Bytes, BytesRejection>) -> Result<Response, ApiError> {
    let chat: ChatParams = parse_request(&json_body(body)?)?;
    let stream = chat.common.stream();
    let (ready, run, meta) = start_chat(&st, chat).await?;
    respond(ready, run, meta, stream).await
}

/// A chat request's generation started: the prompt rendered (with its tools), the sequences
/// submitted; what the response builders of each API need.
pub(crate) async fn start_chat(st: &Arc<AppState>, chat: ChatParams) -> Result<(Arc<Ready>, Run, Meta), ApiError> {
    let common = &chat.common;
    let ready = st.resolve(common.model.as_deref()).await?;
    ready.check_generates()?;
    // `n` beyond what the server holds could never be admitted: 400, not a 429 to retry forever.
    let limit = st.cfg.engine.max_seqs + st.cfg.max_queue;
    if common.n()? > limit {
        return Err(ApiError::bad_request(
            Some("n"),
            format!("n = {} sequences; this server holds at most {limit} (--max-seqs + --max-queue)", common.n()?),
        ));
    }
    let mut conversation = chat.conversation()?;
    let tools = tools::parse_tools(chat.tools.as_deref().unwrap_or(&[]))
        .map_err(|(p, m)| ApiError::bad_request(Some(&p), format!("invalid `{p}`: {m}")))?;
    let tool_choice = tools::parse_tool_choice(chat.tool_choice.as_ref(), &tools)
        .map_err(|m| ApiError::bad_request(Some("tool_choice"), format!("invalid `tool_choice`: {m}")))?;
    let use_tools = !tools.is_empty() && tool_choice != ToolChoice::None;
    let mut constraint = common.constraint()?;
    if use_tools {
        if let Some((_, field)) = &constraint {
            return Err(ApiError::bad_request(
                Some(field),
                format!("invalid `{field}`: a structured-output constraint cannot be combined with `tools`"),
            ));
        }
    }
    if ready.chat_template.is_none() {
        return Err(ApiError::bad_request(
            None,
            format!("the model `{}` has no chat template; use /v1/completions with a plain prompt", ready.model_id),
        ));
    }
    let format = ready.tool_format;
    let template_tools = tools::prepare_messages(&mut conversation, &tools, &tool_choice, format);
    let kwargs = chat.chat_template_kwargs.clone().unwrap_or_default();
    let r = ready.clone();
    let (text, prompt) = blocking(move || {
        let template = r.chat_template.as_ref().expect("checked above");
        let text = template.render_with(&conversation, true, &template_tools, &kwargs)?;
        let prompt = r.tokenizer.encode(&text, false)?;
        Ok((text, prompt))
    })
    .await?;
    ready.check_context(prompt.len(), "messages")?;
    let mut params = common.sampling(&ready.defaults, ready.vocab_size, None)?;
    params.logprobs = chat.logprobs()?;
    let n = common.n()?;
    if use_tools {
        let compiler = compiler(&ready).await?;
        let parallel = chat.parallel_tool_calls.unwrap_or(true);
        let grammar = tools::tool_grammar(format, &tools, &tool_choice, parallel, &|t| compiler.special_ref(t))
            .map_err(|e| ApiError::bad_request(Some("tools"), format!("invalid `tools`: {e}")))?;
        if let Some(g) = grammar {
            constraint = Some((Constraint::Lark(g), "tools".into()));
        }
    }
    let think = if !ready.thinks {
        ThinkMode::Off
    } else if text.trim_end().ends_with("<think>") {
        ThinkMode::Open
    } else {
        ThinkMode::Tagged
    };
    // With a reasoning model the constraint governs what follows its reasoning.
    let compiled = match constraint {
        Some((c, field)) => Some(compile(&ready, c, field, think).await?),
        None => None,
    };
    let run = Run::submit(st, &ready, choices(&prompt, &params, n, compiled.as_ref())).await?;
    let meta = Meta {
        id: random_id("chatcmpl-"),
        created: now_secs(),
        model: ready.model_id.clone(),
        prompt_tokens: prompt.len(),
        chat: true,
        logprobs: params.logprobs,
        include_usage: common.include_usage(),
        echo: Vec::new(),
        tool_format: use_tools.then_some(format),
        think,
    };
    Ok((ready, run, meta))
}

pub async fn completions(State(st): State<Arc<AppState>>, body: Result<Bytes, BytesRejection>) -> Result<Response, ApiError> {
    let cp: CompletionParams = parse_request(&json_body(body)?)?;
    let common = &cp.common;
    let ready = st.resolve(common.model.as_deref()).await?;
    ready.check_generates()?;
    // Before any prompt is tokenized or copied per choice: the request must fit the server at all.
    let count = match &cp.prompt {
        Prompt::Texts(v) => v.len(),
        Prompt::TokenLists(v) => v.len(),
        _ => 1,
    };
    let limit = st.cfg.engine.max_seqs + st.cfg.max_queue;
    if count.saturating_mul(common.n()?) > limit {
        return Err(ApiError::bad_request(
            Some("prompt"),
            format!(
                "{count} prompts × n = {} sequences; this server holds at most {limit} (--max-seqs + --max-queue)",
                count.saturating_mul(common.n()?)
            ),
        ));
    }
    let prompts: Vec<Vec<u32>> = match &cp.prompt {
        Prompt::Text(s) => {
            let (r, s) = (ready.clone(), s.clone());
            blocking(move || Ok(vec![r.tokenizer.encode(&s, true)?])).await?
        }
        Prompt::Texts(v) => {
            let (r, v) = (ready.clone(), v.clone());
            blocking(move || Ok(v.iter().map(|s| r.tokenizer.encode(s, true)).collect::<Result<_, _>>()?)).await?
        }
        Prompt::Tokens(t) => vec![t.clone()],
        Prompt::TokenLists(v) => v.clone(),
    };
    if prompts.is_empty() {
        return Err(ApiError::bad_request(Some("prompt"), "`prompt` is an empty list"));
    }
    for p in &prompts {
        if p.is_empty() {
            return Err(ApiError::bad_request(Some("prompt"), "the prompt is empty"));
        }
        if let Some(&bad) = p.iter().find(|&&t| t as usize >= ready.vocab_size) {
            return Err(ApiError::bad_request(
                Some("prompt"),
                format!("token id {bad} is outside the vocabulary (size {})", ready.vocab_size),
            ));
        }
        ready.check_context(p.len(), "prompt")?;
    }
    let mut params = common.sampling(&ready.defaults, ready.vocab_size, Some(COMPLETIONS_DEFAULT_MAX_TOKENS))?;
    params.logprobs = cp.logprobs()?;
    let n = common.n()?;
    let compiled = match common.constraint()? {
        Some((c, field)) => Some(compile(&ready, c, field, ThinkMode::Off).await?),
        None => None,
    };
    let mut seqs = Vec::new();
    let mut echo = Vec::new();
    for p in &prompts {
        seqs.extend(choices(p, &params, n, compiled.as_ref()));
        let text = if cp.echo == Some(true) { ready.tokenizer.decode(p, true)? } else { String::new() };
        echo.extend(std::iter::repeat_n(text, n));
    }
    let run = Run::submit(&st, &ready, seqs).await?;
    let meta = Meta {
        id: random_id("cmpl-"),
        created: now_secs(),
        model: ready.model_id.clone(),
        prompt_tokens: prompts.iter().map(Vec::len).sum(),
        chat: false,
        logprobs: params.logprobs,
        include_usage: common.include_usage(),
        echo,
        tool_format: None,
        think: ThinkMode::Off,
    };
    respond(ready, run, meta, common.stream()).await
}

fn model_card(ready: &Ready) -> Value {
    json!({"id": ready.model_id, "object": "model", "created": ready.created, "owned_by": "infer", "max_model_len": ready.max_context})
}

pub async fn list_models(State(st): State<Arc<AppState>>) -> Result<Json<Value>, ApiError> {
    if st.models.multi() {
        return Ok(Json(json!({"object": "list", "data": st.models.cards(None)})));
    }
    let ready = st.ready()?;
    Ok(Json(json!({"object": "list", "data": [model_card(&ready)]})))
}

pub async fn get_model(State(st): State<Arc<AppState>>, Path(id): Path<String>) -> Result<Json<Value>, ApiError> {
    if st.models.multi() {
        return st.models.cards(Some(&id)).pop().map(Json).ok_or_else(|| st.models.not_found(&id));
    }
    let ready = st.ready()?;
    if id != ready.model_id {
        return Err(ApiError::model_not_found(&id, &ready.model_id));
    }
    Ok(Json(model_card(&ready)))
}

pub async fn tokenize(State(st): State<Arc<AppState>>, body: Result<Bytes, BytesRejection>) -> Result<Json<Value>, ApiError> {
    #[derive(serde::Deserialize)]
    struct Req {
        #[serde(default)]
        content: Option<String>,
        #[serde(default)]
        prompt: Option<String>,
        #[serde(default)]
        messages: Option<Vec<crate::openai::Message>>,
        #[serde(default)]
        add_special: Option<bool>,
        #[serde(default)]
        model: Option<String>,
    }
    let req: Req = parse(&json_body(body)?)?;
    let ready = st.resolve(req.model.as_deref()).await?;
    let r = ready.clone();
    let tokens = match (req.content.or(req.prompt), req.messages) {
        (Some(text), None) => blocking(move || Ok(r.tokenizer.encode(&text, req.add_special.unwrap_or(true))?)).await?,
        (None, Some(messages)) => {
            let chat = ChatParams {
                common: Default::default(),
                messages,
                logprobs: None,
                top_logprobs: None,
                tools: None,
                tool_choice: None,
                parallel_tool_calls: None,
                chat_template_kwargs: None,
            };
            let conversation = chat.conversation()?;
            blocking(move || {
                let template =
                    r.chat_template.as_ref().ok_or_else(|| ApiError::bad_request(Some("messages"), "the model has no chat template"))?;
                Ok(r.tokenizer.encode(&template.render(&conversation, true)?, false)?)
            })
            .await?
        }
        _ => return Err(ApiError::bad_request(None, "send one of `content` (or `prompt`) and `messages`")),
    };
    Ok(Json(json!({"tokens": tokens, "count": tokens.len(), "max_model_len": ready.max_context})))
}

pub async fn detokenize(State(st): State<Arc<AppState>>, body: Result<Bytes, BytesRejection>) -> Result<Json<Value>, ApiError> {
    #[derive(serde::Deserialize)]
    struct Req {
        tokens: Vec<u32>,
        #[serde(default)]
        model: Option<String>,
    }
    let req: Req = parse(&json_body(body)?)?;
    let ready = st.resolve(req.model.as_deref()).await?;
    if let Some(&bad) = req.tokens.iter().find(|&&t| t as usize >= ready.vocab_size) {
        return Err(ApiError::bad_request(Some("tokens"), format!("token id {bad} is outside the vocabulary (size {})", ready.vocab_size)));
    }
    let text = ready.tokenizer.decode(&req.tokens, false)?;
    Ok(Json(json!({"content": text, "prompt": text})))
}

pub async fn health(State(st): State<Arc<AppState>>) -> Response {
    // With several models, the server is ready once it listens (models load on demand).
    let ready = if st.models.multi() && !st.is_shutting_down() { Ok(()) } else { st.ready().map(|_| ()) };
    match ready {
        Ok(_) => Json(json!({"status": "ok"})).into_response(),
        Err(e) => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"status": if st.is_shutting_down() { "shutting down" } else { "loading" }, "error": e.body()["error"]})),
        )
            .into_response(),
    }
}

pub async fn metrics(State(st): State<Arc<AppState>>) -> Response {
    for (name, loaded) in st.models.loaded_states() {
        st.metrics.model_loaded.with_label_values(&[name.as_str()]).set(loaded as i64);
    }
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], st.metrics.render()).into_response()
}

pub async fn not_found() -> ApiError {
    ApiError::not_found("no such endpoint; this server offers /v1/chat/completions, /v1/completions, /v1/models, /tokenize, /detokenize, /health and /metrics")
}
