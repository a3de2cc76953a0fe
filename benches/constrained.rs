//! What a constraint costs per generated token: decode steps of the engine with and without a JSON
//! schema (a long array of objects, so no sequence finishes during the measurement), at batch 1 and
//! 16, on the SmolLM2-135M-Instruct Q4_1 GGUF (49k vocabulary). Masks are computed on another thread
//! during the forward pass (the default) or just before it (`overlap off`), for comparison.
//!
//!   cargo bench --bench constrained -- [--model PATH] [--threads N] [--rounds R]
//!
//! Prints per configuration the median time per decode step over R rounds (alternated), and the
//! ratio constrained / free. Greedy decoding, so both sample the same way (the masked sampler only
//! adds the mask). Under `cargo test` (no `--bench`) it runs one tiny round.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use infer::{ChatMessage, Constraint, EngineConfig, LoadOptions, SamplingParams, Session};

fn schema() -> serde_json::Value {
    serde_json::json!({
        "type": "object",
        "properties": {
            "people": {
                "type": "array",
                "minItems": 100,
                "items": {
                    "type": "object",
                    "properties": {
                        "name": {"type": "string", "maxLength": 20},
                        "age": {"type": "integer", "minimum": 0, "maximum": 120},
                        "city": {"type": "string", "maxLength": 20},
                        "tags": {"type": "array", "items": {"enum": ["friend", "family", "work"]}, "maxItems": 3}
                    },
                    "required": ["name", "age", "city", "tags"]
                }
            }
        },
        "required": ["people"]
    })
}

/// Runs `batch` sequences; returns the mean wall time of the steps where every sequence decodes
/// (after all prompts are in, before any sequence ends) and how many such steps there were.
fn decode_steps(s: &mut Session, batch: usize, constrained: bool, tokens: usize) -> (Duration, usize) {
    let prompt = s.chat_prompt(&[ChatMessage::user("List many people with their name, age, city and tags as JSON.")]).unwrap();
    let engine = s.engine();
    let mut ids = Vec::new();
    for i in 0..batch {
        let params = SamplingParams {
            temperature: 0.0,
            max_tokens: Some(tokens),
            ignore_eos: !constrained,
            constraint: constrained.then(|| Constraint::JsonSchema(schema())),
            ..Default::default()
        };
        // Distinct prompts (no shared prefix blocks beyond the chat template's).
        let mut p = prompt.clone();
        p.insert(p.len() - 3, 28 + i as u32);
        ids.push(engine.add_request(p, params).unwrap());
    }
    let mut produced = vec![0usize; batch];
    let (mut total, mut steps) = (Duration::ZERO, 0);
    while engine.has_work() {
        let all_decoding = produced.iter().all(|&n| n > 0);
        let t0 = Instant::now();
        let events = engine.step().unwrap();
        let dt = t0.elapsed();
        let ended = events.iter().any(|e| e.finish.is_some());
        if all_decoding && !ended && events.len() == batch {
            total += dt;
            steps += 1;
        }
        for e in events {
            produced[ids.iter().position(|&i| i == e.seq_id).unwrap()] += 1;
        }
        if ended {
            for id in ids.iter().copied() {
                engine.cancel(id);
            }
        }
    }
    (total / steps.max(1) as u32, steps)
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let bench = args.iter().any(|a| a == "--bench");
    let arg = |name: &str| args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).cloned();
    let model = arg("--model").map(PathBuf::from).or_else(infer::testing::smollm2);
    let Some(model) = model else {
        eprintln!("constrained: no test model (scripts/fetch-model.sh); skipped");
        return;
    };
    let threads: usize = arg("--threads").and_then(|t| t.parse().ok()).unwrap_or(2);
    let rounds: usize = arg("--rounds").and_then(|t| t.parse().ok()).unwrap_or(if bench { 5 } else { 1 });
    let tokens = if bench { 128 } else { 8 };
    let batches: &[usize] = if bench { &[1, 16] } else { &[2] };
    infer_kernels_threads(threads);
    println!("| batch | masks | free ms/step | constrained ms/step | constrained / free |");
    println!("| ---: | --- | ---: | ---: | ---: |");
    for &batch in batches {
        for overlap in [true, false] {
            let m = infer::load(model.to_str().unwrap(), LoadOptions::default()).unwrap();
            let cfg = EngineConfig { max_context: Some(1024), max_seqs: 16, overlap_masks: overlap, ..Default::default() };
            let mut s = Session::new(m, cfg).unwrap();
            // Warm-up (also builds the vocabulary's token trie once).
            decode_steps(&mut s, batch, true, 4);
            let (mut free, mut cons) = (Vec::new(), Vec::new());
            for _ in 0..rounds {
                free.push(decode_steps(&mut s, batch, false, tokens).0.as_secs_f64() * 1e3);
                cons.push(decode_steps(&mut s, batch, true, tokens).0.as_secs_f64() * 1e3);
            }
            let (f, c) = (median(&mut free), median(&mut cons));
            println!(
                "| {batch} | {} | {f:.2} | {c:.2} | {:.3} |",
                if overlap { "during the forward pass" } else { "before it (overlap off)" },
                c / f
            );
        }
    }
}

fn infer_kernels_threads(n: usize) {
    // The CLI's --threads: the kernel pool reads RAYON_NUM_THREADS at first use.
    std::env::set_var("RAYON_NUM_THREADS", n.to_string());
}
