//! Chat templates: the Jinja templates of HF `tokenizer_config.json` / GGUF `tokenizer.chat_template`,
//! rendered with minijinja plus the extensions HF templates rely on (`raise_exception`, `tojson`,
//! `strftime_now`, Python string methods, `bos_token`/`eos_token`, `add_generation_prompt`).

use minijinja::{context, Environment, ErrorKind};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// One message of a conversation, as chat templates receive it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatMessage {
    /// `system`, `user`, `assistant` or `tool`.
    pub role: String,
    /// The text (empty for an assistant turn that only calls tools).
    pub content: String,
    /// An assistant turn's tool calls in OpenAI's shape (`{"id", "type": "function", "function":
    /// {"name", "arguments"}}`, the arguments as a JSON object where they parse as one, which is what
    /// most templates expect).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tool_calls: Vec<serde_json::Value>,
    /// A tool result's call id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_call_id: Option<String>,
    /// A tool result's function name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// An assistant turn's reasoning (templates of thinking models render or drop it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reasoning_content: Option<String>,
}

impl ChatMessage {
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        Self { role: role.into(), content: content.into(), tool_calls: Vec::new(), tool_call_id: None, name: None, reasoning_content: None }
    }
    pub fn system(content: impl Into<String>) -> Self {
        Self::new("system", content)
    }
    pub fn user(content: impl Into<String>) -> Self {
        Self::new("user", content)
    }
    pub fn assistant(content: impl Into<String>) -> Self {
        Self::new("assistant", content)
    }
}

/// Instructions a template may run per render (a conversation of thousands of messages takes a few
/// hundred thousand).
const TEMPLATE_FUEL: u64 = 20_000_000;
/// Largest rendered prompt (far beyond any context).
const TEMPLATE_OUTPUT_CAP: usize = 64 << 20;

/// A writer that fails past `cap` bytes.
struct Capped {
    buf: Vec<u8>,
    cap: usize,
}

impl std::io::Write for Capped {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        if self.buf.len() + b.len() > self.cap {
            self.buf.resize(self.cap, 0);
            return Err(std::io::Error::other("template output too large"));
        }
        self.buf.extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// A compiled chat template.
pub struct ChatTemplate {
    env: Environment<'static>,
    source: String,
    bos_token: String,
    eos_token: String,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate").finish_non_exhaustive()
    }
}

impl ChatTemplate {
    /// Compiles a template. `bos_token`/`eos_token` are the strings the template may refer to.
    pub fn new(source: &str, bos_token: impl Into<String>, eos_token: impl Into<String>) -> Result<Self> {
        let mut env = Environment::new();
        // HF renders with jinja2's trim_blocks and lstrip_blocks.
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", |msg: String| -> std::result::Result<String, minijinja::Error> {
            Err(minijinja::Error::new(ErrorKind::InvalidOperation, msg))
        });
        env.add_function("strftime_now", |fmt: String| -> std::result::Result<String, minijinja::Error> {
            // chrono panics when it displays an unknown specifier: check the format first.
            let items: Vec<chrono::format::Item> = chrono::format::StrftimeItems::new(&fmt).collect();
            if items.iter().any(|i| matches!(i, chrono::format::Item::Error)) || fmt.len() > 256 {
                return Err(minijinja::Error::new(ErrorKind::InvalidOperation, format!("strftime_now: invalid format `{fmt}`")));
            }
            Ok(chrono::Local::now().format_with_items(items.into_iter()).to_string())
        });
        // Templates come with model files: untrusted code. Bounded in instructions (a loop cannot
        // run forever) and, at render time, in output size.
        env.set_fuel(Some(TEMPLATE_FUEL));
        env.add_template_owned("chat", source.to_string()).map_err(|e| Error::Template(describe(&e)))?;
        Ok(Self { env, source: source.to_string(), bos_token: bos_token.into(), eos_token: eos_token.into() })
    }

    /// The template's source.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// Renders a conversation; with `add_generation_prompt` the text ends where the assistant's answer starts.
    pub fn render(&self, messages: &[ChatMessage], add_generation_prompt: bool) -> Result<String> {
        self.render_with(messages, add_generation_prompt, &[], &serde_json::Map::new())
    }

    /// [`render`](Self::render) with the tools the model may call (OpenAI's `tools` list, given to
    /// the template as `tools` when not empty) and extra template variables (`chat_template_kwargs`,
    /// e.g. `enable_thinking`; they cannot replace the messages, tools or special tokens).
    pub fn render_with(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
        tools: &[serde_json::Value],
        kwargs: &serde_json::Map<String, serde_json::Value>,
    ) -> Result<String> {
        let tmpl = self.env.get_template("chat").map_err(|e| Error::Template(describe(&e)))?;
        let base = context! {
            messages => messages,
            add_generation_prompt => add_generation_prompt,
            bos_token => self.bos_token,
            eos_token => self.eos_token,
            tools => (!tools.is_empty()).then_some(tools),
        };
        let mut out = Capped { buf: Vec::new(), cap: TEMPLATE_OUTPUT_CAP };
        match tmpl.render_captured_to(context! { ..base, ..minijinja::Value::from_serialize(kwargs) }, &mut out) {
            Ok(_) => String::from_utf8(out.buf).map_err(|_| Error::Template("the template wrote invalid UTF-8".into())),
            Err(_) if out.buf.len() >= TEMPLATE_OUTPUT_CAP => {
                Err(Error::Template(format!("the template's output is larger than {} MB", TEMPLATE_OUTPUT_CAP >> 20)))
            }
            Err(e) => Err(Error::Template(describe(&e))),
        }
    }
}

