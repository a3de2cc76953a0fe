//! Structured output: what a sequence may generate, as a [`Constraint`] (a JSON schema, any JSON
//! object, a regular expression, a choice among strings, a Lark grammar), compiled by llguidance over
//! the model's own vocabulary into a matcher that gives the sequence a token mask at every step.
//!
//! The vocabulary is read from our tokenizer ([`token_bytes`]): each token's bytes, special tokens
//! marked (llguidance's `0xFF` prefix) so free text never produces them and a grammar names them as
//! `<|im_end|>`. A [`ConstraintCompiler`] is built once per model (tens of milliseconds); compiling a
//! constraint takes milliseconds (more for large schemas: callers on an async runtime do it on a
//! blocking thread); masks cost tens of microseconds per token on a 49k vocabulary.
//!
//! Untrusted grammars and schemas are bounded by llguidance's limits (lexer fuel per step, grammar
//! size, states) and compiled on a thread with a large stack (nested schemas recurse).

use std::collections::HashMap;
use std::sync::Arc;

use llguidance::api::{GrammarWithLexer, ParserLimits, TopLevelGrammar};
use llguidance::toktrie::{ApproximateTokEnv, TokEnv, TokRxInfo, TokTrie};
use llguidance::{Matcher, ParserFactory};
use serde_json::Value;

use crate::error::{Error, Result};
use crate::sampling::TokenMask;
use crate::sequence::TokenConstraint;
use crate::tokenizer::Tokenizer;

/// What a sequence's output must match.
#[derive(Debug, Clone, PartialEq)]
pub enum Constraint {
    /// A JSON value valid under this JSON Schema. Objects take no properties beyond those the schema
    /// lists unless it says `additionalProperties` (as llama.cpp and xgrammar do).
    JsonSchema(Value),
    /// Any JSON object.
    JsonObject,
    /// Text matching this regular expression as a whole (Rust `regex` syntax, no look-around).
    Regex(String),
    /// Exactly one of these strings.
    Choice(Vec<String>),
    /// A grammar in llguidance's Lark syntax (a `start` rule; `%json {…}` embeds a schema).
    Lark(String),
}

impl Constraint {
    /// A grammar in llguidance's Lark syntax, or in llama.cpp's GBNF (`root ::= …`, converted).
    pub fn grammar(src: &str) -> Self {
        if src.contains("::=") {
            Self::Lark(gbnf_to_lark(src))
        } else {
            Self::Lark(src.to_string())
        }
    }

    /// What kind of constraint this is, for messages.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::JsonSchema(_) => "JSON schema",
            Self::JsonObject => "JSON object",
            Self::Regex(_) => "regex",
            Self::Choice(_) => "choice",
            Self::Lark(_) => "grammar",
        }
    }

    /// The Lark source of a choice: `start: "a" | "b"` with each string JSON-escaped.
    fn choice_lark(choices: &[String]) -> Result<String> {
        if choices.is_empty() {
            return Err(Error::Constraint("a choice needs at least one string".into()));
        }
        if let Some(i) = choices.iter().position(String::is_empty) {
            return Err(Error::Constraint(format!("choice {i} is an empty string")));
        }
        let alts: Vec<String> = choices.iter().map(|c| serde_json::to_string(c).expect("strings serialize")).collect();
        Ok(format!("start: {}\n", alts.join(" | ")))
    }
}

