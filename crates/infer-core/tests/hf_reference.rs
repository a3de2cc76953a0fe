//! Logits of tiny random Llama / Mistral / Qwen2 models against HF transformers' (fixtures made by
//! `scripts/make_hf_fixtures.py`), for ragged batches that mix prefill chunks and decode steps.

use std::path::PathBuf;

use infer_core::config::ModelConfig;
use infer_core::kv_cache::PagedKvCache;
use std::sync::Arc;

use infer_core::models::{BatchInput, CausalLm, LogitsWanted};
use infer_core::weights::WeightSource;
use infer_core::{DType, Device};
use serde::Deserialize;

#[derive(Deserialize)]
struct Expected {
    prompts: Vec<Vec<u32>>,
    continuations: Vec<Vec<u32>>,
    prefill_logits: Vec<Vec<Vec<f32>>>,
    decode_logits: Vec<Vec<Vec<f32>>>,
}

/// The device under test: the CPU, or `INFER_TEST_DEVICE=cuda` (the same checks on a GPU).
fn device() -> Device {
    match std::env::var("INFER_TEST_DEVICE").as_deref() {
        Ok("cuda") => Device::new_cuda(0).expect("INFER_TEST_DEVICE=cuda needs a GPU and a cuda build"),
        _ => Device::Cpu,
    }
}

/// The kernels under test: the defaults, or (for comparisons on a GPU, as the CLI maps them)
/// `INFER_TENSOR_PATH=1` (candle ops everywhere), `INFER_CUDA_UNFUSED=1`, `INFER_CUDA_GRAPH=0`,
/// `INFER_CUDA_PDL=0`.
fn kernels() -> infer_core::KernelChoice {
    // The CLI's reading: set and not "0" turns a switch on; "0" turns a default off.
    let on = |name: &str| std::env::var_os(name).is_some_and(|v| !v.is_empty() && v != "0");
    let off = |name: &str| std::env::var_os(name).is_some_and(|v| v == "0");
    infer_core::KernelChoice {
        tensor_path: on("INFER_TENSOR_PATH"),
        cuda_unfused: on("INFER_CUDA_UNFUSED"),
        cuda_no_graph: off("INFER_CUDA_GRAPH"),
        cuda_no_pdl: off("INFER_CUDA_PDL"),
        ..Default::default()
    }
}

/// A cache on the device under test (f32, as the fixtures' weights).
fn cache(model: &dyn CausalLm, block_size: usize, blocks: usize) -> PagedKvCache {
    PagedKvCache::new_on(model.config(), block_size, blocks, &device(), DType::F32).unwrap()
}

/// `tests/fixtures/NAME` (`INFER_FIXTURES` points elsewhere, e.g. for a test binary run on another machine).
fn fixture(name: &str) -> PathBuf {
    let dir = std::env::var_os("INFER_FIXTURES").map(PathBuf::from);
    dir.unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")).join(name)
}

fn load(name: &str, dtype: DType) -> (Arc<dyn CausalLm>, Expected) {
    load_quantized(name, dtype, None)
}

fn load_quantized(name: &str, dtype: DType, q: Option<infer_core::Quantize>) -> (Arc<dyn CausalLm>, Expected) {
    let dir = fixture(name);
    let cfg = ModelConfig::from_hf_file(&dir.join("config.json")).unwrap();
    let w = WeightSource::safetensors(vec![dir.join("model.safetensors")], dtype, device())
        .unwrap()
        .with_kernels(kernels())
        .with_quantize(q)
        .unwrap();
    let model = infer_core::models::load(cfg, &w, &mut |_, _| {}).unwrap();
    let exp: Expected = serde_json::from_str(&std::fs::read_to_string(dir.join("expected.json")).unwrap()).unwrap();
    (model, exp)
}

/// Feeds each sequence's tokens (prompt then continuation) following `schedule(step, seq) -> how many
/// tokens this step`, all sequences of a step in one ragged batch, and checks every position's logits.
fn run_schedule(name: &str, block_size: usize, tol: f32, schedule: &dyn Fn(usize, usize) -> usize) -> usize {
    let (model, exp) = load(name, DType::F32);
    check_schedule(model.as_ref(), &exp, name, block_size, tol, schedule)
}

