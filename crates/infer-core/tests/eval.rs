//! Perplexity of the real test model against llama.cpp's on the same text, context and stride
//! (`tests/fixtures/eval/smollm2-ppl-llamacpp.json`, from llama-cpp-python's logits).

mod common;

use infer_core::eval::{perplexity, PerplexityOptions};
use infer_core::LoadOptions;

#[test]
fn perplexity_matches_llamacpp_within_one_percent() {
    let Some(path) = common::smollm2() else { return };
    let m = infer_core::load(path.to_str().unwrap(), LoadOptions::default()).unwrap();
    let text = std::fs::read_to_string(common::fixture("eval/python-docs.txt")).unwrap();
    let refs: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(common::fixture("eval/smollm2-ppl-llamacpp.json")).unwrap()).unwrap();
    assert_eq!(m.tokenizer.encode(&text, true).unwrap().len() as u64, refs["text_tokens"].as_u64().unwrap(), "same tokens as llama.cpp");
    for run in refs["runs"].as_array().unwrap() {
        let ctx = run["ctx"].as_u64().unwrap() as usize;
        let stride = run["stride"].as_u64().map(|s| s as usize);
        let r = perplexity(&m, &text, &PerplexityOptions { ctx, stride, ..Default::default() }, &mut |_, _| {}).unwrap();
        let want = run["perplexity"].as_f64().unwrap();
        let rel = (r.perplexity - want).abs() / want;
        eprintln!(
            "ctx {ctx} stride {stride:?}: infer {:.4} ± {:.4}, llama.cpp {want:.4} ± {:.4} ({:.3}% apart, {} tokens scored)",
            r.perplexity,
            r.std_error,
            run["std_error"].as_f64().unwrap(),
            100.0 * rel,
            r.scored_tokens
        );
        assert_eq!(r.scored_tokens as u64, run["scored_tokens"].as_u64().unwrap());
        assert_eq!(r.windows as u64, run["windows"].as_u64().unwrap());
        assert!(rel < 0.01, "ctx {ctx} stride {stride:?}: {} vs llama.cpp {want}", r.perplexity);
        assert!((r.std_error / run["std_error"].as_f64().unwrap() - 1.0).abs() < 0.05, "standard error");
    }
}

#[test]
fn choice_loglikelihoods_equal_hand_computed_ones_from_transformers_logits() {
    // tests/fixtures/eval/tiny-llama-choice-ll.json: scripts/make_eval_choice_refs.py sums the log-softmax
    // of transformers' logits over each choice's tokens after the question.
    let m = infer_core::load(common::fixture("tiny-llama").to_str().unwrap(), LoadOptions::default()).unwrap();
    let infer_core::eval::TaskItems::MultipleChoice(items) =
        infer_core::eval::load_jsonl(&common::fixture("eval/choice.jsonl"), None).unwrap()
    else {
        panic!("multiple choice")
    };
    let refs: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(common::fixture("eval/tiny-llama-choice-ll.json")).unwrap()).unwrap();
    let got = infer_core::eval::choice_loglikelihoods(&m, &items, &mut |_, _| {}).unwrap();
    for (i, (g, want)) in got.per_item.iter().zip(refs["loglikelihoods"].as_array().unwrap()).enumerate() {
        for (c, (a, b)) in g.iter().zip(want.as_array().unwrap()).enumerate() {
            let b = b.as_f64().unwrap();
            assert!((a - b).abs() < 1e-3, "item {i} choice {c}: {a} vs transformers {b}");
        }
    }
}
