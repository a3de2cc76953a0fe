//! The real SmolLM2-135M-Instruct Q4_1 GGUF against llama.cpp's reference values
//! (`tests/fixtures/smollm2-llamacpp.json`, made by `scripts/make_llamacpp_refs.py`).

mod common;

use infer_core::engine::EngineConfig;
use infer_core::{ChatMessage, FinishReason, IncrementalDecoder, LoadOptions, SamplingParams, Session};
use serde_json::Value;

fn session() -> Option<Session> {
    let path = common::smollm2()?;
    let model = infer_core::load(path.to_str().unwrap(), LoadOptions::default()).unwrap();
    Some(Session::new(model, EngineConfig { max_context: Some(2048), max_seqs: 8, ..Default::default() }).unwrap())
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect()
}

#[test]
fn tokenizer_matches_llamacpp() {
    let Some(s) = session() else { return };
    let refs = common::llamacpp_refs();
    let tok = &s.model().tokenizer;
    for case in refs["tokenize"].as_array().unwrap() {
        let text = case["text"].as_str().unwrap();
        assert_eq!(tok.encode(text, false).unwrap(), ids(&case["ids"]), "token ids of {text:?}");
        // add_bos_token is false for this model: raw prompts get no BOS either.
        assert_eq!(tok.encode(text, true).unwrap(), ids(&case["ids"]), "raw prompt ids of {text:?}");
    }
    assert_eq!(
        tok.encode("Hello world! Ünïcödé 你好 🤗 <|im_start|>", false).unwrap(),
        [19556, 905, 17, 5549, 246, 94, 25972, 83, 7466, 84, 2756, 216, 18645, 250, 48392, 138, 15107, 114, 241, 216, 1]
    );
}

#[test]
fn streaming_never_splits_a_character() {
    let Some(s) = session() else { return };
    let tok = &s.model().tokenizer;
    let text = "Ünïcödé 你好 🤗 ok";
    let ids = tok.encode(text, false).unwrap();
    let mut dec = IncrementalDecoder::new();
    let mut out = String::new();
    let mut pieces = 0;
    for id in ids {
        if let Some(p) = dec.push(tok, id).unwrap() {
            assert!(!p.contains('\u{FFFD}'), "piece {p:?} holds a broken character");
            out.push_str(&p);
            pieces += 1;
        }
    }
    out.extend(dec.flush(tok).unwrap());
    assert_eq!(out, text);
    assert!(pieces > 3);
    // Tokens without text (special tokens) do not pile up to be decoded again at every token
    // (that was quadratic: a sequence emitting them forever slowed down without bound).
    let special = tok.token_to_id("<|im_start|>").unwrap();
    let mut dec = IncrementalDecoder::new();
    for _ in 0..10_000 {
        assert_eq!(dec.push(tok, special).unwrap(), None);
        assert!(dec.pending_tokens() <= 17, "{}", dec.pending_tokens());
    }
    let mut out = String::new();
    for id in tok.encode(" fine", false).unwrap() {
        out.extend(dec.push(tok, id).unwrap());
    }
    out.extend(dec.flush(tok).unwrap());
    assert_eq!(out, " fine");
}

#[test]
fn chat_template_and_greedy_answer_match_llamacpp() {
    let Some(mut s) = session() else { return };
    let refs = common::llamacpp_refs();
    let chat = &refs["chat"];
    let msgs = [ChatMessage::user("What is the capital of France? Answer in one sentence.")];
    let rendered = s.model().chat_template.as_ref().unwrap().render(&msgs, true).unwrap();
    assert_eq!(rendered, chat["prompt"].as_str().unwrap(), "rendered chat prompt");
    let prompt = s.chat_prompt(&msgs).unwrap();
    assert_eq!(prompt, ids(&chat["prompt_ids"]));
    let chunks: Vec<_> = s.generate_ids(prompt, SamplingParams::greedy()).unwrap().collect::<Result<_, _>>().unwrap();
    let text: String = chunks.iter().map(|c| c.text.as_str()).collect();
    assert_eq!(text, "The capital of France is Paris.");
    assert_eq!(text, chat["generated_text"].as_str().unwrap());
    let tokens: Vec<u32> = chunks.iter().map(|c| c.token).collect();
    // llama.cpp's generated ids, then the end-of-turn token that stopped both.
    assert_eq!(&tokens[..tokens.len() - 1], ids(&chat["generated_ids"]).as_slice());
    assert_eq!(*tokens.last().unwrap(), 2);
    assert_eq!(chunks.last().unwrap().finish, Some(FinishReason::Stop));
}

