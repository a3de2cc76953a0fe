//! OpenAI's Responses API, stateless (`POST /v1/responses`): `input` (a string or items: messages,
//! `function_call`, `function_call_output`), `instructions`, function `tools`, `tool_choice`,
//! `text.format` (json_schema / json_object) and `max_output_tokens` become a chat request run by
//! the same pipeline as `/v1/chat/completions`; the answer is a `response` object with `message` and
//! `function_call` output items, or its stream of typed events (`response.created`,
//! `response.output_item.added`, `response.output_text.delta`,
//! `response.function_call_arguments.delta`, ..., `response.completed`). Nothing is stored:
//! `previous_response_id` is refused.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use infer_core::tools::{OutputDelta, OutputParser};
use infer_core::{FinishReason, TokenEvent};
use serde_json::{json, Map, Value};

use crate::error::ApiError;
use crate::openai::{parse_request, ChatParams};
use crate::routes::{json_body, parser_text, shaped_stream, start_chat, EventShape, Meta};
use crate::run::Run;
use crate::{AppState, Ready};

/// The text of a message item's content: a string or `input_text` / `output_text` parts.
fn content_text(v: &Value, field: &str) -> Result<String, ApiError> {
    match v {
        Value::String(s) => Ok(s.clone()),
        Value::Array(parts) => {
            let mut out = String::new();
            for (i, p) in parts.iter().enumerate() {
                match (p.get("type").and_then(Value::as_str), p.get("text").and_then(Value::as_str)) {
                    (Some("input_text" | "output_text" | "text"), Some(t)) => out.push_str(t),
                    (Some(kind), _) => {
                        return Err(ApiError::invalid(
                            &format!("{field}[{i}].type"),
                            format!("`{kind}` parts are not supported (text only)"),
                        ))
                    }
                    _ => return Err(ApiError::invalid(&format!("{field}[{i}]"), "a part needs a `type` and a string `text`")),
                }
            }
            Ok(out)
        }
        _ => Err(ApiError::invalid(field, "must be a string or a list of content parts")),
    }
}

