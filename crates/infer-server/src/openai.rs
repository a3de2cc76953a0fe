//! The OpenAI request bodies: parsing (unknown fields ignored, a wrong type names its field) and
//! conversion into [`SamplingParams`] with OpenAI's ranges checked.

use std::collections::HashMap;

use infer_core::{Constraint, SamplingParams};
use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::Value;

use crate::error::ApiError;

/// Parses a JSON body into `T`, answering 400 with the path of the offending field.
pub fn parse<T: DeserializeOwned>(body: &Value) -> Result<T, ApiError> {
    serde_path_to_error::deserialize(body).map_err(|e| {
        let path = e.path().to_string();
        let param = (path != ".").then_some(path);
        let inner = e.into_inner().to_string();
        match &param {
            Some(p) => ApiError::bad_request(Some(p), format!("invalid `{p}`: {inner}")),
            None => ApiError::bad_request(None, format!("invalid request body: {inner}")),
        }
    })
}

/// Parses a request whose struct takes [`CommonParams`] in with `#[serde(flatten)]`: one pass over
/// the body when it is valid. serde cannot say which flattened field failed, so on such an error
/// the common fields alone are parsed again to name it.
pub fn parse_request<T: DeserializeOwned>(body: &Value) -> Result<T, ApiError> {
    match parse::<T>(body) {
        Err(e) if e.param.is_none() => Err(parse::<CommonParams>(body).err().unwrap_or(e)),
        r => r,
    }
}

/// A string or a list of strings (`stop`).
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum StringOrList {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct StreamOptions {
    pub include_usage: Option<bool>,
}

/// Fields common to chat and text completions.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct CommonParams {
    pub model: Option<String>,
    pub max_tokens: Option<u64>,
    pub max_completion_tokens: Option<u64>,
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    /// `-1` or `0` disable it (vLLM's convention).
    pub top_k: Option<i64>,
    pub min_p: Option<f32>,
    pub presence_penalty: Option<f32>,
    pub frequency_penalty: Option<f32>,
    pub repetition_penalty: Option<f32>,
    pub seed: Option<i64>,
    pub stop: Option<StringOrList>,
    pub n: Option<u32>,
    pub logit_bias: Option<HashMap<String, f32>>,
    pub stream: Option<bool>,
    pub stream_options: Option<StreamOptions>,
    pub user: Option<String>,
    /// Keep generating past end-of-sequence tokens (vLLM's extension; used by benchmarks).
    pub ignore_eos: Option<bool>,
    /// Structured output (see [`CommonParams::constraint`]).
    pub response_format: Option<Value>,
    pub structured_outputs: Option<Value>,
    pub guided_json: Option<Value>,
    pub guided_regex: Option<String>,
    pub guided_choice: Option<Vec<String>>,
    pub guided_grammar: Option<String>,
    pub json_schema: Option<Value>,
    pub grammar: Option<String>,
    /// Prefix-cache namespace (vLLM's extension; see `SamplingParams::cache_salt`).
    pub cache_salt: Option<String>,
    /// Speculative decoding for this request where the server does it (`--draft`): llama.cpp's
    /// `speculative.n_max` (most tokens drafted per step; 0 turns it off) and `speculative.n_min`,
    /// as an object or as those two flat keys.
    pub speculative: Option<SpeculativeParams>,
    #[serde(rename = "speculative.n_max")]
    pub speculative_n_max: Option<i64>,
    #[serde(rename = "speculative.n_min")]
    pub speculative_n_min: Option<i64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct SpeculativeParams {
    pub n_max: Option<i64>,
    pub n_min: Option<i64>,
}

/// Message content: a string or a list of parts.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum Content {
    Text(String),
    Parts(Vec<ContentPart>),
}

#[derive(Debug, Deserialize)]
pub struct ContentPart {
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default)]
    pub text: Option<String>,
}