/// GBNF as llama.cpp writes it, in Lark: `name ::= body` rules (`root` is `start`), `[...]` classes
/// and `.` as regexes, `#` comments. Rules span lines until the next `name ::=`.
pub fn gbnf_to_lark(src: &str) -> String {
    let mut out = String::with_capacity(src.len() + 64);
    let chars: Vec<char> = src.chars().collect();
    let mut i = 0;
    let rule_name = |s: &str| if s == "root" { "start".to_string() } else { s.replace('-', "_") };
    // Rule heads: an identifier at the start of a line followed by `::=`.
    let mut at_line_start = true;
    while i < chars.len() {
        let c = chars[i];
        if at_line_start {
            let rest: String = chars[i..].iter().take_while(|&&c| c != '\n').collect();
            let trimmed = rest.trim_start();
            if let Some(pos) = trimmed.find("::=") {
                let name = trimmed[..pos].trim();
                if !name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_') {
                    out.push('\n');
                    out.push_str(&rule_name(name));
                    out.push(':');
                    i += rest.len() - trimmed.len() + pos + 3;
                    at_line_start = false;
                    continue;
                }
            }
        }
        at_line_start = false;
        match c {
            '#' => {
                while i < chars.len() && chars[i] != '\n' {
                    i += 1;
                }
                continue;
            }
            '\n' => {
                out.push(' ');
                at_line_start = true;
            }
            '"' => {
                out.push('"');
                i = copy_until(&chars, i + 1, '"', false, &mut out);
                out.push('"');
            }
            '[' => {
                out.push_str("/[");
                i = copy_until(&chars, i + 1, ']', true, &mut out);
                out.push_str("]/");
            }
            '.' => out.push_str("/./"),
            c if c.is_ascii_alphabetic() || c == '_' => {
                let start = i;
                while i < chars.len() && (chars[i].is_ascii_alphanumeric() || chars[i] == '-' || chars[i] == '_') {
                    i += 1;
                }
                let name: String = chars[start..i].iter().collect();
                out.push_str(&rule_name(&name));
                continue;
            }
            c => out.push(c),
        }
        i += 1;
    }
    out.trim_start().to_string() + "\n"
}

/// Copies `chars[i..]` up to the unescaped `close` (escapes kept; `/` escaped when `in_regex`);
/// returns the index of `close` (or the end).
fn copy_until(chars: &[char], mut i: usize, close: char, in_regex: bool, out: &mut String) -> usize {
    while i < chars.len() && chars[i] != close {
        if chars[i] == '\\' && i + 1 < chars.len() {
            out.push(chars[i]);
            i += 1;
        } else if in_regex && chars[i] == '/' {
            out.push('\\');
        }
        out.push(chars[i]);
        i += 1;
    }
    i
}

/// Whether the output has a reasoning section before what a constraint governs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reasoning {
    /// No: the constraint applies from the first token.
    None,
    /// The prompt opened the section: the output is reasoning up to `close`, then constrained.
    Open { close: String },
    /// The output may open the section with `open` (… `close`); what follows is constrained.
    Tagged { open: String, close: String },
}

/// Deepest nesting of a JSON schema accepted (llguidance's own limit is 128).
const MAX_SCHEMA_DEPTH: usize = 100;
/// Most bytes of a schema, grammar, regex or choice list.
pub const MAX_CONSTRAINT_BYTES: usize = 1 << 20;
/// Stack of the thread that compiles a constraint (nested schemas recurse deeply).
const COMPILE_STACK: usize = 64 << 20;

/// A JSON schema as the compiler uses it: objects closed ([`close_objects`]) and llguidance's JSON
/// options (one line, `", "` and `": "` separators) set. Also for schemas inside Lark grammars (`%json`).
pub fn prepare_schema(schema: &Value) -> Result<Value> {
    let mut schema = schema.clone();
    close_objects(&mut schema, 0)?;
    if let Value::Object(m) = &mut schema {
        m.remove("x-guidance");
        m.insert("x-guidance".into(), json_options());
    }
    Ok(schema)
}

/// Adds `"additionalProperties": false` to every object schema that lists `properties` and says
/// nothing about others, so a generated object holds exactly the listed keys. Fails past
/// [`MAX_SCHEMA_DEPTH`] levels.
fn close_objects(v: &mut Value, depth: usize) -> Result<()> {
    if depth > MAX_SCHEMA_DEPTH {
        return Err(Error::Constraint(format!("the JSON schema nests deeper than {MAX_SCHEMA_DEPTH} levels")));
    }
    match v {
        Value::Object(m) => {
            if m.contains_key("properties") && !m.contains_key("additionalProperties") {
                m.insert("additionalProperties".into(), Value::Bool(false));
            }
            for (k, child) in m.iter_mut() {
                // `properties`, `$defs` and `definitions` map names to schemas; `enum`/`const` hold data.
                if k == "enum" || k == "const" || k == "default" || k == "examples" {
                    continue;
                }
                close_objects(child, depth + 1)?;
            }
        }
        Value::Array(a) => {
            for child in a {
                close_objects(child, depth + 1)?;
            }
        }
        _ => {}
    }
    Ok(())
}

