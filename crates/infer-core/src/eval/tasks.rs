//! JSON Lines tasks.
//! - `{"prompt" | "messages", "answer"}`: greedy generation (the chat template applied when the model
//!   has one) through the batched engine, scored by exact match (after trimming), contains
//!   (case-insensitive) or a regex (`answer` is the pattern).
//! - `{"question", "choices", "answer"}`: multiple choice, each choice scored by its log-likelihood
//!   after the question (`question + " " + choice`, the continuation's tokens being those past the
//!   question's, as lm-evaluation-harness does); accuracy by the raw log-likelihood and by the
//!   log-likelihood per character of the choice (acc_norm). `answer` is the index of the right
//!   choice or its text.

use std::collections::HashMap;
use std::path::Path;
use std::time::Instant;

use candle_core::DType;
use serde_json::Value;

use crate::chat::ChatMessage;
use crate::engine::{Engine, EngineConfig};
use crate::error::{Error, Result};
use crate::kv_cache::{default_cache_dtype, PagedKvCache};
use crate::loader::LoadedModel;
use crate::models::{BatchInput, LogitsWanted};
use crate::sampling::{logsumexp, SamplingParams};

/// The kind of a JSON Lines file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Task {
    Generation,
    MultipleChoice,
}

/// A generation item: a conversation (or one user prompt) and the expected answer.
#[derive(Debug, Clone, PartialEq)]
pub struct GenerationItem {
    pub messages: Vec<ChatMessage>,
    /// The prompt as given, for models without a chat template.
    pub raw_prompt: Option<String>,
    pub answer: String,
}

/// A multiple-choice item.
#[derive(Debug, Clone, PartialEq)]
pub struct ChoiceItem {
    pub question: String,
    pub choices: Vec<String>,
    /// Index of the right choice.
    pub answer: usize,
}

/// The items of a JSON Lines file.
#[derive(Debug, Clone, PartialEq)]
pub enum TaskItems {
    Generation(Vec<GenerationItem>),
    MultipleChoice(Vec<ChoiceItem>),
}

/// How a generated answer is compared with the expected one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MatchMode {
    Exact,
    Contains,
    Regex,
}

impl std::str::FromStr for MatchMode {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "exact" => Ok(Self::Exact),
            "contains" => Ok(Self::Contains),
            "regex" => Ok(Self::Regex),
            _ => Err(Error::param("match", format!("`{s}` is not one of exact, contains, regex"))),
        }
    }
}

/// What a task run measured.
#[derive(Debug, Clone, PartialEq)]
pub struct TaskResult {
    /// Items answered right (generation), or by the raw log-likelihood (multiple choice).
    pub correct: usize,
    /// Multiple choice: items right by the log-likelihood per character.
    pub correct_norm: Option<usize>,
    pub total: usize,
    /// Per item: the generated text, or the chosen index (raw).
    pub outputs: Vec<String>,
    /// Prompt and generated (or scored) tokens per second.
    pub tokens_per_second: f64,
}

fn string_field(v: &Value, key: &str, line: usize) -> Result<Option<String>> {
    match v.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(other) => Err(bad_line(line, format!("`{key}` must be a string, found {other}"))),
    }
}

fn bad_line(line: usize, msg: String) -> Error {
    Error::param("data", format!("line {line}: {msg}"))
}