/// A chat message (`role` is checked by [`ChatParams::conversation`]).
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct Message {
    pub role: String,
    /// Text or parts; `null` for an assistant turn that only calls tools.
    pub content: Option<Content>,
    /// An assistant turn's calls, as a response gave them.
    pub tool_calls: Option<Vec<Value>>,
    /// A `tool` message's call.
    pub tool_call_id: Option<String>,
    /// A `tool` message's function (or a participant's name).
    pub name: Option<String>,
    /// An assistant turn's reasoning, passed to templates that render it.
    pub reasoning_content: Option<String>,
}

/// A chat completions request.
#[derive(Debug, Deserialize)]
pub struct ChatParams {
    #[serde(flatten)]
    pub common: CommonParams,
    pub messages: Vec<Message>,
    #[serde(default)]
    pub logprobs: Option<bool>,
    #[serde(default)]
    pub top_logprobs: Option<u32>,
    #[serde(default)]
    pub tools: Option<Vec<Value>>,
    #[serde(default)]
    pub tool_choice: Option<Value>,
    #[serde(default)]
    pub parallel_tool_calls: Option<bool>,
    /// Extra variables for the chat template (`enable_thinking`, ...).
    #[serde(default)]
    pub chat_template_kwargs: Option<serde_json::Map<String, Value>>,
}

/// `prompt`: a string, strings, token ids, or lists of token ids.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum Prompt {
    Text(String),
    Texts(Vec<String>),
    Tokens(Vec<u32>),
    TokenLists(Vec<Vec<u32>>),
}

/// A (legacy) completions request.
#[derive(Debug, Deserialize)]
pub struct CompletionParams {
    #[serde(flatten)]
    pub common: CommonParams,
    pub prompt: Prompt,
    #[serde(default)]
    pub logprobs: Option<u32>,
    #[serde(default)]
    pub echo: Option<bool>,
}

/// Defaults for parameters a request leaves out: the model's generation_config.json where it has
/// one, else OpenAI's.
#[derive(Debug, Clone)]
pub struct Defaults {
    pub temperature: f32,
    pub top_p: f32,
    pub top_k: usize,
    pub repetition_penalty: f32,
}

impl Default for Defaults {
    fn default() -> Self {
        Self { temperature: 1.0, top_p: 1.0, top_k: 0, repetition_penalty: 1.0 }
    }
}

/// Most choices one request may ask for.
pub const MAX_N: u32 = 128;
/// Longest stop string (each is searched at every token of every choice).
pub const MAX_STOP_LEN: usize = 1024;
/// Most alternatives per token in logprobs.
pub const MAX_TOP_LOGPROBS: u32 = 20;

/// Longest `cache_salt` (it is copied per choice and hashed per sequence).
const MAX_CACHE_SALT: usize = 1024;

fn check(ok: bool, param: &str, msg: String) -> Result<(), ApiError> {
    if ok {
        Ok(())
    } else {
        Err(ApiError::bad_request(Some(param), format!("invalid `{param}`: {msg}")))
    }
}

impl CommonParams {
    /// The number of choices, checked.
    pub fn n(&self) -> Result<usize, ApiError> {
        let n = self.n.unwrap_or(1);
        check((1..=MAX_N).contains(&n), "n", format!("{n} must be between 1 and {MAX_N}"))?;
        Ok(n as usize)
    }

    pub fn stream(&self) -> bool {
        self.stream.unwrap_or(false)
    }

    pub fn include_usage(&self) -> bool {
        self.stream_options.as_ref().and_then(|o| o.include_usage).unwrap_or(false)
    }

