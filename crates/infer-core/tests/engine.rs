//! The engine's step beyond plain decoding, on the real SmolLM2-135M-Instruct Q4_1 GGUF: drafted
//! tokens verified in one step (speculative decoding) and per-sequence token constraints.

mod common;

use infer_core::engine::EngineConfig;
use infer_core::{Engine, LoadOptions, Result, SamplingParams, SeqId, Session, TokenConstraint, TokenEvent, TokenMask};

fn session() -> Option<Session> {
    let path = common::smollm2()?;
    let model = infer_core::load(path.to_str().unwrap(), LoadOptions::default()).unwrap();
    Some(Session::new(model, EngineConfig { max_context: Some(2048), max_seqs: 8, ..Default::default() }).unwrap())
}

/// Runs the engine until it is idle; calls `before_step` before each step. Returns each sequence's
/// events and the number of steps.
fn run(engine: &mut Engine, ids: &[SeqId], mut before_step: impl FnMut(&mut Engine, &[Vec<TokenEvent>])) -> (Vec<Vec<TokenEvent>>, usize) {
    let mut out: Vec<Vec<TokenEvent>> = vec![Vec::new(); ids.len()];
    let mut steps = 0;
    while engine.has_work() {
        before_step(engine, &out);
        for e in engine.step().unwrap() {
            out[ids.iter().position(|&i| i == e.seq_id).unwrap()].push(e);
        }
        steps += 1;
        assert!(steps < 1000, "the engine does not finish");
    }
    (out, steps)
}

fn tokens(events: &[TokenEvent]) -> Vec<u32> {
    events.iter().map(|e| e.token).collect()
}

fn text(events: &[TokenEvent]) -> String {
    events.iter().map(|e| e.text.as_str()).collect()
}

/// Drafts that are right, partly right and wrong, for two sequences batched together: the tokens,
/// text and finish are those of plain greedy decoding, in fewer steps when drafts are right.
#[test]
fn drafted_tokens_change_nothing_but_the_step_count() {
    let Some(mut s) = session() else { return };
    let prompts = ["The quick brown fox", "def fibonacci(n):"];
    let params = SamplingParams { max_tokens: Some(40), ..SamplingParams::greedy() };
    let prompt_ids: Vec<Vec<u32>> = prompts.iter().map(|p| s.raw_prompt(p).unwrap()).collect();
    let engine = s.engine();
    let start =
        |engine: &mut Engine| -> Vec<SeqId> { prompt_ids.iter().map(|p| engine.add_request(p.clone(), params.clone()).unwrap()).collect() };
    let ids = start(engine);
    let (plain, plain_steps) = run(engine, &ids, |_, _| {});
    let want: Vec<Vec<u32>> = plain.iter().map(|e| tokens(e)).collect();
    assert!(want.iter().all(|t| t.len() == 40));

    // Each step drafts the next 4 true tokens, with the third replaced by a wrong one every other step.
    let ids = start(engine);
    let mut k = 0;
    let (spec, spec_steps) = run(engine, &ids, |engine, sofar| {
        for (i, &id) in ids.iter().enumerate() {
            let done = sofar[i].len();
            if done == 0 || sofar[i].last().is_some_and(|e| e.finish.is_some()) {
                continue; // still in its prompt, or finished
            }
            let mut draft: Vec<u32> = want[i].iter().skip(done).take(4).copied().collect();
            k += 1;
            if k % 2 == 0 && draft.len() > 2 {
                draft[2] = (draft[2] + 1) % 49152;
            }
            engine.propose_draft(id, draft).unwrap();
        }
    });
    for i in 0..2 {
        assert_eq!(tokens(&spec[i]), want[i], "sequence {i}: the tokens");
        assert_eq!(text(&spec[i]), text(&plain[i]), "sequence {i}: the text");
        assert_eq!(spec[i].last().unwrap().finish, plain[i].last().unwrap().finish);
        assert_eq!(spec[i].iter().filter(|e| e.finish.is_some()).count(), 1);
    }
    assert!(spec_steps * 2 < plain_steps, "drafts saved steps: {spec_steps} vs {plain_steps}");

    // Wrong drafts only: still the same tokens, one per step.
    let ids = start(engine);
    let (wrong, wrong_steps) = run(engine, &ids, |engine, sofar| {
        for (i, &id) in ids.iter().enumerate() {
            if let (Some(&next), false) = (want[i].get(sofar[i].len()), sofar[i].is_empty()) {
                engine.propose_draft(id, vec![(next + 7) % 49152; 3]).unwrap();
            }
        }
    });
    assert_eq!(wrong.iter().map(|e| tokens(e)).collect::<Vec<_>>(), want);
    assert_eq!(wrong_steps, plain_steps);
    // Every block went back (the cache is as free as before, up to cached prefixes).
    assert_eq!(engine.cache().num_used_blocks(), 0);
}