/// Two engines whose logits differ by ~0.1 nats (8-bit activation rounding, summation order, f16
/// vs f32 attention) can break a near tie either way: infer's own instruction-set paths (scalar,
/// AVX2, AVX-512) differ from each other by up to 0.14 nats on these prompts (measured 2026-11-23),
/// and the third step of the raw continuation below is a 0.05-nat tie under AVX-512. Where our top
/// token is not llama.cpp's, llama.cpp's must be within `TIE` nats of ours; a wrong kernel moves
/// logits by whole nats.
const TIE: f32 = 0.25;

/// All-position logits of `ids` in one prefill (f32 KV cache).
fn prefill_logits(s: &Session, ids: &[u32]) -> Vec<Vec<f32>> {
    let model = s.model().model.clone();
    let mut cache =
        infer_core::kv_cache::PagedKvCache::new_on(model.config(), 16, 64, &infer_core::Device::Cpu, infer_core::DType::F32).unwrap();
    let mut table = Vec::new();
    cache.reserve(&mut table, ids.len()).unwrap();
    let mut batch = infer_core::models::BatchInput::default();
    batch.push_sequence(ids, 0, &table, 16, infer_core::models::LogitsWanted::All);
    model.forward(&batch, &mut cache).unwrap().to_vec2::<f32>().unwrap()
}

fn argmax(row: &[f32]) -> usize {
    row.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).unwrap().0
}

/// Our top-two margin at `row`, in nats.
fn margin(row: &[f32]) -> f32 {
    let best = argmax(row);
    let second = row.iter().enumerate().filter(|&(i, _)| i != best).map(|(_, &v)| v).fold(f32::NEG_INFINITY, f32::max);
    row[best] - second
}

#[test]
fn raw_greedy_continuation_matches_llamacpp() {
    let Some(mut s) = session() else { return };
    let refs = common::llamacpp_refs();
    let r = &refs["raw_continuation"];
    let text = r["text"].as_str().unwrap();
    let want = ids(&r["generated_ids"]);
    // llama.cpp's continuation teacher-forced through our model: its token is our top token at
    // every step, or within TIE of it.
    let prompt = s.model().tokenizer.encode(text, false).unwrap();
    let logits = prefill_logits(&s, &[prompt.clone(), want.clone()].concat());
    let mut first_tie = want.len();
    for (i, &t) in want.iter().enumerate() {
        let row = &logits[prompt.len() - 1 + i];
        let best = argmax(row);
        assert!(
            row[best] - row[t as usize] <= TIE,
            "step {i}: llama.cpp's token {t} is {} nats below our top token {best}",
            row[best] - row[t as usize]
        );
        if margin(row) < TIE {
            first_tie = first_tie.min(i);
        }
    }
    // Our own greedy generation (decode steps, not one prefill) gives llama.cpp's tokens up to the
    // first near tie, and its text when there is none.
    let params = SamplingParams { max_tokens: Some(16), ..SamplingParams::greedy() };
    let chunks: Vec<_> = s.complete(text, params).unwrap().collect::<Result<_, _>>().unwrap();
    let got: Vec<u32> = chunks.iter().map(|c| c.token).collect();
    assert_eq!(got[..first_tie], want[..first_tie], "greedy tokens before the first near tie (step {first_tie})");
    if first_tie == want.len() {
        assert_eq!(chunks.iter().map(|c| c.text.as_str()).collect::<String>(), r["generated_text"].as_str().unwrap());
    }
    assert_eq!(chunks.len(), 16);
    assert_eq!(chunks.last().unwrap().finish, Some(FinishReason::Length));
}

/// Tolerance, measured rather than guessed: llama.cpp stores the KV cache in f16 and multiplies
/// attention in f16; infer keeps f32; HF transformers (f32 on the dequantized weights) differs again.
/// On these very prompts transformers and llama.cpp differ by up to 0.50 nats per top-5 log-prob
/// (mean 0.13 over 30 values, measured 2026-11-23), and infer vs llama.cpp by up to 0.50 (mean 0.125
/// over 40). So: every value within 0.6, the mean within 0.2, and at every position llama.cpp's top
/// token is ours or within `TIE` of it. A wrong rope, norm or kernel moves values by whole nats.
const LOGPROB_TOL: f32 = 0.6;
const LOGPROB_MEAN_TOL: f32 = 0.2;

