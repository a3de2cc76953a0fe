//! Load a model and stream an answer with the `infer` library.
//!
//! ```sh
//! cargo run --release --example generate -- "$(scripts/fetch-model.sh)" "What is the capital of France?"
//! ```

use infer::{ChatMessage, ModelBuilder, SamplingParams};

fn main() -> Result<(), infer::Error> {
    let mut args = std::env::args().skip(1);
    let model = args.next().expect("usage: generate MODEL [QUESTION]  (MODEL: a .gguf file, an HF folder or a Hub id)");
    let question = args.next().unwrap_or_else(|| "What is the capital of France? Answer in one sentence.".into());

    let mut session = ModelBuilder::new(model).ctx_size(2048).build()?;
    let params = SamplingParams { max_tokens: Some(64), ..SamplingParams::greedy() };
    let mut stream = session.chat(&[ChatMessage::user(question)], params)?;
    for chunk in stream.by_ref() {
        print!("{}", chunk?.text);
    }
    let stats = stream.stats();
    println!();
    eprintln!("{} prompt tokens, {} generated", stats.prompt_tokens, stats.generated_tokens);
    Ok(())
}