/// Allows one given token per position, then only end-of-sequence.
struct Forced {
    tokens: Vec<u32>,
    at: usize,
    eos: u32,
}

impl TokenConstraint for Forced {
    fn fill_mask(&mut self, mask: &mut TokenMask) -> Result<()> {
        mask.allow(self.tokens.get(self.at).copied().unwrap_or(self.eos));
        Ok(())
    }
    fn commit(&mut self, token: u32) -> Result<()> {
        assert_eq!(Some(&token), self.tokens.get(self.at).or(Some(&self.eos)), "sampled outside the mask");
        self.at += 1;
        Ok(())
    }
}

/// Allows a fixed set of tokens.
struct OneOf(Vec<u32>);

impl TokenConstraint for OneOf {
    fn fill_mask(&mut self, mask: &mut TokenMask) -> Result<()> {
        self.0.iter().for_each(|&t| mask.allow(t));
        Ok(())
    }
    fn commit(&mut self, _: u32) -> Result<()> {
        Ok(())
    }
}

#[test]
fn constraints_hold_per_sequence_in_a_batch_with_and_without_drafts() {
    let Some(mut s) = session() else { return };
    let eos = 2; // <|im_end|>
    let forced_text = " forty-two, exactly";
    let forced = s.model().tokenizer.encode(forced_text, false).unwrap();
    let prompt = s.raw_prompt("The answer is").unwrap();
    let engine = s.engine();
    let allowed: Vec<u32> = vec![28, 29, 30]; // "=", ">", "?"
    for with_drafts in [false, true] {
        let greedy = SamplingParams { max_tokens: Some(20), ..SamplingParams::greedy() };
        let sampled = SamplingParams {
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            seed: Some(7),
            max_tokens: Some(30),
            ..Default::default()
        };
        let f = Box::new(Forced { tokens: forced.clone(), at: 0, eos });
        let a = engine.add_constrained_request(prompt.clone(), greedy.clone(), Some(f)).unwrap();
        let b = engine.add_constrained_request(prompt.clone(), sampled, Some(Box::new(OneOf(allowed.clone())))).unwrap();
        let free = engine.add_request(prompt.clone(), greedy).unwrap();
        let ids = [a, b, free];
        let forced = forced.clone();
        let (out, _) = run(engine, &ids, |engine, sofar| {
            if with_drafts && !sofar[0].is_empty() {
                // Right drafts for the forced sequence, and a draft outside the mask.
                let mut d: Vec<u32> = forced.iter().skip(sofar[0].len()).take(3).copied().collect();
                d.push(500);
                let _ = engine.propose_draft(a, d);
            }
        });
        let mut want = forced.clone();
        want.push(eos);
        assert_eq!(tokens(&out[0]), want, "drafts {with_drafts}: the forced tokens, then end of sequence");
        assert_eq!(text(&out[0]), forced_text);
        assert_eq!(out[1].len(), 30);
        assert!(out[1].iter().all(|e| allowed.contains(&e.token)), "{:?}", tokens(&out[1]));
        assert!(tokens(&out[2]).iter().any(|t| !allowed.contains(t)), "the unconstrained sequence is free");
    }
}