/// The bytes of every token id below `n_vocab` (the model's logits width): byte-level BPE tokens
/// mapped back through GPT-2's byte-to-character table, SentencePiece tokens with `▁` as a space and
/// `<0xAB>` as the byte 0xAB, special and control tokens prefixed with `0xFF`. Ids the tokenizer does
/// not know stay empty (never allowed).
pub fn token_bytes(tokenizer: &Tokenizer, n_vocab: usize) -> Vec<Vec<u8>> {
    let tk = tokenizer.inner();
    let decoder = tk.get_decoder().and_then(|d| serde_json::to_value(d).ok()).unwrap_or(Value::Null);
    let mut byte_level = false;
    let mut spm = false;
    let mut visit = |d: &Value| match d.get("type").and_then(Value::as_str) {
        Some("ByteLevel") => byte_level = true,
        Some("ByteFallback" | "Metaspace") => spm = true,
        Some("Replace") if d.get("content").and_then(Value::as_str) == Some(" ") => spm = true,
        _ => {}
    };
    visit(&decoder);
    for d in decoder.get("decoders").and_then(Value::as_array).into_iter().flatten() {
        visit(d);
    }
    let char_to_byte: HashMap<char, u8> = gpt2_chars().into_iter().enumerate().map(|(b, c)| (c, b as u8)).collect();
    let mut words = vec![Vec::new(); n_vocab];
    for (piece, id) in tk.get_vocab(false) {
        let Some(w) = words.get_mut(id as usize) else { continue };
        *w = if byte_level {
            let mut out = Vec::with_capacity(piece.len());
            for c in piece.chars() {
                match char_to_byte.get(&c) {
                    Some(&b) => out.push(b),
                    None => out.extend_from_slice(c.encode_utf8(&mut [0; 4]).as_bytes()),
                }
            }
            out
        } else if spm {
            match piece.strip_prefix("<0x").and_then(|h| h.strip_suffix('>')).filter(|h| h.len() == 2) {
                Some(hex) => match u8::from_str_radix(hex, 16) {
                    Ok(b) => vec![b],
                    Err(_) => piece.replace('▁', " ").into_bytes(),
                },
                None => piece.replace('▁', " ").into_bytes(),
            }
        } else {
            piece.into_bytes()
        };
    }
    for (id, added) in tk.get_added_tokens_decoder() {
        let Some(w) = words.get_mut(id as usize) else { continue };
        let content = added.content.as_bytes();
        let special = added.special || (content.starts_with(b"<") && content.ends_with(b">") && content.len() > 2);
        w.clear();
        if special {
            w.push(TokTrie::SPECIAL_TOKEN_MARKER);
        }
        w.extend_from_slice(content);
    }
    words
}

/// GPT-2's byte-level table: the character that stands for each byte.
fn gpt2_chars() -> Vec<char> {
    let printable = |b: u32| (0x21..=0x7e).contains(&b) || (0xa1..=0xac).contains(&b) || (0xae..=0xff).contains(&b);
    let mut next = 0x100;
    (0..256u32)
        .map(|b| {
            if printable(b) {
                char::from_u32(b).expect("latin-1")
            } else {
                next += 1;
                char::from_u32(next - 1).expect("below the surrogates")
            }
        })
        .collect()
}

/// Compiles constraints for one model: its vocabulary as llguidance's token trie, with the
/// model's end-of-sequence tokens (allowed once the output is complete).
pub struct ConstraintCompiler {
    factory: Arc<ParserFactory>,
    n_vocab: usize,
    /// The special tokens' texts and ids.
    specials: HashMap<String, u32>,
}

impl std::fmt::Debug for ConstraintCompiler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConstraintCompiler").field("n_vocab", &self.n_vocab).finish()
    }
}

impl ConstraintCompiler {
    /// A compiler over `tokenizer`'s tokens for a model with `n_vocab` logits; `eos` ends a sequence.
    pub fn new(tokenizer: &Tokenizer, n_vocab: usize, eos: &[u32]) -> Result<Self> {
        let words = token_bytes(tokenizer, n_vocab);
        Self::from_token_bytes(&words, eos)
    }