fn check_schedule(
    model: &dyn CausalLm,
    exp: &Expected,
    name: &str,
    block_size: usize,
    tol: f32,
    schedule: &dyn Fn(usize, usize) -> usize,
) -> usize {
    let mut cache = PagedKvCache::new_on(model.config(), block_size, 64, &device(), DType::F32).unwrap();
    let n = exp.prompts.len();
    let full: Vec<Vec<u32>> = (0..n).map(|i| [exp.prompts[i].clone(), exp.continuations[i].clone()].concat()).collect();
    let want: Vec<Vec<Vec<f32>>> = (0..n).map(|i| [exp.prefill_logits[i].clone(), exp.decode_logits[i].clone()].concat()).collect();
    let mut fed = vec![0usize; n];
    let mut tables = vec![Vec::new(); n];
    let mut checked = 0;
    let mut worst = 0f32;
    for step in 0.. {
        if (0..n).all(|i| fed[i] == full[i].len()) {
            break;
        }
        assert!(step < 100, "schedule does not finish");
        let mut batch = BatchInput::default();
        let mut rows = Vec::new();
        for i in 0..n {
            let k = schedule(step, i).min(full[i].len() - fed[i]);
            if k == 0 {
                continue;
            }
            cache.reserve(&mut tables[i], fed[i] + k).unwrap();
            batch.push_sequence(&full[i][fed[i]..fed[i] + k], fed[i], &tables[i], block_size, LogitsWanted::All);
            rows.extend((fed[i]..fed[i] + k).map(|p| (i, p)));
            fed[i] += k;
        }
        if rows.is_empty() {
            continue;
        }
        let logits = model.forward(&batch, &mut cache).unwrap().to_vec2::<f32>().unwrap();
        for (row, &(seq, pos)) in rows.iter().enumerate() {
            for (a, b) in logits[row].iter().zip(&want[seq][pos]) {
                let d = (a - b).abs();
                worst = worst.max(d);
                assert!(d <= tol, "{name}: sequence {seq} position {pos}: {a} vs transformers {b} (|diff| {d} > {tol})");
            }
            checked += 1;
        }
    }
    eprintln!("{name}: {checked} positions, max |diff| {worst:e}");
    checked
}

/// Fixtures that also have a `model-f16.gguf`.
const GGUF_FIXTURES: &[&str] = &["tiny-qwen3", "tiny-phi3", "tiny-gemma2", "tiny-gemma3", "tiny-mixtral", "tiny-qwen3-moe"];

const ARCHS: [&str; 9] =
    ["tiny-llama", "tiny-mistral", "tiny-qwen2", "tiny-qwen3", "tiny-phi3", "tiny-gemma2", "tiny-gemma3", "tiny-mixtral", "tiny-qwen3-moe"];

#[test]
fn ragged_prefill_then_batched_decode_matches_transformers() {
    for name in ARCHS {
        // Step 0: every prompt whole (ragged lengths); then one decode token per sequence per step.
        let positions = run_schedule(name, 4, 1e-4, &|step, _| if step == 0 { usize::MAX } else { 1 });
        assert_eq!(positions, 5 + 11 + 3 + 8 + 4 * 3);
    }
}

/// GGUF copies written with llama.cpp's naming (`scripts/make_gguf_fixtures.py`: F16 weights, F32
/// norms, a byte vocabulary) load through the whole GGUF path and give transformers' logits within
/// the F16 tolerance.
#[test]
fn gguf_files_match_transformers() {
    for &name in GGUF_FIXTURES {
        let dir = fixture(name);
        let opts = infer_core::LoadOptions { device: device(), kernels: kernels(), ..Default::default() };
        let loaded = infer_core::load(dir.join("model-f16.gguf").to_str().unwrap(), opts).unwrap();
        let (_, exp) = load(name, DType::F32);
        let positions = check_schedule(loaded.model.as_ref(), &exp, &format!("{name} (GGUF F16)"), 4, 0.05, &|step, _| {
            if step == 0 {
                usize::MAX
            } else {
                1
            }
        });
        assert_eq!(positions, 5 + 11 + 3 + 8 + 4 * 3);
        assert_eq!(loaded.tokenizer.encode("ab", false).unwrap(), vec![97, 98], "byte vocabulary");
    }
}

