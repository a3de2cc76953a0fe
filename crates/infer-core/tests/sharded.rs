//! A model split into safetensors shards with `model.safetensors.index.json` loads through the folder
//! loader and gives the same logits as the single-file original.

mod common;

use std::collections::HashMap;

use infer_core::kv_cache::PagedKvCache;
use infer_core::models::{BatchInput, LogitsWanted};
use infer_core::{Device, LoadOptions};

fn logits(dir: &std::path::Path) -> Vec<Vec<f32>> {
    let m = infer_core::load(dir.to_str().unwrap(), LoadOptions::default()).unwrap();
    let mut cache = PagedKvCache::new(m.config(), 4, 8).unwrap();
    let mut table = Vec::new();
    cache.reserve(&mut table, 6).unwrap();
    let mut batch = BatchInput::default();
    batch.push_sequence(&[5, 17, 99, 3, 250, 42], 0, &table, 4, LogitsWanted::All);
    m.model.forward(&batch, &mut cache).unwrap().to_vec2().unwrap()
}

#[test]
fn sharded_safetensors_load_like_one_file() {
    let src = common::fixture("tiny-llama");
    let dir = std::env::temp_dir().join(format!("infer-sharded-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    for f in ["config.json", "tokenizer.json"] {
        std::fs::copy(src.join(f), dir.join(f)).unwrap();
    }
    let all = candle_core::safetensors::load(src.join("model.safetensors"), &Device::Cpu).unwrap();
    let (mut a, mut b) = (HashMap::new(), HashMap::new());
    let mut weight_map = serde_json::Map::new();
    for (i, (name, t)) in all.into_iter().enumerate() {
        let file = if i % 2 == 0 { "model-00001-of-00002.safetensors" } else { "model-00002-of-00002.safetensors" };
        weight_map.insert(name.clone(), file.into());
        if i % 2 == 0 {
            a.insert(name, t)
        } else {
            b.insert(name, t)
        };
    }
    candle_core::safetensors::save(&a, dir.join("model-00001-of-00002.safetensors")).unwrap();
    candle_core::safetensors::save(&b, dir.join("model-00002-of-00002.safetensors")).unwrap();
    let index = serde_json::json!({ "metadata": {}, "weight_map": weight_map });
    std::fs::write(dir.join("model.safetensors.index.json"), index.to_string()).unwrap();
    assert_eq!(logits(&dir), logits(&src));

    // A shard named by the index but absent: a clear error naming it.
    std::fs::remove_file(dir.join("model-00002-of-00002.safetensors")).unwrap();
    let err = infer_core::load(dir.to_str().unwrap(), LoadOptions::default()).unwrap_err().to_string();
    assert!(err.contains("model-00002-of-00002.safetensors") && err.contains("missing"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}
