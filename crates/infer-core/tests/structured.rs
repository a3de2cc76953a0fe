//! Structured output: constraint masks checked by brute force on tiny vocabularies (every allowed token
//! really extends a valid prefix, every such token is allowed), the vocabulary read from the real
//! SmolLM2 tokenizer, and constrained decoding in the engine (alone and batched with free sequences).

mod common;

use infer_core::engine::EngineConfig;
use infer_core::structured::{token_bytes, Constraint, ConstraintCompiler};
use infer_core::{Engine, LoadOptions, SamplingParams, SeqId, Session, TokenConstraint, TokenEvent, TokenMask};

/// A tiny vocabulary: single bytes, a few merges, and an end-of-sequence token (the last).
fn tiny_vocab() -> Vec<Vec<u8>> {
    let mut v: Vec<Vec<u8>> =
        ["a", "b", "1", "2", "{", "}", "\"", ":", ",", " ", "ab", "ba", "12", "\"a", "b\"", "{\"", "\": ", "x", "aba", "\n"]
            .iter()
            .map(|s| s.as_bytes().to_vec())
            .collect();
    v.push(b"\xFF<eos>".to_vec());
    v
}

/// Walks every token sequence (depth-first, up to `depth` tokens) through the constraint and checks
/// each mask against `language`, a finite set of the complete outputs: a text token is allowed iff
/// the text with it is a prefix of some output; end-of-sequence iff the text is an output.
fn check_exhaustively(c: Constraint, language: &[&str], depth: usize) {
    let vocab = tiny_vocab();
    let eos = (vocab.len() - 1) as u32;
    let compiler = ConstraintCompiler::from_token_bytes(&vocab, &[eos]).unwrap();
    let root = compiler.compile(&c).unwrap();
    let mut checked = 0;
    let mut stack = vec![(root, Vec::<u8>::new(), 0usize)];
    while let Some((mut m, text, d)) = stack.pop() {
        let mut mask = TokenMask::none(vocab.len());
        m.fill_mask(&mut mask).unwrap();
        for (t, bytes) in vocab.iter().enumerate() {
            let t = t as u32;
            let want = if t == eos {
                language.iter().any(|s| s.as_bytes() == text.as_slice())
            } else {
                let mut next = text.clone();
                next.extend_from_slice(bytes);
                language.iter().any(|s| s.as_bytes().starts_with(&next))
            };
            assert_eq!(
                mask.is_allowed(t),
                want,
                "{c:?}: after {:?}, token {:?}",
                String::from_utf8_lossy(&text),
                String::from_utf8_lossy(bytes)
            );
            checked += 1;
            if want && t != eos && d < depth {
                let mut child = m.fork();
                child.commit(t).unwrap();
                let mut next = text.clone();
                next.extend_from_slice(bytes);
                stack.push((child, next, d + 1));
            }
        }
    }
    assert!(checked > 100, "{checked}");
}

#[test]
fn choice_masks_match_brute_force() {
    check_exhaustively(Constraint::Choice(vec!["ab12".into(), "a".into(), "ba2b".into(), "{}".into()]), &["ab12", "a", "ba2b", "{}"], 6);
}

#[test]
fn regex_masks_match_brute_force() {
    let mut lang = Vec::new();
    for n in 1..=3 {
        for bits in 0..(1 << n) {
            lang.push((0..n).map(|i| if bits >> i & 1 == 1 { 'b' } else { 'a' }).collect::<String>() + "2");
        }
    }
    let lang: Vec<&str> = lang.iter().map(String::as_str).collect();
    check_exhaustively(Constraint::Regex("[ab]{1,3}2".into()), &lang, 6);
}

