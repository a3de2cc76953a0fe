//! Extract a typed struct from text: the model's output is constrained to a JSON schema, so serde
//! always parses it.
//!
//! ```sh
//! cargo run --release --example extract -- "$(scripts/fetch-model.sh)"
//! ```

use infer::{ChatMessage, Constraint, ModelBuilder, SamplingParams};
use serde::Deserialize;

/// What we want out of the text.
#[derive(Debug, Deserialize)]
struct Contact {
    name: String,
    city: String,
    age: u32,
    languages: Vec<String>,
}

/// `Contact`'s JSON schema (bounded strings and lists keep a small model's answer short).
fn schema() -> serde_json::Value {
    serde_json::json!({
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 40},
            "city": {"type": "string", "maxLength": 40},
            "age": {"type": "integer", "minimum": 0, "maximum": 130},
            "languages": {"type": "array", "items": {"type": "string", "maxLength": 20}, "maxItems": 5}
        },
        "required": ["name", "city", "age", "languages"]
    })
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let model = std::env::args().nth(1).expect("usage: extract MODEL");
    let text = "Hi, I'm Marta Kowalski, 34, from Krakow. I speak Polish, English and some Spanish.";
    let mut session = ModelBuilder::new(model).ctx_size(2048).build()?;
    let params = SamplingParams { max_tokens: Some(120), constraint: Some(Constraint::JsonSchema(schema())), ..SamplingParams::greedy() };
    let prompt = format!("Extract the person's name, city, age and languages from this text as JSON:\n{text}");
    let json = session.chat(&[ChatMessage::user(prompt)], params)?.text()?;
    let contact: Contact = serde_json::from_str(&json)?;
    println!("{contact:?}");
    eprintln!("{} ({}) lives in {} and speaks {}", contact.name, contact.age, contact.city, contact.languages.join(", "));
    Ok(())
}
