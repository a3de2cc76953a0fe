//! The engine thread: owns the [`Engine`], takes submissions and cancellations from the HTTP handlers,
//! and steps the engine while there is work. Each step, new sequences join and finished or cancelled
//! ones leave (continuous batching); tokens go back to each request through its channel.

use std::collections::HashMap;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::mpsc::{Receiver, TryRecvError};
use std::sync::Arc;
use std::time::Instant;

use infer_core::{Engine, EngineStats, SamplingParams, SeqId, TokenConstraint, TokenEvent};
use tokio::sync::{mpsc, oneshot};

use prometheus::{IntGauge, IntGaugeVec};

use crate::metrics::Metrics;

/// What a request's sequences receive.
#[derive(Debug)]
pub enum SeqMsg {
    Token(TokenEvent),
    /// The sequence was stopped by a server-side failure or shutdown.
    Failed {
        seq_id: SeqId,
        message: String,
    },
}

/// One sequence to start: its prompt, sampling and (compiled) constraint.
pub type NewSeq = (Vec<u32>, SamplingParams, Option<Box<dyn TokenConstraint>>);

/// New sequences of one request (`n` choices, or one per prompt).
pub struct Submission {
    pub seqs: Vec<NewSeq>,
    pub arrived: Instant,
    pub events: mpsc::UnboundedSender<SeqMsg>,
    pub reply: oneshot::Sender<Result<Vec<SeqId>, infer_core::Error>>,
}

pub enum Command {
    Submit(Submission),
    /// Drop these sequences now (their client left or the request ended early).
    Cancel(Vec<SeqId>),
    /// Stop every sequence, telling each client why.
    AbortAll(String),
}

struct Tracked {
    events: mpsc::UnboundedSender<SeqMsg>,
    arrived: Instant,
    last_token: Option<Instant>,
}

/// Runs until every command sender is gone. `model` labels this engine's gauges.
pub fn run(engine: Engine, commands: Receiver<Command>, metrics: Arc<Metrics>, model: &str) {
    let mut last_stats = engine.stats();
    let mut shown = Shown { model: model.to_string(), values: [0; 6] };
    update_gauges(&engine, &metrics, &mut last_stats, &mut shown);
    run_engine(engine, commands, &metrics, &mut last_stats, &mut shown);
    // Stopped (unloaded, or the server ends): this engine's share leaves the sums.
    shown.set(&metrics, [0; 6]);
    shown.remove(&metrics);
}

/// The gauge values this engine last reported: queue, running, KV blocks used, free, cached, total.
struct Shown {
    model: String,
    values: [i64; 6],
}

impl Shown {
    fn gauges(m: &Metrics) -> [(&IntGauge, &IntGaugeVec); 6] {
        [
            (&m.queue_length, &m.model_queue_length),
            (&m.running, &m.model_running),
            (&m.kv_blocks_used, &m.model_kv_blocks_used),
            (&m.kv_blocks_free, &m.model_kv_blocks_free),
            (&m.kv_blocks_cached, &m.model_kv_blocks_cached),
            (&m.kv_blocks_total, &m.model_kv_blocks_total),
        ]
    }

    /// Moves the sums by what changed and sets this model's gauges.
    fn set(&mut self, m: &Metrics, values: [i64; 6]) {
        for (((sum, per), old), new) in Self::gauges(m).into_iter().zip(&mut self.values).zip(values) {
            sum.add(new - *old);
            per.with_label_values(&[self.model.as_str()]).set(new);
            *old = new;
        }
    }

    fn remove(&self, m: &Metrics) {
        for (_, per) in Self::gauges(m) {
            let _ = per.remove_label_values(&[self.model.as_str()]);
        }
    }
}

fn run_engine(mut engine: Engine, commands: Receiver<Command>, metrics: &Metrics, last_stats: &mut EngineStats, shown: &mut Shown) {
    let mut seqs: HashMap<SeqId, Tracked> = HashMap::new();
    loop {
        if !engine.has_work() {
            match commands.recv() {
                Ok(cmd) => handle(cmd, &mut engine, &mut seqs, metrics),
                Err(_) => return,
            }
        }
        loop {
            match commands.try_recv() {
                Ok(cmd) => handle(cmd, &mut engine, &mut seqs, metrics),
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Disconnected) => {
                    fail_all(&mut engine, &mut seqs, "the server is shutting down");
                    return;
                }
            }
        }
        if engine.has_work() {
            match catch_unwind(AssertUnwindSafe(|| engine.step())) {
                Ok(Ok(events)) => dispatch(events, &mut engine, &mut seqs, metrics),
                Ok(Err(e)) => {
                    tracing::error!("engine step failed: {e}");
                    let msg = format!("generation failed: {e}");
                    for id in engine.abort_running() {
                        fail(&mut seqs, id, &msg);
                    }
                }
                Err(_) => {
                    tracing::error!("engine step panicked; the running sequences were stopped");
                    for id in engine.abort_running() {
                        fail(&mut seqs, id, "internal error while generating; the request was stopped");
                    }
                }
            }
        }
        update_gauges(&engine, metrics, last_stats, shown);
    }
}