#[test]
fn json_schema_masks_match_brute_force() {
    // Objects with exactly the listed key (no other properties: the schema is closed), the enum's
    // values, one line with ": " after keys.
    let schema = serde_json::json!({"type": "object", "properties": {"a": {"enum": ["b", "ab"]}}, "required": ["a"]});
    check_exhaustively(Constraint::JsonSchema(schema), &["{\"a\": \"b\"}", "{\"a\": \"ab\"}"], 12);
}

#[test]
fn bad_constraints_are_errors_that_say_what() {
    let vocab = tiny_vocab();
    let compiler = ConstraintCompiler::from_token_bytes(&vocab, &[(vocab.len() - 1) as u32]).unwrap();
    for (c, want) in [
        (Constraint::Regex("a(".into()), "regex"),
        (Constraint::Lark("start: foo".into()), "grammar"),
        (Constraint::JsonSchema(serde_json::json!({"type": "object", "not": {"type": "string"}})), "not"),
        (Constraint::JsonSchema(serde_json::json!({"type": "strin"})), "JSON schema"),
        (Constraint::JsonSchema(serde_json::json!([1])), "object"),
        (Constraint::Choice(vec![]), "at least one"),
    ] {
        let e = compiler.compile(&c).err().unwrap_or_else(|| panic!("{c:?} compiled"));
        assert!(e.to_string().contains(want), "{c:?}: {e}");
    }
    // Too deep for the compiler's recursion: refused, not a stack overflow.
    let mut deep = serde_json::json!({"type": "string"});
    for _ in 0..120 {
        deep = serde_json::json!({"type": "array", "items": deep});
    }
    let e = compiler.compile(&Constraint::JsonSchema(deep)).err().unwrap();
    assert!(e.to_string().contains("deeper"), "{e}");
}

fn session() -> Option<Session> {
    let path = common::smollm2()?;
    let model = infer_core::load(path.to_str().unwrap(), LoadOptions::default()).unwrap();
    Some(Session::new(model, EngineConfig { max_context: Some(2048), max_seqs: 8, ..Default::default() }).unwrap())
}

/// Our vocabulary as llguidance sees it: every ordinary token's bytes decode, with the tokenizer's
/// own decoder, to the token's text; special tokens are marked.
#[test]
fn smollm2_token_bytes_match_the_tokenizer() {
    let Some(s) = session() else { return };
    let tk = &s.model().tokenizer;
    let n = s.model().model.config().vocab_size;
    let words = token_bytes(tk, n);
    assert_eq!(words.len(), n);
    let mut special = 0;
    for (id, w) in words.iter().enumerate() {
        if w.first() == Some(&0xFF) {
            special += 1;
            continue;
        }
        let text = tk.decode(&[id as u32], false).unwrap();
        if std::str::from_utf8(w).is_ok() {
            assert_eq!(text.as_bytes(), w.as_slice(), "token {id}");
        }
    }
    assert!((3..100).contains(&special), "{special} special tokens");
    let im_end = tk.token_to_id("<|im_end|>").unwrap() as usize;
    assert_eq!(words[im_end], b"\xFF<|im_end|>");
    let space_the = tk.encode(" the", false).unwrap();
    assert_eq!(space_the.len(), 1);
    assert_eq!(words[space_the[0] as usize], b" the");
}

fn run(engine: &mut Engine, ids: &[SeqId]) -> Vec<Vec<TokenEvent>> {
    let mut out: Vec<Vec<TokenEvent>> = vec![Vec::new(); ids.len()];
    let mut steps = 0;
    while engine.has_work() {
        for e in engine.step().unwrap() {
            out[ids.iter().position(|&i| i == e.seq_id).unwrap()].push(e);
        }
        steps += 1;
        assert!(steps < 2000, "the engine does not finish");
    }
    out
}

fn text(events: &[TokenEvent]) -> String {
    events.iter().map(|e| e.text.as_str()).collect()
}

fn tokens(events: &[TokenEvent]) -> Vec<u32> {
    events.iter().map(|e| e.token).collect()
}

