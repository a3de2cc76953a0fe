//! Tool calling: how each model family writes a call (its *format*, recognised from the chat
//! template as llama.cpp's chat handlers do), the grammar that makes a model call a tool
//! (`tool_choice: required` or a named function) or answer in the generic JSON form, and a parser that
//! splits the generated text into reasoning, content and calls, incrementally for streaming.
//!
//! | format | what the model writes |
//! |---|---|
//! | `hermes` (Hermes, Qwen2.5, Qwen3) | `<tool_call>\n{"name": "f", "arguments": {…}}\n</tool_call>`, repeated |
//! | `llama3_json` (Llama 3.1-3.3) | `{"name": "f", "parameters": {…}}` as the whole reply |
//! | `mistral` | `[TOOL_CALLS][{"name": "f", "arguments": {…}}, …]`, or `[TOOL_CALLS]f[ARGS]{…}` per call |
//! | `phi4_mini_json` | `<\|tool_call\|>[{"name": "f", "arguments": {…}}]<\|/tool_call\|>` (or `functools[…]`) |
//! | `generic` (no tool syntax in the template) | `{"tool_calls": [{"name": "f", "arguments": {…}}]}` or `{"response": "…"}`, the tools described in a system message |

use serde_json::{json, Value};

use crate::chat::ChatMessage;
use crate::error::Result;

/// The marker texts of every format and of reasoning sections (special tokens in some vocabularies,
/// which a detokenizer may drop: the server adds them back for the parser).
pub const MARKERS: &[&str] = &[
    "<tool_call>",
    "</tool_call>",
    "[TOOL_CALLS]",
    "[ARGS]",
    "[CALL_ID]",
    "<|tool_call|>",
    "<|/tool_call|>",
    "<|python_tag|>",
    "<think>",
    "</think>",
];

/// Most calls one answer may make (with `parallel_tool_calls`).
pub const MAX_PARALLEL_CALLS: usize = 8;

/// Most tools one request may declare.
pub const MAX_TOOLS: usize = 128;

/// A function the model may call.
#[derive(Debug, Clone, PartialEq)]
pub struct Tool {
    pub name: String,
    pub description: Option<String>,
    /// The arguments' JSON schema.
    pub parameters: Value,
}

impl Tool {
    /// The OpenAI shape templates receive: `{"type": "function", "function": {...}}`.
    pub fn to_openai(&self) -> Value {
        let mut f = serde_json::Map::new();
        f.insert("name".into(), Value::from(self.name.clone()));
        if let Some(d) = &self.description {
            f.insert("description".into(), Value::from(d.clone()));
        }
        f.insert("parameters".into(), self.parameters.clone());
        json!({"type": "function", "function": Value::Object(f)})
    }
}

/// Which tool calls the model must or may make.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ToolChoice {
    /// Answer or call, as the model decides.
    Auto,
    /// No call (the tools are not shown to the model).
    None,
    /// At least one call.
    Required,
    /// A call of this function.
    Named(String),
}

/// A call the model made.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ToolCall {
    pub id: String,
    pub name: String,
    /// The arguments as a JSON object's text.
    pub arguments: String,
}

/// How a model family writes tool calls.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ToolFormat {
    Hermes,
    Llama3Json,
    /// `[TOOL_CALLS]` then a JSON array (Mistral v3, Nemo, Small 3.1).
    Mistral,
    /// `[TOOL_CALLS]name[ARGS]{…}` per call (Mistral Small 3.2, Magistral, Devstral).
    MistralV11,
    Phi4Mini,
    Generic,
}