fn handle(cmd: Command, engine: &mut Engine, seqs: &mut HashMap<SeqId, Tracked>, metrics: &Metrics) {
    match cmd {
        Command::Submit(sub) => {
            let mut ids = Vec::with_capacity(sub.seqs.len());
            let mut prompt_tokens = 0;
            for (prompt, params, constraint) in sub.seqs {
                let n = prompt.len();
                match engine.add_constrained_request(prompt, params, constraint) {
                    Ok(id) => {
                        ids.push(id);
                        prompt_tokens += n;
                    }
                    Err(e) => {
                        for id in ids {
                            engine.cancel(id);
                        }
                        let _ = sub.reply.send(Err(e));
                        return;
                    }
                }
            }
            for &id in &ids {
                seqs.insert(id, Tracked { events: sub.events.clone(), arrived: sub.arrived, last_token: None });
            }
            metrics.prompt_tokens.inc_by(prompt_tokens as u64);
            if sub.reply.send(Ok(ids.clone())).is_err() {
                // The client is already gone.
                for id in ids {
                    engine.cancel(id);
                    seqs.remove(&id);
                }
            }
        }
        Command::Cancel(ids) => {
            for id in ids {
                engine.cancel(id);
                seqs.remove(&id);
            }
        }
        Command::AbortAll(reason) => fail_all(engine, seqs, &reason),
    }
}

fn dispatch(events: Vec<TokenEvent>, engine: &mut Engine, seqs: &mut HashMap<SeqId, Tracked>, metrics: &Metrics) {
    let now = Instant::now();
    metrics.generation_tokens.inc_by(events.len() as u64);
    for ev in events {
        let id = ev.seq_id;
        let finished = ev.finish.is_some();
        let Some(t) = seqs.get_mut(&id) else {
            engine.cancel(id);
            continue;
        };
        match t.last_token {
            None => metrics.ttft.observe(now.duration_since(t.arrived).as_secs_f64()),
            Some(prev) => metrics.itl.observe(now.duration_since(prev).as_secs_f64()),
        }
        t.last_token = Some(now);
        let gone = t.events.send(SeqMsg::Token(ev)).is_err();
        if finished {
            metrics.e2e.observe(now.duration_since(t.arrived).as_secs_f64());
            seqs.remove(&id);
        } else if gone {
            // The client disconnected: free the sequence's blocks at once.
            engine.cancel(id);
            seqs.remove(&id);
        }
    }
}

fn fail(seqs: &mut HashMap<SeqId, Tracked>, id: SeqId, message: &str) {
    if let Some(t) = seqs.remove(&id) {
        let _ = t.events.send(SeqMsg::Failed { seq_id: id, message: message.to_string() });
    }
}

fn fail_all(engine: &mut Engine, seqs: &mut HashMap<SeqId, Tracked>, message: &str) {
    let ids: Vec<SeqId> = seqs.keys().copied().collect();
    for id in ids {
        engine.cancel(id);
        fail(seqs, id, message);
    }
}

fn update_gauges(engine: &Engine, m: &Metrics, last: &mut EngineStats, shown: &mut Shown) {
    let cache = engine.cache();
    shown.set(
        m,
        [
            engine.num_waiting() as i64,
            engine.num_running() as i64,
            cache.num_used_blocks() as i64,
            cache.num_free_blocks() as i64,
            cache.num_cached_blocks() as i64,
            cache.num_blocks() as i64,
        ],
    );
    let s = engine.stats();
    m.prefix_lookup_tokens.inc_by((s.prefix_lookup_tokens - last.prefix_lookup_tokens) as u64);
    m.prefix_hit_tokens.inc_by((s.prefix_hit_tokens - last.prefix_hit_tokens) as u64);
    m.preemptions.inc_by((s.preemptions - last.preemptions) as u64);
    // Rates over every engine since start (the counters are sums; engines come and go).
    let (looked, hit) = (m.prefix_lookup_tokens.get(), m.prefix_hit_tokens.get());
    if looked > 0 {
        m.prefix_hit_rate.set(hit as f64 / looked as f64);
    }
    m.spec_draft_tokens.inc_by((s.draft_tokens - last.draft_tokens) as u64);
    m.spec_accepted_tokens.inc_by((s.accepted_draft_tokens - last.accepted_draft_tokens) as u64);
    let (drafted, kept) = (m.spec_draft_tokens.get(), m.spec_accepted_tokens.get());
    if drafted > 0 {
        m.spec_acceptance_rate.set(kept as f64 / drafted as f64);
    }
    *last = s;
}