#[test]
fn chunked_prefill_mixed_with_decode_matches_transformers() {
    for name in ARCHS {
        // Sequences start at different steps and feed 3 tokens at a time, so prefill chunks and decode
        // steps of different sequences share batches; block size 2 scatters every sequence over many blocks.
        run_schedule(name, 2, 1e-4, &|step, seq| if step >= seq { 3 } else { 0 });
        // Odd chunking: sequence i feeds i+1 tokens per step.
        run_schedule(name, 16, 1e-4, &|_, seq| seq + 1);
    }
}

/// Largest |logit − transformers' logit| over every position of prompt 1, prefilled whole.
fn prompt1_max_diff(model: &dyn CausalLm, exp: &Expected) -> f32 {
    let mut cache = cache(model, 16, 8);
    let mut table = Vec::new();
    cache.reserve(&mut table, exp.prompts[1].len()).unwrap();
    let mut batch = BatchInput::default();
    batch.push_sequence(&exp.prompts[1], 0, &table, 16, LogitsWanted::All);
    let logits = model.forward(&batch, &mut cache).unwrap().to_vec2::<f32>().unwrap();
    let mut worst = 0f32;
    for (row, want) in logits.iter().zip(&exp.prefill_logits[1]) {
        for (a, b) in row.iter().zip(want) {
            worst = worst.max((a - b).abs());
        }
    }
    worst
}

#[test]
fn half_precision_weights_stay_close() {
    // bf16/f16 compute is lossy: check the logits (spread of a few units) stay near transformers' f32
    // values, within a bound scaled to each format's precision (f16: 11-bit, bf16: 8-bit mantissa).
    for (dtype, tol) in [(DType::F16, 0.05), (DType::BF16, 0.4)] {
        let (model, exp) = load("tiny-llama", dtype);
        let worst = prompt1_max_diff(model.as_ref(), &exp);
        eprintln!("{dtype:?}: max |diff| {worst}");
        assert!(worst < tol, "{dtype:?}: max |diff| {worst} >= {tol}");
    }
}