    /// A compiler over a vocabulary given as each token's bytes (special tokens prefixed `0xFF`).
    pub fn from_token_bytes(words: &[Vec<u8>], eos: &[u32]) -> Result<Self> {
        let n_vocab = words.len();
        let eos: Vec<u32> = eos.iter().copied().filter(|&t| (t as usize) < n_vocab).collect();
        let Some(&first) = eos.first() else {
            return Err(Error::Constraint("structured output needs an end-of-sequence token in the vocabulary".into()));
        };
        let build = || -> anyhow::Result<ParserFactory> {
            let trie = TokTrie::from(&TokRxInfo::new(n_vocab as u32, first), words).with_eos_tokens(&eos);
            // Our tokenizer adds prefixes (BOS, a SentencePiece space) that llguidance's forced-token
            // logic must not rely on: masks alone enforce the grammar.
            let env: TokEnv = Arc::new(ApproximateTokEnv::new(trie));
            let mut factory = ParserFactory::new_simple(&env)?;
            factory.quiet();
            *factory.limits_mut() = ParserLimits { verbose_errors: false, ..ParserLimits::default() };
            Ok(factory)
        };
        let factory = std::panic::catch_unwind(std::panic::AssertUnwindSafe(build))
            .map_err(|_| Error::Constraint("the vocabulary could not be prepared for structured output".into()))?
            .map_err(|e| Error::Constraint(format!("the vocabulary could not be prepared for structured output: {e}")))?;
        let specials = words
            .iter()
            .enumerate()
            .filter_map(|(id, w)| {
                Some((std::str::from_utf8(w.strip_prefix(&[TokTrie::SPECIAL_TOKEN_MARKER])?).ok()?.to_string(), id as u32))
            })
            .collect();
        Ok(Self { factory: Arc::new(factory), n_vocab, specials })
    }

    /// The Lark grammar that lets the reasoning section through, then `@answer`.
    fn reasoning_gate(&self, r: &Reasoning) -> Option<String> {
        let (open, close) = match r {
            Reasoning::None => return None,
            Reasoning::Open { close } => (None, close),
            Reasoning::Tagged { open, close } => (Some(open), close),
        };
        let quoted = |t: &str| serde_json::to_string(t).expect("strings serialize");
        // A special closing token cannot come out of free text, so it ends the section; a textual
        // one ends it at its first occurrence (a lazy rule).
        let think = match self.special_ref(close) {
            Some(t) => format!("think: REASONING {t}\n"),
            None => format!("think[lazy]: REASONING {}\n", quoted(close)),
        };
        let start = match open {
            None => "start: think WS @answer\n".to_string(),
            Some(o) => format!("start: @answer | {} think WS @answer\n", self.special_ref(o).unwrap_or_else(|| quoted(o))),
        };
        Some(format!("{start}{think}REASONING: /(.|\\n)*/\nWS: /[ \\t\\n]{{0,4}}/\n"))
    }

    /// How a Lark grammar names `text` when it is one special token of the vocabulary (`<[id]>`;
    /// plain text cannot produce it).
    pub fn special_ref(&self, text: &str) -> Option<String> {
        self.specials.get(text).map(|id| format!("<[{id}]>"))
    }

    /// Compiles `c` into a fresh per-sequence matcher; an invalid or unsupported schema, regex or
    /// grammar is an [`Error::Constraint`] saying what is wrong.
    pub fn compile(&self, c: &Constraint) -> Result<GrammarConstraint> {
        self.compile_with(c, &Reasoning::None)
    }