/// The Responses request as an OpenAI chat request (JSON), its fields checked and named.
pub(crate) fn to_chat_request(body: &Value) -> Result<Value, ApiError> {
    let obj = body.as_object().ok_or_else(|| ApiError::bad_request(None, "the body must be a JSON object"))?;
    if obj.get("previous_response_id").is_some_and(|v| !v.is_null()) {
        return Err(ApiError::invalid("previous_response_id", "this server stores no responses: send the whole conversation as `input`"));
    }
    let mut out = Map::new();
    for (from, to) in [
        ("model", "model"),
        ("temperature", "temperature"),
        ("top_p", "top_p"),
        ("stream", "stream"),
        ("parallel_tool_calls", "parallel_tool_calls"),
    ] {
        if let Some(v) = obj.get(from).filter(|v| !v.is_null()) {
            out.insert(to.into(), v.clone());
        }
    }
    if let Some(n) = obj.get("max_output_tokens").filter(|v| !v.is_null()) {
        if n.as_u64().is_none_or(|n| n < 1) {
            return Err(ApiError::invalid("max_output_tokens", "must be an integer >= 1"));
        }
        out.insert("max_tokens".into(), n.clone());
    }
    let mut messages: Vec<Value> = Vec::new();
    if let Some(i) = obj.get("instructions").filter(|v| !v.is_null()) {
        let text = i.as_str().ok_or_else(|| ApiError::invalid("instructions", "must be a string"))?;
        messages.push(json!({"role": "system", "content": text}));
    }
    match obj.get("input") {
        Some(Value::String(s)) => messages.push(json!({"role": "user", "content": s})),
        Some(Value::Array(items)) => {
            for (i, item) in items.iter().enumerate() {
                let at = format!("input[{i}]");
                let kind = item.get("type").and_then(Value::as_str).unwrap_or("message");
                match kind {
                    "message" => {
                        let role = item
                            .get("role")
                            .and_then(Value::as_str)
                            .ok_or_else(|| ApiError::invalid(&format!("{at}.role"), "is required"))?;
                        if !matches!(role, "user" | "assistant" | "system" | "developer") {
                            return Err(ApiError::invalid(
                                &format!("{at}.role"),
                                format!("`{role}` is not user, assistant, system or developer"),
                            ));
                        }
                        let text = content_text(item.get("content").unwrap_or(&Value::Null), &format!("{at}.content"))?;
                        messages.push(json!({"role": role, "content": text}));
                    }
                    "function_call" => {
                        let field = |k: &str| {
                            item.get(k)
                                .and_then(Value::as_str)
                                .map(str::to_string)
                                .ok_or_else(|| ApiError::invalid(&format!("{at}.{k}"), "must be a string"))
                        };
                        let call = json!({"id": field("call_id")?, "type": "function",
                                          "function": {"name": field("name")?, "arguments": field("arguments")?}});
                        // Calls in a row belong to one assistant turn.
                        match messages.last_mut() {
                            Some(m) if m["role"] == "assistant" && m.get("tool_calls").is_some() => {
                                m["tool_calls"].as_array_mut().expect("a list").push(call)
                            }
                            _ => messages.push(json!({"role": "assistant", "content": "", "tool_calls": [call]})),
                        }
                    }
                    "function_call_output" => {
                        let id = item
                            .get("call_id")
                            .and_then(Value::as_str)
                            .ok_or_else(|| ApiError::invalid(&format!("{at}.call_id"), "must be a string"))?;
                        let output = match item.get("output") {
                            Some(Value::String(s)) => s.clone(),
                            Some(v @ Value::Array(_)) => content_text(v, &format!("{at}.output"))?,
                            _ => return Err(ApiError::invalid(&format!("{at}.output"), "must be a string")),
                        };
                        messages.push(json!({"role": "tool", "tool_call_id": id, "content": output}));
                    }
                    "reasoning" => {}
                    other => return Err(ApiError::invalid(&format!("{at}.type"), format!("`{other}` items are not supported"))),
                }
            }
        }
        Some(_) => return Err(ApiError::invalid("input", "must be a string or a list of items")),
        None => return Err(ApiError::invalid("input", "is required")),
    }
    if !messages.iter().any(|m| m["role"] != "system") {
        return Err(ApiError::invalid("input", "holds no message"));
    }
    out.insert("messages".into(), Value::Array(messages));
    if let Some(tools) = obj.get("tools").filter(|v| !v.is_null()) {
        let list = tools.as_array().ok_or_else(|| ApiError::invalid("tools", "must be a list of tools"))?;
        let mut converted = Vec::with_capacity(list.len());
        for (i, t) in list.iter().enumerate() {
            let kind = t.get("type").and_then(Value::as_str).unwrap_or("");
            if kind != "function" {
                return Err(ApiError::invalid(&format!("tools[{i}].type"), format!("`{kind}`: only `function` tools are supported")));
            }
            let name =
                t.get("name").and_then(Value::as_str).ok_or_else(|| ApiError::invalid(&format!("tools[{i}].name"), "must be a string"))?;
            let mut f = json!({"name": name, "parameters": t.get("parameters").cloned().unwrap_or_else(|| json!({"type": "object"}))});
            if let Some(d) = t.get("description") {
                f["description"] = d.clone();
            }
            converted.push(json!({"type": "function", "function": f}));
        }
        out.insert("tools".into(), Value::Array(converted));
    }
    if let Some(choice) = obj.get("tool_choice").filter(|v| !v.is_null()) {
        let c = match choice {
            Value::String(s) => json!(s),
            Value::Object(o) if o.get("type").and_then(Value::as_str) == Some("function") => {
                let name =
                    o.get("name").and_then(Value::as_str).ok_or_else(|| ApiError::invalid("tool_choice.name", "must be a string"))?;
                json!({"type": "function", "function": {"name": name}})
            }
            _ => return Err(ApiError::invalid("tool_choice", "must be auto, none, required or {\"type\": \"function\", \"name\"}")),
        };
        out.insert("tool_choice".into(), c);
    }
    if let Some(format) = obj.get("text").and_then(|t| t.get("format")).filter(|v| !v.is_null()) {
        let kind = format.get("type").and_then(Value::as_str).ok_or_else(|| ApiError::invalid("text.format.type", "is required"))?;
        match kind {
            "text" => {}
            "json_object" => {
                out.insert("response_format".into(), json!({"type": "json_object"}));
            }
            "json_schema" => {
                let schema = format.get("schema").cloned().ok_or_else(|| ApiError::invalid("text.format.schema", "is required"))?;
                let name = format.get("name").cloned().unwrap_or_else(|| json!("response"));
                out.insert("response_format".into(), json!({"type": "json_schema", "json_schema": {"name": name, "schema": schema}}));
            }
            other => return Err(ApiError::invalid("text.format.type", format!("`{other}` is not text, json_object or json_schema"))),
        }
    }
    Ok(Value::Object(out))
}

