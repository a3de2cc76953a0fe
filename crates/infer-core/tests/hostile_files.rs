//! Hostile model files, crafted here byte by byte (no committed blobs): each must be one clear error,
//! never a panic, an abort or a hang.

use std::path::{Path, PathBuf};

use infer_core::LoadOptions;

/// A GGUF value.
enum V<'a> {
    U32(u32),
    Str(&'a str),
    Strs(&'a [&'a str]),
}

fn put_str(b: &mut Vec<u8>, s: &str) {
    b.extend_from_slice(&(s.len() as u64).to_le_bytes());
    b.extend_from_slice(s.as_bytes());
}

/// GGUF v3 bytes: metadata, then tensor infos (name, dims, ggml type, offset), then `data` at the
/// alignment (32).
fn gguf(kvs: &[(&str, V)], tensors: &[(&str, &[u64], u32, u64)], data: &[u8]) -> Vec<u8> {
    let mut b = b"GGUF".to_vec();
    b.extend_from_slice(&3u32.to_le_bytes());
    b.extend_from_slice(&(tensors.len() as u64).to_le_bytes());
    b.extend_from_slice(&(kvs.len() as u64).to_le_bytes());
    for (k, v) in kvs {
        put_str(&mut b, k);
        match v {
            V::U32(x) => {
                b.extend_from_slice(&4u32.to_le_bytes());
                b.extend_from_slice(&x.to_le_bytes());
            }
            V::Str(s) => {
                b.extend_from_slice(&8u32.to_le_bytes());
                put_str(&mut b, s);
            }
            V::Strs(list) => {
                b.extend_from_slice(&9u32.to_le_bytes());
                b.extend_from_slice(&8u32.to_le_bytes());
                b.extend_from_slice(&(list.len() as u64).to_le_bytes());
                for s in *list {
                    put_str(&mut b, s);
                }
            }
        }
    }
    for (name, dims, ty, off) in tensors {
        put_str(&mut b, name);
        b.extend_from_slice(&(dims.len() as u32).to_le_bytes());
        for d in *dims {
            b.extend_from_slice(&d.to_le_bytes());
        }
        b.extend_from_slice(&ty.to_le_bytes());
        b.extend_from_slice(&off.to_le_bytes());
    }
    while !b.len().is_multiple_of(32) {
        b.push(0);
    }
    b.extend_from_slice(data);
    b
}

fn write(name: &str, bytes: &[u8]) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("infer-hostile-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let p = dir.join(name);
    std::fs::write(&p, bytes).unwrap();
    p
}

/// Loading fails with an error whose text has every needle (and the call returns: no panic, no abort).
fn refused(path: &Path, needles: &[&str]) {
    let r = std::panic::catch_unwind(|| infer_core::load(path.to_str().unwrap(), LoadOptions::default()));
    let err = match r {
        Ok(Ok(_)) => panic!("{} loaded", path.display()),
        Ok(Err(e)) => e.to_string(),
        Err(_) => panic!("{}: loading panicked", path.display()),
    };
    for n in needles {
        assert!(err.contains(n), "{n:?} not in {err:?}");
    }
}

fn llama_kvs<'a>(layers: u32) -> Vec<(&'a str, V<'a>)> {
    vec![
        ("general.architecture", V::Str("llama")),
        ("llama.block_count", V::U32(layers)),
        ("llama.embedding_length", V::U32(64)),
        ("llama.feed_forward_length", V::U32(128)),
        ("llama.attention.head_count", V::U32(4)),
        ("llama.context_length", V::U32(256)),
        ("tokenizer.ggml.model", V::Str("gpt2")),
        ("tokenizer.ggml.tokens", V::Strs(&["a", "b"])),
        ("tokenizer.ggml.merges", V::Strs(&[])),
    ]
}

#[test]
fn gguf_alignment_zero() {
    let mut kvs = llama_kvs(1);
    kvs.push(("general.alignment", V::U32(0)));
    refused(&write("align0.gguf", &gguf(&kvs, &[], &[])), &["align0.gguf", "not a valid GGUF file"]);
}

#[test]
fn gguf_tensor_without_dimensions_or_with_overflowing_ones() {
    let f32_type = 0;
    let p = write("nodims.gguf", &gguf(&llama_kvs(1), &[("token_embd.weight", &[], f32_type, 0)], &[0; 64]));
    refused(&p, &["nodims.gguf", "token_embd.weight", "impossible dimensions"]);
    let huge: &[u64] = &[1 << 40, 1 << 40];
    let p = write("overflow.gguf", &gguf(&llama_kvs(1), &[("token_embd.weight", huge, f32_type, 0)], &[0; 64]));
    refused(&p, &["overflow.gguf", "token_embd.weight", "impossible dimensions"]);
}

