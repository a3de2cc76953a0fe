//! The OpenAI request bodies: parsing (unknown fields ignored, a wrong type names its field) and
//! conversion into [`SamplingParams`] with OpenAI's ranges checked.

use std::collections::HashMap;

use infer_core::SamplingParams;
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

#[derive(Debug, Deserialize)]
pub struct Message {
    pub role: String,
    #[serde(default)]
    pub content: Option<Content>,
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
    pub response_format: Option<Value>,
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
/// Most alternatives per token in logprobs.
pub const MAX_TOP_LOGPROBS: u32 = 20;

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
        })
    }
}

impl ChatParams {
    /// The conversation as (role, text) pairs, checked.
    pub fn conversation(&self) -> Result<Vec<infer_core::ChatMessage>, ApiError> {
        if self.messages.is_empty() {
            return Err(ApiError::bad_request(Some("messages"), "`messages` must hold at least one message"));
        }
        if self.tools.as_ref().is_some_and(|t| !t.is_empty()) {
            return Err(ApiError::bad_request(
                Some("tools"),
                "tool calling is not supported by this server; send the request without `tools`",
            ));
        }
        if let Some(kind) = self.response_format.as_ref().and_then(|f| f.get("type")).and_then(Value::as_str) {
            if kind != "text" {
                return Err(ApiError::bad_request(
                    Some("response_format"),
                    format!("response_format `{kind}` is not supported; only `text`"),
                ));
            }
        }
        let mut out = Vec::with_capacity(self.messages.len());
        for (i, m) in self.messages.iter().enumerate() {
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
            out.push(infer_core::ChatMessage::new(role, text));
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

impl CompletionParams {
    pub fn logprobs(&self) -> Result<Option<usize>, ApiError> {
        if let Some(k) = self.logprobs {
            check(k <= MAX_TOP_LOGPROBS, "logprobs", format!("{k} must be between 0 and {MAX_TOP_LOGPROBS}"))?;
        }
        Ok(self.logprobs.map(|k| k as usize))
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