impl ToolFormat {
    /// The names `--tool-call-parser` takes (vLLM's, where it has one).
    pub const NAMES: &'static [&'static str] = &["hermes", "llama3_json", "mistral", "mistral_v11", "phi4_mini_json", "generic"];

    pub fn name(self) -> &'static str {
        match self {
            Self::Hermes => "hermes",
            Self::Llama3Json => "llama3_json",
            Self::Mistral => "mistral",
            Self::MistralV11 => "mistral_v11",
            Self::Phi4Mini => "phi4_mini_json",
            Self::Generic => "generic",
        }
    }

    pub fn from_name(s: &str) -> Option<Self> {
        Some(match s {
            "hermes" | "qwen" | "qwen2.5" | "qwen3" => Self::Hermes,
            "llama3_json" | "llama3" | "llama" => Self::Llama3Json,
            "mistral" => Self::Mistral,
            "mistral_v11" => Self::MistralV11,
            "phi4_mini_json" | "phi4" | "phi4_mini" => Self::Phi4Mini,
            "generic" | "json" => Self::Generic,
            _ => return None,
        })
    }

    /// The format a chat template teaches its model (llama.cpp's order of checks).
    pub fn detect(template: &str) -> Self {
        if template.contains("<tool_call>") {
            Self::Hermes
        } else if template.contains("[TOOL_CALLS]") {
            if template.contains("[ARGS]") {
                Self::MistralV11
            } else {
                Self::Mistral
            }
        } else if template.contains("functools[") || template.contains("<|tool_call|>") {
            Self::Phi4Mini
        } else if template.contains("<|start_header_id|>ipython<|end_header_id|>") || template.contains("<|python_tag|>") {
            Self::Llama3Json
        } else {
            Self::Generic
        }
    }

    /// The texts that start a call (content before them is the answer).
    fn triggers(self) -> &'static [&'static str] {
        match self {
            Self::Hermes => &["<tool_call>"],
            Self::Llama3Json => &["<|python_tag|>"],
            Self::Mistral | Self::MistralV11 => &["[TOOL_CALLS]"],
            Self::Phi4Mini => &["<|tool_call|>", "functools["],
            Self::Generic => &[],
        }
    }

    /// Tool call ids in the family's style (Mistral's templates insist on 9 alphanumerics).
    pub fn new_call_id(self) -> String {
        use rand::distr::{Alphanumeric, SampleString};
        match self {
            Self::Mistral | Self::MistralV11 => Alphanumeric.sample_string(&mut rand::rng(), 9),
            _ => format!("call_{}", Alphanumeric.sample_string(&mut rand::rng(), 24)),
        }
    }
}

/// Parses the request's `tools` (OpenAI's list of `{"type": "function", "function": {name,
/// description, parameters}}`); errors name the entry.
pub fn parse_tools(tools: &[Value]) -> std::result::Result<Vec<Tool>, (String, String)> {
    if tools.len() > MAX_TOOLS {
        return Err(("tools".into(), format!("{} tools given; at most {MAX_TOOLS}", tools.len())));
    }
    let mut out: Vec<Tool> = Vec::with_capacity(tools.len());
    for (i, t) in tools.iter().enumerate() {
        let at = |f: &str| format!("tools[{i}]{f}");
        match t.get("type").and_then(Value::as_str) {
            Some("function") => {}
            Some(other) => return Err((at(".type"), format!("tool type `{other}` is not supported; only `function`"))),
            None => return Err((at(".type"), "is required (`function`)".into())),
        }
        let f = t.get("function").and_then(Value::as_object).ok_or_else(|| (at(".function"), "must be an object".to_string()))?;
        let name = f.get("name").and_then(Value::as_str).ok_or_else(|| (at(".function.name"), "is required".to_string()))?;
        if name.is_empty() || name.len() > 64 || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-' || c == '.') {
            return Err((at(".function.name"), format!("`{name}` must be 1-64 letters, digits, `_`, `-` or `.`")));
        }
        if out.iter().any(|o| o.name == name) {
            return Err((at(".function.name"), format!("two tools are named `{name}`")));
        }
        let parameters = match f.get("parameters") {
            None | Some(Value::Null) => json!({"type": "object", "properties": {}}),
            Some(p @ Value::Object(_)) => p.clone(),
            Some(_) => return Err((at(".function.parameters"), "must be a JSON schema object".into())),
        };
        let description = f.get("description").and_then(Value::as_str).map(String::from);
        out.push(Tool { name: name.to_string(), description, parameters });
    }
    Ok(out)
}

/// Parses `tool_choice`: `"auto"`, `"none"`, `"required"` or `{"type": "function", "function": {"name": …}}`.
pub fn parse_tool_choice(v: Option<&Value>, tools: &[Tool]) -> std::result::Result<ToolChoice, String> {
    let choice = match v {
        None | Some(Value::Null) => ToolChoice::Auto,
        Some(Value::String(s)) => match s.as_str() {
            "auto" => ToolChoice::Auto,
            "none" => ToolChoice::None,
            "required" | "any" => ToolChoice::Required,
            other => return Err(format!("`{other}` is not one of `auto`, `none`, `required` or a function")),
        },
        Some(o) => {
            let name = o
                .pointer("/function/name")
                .or_else(|| o.get("name"))
                .and_then(Value::as_str)
                .ok_or("name a function as {\"type\": \"function\", \"function\": {\"name\": …}}")?;
            if !tools.iter().any(|t| t.name == name) {
                return Err(format!("no tool is named `{name}`"));
            }
            ToolChoice::Named(name.to_string())
        }
    };
    if tools.is_empty() && matches!(choice, ToolChoice::Required | ToolChoice::Named(_)) {
        return Err("needs `tools`".into());
    }
    Ok(choice)
}