    /// Sampling parameters for this request (`default_max_tokens`: when the request sets none).
    pub fn sampling(&self, d: &Defaults, vocab_size: usize, default_max_tokens: Option<usize>) -> Result<SamplingParams, ApiError> {
        let temperature = self.temperature.unwrap_or(d.temperature);
        check(
            temperature.is_finite() && (0.0..=2.0).contains(&temperature),
            "temperature",
            format!("{temperature} must be between 0 and 2"),
        )?;
        let top_p = self.top_p.unwrap_or(d.top_p);
        check(top_p > 0.0 && top_p <= 1.0, "top_p", format!("{top_p} must be in (0, 1]"))?;
        let top_k = match self.top_k {
            None => d.top_k,
            Some(k) if k <= 0 => {
                check(k == 0 || k == -1, "top_k", format!("{k} must be positive, or -1/0 to disable it"))?;
                0
            }
            Some(k) => k as usize,
        };
        let min_p = self.min_p.unwrap_or(0.0);
        check((0.0..=1.0).contains(&min_p), "min_p", format!("{min_p} must be between 0 and 1"))?;
        let presence_penalty = self.presence_penalty.unwrap_or(0.0);
        check((-2.0..=2.0).contains(&presence_penalty), "presence_penalty", format!("{presence_penalty} must be between -2 and 2"))?;
        let frequency_penalty = self.frequency_penalty.unwrap_or(0.0);
        check((-2.0..=2.0).contains(&frequency_penalty), "frequency_penalty", format!("{frequency_penalty} must be between -2 and 2"))?;
        let repetition_penalty = self.repetition_penalty.unwrap_or(d.repetition_penalty);
        check(
            repetition_penalty.is_finite() && repetition_penalty > 0.0,
            "repetition_penalty",
            format!("{repetition_penalty} must be greater than 0"),
        )?;
        let max_tokens = match (self.max_completion_tokens, self.max_tokens) {
            (Some(n), _) => {
                check(n >= 1, "max_completion_tokens", "must be at least 1".into())?;
                Some(n as usize)
            }
            (None, Some(n)) => {
                check(n >= 1, "max_tokens", "must be at least 1".into())?;
                Some(n as usize)
            }
            (None, None) => default_max_tokens,
        };
        let stop = match &self.stop {
            None => Vec::new(),
            Some(StringOrList::One(s)) => vec![s.clone()],
            Some(StringOrList::Many(v)) => v.clone(),
        };
        check(stop.len() <= 16, "stop", format!("{} stop strings given; at most 16", stop.len()))?;
        check(stop.iter().all(|s| !s.is_empty()), "stop", "stop strings must not be empty".into())?;
        check(stop.iter().all(|s| s.len() <= MAX_STOP_LEN), "stop", format!("stop strings may be at most {MAX_STOP_LEN} bytes long"))?;
        let mut logit_bias = HashMap::new();
        for (k, &v) in self.logit_bias.iter().flatten() {
            let tok: u32 = k
                .trim()
                .parse()
                .map_err(|_| ApiError::bad_request(Some("logit_bias"), format!("invalid `logit_bias`: key `{k}` is not a token id")))?;
            check((tok as usize) < vocab_size, "logit_bias", format!("token id {tok} is outside the vocabulary (size {vocab_size})"))?;
            check((-100.0..=100.0).contains(&v), "logit_bias", format!("bias {v} for token {tok} must be between -100 and 100"))?;
            logit_bias.insert(tok, v);
        }
        let most = infer_core::speculative::MAX_DRAFT as i64;
        let spec = self.speculative.as_ref();
        let draft = |field: &str, v: Option<i64>| -> Result<Option<usize>, ApiError> {
            match v {
                None => Ok(None),
                Some(n) if (0..=most).contains(&n) => Ok(Some(n as usize)),
                Some(n) => Err(ApiError::bad_request(Some(field), format!("invalid `{field}`: {n} must be in 0..={most}"))),
            }
        };
        let draft_max = draft("speculative.n_max", spec.and_then(|s| s.n_max).or(self.speculative_n_max))?;
        let draft_min = draft("speculative.n_min", spec.and_then(|s| s.n_min).or(self.speculative_n_min))?;
        let salt_len = self.cache_salt.as_deref().map_or(0, str::len);
        check(salt_len <= MAX_CACHE_SALT, "cache_salt", format!("{salt_len} bytes; at most {MAX_CACHE_SALT}"))?;
        Ok(SamplingParams {
            temperature,
            top_k,
            top_p,
            min_p,
            repetition_penalty,
            presence_penalty,
            frequency_penalty,
            logit_bias,
            seed: self.seed.map(|s| s as u64),
            max_tokens,
            stop,
            ignore_eos: self.ignore_eos.unwrap_or(false),
            logprobs: None,
            constraint: None,
            cache_salt: self.cache_salt.clone(),
            draft_max,
            draft_min,
        })
    }
}