/// Constrained and free sequences batched together give the tokens each gives alone (greedy), and
/// every constrained output is valid, with and without masks computed during the forward pass.
#[test]
fn constrained_and_free_sequences_batch_together() {
    let Some(mut s) = session() else { return };
    let schema = serde_json::json!({
        "type": "object",
        "properties": {"name": {"type": "string", "maxLength": 20}, "age": {"type": "integer", "minimum": 0, "maximum": 150}},
        "required": ["name", "age"]
    });
    let cases: Vec<(&str, Option<Constraint>)> = vec![
        ("Describe a person as JSON.", Some(Constraint::JsonSchema(schema))),
        ("Tell me a short story.", None),
        ("Is the sky blue? Answer yes or no.", Some(Constraint::Choice(vec!["yes".into(), "no".into()]))),
        ("Give me a phone number.", Some(Constraint::Regex(r"\d{3}-\d{4}".into()))),
        ("What is 2+2?", None),
    ];
    let prompts: Vec<Vec<u32>> = cases.iter().map(|(p, _)| s.chat_prompt(&[infer_core::ChatMessage::user(*p)]).unwrap()).collect();
    let params = |c: &Option<Constraint>| SamplingParams { max_tokens: Some(48), constraint: c.clone(), ..SamplingParams::greedy() };
    let engine = s.engine();
    let mut alone = Vec::new();
    for (p, (_, c)) in prompts.iter().zip(&cases) {
        let id = engine.add_request(p.clone(), params(c)).unwrap();
        alone.push(run(engine, &[id]).remove(0));
    }
    let ids: Vec<SeqId> = prompts.iter().zip(&cases).map(|(p, (_, c))| engine.add_request(p.clone(), params(c)).unwrap()).collect();
    let together = run(engine, &ids);
    for i in 0..cases.len() {
        assert_eq!(tokens(&together[i]), tokens(&alone[i]), "case {i}: batched vs alone");
    }
    let person: serde_json::Value = serde_json::from_str(&text(&alone[0])).unwrap_or_else(|e| panic!("{e}: {}", text(&alone[0])));
    assert!(person["name"].is_string() && person["age"].as_u64().is_some_and(|a| a <= 150), "{person}");
    assert_eq!(person.as_object().unwrap().len(), 2, "{person}");
    assert!(["yes", "no"].contains(&text(&alone[2]).as_str()), "{}", text(&alone[2]));
    assert!(regex::Regex::new(r"^\d{3}-\d{4}$").unwrap().is_match(&text(&alone[3])), "{}", text(&alone[3]));
    for i in [0, 2, 3] {
        assert_eq!(alone[i].last().unwrap().finish, Some(infer_core::FinishReason::Stop), "case {i} ends when its output is complete");
    }
}

