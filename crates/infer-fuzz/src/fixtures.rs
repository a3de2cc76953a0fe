//! The repository's test fixtures compiled into the fuzzer (so the binary runs anywhere): the tiny
//! reference models (config.json, safetensors, GGUF, tokenizer.json) and the real chat templates.

macro_rules! fixture {
    ($path:literal) => {
        include_bytes!(concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/fixtures/", $path))
    };
}
macro_rules! fixture_str {
    ($path:literal) => {
        include_str!(concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/fixtures/", $path))
    };
}

/// The byte-level BPE tokenizer every tiny model shares (256 tokens).
pub const TOKENIZER_JSON: &[u8] = fixture!("tiny-llama/tokenizer.json");

/// (architecture, config.json, model.safetensors) of each tiny HF model.
pub const HF_MODELS: &[(&str, &[u8], &[u8])] = &[
    ("llama", fixture!("tiny-llama/config.json"), fixture!("tiny-llama/model.safetensors")),
    ("mistral", fixture!("tiny-mistral/config.json"), fixture!("tiny-mistral/model.safetensors")),
    ("qwen2", fixture!("tiny-qwen2/config.json"), fixture!("tiny-qwen2/model.safetensors")),
    ("qwen3", fixture!("tiny-qwen3/config.json"), fixture!("tiny-qwen3/model.safetensors")),
    ("phi3", fixture!("tiny-phi3/config.json"), fixture!("tiny-phi3/model.safetensors")),
    ("gemma2", fixture!("tiny-gemma2/config.json"), fixture!("tiny-gemma2/model.safetensors")),
    ("gemma3", fixture!("tiny-gemma3/config.json"), fixture!("tiny-gemma3/model.safetensors")),
    ("mixtral", fixture!("tiny-mixtral/config.json"), fixture!("tiny-mixtral/model.safetensors")),
    ("qwen3_moe", fixture!("tiny-qwen3-moe/config.json"), fixture!("tiny-qwen3-moe/model.safetensors")),
];

pub const QWEN2_GENERATION_CONFIG: &[u8] = fixture!("tiny-qwen2/generation_config.json");
pub const QWEN2_TOKENIZER_CONFIG: &[u8] = fixture!("tiny-qwen2/tokenizer_config.json");

/// (architecture, model-f16.gguf) of each tiny GGUF model (written by gguf-py, with a BPE tokenizer).
pub const GGUF_MODELS: &[(&str, &[u8])] = &[
    ("qwen3", fixture!("tiny-qwen3/model-f16.gguf")),
    ("phi3", fixture!("tiny-phi3/model-f16.gguf")),
    ("gemma2", fixture!("tiny-gemma2/model-f16.gguf")),
    ("gemma3", fixture!("tiny-gemma3/model-f16.gguf")),
    ("mixtral", fixture!("tiny-mixtral/model-f16.gguf")),
    ("qwen3moe", fixture!("tiny-qwen3-moe/model-f16.gguf")),
];

/// Real chat templates (name, source), with tool calling and reasoning.
pub const TEMPLATES: &[(&str, &str)] = &[
    ("deepseek-r1-distill-qwen", fixture_str!("chat/tools/deepseek-r1-distill-qwen.jinja")),
    ("llama3.3", fixture_str!("chat/tools/llama3.3.jinja")),
    ("mistral-nemo", fixture_str!("chat/tools/mistral-nemo.jinja")),
    ("mistral-small-3.1", fixture_str!("chat/tools/mistral-small-3.1.jinja")),
    ("mistral-small-3.2", fixture_str!("chat/tools/mistral-small-3.2.jinja")),
    ("phi4-mini-llamacpp", fixture_str!("chat/tools/phi4-mini-llamacpp.jinja")),
    ("phi4-mini", fixture_str!("chat/tools/phi4-mini.jinja")),
    ("qwen2.5", fixture_str!("chat/tools/qwen2.5.jinja")),
    ("qwen3", fixture_str!("chat/tools/qwen3.jinja")),
];

/// `tests/fixtures/chat/templates.json`: templates with their messages and expected renders.
pub const TEMPLATE_CASES: &str = fixture_str!("chat/templates.json");

/// The template named `name` in [`TEMPLATES`].
pub fn template(name: &str) -> &'static str {
    TEMPLATES.iter().find(|(n, _)| *n == name).map(|(_, s)| *s).expect("a fixture template")
}