impl ChatParams {
    /// The conversation as (role, text) pairs, checked.
    pub fn conversation(&self) -> Result<Vec<infer_core::ChatMessage>, ApiError> {
        if self.messages.is_empty() {
            return Err(ApiError::bad_request(Some("messages"), "`messages` must hold at least one message"));
        }
        let mut out = Vec::with_capacity(self.messages.len());
        for (i, m) in self.messages.iter().enumerate() {
            if m.role.is_empty() {
                return Err(ApiError::bad_request(Some(&format!("messages[{i}].role")), "every message needs a `role`"));
            }
            let role = match m.role.as_str() {
                "developer" => "system",
                r @ ("system" | "user" | "assistant" | "tool") => r,
                other => {
                    return Err(ApiError::bad_request(
                        Some(&format!("messages[{i}].role")),
                        format!("unknown role `{other}`; expected system, developer, user, assistant or tool"),
                    ))
                }
            };
            let text = match &m.content {
                None => String::new(),
                Some(Content::Text(s)) => s.clone(),
                Some(Content::Parts(parts)) => {
                    let mut texts = Vec::new();
                    for (j, p) in parts.iter().enumerate() {
                        match (p.kind.as_str(), &p.text) {
                            ("text", Some(t)) => texts.push(t.as_str()),
                            ("text", None) => {
                                return Err(ApiError::bad_request(
                                    Some(&format!("messages[{i}].content[{j}].text")),
                                    "a text part needs `text`",
                                ))
                            }
                            (other, _) => {
                                return Err(ApiError::bad_request(
                                    Some(&format!("messages[{i}].content[{j}].type")),
                                    format!("content parts of type `{other}` are not supported by this text model; send text parts"),
                                ))
                            }
                        }
                    }
                    texts.join("\n")
                }
            };
            let mut msg = infer_core::ChatMessage::new(role, text);
            msg.tool_call_id = m.tool_call_id.clone();
            msg.name = m.name.clone();
            msg.reasoning_content = m.reasoning_content.clone();
            for (j, call) in m.tool_calls.iter().flatten().enumerate() {
                msg.tool_calls.push(template_tool_call(call, &format!("messages[{i}].tool_calls[{j}]"))?);
            }
            out.push(msg);
        }
        Ok(out)
    }

    /// How many alternatives per token to report, if logprobs are wanted.
    pub fn logprobs(&self) -> Result<Option<usize>, ApiError> {
        let top = self.top_logprobs.unwrap_or(0);
        check(top <= MAX_TOP_LOGPROBS, "top_logprobs", format!("{top} must be between 0 and {MAX_TOP_LOGPROBS}"))?;
        if self.top_logprobs.is_some() && self.logprobs != Some(true) {
            return Err(ApiError::bad_request(Some("top_logprobs"), "`top_logprobs` needs `logprobs: true`"));
        }
        Ok(if self.logprobs == Some(true) { Some(top as usize) } else { None })
    }
}

/// An assistant message's tool call as templates want it: the OpenAI shape with `arguments` as a
/// JSON object where its text parses as one.
fn template_tool_call(call: &Value, at: &str) -> Result<Value, ApiError> {
    let f = call.get("function").and_then(Value::as_object).ok_or_else(|| bad(&format!("{at}.function"), "must be an object"))?;
    let name = f.get("name").and_then(Value::as_str).ok_or_else(|| bad(&format!("{at}.function.name"), "is required"))?;
    let arguments = match f.get("arguments") {
        Some(Value::String(s)) => {
            serde_json::from_str::<Value>(s).ok().filter(Value::is_object).unwrap_or_else(|| Value::String(s.clone()))
        }
        Some(v @ Value::Object(_)) => v.clone(),
        None | Some(Value::Null) => Value::Object(Default::default()),
        Some(_) => return Err(bad(&format!("{at}.function.arguments"), "must be a JSON string")),
    };
    let mut out = serde_json::Map::new();
    if let Some(id) = call.get("id").and_then(Value::as_str) {
        out.insert("id".into(), Value::from(id));
    }
    out.insert("type".into(), Value::from("function"));
    out.insert("function".into(), serde_json::json!({"name": name, "arguments": arguments}));
    Ok(Value::Object(out))
}