/// The system message of the generic format: the tools and the JSON answer shape (llama.cpp's
/// generic handler does the same for templates without tool syntax).
pub fn generic_system_prompt(tools: &[Tool], choice: &ToolChoice) -> String {
    let list: Vec<Value> = tools.iter().map(|t| t.to_openai()["function"].clone()).collect();
    let list = serde_json::to_string_pretty(&list).unwrap_or_default();
    let how = match choice {
        ToolChoice::Required | ToolChoice::Named(_) => {
            "Respond in JSON with the calls to make: {\"tool_calls\": [{\"name\": <tool name>, \"arguments\": <arguments object>}]}"
        }
        _ => "Respond in JSON, either with the calls to make: {\"tool_calls\": [{\"name\": <tool name>, \"arguments\": <arguments object>}]}, or with an answer to the user: {\"response\": <answer>}",
    };
    format!("You can call these tools:\n{list}\n{how}")
}

/// Readies a conversation for tools in `format`: for the generic format the tools are described in
/// the system message (added, or appended to the first one); for the others the template receives
/// them. Returns the list to pass as the template's `tools` (empty when no tools are in play).
pub fn prepare_messages(messages: &mut Vec<ChatMessage>, tools: &[Tool], choice: &ToolChoice, format: ToolFormat) -> Vec<Value> {
    if tools.is_empty() || *choice == ToolChoice::None {
        return Vec::new();
    }
    if format != ToolFormat::Generic {
        return tools.iter().map(Tool::to_openai).collect();
    }
    let prompt = generic_system_prompt(tools, choice);
    match messages.first_mut() {
        Some(m) if m.role == "system" => m.content = format!("{}\n\n{prompt}", m.content),
        _ => messages.insert(0, ChatMessage::system(prompt)),
    }
    Vec::new()
}

/// How the grammar names a marker: as the special token when the vocabulary has it as one (it
/// cannot be produced from plain text then), else as text.
fn marker(text: &str, special: &dyn Fn(&str) -> Option<String>) -> String {
    special(text).unwrap_or_else(|| serde_json::to_string(text).expect("strings serialize"))
}

/// The JSON schema of one call `{"name": …, <args_key>: …}` of any of `tools` (or only `named`).
fn call_schema(tools: &[Tool], named: Option<&str>, args_key: &str) -> Value {
    let one = |t: &Tool| {
        json!({
            "type": "object",
            "properties": {"name": {"const": t.name}, args_key: t.parameters},
            "required": ["name", args_key],
            "additionalProperties": false
        })
    };
    let picked: Vec<Value> = tools.iter().filter(|t| named.is_none_or(|n| n == t.name)).map(one).collect();
    if picked.len() == 1 {
        picked.into_iter().next().expect("one")
    } else {
        json!({"anyOf": picked})
    }
}

fn lark_json(schema: &Value) -> Result<String> {
    Ok(format!("%json {}", crate::structured::prepare_schema(schema)?))
}