#[test]
fn in_situ_quantized_weights_stay_close() {
    // `--quantize`: the tiny models' f32 linear weights quantized at load and run by the CPU kernels.
    // Bounds relative to the largest reference logit of the prompt (6-16 on these random models),
    // measured: Q8_0 (8-bit weights and activations, like bf16's 8-bit mantissa) 3.7-8.8% of it
    // (bf16 gives 0.21 = 3.7% on tiny-llama), bound 15%; Q4_0 (4-bit weights of random networks)
    // 36-80% (Gemma 2's final soft-cap keeps its logits small), bound 100%. Q4_K needs rows of 256
    // values: these 64-wide models keep their weights dense.
    // Not the MoE models: quantization error can flip a near-tie in the routing (another expert),
    // so their logits are not expected to stay close.
    // Every model and format is measured before any assertion, so one run (on a GPU machine, say)
    // shows the whole picture.
    let mut failures = Vec::new();
    for name in ARCHS.into_iter().filter(|n| !n.contains("mixtral") && !n.contains("moe")) {
        for (q, rel) in [(infer_core::Quantize::Q8_0, 0.15), (infer_core::Quantize::Q4_0, 1.0), (infer_core::Quantize::Q4K, 0.0)] {
            let (model, exp) = load_quantized(name, DType::F32, Some(q));
            let worst = prompt1_max_diff(model.as_ref(), &exp);
            let mag = exp.prefill_logits[1].iter().flatten().fold(0f32, |m, v| m.max(v.abs()));
            let tol = if rel > 0.0 { rel * mag } else { 1e-4 };
            eprintln!("{name} {q:?}: max |diff| {worst} ({:.1}% of the largest logit {mag})", 100.0 * worst / mag);
            if worst.is_nan() || worst >= tol {
                failures.push(format!("{name} {q:?}: max |diff| {worst} >= {tol}"));
            }
            if q != infer_core::Quantize::Q4K && worst <= 1e-6 {
                failures.push(format!("{name} {q:?}: no quantization error at all — were the weights quantized?"));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn whole_prompts_in_one_block_match_transformers() {
    // Every prompt prefilled whole into blocks of 16 (the longest, 11 tokens, fits one block; Mistral's
    // window of 4 then cuts inside a block), then decoded; the other tests use blocks of 2 and 4.
    for name in ARCHS {
        let positions = run_schedule(name, 16, 1e-4, &|step, _| if step == 0 { usize::MAX } else { 1 });
        assert_eq!(positions, 5 + 11 + 3 + 8 + 4 * 3);
    }
}

/// Decoder embeddings (last-token and mean pooling, L2-normalized) of token-id inputs, several per
/// forward pass, against HF transformers' `last_hidden_state` (tests/fixtures/embeddings.json from
/// scripts/make_embedding_refs.py): cosine ≥ 0.9999 for every vector, in f32.
#[test]
fn embeddings_match_transformers() {
    use infer_core::embeddings::{embed, Pooling};
    let refs: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(fixture("embeddings.json")).unwrap()).unwrap();
    let inputs: Vec<Vec<u32>> = serde_json::from_value(refs["inputs"].clone()).unwrap();
    // The safetensors folders (f32, candle's tensor path) and, where the fixture has one, the f16
    // GGUF llama.cpp's conventions make of it (infer's host path).
    let mut models = Vec::new();
    for (name, want) in refs["models"].as_object().unwrap() {
        models.push((name.clone(), fixture(name), want));
        let gguf = fixture(name).join("model-f16.gguf");
        if gguf.exists() {
            models.push((format!("{name} (f16 GGUF)"), gguf, want));
        }
    }
    for (name, path, want) in models {
        let m = infer_core::load(path.to_str().unwrap(), infer_core::LoadOptions::default()).unwrap();
        for (pooling, key) in [(Pooling::Last, "last"), (Pooling::Mean, "mean")] {
            let got = embed(m.model.as_ref(), &inputs, pooling, true).unwrap();
            let want: Vec<Vec<f32>> = serde_json::from_value(want[key].clone()).unwrap();
            assert_eq!(got.len(), want.len());
            for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                assert_eq!(g.len(), w.len());
                let cos: f64 = g.iter().zip(w).map(|(a, b)| *a as f64 * *b as f64).sum();
                assert!(cos >= 0.9999, "{name} {key} pooling, input {i}: cosine {cos}");
            }
            // One input at a time gives the same vectors as the batch, and so do long inputs
            // taken in chunks of 5 tokens (earlier chunks in the cache).
            let alone = embed(m.model.as_ref(), &inputs[1..2], pooling, true).unwrap();
            let d: f32 = alone[0].iter().zip(&got[1]).map(|(a, b)| (a - b).abs()).fold(0.0, f32::max);
            assert!(d < 1e-4, "{name} {key}: batched and alone differ by {d}");
            let chunked = infer_core::embeddings::embed_in_batches(m.model.as_ref(), &inputs, pooling, true, 5).unwrap();
            for (c, g) in chunked.iter().zip(&got) {
                let d: f32 = c.iter().zip(g).map(|(a, b)| (a - b).abs()).fold(0.0, f32::max);
                assert!(d < 1e-4, "{name} {key}: in chunks of 5 tokens the vectors differ by {d}");
            }
        }
    }
}

/// A BERT encoder in sentence-transformers' layout (tests/fixtures/tiny-bert from
/// scripts/make_encoder_fixtures.py: mean pooling + Normalize as configured, random LayerNorms)
/// against sentence-transformers: the token ids, and every vector (cosine ≥ 0.9999) with the
/// configured mean pooling and with CLS and max pooling, texts of different lengths batched.
#[test]
fn encoder_matches_sentence_transformers() {
    // tiny-roberta (scripts/make_roberta_fixtures.py): positions after the padding id, one token type.
    // tiny-modernbert (scripts/make_modernbert_fixtures.py): RoPE, global and local (window 8)
    // layers, GLU, no biases; texts up to 23 tokens, longer than the window.
    // tiny-xlmr (scripts/make_xlmr_fixtures.py): XLM-RoBERTa with a SentencePiece Unigram tokenizer.
    // tiny-nomic-bert (scripts/make_nomic_fixtures.py): NomicBERT in the Hub's form (n_embd, fused
    // Wqkv, fc11/fc12 SwiGLU), references from transformers' own NomicBertModel.
    for name in ["tiny-bert", "tiny-roberta", "tiny-xlmr", "tiny-modernbert", "tiny-nomic-bert"] {
        encoder_matches(name);
    }
}

fn encoder_matches(name: &str) {
    use infer_core::encoder::{Encoder, EncoderPooling};
    let dir = fixture(name);
    let want: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dir.join("expected.json")).unwrap()).unwrap();
    let texts: Vec<String> = serde_json::from_value(want["texts"].clone()).unwrap();
    let mut enc = Encoder::load(&dir, &infer_core::Device::Cpu).unwrap();
    assert_eq!(enc.pooling, EncoderPooling::Mean);
    assert!(enc.normalize);
    let ids: Vec<Vec<u32>> = serde_json::from_value(want["input_ids"].clone()).unwrap();
    for (t, want_ids) in texts.iter().zip(&ids) {
        let got = enc.tokenizer.encode(t, true).unwrap();
        let unpadded: Vec<u32> = want_ids.iter().copied().take(got.len()).collect();
        assert_eq!(got, unpadded, "{t}");
        assert!(want_ids[got.len()..].iter().all(|&p| p == 0), "{t}: only padding after");
    }
    for (pooling, key) in [(EncoderPooling::Mean, "mean"), (EncoderPooling::Cls, "cls"), (EncoderPooling::Max, "max")] {
        enc.pooling = pooling;
        let got = enc.embed_texts(&texts).unwrap();
        let want: Vec<Vec<f32>> = serde_json::from_value(want[key].clone()).unwrap();
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            let cos: f64 = g.iter().zip(w).map(|(a, b)| *a as f64 * *b as f64).sum();
            assert!(cos >= 0.9999, "{name}: {key} pooling, text {i}: cosine {cos}");
        }
    }
}