/// Three sequences batched (a document to copy, a code edit, an open question), greedy: the engine
/// drafting by prompt lookup, and with a draft model (the same file loaded again), gives the tokens
/// and text of plain decoding, in fewer steps where the answer copies its input.
#[test]
fn speculative_decoding_keeps_greedy_output() {
    use infer_core::speculative::SpeculativeConfig;
    let Some(path) = common::smollm2() else { return };
    let path = path.to_str().unwrap();
    let doc = "The Great Barrier Reef is the world's largest coral reef system, composed of over 2,900 individual reefs and \
               900 islands stretching for over 2,300 kilometres. The reef is located in the Coral Sea, off the coast of \
               Queensland, Australia.";
    let code = "def area(w, h):\n    return w * h\n\ndef perimeter(w, h):\n    return 2 * (w + h)\n";
    let prompts = [
        format!("Repeat the following text exactly, word for word:\n\n{doc}"),
        format!("Rename the function `area` to `rect_area` in this code and show the whole code:\n\n{code}"),
        "What is the capital of France?".to_string(),
    ];
    let run_with = |spec: Option<SpeculativeConfig>| {
        let cfg = EngineConfig { max_context: Some(1024), max_seqs: 4, speculative: spec, ..Default::default() };
        let mut s = Session::new(infer_core::load(path, LoadOptions::default()).unwrap(), cfg).unwrap();
        let ids: Vec<Vec<u32>> = prompts.iter().map(|p| s.chat_prompt(&[infer_core::ChatMessage::user(p.clone())]).unwrap()).collect();
        let engine = s.engine();
        let params = SamplingParams { max_tokens: Some(80), ..SamplingParams::greedy() };
        let seqs: Vec<SeqId> = ids.iter().map(|p| engine.add_request(p.clone(), params.clone()).unwrap()).collect();
        let (out, steps) = run(engine, &seqs, |_, _| {});
        (out, steps, engine.stats())
    };
    let (plain, plain_steps, _) = run_with(None);
    let mut lookup = SpeculativeConfig::ngram(8);
    lookup.max_rows = 64;
    let (ngram, ngram_steps, st) = run_with(Some(lookup));
    let draft = infer_core::load(path, LoadOptions::default()).unwrap();
    let mut dm = SpeculativeConfig::draft_model(draft.model, draft.tokenizer, 4);
    dm.max_rows = 64;
    let (drafted, drafted_steps, dst) = run_with(Some(dm));
    for i in 0..prompts.len() {
        assert_eq!(tokens(&ngram[i]), tokens(&plain[i]), "prompt lookup, sequence {i}: the tokens");
        assert_eq!(text(&ngram[i]), text(&plain[i]), "prompt lookup, sequence {i}: the text");
        assert_eq!(tokens(&drafted[i]), tokens(&plain[i]), "draft model, sequence {i}: the tokens");
        assert_eq!(ngram[i].last().unwrap().finish, plain[i].last().unwrap().finish);
    }
    eprintln!(
        "steps: plain {plain_steps}, lookup {ngram_steps} ({} of {} drafts kept), draft model {drafted_steps} ({} of {} kept)",
        st.accepted_draft_tokens, st.draft_tokens, dst.accepted_draft_tokens, dst.draft_tokens
    );
    assert!(st.accepted_draft_tokens > 0 && st.accepted_draft_tokens <= st.draft_tokens);
    assert!(ngram_steps * 3 < plain_steps * 2, "lookup saved steps: {ngram_steps} vs {plain_steps}");
    // The same weights draft: nearly every drafted token is the model's own greedy choice.
    assert!(dst.accepted_draft_tokens * 10 >= dst.draft_tokens * 9, "{dst:?}");
    assert!(drafted_steps * 2 < plain_steps, "draft model saved steps: {drafted_steps} vs {plain_steps}");
}