/// Reads a JSON Lines file (the task is the one its first item has; every line must agree).
pub fn load_jsonl(path: &Path, limit: Option<usize>) -> Result<TaskItems> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let (mut gen, mut mc) = (Vec::new(), Vec::new());
    let mut task = None;
    for (i, raw) in text.lines().enumerate() {
        let line = i + 1;
        if raw.trim().is_empty() {
            continue;
        }
        if limit.is_some_and(|l| gen.len() + mc.len() >= l) {
            break;
        }
        let v: Value = serde_json::from_str(raw).map_err(|e| bad_line(line, format!("not valid JSON: {e}")))?;
        if !v.is_object() {
            return Err(bad_line(line, "each line must be a JSON object".into()));
        }
        let this = if v.get("choices").is_some() { Task::MultipleChoice } else { Task::Generation };
        match task {
            None => task = Some(this),
            Some(t) if t != this => {
                return Err(bad_line(line, format!("a {this:?} item in a file whose first item is {t:?}; use one task per file")))
            }
            _ => {}
        }
        match this {
            Task::MultipleChoice => {
                let question = string_field(&v, "question", line)?.ok_or_else(|| bad_line(line, "`question` is missing".into()))?;
                let choices: Vec<String> = v["choices"]
                    .as_array()
                    .and_then(|a| a.iter().map(|c| c.as_str().map(str::to_string)).collect())
                    .ok_or_else(|| bad_line(line, "`choices` must be an array of strings".into()))?;
                if choices.len() < 2 {
                    return Err(bad_line(line, format!("{} choice(s): a multiple-choice item needs at least 2", choices.len())));
                }
                let answer = match v.get("answer") {
                    Some(Value::Number(n)) => n.as_u64().map(|n| n as usize).filter(|&n| n < choices.len()),
                    Some(Value::String(s)) => choices.iter().position(|c| c == s),
                    _ => None,
                }
                .ok_or_else(|| bad_line(line, "`answer` must be the index of a choice or one of the choices".into()))?;
                mc.push(ChoiceItem { question, choices, answer });
            }
            Task::Generation => {
                let answer = match v.get("answer") {
                    Some(Value::String(s)) => s.clone(),
                    Some(Value::Number(n)) => n.to_string(),
                    _ => return Err(bad_line(line, "`answer` (a string) is missing".into())),
                };
                let (messages, raw_prompt) = if let Some(p) = string_field(&v, "prompt", line)? {
                    (vec![ChatMessage::user(p.clone())], Some(p))
                } else if let Some(m) = v.get("messages") {
                    let msgs: Vec<ChatMessage> = serde_json::from_value(m.clone())
                        .map_err(|e| bad_line(line, format!("`messages` must be [{{\"role\", \"content\"}}, ...]: {e}")))?;
                    if msgs.is_empty() {
                        return Err(bad_line(line, "`messages` is empty".into()));
                    }
                    (msgs, None)
                } else {
                    return Err(bad_line(line, "an item needs `prompt` or `messages` (generation) or `question` and `choices`".into()));
                };
                gen.push(GenerationItem { messages, raw_prompt, answer });
            }
        }
    }
    match task {
        None => Err(Error::param("data", format!("{}: no items", path.display()))),
        Some(Task::Generation) => Ok(TaskItems::Generation(gen)),
        Some(Task::MultipleChoice) => Ok(TaskItems::MultipleChoice(mc)),
    }
}

/// Whether `output` answers `answer` under `mode`.
fn matches(output: &str, answer: &str, mode: MatchMode, re: Option<&regex::Regex>) -> bool {
    match mode {
        MatchMode::Exact => output.trim() == answer.trim(),
        MatchMode::Contains => output.to_lowercase().contains(&answer.trim().to_lowercase()),
        MatchMode::Regex => re.is_some_and(|r| r.is_match(output)),
    }
}

/// How many `outputs` answer their items under `mode`.
pub fn score_generation(items: &[GenerationItem], outputs: &[String], mode: MatchMode) -> Result<usize> {
    let mut correct = 0;
    for (i, (it, out)) in items.iter().zip(outputs).enumerate() {
        let re = match mode {
            MatchMode::Regex => Some(
                regex::Regex::new(&it.answer)
                    .map_err(|e| Error::param("data", format!("item {}: `answer` is not a valid regex: {e}", i + 1)))?,
            ),
            _ => None,
        };
        correct += usize::from(matches(out, &it.answer, mode, re.as_ref()));
    }
    Ok(correct)
}