/// A BERT cross-encoder (tests/fixtures/tiny-cross-encoder from
/// scripts/make_cross_encoder_fixtures.py: BertForSequenceClassification, one label, random
/// LayerNorms and biases) against transformers and sentence-transformers: the pair token ids and
/// token types of the tokenizer (one document cut to the 64 positions, document first), every
/// logit, the CrossEncoder scores (sigmoid) within 1e-4 and CrossEncoder.rank's order.
#[test]
fn cross_encoder_matches_transformers() {
    // tiny-xlmr-cross-encoder (scripts/make_roberta_fixtures.py): XLMRobertaForSequenceClassification,
    // bge-reranker's head, `<s> q </s></s> d </s>` pairs with one token type.
    // tiny-modernbert-cross-encoder (scripts/make_modernbert_fixtures.py): mean pooling, dense + GELU +
    // LayerNorm head, 128 positions.
    for name in ["tiny-cross-encoder", "tiny-xlmr-cross-encoder", "tiny-modernbert-cross-encoder"] {
        cross_encoder_matches(name);
    }
}

fn cross_encoder_matches(name: &str) {
    use infer_core::encoder::{Encoder, ScoreActivation};
    let dir = fixture(name);
    let want: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dir.join("expected.json")).unwrap()).unwrap();
    let enc = Encoder::load(&dir, &infer_core::Device::Cpu).unwrap();
    assert!(enc.reranks());
    assert_eq!(enc.score_activation(), Some(ScoreActivation::Sigmoid));
    assert!(!Encoder::load(&fixture("tiny-bert"), &infer_core::Device::Cpu).unwrap().reranks());
    let pairs: Vec<(String, String)> = serde_json::from_value(want["pairs"].clone()).unwrap();
    let ids: Vec<Vec<u32>> = serde_json::from_value(want["input_ids"].clone()).unwrap();
    let types: Vec<Vec<u32>> = serde_json::from_value(want["token_type_ids"].clone()).unwrap();
    let mut encoded = Vec::new();
    for (i, (q, d)) in pairs.iter().enumerate() {
        let p = enc.encode_pair(&enc.encode_query(q).unwrap(), d, None).unwrap();
        assert_eq!(p.ids, ids[i], "{name} pair {i} ids");
        assert_eq!(p.type_ids, types[i], "{name} pair {i} token types");
        assert_eq!(p.truncated, ids[i].len() == want["max_length"].as_u64().unwrap() as usize, "pair {i}");
        encoded.push(p);
    }
    assert!(encoded.iter().any(|p| p.truncated), "one document is cut");
    let close = |got: &[f32], want: &[f32], what: &str| {
        assert_eq!(got.len(), want.len());
        for (i, (g, w)) in got.iter().zip(want).enumerate() {
            assert!((g - w).abs() <= 1e-4, "{name}: {what} {i}: {g} vs {w}");
        }
    };
    let logits = enc.logits(&encoded).unwrap();
    close(&logits, &serde_json::from_value::<Vec<f32>>(want["logits"].clone()).unwrap(), "logit");
    // One at a time (no padding) gives the same.
    let single: Vec<f32> = encoded.iter().map(|p| enc.logits(std::slice::from_ref(p)).unwrap()[0]).collect();
    close(&single, &logits, "unbatched logit");
    let docs: Vec<String> = serde_json::from_value(want["documents"].clone()).unwrap();
    let scores = enc.rerank(want["query"].as_str().unwrap(), &docs).unwrap();
    let want_scores: Vec<f32> = serde_json::from_value(want["scores"].clone()).unwrap();
    close(&scores, &want_scores[..docs.len()], "score");
    let mut order: Vec<usize> = (0..docs.len()).collect();
    order.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]));
    assert_eq!(order, serde_json::from_value::<Vec<usize>>(want["rerank"].clone()).unwrap());
    // A cross-encoder has no embeddings; a document cap cuts it further; an over-long query is named.
    assert!(enc.embed_texts(&docs).is_err());
    let q = enc.encode_query(&pairs[0].0).unwrap();
    // (Special tokens of a pair: 3 for BERT, 4 for RoBERTa.)
    let special = ids[0].len() - q.len() - enc.encode_query(&pairs[0].1).unwrap().len();
    assert_eq!(enc.encode_pair(&q, &docs[5], Some(3)).unwrap().ids.len(), q.len() + 3 + special);
    let long = enc.encode_query(&docs[5]).unwrap();
    assert!(matches!(enc.encode_pair(&long, "x", None), Err(infer_core::Error::InvalidParameter { name: "query", .. })));
}

