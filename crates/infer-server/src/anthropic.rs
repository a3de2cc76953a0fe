//! Anthropic's Messages API (`POST /v1/messages`): the request becomes an OpenAI chat request (system
//! prompt, content blocks, `tool_use` / `tool_result` turns, tools and `tool_choice`) run by the same
//! pipeline as `/v1/chat/completions`; the answer comes back as Anthropic's message (text and
//! `tool_use` blocks, `stop_reason`, usage) or as its stream of named events (`message_start`,
//! `content_block_start` / `_delta` / `_stop`, `message_delta`, `message_stop`). Errors have
//! Anthropic's shape `{"type": "error", "error": {"type", "message"}}`; the API key may come as
//! `x-api-key`.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use infer_core::tools::{OutputDelta, OutputParser};
use infer_core::{FinishReason, TokenEvent};
use serde_json::{json, Map, Value};

use crate::error::ApiError;
use crate::openai::{parse_request, ChatParams};
use crate::routes::{is_final_eos, json_body, parser_text, shaped_stream, start_chat, EventShape, Meta};
use crate::run::Run;
use crate::{AppState, Ready};

/// An error in Anthropic's shape (the status and message of an [`ApiError`]).
pub struct AnthropicError(pub ApiError);

impl From<ApiError> for AnthropicError {
    fn from(e: ApiError) -> Self {
        Self(e)
    }
}

/// Anthropic's error type for a status.
fn error_type(status: StatusCode) -> &'static str {
    match status.as_u16() {
        400 | 415 | 422 => "invalid_request_error",
        401 => "authentication_error",
        403 => "permission_error",
        404 => "not_found_error",
        413 => "request_too_large",
        429 => "rate_limit_error",
        503 => "overloaded_error",
        _ => "api_error",
    }
}

pub(crate) fn error_body(e: &ApiError) -> Value {
    json!({"type": "error", "error": {"type": error_type(e.status), "message": e.message}})
}

impl IntoResponse for AnthropicError {
    fn into_response(self) -> Response {
        let mut resp = (self.0.status, Json(error_body(&self.0))).into_response();
        if let Some(s) = self.0.retry_after {
            resp.headers_mut().insert(axum::http::header::RETRY_AFTER, s.into());
        }
        resp
    }
}

/// The text of a `content` that is a string or a list of blocks of which only `text` ones count
/// (a tool result's or the system prompt's).
fn plain_text(v: &Value, field: &str) -> Result<String, ApiError> {
    match v {
        Value::String(s) => Ok(s.clone()),
        Value::Array(blocks) => {
            let mut out = String::new();
            for (i, b) in blocks.iter().enumerate() {
                match (b.get("type").and_then(Value::as_str), b.get("text").and_then(Value::as_str)) {
                    (Some("text"), Some(t)) => {
                        if !out.is_empty() {
                            out.push('\n');
                        }
                        out.push_str(t);
                    }
                    (Some(kind), _) if kind != "text" => {
                        return Err(ApiError::invalid(
                            &format!("{field}[{i}].type"),
                            format!("`{kind}` blocks are not supported here (text only)"),
                        ))
                    }
                    _ => return Err(ApiError::invalid(&format!("{field}[{i}]"), "a text block needs a string `text`")),
                }
            }
            Ok(out)
        }
        Value::Null => Ok(String::new()),
        _ => Err(ApiError::invalid(field, "must be a string or a list of content blocks")),
    }
}