/// The Lark grammar of a tool choice. `Required` and `Named`: the output is a call (or up to
/// [`MAX_PARALLEL_CALLS`]) of the tools in `format`, arguments valid under their schemas, from the
/// first token. `Auto`: free text, and once the family's trigger appears (`<tool_call>`,
/// `[TOOL_CALLS]`, `<|tool_call|>`; for Llama 3 a reply starting with `{`) the calls are constrained
/// the same way (a "lazy" grammar); in the generic format the output is a call or `{"response": …}`.
/// `None` (no constraint) for `ToolChoice::None`.
pub fn tool_grammar(
    format: ToolFormat,
    tools: &[Tool],
    choice: &ToolChoice,
    parallel: bool,
    special: &dyn Fn(&str) -> Option<String>,
) -> Result<Option<String>> {
    let named = match choice {
        ToolChoice::None => return Ok(None),
        ToolChoice::Named(n) => Some(n.as_str()),
        _ => None,
    };
    let auto = *choice == ToolChoice::Auto;
    let more = if parallel { MAX_PARALLEL_CALLS - 1 } else { 0 };
    let max_items = more + 1;
    // Up to `more` further calls after the first (Lark has no `{0,0}`).
    let repeat = |item: &str| if more > 0 { format!(" {item}{{0,{more}}}") } else { String::new() };
    let array =
        |args_key: &str| json!({"type": "array", "items": call_schema(tools, named, args_key), "minItems": 1, "maxItems": max_items});
    // The calls section as (trigger text, what follows the trigger, extra rules).
    let (trigger, after, rules) = match format {
        ToolFormat::Hermes => {
            let body =
                format!("\"\\n\" {} \"\\n\" {}", lark_json(&call_schema(tools, named, "arguments"))?, marker("</tool_call>", special));
            let call = format!("call: {} {body}\n", marker("<tool_call>", special));
            ("<tool_call>", format!("{body}{}", repeat("(\"\\n\" call)")), call)
        }
        ToolFormat::Mistral => ("[TOOL_CALLS]", lark_json(&array("arguments"))?, String::new()),
        ToolFormat::Phi4Mini => ("<|tool_call|>", lark_json(&array("arguments"))?, String::new()),
        ToolFormat::MistralV11 => {
            let alts: Vec<String> = tools
                .iter()
                .filter(|t| named.is_none_or(|n| n == t.name))
                .map(|t| {
                    Ok(format!(
                        "{} {} {}",
                        serde_json::to_string(&t.name).expect("strings serialize"),
                        marker("[ARGS]", special),
                        lark_json(&t.parameters)?
                    ))
                })
                .collect::<Result<_>>()?;
            let rules = format!("one: {}\ncall: {} one\n", alts.join(" | "), marker("[TOOL_CALLS]", special));
            ("[TOOL_CALLS]", format!("one{}", repeat("call")), rules)
        }
        ToolFormat::Llama3Json => {
            let call = lark_json(&call_schema(tools, named, "parameters"))?;
            // Llama 3 calls are the whole reply: under `auto`, a reply that starts with `{` is one.
            let g = if auto { format!("start: FREE | {call}\nFREE: /([^{{ \\t\\n](.|\\n)*)?/\n") } else { format!("start: {call}\n") };
            return Ok(Some(g));
        }
        ToolFormat::Generic => {
            let with_calls = json!({"type": "object", "properties": {"tool_calls": array("arguments")}, "required": ["tool_calls"], "additionalProperties": false});
            let schema = if auto {
                json!({"anyOf": [with_calls, {"type": "object", "properties": {"response": {"type": "string"}}, "required": ["response"], "additionalProperties": false}]})
            } else {
                with_calls
            };
            return Ok(Some(format!("start: {}\n", lark_json(&schema)?)));
        }
    };
    let g = match (auto, special(trigger)) {
        (false, t) => format!("start: {} {after}\n{rules}", t.unwrap_or_else(|| marker(trigger, special))),
        // Free text cannot produce a special token: the trigger token itself starts the calls.
        (true, Some(t)) => format!("start: FREE | FREE {t} {after}\n{rules}FREE: /(.|\\n)*/\n"),
        // A text trigger: the free text ends at its first occurrence.
        (true, None) => format!(
            "start: FREE | trig {after}\ntrig[lazy]: FREE {}\n{rules}FREE: /(.|\\n)*/\n",
            serde_json::to_string(trigger).expect("strings serialize")
        ),
    };
    Ok(Some(g))
}

/// What the generated text holds.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ParsedOutput {
    /// The thinking section (`<think>…</think>`), when the model wrote one.
    pub reasoning: Option<String>,
    pub content: String,
    pub calls: Vec<ToolCall>,
}

/// A piece of a streamed answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OutputDelta {
    Reasoning(String),
    Content(String),
    /// A new call: its index among the calls, id and name (arguments follow).
    CallStart {
        index: usize,
        id: String,
        name: String,
    },
    /// More of call `index`'s arguments text.
    CallArguments {
        index: usize,
        fragment: String,
    },
}

/// One call as far as it has been generated: the name once complete, the arguments' text so far.
#[derive(Debug, Clone, Default)]
struct PartialCall {
    name: Option<String>,
    args: String,
    complete: bool,
}

/// A piece of the parser's text: a byte range of it (no copy), or text decoded from it.
#[derive(Debug, Clone)]
enum Piece {
    At(usize, usize),
    Owned(String),
}

impl Default for Piece {
    fn default() -> Self {
        Self::At(0, 0)
    }
}

impl Piece {
    /// `part`, a slice of `text` (or an empty string from anywhere), as a range.
    fn of(text: &str, part: &str) -> Self {
        if part.is_empty() {
            return Self::At(0, 0);
        }
        let start = part.as_ptr() as usize - text.as_ptr() as usize;
        debug_assert!(start + part.len() <= text.len());
        Self::At(start, start + part.len())
    }

    fn get<'a>(&'a self, text: &'a str) -> &'a str {
        match self {
            Self::At(a, b) => &text[*a..*b],
            Self::Owned(s) => s,
        }
    }
}

/// What a scan of the text so far found.
#[derive(Debug, Default)]
struct Scan {
    reasoning: Option<Piece>,
    /// Content that is final (a possible trigger at the end is held back while partial).
    content: Piece,
    calls: Vec<PartialCall>,
    /// The text after the first trigger could not be read as calls.
    malformed: bool,
}