/// The chat pipeline's field names in an error, as the Responses request names them.
fn rename_fields(mut e: ApiError) -> ApiError {
    let renamed = match e.param.as_deref() {
        Some("max_tokens") => Some(("max_tokens", "max_output_tokens")),
        Some("messages") => Some(("messages", "input")),
        Some(p) if p.starts_with("response_format.json_schema.") => Some(("response_format.json_schema", "text.format")),
        Some(p) if p.starts_with("response_format") => Some(("response_format", "text.format")),
        _ => None,
    };
    if let Some((from, to)) = renamed {
        e.param = e.param.map(|p| p.replacen(from, to, 1));
        e.message = e.message.replace(from, to);
    }
    if e.message.contains("response_format") {
        e.message = e.message.replace("response_format", "text.format");
    }
    e
}

fn response_object(meta: &Meta, body: &Value, status: &str, output: Vec<Value>, output_tokens: usize) -> Value {
    let incomplete = (status == "incomplete").then(|| json!({"reason": "max_output_tokens"}));
    json!({
        "id": meta.id.replacen("chatcmpl-", "resp_", 1),
        "object": "response",
        "created_at": crate::routes::now_secs(),
        "status": status,
        "error": null,
        "incomplete_details": incomplete,
        "instructions": body.get("instructions").cloned().unwrap_or(Value::Null),
        "max_output_tokens": body.get("max_output_tokens").cloned().unwrap_or(Value::Null),
        "model": meta.model,
        "output": output,
        "parallel_tool_calls": body.get("parallel_tool_calls").cloned().unwrap_or(json!(true)),
        "previous_response_id": null,
        "store": false,
        "temperature": body.get("temperature").cloned().unwrap_or(Value::Null),
        "top_p": body.get("top_p").cloned().unwrap_or(Value::Null),
        "text": body.get("text").cloned().unwrap_or_else(|| json!({"format": {"type": "text"}})),
        "tool_choice": body.get("tool_choice").cloned().unwrap_or(json!("auto")),
        "tools": body.get("tools").cloned().unwrap_or(json!([])),
        "truncation": "disabled",
        "metadata": body.get("metadata").cloned().unwrap_or(json!({})),
        "usage": {
            "input_tokens": meta.prompt_tokens,
            "input_tokens_details": {"cached_tokens": 0},
            "output_tokens": output_tokens,
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": meta.prompt_tokens + output_tokens,
        },
    })
}

fn message_item(id: &str, text: &str, status: &str) -> Value {
    json!({"type": "message", "id": id, "status": status, "role": "assistant",
           "content": [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}]})
}

fn call_item(id: &str, call_id: &str, name: &str, arguments: &str, status: &str) -> Value {
    json!({"type": "function_call", "id": id, "call_id": call_id, "name": name, "arguments": arguments, "status": status})
}

fn status_of(finish: Option<FinishReason>) -> &'static str {
    if finish == Some(FinishReason::Length) {
        "incomplete"
    } else {
        "completed"
    }
}

pub async fn responses(State(st): State<Arc<AppState>>, body: Result<Bytes, BytesRejection>) -> Result<Response, ApiError> {
    let body = json_body(body)?;
    let chat: ChatParams = parse_request(&to_chat_request(&body)?).map_err(rename_fields)?;
    let stream = chat.common.stream();
    let (ready, run, meta) = start_chat(&st, chat).await.map_err(rename_fields)?;
    if stream {
        return Ok(event_stream(ready, run, meta, body).into_response());
    }
    let outs = run.collect().await?;
    let o = outs.into_iter().next().unwrap_or_default();
    let mut parser = meta.parser();
    for e in &o.tokens {
        parser.push(&parser_text(&ready, e));
    }
    let (_, parsed) = parser.finish();
    let text = if meta.parser().is_plain() { o.text.clone() } else { parsed.content };
    let mut output = Vec::new();
    let status = status_of(o.finish);
    if !text.is_empty() || parsed.calls.is_empty() {
        output.push(message_item(&meta.id.replacen("chatcmpl-", "msg_", 1), &text, status));
    }
    for (i, c) in parsed.calls.iter().enumerate() {
        output.push(call_item(&format!("fc_{i}_{}", c.id), &c.id, &c.name, &c.arguments, "completed"));
    }
    Ok(Json(response_object(&meta, &body, status, output, o.tokens.len())).into_response())
}