impl CompletionParams {
    pub fn logprobs(&self) -> Result<Option<usize>, ApiError> {
        if let Some(k) = self.logprobs {
            check(k <= MAX_TOP_LOGPROBS, "logprobs", format!("{k} must be between 0 and {MAX_TOP_LOGPROBS}"))?;
        }
        Ok(self.logprobs.map(|k| k as usize))
    }
}

fn bad(param: &str, msg: impl Into<String>) -> ApiError {
    let msg = msg.into();
    ApiError::bad_request(Some(param), format!("invalid `{param}`: {msg}"))
}

/// A schema given as an object or as a JSON string holding one.
fn schema_value(v: &Value, param: &str) -> Result<Value, ApiError> {
    match v {
        Value::String(s) => serde_json::from_str(s).map_err(|e| bad(param, format!("not a JSON schema: {e}"))),
        Value::Object(_) => Ok(v.clone()),
        Value::Bool(true) => Ok(serde_json::json!({})),
        _ => Err(bad(param, "a JSON schema must be an object")),
    }
}

impl CommonParams {
    /// The structured-output constraint the request asks for, if any, and the field that asked:
    /// OpenAI's `response_format`, vLLM's `structured_outputs` (and its older `guided_*` fields),
    /// llama.cpp's `json_schema` and `grammar`. At most one may be given.
    pub fn constraint(&self) -> Result<Option<(Constraint, String)>, ApiError> {
        let mut found: Vec<(Constraint, String)> = Vec::new();
        if let Some(rf) = &self.response_format {
            let kind = rf.get("type").and_then(Value::as_str).ok_or_else(|| bad("response_format", "needs a `type`"))?;
            match kind {
                "text" => {}
                "json_object" => match rf.get("schema") {
                    Some(s) => {
                        found.push((Constraint::JsonSchema(schema_value(s, "response_format.schema")?), "response_format.schema".into()))
                    }
                    None => found.push((Constraint::JsonObject, "response_format".into())),
                },
                "json_schema" => {
                    let js =
                        rf.get("json_schema").ok_or_else(|| bad("response_format.json_schema", "is required with type `json_schema`"))?;
                    if let Some(name) = js.get("name") {
                        let ok = name.as_str().is_some_and(|n| {
                            !n.is_empty() && n.len() <= 64 && n.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
                        });
                        if !ok {
                            return Err(bad("response_format.json_schema.name", "must be 1-64 letters, digits, `_` or `-`"));
                        }
                    }
                    let param = "response_format.json_schema.schema";
                    let schema = match js.get("schema") {
                        Some(s) => schema_value(s, param)?,
                        None => serde_json::json!({"type": "object"}),
                    };
                    found.push((Constraint::JsonSchema(schema), param.into()));
                }
                other => {
                    return Err(bad("response_format.type", format!("`{other}` is not one of `text`, `json_object`, `json_schema`")));
                }
            }
        }
        if let Some(so) = &self.structured_outputs {
            let obj = so.as_object().ok_or_else(|| bad("structured_outputs", "must be an object"))?;
            for (k, v) in obj {
                let param = format!("structured_outputs.{k}");
                let c = match k.as_str() {
                    "json" => Constraint::JsonSchema(schema_value(v, &param)?),
                    "json_object" => match v {
                        Value::Bool(true) => Constraint::JsonObject,
                        Value::Bool(false) | Value::Null => continue,
                        _ => return Err(bad(&param, "must be true or false")),
                    },
                    "regex" => Constraint::Regex(v.as_str().ok_or_else(|| bad(&param, "must be a string"))?.to_string()),
                    "grammar" => Constraint::grammar(v.as_str().ok_or_else(|| bad(&param, "must be a string"))?),
                    "choice" => Constraint::Choice(
                        v.as_array()
                            .and_then(|a| a.iter().map(|s| s.as_str().map(String::from)).collect::<Option<Vec<_>>>())
                            .ok_or_else(|| bad(&param, "must be a list of strings"))?,
                    ),
                    // Options of vLLM's that change nothing here.
                    "disable_fallback" | "disable_any_whitespace" | "disable_additional_properties" | "whitespace_pattern" | "backend" => {
                        continue
                    }
                    "structural_tag" => return Err(bad(&param, "structural tags are not supported; use `grammar`")),
                    _ => return Err(bad(&param, "unknown field; expected one of json, regex, choice, grammar, json_object")),
                };
                found.push((c, param));
            }
        }
        if let Some(v) = &self.guided_json {
            found.push((Constraint::JsonSchema(schema_value(v, "guided_json")?), "guided_json".into()));
        }
        if let Some(r) = &self.guided_regex {
            found.push((Constraint::Regex(r.clone()), "guided_regex".into()));
        }
        if let Some(c) = &self.guided_choice {
            found.push((Constraint::Choice(c.clone()), "guided_choice".into()));
        }
        if let Some(g) = &self.guided_grammar {
            found.push((Constraint::grammar(g), "guided_grammar".into()));
        }
        if let Some(v) = &self.json_schema {
            found.push((Constraint::JsonSchema(schema_value(v, "json_schema")?), "json_schema".into()));
        }
        if let Some(g) = self.grammar.as_ref().filter(|g| !g.trim().is_empty()) {
            found.push((Constraint::grammar(g), "grammar".into()));
        }
        if found.len() > 1 {
            let names: Vec<&str> = found.iter().map(|(_, p)| p.as_str()).collect();
            return Err(bad(&found[1].1, format!("give one structured-output constraint, not several ({})", names.join(", "))));
        }
        Ok(found.pop())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn wrong_type_names_the_field_and_unknown_fields_are_ignored() {
        let e = parse::<CommonParams>(&json!({"temperature": "hot", "foo": 1})).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("temperature"));
        assert!(e.message.contains("invalid type"), "{}", e.message);
        let p = parse::<CommonParams>(&json!({"temperature": 0.5, "whatever": [1, 2], "stop": "x"})).unwrap();
        let s = p.sampling(&Defaults::default(), 100, None).unwrap();
        assert_eq!((s.temperature, s.stop), (0.5, vec!["x".to_string()]));
    }