/// tiny-bert as llama.cpp's convert_hf_to_gguf.py writes it (tests/fixtures/tiny-bert-gguf from
/// scripts/make_bert_gguf_fixture.py: f32 and f16 files, WordPiece vocabulary in llama.cpp's "▁" form,
/// bert.pooling_type mean) against llama.cpp's own token ids (llama-tokenize) and embeddings
/// (llama-embedding, L2-normalized; cosine >= 0.9999: llama.cpp's GELU is the tanh form through an f16
/// table) and sentence-transformers' vectors of the original folder (within 2e-5: the same network).
/// Texts with accents, capitals, a literal [CLS], a CJK character and sub-words.
#[test]
fn bert_gguf_matches_llamacpp_and_sentence_transformers() {
    use infer_core::encoder::is_encoder;
    let dir = fixture("tiny-bert-gguf");
    assert!(!is_encoder(&fixture("tiny-llama")));
    for (file, key) in [("tiny-bert.f32.gguf", "llamacpp_embeddings"), ("tiny-bert.f16.gguf", "llamacpp_embeddings_f16")] {
        gguf_encoder_matches(&dir, file, key);
    }
    // tiny-roberta (byte-level BPE, positions after the padding id) as the converter writes it: a
    // `gpt2` vocabulary and position rows from padding id + 1 on.
    gguf_encoder_matches(&fixture("tiny-roberta-gguf"), "tiny-roberta.f32.gguf", "llamacpp_embeddings");
    // tiny-nomic-bert as `nomic-bert` (fused attn_qkv, ffn_gate/ffn_up, rope.freq_base).
    gguf_encoder_matches(&fixture("tiny-nomic-bert-gguf"), "tiny-nomic-bert.f32.gguf", "llamacpp_embeddings");
    // tiny-xlmr (scripts/make_xlmr_fixtures.py: a SentencePiece Unigram vocabulary with its
    // precompiled normalization map) as llama.cpp writes XLM-R (bge-m3): a `t5` vocabulary.
    gguf_encoder_matches(&fixture("tiny-xlmr-gguf"), "tiny-xlmr.f32.gguf", "llamacpp_embeddings");
}