/// Turns a run's tokens into the Responses stream's events.
struct Events {
    ready: Arc<Ready>,
    meta: Meta,
    body: Value,
    parser: OutputParser,
    plain: bool,
    seq: u64,
    /// Output items so far (the last may be open) and the open one's kind.
    output: Vec<Value>,
    open: Option<&'static str>,
    /// The open item's text or arguments so far (written into it when it closes, so a long answer
    /// is not copied at every token).
    open_text: String,
    output_tokens: usize,
}

impl Events {
    fn ev(&mut self, kind: &str, mut data: Value) -> Event {
        data["type"] = json!(kind);
        data["sequence_number"] = json!(self.seq);
        self.seq += 1;
        Event::default().event(kind).data(data.to_string())
    }

    fn close(&mut self, out: &mut VecDeque<Event>) {
        let Some(kind) = self.open.take() else { return };
        let index = self.output.len() - 1;
        let text = std::mem::take(&mut self.open_text);
        let mut item = self.output[index].clone();
        item["status"] = json!("completed");
        if kind == "message" {
            item["content"][0]["text"] = json!(text);
        } else {
            item["arguments"] = json!(text);
        }
        if kind == "message" {
            let text = item["content"][0]["text"].clone();
            let id = item["id"].clone();
            let e = self.ev(
                "response.output_text.done",
                json!({"item_id": id, "output_index": index, "content_index": 0, "text": text, "logprobs": []}),
            );
            out.push_back(e);
            let part = item["content"][0].clone();
            let e = self.ev("response.content_part.done", json!({"item_id": id, "output_index": index, "content_index": 0, "part": part}));
            out.push_back(e);
        } else {
            let e = self.ev(
                "response.function_call_arguments.done",
                json!({"item_id": item["id"], "output_index": index, "arguments": item["arguments"]}),
            );
            out.push_back(e);
        }
        self.output[index] = item.clone();
        let e = self.ev("response.output_item.done", json!({"output_index": index, "item": item}));
        out.push_back(e);
    }

    fn text(&mut self, t: String, out: &mut VecDeque<Event>) {
        if t.is_empty() {
            return;
        }
        if self.open != Some("message") {
            self.close(out);
            let id = format!("{}_{}", self.meta.id.replacen("chatcmpl-", "msg_", 1), self.output.len());
            let item = json!({"type": "message", "id": id, "status": "in_progress", "role": "assistant", "content": []});
            self.output.push(item.clone());
            let index = self.output.len() - 1;
            let e = self.ev("response.output_item.added", json!({"output_index": index, "item": item}));
            out.push_back(e);
            let part = json!({"type": "output_text", "text": "", "annotations": [], "logprobs": []});
            self.output[index]["content"] = json!([part.clone()]);
            let e = self.ev("response.content_part.added", json!({"item_id": id, "output_index": index, "content_index": 0, "part": part}));
            out.push_back(e);
            self.open = Some("message");
        }
        let index = self.output.len() - 1;
        self.open_text.push_str(&t);
        let id = self.output[index]["id"].clone();
        let e = self.ev(
            "response.output_text.delta",
            json!({"item_id": id, "output_index": index, "content_index": 0, "delta": t, "logprobs": []}),
        );
        out.push_back(e);
    }

