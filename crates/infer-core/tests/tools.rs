//! Tool calling per family: the format recognised from real chat templates
//! (`tests/fixtures/chat/tools/`, see its README), those templates rendering tools, calls and results,
//! model outputs in each family's style parsed into content and calls (streamed byte by byte the same
//! as whole), and the grammars of `tool_choice: required` / a named function accepting exactly calls
//! of the declared tools.

use infer_core::structured::{Constraint, ConstraintCompiler};
use infer_core::tools::{
    generic_system_prompt, parse_tool_choice, parse_tools, tool_grammar, OutputDelta, OutputParser, ThinkMode, ToolChoice, ToolFormat,
};
use infer_core::{ChatMessage, ChatTemplate, TokenConstraint, TokenMask};
use serde_json::{json, Value};

fn template(name: &str) -> String {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/chat/tools").join(name);
    std::fs::read_to_string(path).unwrap()
}

fn weather_tools() -> Vec<Value> {
    vec![
        json!({"type": "function", "function": {"name": "get_weather", "description": "Current weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "unit": {"enum": ["c", "f"]}}, "required": ["city"]}}}),
        json!({"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {"tz": {"type": "string"}}, "required": ["tz"]}}}),
    ]
}

#[test]
fn formats_are_recognised_from_templates() {
    for (file, want) in [
        ("qwen2.5.jinja", ToolFormat::Hermes),
        ("qwen3.jinja", ToolFormat::Hermes),
        ("llama3.3.jinja", ToolFormat::Llama3Json),
        ("mistral-nemo.jinja", ToolFormat::Mistral),
        ("mistral-small-3.1.jinja", ToolFormat::Mistral),
        ("mistral-small-3.2.jinja", ToolFormat::MistralV11),
        ("phi4-mini-llamacpp.jinja", ToolFormat::Phi4Mini),
        ("deepseek-r1-distill-qwen.jinja", ToolFormat::Generic),
    ] {
        assert_eq!(ToolFormat::detect(&template(file)), want, "{file}");
    }
    for name in ToolFormat::NAMES {
        assert_eq!(ToolFormat::from_name(name).unwrap().name(), *name);
    }
}

/// Each template renders a conversation with tools, an assistant call (arguments as a mapping) and
/// a tool result: the tool's name, the call's arguments and the result all reach the prompt.
#[test]
fn templates_render_tools_calls_and_results() {
    let tools = weather_tools();
    for (file, bos, eos) in [
        ("qwen2.5.jinja", "", "<|im_end|>"),
        ("qwen3.jinja", "", "<|im_end|>"),
        ("llama3.3.jinja", "<|begin_of_text|>", "<|eot_id|>"),
        ("mistral-nemo.jinja", "<s>", "</s>"),
        ("mistral-small-3.1.jinja", "<s>", "</s>"),
        ("mistral-small-3.2.jinja", "<s>", "</s>"),
        ("phi4-mini-llamacpp.jinja", "", "<|endoftext|>"),
    ] {
        let t = ChatTemplate::new(&template(file), bos, eos).unwrap();
        let mut call = ChatMessage::assistant("");
        call.tool_calls =
            vec![json!({"id": "abcDEF123", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}})];
        let mut result = ChatMessage::new("tool", "{\"temp\": 21}");
        result.tool_call_id = Some("abcDEF123".into());
        result.name = Some("get_weather".into());
        let conv = vec![ChatMessage::user("Weather in Paris?"), call, result];
        let mut kwargs = serde_json::Map::new();
        kwargs.insert("date_string".into(), json!("02 Dec 2026"));
        let text = t.render_with(&conv, true, &tools, &kwargs).unwrap_or_else(|e| panic!("{file}: {e}"));
        assert!(text.contains("get_weather") && text.contains("get_time"), "{file}: the tools are shown\n{text}");
        assert!(text.contains("Paris") && text.contains("\"city\""), "{file}: the call's arguments\n{text}");
        assert!(text.contains("21"), "{file}: the tool result\n{text}");
    }
}

/// Feeds `text` whole and byte by byte (at every char boundary); both must give the same result,
/// and the deltas must add up to it.
fn parse_both_ways(format: Option<ToolFormat>, think: ThinkMode, text: &str) -> infer_core::tools::ParsedOutput {
    let mut whole = OutputParser::new(format, think);
    whole.push(text);
    let (_, want) = whole.finish();
    let mut p = OutputParser::new(format, think);
    let mut deltas = Vec::new();
    for (i, c) in text.char_indices() {
        deltas.extend(p.push(&text[i..i + c.len_utf8()]));
    }
    let (last, got) = p.finish();
    deltas.extend(last);
    assert_eq!(got.content, want.content, "{text}");
    assert_eq!(got.reasoning, want.reasoning, "{text}");
    assert_eq!(got.calls.len(), want.calls.len(), "{text}");
    let (mut content, mut reasoning) = (String::new(), String::new());
    let mut calls: Vec<(String, String)> = Vec::new();
    for d in deltas {
        match d {
            OutputDelta::Content(t) => content.push_str(&t),
            OutputDelta::Reasoning(t) => reasoning.push_str(&t),
            OutputDelta::CallStart { index, name, .. } => {
                assert_eq!(index, calls.len());
                calls.push((name, String::new()));
            }
            OutputDelta::CallArguments { index, fragment } => calls[index].1.push_str(&fragment),
        }
    }
    if got.calls.is_empty() {
        assert_eq!(content, got.content, "{text}: streamed content");
    } else {
        assert_eq!(content.trim(), got.content.trim(), "{text}: streamed content");
    }
    assert_eq!(reasoning, got.reasoning.clone().unwrap_or_default(), "{text}: streamed reasoning");
    let names: Vec<(String, String)> = got.calls.iter().map(|c| (c.name.clone(), c.arguments.clone())).collect();
    assert_eq!(calls, names, "{text}: streamed calls");
    got
}

fn calls(p: &infer_core::tools::ParsedOutput) -> Vec<(String, Value)> {
    p.calls.iter().map(|c| (c.name.clone(), serde_json::from_str(&c.arguments).unwrap())).collect()
}

#[test]
fn outputs_parse_per_family() {
    let w = |city: &str| ("get_weather".to_string(), json!({"city": city}));
    // Hermes / Qwen: content before, two calls, an unclosed last block.
    let p = parse_both_ways(
        Some(ToolFormat::Hermes),
        ThinkMode::Off,
        "Let me check.\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call>\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Lyon\"}}",
    );
    assert_eq!(p.content.trim(), "Let me check.");
    assert_eq!(calls(&p), vec![w("Paris"), w("Lyon")]);
    // Qwen3 thinking first.
    let p = parse_both_ways(
        Some(ToolFormat::Hermes),
        ThinkMode::Tagged,
        "<think>\nThe user wants weather.\n</think>\n\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Nice\"}}\n</tool_call>",
    );
    assert_eq!(p.reasoning.as_deref().map(str::trim), Some("The user wants weather."));
    assert_eq!(calls(&p), vec![w("Nice")]);
    // Llama 3: the whole reply is the call, "parameters".
    let p =
        parse_both_ways(Some(ToolFormat::Llama3Json), ThinkMode::Off, "{\"name\": \"get_weather\", \"parameters\": {\"city\": \"Rome\"}}");
    assert_eq!(calls(&p), vec![w("Rome")]);
    assert_eq!(p.content, "");
    let p = parse_both_ways(Some(ToolFormat::Llama3Json), ThinkMode::Off, "It is sunny in Rome.");
    assert!(p.calls.is_empty());
    assert_eq!(p.content, "It is sunny in Rome.");
    // Mistral v3 array, with nested arrays in the arguments.
    let p = parse_both_ways(
        Some(ToolFormat::Mistral),
        ThinkMode::Off,
        "[TOOL_CALLS][{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Bern\", \"days\": [[1, 2], [3]]}}, {\"name\": \"get_time\", \"arguments\": {\"tz\": \"CET\"}}]",
    );
    assert_eq!(p.calls.len(), 2);
    assert_eq!(calls(&p)[0].1["days"], json!([[1, 2], [3]]));
    assert_eq!(calls(&p)[1], ("get_time".to_string(), json!({"tz": "CET"})));
    // Mistral v11.
    let p = parse_both_ways(
        Some(ToolFormat::MistralV11),
        ThinkMode::Off,
        "[TOOL_CALLS]get_weather[ARGS]{\"city\": \"Oslo\"}[TOOL_CALLS]get_time[ARGS]{\"tz\": \"UTC\"}",
    );
    assert_eq!(calls(&p), vec![w("Oslo"), ("get_time".to_string(), json!({"tz": "UTC"}))]);
    // Phi-4-mini.
    let p = parse_both_ways(
        Some(ToolFormat::Phi4Mini),
        ThinkMode::Off,
        "<|tool_call|>[{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Kyiv\"}}]<|/tool_call|>",
    );
    assert_eq!(calls(&p), vec![w("Kyiv")]);
    // Generic: calls or a response.
    let p = parse_both_ways(
        Some(ToolFormat::Generic),
        ThinkMode::Off,
        "{\"tool_calls\": [{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Porto\"}}]}",
    );
    assert_eq!(calls(&p), vec![w("Porto")]);
    let p = parse_both_ways(Some(ToolFormat::Generic), ThinkMode::Off, "{\"response\": \"Hello \\\"you\\\" \\u00e9!\"}");
    assert!(p.calls.is_empty());
    assert_eq!(p.content, "Hello \"you\" é!");
    // DeepSeek-R1 style: the prompt opened <think>; no tools.
    let p = parse_both_ways(None, ThinkMode::Open, "Hmm, 2+2.\n</think>\n\nIt is 4.");
    assert_eq!(p.reasoning.as_deref(), Some("Hmm, 2+2.\n"));
    assert_eq!(p.content, "It is 4.");
    // A malformed call is content, as generated.
    // (Streaming has sent the call's start by then: only the whole answer is checked.)
    let bad = "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": }\n</tool_call>";
    let mut whole = OutputParser::new(Some(ToolFormat::Hermes), ThinkMode::Off);
    whole.push(bad);
    let p = whole.finish().1;
    assert!(p.calls.is_empty());
    assert_eq!(p.content, bad);
}

#[test]
fn request_tools_and_choices_are_checked() {
    let tools = parse_tools(&weather_tools()).unwrap();
    assert_eq!(tools.len(), 2);
    let e = parse_tools(&[json!({"type": "function", "function": {"name": "a b"}})]).unwrap_err();
    assert_eq!(e.0, "tools[0].function.name");
    let e = parse_tools(&[json!({"type": "retrieval"})]).unwrap_err();
    assert_eq!(e.0, "tools[0].type");
    assert_eq!(parse_tool_choice(Some(&json!("required")), &tools).unwrap(), ToolChoice::Required);
    assert_eq!(
        parse_tool_choice(Some(&json!({"type": "function", "function": {"name": "get_time"}})), &tools).unwrap(),
        ToolChoice::Named("get_time".into())
    );
    assert!(parse_tool_choice(Some(&json!({"type": "function", "function": {"name": "nope"}})), &tools).is_err());
    assert!(parse_tool_choice(Some(&json!("required")), &[]).is_err());
    assert!(generic_system_prompt(&tools, &ToolChoice::Auto).contains("\"response\""));
}

/// A byte-level vocabulary (every byte a token) plus the formats' markers as special tokens and an
/// end-of-sequence token.
fn byte_vocab() -> (Vec<Vec<u8>>, u32) {
    let mut v: Vec<Vec<u8>> = (0..=255u8).map(|b| vec![b]).collect();
    for m in ["<tool_call>", "</tool_call>", "[TOOL_CALLS]", "[ARGS]", "<|tool_call|>"] {
        let mut w = vec![0xFF];
        w.extend_from_slice(m.as_bytes());
        v.push(w);
    }
    v.push(b"\xFF<eos>".to_vec());
    let eos = (v.len() - 1) as u32;
    (v, eos)
}

/// Whether the grammar accepts `text` (markers as their special tokens) and then allows the end.
fn accepts(compiler: &ConstraintCompiler, vocab: &[Vec<u8>], grammar: &str, text: &str, eos: u32) -> bool {
    accepts_as(compiler, vocab, grammar, text, eos, true)
}

/// [`accepts`], with the markers written as special tokens or byte by byte.
fn accepts_as(compiler: &ConstraintCompiler, vocab: &[Vec<u8>], grammar: &str, text: &str, eos: u32, specials: bool) -> bool {
    let c = compiler.compile(&Constraint::Lark(grammar.to_string())).unwrap_or_else(|e| panic!("{e}\n{grammar}"));
    walks(c, vocab, text, eos, specials)
}

/// Whether constraint `c` allows `text` token by token (markers as their special tokens when
/// `specials`), then the end.
fn walks(mut c: infer_core::GrammarConstraint, vocab: &[Vec<u8>], text: &str, eos: u32, specials: bool) -> bool {
    let mut mask = TokenMask::none(vocab.len());
    let mut rest = text;
    while !rest.is_empty() {
        let special = vocab.iter().position(|w| specials && w.len() > 1 && w[0] == 0xFF && rest.as_bytes().starts_with(&w[1..]));
        let (tok, len) = match special {
            Some(t) => (t as u32, vocab[t].len() - 1),
            None => (rest.as_bytes()[0] as u32, 1),
        };
        mask.clear();
        c.fill_mask(&mut mask).unwrap();
        if !mask.is_allowed(tok) {
            eprintln!("refused at {:?}", &text[..text.len() - rest.len()]);
            return false;
        }
        c.commit(tok).unwrap();
        rest = &rest[len..];
    }
    mask.clear();
    c.fill_mask(&mut mask).unwrap();
    mask.is_allowed(eos)
}

#[test]
fn tool_grammars_accept_exactly_calls_of_the_tools() {
    let (vocab, eos) = byte_vocab();
    let compiler = ConstraintCompiler::from_token_bytes(&vocab, &[eos]).unwrap();
    let special = |t: &str| compiler.special_ref(t);
    let tools = parse_tools(&weather_tools()).unwrap();
    let cases: Vec<(ToolFormat, &str, &str)> = vec![
        (
            ToolFormat::Hermes,
            "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call>",
            "<tool_call>\n{\"name\": \"get_weathers\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call>",
        ),
        (
            ToolFormat::Llama3Json,
            "{\"name\": \"get_time\", \"parameters\": {\"tz\": \"UTC\"}}",
            "{\"name\": \"get_time\", \"parameters\": {\"city\": \"UTC\"}}",
        ),
        (ToolFormat::Mistral, "[TOOL_CALLS][{\"name\": \"get_time\", \"arguments\": {\"tz\": \"UTC\"}}]", "[TOOL_CALLS][]"),
        (ToolFormat::MistralV11, "[TOOL_CALLS]get_time[ARGS]{\"tz\": \"UTC\"}", "[TOOL_CALLS]get_tim[ARGS]{\"tz\": \"UTC\"}"),
        (
            ToolFormat::Phi4Mini,
            "<|tool_call|>[{\"name\": \"get_time\", \"arguments\": {\"tz\": \"UTC\"}}]",
            "<|tool_call|>[{\"name\": \"get_time\"}]",
        ),
        (
            ToolFormat::Generic,
            "{\"tool_calls\": [{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Oslo\", \"unit\": \"c\"}}]}",
            "{\"response\": \"hi\"}",
        ),
    ];
    for (format, good, bad) in cases {
        let g = tool_grammar(format, &tools, &ToolChoice::Required, false, &special).unwrap().unwrap();
        assert!(accepts(&compiler, &vocab, &g, good, eos), "{format:?} should accept {good}\n{g}");
        assert!(!accepts(&compiler, &vocab, &g, bad, eos), "{format:?} should refuse {bad}\n{g}");
    }
    // A named function: only that one.
    let g = tool_grammar(ToolFormat::Hermes, &tools, &ToolChoice::Named("get_time".into()), false, &special).unwrap().unwrap();
    assert!(accepts(&compiler, &vocab, &g, "<tool_call>\n{\"name\": \"get_time\", \"arguments\": {\"tz\": \"UTC\"}}\n</tool_call>", eos));
    assert!(!accepts(
        &compiler,
        &vocab,
        &g,
        "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call>",
        eos
    ));
    // Parallel calls only when allowed.
    let two = "<tool_call>\n{\"name\": \"get_time\", \"arguments\": {\"tz\": \"UTC\"}}\n</tool_call>\n<tool_call>\n{\"name\": \"get_time\", \"arguments\": {\"tz\": \"CET\"}}\n</tool_call>";
    let g1 = tool_grammar(ToolFormat::Hermes, &tools, &ToolChoice::Required, false, &special).unwrap().unwrap();
    let g2 = tool_grammar(ToolFormat::Hermes, &tools, &ToolChoice::Required, true, &special).unwrap().unwrap();
    assert!(!accepts(&compiler, &vocab, &g1, two, eos));
    assert!(accepts(&compiler, &vocab, &g2, two, eos));
    // Generic auto also allows an answer; `none` constrains nothing.
    let g = tool_grammar(ToolFormat::Generic, &tools, &ToolChoice::Auto, true, &special).unwrap().unwrap();
    assert!(accepts(&compiler, &vocab, &g, "{\"response\": \"hi\"}", eos));
    assert!(tool_grammar(ToolFormat::Hermes, &tools, &ToolChoice::None, true, &special).unwrap().is_none());
}

/// `auto`: free text, and calls constrained from their trigger on (a special token, or text).
#[test]
fn auto_tool_grammars_constrain_calls_after_the_trigger() {
    let (vocab, eos) = byte_vocab();
    let compiler = ConstraintCompiler::from_token_bytes(&vocab, &[eos]).unwrap();
    let tools = parse_tools(&weather_tools()).unwrap();
    let good = "<tool_call>\n{\"name\": \"get_time\", \"arguments\": {\"tz\": \"UTC\"}}\n</tool_call>";
    let bad = "<tool_call>\n{\"name\": \"get_times\", \"arguments\": {\"tz\": \"UTC\"}}\n</tool_call>";
    // `<tool_call>` a special token, then written as text (a vocabulary without it).
    let as_token = |t: &str| compiler.special_ref(t);
    let as_text = |_: &str| None;
    for (specials, special) in [(true, &as_token as &dyn Fn(&str) -> Option<String>), (false, &as_text)] {
        let g = tool_grammar(ToolFormat::Hermes, &tools, &ToolChoice::Auto, true, special).unwrap().unwrap();
        let ok = |t: &str| accepts_as(&compiler, &vocab, &g, t, eos, specials);
        assert!(ok("It is sunny in Paris, 21 degrees."), "{g}");
        assert!(ok(""), "{g}");
        assert!(ok(&format!("Let me check.\n{good}")), "{g}");
        assert!(!ok(&format!("Let me check.\n{bad}")), "{g}");
        assert!(!ok(&format!("{good}\n{bad}")), "{g}");
    }
    let g = tool_grammar(ToolFormat::Llama3Json, &tools, &ToolChoice::Auto, false, &as_token).unwrap().unwrap();
    assert!(accepts(&compiler, &vocab, &g, "It is sunny.", eos), "{g}");
    assert!(accepts(&compiler, &vocab, &g, "{\"name\": \"get_time\", \"parameters\": {\"tz\": \"UTC\"}}", eos), "{g}");
    assert!(!accepts(&compiler, &vocab, &g, "{\"name\": \"get_tim\", \"parameters\": {\"tz\": \"UTC\"}}", eos), "{g}");
    let g = tool_grammar(ToolFormat::MistralV11, &tools, &ToolChoice::Auto, true, &as_token).unwrap().unwrap();
    assert!(
        accepts(&compiler, &vocab, &g, "Sure.[TOOL_CALLS]get_time[ARGS]{\"tz\": \"UTC\"}[TOOL_CALLS]get_time[ARGS]{\"tz\": \"CET\"}", eos),
        "{g}"
    );
    assert!(!accepts(&compiler, &vocab, &g, "Sure.[TOOL_CALLS]get_time[ARGS]{\"city\": \"UTC\"}", eos), "{g}");
    assert!(tool_grammar(ToolFormat::Hermes, &tools, &ToolChoice::None, true, &as_token).unwrap().is_none());
}

/// A thinking model: the reasoning section is free, the constraint governs what follows it.
#[test]
fn constraints_apply_after_reasoning() {
    use infer_core::structured::Reasoning;
    let (mut vocab, _) = byte_vocab();
    vocab.pop();
    vocab.push(b"\xFF</think>".to_vec());
    vocab.push(b"\xFF<think>".to_vec());
    vocab.push(b"\xFF<eos>".to_vec());
    let eos = (vocab.len() - 1) as u32;
    let compiler = ConstraintCompiler::from_token_bytes(&vocab, &[eos]).unwrap();
    let schema = Constraint::JsonSchema(json!({"type": "object", "properties": {"a": {"enum": ["b"]}}, "required": ["a"]}));
    let check = |r: Reasoning, text: &str, specials: bool| walks(compiler.compile_with(&schema, &r).unwrap(), &vocab, text, eos, specials);
    let open = || Reasoning::Open { close: "</think>".into() };
    let tagged = || Reasoning::Tagged { open: "<think>".into(), close: "</think>".into() };
    assert!(check(open(), "Hmm, {not json} yet.</think>\n\n{\"a\": \"b\"}", true));
    assert!(!check(open(), "Hmm.</think>\n\nnot json", true));
    assert!(!check(open(), "{\"a\": \"b\"}", true), "the answer comes after the reasoning");
    assert!(check(tagged(), "{\"a\": \"b\"}", true));
    assert!(check(tagged(), "<think>Let me see.</think>\n{\"a\": \"b\"}", true));
    assert!(!check(tagged(), "Let me see.{\"a\": \"b\"}", true));
    assert!(!check(Reasoning::None, "<think>x</think>{\"a\": \"b\"}", true));
    // A vocabulary where `</think>` is text: the section ends at its first occurrence.
    let compiler_text = ConstraintCompiler::from_token_bytes(&byte_vocab().0, &[byte_vocab().1]).unwrap();
    let mut c = compiler_text.compile_with(&schema, &open()).unwrap();
    let mut mask = TokenMask::none(byte_vocab().0.len());
    for b in "Hmm.</think>{\"a\": \"b\"}".bytes() {
        mask.clear();
        c.fill_mask(&mut mask).unwrap();
        assert!(mask.is_allowed(b as u32), "{}", b as char);
        c.commit(b as u32).unwrap();
    }
}

/// Long answers stream right: each token's scan searches only the new text for `</think>` and the
/// call triggers (they used to rescan and copy the whole answer per token, quadratic in its length),
/// including markers cut across tokens and look-alikes (`</thin`, `<tool_cal`) along the way.
#[test]
fn long_outputs_stream_like_whole_ones() {
    let filler: String = (0..3000).map(|i| format!("step {i} </thin k <tool_cal l; ")).collect();
    let text = format!(
        "<think>{filler}</think>\n{filler}<tool_call>\n{{\"name\": \"get_weather\", \"arguments\": {{\"city\": \"Oslo\"}}}}\n</tool_call>"
    );
    let got = parse_both_ways(Some(ToolFormat::Hermes), ThinkMode::Tagged, &text);
    assert_eq!(got.reasoning.as_deref(), Some(filler.as_str()));
    assert_eq!(got.content.trim(), filler.trim());
    assert_eq!(calls(&got), vec![("get_weather".to_string(), serde_json::json!({"city": "Oslo"}))]);
    let plain = parse_both_ways(Some(ToolFormat::MistralV11), ThinkMode::Off, &filler);
    assert_eq!(plain.content, filler);
}