fn describe(e: &minijinja::Error) -> String {
    match (e.kind(), e.detail()) {
        (ErrorKind::InvalidOperation, Some(d)) => d.to_string(),
        _ => e.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Hostile templates (they come with model files): a loop that never ends, output without
    /// bound, a format chrono panics on. Each is one error, quickly.
    #[test]
    fn hostile_templates_are_bounded() {
        let msgs = [ChatMessage::user("hi")];
        for (src, want) in [
            ("{% for i in range(100000) %}{% for j in range(100000) %}x{% endfor %}{% endfor %}", "fuel"),
            ("{% for i in range(100) %}{{ 'x' * 90000000 }}{% endfor %}", "larger than"),
            ("{{ strftime_now('%Q') }}", "strftime_now"),
        ] {
            let t = ChatTemplate::new(src, "", "").unwrap();
            let t0 = std::time::Instant::now();
            let e = t.render(&msgs, true).unwrap_err().to_string();
            assert!(e.contains(want), "{src}: {e}");
            assert!(t0.elapsed() < std::time::Duration::from_secs(20), "{src}: {:?}", t0.elapsed());
        }
        let t = ChatTemplate::new("{{ strftime_now('%d %b %Y') }}", "", "").unwrap();
        assert_eq!(t.render(&msgs, true).unwrap().len(), 11);
    }

    // A Llama-3-style template exercising the HF extensions.
    const LLAMA3: &str = "{{ bos_token }}{% for message in messages %}{% if message['role'] not in ['system','user','assistant'] %}{{ raise_exception('bad role ' + message['role']) }}{% endif %}<|start_header_id|>{{ message['role'] }}<|end_header_id|>\n\n{{ message['content'] | trim }}<|eot_id|>{% endfor %}{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}";

    #[test]
    fn renders_llama3_style() {
        let t = ChatTemplate::new(LLAMA3, "<|begin_of_text|>", "<|eot_id|>").unwrap();
        let out = t.render(&[ChatMessage::system("Be brief."), ChatMessage::user(" Hi ")], true).unwrap();
        assert_eq!(
            out,
            "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
        );
    }

    #[test]
    fn raise_exception_reports_the_message() {
        let t = ChatTemplate::new(LLAMA3, "", "").unwrap();
        let err = t.render(&[ChatMessage::new("tool", "x")], false).unwrap_err().to_string();
        assert_eq!(err, "chat template: bad role tool");
    }

    #[test]
    fn python_methods_tojson_and_strftime() {
        let src = "{{ messages[0]['content'].strip().upper() }}|{{ messages[0]['content'].startswith(' a') }}|{{ {'k': 1} | tojson }}|{{ strftime_now('%Y') | length }}";
        let t = ChatTemplate::new(src, "", "").unwrap();
        let out = t.render(&[ChatMessage::user(" ab ")], false).unwrap();
        assert_eq!(out, "AB|True|{\"k\":1}|4");
    }

    #[test]
    fn syntax_error_is_reported() {
        let err = ChatTemplate::new("{% for %}", "", "").unwrap_err().to_string();
        assert!(err.starts_with("chat template:"), "{err}");
    }
}
