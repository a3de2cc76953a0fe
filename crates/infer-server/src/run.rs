//! One request's sequences inside the engine: submission with admission control, the stream of their
//! tokens, and a guard that cancels whatever is unfinished when the request goes away (a client that
//! disconnects mid-stream has its sequences cancelled and their KV blocks freed at once).

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use infer_core::{FinishReason, SeqId, TokenEvent};
use tokio::sync::{mpsc, oneshot};

use crate::error::ApiError;
use crate::worker::{Command, NewSeq, SeqMsg, Submission};
use crate::{AppState, Ready};

/// The live sequences of one request; dropping it cancels the unfinished ones.
pub struct Run {
    state: Arc<AppState>,
    /// The model (holding it keeps its engine running and the model loaded).
    ready: Arc<Ready>,
    rx: mpsc::UnboundedReceiver<SeqMsg>,
    /// Sequence id → choice index.
    index: HashMap<SeqId, usize>,
    unfinished: Vec<SeqId>,
    slots: usize,
}

/// One generated token for choice `index`.
pub struct ChoiceToken {
    pub index: usize,
    pub event: TokenEvent,
}

/// Everything one choice produced.
#[derive(Debug, Default, Clone)]
pub struct ChoiceOutput {
    pub text: String,
    pub tokens: Vec<TokenEvent>,
    pub finish: Option<FinishReason>,
}

impl Run {
    /// Queues the sequences (one per choice), or answers 429 when the server is full.
    pub async fn submit(state: &Arc<AppState>, ready: &Arc<Ready>, seqs: Vec<NewSeq>) -> Result<Run, ApiError> {
        let k = seqs.len();
        // Each model's engine has its own limit; the server's count is for shutdown's drain.
        let limit = state.cfg.engine.max_seqs + state.cfg.max_queue;
        let before = ready.inflight.fetch_add(k, Ordering::SeqCst);
        if before + k > limit {
            ready.inflight.fetch_sub(k, Ordering::SeqCst);
            return Err(ApiError::too_many_requests(format!(
                "the server is busy: {before} sequences running or queued and this request adds {k} (limit {limit} = --max-seqs {} + --max-queue {}); retry shortly",
                state.cfg.engine.max_seqs, state.cfg.max_queue
            )));
        }
        let (tx, rx) = mpsc::unbounded_channel();
        let (reply, answer) = oneshot::channel();
        let Some(commands) = ready.commands.clone() else {
            ready.inflight.fetch_sub(k, Ordering::SeqCst);
            return Err(ApiError::internal("this model has no engine"));
        };
        state.inflight.fetch_add(k, Ordering::SeqCst);
        let mut run = Run { state: state.clone(), ready: ready.clone(), rx, index: HashMap::new(), unfinished: Vec::new(), slots: k };
        if commands.send(Command::Submit(Submission { seqs, arrived: Instant::now(), events: tx, reply })).is_err() {
            return Err(ApiError::unavailable("the engine has stopped; the server is shutting down"));
        }
        let ids = answer.await.map_err(|_| ApiError::unavailable("the engine has stopped; the server is shutting down"))??;
        run.index = ids.iter().enumerate().map(|(i, &id)| (id, i)).collect();
        run.unfinished = ids;
        Ok(run)
    }

    /// How many choices (sequences) this run has.
    pub fn num_choices(&self) -> usize {
        self.index.len()
    }

    /// The next token of any choice; `None` once every choice has finished. An `Err` ends the run.
    pub async fn next(&mut self) -> Option<Result<ChoiceToken, String>> {
        if self.unfinished.is_empty() {
            return None;
        }
        match self.rx.recv().await {
            Some(SeqMsg::Token(event)) => {
                if event.finish.is_some() {
                    self.unfinished.retain(|&id| id != event.seq_id);
                    self.release_if_done();
                }
                let index = *self.index.get(&event.seq_id)?;
                Some(Ok(ChoiceToken { index, event }))
            }
            Some(SeqMsg::Failed { seq_id, message }) => {
                self.unfinished.retain(|&id| id != seq_id);
                self.release_if_done();
                Some(Err(message))
            }
            None => Some(Err("the engine stopped".into())),
        }
    }

    /// Once every sequence has finished, its admission slots are free for other requests, even if
    /// this response is still being written to a slow (or stalled) client.
    fn release_if_done(&mut self) {
        if self.unfinished.is_empty() {
            let slots = std::mem::take(&mut self.slots);
            self.release(slots);
        }
    }

    fn release(&self, slots: usize) {
        self.ready.inflight.fetch_sub(slots, Ordering::SeqCst);
        self.state.inflight.fetch_sub(slots, Ordering::SeqCst);
    }

    /// Waits for every choice to finish.
    pub async fn collect(mut self) -> Result<Vec<ChoiceOutput>, ApiError> {
        let mut out = vec![ChoiceOutput::default(); self.index.len()];
        while let Some(step) = self.next().await {
            let ChoiceToken { index, event } = step.map_err(ApiError::internal)?;
            let c = &mut out[index];
            c.text.push_str(&event.text);
            c.finish = event.finish;
            c.tokens.push(event);
        }
        Ok(out)
    }
}

impl Drop for Run {
    fn drop(&mut self) {
        if !self.unfinished.is_empty() {
            if let Some(c) = &self.ready.commands {
                let _ = c.send(Command::Cancel(std::mem::take(&mut self.unfinished)));
            }
        }
        self.release(self.slots);
    }
}
