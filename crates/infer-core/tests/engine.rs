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