/// The Messages request as an OpenAI chat request (JSON), every Anthropic field checked and named.
pub(crate) fn to_chat_request(body: &Value) -> Result<Value, ApiError> {
    let obj = body.as_object().ok_or_else(|| ApiError::bad_request(None, "the body must be a JSON object"))?;
    let mut out = Map::new();
    if let Some(m) = obj.get("model") {
        out.insert("model".into(), m.clone());
    }
    let max_tokens = obj.get("max_tokens").ok_or_else(|| ApiError::invalid("max_tokens", "is required"))?;
    if max_tokens.as_u64().is_none_or(|n| n < 1) {
        return Err(ApiError::invalid("max_tokens", "must be an integer >= 1"));
    }
    out.insert("max_tokens".into(), max_tokens.clone());
    for (from, to) in [("temperature", "temperature"), ("top_p", "top_p"), ("top_k", "top_k"), ("stream", "stream")] {
        if let Some(v) = obj.get(from).filter(|v| !v.is_null()) {
            out.insert(to.into(), v.clone());
        }
    }
    if let Some(stop) = obj.get("stop_sequences").filter(|v| !v.is_null()) {
        let list = stop.as_array().ok_or_else(|| ApiError::invalid("stop_sequences", "must be a list of strings"))?;
        if list.iter().any(|s| !s.is_string()) {
            return Err(ApiError::invalid("stop_sequences", "must be a list of strings"));
        }
        out.insert("stop".into(), stop.clone());
    }
    let mut messages = Vec::new();
    if let Some(system) = obj.get("system").filter(|v| !v.is_null()) {
        messages.push(json!({"role": "system", "content": plain_text(system, "system")?}));
    }
    let list = obj.get("messages").and_then(Value::as_array).ok_or_else(|| ApiError::invalid("messages", "must be a list of messages"))?;
    if list.is_empty() {
        return Err(ApiError::invalid("messages", "must hold at least one message"));
    }
    for (i, m) in list.iter().enumerate() {
        let at = format!("messages[{i}]");
        let role = m
            .get("role")
            .and_then(Value::as_str)
            .ok_or_else(|| ApiError::invalid(&format!("{at}.role"), "must be `user` or `assistant`"))?;
        if role != "user" && role != "assistant" {
            return Err(ApiError::invalid(&format!("{at}.role"), format!("`{role}` is not `user` or `assistant`")));
        }
        let content = m.get("content").ok_or_else(|| ApiError::invalid(&format!("{at}.content"), "is required"))?;
        let blocks = match content {
            Value::String(s) => vec![json!({"type": "text", "text": s})],
            Value::Array(b) => b.clone(),
            _ => return Err(ApiError::invalid(&format!("{at}.content"), "must be a string or a list of content blocks")),
        };
        let mut text = String::new();
        let mut calls = Vec::new();
        for (j, b) in blocks.iter().enumerate() {
            let bat = format!("{at}.content[{j}]");
            let kind = b.get("type").and_then(Value::as_str).ok_or_else(|| ApiError::invalid(&format!("{bat}.type"), "is required"))?;
            match (kind, role) {
                ("text", _) => {
                    let t = b
                        .get("text")
                        .and_then(Value::as_str)
                        .ok_or_else(|| ApiError::invalid(&format!("{bat}.text"), "must be a string"))?;
                    text.push_str(t);
                }
                ("tool_use", "assistant") => {
                    let id =
                        b.get("id").and_then(Value::as_str).ok_or_else(|| ApiError::invalid(&format!("{bat}.id"), "must be a string"))?;
                    let name = b
                        .get("name")
                        .and_then(Value::as_str)
                        .ok_or_else(|| ApiError::invalid(&format!("{bat}.name"), "must be a string"))?;
                    let input = b.get("input").cloned().unwrap_or_else(|| json!({}));
                    calls.push(json!({"id": id, "type": "function", "function": {"name": name, "arguments": input.to_string()}}));
                }
                ("tool_result", "user") => {
                    let id = b
                        .get("tool_use_id")
                        .and_then(Value::as_str)
                        .ok_or_else(|| ApiError::invalid(&format!("{bat}.tool_use_id"), "must be a string"))?;
                    let mut result = plain_text(b.get("content").unwrap_or(&Value::Null), &format!("{bat}.content"))?;
                    if b.get("is_error").and_then(Value::as_bool) == Some(true) {
                        result = format!("Error: {result}");
                    }
                    messages.push(json!({"role": "tool", "tool_call_id": id, "content": result}));
                }
                ("thinking" | "redacted_thinking", "assistant") => {}
                (k, r) => {
                    return Err(ApiError::invalid(&format!("{bat}.type"), format!("`{k}` blocks are not supported in a `{r}` message")))
                }
            }
        }
        if role == "assistant" {
            let mut msg = json!({"role": "assistant", "content": text});
            if !calls.is_empty() {
                msg["tool_calls"] = Value::Array(calls);
            }
            messages.push(msg);
        } else if !text.is_empty() || !blocks.iter().any(|b| b.get("type").and_then(Value::as_str) == Some("tool_result")) {
            messages.push(json!({"role": "user", "content": text}));
        }
    }
    out.insert("messages".into(), Value::Array(messages));
    if let Some(tools) = obj.get("tools").filter(|v| !v.is_null()) {
        let list = tools.as_array().ok_or_else(|| ApiError::invalid("tools", "must be a list of tools"))?;
        let mut converted = Vec::with_capacity(list.len());
        for (i, t) in list.iter().enumerate() {
            let name =
                t.get("name").and_then(Value::as_str).ok_or_else(|| ApiError::invalid(&format!("tools[{i}].name"), "must be a string"))?;
            let schema =
                t.get("input_schema").cloned().ok_or_else(|| ApiError::invalid(&format!("tools[{i}].input_schema"), "is required"))?;
            let mut f = json!({"name": name, "parameters": schema});
            if let Some(d) = t.get("description") {
                f["description"] = d.clone();
            }
            converted.push(json!({"type": "function", "function": f}));
        }
        out.insert("tools".into(), Value::Array(converted));
    }
    if let Some(choice) = obj.get("tool_choice").filter(|v| !v.is_null()) {
        let kind = choice.get("type").and_then(Value::as_str).ok_or_else(|| ApiError::invalid("tool_choice.type", "is required"))?;
        let c = match kind {
            "auto" => json!("auto"),
            "any" => json!("required"),
            "none" => json!("none"),
            "tool" => {
                let name =
                    choice.get("name").and_then(Value::as_str).ok_or_else(|| ApiError::invalid("tool_choice.name", "must be a string"))?;
                json!({"type": "function", "function": {"name": name}})
            }
            other => return Err(ApiError::invalid("tool_choice.type", format!("`{other}` is not one of auto, any, tool, none"))),
        };
        if choice.get("disable_parallel_tool_use").and_then(Value::as_bool) == Some(true) {
            out.insert("parallel_tool_calls".into(), json!(false));
        }
        out.insert("tool_choice".into(), c);
    }
    Ok(Value::Object(out))
}