#[test]
fn gguf_huge_block_count() {
    for arch in ["llama", "gemma2", "gemma3"] {
        let mut kvs = llama_kvs(0);
        for (k, v) in kvs.iter_mut() {
            if *k == "general.architecture" {
                *v = V::Str(arch);
            }
        }
        let keys: Vec<String> = ["block_count", "embedding_length", "feed_forward_length", "attention.head_count", "context_length"]
            .iter()
            .map(|k| format!("{arch}.{k}"))
            .collect();
        let vals = [u32::MAX, 64, 128, 4, 256];
        let mut kvs: Vec<(&str, V)> = kvs.into_iter().filter(|(k, _)| !k.starts_with("llama.")).collect();
        for (k, v) in keys.iter().zip(vals) {
            kvs.push((k.as_str(), V::U32(v)));
        }
        let p = write(&format!("layers-{arch}.gguf"), &gguf(&kvs, &[], &[]));
        refused(&p, &["layers", "more than any real model"]);
    }
}

/// config.json values no real model has.
#[test]
fn config_json_out_of_range() {
    let fixtures = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/tiny-llama");
    let cfg = std::fs::read_to_string(fixtures.join("config.json")).unwrap();
    for (i, (from, to, needle)) in [
        ("\"num_hidden_layers\": 2", "\"num_hidden_layers\": 1000000000000000000", "layers"),
        ("\"max_position_embeddings\": ", "\"max_position_embeddings\": 1099511627776, \"x\": ", "max_position_embeddings"),
        ("\"num_hidden_layers\": 2", "\"num_hidden_layers\": 2, \"sliding_window\": 0", "sliding_window"),
    ]
    .into_iter()
    .enumerate()
    {
        assert!(cfg.contains(from), "{from}");
        let dir = std::env::temp_dir().join(format!("infer-hostile-{}-cfg{i}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        for e in std::fs::read_dir(&fixtures).unwrap().flatten() {
            std::fs::copy(e.path(), dir.join(e.file_name())).unwrap();
        }
        std::fs::write(dir.join("config.json"), cfg.replacen(from, to, 1)).unwrap();
        refused(&dir, &["config.json", needle]);
    }
}

/// A SentencePiece vocabulary with one very long token: the merge table is built in linear time
/// (it was quadratic in the token's length: the load hung).
#[test]
fn sentencepiece_vocabulary_with_a_huge_token() {
    let huge = "▁a".repeat(300_000);
    let tokens = ["<unk>", "<s>", "</s>", "▁", "a", "▁a", huge.as_str()];
    let mut kvs = llama_kvs(1);
    kvs.retain(|(k, _)| !k.starts_with("tokenizer."));
    kvs.push(("tokenizer.ggml.model", V::Str("llama")));
    kvs.push(("tokenizer.ggml.tokens", V::Strs(&tokens)));
    kvs.push(("llama.vocab_size", V::U32(tokens.len() as u32)));
    let p = write("huge-token.gguf", &gguf(&kvs, &[], &[]));
    let t0 = std::time::Instant::now();
    // No weights in the file: loading ends at the first missing tensor, after the tokenizer.
    refused(&p, &["huge-token.gguf", "token_embd.weight", "missing"]);
    assert!(t0.elapsed() < std::time::Duration::from_secs(20), "{:?}", t0.elapsed());
}

/// A tokenizer.json with a JSON syntax error inside `decoder` (found by infer-fuzz): `tokenizers`
/// panicked (`expect("Helper")`); now one error naming the file.
#[test]
fn tokenizer_json_with_a_syntax_error_in_the_decoder() {
    let fixtures = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/tiny-llama");
    let tok = std::fs::read_to_string(fixtures.join("tokenizer.json")).unwrap();
    let from = "\"decoder\": {\"type\": \"ByteLevel\", \"add_prefix_space\": true, \"trim_offsets\": true, \"use_regex\"";
    assert!(tok.contains(from), "{from}");
    let broken =
        tok.replacen(from, "\"decoder\": {\"type\": \"ByteLevel\", \"add_prefix_space\": true, \"trim_offsets\": true,  use_regex\"", 1);
    let p = write("tokenizer.json", broken.as_bytes());
    let r = std::panic::catch_unwind(|| infer_core::Tokenizer::from_file(&p));
    let err = match r {
        Ok(Ok(_)) => panic!("the broken tokenizer.json loaded"),
        Ok(Err(e)) => e.to_string(),
        Err(_) => panic!("loading the broken tokenizer.json panicked"),
    };
    assert!(err.contains("tokenizer.json") && err.contains("not a valid tokenizer.json"), "{err}");
}

/// Metadata arrays cost 32-64 bytes per element once read: a 20 MB array of bytes would take about
/// a gigabyte. Refused from a count made before reading (before: read, then failed elsewhere).
#[test]
fn gguf_huge_metadata_array() {
    let mut b = b"GGUF".to_vec();
    b.extend_from_slice(&3u32.to_le_bytes());
    b.extend_from_slice(&0u64.to_le_bytes());
    b.extend_from_slice(&1u64.to_le_bytes());
    put_str(&mut b, "junk.bytes");
    b.extend_from_slice(&9u32.to_le_bytes()); // array
    b.extend_from_slice(&0u32.to_le_bytes()); // of u8
    let n = 20_000_000u64;
    b.extend_from_slice(&n.to_le_bytes());
    b.resize(b.len() + n as usize, 7);
    let path = write("huge-metadata-array.gguf", &b);
    refused(&path, &["20000000 array elements"]);
}

/// Encoder folders that lie: sizes out of range, a tensor of the wrong shape, a truncated weights
/// file, a pooling path leaving the folder, an unsupported family. Each is one error naming the
/// problem (no panic), and an input longer than the positions is refused.
#[test]
fn encoder_folders_out_of_range() {
    use infer_core::encoder::Encoder;
    let fixtures = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/tiny-bert");
    let copy = |i: usize| -> PathBuf {
        let dir = std::env::temp_dir().join(format!("infer-hostile-{}-enc{i}", std::process::id()));
        std::fs::create_dir_all(dir.join("1_Pooling")).unwrap();
        for e in std::fs::read_dir(&fixtures).unwrap().flatten().filter(|e| e.path().is_file()) {
            std::fs::copy(e.path(), dir.join(e.file_name())).unwrap();
        }
        std::fs::copy(fixtures.join("1_Pooling/config.json"), dir.join("1_Pooling/config.json")).unwrap();
        dir
    };
    let cfg = std::fs::read_to_string(fixtures.join("config.json")).unwrap();
    let load = |dir: &Path| -> String {
        match std::panic::catch_unwind(|| Encoder::load(dir, &infer_core::Device::Cpu)) {
            Ok(Ok(_)) => panic!("{} loaded", dir.display()),
            Ok(Err(e)) => e.to_string(),
            Err(_) => panic!("{}: loading panicked", dir.display()),
        }
    };
    for (i, (from, to, needle)) in [
        ("\"num_attention_heads\": 4", "\"num_attention_heads\": 5", "num_attention_heads"),
        ("\"num_hidden_layers\": 2", "\"num_hidden_layers\": 100000000", "out of range"),
        ("\"intermediate_size\": 64", "\"intermediate_size\": 65", "intermediate.dense"),
        ("\"model_type\": \"bert\"", "\"model_type\": \"distilbert\"", "not an encoder this loader supports"),
    ]
    .into_iter()
    .enumerate()
    {
        assert!(cfg.contains(from), "{from}");
        let dir = copy(i);
        std::fs::write(dir.join("config.json"), cfg.replacen(from, to, 1)).unwrap();
        let err = load(&dir);
        assert!(err.contains(needle), "{needle:?} not in {err:?}");
    }
    let dir = copy(10);
    let w = std::fs::read(fixtures.join("model.safetensors")).unwrap();
    std::fs::write(dir.join("model.safetensors"), &w[..w.len() / 2]).unwrap();
    assert!(load(&dir).contains("model.safetensors"));
    let dir = copy(11);
    std::fs::write(dir.join("modules.json"), r#"[{"type": "sentence_transformers.models.Pooling", "path": "../../etc"}]"#).unwrap();
    assert!(load(&dir).contains("leaves the model folder"));
    let enc = Encoder::load(&fixtures, &infer_core::Device::Cpu).unwrap();
    let long = vec![5u32; enc.max_tokens() + 1];
    assert!(enc.embed_ids(&[long]).is_err());
    assert!(enc.embed_ids(&[vec![]]).is_err());
    assert!(enc.embed_ids(&[vec![1_000_000]]).is_err());
}

/// A NomicBERT config claiming a billion layers is refused at once (the loader walks the layers to
/// fuse transformers' q/k/v before building them).
#[test]
fn nomic_config_with_huge_layer_count_is_refused() {
    let src = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/tiny-nomic-bert");
    let dir = std::env::temp_dir().join(format!("infer-hostile-{}-nomic", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for e in std::fs::read_dir(&src).unwrap().flatten().filter(|e| e.path().is_file()) {
        std::fs::copy(e.path(), dir.join(e.file_name())).unwrap();
    }
    let cfg = std::fs::read_to_string(src.join("config.json")).unwrap();
    assert!(cfg.contains("\"n_layer\": 2"));
    std::fs::write(dir.join("config.json"), cfg.replacen("\"n_layer\": 2", "\"n_layer\": 1000000000", 1)).unwrap();
    let t = std::time::Instant::now();
    let err = infer_core::encoder::Encoder::load(&dir, &infer_core::Device::Cpu).err().expect("refused").to_string();
    assert!(err.contains("out of range"), "{err}");
    assert!(t.elapsed() < std::time::Duration::from_secs(5));
    let _ = std::fs::remove_dir_all(&dir);
}