/// Splits generated text into reasoning, content and calls as it grows (`push`), and at the end
/// (`finish`). Streaming and whole answers go through the same scan, so they agree.
#[derive(Debug)]
pub struct OutputParser {
    format: Option<ToolFormat>,
    /// Reasoning starts open (the prompt ended inside `<think>`), or may open at the start.
    think: ThinkMode,
    text: String,
    sent_reasoning: usize,
    sent_content: usize,
    /// Per call: the id given, and how much of its arguments was sent.
    sent_calls: Vec<(String, usize)>,
    /// Where to look for `</think>` and for the first call trigger: the text before was searched
    /// already (each token's scan searches only the new text, so a long answer is not quadratic).
    close_from: std::cell::Cell<usize>,
    trigger_from: std::cell::Cell<usize>,
}

/// The first of `needles` in `hay` (a slice of the parser's text starting at byte `at`), searching
/// from the absolute offset `*from` on; when none is there, `*from` moves to where a needle cut off
/// at the end could start.
fn find_from<'n>(hay: &str, at: usize, needles: &[&'n str], from: &std::cell::Cell<usize>) -> Option<(usize, &'n str)> {
    let mut skip = from.get().saturating_sub(at).min(hay.len());
    while !hay.is_char_boundary(skip) {
        skip -= 1;
    }
    let found = needles.iter().filter_map(|n| hay[skip..].find(n).map(|p| (skip + p, *n))).min();
    if found.is_none() {
        let longest = needles.iter().map(|n| n.len()).max().unwrap_or(1);
        from.set(at + hay.len().saturating_sub(longest - 1).max(skip));
    }
    found
}

/// Whether and how the output may hold a `<think>…</think>` section.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ThinkMode {
    /// Reasoning stays in the content.
    Off,
    /// A section the output opens with `<think>`.
    Tagged,
    /// The prompt opened the section: the output starts inside it.
    Open,
}

const THINK_OPEN: &str = "<think>";
const THINK_CLOSE: &str = "</think>";

/// The longest suffix of `s` that is a proper prefix of one of `markers` (held back while streaming).
fn partial_marker_len(s: &str, markers: &[&str]) -> usize {
    let mut best = 0;
    for m in markers {
        for k in (1..m.len()).rev() {
            if k <= s.len() && s.is_char_boundary(s.len() - k) && m.starts_with(&s[s.len() - k..]) {
                best = best.max(k);
                break;
            }
        }
    }
    best
}

/// A JSON value's extent at the start of `s` (after whitespace): `Some(end)` when complete, `None`
/// when `s` ends inside it. Strings and nesting are tracked; the value is not validated here.
fn json_value_end(s: &str) -> Option<usize> {
    let b = s.as_bytes();
    let mut i = 0;
    while i < b.len() && b[i].is_ascii_whitespace() {
        i += 1;
    }
    if i == b.len() {
        return None;
    }
    let mut depth = 0usize;
    let mut in_str = false;
    let mut esc = false;
    let scalar = !matches!(b[i], b'{' | b'[' | b'"');
    while i < b.len() {
        let c = b[i];
        if in_str {
            if esc {
                esc = false;
            } else if c == b'\\' {
                esc = true;
            } else if c == b'"' {
                in_str = false;
                if depth == 0 {
                    return Some(i + 1);
                }
            }
        } else if scalar {
            if matches!(c, b',' | b'}' | b']') || c.is_ascii_whitespace() {
                return Some(i);
            }
        } else {
            match c {
                b'"' => in_str = true,
                b'{' | b'[' => depth += 1,
                b'}' | b']' => {
                    depth = depth.saturating_sub(1);
                    if depth == 0 {
                        return Some(i + 1);
                    }
                }
                _ => {}
            }
        }
        i += 1;
    }
    None
}