/// The OpenAI pipeline's field names in an error, as the Messages request names them.
fn rename_fields(mut e: ApiError) -> ApiError {
    if e.param.as_deref() == Some("stop") {
        e.param = Some("stop_sequences".into());
        e.message = e.message.replace("`stop`", "`stop_sequences`");
    }
    e
}

/// Why generation ended, in Anthropic's words.
fn stop_reason(ready: &Ready, last: Option<&TokenEvent>, finish: Option<FinishReason>, calls: usize) -> &'static str {
    match finish {
        _ if calls > 0 => "tool_use",
        Some(FinishReason::Length) => "max_tokens",
        Some(FinishReason::Stop) if last.is_some_and(|e| !is_final_eos(ready, e)) => "stop_sequence",
        _ => "end_turn",
    }
}

fn tool_input(arguments: &str) -> Value {
    serde_json::from_str(arguments).unwrap_or_else(|_| json!({}))
}

pub async fn messages(State(st): State<Arc<AppState>>, body: Result<Bytes, BytesRejection>) -> Result<Response, AnthropicError> {
    let body = json_body(body)?;
    let chat: ChatParams = parse_request(&to_chat_request(&body)?).map_err(rename_fields)?;
    let stream = chat.common.stream();
    let (ready, run, meta) = start_chat(&st, chat).await.map_err(rename_fields)?;
    if stream {
        return Ok(event_stream(ready, run, meta).into_response());
    }
    let outs = run.collect().await?;
    let o = outs.into_iter().next().unwrap_or_default();
    let mut parser = meta.parser();
    for e in &o.tokens {
        parser.push(&parser_text(&ready, e));
    }
    let (_, parsed) = parser.finish();
    let mut content = Vec::new();
    if let Some(r) = parsed.reasoning.filter(|r| !r.is_empty()) {
        content.push(json!({"type": "thinking", "thinking": r, "signature": ""}));
    }
    let text = if meta.parser().is_plain() { o.text.clone() } else { parsed.content };
    if !text.is_empty() || parsed.calls.is_empty() {
        content.push(json!({"type": "text", "text": text}));
    }
    for c in &parsed.calls {
        content.push(json!({"type": "tool_use", "id": c.id, "name": c.name, "input": tool_input(&c.arguments)}));
    }
    let reason = stop_reason(&ready, o.tokens.last(), o.finish, parsed.calls.len());
    Ok(Json(json!({
        "id": meta.id.replacen("chatcmpl-", "msg_", 1),
        "type": "message",
        "role": "assistant",
        "model": meta.model,
        "content": content,
        "stop_reason": reason,
        "stop_sequence": null,
        "usage": {"input_tokens": meta.prompt_tokens, "output_tokens": o.tokens.len()},
    }))
    .into_response())
}

