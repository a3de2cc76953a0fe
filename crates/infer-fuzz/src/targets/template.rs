//! Chat templates (untrusted code that comes with model files) rendered with untrusted messages, as
//! the server renders a chat request: `ChatTemplate::new` compiles the template, the tool format is
//! detected from it, the request's tools are parsed and the conversation readied for them
//! (`tools::prepare_messages`), then `render_with` runs it with the tools and `chat_template_kwargs`
//! (fuel, output and time bounded by infer-core).
//!
//! Seeds: the real templates of tests/fixtures/chat (Llama 3.3, Qwen 2.5/3, Mistral Nemo/Small,
//! Phi-4-mini, DeepSeek-R1 with tool calling and reasoning; the templates.json cases with their
//! messages), each with conversations holding tool calls, tool results and reasoning.

use infer_core::tools::{self, ToolChoice, ToolFormat};
use infer_core::{ChatMessage, ChatTemplate};
use serde_json::{json, Value};

use super::{anywhere, normalize, Target};
use crate::fixtures;
use crate::mutate::{Input, PartInfo};

/// The input's parts (file names of a finding).
pub const PARTS: &[&str] = &["template.jinja", "messages.json", "tools.json", "kwargs.json"];

pub struct Template;

impl Template {
    pub fn new() -> Self {
        Self
    }
}

fn tools_json() -> Value {
    json!([{"type": "function", "function": {"name": "get_weather", "description": "Weather of a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer", "minimum": 1}}, "required": ["city"]}}},
        {"type": "function", "function": {"name": "noop", "parameters": {"type": "object", "properties": {}}}}])
}

fn conversations() -> Vec<Value> {
    vec![
        json!([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"}]),
        json!([{"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "content": "", "tool_calls": [{"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
            {"role": "tool", "content": "{\"temp\": 21}", "tool_call_id": "call_1", "name": "get_weather"},
            {"role": "assistant", "content": "21 degrees.", "reasoning_content": "The tool said 21."},
            {"role": "user", "content": "And tomorrow?"}]),
        json!([{"role": "user", "content": "1+1?"}, {"role": "assistant", "content": "<think>easy</think>2"}, {"role": "user", "content": "2+2?"}]),
    ]
}

impl Target for Template {
    fn parts(&self) -> &'static [&'static str] {
        PARTS
    }

    fn part_info(&self, _: &Input) -> Vec<PartInfo> {
        vec![anywhere(1 << 16), anywhere(1 << 16), anywhere(1 << 14), anywhere(1 << 12)]
    }

    fn seeds(&self) -> Vec<Input> {
        let mut out = Vec::new();
        let convs = conversations();
        for (i, (_, src)) in fixtures::TEMPLATES.iter().enumerate() {
            for (j, conv) in convs.iter().enumerate() {
                let tools = if (i + j) % 2 == 0 { tools_json().to_string() } else { String::new() };
                let kwargs = if j == 2 { r#"{"enable_thinking": false}"# } else { "" };
                out.push(vec![src.as_bytes().to_vec(), conv.to_string().into_bytes(), tools.into_bytes(), kwargs.as_bytes().to_vec()]);
            }
        }
        let cases: Value = serde_json::from_str(fixtures::TEMPLATE_CASES).expect("templates.json");
        for c in cases.as_array().into_iter().flatten() {
            let src = c["template"].as_str().unwrap_or_default();
            out.push(vec![src.as_bytes().to_vec(), c["messages"].to_string().into_bytes(), vec![], vec![]]);
        }
        out
    }

    fn dictionary(&self) -> Vec<Vec<u8>> {
        let mut d = super::words(&[
            "{% for m in messages %}",
            "{% endfor %}",
            "{% if ",
            "{% elif ",
            "{% else %}",
            "{% endif %}",
            "{% set ns = namespace(x=0) %}",
            "{% macro f(x) %}{{ f(x) }}{% endmacro %}",
            "{% raw %}",
            "{% include 'chat' %}",
            "{% extends 'chat' %}",
            "{% filter upper %}",
            "{{ ",
            " }}",
            "{{- ",
            " -}}",
            "{# ",
            " #}",
            "range(",
            "loop.index0",
            "| tojson",
            "| join(",
            "| replace(",
            "| trim",
            "| length",
            "| selectattr('role', 'equalto', 'user')",
            ".split(",
            ".strip()",
            ".startswith(",
            "[::-1]",
            " * 1000000",
            "raise_exception('x')",
            "strftime_now('%Y-%m-%d')",
            "strftime_now('%",
            "messages",
            "tools",
            "bos_token",
            "add_generation_prompt",
            "message['content']",
            "message.tool_calls",
            "namespace",
            "<tool_call>",
            "[TOOL_CALLS]",
            "[ARGS]",
            "<think>",
            "\"role\": \"tool\"",
            "\"tool_calls\": [{\"function\": {\"name\": \"f\", \"arguments\": \"{}\"}}]",
            "\"reasoning_content\": ",
            "\"enable_thinking\": true",
        ]);
        d.extend(super::words(super::JSON_WORDS));
        d
    }

    fn run(&mut self, input: &Input) -> String {
        let src = String::from_utf8_lossy(&input[0]);
        let t = match ChatTemplate::new(&src, "<s>", "</s>") {
            Ok(t) => t,
            Err(e) => return normalize(&e.to_string()),
        };
        let format = ToolFormat::detect(&src);
        let mut messages: Vec<ChatMessage> = serde_json::from_slice(&input[1]).unwrap_or_else(|_| super::sample_conversation());
        let raw_tools: Vec<Value> = serde_json::from_slice(&input[2]).unwrap_or_default();
        let kwargs: serde_json::Map<String, Value> = serde_json::from_slice(&input[3]).unwrap_or_default();
        let template_tools = match tools::parse_tools(&raw_tools) {
            Ok(parsed) => tools::prepare_messages(&mut messages, &parsed, &ToolChoice::Auto, format),
            Err(_) => raw_tools,
        };
        let add_generation_prompt = messages.len() % 2 == 1;
        match t.render_with(&messages, add_generation_prompt, &template_tools, &kwargs) {
            Ok(s) => format!("rendered {}", s.len().min(1)),
            Err(e) => normalize(&e.to_string()),
        }
    }
}