#[test]
fn top5_logprobs_match_llamacpp() {
    let Some(s) = session() else { return };
    let refs = common::llamacpp_refs();
    let model = s.model().model.clone();
    // llama.cpp keeps its KV cache in f16; ours is f32 by default, f16 or q8_0 on request.
    use infer_core::kv_cache::KvDtype;
    for kv in [KvDtype::F32, KvDtype::F16, KvDtype::Q8_0] {
        let (mut worst, mut sum, mut count) = (0f32, 0f32, 0usize);
        for case in refs["top_logprobs"].as_array().unwrap() {
            let prompt = ids(&case["ids"]);
            let mut cache = infer_core::kv_cache::PagedKvCache::new_on(model.config(), 16, 64, &infer_core::Device::Cpu, kv).unwrap();
            let mut table = Vec::new();
            cache.reserve(&mut table, prompt.len()).unwrap();
            let mut batch = infer_core::models::BatchInput::default();
            batch.push_sequence(&prompt, 0, &table, 16, infer_core::models::LogitsWanted::All);
            let logits = model.forward(&batch, &mut cache).unwrap().to_vec2::<f32>().unwrap();
            let mut positions = vec![(prompt.len() - 1, &case["top5"])];
            if let Some(all) = case.get("top5_all_positions").and_then(|v| v.as_array()) {
                positions.extend(all.iter().enumerate());
            }
            for (pos, top5) in positions {
                let row = &logits[pos];
                let lse = infer_core::sampling::logsumexp(row);
                for (rank, pair) in top5.as_array().unwrap().iter().enumerate() {
                    let (tok, want) = (pair[0].as_u64().unwrap() as usize, pair[1].as_f64().unwrap() as f32);
                    let got = row[tok] - lse;
                    let d = (got - want).abs();
                    worst = worst.max(d);
                    sum += d;
                    count += 1;
                    assert!(
                        d < LOGPROB_TOL,
                        "{kv:?} cache, {:?} position {pos}: token {tok} (llama.cpp rank {rank}) logprob {got} vs {want}",
                        case["text"]
                    );
                }
                let (best, theirs) = (argmax(row), top5[0][0].as_u64().unwrap() as usize);
                assert!(
                    row[best] - row[theirs] <= TIE,
                    "{kv:?} cache, {:?} position {pos}: llama.cpp's top token {theirs} is {} nats below ours ({best})",
                    case["text"],
                    row[best] - row[theirs]
                );
            }
        }
        let mean = sum / count as f32;
        eprintln!("{kv:?} KV cache: top-5 logprobs vs llama.cpp over {count} values: max |diff| {worst:.3}, mean {mean:.3}");
        assert!(mean < LOGPROB_MEAN_TOL, "{kv:?} cache: mean |diff| {mean}");
    }
}

#[test]
fn batch_of_four_equals_each_alone() {
    let Some(mut s) = session() else { return };
    let prompts = ["The quick brown fox", "Once upon a time", "def fibonacci(n):", "The capital of France is"];
    let params = SamplingParams { max_tokens: Some(12), ..SamplingParams::greedy() };
    let alone: Vec<Vec<u32>> = prompts
        .iter()
        .map(|p| {
            let ids = s.raw_prompt(p).unwrap();
            s.generate_ids(ids, params.clone()).unwrap().map(|c| c.unwrap().token).collect()
        })
        .collect();
    let engine = s.engine();
    let seq_ids: Vec<_> = prompts
        .iter()
        .map(|p| {
            let ids = engine.tokenizer().encode(p, true).unwrap();
            engine.add_request(ids, params.clone()).unwrap()
        })
        .collect();
    let mut together: Vec<Vec<u32>> = vec![Vec::new(); 4];
    let mut max_batch = 0;
    while engine.has_work() {
        max_batch = max_batch.max(engine.num_running());
        for e in engine.step().unwrap() {
            together[seq_ids.iter().position(|&i| i == e.seq_id).unwrap()].push(e.token);
        }
    }
    assert_eq!(max_batch, 4, "all four ran in the same steps");
    assert_eq!(together, alone);
}