    /// [`compile`](Self::compile), the constraint applying after the model's reasoning section
    /// (free text up to its closing marker) where `reasoning` says there is one.
    pub fn compile_with(&self, c: &Constraint, reasoning: &Reasoning) -> Result<GrammarConstraint> {
        let mut answer = match c {
            Constraint::JsonSchema(schema) => {
                if !schema.is_object() {
                    return Err(Error::Constraint("a JSON schema must be an object".into()));
                }
                if serde_json::to_vec(&schema).map(|v| v.len()).unwrap_or(0) > MAX_CONSTRAINT_BYTES {
                    return Err(Error::Constraint(format!("the JSON schema is larger than {MAX_CONSTRAINT_BYTES} bytes")));
                }
                GrammarWithLexer::from_json_schema(prepare_schema(schema)?)
            }
            Constraint::JsonObject => {
                let mut schema = serde_json::json!({"type": "object"});
                schema["x-guidance"] = json_options();
                GrammarWithLexer::from_json_schema(schema)
            }
            Constraint::Regex(rx) => {
                check_len("regex", rx.len())?;
                GrammarWithLexer::from_regex(rx)
            }
            Constraint::Choice(choices) => {
                check_len("choice list", choices.iter().map(String::len).sum())?;
                GrammarWithLexer::from_lark(Constraint::choice_lark(choices)?)
            }
            Constraint::Lark(src) => {
                check_len("grammar", src.len())?;
                GrammarWithLexer::from_lark(src.clone())
            }
        };
        let grammar = match self.reasoning_gate(reasoning) {
            None => TopLevelGrammar::from_grammar(answer),
            Some(gate) => {
                answer.name = Some("answer".into());
                TopLevelGrammar { grammars: vec![GrammarWithLexer::from_lark(gate), answer], max_tokens: None }
            }
        };
        let factory = self.factory.clone();
        let kind = c.kind();
        let parser = std::thread::Builder::new()
            .name("infer-grammar".into())
            .stack_size(COMPILE_STACK)
            .spawn(move || {
                std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| factory.create_parser(grammar)))
                    .unwrap_or_else(|_| Err(anyhow::anyhow!("the grammar compiler failed")))
            })
            .map_err(|e| Error::Constraint(format!("cannot start the grammar compiler: {e}")))?
            .join()
            .unwrap_or_else(|_| Err(anyhow::anyhow!("the grammar compiler failed")))
            .map_err(|e| Error::Constraint(format!("invalid {kind}: {}", first_line(&e.to_string()))))?;
        Ok(GrammarConstraint { matcher: Matcher::new(Ok(parser)), n_vocab: self.n_vocab })
    }
}

fn check_len(what: &str, n: usize) -> Result<()> {
    if n > MAX_CONSTRAINT_BYTES {
        return Err(Error::Constraint(format!("the {what} is larger than {MAX_CONSTRAINT_BYTES} bytes")));
    }
    Ok(())
}

/// An error on one line (llguidance's span over several), at most 400 characters.
fn first_line(s: &str) -> String {
    let one: Vec<&str> = s.lines().map(str::trim).filter(|l| !l.is_empty() && !l.chars().all(|c| c == '^' || c == ' ')).collect();
    one.join(" ").chars().take(400).collect()
}

/// JSON as people write it on one line: `{"a": 1, "b": [2, 3]}` (no other whitespace, so a small
/// model cannot loop on newlines).
fn json_options() -> Value {
    serde_json::json!({"item_separator": ", ", "key_separator": ": ", "whitespace_flexible": false})
}

/// One sequence's compiled constraint: llguidance's matcher, advanced token by token.
pub struct GrammarConstraint {
    matcher: Matcher,
    n_vocab: usize,
}

impl GrammarConstraint {
    /// An independent copy in the same state (one per choice of a request).
    pub fn fork(&self) -> Self {
        Self { matcher: self.matcher.deep_clone(), n_vocab: self.n_vocab }
    }
}

impl TokenConstraint for GrammarConstraint {
    fn fill_mask(&mut self, mask: &mut TokenMask) -> Result<()> {
        if let Some(e) = self.matcher.get_error() {
            return Err(Error::Constraint(first_line(&e)));
        }
        // Once the grammar is complete only the end-of-sequence tokens remain.
        let set = self.matcher.compute_mask_or_eos().map_err(|e| Error::Constraint(first_line(&e.to_string())))?;
        let words = mask.words_mut();
        let n = words.len().min(set.as_slice().len());
        words[..n].copy_from_slice(&set.as_slice()[..n]);
        let tail = self.n_vocab % 32;
        if tail != 0 && n == words.len() {
            words[n - 1] &= (1u32 << tail) - 1;
        }
        Ok(())
    }

    fn commit(&mut self, token: u32) -> Result<()> {
        if self.matcher.is_stopped() {
            // The end-of-sequence token after a complete output.
            return Ok(());
        }
        self.matcher.consume_token(token).map_err(|e| Error::Constraint(first_line(&e.to_string())))
    }
}