/// At temperature > 0, checking drafts keeps the model's distribution: 3000 samples of the first
/// two tokens (top-3 sampling at T = 1 on the tiny random Llama, so 9 outcomes), each sequence
/// drafting the likeliest first token (kept about as often as it is sampled), against the exact
/// probabilities from the model's logits: chi-square with 8 degrees of freedom below 26.1
/// (p = 0.001; the seeds are fixed, so the test is deterministic).
#[test]
fn speculative_sampling_keeps_the_distribution() {
    let load = || infer_core::load(common::fixture("tiny-llama").to_str().unwrap(), LoadOptions::default()).unwrap();
    let mut plain = Session::new(load(), EngineConfig { max_seqs: 1, ..Default::default() }).unwrap();
    // The top-3 tokens after a prompt and their renormalized probabilities at T = 1.
    let mut top3 = |prompt: &[u32]| -> Vec<(u32, f64)> {
        let params = SamplingParams { max_tokens: Some(1), logprobs: Some(3), ..SamplingParams::greedy() };
        let e = plain.engine();
        let id = e.add_request(prompt.to_vec(), params).unwrap();
        let (out, _) = run(e, &[id], |_, _| {});
        let top = &out[0][0].top_logprobs;
        let z: f64 = top.iter().map(|&(_, l)| (l as f64).exp()).sum();
        top.iter().map(|&(t, l)| (t, (l as f64).exp() / z)).collect()
    };
    let prompt = [1u32, 7, 30, 31, 50, 60, 40, 41, 42, 7];
    let first = top3(&prompt);
    let mut want = Vec::new();
    for &(t1, p1) in &first {
        let mut p = prompt.to_vec();
        p.push(t1);
        for (t2, p2) in top3(&p) {
            want.push(((t1, t2), p1 * p2));
        }
    }
    let draft = first[0].0;
    let mut s = Session::new(load(), EngineConfig { max_seqs: 64, max_batch_tokens: 1024, ..Default::default() }).unwrap();
    let e = s.engine();
    let n = 3000;
    let params = |seed| SamplingParams {
        temperature: 1.0,
        top_k: 3,
        top_p: 1.0,
        min_p: 0.0,
        max_tokens: Some(2),
        ignore_eos: true,
        seed: Some(seed),
        ..Default::default()
    };
    let ids: Vec<SeqId> = (0..n)
        .map(|i| {
            let id = e.add_request(prompt.to_vec(), params(i as u64)).unwrap();
            e.propose_draft(id, vec![draft]).unwrap();
            id
        })
        .collect();
    let (out, _) = run(e, &ids, |_, _| {});
    let st = e.stats();
    assert_eq!(st.draft_tokens, n, "every sequence's draft was checked: {st:?}");
    let kept = st.accepted_draft_tokens as f64 / n as f64;
    assert!((kept - first[0].1).abs() < 0.05, "the draft is kept as often as the model samples it: {kept:.3} vs {:.3}", first[0].1);
    let mut chi2 = 0.0;
    for &((t1, t2), p) in &want {
        let seen = out.iter().filter(|o| o[0].token == t1 && o[1].token == t2).count() as f64;
        let expect = p * n as f64;
        chi2 += (seen - expect).powi(2) / expect;
    }
    let covered = out.iter().filter(|o| want.iter().any(|&((a, b), _)| o[0].token == a && o[1].token == b)).count();
    assert_eq!(covered, n, "every sample is one of the 9 top-3 pairs");
    eprintln!("chi-square {chi2:.1} over 9 cells; draft kept {kept:.3}, sampled with p {:.3}", first[0].1);
    assert!(chi2 < 26.1, "the sampled pairs do not follow the model's distribution: chi-square {chi2:.1}");
}