/// The open content block of a stream.
#[derive(PartialEq)]
enum Block {
    None,
    Text,
    Thinking,
    Tool,
}

/// Turns a run's tokens into Anthropic's stream events.
struct Events {
    ready: Arc<Ready>,
    parser: OutputParser,
    plain: bool,
    open: Block,
    index: usize,
    output_tokens: usize,
    calls: usize,
}

fn ev(kind: &str, data: Value) -> Event {
    Event::default().event(kind).data(data.to_string())
}

impl Events {
    fn close(&mut self, out: &mut VecDeque<Event>) {
        if self.open != Block::None {
            out.push_back(ev("content_block_stop", json!({"type": "content_block_stop", "index": self.index})));
            self.index += 1;
            self.open = Block::None;
        }
    }

    fn open(&mut self, kind: Block, block: Value, out: &mut VecDeque<Event>) {
        self.close(out);
        out.push_back(ev("content_block_start", json!({"type": "content_block_start", "index": self.index, "content_block": block})));
        self.open = kind;
    }

    fn text(&mut self, t: String, out: &mut VecDeque<Event>) {
        if t.is_empty() {
            return;
        }
        if self.open != Block::Text {
            self.open(Block::Text, json!({"type": "text", "text": ""}), out);
        }
        out.push_back(ev(
            "content_block_delta",
            json!({"type": "content_block_delta", "index": self.index, "delta": {"type": "text_delta", "text": t}}),
        ));
    }

    fn deltas(&mut self, deltas: Vec<OutputDelta>, out: &mut VecDeque<Event>) {
        for d in deltas {
            match d {
                OutputDelta::Content(t) => self.text(t, out),
                OutputDelta::Reasoning(t) => {
                    if self.open != Block::Thinking {
                        self.open(Block::Thinking, json!({"type": "thinking", "thinking": "", "signature": ""}), out);
                    }
                    out.push_back(ev(
                        "content_block_delta",
                        json!({"type": "content_block_delta", "index": self.index, "delta": {"type": "thinking_delta", "thinking": t}}),
                    ));
                }
                OutputDelta::CallStart { id, name, .. } => {
                    self.calls += 1;
                    self.open(Block::Tool, json!({"type": "tool_use", "id": id, "name": name, "input": {}}), out);
                }
                OutputDelta::CallArguments { fragment, .. } => out.push_back(ev(
                    "content_block_delta",
                    json!({"type": "content_block_delta", "index": self.index,
                           "delta": {"type": "input_json_delta", "partial_json": fragment}}),
                )),
            }
        }
    }

    fn token(&mut self, event: TokenEvent, out: &mut VecDeque<Event>) {
        self.output_tokens += 1;
        if self.plain {
            self.text(event.text.clone(), out);
        } else {
            let deltas = self.parser.push(&parser_text(&self.ready, &event));
            self.deltas(deltas, out);
        }
        if event.finish.is_some() {
            if !self.plain {
                let (deltas, _) = self.parser.finish();
                self.deltas(deltas, out);
            }
            if self.index == 0 && self.open == Block::None {
                // An empty answer still has its (empty) text block.
                self.open(Block::Text, json!({"type": "text", "text": ""}), out);
            }
            self.close(out);
            let reason = stop_reason(&self.ready, Some(&event), event.finish, self.calls);
            out.push_back(ev(
                "message_delta",
                json!({"type": "message_delta", "delta": {"stop_reason": reason, "stop_sequence": null},
                       "usage": {"output_tokens": self.output_tokens}}),
            ));
            out.push_back(ev("message_stop", json!({"type": "message_stop"})));
        }
    }
}