/// Reads a JSON object `{"name": …, "arguments"|"parameters": …}` at the start of `s` (after
/// whitespace), tolerating a truncated end. Returns the call so far and where the object ended.
fn scan_call_object(s: &str) -> Option<(PartialCall, Option<usize>)> {
    let start = s.len() - s.trim_start().len();
    let b = s.as_bytes();
    if b.get(start) != Some(&b'{') {
        return if s.trim().is_empty() { Some((PartialCall::default(), None)) } else { None };
    }
    let mut call = PartialCall::default();
    let mut i = start + 1;
    loop {
        let rest = &s[i..];
        let ws = rest.len() - rest.trim_start().len();
        i += ws;
        match b.get(i) {
            None => return Some((call, None)),
            Some(b'}') => {
                call.complete = call.name.is_some();
                return Some((call, Some(i + 1)));
            }
            Some(b',') => {
                i += 1;
                continue;
            }
            Some(b'"') => {}
            Some(_) => return None,
        }
        let Some(klen) = json_value_end(&s[i..]) else { return Some((call, None)) };
        let key: String = serde_json::from_str(&s[i..i + klen]).ok()?;
        i += klen;
        let rest = &s[i..];
        let ws = rest.len() - rest.trim_start().len();
        i += ws;
        match b.get(i) {
            None => return Some((call, None)),
            Some(b':') => i += 1,
            Some(_) => return None,
        }
        let rest = &s[i..];
        i += rest.len() - rest.trim_start().len();
        let end = json_value_end(&s[i..]);
        match key.as_str() {
            "name" | "function" => match end {
                Some(e) => {
                    let v: Value = serde_json::from_str(&s[i..i + e]).ok()?;
                    call.name = Some(v.as_str()?.to_string());
                }
                None => return Some((call, None)),
            },
            "arguments" | "parameters" => {
                let v_end = end.unwrap_or(s.len() - i);
                call.args = s[i..i + v_end].to_string();
                if end.is_none() {
                    return Some((call, None));
                }
            }
            _ => {
                if end.is_none() {
                    return Some((call, None));
                }
            }
        }
        i += end.expect("complete");
    }
}

impl OutputParser {
    /// A parser for text generated under `format` (`None`: no tools, content only).
    pub fn new(format: Option<ToolFormat>, think: ThinkMode) -> Self {
        Self {
            format,
            think,
            text: String::new(),
            sent_reasoning: 0,
            sent_content: 0,
            sent_calls: Vec::new(),
            close_from: Default::default(),
            trigger_from: Default::default(),
        }
    }

    /// Whether anything beyond plain content may come out (tools or reasoning).
    pub fn is_plain(&self) -> bool {
        self.format.is_none() && self.think == ThinkMode::Off
    }

