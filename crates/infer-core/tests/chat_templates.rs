//! Chat templates in the style of each supported family, rendered by transformers'
//! `apply_chat_template` (`tests/fixtures/chat/templates.json`, made by
//! `scripts/make_chat_fixtures.py`): a 3-turn conversation with a system prompt, with and without
//! the generation prompt, must render to the same string; a role order the template refuses must be
//! refused here too.

use infer_core::{ChatMessage, ChatTemplate};
use serde::Deserialize;

#[derive(Deserialize)]
struct Case {
    name: String,
    template: String,
    bos_token: String,
    eos_token: String,
    messages: Vec<ChatMessage>,
    add_generation_prompt: bool,
    expected: Option<String>,
}

#[test]
fn templates_render_as_transformers_does() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/chat/templates.json");
    let cases: Vec<Case> = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    assert!(cases.len() >= 12);
    for c in &cases {
        let t = ChatTemplate::new(&c.template, c.bos_token.clone(), c.eos_token.clone()).unwrap();
        let got = t.render(&c.messages, c.add_generation_prompt);
        match &c.expected {
            Some(want) => assert_eq!(&got.unwrap(), want, "{} (generation prompt: {})", c.name, c.add_generation_prompt),
            None => {
                let err = got.expect_err(&format!("{}: transformers refuses this conversation", c.name)).to_string();
                assert!(err.contains("alternate"), "{}: {err}", c.name);
            }
        }
    }
}
