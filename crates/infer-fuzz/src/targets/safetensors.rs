//! Hugging Face model folders: `config.json`, the safetensors header (and an optional shard index),
//! `generation_config.json` and `tokenizer_config.json` (which may carry the chat template), loaded
//! with `infer_core::load` exactly as `infer run DIR` does (resolve the folder, parse the config,
//! map the weights, build the model), then what a server does with the loaded model.
//!
//! Seeds: the nine tiny reference models (llama, mistral, qwen2, qwen3, phi3, gemma2, gemma3,
//! mixtral, qwen3_moe), one with a shard index, generation config and tokenizer config. The tokenizer
//! is the fixed fixture one (tokenizer.json has its own target).

use std::path::{Path, PathBuf};

use infer_core::LoadOptions;

use super::{outcome, write_or_remove, Target};
use crate::fixtures;
use crate::mutate::{Input, PartInfo};

pub struct Safetensors {
    work: PathBuf,
    dir: PathBuf,
}

/// The input's parts (file names of a finding).
pub const PARTS: &[&str] =
    &["config.json", "model.safetensors", "generation_config.json", "tokenizer_config.json", "model.safetensors.index.json"];

impl Safetensors {
    pub fn new(work: &Path) -> Result<Self, String> {
        let dir = work.join("model");
        std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        std::fs::write(dir.join("tokenizer.json"), fixtures::TOKENIZER_JSON).map_err(|e| e.to_string())?;
        Ok(Self { work: work.to_path_buf(), dir })
    }
}

/// End of a safetensors file's JSON header (8-byte length, then the header).
fn header_end(st: &[u8]) -> usize {
    match st.get(..8) {
        Some(b) => (u64::from_le_bytes(b.try_into().expect("8 bytes")) as usize).saturating_add(8),
        None => usize::MAX,
    }
}

impl Target for Safetensors {
    fn parts(&self) -> &'static [&'static str] {
        PARTS
    }

    fn part_info(&self, input: &Input) -> Vec<PartInfo> {
        vec![
            super::anywhere(1 << 16),
            // Mutations go to the JSON header rather than the tensor data.
            PartInfo { hot: header_end(&input[1]), max_len: 2 << 20 },
            super::anywhere(1 << 14),
            super::anywhere(1 << 16),
            super::anywhere(1 << 14),
        ]
    }

    fn seeds(&self) -> Vec<Input> {
        let mut out: Vec<Input> =
            fixtures::HF_MODELS.iter().map(|(_, c, st)| vec![c.to_vec(), st.to_vec(), vec![], vec![], vec![]]).collect();
        let (_, c, st) = fixtures::HF_MODELS.iter().find(|(a, _, _)| *a == "qwen2").expect("qwen2 fixture");
        let index = br#"{"metadata": {"total_size": 365000}, "weight_map": {"model.embed_tokens.weight": "model.safetensors", "lm_head.weight": "model.safetensors"}}"#;
        out.push(vec![
            c.to_vec(),
            st.to_vec(),
            fixtures::QWEN2_GENERATION_CONFIG.to_vec(),
            fixtures::QWEN2_TOKENIZER_CONFIG.to_vec(),
            index.to_vec(),
        ]);
        let tc = serde_json::json!({"chat_template": [{"name": "default", "template": fixtures::template("qwen2.5")}, {"name": "tool_use", "template": "{{ messages }}"}],
            "bos_token": {"content": "<s>", "lstrip": false}, "eos_token": "</s>"});
        let (_, c, st) = fixtures::HF_MODELS.iter().find(|(a, _, _)| *a == "llama").expect("llama fixture");
        out.push(vec![
            c.to_vec(),
            st.to_vec(),
            br#"{"eos_token_id": 2, "temperature": 0.6, "top_k": 20}"#.to_vec(),
            tc.to_string().into_bytes(),
            vec![],
        ]);
        out
    }

    fn dictionary(&self) -> Vec<Vec<u8>> {
        let mut d = super::words(&[
            "\"model_type\": \"gemma3_text\"",
            "\"model_type\": \"qwen3_moe\"",
            "\"vocab_size\": ",
            "\"hidden_size\": ",
            "\"intermediate_size\": ",
            "\"num_hidden_layers\": ",
            "\"num_attention_heads\": ",
            "\"num_key_value_heads\": ",
            "\"head_dim\": ",
            "\"max_position_embeddings\": ",
            "\"sliding_window\": ",
            "\"sliding_window_pattern\": ",
            "\"layer_types\": [\"sliding_attention\", \"full_attention\"]",
            "\"rope_scaling\": {\"rope_type\": \"longrope\", \"short_factor\": [1], \"long_factor\": [2]}",
            "\"rope_scaling\": {\"rope_type\": \"llama3\", \"factor\": 0, \"low_freq_factor\": 1, \"high_freq_factor\": 1, \"original_max_position_embeddings\": 0}",
            "\"rope_scaling\": {\"type\": \"linear\", \"factor\": 0}",
            "\"partial_rotary_factor\": ",
            "\"num_local_experts\": ",
            "\"num_experts_per_tok\": ",
            "\"decoder_sparse_step\": 0",
            "\"mlp_only_layers\": [",
            "\"eos_token_id\": [",
            "\"torch_dtype\": \"bfloat16\"",
            "\"tie_word_embeddings\": true",
            "\"use_sliding_window\": true",
            "\"dtype\":\"F16\"",
            "\"dtype\":\"BF16\"",
            "\"dtype\":\"I64\"",
            "\"dtype\":\"F8_E4M3\"",
            "\"shape\":[",
            "\"data_offsets\":[",
            "\"__metadata__\":{\"format\":\"pt\"}",
            "\"weight_map\"",
            "\"../model.safetensors\"",
            "\"chat_template\"",
        ]);
        d.extend(super::words(super::JSON_WORDS));
        d
    }

    fn run(&mut self, input: &Input) -> String {
        for (name, data) in PARTS.iter().zip(input) {
            write_or_remove(&self.dir.join(name), data);
        }
        match infer_core::load(&self.dir.to_string_lossy(), LoadOptions::default()) {
            Ok(m) => super::exercise_loaded(&m),
            r => outcome(&r.map(|_| ()), &self.work),
        }
    }
}