    /// Reasoning and the rest of the text.
    fn split_reasoning<'a>(&self, text: &'a str, partial: bool) -> (Option<&'a str>, &'a str, bool) {
        let body = match self.think {
            ThinkMode::Off => return (None, text, false),
            ThinkMode::Open => text,
            ThinkMode::Tagged => {
                let t = text.trim_start();
                if let Some(rest) = t.strip_prefix(THINK_OPEN) {
                    rest
                } else if partial && THINK_OPEN.starts_with(t) {
                    return (None, "", true); // may still become `<think>`
                } else {
                    return (None, text, false);
                }
            }
        };
        let at = body.as_ptr() as usize - self.text.as_ptr() as usize;
        match find_from(body, at, &[THINK_CLOSE], &self.close_from).map(|f| f.0) {
            Some(p) => (Some(&body[..p]), body[p + THINK_CLOSE.len()..].trim_start(), false),
            None => {
                let hold = if partial { partial_marker_len(body, &[THINK_CLOSE]) } else { 0 };
                (Some(&body[..body.len() - hold]), "", true)
            }
        }
    }

    fn scan(&self, partial: bool) -> Scan {
        let mut out = Scan::default();
        let (reasoning, rest, in_reasoning) = self.split_reasoning(&self.text, partial);
        out.reasoning = reasoning.map(|r| Piece::of(&self.text, r.trim_start()));
        if in_reasoning {
            return out;
        }
        let Some(format) = self.format else {
            out.content = Piece::of(&self.text, rest);
            return out;
        };
        let (content, calls) = match format {
            ToolFormat::Generic => return self.scan_generic(rest, partial, out),
            ToolFormat::Llama3Json => {
                let t = rest.trim_start();
                let t = t.strip_prefix("<|python_tag|>").unwrap_or(t).trim_start();
                if t.starts_with('{') {
                    ("", t)
                } else if partial && t.is_empty() {
                    ("", "")
                } else {
                    (rest, "")
                }
            }
            _ => {
                let at = if rest.is_empty() { self.text.len() } else { rest.as_ptr() as usize - self.text.as_ptr() as usize };
                match find_from(rest, at, format.triggers(), &self.trigger_from) {
                    Some((p, _)) => (&rest[..p], &rest[p..]),
                    None => {
                        let hold = if partial { partial_marker_len(rest, format.triggers()) } else { 0 };
                        (&rest[..rest.len() - hold], "")
                    }
                }
            }
        };
        out.content = Piece::of(&self.text, content);
        if !calls.is_empty() {
            match self.scan_calls(format, calls) {
                Some(c) => out.calls = c,
                None => out.malformed = true,
            }
        }
        out
    }

    /// The calls in `s`, which starts at the first trigger; `None` when it is not in the format.
    fn scan_calls(&self, format: ToolFormat, s: &str) -> Option<Vec<PartialCall>> {
        let mut calls = Vec::new();
        match format {
            ToolFormat::Hermes => {
                let mut rest = s;
                while let Some(after) = rest.trim_start().strip_prefix("<tool_call>") {
                    let (call, end) = scan_call_object(after)?;
                    calls.push(call);
                    let Some(end) = end else { break };
                    rest = after[end..].trim_start();
                    rest = rest.strip_prefix("</tool_call>").unwrap_or(rest);
                }
                if calls.is_empty() && !rest.trim().is_empty() && !"<tool_call>".starts_with(rest.trim()) {
                    return None;
                }
            }
            ToolFormat::Llama3Json => {
                let (call, end) = scan_call_object(s)?;
                calls.push(call);
                if let Some(e) = end {
                    let tail = s[e..].trim();
                    if !tail.is_empty() && !tail.starts_with(';') {
                        return None;
                    }
                    let mut rest = tail;
                    while let Some(next) = rest.strip_prefix(';') {
                        let (call, end) = scan_call_object(next)?;
                        calls.push(call);
                        let Some(e) = end else { break };
                        rest = next[e..].trim();
                    }
                }
            }
            ToolFormat::Mistral | ToolFormat::Phi4Mini => {
                let body = s
                    .strip_prefix("[TOOL_CALLS]")
                    .or_else(|| s.strip_prefix("<|tool_call|>"))
                    .or_else(|| s.strip_prefix("functools"))
                    .unwrap_or(s);
                let body = body.trim_start();
                if let Some(mut rest) = body.strip_prefix('[') {
                    loop {
                        let (call, end) = scan_call_object(rest)?;
                        if call.name.is_some() || !call.args.is_empty() {
                            calls.push(call);
                        }
                        let Some(e) = end else { break };
                        rest = rest[e..].trim_start();
                        match rest.strip_prefix(',') {
                            Some(r) => rest = r,
                            None => break,
                        }
                    }
                } else if body.starts_with('{') {
                    let (call, _) = scan_call_object(body)?;
                    calls.push(call);
                } else if format == ToolFormat::Mistral && !body.is_empty() {
                    return self.scan_calls(ToolFormat::MistralV11, s);
                }
            }
            ToolFormat::MistralV11 => {
                let mut rest = s;
                while let Some(after) = rest.strip_prefix("[TOOL_CALLS]") {
                    let name_end = after.find("[ARGS]").or_else(|| after.find('{'));
                    let Some(ne) = name_end else {
                        calls.push(PartialCall::default());
                        break;
                    };
                    let name = after[..ne].split("[CALL_ID]").next().unwrap_or("").trim().to_string();
                    let args_at = after[ne..].strip_prefix("[ARGS]").unwrap_or(&after[ne..]);
                    let end = json_value_end(args_at);
                    let args = &args_at[..end.unwrap_or(args_at.len())];
                    calls.push(PartialCall { name: Some(name), args: args.trim_start().to_string(), complete: end.is_some() });
                    let Some(e) = end else { break };
                    rest = args_at[e..].trim_start();
                }
            }
            ToolFormat::Generic => unreachable!("generic output is scanned as a whole"),
        }
        Some(calls)
    }

    /// Generic format: `{"tool_calls": [...]}` or `{"response": "..."}` (anything else is content).
    fn scan_generic(&self, rest: &str, partial: bool, mut out: Scan) -> Scan {
        let t = rest.trim_start();
        if !t.starts_with('{') {
            out.content = if partial && t.is_empty() { Piece::default() } else { Piece::of(&self.text, rest) };
            return out;
        }
        if let Some(p) = t.find("\"tool_calls\"") {
            let after = t[p + "\"tool_calls\"".len()..].trim_start();
            if let Some(arr) = after.strip_prefix(':').map(str::trim_start).and_then(|a| a.strip_prefix('[')) {
                let mut rest = arr;
                loop {
                    let Some((call, end)) = scan_call_object(rest) else {
                        out.malformed = true;
                        break;
                    };
                    if call.name.is_some() || !call.args.is_empty() {
                        out.calls.push(call);
                    }
                    let Some(e) = end else { break };
                    rest = rest[e..].trim_start();
                    match rest.strip_prefix(',') {
                        Some(r) => rest = r,
                        None => break,
                    }
                }
                return out;
            }
        }
        if let Some(p) = t.find("\"response\"") {
            let after = t[p + "\"response\"".len()..].trim_start();
            if let Some(v) = after.strip_prefix(':').map(str::trim_start) {
                if v.starts_with('"') {
                    out.content = Piece::Owned(match json_value_end(v) {
                        Some(e) => serde_json::from_str::<String>(&v[..e]).unwrap_or_default(),
                        None => decode_partial_json_string(v),
                    });
                    return out;
                }
            }
        }
        if partial {
            return out; // not decided yet
        }
        out.content = Piece::of(&self.text, rest);
        out
    }

    /// Adds generated text; returns what became final.
    pub fn push(&mut self, piece: &str) -> Vec<OutputDelta> {
        self.text.push_str(piece);
        if self.is_plain() {
            let d = self.text[self.sent_content..].to_string();
            self.sent_content = self.text.len();
            return if d.is_empty() { Vec::new() } else { vec![OutputDelta::Content(d)] };
        }
        let scan = self.scan(true);
        self.deltas(scan, false)
    }

    fn deltas(&mut self, scan: Scan, last: bool) -> Vec<OutputDelta> {
        let mut out = Vec::new();
        if let Some(r) = scan.reasoning.as_ref().map(|r| r.get(&self.text)) {
            if r.len() > self.sent_reasoning && r.is_char_boundary(self.sent_reasoning) {
                out.push(OutputDelta::Reasoning(r[self.sent_reasoning..].to_string()));
                self.sent_reasoning = r.len();
            }
        }
        let content = if scan.malformed && last {
            std::borrow::Cow::Owned(self.raw_content())
        } else {
            std::borrow::Cow::Borrowed(scan.content.get(&self.text))
        };
        if content.len() > self.sent_content && content.is_char_boundary(self.sent_content) {
            out.push(OutputDelta::Content(content[self.sent_content..].to_string()));
            self.sent_content = content.len();
        }
        if scan.malformed && last {
            return out;
        }
        for (index, call) in scan.calls.iter().enumerate() {
            let Some(name) = &call.name else { break };
            if index == self.sent_calls.len() {
                let id = self.format.unwrap_or(ToolFormat::Generic).new_call_id();
                out.push(OutputDelta::CallStart { index, id: id.clone(), name: name.clone() });
                self.sent_calls.push((id, 0));
            }
            let sent = &mut self.sent_calls[index].1;
            if call.args.len() > *sent && call.args.is_char_boundary(*sent) {
                out.push(OutputDelta::CallArguments { index, fragment: call.args[*sent..].to_string() });
                *sent = call.args.len();
            }
        }
        out
    }

    /// The text after the reasoning, as it was generated (when calls could not be read).
    fn raw_content(&self) -> String {
        self.split_reasoning(&self.text, false).1.to_string()
    }

    /// The last deltas and the whole answer. Calls whose arguments are not a JSON object make the
    /// text after the reasoning plain content (as llama.cpp and vLLM do).
    pub fn finish(&mut self) -> (Vec<OutputDelta>, ParsedOutput) {
        let scan = self.scan(false);
        let valid = !scan.malformed
            && scan.calls.iter().all(|c| c.name.is_some() && serde_json::from_str::<Value>(&c.args).is_ok_and(|v| v.is_object()));
        let mut parsed = ParsedOutput {
            reasoning: scan.reasoning.as_ref().map(|r| r.get(&self.text).to_string()),
            content: scan.content.get(&self.text).to_string(),
            calls: Vec::new(),
        };
        let deltas = if valid {
            let d = self.deltas(scan, true);
            parsed.calls = self
                .sent_calls
                .iter()
                .zip(self.scan(false).calls)
                .map(|((id, _), c)| ToolCall { id: id.clone(), name: c.name.unwrap_or_default(), arguments: c.args })
                .collect();
            d
        } else {
            parsed.content = self.raw_content();
            let mut scan = scan;
            scan.malformed = true;
            self.deltas(scan, true)
        };
        if parsed.calls.is_empty() && !valid {
            parsed.content = self.raw_content();
        }
        (deltas, parsed)
    }

    /// The calls' ids given so far (a stream's calls keep them).
    pub fn num_calls(&self) -> usize {
        self.sent_calls.len()
    }
}

/// The text of a JSON string literal that may be cut short (`"ab\"c` → `ab"c`), stopping before an
/// incomplete escape.
fn decode_partial_json_string(v: &str) -> String {
    let inner = &v[1..];
    let mut end = inner.len();
    // Back off to before a trailing incomplete escape (`\`, `\u12`).
    if let Some(p) = inner.rfind('\\') {
        let tail = &inner[p..];
        let complete = tail.len() >= 2 && (tail.as_bytes()[1] != b'u' || tail.len() >= 6);
        let escaped_backslash = inner[..p].chars().rev().take_while(|&c| c == '\\').count() % 2 == 1;
        if !complete && !escaped_backslash {
            end = p;
        }
    }
    serde_json::from_str::<String>(&format!("\"{}\"", &inner[..end])).unwrap_or_default()
}