/// At temperature 1, 20 samples of each constraint are all valid.
#[test]
fn sampled_outputs_are_valid() {
    let Some(mut s) = session() else { return };
    let schema = serde_json::json!({
        "type": "object",
        "properties": {
            "city": {"type": "string", "maxLength": 30},
            "temperature": {"type": "number"},
            "unit": {"enum": ["celsius", "fahrenheit"]},
            "tags": {"type": "array", "items": {"type": "string", "maxLength": 10}, "maxItems": 3}
        },
        "required": ["city", "unit"]
    });
    let prompt = s.chat_prompt(&[infer_core::ChatMessage::user("What is the weather in Paris? Reply in JSON.")]).unwrap();
    let engine = s.engine();
    let mut ids = Vec::new();
    let mut kinds = Vec::new();
    for seed in 0..20u64 {
        for (k, c) in [Constraint::JsonSchema(schema.clone()), Constraint::Regex(r"(sunny|rainy|cloudy), [0-9]{1,2} degrees".into())]
            .into_iter()
            .enumerate()
        {
            let params = SamplingParams {
                temperature: 1.0,
                top_k: 0,
                top_p: 1.0,
                min_p: 0.0,
                seed: Some(seed),
                max_tokens: Some(120),
                constraint: Some(c),
                ..Default::default()
            };
            ids.push(engine.add_request(prompt.clone(), params).unwrap());
            kinds.push(k);
        }
    }
    let out = run(engine, &ids);
    let rx = regex::Regex::new(r"^(sunny|rainy|cloudy), [0-9]{1,2} degrees$").unwrap();
    for (o, k) in out.iter().zip(kinds) {
        let t = text(o);
        if o.last().unwrap().finish == Some(infer_core::FinishReason::Length) {
            continue; // cut by max_tokens: a prefix, checked by the masks' own test
        }
        if k == 0 {
            let v: serde_json::Value = serde_json::from_str(&t).unwrap_or_else(|e| panic!("{e}: {t}"));
            let o = v.as_object().unwrap();
            assert!(o["city"].is_string() && ["celsius", "fahrenheit"].contains(&o["unit"].as_str().unwrap()), "{t}");
            assert!(o.keys().all(|k| ["city", "temperature", "unit", "tags"].contains(&k.as_str())), "{t}");
        } else {
            assert!(rx.is_match(&t), "{t}");
        }
    }
    let finished = out.iter().filter(|o| o.last().unwrap().finish == Some(infer_core::FinishReason::Stop)).count();
    assert!(finished >= 30, "{finished} of 40 outputs complete");
}

/// Schema features agents use: `$ref` into `$defs`, `anyOf`, integer and number bounds, `const`,
/// nested arrays; 10 samples at temperature 1 all follow them.
#[test]
fn refs_anyof_and_bounds_are_followed() {
    let Some(mut s) = session() else { return };
    let schema = serde_json::json!({
        "$defs": {
            "item": {"type": "object", "properties": {"sku": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{2}$"}, "qty": {"type": "integer", "minimum": 1, "maximum": 9}}, "required": ["sku", "qty"]}
        },
        "type": "object",
        "properties": {
            "kind": {"const": "order"},
            "items": {"type": "array", "items": {"$ref": "#/$defs/item"}, "minItems": 1, "maxItems": 3},
            "total": {"anyOf": [{"type": "number", "minimum": 0, "maximum": 1000}, {"type": "null"}]}
        },
        "required": ["kind", "items", "total"]
    });
    let prompt = s.chat_prompt(&[infer_core::ChatMessage::user("Write an order as JSON.")]).unwrap();
    let engine = s.engine();
    let ids: Vec<SeqId> = (0..10u64)
        .map(|seed| {
            let params = SamplingParams {
                temperature: 1.0,
                seed: Some(seed),
                max_tokens: Some(150),
                constraint: Some(Constraint::JsonSchema(schema.clone())),
                ..Default::default()
            };
            engine.add_request(prompt.clone(), params).unwrap()
        })
        .collect();
    let sku = regex::Regex::new(r"^[A-Z]{3}-[0-9]{2}$").unwrap();
    let mut complete = 0;
    for o in run(engine, &ids) {
        if o.last().unwrap().finish != Some(infer_core::FinishReason::Stop) {
            continue;
        }
        complete += 1;
        let t = text(&o);
        let v: serde_json::Value = serde_json::from_str(&t).unwrap_or_else(|e| panic!("{e}: {t}"));
        assert_eq!(v["kind"], "order", "{t}");
        let items = v["items"].as_array().unwrap();
        assert!((1..=3).contains(&items.len()), "{t}");
        for it in items {
            assert!(sku.is_match(it["sku"].as_str().unwrap()), "{t}");
            assert!((1..=9).contains(&it["qty"].as_i64().unwrap()), "{t}");
        }
        assert!(v["total"].is_null() || (0.0..=1000.0).contains(&v["total"].as_f64().unwrap()), "{t}");
    }
    assert!(complete >= 8, "{complete} of 10 complete");
}