fn gguf_encoder_matches(dir: &std::path::Path, file: &str, key: &str) {
    use infer_core::encoder::{is_encoder, Encoder, EncoderPooling};
    let want: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dir.join("expected.json")).unwrap()).unwrap();
    let texts: Vec<String> = serde_json::from_value(want["texts"].clone()).unwrap();
    let ids: Vec<Vec<u32>> = serde_json::from_value(want["llamacpp_ids"].clone()).unwrap();
    let st: Vec<Vec<f32>> = serde_json::from_value(want["st_embeddings"].clone()).unwrap();
    {
        let path = dir.join(file);
        assert!(is_encoder(&path), "{file}");
        let enc = Encoder::load(&path, &infer_core::Device::Cpu).unwrap();
        assert_eq!((enc.pooling, enc.normalize, enc.reranks()), (EncoderPooling::Mean, true, false));
        for (t, want_ids) in texts.iter().zip(&ids) {
            assert_eq!(&enc.tokenizer.encode(t, true).unwrap(), want_ids, "{file}: {t:?}");
        }
        let got = enc.embed_texts(&texts).unwrap();
        let llama: Vec<Vec<f32>> = serde_json::from_value(want[key].clone()).unwrap();
        for (i, g) in got.iter().enumerate() {
            let cos: f64 = g.iter().zip(&llama[i]).map(|(a, b)| *a as f64 * *b as f64).sum();
            assert!(cos >= 0.9999, "{file}: text {i} vs llama.cpp: cosine {cos}");
            let diff = g.iter().zip(&st[i]).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
            let tol = if file.contains("f16") { 2e-3 } else { 2e-5 };
            assert!(diff <= tol, "{file}: text {i} vs sentence-transformers: max diff {diff}");
        }
    }
}

/// A pair's token types come from the tokenizer only when transformers' tokenizer would hand them
/// to the model (`model_input_names`, else the tokenizer class: BertTokenizer yes, the base
/// `TokenizersBackend` no): otherwise the document is type 0 too, as transformers runs it.
#[test]
fn pair_token_types_follow_the_tokenizer_class() {
    use infer_core::encoder::Encoder;
    let src = fixture("tiny-cross-encoder");
    let dir = std::env::temp_dir().join(format!("infer-pair-types-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for e in std::fs::read_dir(&src).unwrap().flatten().filter(|e| e.path().is_file()) {
        std::fs::copy(e.path(), dir.join(e.file_name())).unwrap();
    }
    let types = |cfg: &str| -> Vec<u32> {
        std::fs::write(dir.join("tokenizer_config.json"), cfg).unwrap();
        let enc = Encoder::load(&dir, &infer_core::Device::Cpu).unwrap();
        enc.encode_pair(&enc.encode_query("where did the cat sit?").unwrap(), "the cat", None).unwrap().type_ids
    };
    let bert = types(r#"{"tokenizer_class": "BertTokenizer"}"#);
    assert!(bert.contains(&1), "{bert:?}");
    assert_eq!(types(r#"{"tokenizer_class": "TokenizersBackend"}"#), vec![0; bert.len()]);
    assert_eq!(types(r#"{"tokenizer_class": "BertTokenizer", "model_input_names": ["input_ids", "attention_mask"]}"#), vec![0; bert.len()]);
    assert_eq!(types(r#"{"tokenizer_class": "TokenizersBackend", "model_input_names": ["input_ids", "token_type_ids"]}"#), bert);
    let _ = std::fs::remove_dir_all(&dir);
}