#[test]
fn prefix_cache_reuses_blocks_and_changes_nothing() {
    let Some(mut s) = session() else { return };
    let system = "You are a helpful assistant who answers questions about geography. Answer briefly, in one sentence, \
                  and never make anything up; if you do not know, say so.";
    let ask = |s: &mut Session, q: &str| {
        let msgs = [ChatMessage::system(system), ChatMessage::user(q)];
        let ids = s.chat_prompt(&msgs).unwrap();
        let n = ids.len();
        let engine = s.engine();
        let before = engine.stats();
        let id = engine.add_request(ids, SamplingParams { max_tokens: Some(12), ..SamplingParams::greedy() }).unwrap();
        let (mut toks, mut cached) = (Vec::new(), 0);
        while engine.has_work() {
            for e in engine.step().unwrap().into_iter().filter(|e| e.seq_id == id) {
                toks.push(e.token);
                cached = e.cached_tokens;
            }
        }
        let hit = engine.stats().prefix_hit_tokens - before.prefix_hit_tokens;
        assert_eq!(hit, cached);
        (toks, cached, n)
    };
    let (a, cached_a, n) = ask(&mut s, "What is the capital of France?");
    assert_eq!(cached_a, 0, "cold cache");
    let (a2, cached_a2, _) = ask(&mut s, "What is the capital of France?");
    assert_eq!(a2, a, "same answer from cached blocks");
    assert_eq!(cached_a2, (n - 1) / 16 * 16, "every full block but the last token's was reused");
    let (b, cached_b, _) = ask(&mut s, "What is the capital of Italy?");
    assert!(cached_b >= 32, "the shared system prompt was reused ({cached_b} tokens)");
    // The same question on an engine without prefix caching gives the same tokens.
    let model = infer_core::load(common::smollm2().unwrap().to_str().unwrap(), LoadOptions::default()).unwrap();
    let mut cold = Session::new(model, EngineConfig { max_context: Some(2048), prefix_caching: false, ..Default::default() }).unwrap();
    let (b_cold, cached_cold, _) = ask(&mut cold, "What is the capital of Italy?");
    assert_eq!((b_cold, cached_cold), (b, 0));
    assert_eq!(cold.engine().stats().prefix_lookup_tokens, 0);
}

#[test]
fn seed_reproducible_and_stop_strings() {
    let Some(mut s) = session() else { return };
    let sample = |s: &mut Session, seed| {
        let p = SamplingParams { temperature: 1.0, seed: Some(seed), max_tokens: Some(24), ..Default::default() };
        s.complete("Write a story about a dragon.", p).unwrap().text().unwrap()
    };
    let a = sample(&mut s, 42);
    assert_eq!(a, sample(&mut s, 42), "same seed, same text");
    let others: Vec<String> = (1..4).map(|k| sample(&mut s, 42 + k)).collect();
    assert!(others.iter().any(|o| *o != a), "different seeds all gave the same text");

    let msgs = [ChatMessage::user("What is the capital of France? Answer in one sentence.")];
    let p = SamplingParams { stop: vec![" Paris".into()], ..SamplingParams::greedy() };
    let chunks: Vec<_> = s.chat(&msgs, p).unwrap().collect::<Result<_, _>>().unwrap();
    assert_eq!(chunks.iter().map(|c| c.text.as_str()).collect::<String>(), "The capital of France is");
    assert_eq!(chunks.last().unwrap().finish, Some(FinishReason::Stop));
}

#[test]
fn context_limit_and_cancel_free_blocks() {
    let Some(mut s) = session() else { return };
    let free0 = s.engine().cache().num_free_blocks();
    let long: Vec<u32> = vec![504; 2048];
    let err = s.generate_ids(long, SamplingParams::greedy()).err().unwrap().to_string();
    assert!(err.contains("context holds 2048"), "{err}");
    // Dropping a stream mid-generation cancels it and frees its blocks.
    let mut stream = s.complete("Once upon a time", SamplingParams::greedy()).unwrap();
    stream.next().unwrap().unwrap();
    drop(stream);
    assert_eq!(s.engine().cache().num_free_blocks(), free0);
    assert!(!s.engine().has_work());
}