/// Greedy answers to every item through the batched engine (at most `max_tokens` each), scored.
pub fn run_generation(
    m: &LoadedModel,
    items: &[GenerationItem],
    mode: MatchMode,
    max_tokens: usize,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<TaskResult> {
    // Check the patterns before generating anything.
    let _patterns: Vec<Option<regex::Regex>> = items
        .iter()
        .enumerate()
        .map(|(i, it)| match mode {
            MatchMode::Regex => regex::Regex::new(&it.answer)
                .map(Some)
                .map_err(|e| Error::param("data", format!("item {}: `answer` is not a valid regex: {e}", i + 1))),
            _ => Ok(None),
        })
        .collect::<Result<_>>()?;
    let prompts = items
        .iter()
        .map(|it| match (&m.chat_template, &it.raw_prompt) {
            (Some(t), _) => m.tokenizer.encode(&t.render(&it.messages, true)?, false),
            (None, Some(p)) => m.tokenizer.encode(p, true),
            (None, None) => {
                let text: String = it.messages.iter().map(|msg| format!("{}\n", msg.content)).collect();
                m.tokenizer.encode(&text, true)
            }
        })
        .collect::<Result<Vec<_>>>()?;
    // The KV cache is sized for what runs: 16 sequences of the longest prompt and answer.
    let longest = prompts.iter().map(Vec::len).max().unwrap_or(0).saturating_add(max_tokens).saturating_add(1);
    let context = m.model.config().max_position_embeddings.min(longest).max(2);
    let cfg = EngineConfig { max_seqs: 16, max_context: Some(context), ..Default::default() };
    let mut engine = Engine::new(m.model.clone(), m.tokenizer.clone(), m.eos_token_ids.clone(), cfg)?;
    let mut ids = HashMap::new();
    let mut tokens = 0usize;
    let params = SamplingParams { max_tokens: Some(max_tokens), ..SamplingParams::greedy() };
    for (i, prompt) in prompts.into_iter().enumerate() {
        tokens += prompt.len();
        ids.insert(engine.add_request(prompt, params.clone())?, i);
    }
    let mut outputs = vec![String::new(); items.len()];
    let mut done = 0;
    let t0 = Instant::now();
    while engine.has_work() {
        for ev in engine.step()? {
            let i = ids[&ev.seq_id];
            outputs[i].push_str(&ev.text);
            tokens += 1;
            if ev.finish.is_some() {
                done += 1;
                progress(done, items.len());
            }
        }
    }
    let correct = score_generation(items, &outputs, mode)?;
    Ok(TaskResult {
        correct,
        correct_norm: None,
        total: items.len(),
        outputs,
        tokens_per_second: tokens as f64 / t0.elapsed().as_secs_f64().max(1e-9),
    })
}

/// Log-likelihood of each `(context, continuation)` token pair list, several per forward pass.
fn loglikelihoods(
    m: &LoadedModel,
    pairs: &[(Vec<u32>, Vec<u32>)],
    batch_tokens: usize,
    progress: &mut dyn FnMut(usize),
) -> Result<Vec<f64>> {
    let cfg = m.model.config();
    let device = m.model.device();
    let kv_dtype = default_cache_dtype(&device, m.model.dtype());
    let block = 16;
    let mut out = Vec::with_capacity(pairs.len());
    let mut i = 0;
    while i < pairs.len() {
        // As many sequences as fit in the token budget (at least one).
        let mut j = i;
        let mut n = 0;
        while j < pairs.len() && (j == i || n + pairs[j].0.len() + pairs[j].1.len() <= batch_tokens) {
            n += pairs[j].0.len() + pairs[j].1.len();
            j += 1;
        }
        let blocks: usize = pairs[i..j].iter().map(|(c, k)| (c.len() + k.len()).div_ceil(block)).sum();
        let mut cache = PagedKvCache::new_on(cfg, block, blocks.max(1), &device, kv_dtype)?;
        let mut batch = BatchInput::default();
        let mut targets = Vec::new();
        for (ctx, cont) in &pairs[i..j] {
            let seq: Vec<u32> = ctx.iter().chain(cont).copied().collect();
            if seq.len() > cfg.max_position_embeddings {
                return Err(Error::param(
                    "data",
                    format!("an item of {} tokens exceeds the model's context of {}", seq.len(), cfg.max_position_embeddings),
                ));
            }
            let mut table = Vec::new();
            cache.reserve(&mut table, seq.len())?;
            let row0 = batch.num_tokens();
            batch.push_sequence(&seq, 0, &table, block, LogitsWanted::None);
            // The logits at position p predict token p + 1: the continuation's tokens.
            let mut t = Vec::new();
            for (k, &tok) in cont.iter().enumerate() {
                batch.logits_rows.push((row0 + ctx.len() + k - 1) as u32);
                t.push(tok);
            }
            targets.push(t);
        }
        let logits = m.model.forward(&batch, &mut cache)?.to_dtype(DType::F32)?.to_vec2::<f32>()?;
        let mut r = 0;
        for t in targets {
            let mut ll = 0f64;
            for &tok in &t {
                let row = &logits[r];
                ll += (row[tok as usize] - logsumexp(row)) as f64;
                r += 1;
            }
            out.push(ll);
        }
        progress(j);
        i = j;
    }
    Ok(out)
}

/// The log-likelihoods of every choice of every item after its question.
#[derive(Debug, Clone, PartialEq)]
pub struct ChoiceLogLikelihoods {
    /// `[item][choice]`.
    pub per_item: Vec<Vec<f64>>,
    /// Tokens run through the model to get them.
    pub tokens: usize,
}

/// The log-likelihood of every choice of every item after its question.
pub fn choice_loglikelihoods(
    m: &LoadedModel,
    items: &[ChoiceItem],
    progress: &mut dyn FnMut(usize, usize),
) -> Result<ChoiceLogLikelihoods> {
    let mut pairs = Vec::new();
    for it in items {
        let ctx = m.tokenizer.encode(&it.question, true)?;
        if ctx.is_empty() {
            return Err(Error::param("data", "an empty question tokenizes to nothing; give each item a question".to_string()));
        }
        for c in &it.choices {
            let whole = m.tokenizer.encode(&format!("{} {}", it.question, c), true)?;
            // The continuation: the tokens past the question's (a merge across the boundary moves
            // the split back to the first differing token).
            let split = ctx.iter().zip(&whole).take_while(|(a, b)| a == b).count().min(whole.len().saturating_sub(1)).max(1);
            pairs.push((whole[..split].to_vec(), whole[split..].to_vec()));
        }
    }
    let total_pairs = pairs.len();
    let lls = loglikelihoods(m, &pairs, 2048, &mut |done| progress(done, total_pairs))?;
    let mut k = 0;
    let per_item = items
        .iter()
        .map(|it| {
            k += it.choices.len();
            lls[k - it.choices.len()..k].to_vec()
        })
        .collect();
    Ok(ChoiceLogLikelihoods { per_item, tokens: pairs.iter().map(|(a, b)| a.len() + b.len()).sum() })
}

/// Right answers by the raw log-likelihood and by the log-likelihood per character, and the raw
/// pick of each item, from the choices' log-likelihoods (`[item][choice]`).
pub fn score_choice(items: &[ChoiceItem], lls: &[Vec<f64>]) -> (usize, usize, Vec<String>) {
    let (mut correct, mut correct_norm) = (0, 0);
    let mut picks = Vec::new();
    for (it, ll) in items.iter().zip(lls) {
        let best = |score: &dyn Fn(usize) -> f64| (0..ll.len()).max_by(|&a, &b| score(a).total_cmp(&score(b))).unwrap_or(0);
        let raw = best(&|c| ll[c]);
        let norm = best(&|c| ll[c] / (it.choices[c].chars().count().max(1) as f64));
        correct += usize::from(raw == it.answer);
        correct_norm += usize::from(norm == it.answer);
        picks.push(raw.to_string());
    }
    (correct, correct_norm, picks)
}

/// Scores every choice of every item by its log-likelihood after the question.
pub fn run_choice(m: &LoadedModel, items: &[ChoiceItem], progress: &mut dyn FnMut(usize, usize)) -> Result<TaskResult> {
    let t0 = Instant::now();
    let ll = choice_loglikelihoods(m, items, progress)?;
    let (correct, correct_norm, outputs) = score_choice(items, &ll.per_item);
    Ok(TaskResult {
        correct,
        correct_norm: Some(correct_norm),
        total: items.len(),
        outputs,
        tokens_per_second: ll.tokens as f64 / t0.elapsed().as_secs_f64().max(1e-9),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(name: &str, text: &str) -> std::path::PathBuf {
        let p = std::env::temp_dir().join(format!("infer-eval-{}-{name}", std::process::id()));
        std::fs::write(&p, text).unwrap();
        p
    }

    #[test]
    fn jsonl_items_and_errors_name_the_line() {
        let p = write(
            "ok.jsonl",
            "{\"prompt\":\"2+2?\",\"answer\":\"4\"}\n\n{\"messages\":[{\"role\":\"user\",\"content\":\"hi\"}],\"answer\":\"hello\"}\n",
        );
        let TaskItems::Generation(g) = load_jsonl(&p, None).unwrap() else { panic!("generation") };
        assert_eq!(g.len(), 2);
        assert_eq!(g[1].messages, vec![ChatMessage::user("hi")]);
        let p = write("mc.jsonl", "{\"question\":\"Sky?\",\"choices\":[\"blue\",\"green\"],\"answer\":\"blue\"}\n{\"question\":\"Q\",\"choices\":[\"a\",\"b\"],\"answer\":1}\n");
        let TaskItems::MultipleChoice(c) = load_jsonl(&p, Some(1)).unwrap() else { panic!("choice") };
        assert_eq!((c.len(), c[0].answer), (1, 0));
        for (text, needle) in [
            ("{\"prompt\":\"x\",\"answer\":\"y\"}\nnot json\n", "line 2: not valid JSON"),
            ("{\"prompt\":\"x\"}\n", "line 1: `answer`"),
            ("{\"question\":\"q\",\"choices\":[\"a\",\"b\"],\"answer\":5}\n", "line 1: `answer` must be the index"),
            ("{\"question\":\"q\",\"choices\":[\"a\"],\"answer\":0}\n", "at least 2"),
            (
                "{\"prompt\":\"x\",\"answer\":\"y\"}\n{\"question\":\"q\",\"choices\":[\"a\",\"b\"],\"answer\":0}\n",
                "line 2: a MultipleChoice item",
            ),
            ("[1,2]\n", "line 1: each line must be a JSON object"),
        ] {
            let err = load_jsonl(&write("bad.jsonl", text), None).unwrap_err().to_string();
            assert!(err.contains(needle), "{err}");
        }
    }

    #[test]
    fn match_modes() {
        let re = regex::Regex::new(r"\b4\b").unwrap();
        assert!(matches(" 4\n", "4", MatchMode::Exact, None));
        assert!(!matches("It is 4.", "4", MatchMode::Exact, None));
        assert!(matches("The answer is PARIS.", "paris", MatchMode::Contains, None));
        assert!(matches("It is 4.", r"\b4\b", MatchMode::Regex, Some(&re)));
        assert!(!matches("It is 42.", r"\b4\b", MatchMode::Regex, Some(&re)));
    }
}