impl EventShape for Events {
    fn token(&mut self, event: TokenEvent, out: &mut VecDeque<Event>) {
        Events::token(self, event, out)
    }
    fn failed(&mut self, message: String) -> Event {
        ev("error", error_body(&ApiError::internal(message)))
    }
}

fn event_stream(ready: Arc<Ready>, run: Run, meta: Meta) -> Sse<impl futures_util::Stream<Item = Result<Event, Infallible>>> {
    let mut first = VecDeque::new();
    first.push_back(ev(
        "message_start",
        json!({"type": "message_start", "message": {
            "id": meta.id.replacen("chatcmpl-", "msg_", 1), "type": "message", "role": "assistant", "model": meta.model,
            "content": [], "stop_reason": null, "stop_sequence": null,
            "usage": {"input_tokens": meta.prompt_tokens, "output_tokens": 0}}}),
    ));
    let parser = meta.parser();
    let events = Events { ready, plain: parser.is_plain(), parser, open: Block::None, index: 0, output_tokens: 0, calls: 0 };
    shaped_stream(run, events, first)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_conversation_with_tools_becomes_an_openai_request() {
        let body = json!({
            "model": "m", "max_tokens": 64, "system": [{"type": "text", "text": "Be brief."}],
            "stop_sequences": ["\n\n"], "temperature": 0.5,
            "tools": [{"name": "get_weather", "description": "Weather of a city",
                       "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}}}],
            "tool_choice": {"type": "tool", "name": "get_weather", "disable_parallel_tool_use": true},
            "messages": [
                {"role": "user", "content": "Weather in Paris?"},
                {"role": "assistant", "content": [{"type": "text", "text": "Checking."},
                    {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Paris"}}]},
                {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": [{"type": "text", "text": "18 C"}]},
                    {"type": "text", "text": "And tomorrow?"}]},
            ],
        });
        let r = to_chat_request(&body).unwrap();
        assert_eq!(r["max_tokens"], 64);
        assert_eq!(r["stop"], json!(["\n\n"]));
        assert_eq!(r["messages"][0], json!({"role": "system", "content": "Be brief."}));
        assert_eq!(r["messages"][1], json!({"role": "user", "content": "Weather in Paris?"}));
        assert_eq!(r["messages"][2]["tool_calls"][0]["function"]["arguments"], r#"{"city":"Paris"}"#);
        assert_eq!(r["messages"][3], json!({"role": "tool", "tool_call_id": "toolu_1", "content": "18 C"}));
        assert_eq!(r["messages"][4], json!({"role": "user", "content": "And tomorrow?"}));
        assert_eq!(r["tools"][0]["function"]["parameters"]["properties"]["city"]["type"], "string");
        assert_eq!(r["tool_choice"]["function"]["name"], "get_weather");
        assert_eq!(r["parallel_tool_calls"], false);
    }

    #[test]
    fn bad_requests_name_the_field() {
        let field = |body: Value| to_chat_request(&body).unwrap_err().param.unwrap();
        let msgs = json!([{"role": "user", "content": "hi"}]);
        assert_eq!(field(json!({"messages": msgs})), "max_tokens");
        assert_eq!(field(json!({"max_tokens": 0, "messages": msgs})), "max_tokens");
        assert_eq!(field(json!({"max_tokens": 5, "messages": []})), "messages");
        assert_eq!(field(json!({"max_tokens": 5, "messages": [{"role": "system", "content": "x"}]})), "messages[0].role");
        assert_eq!(
            field(json!({"max_tokens": 5, "messages": [{"role": "user", "content": [{"type": "image", "source": {}}]}]})),
            "messages[0].content[0].type"
        );
        assert_eq!(field(json!({"max_tokens": 5, "messages": msgs, "tool_choice": {"type": "maybe"}})), "tool_choice.type");
        assert_eq!(field(json!({"max_tokens": 5, "messages": msgs, "tools": [{"name": "f"}]})), "tools[0].input_schema");
        assert_eq!(field(json!({"max_tokens": 5, "messages": msgs, "stop_sequences": [1]})), "stop_sequences");
    }
}