    fn deltas(&mut self, deltas: Vec<OutputDelta>, out: &mut VecDeque<Event>) {
        for d in deltas {
            match d {
                OutputDelta::Content(t) => self.text(t, out),
                OutputDelta::Reasoning(_) => {}
                OutputDelta::CallStart { id, name, .. } => {
                    self.close(out);
                    let index = self.output.len();
                    let item = call_item(&format!("fc_{index}_{id}"), &id, &name, "", "in_progress");
                    self.output.push(item.clone());
                    let e = self.ev("response.output_item.added", json!({"output_index": index, "item": item}));
                    out.push_back(e);
                    self.open = Some("function_call");
                }
                OutputDelta::CallArguments { fragment, .. } => {
                    let index = self.output.len() - 1;
                    self.open_text.push_str(&fragment);
                    let id = self.output[index]["id"].clone();
                    let e =
                        self.ev("response.function_call_arguments.delta", json!({"item_id": id, "output_index": index, "delta": fragment}));
                    out.push_back(e);
                }
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
            self.close(out);
            let status = status_of(event.finish);
            let r = response_object(&self.meta, &self.body, status, self.output.clone(), self.output_tokens);
            let kind = if status == "completed" { "response.completed" } else { "response.incomplete" };
            let e = self.ev(kind, json!({"response": r}));
            out.push_back(e);
        }
    }
}

impl EventShape for Events {
    fn token(&mut self, event: TokenEvent, out: &mut VecDeque<Event>) {
        Events::token(self, event, out)
    }
    fn failed(&mut self, message: String) -> Event {
        self.ev("error", json!({"code": "server_error", "message": message, "param": null}))
    }
}

fn event_stream(ready: Arc<Ready>, run: Run, meta: Meta, body: Value) -> Sse<impl futures_util::Stream<Item = Result<Event, Infallible>>> {
    let parser = meta.parser();
    let mut events = Events {
        ready,
        plain: parser.is_plain(),
        parser,
        meta,
        body,
        seq: 0,
        output: Vec::new(),
        open: None,
        open_text: String::new(),
        output_tokens: 0,
    };
    let mut queue = VecDeque::new();
    let mut start = response_object(&events.meta, &events.body, "in_progress", Vec::new(), 0);
    start["usage"] = Value::Null;
    let e = events.ev("response.created", json!({"response": start.clone()}));
    queue.push_back(e);
    let e = events.ev("response.in_progress", json!({"response": start}));
    queue.push_back(e);
    shaped_stream(run, events, queue)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn items_become_a_chat_request() {
        let body = json!({
            "model": "m", "instructions": "Be brief.", "max_output_tokens": 50,
            "input": [
                {"role": "user", "content": [{"type": "input_text", "text": "Weather in Paris and Rome?"}]},
                {"type": "function_call", "call_id": "c1", "name": "get_weather", "arguments": "{\"city\":\"Paris\"}"},
                {"type": "function_call", "call_id": "c2", "name": "get_weather", "arguments": "{\"city\":\"Rome\"}"},
                {"type": "function_call_output", "call_id": "c1", "output": "18 C"},
                {"type": "function_call_output", "call_id": "c2", "output": "25 C"},
            ],
            "tools": [{"type": "function", "name": "get_weather", "parameters": {"type": "object"}}],
            "tool_choice": {"type": "function", "name": "get_weather"},
            "text": {"format": {"type": "json_schema", "name": "w", "schema": {"type": "object"}}},
        });
        let r = to_chat_request(&body).unwrap();
        assert_eq!(r["max_tokens"], 50);
        assert_eq!(r["messages"][0], json!({"role": "system", "content": "Be brief."}));
        assert_eq!(r["messages"][1], json!({"role": "user", "content": "Weather in Paris and Rome?"}));
        assert_eq!(r["messages"][2]["tool_calls"].as_array().unwrap().len(), 2, "calls in a row are one turn");
        assert_eq!(r["messages"][4], json!({"role": "tool", "tool_call_id": "c2", "content": "25 C"}));
        assert_eq!(r["tools"][0]["function"]["name"], "get_weather");
        assert_eq!(r["tool_choice"]["function"]["name"], "get_weather");
        assert_eq!(r["response_format"]["json_schema"]["schema"], json!({"type": "object"}));
        assert_eq!(to_chat_request(&json!({"input": "hi"})).unwrap()["messages"], json!([{"role": "user", "content": "hi"}]));
    }

    #[test]
    fn bad_requests_name_the_field() {
        let field = |body: Value| to_chat_request(&body).unwrap_err().param.unwrap();
        assert_eq!(field(json!({})), "input");
        assert_eq!(field(json!({"input": 3})), "input");
        assert_eq!(field(json!({"input": "hi", "previous_response_id": "resp_1"})), "previous_response_id");
        assert_eq!(field(json!({"input": "hi", "max_output_tokens": 0})), "max_output_tokens");
        assert_eq!(field(json!({"input": [{"role": "robot", "content": "x"}]})), "input[0].role");
        assert_eq!(field(json!({"input": [{"role": "user", "content": [{"type": "input_image"}]}]})), "input[0].content[0].type");
        assert_eq!(field(json!({"input": "hi", "tools": [{"type": "web_search"}]})), "tools[0].type");
        assert_eq!(field(json!({"input": "hi", "text": {"format": {"type": "yaml"}}})), "text.format.type");
    }
}