    #[test]
    fn ranges_are_checked() {
        for (body, param) in [
            (json!({"temperature": 3}), "temperature"),
            (json!({"top_p": 0}), "top_p"),
            (json!({"max_tokens": 0}), "max_tokens"),
            (json!({"presence_penalty": 5}), "presence_penalty"),
            (json!({"logit_bias": {"999": 1}}), "logit_bias"),
            (json!({"logit_bias": {"abc": 1}}), "logit_bias"),
            (json!({"top_k": -5}), "top_k"),
        ] {
            let p = parse::<CommonParams>(&body).unwrap();
            let e = p.sampling(&Defaults::default(), 100, None).unwrap_err();
            assert_eq!(e.param.as_deref(), Some(param), "{body}");
        }
        let e = parse::<CommonParams>(&json!({"n": 0})).unwrap().n().unwrap_err();
        assert_eq!(e.param.as_deref(), Some("n"));
    }

    #[test]
    fn content_parts_and_roles() {
        let c: ChatParams =
            parse(&json!({"messages": [{"role": "developer", "content": "Be brief."}, {"role": "user", "content": [{"type": "text", "text": "Hi"}]}]}))
                .unwrap();
        let conv = c.conversation().unwrap();
        assert_eq!(conv[0], infer_core::ChatMessage::system("Be brief."));
        assert_eq!(conv[1], infer_core::ChatMessage::user("Hi"));
        let c: ChatParams = parse(&json!({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]})).unwrap();
        assert_eq!(c.conversation().unwrap_err().param.as_deref(), Some("messages[0].content[0].type"));
        let c: ChatParams = parse(&json!({"messages": [{"role": "robot", "content": "x"}]})).unwrap();
        assert_eq!(c.conversation().unwrap_err().param.as_deref(), Some("messages[0].role"));
    }
}
