//! The served models: one loaded at start (the single-model server), or several loaded on demand.
//! With several, a request's `model` picks one; an unloaded model loads at its first request (on
//! a new engine thread; requests for a loading model wait, at most `load_timeout`); at most
//! `models_max` are loaded at once, models of at most `models_mem` bytes together (by their specs'
//! sizes), and a model is not loaded beside others when the system has less memory available than
//! its size: the least recently used idle ones are unloaded to make room (their engine
//! threads are waited out before the next model loads, so their memory does not add up);
//! and a model idle for `keep_alive` is unloaded. A model is in use while anyone holds its
//! [`Ready`]: in-use models are never unloaded.

use std::sync::mpsc::Receiver;
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tokio::sync::Notify;

use crate::{ApiError, AppState, Loaded, Ready};

/// Loads a model (called on the thread that then runs its engine; again after each unload).
pub type LoadFn = Arc<dyn Fn() -> infer_core::Result<Loaded> + Send + Sync>;

/// One model of a several-model server: the name requests use, and how to load it.
#[derive(Clone)]
pub struct ModelSpec {
    pub name: String,
    pub load: LoadFn,
    /// About how many bytes the model takes loaded (0: unknown), for `models_mem`.
    pub size: u64,
}

impl ModelSpec {
    pub fn new<F, M>(name: impl Into<String>, load: F) -> Self
    where
        F: Fn() -> infer_core::Result<M> + Send + Sync + 'static,
        M: Into<Loaded>,
    {
        Self { name: name.into(), load: Arc::new(move || load().map(Into::into)), size: 0 }
    }

    /// With the model's size (e.g. its files' bytes) for `models_mem`.
    pub fn with_size(self, size: u64) -> Self {
        Self { size, ..self }
    }
}

enum Slot {
    /// Not loaded; `error`: why the last load failed.
    Unloaded {
        error: Option<String>,
    },
    Loading,
    /// `exited` disconnects once the model's engine thread has ended (its memory is freed).
    Loaded {
        ready: Arc<Ready>,
        last_used: Instant,
        exited: Option<Receiver<()>>,
    },
}

impl Slot {
    fn state(&self) -> &'static str {
        match self {
            Slot::Unloaded { .. } => "unloaded",
            Slot::Loading => "loading",
            Slot::Loaded { .. } => "loaded",
        }
    }
}

pub(crate) struct Table {
    specs: Vec<ModelSpec>,
    multi: bool,
    slots: Mutex<Vec<Slot>>,
    /// Woken at every change of a slot.
    changed: Notify,
    created: u64,
}

impl Table {
    pub(crate) fn one(load: LoadFn, name: Option<String>) -> Self {
        Self::new(vec![ModelSpec { name: name.unwrap_or_default(), load, size: 0 }], false)
    }

    pub(crate) fn several(specs: Vec<ModelSpec>) -> Self {
        Self::new(specs, true)
    }

    fn new(specs: Vec<ModelSpec>, multi: bool) -> Self {
        let slots = specs.iter().map(|_| if multi { Slot::Unloaded { error: None } } else { Slot::Loading }).collect();
        Self { specs, multi, slots: Mutex::new(slots), changed: Notify::new(), created: crate::routes::now_secs() }
    }

    fn lock(&self) -> MutexGuard<'_, Vec<Slot>> {
        self.slots.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn multi(&self) -> bool {
        self.multi
    }

    /// The single model, once loaded.
    pub(crate) fn single(&self) -> Option<Arc<Ready>> {
        match &self.lock()[0] {
            Slot::Loaded { ready, .. } => Some(ready.clone()),
            _ => None,
        }
    }

    pub(crate) fn single_load(&self) -> LoadFn {
        self.specs[0].load.clone()
    }

    pub(crate) fn set_single(&self, ready: Arc<Ready>) {
        self.lock()[0] = Slot::Loaded { ready, last_used: Instant::now(), exited: None };
    }

    /// Every loaded model.
    pub(crate) fn loaded(&self) -> Vec<Arc<Ready>> {
        self.lock()
            .iter()
            .filter_map(|s| match s {
                Slot::Loaded { ready, .. } => Some(ready.clone()),
                _ => None,
            })
            .collect()
    }

    fn names(&self) -> String {
        self.specs.iter().map(|s| s.name.as_str()).collect::<Vec<_>>().join("`, `")
    }

    /// A request without `model` on a several-model server.
    pub(crate) fn missing_model(&self) -> ApiError {
        ApiError::bad_request(Some("model"), format!("this server serves several models; name one in `model`: `{}`", self.names()))
    }

    pub(crate) fn not_found(&self, name: &str) -> ApiError {
        ApiError::model_not_found(name, &self.names())
    }

    /// Each model's name and whether it is loaded (for `/metrics`).
    pub(crate) fn loaded_states(&self) -> Vec<(String, bool)> {
        let slots = self.lock();
        self.specs.iter().zip(slots.iter()).map(|(spec, slot)| (spec.name.clone(), matches!(slot, Slot::Loaded { .. }))).collect()
    }

    /// `/v1/models` entries: each model with its state (`status.value`: `loaded`, `loading` or
    /// `unloaded`, as llama.cpp's router).
    pub(crate) fn cards(&self, only: Option<&str>) -> Vec<Value> {
        let slots = self.lock();
        self.specs
            .iter()
            .zip(slots.iter())
            .filter(|(spec, _)| only.is_none_or(|n| n == spec.name))
            .map(|(spec, slot)| {
                let mut card = json!({"id": spec.name, "object": "model", "created": self.created, "owned_by": "infer", "status": {"value": slot.state()}});
                match slot {
                    Slot::Loaded { ready, .. } => {
                        card["created"] = json!(ready.created);
                        card["max_model_len"] = json!(ready.max_context);
                    }
                    Slot::Unloaded { error: Some(e) } => card["status"]["failed"] = json!(e),
                    _ => {}
                }
                card
            })
            .collect()
    }
}

/// The loaded models that no request holds, least recently used first.
fn idle_by_age(slots: &[Slot]) -> Vec<usize> {
    let mut idle: Vec<_> = slots
        .iter()
        .enumerate()
        .filter_map(|(i, s)| match s {
            Slot::Loaded { ready, last_used, .. } if Arc::strong_count(ready) == 1 => Some((i, *last_used)),
            _ => None,
        })
        .collect();
    idle.sort_by_key(|&(_, t)| t);
    idle.into_iter().map(|(i, _)| i).collect()
}

enum Seen {
    Loaded(Arc<Ready>),
    Loading,
    Unloaded(Option<String>),
}

/// The model `model` names, loaded first if need be (see the module's notes).
pub(crate) async fn resolve(st: &Arc<AppState>, model: Option<&str>) -> Result<Arc<Ready>, ApiError> {
    let t = &st.models;
    let name = match model {
        Some(m) if !m.is_empty() => m,
        _ => return Err(t.missing_model()),
    };
    let Some(idx) = t.specs.iter().position(|s| s.name == name) else { return Err(t.not_found(name)) };
    let deadline = Instant::now() + st.cfg.load_timeout;
    let mut waited_load = false;
    loop {
        let notified = t.changed.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        let mut start = None;
        {
            let mut slots = t.lock();
            let seen = match &mut slots[idx] {
                Slot::Loaded { ready, last_used, .. } => {
                    *last_used = Instant::now();
                    Seen::Loaded(ready.clone())
                }
                Slot::Loading => Seen::Loading,
                Slot::Unloaded { error } => Seen::Unloaded(error.clone()),
            };
            match seen {
                Seen::Loaded(ready) => return Ok(ready),
                Seen::Loading => waited_load = true,
                Seen::Unloaded(error) => {
                    if let (true, Some(e)) = (waited_load, error) {
                        return Err(ApiError::unavailable(format!("loading model `{name}` failed: {e}")));
                    }
                    // Room by count (`models_max`) and by size (`models_mem`: the models' sizes
                    // as their specs give them): unload least recently used idle models until the
                    // new one fits, only if that makes it fit.
                    let mut used = 0;
                    let mut bytes = 0;
                    for (s, spec) in slots.iter().zip(&t.specs) {
                        if !matches!(s, Slot::Unloaded { .. }) {
                            used += 1;
                            bytes += spec.size;
                        }
                    }
                    // And by the memory the system has left (what unloading frees counted back;
                    // `MemAvailable` or a cgroup limit, read only when a model is to be loaded).
                    let (max, budget, need) = (st.cfg.models_max, st.cfg.models_mem, t.specs[idx].size);
                    let available = if need > 0 { infer_core::memory::available_bytes() } else { None };
                    let over = |used: usize, bytes: u64, freed: u64| {
                        (max != 0 && used >= max)
                            || budget.is_some_and(|b| used > 0 && bytes.saturating_add(need) > b)
                            || available.is_some_and(|a| used > 0 && a.saturating_add(freed) < need)
                    };
                    let mut idle = idle_by_age(&slots);
                    let mut evict = Vec::new();
                    let mut freed = 0;
                    while over(used, bytes, freed) && !idle.is_empty() {
                        let v = idle.remove(0);
                        used -= 1;
                        bytes -= t.specs[v].size;
                        freed += t.specs[v].size;
                        evict.push(v);
                    }
                    if !over(used, bytes, freed) {
                        let mut victims = Vec::new();
                        for v in evict {
                            if let Slot::Loaded { ready, exited, .. } = std::mem::replace(&mut slots[v], Slot::Unloaded { error: None }) {
                                tracing::info!(
                                    "unloading model `{}` (least recently used; --models-max / --models-mem) to load `{name}`",
                                    ready.model_id
                                );
                                victims.push((ready, exited));
                            }
                        }
                        start = Some(victims);
                    }
                    if start.is_some() {
                        slots[idx] = Slot::Loading;
                        waited_load = true;
                    }
                }
            }
        }
        if let Some(victims) = start {
            t.changed.notify_waiters();
            start_load(st, idx, victims);
            continue;
        }
        if st.is_shutting_down() {
            return Err(ApiError::unavailable("the server is shutting down"));
        }
        let now = Instant::now();
        if now >= deadline {
            return Err(ApiError::unavailable(format!(
                "model `{name}` could not be loaded within {:?} (--load-timeout): {}; retry later",
                st.cfg.load_timeout,
                if waited_load {
                    "it is still loading"
                } else {
                    "the loaded models are in use and leave no room (--models-max / --models-mem)"
                }
            )));
        }
        // Woken by a change of state; a model that stops being used wakes nobody, so look again soon.
        let _ = tokio::time::timeout((deadline - now).min(Duration::from_millis(50)), notified).await;
    }
}

/// Loads model `idx` on a new engine thread, after unloading `victim` (and waiting for its engine
/// thread to end).
fn start_load(st: &Arc<AppState>, idx: usize, victims: Vec<(Arc<Ready>, Option<Receiver<()>>)>) {
    let spec = st.models.specs[idx].clone();
    tracing::info!("loading model `{}`", spec.name);
    let victims = Mutex::new(Some(victims));
    let after_unload = st.cfg.after_unload;
    let load: LoadFn = Arc::new(move || {
        if let Some(victims) = victims.lock().unwrap_or_else(|e| e.into_inner()).take().filter(|v| !v.is_empty()) {
            free(victims, after_unload);
        }
        (spec.load)()
    });
    let (alive, exited) = std::sync::mpsc::channel::<()>();
    let weak = Arc::downgrade(st);
    let done = move |r: Result<Arc<Ready>, String>| {
        let Some(st) = weak.upgrade() else { return };
        st.models.lock()[idx] = match r {
            Ok(ready) => Slot::Loaded { ready, last_used: Instant::now(), exited: Some(exited) },
            Err(e) => {
                tracing::warn!("loading model `{}` failed: {e}", st.models.specs[idx].name);
                Slot::Unloaded { error: Some(e) }
            }
        };
        st.models.changed.notify_waiters();
    };
    let name = Some(st.models.specs[idx].name.clone());
    if let Err(e) = crate::spawn_model(st.cfg.clone(), st.metrics.clone(), load, name, Some(alive), done) {
        st.models.lock()[idx] = Slot::Unloaded { error: Some(e) };
        st.models.changed.notify_waiters();
    }
}

/// Drops unloaded models, waits for their engine threads to end, then calls `after_unload`
/// (blocking).
fn free(models: Vec<(Arc<Ready>, Option<Receiver<()>>)>, after_unload: Option<fn()>) {
    let mut exits = Vec::new();
    for (ready, exited) in models {
        drop(ready);
        exits.extend(exited);
    }
    for exited in exits {
        let _ = exited.recv();
    }
    if let Some(f) = after_unload {
        f();
    }
}

/// Unloads models idle for `keep_alive` (idle: no request holds them), until the server goes.
pub(crate) async fn reaper(weak: Weak<AppState>) {
    loop {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let Some(st) = weak.upgrade() else { return };
        let Some(keep) = st.cfg.keep_alive else { return };
        if st.is_shutting_down() {
            return;
        }
        let mut gone = Vec::new();
        {
            let mut slots = st.models.lock();
            for s in slots.iter_mut() {
                let expired = match s {
                    Slot::Loaded { ready, last_used, .. } => {
                        if Arc::strong_count(ready) > 1 {
                            *last_used = Instant::now();
                        }
                        Arc::strong_count(ready) == 1 && last_used.elapsed() >= keep
                    }
                    _ => false,
                };
                if expired {
                    if let Slot::Loaded { ready, exited, .. } = std::mem::replace(s, Slot::Unloaded { error: None }) {
                        tracing::info!("unloading model `{}`: idle for {keep:?} (--keep-alive)", ready.model_id);
                        gone.push((ready, exited));
                    }
                }
            }
        }
        if !gone.is_empty() {
            st.models.changed.notify_waiters();
            // Freeing a model's memory can take a while: off the async workers.
            let after_unload = st.cfg.after_unload;
            tokio::task::spawn_blocking(move || free(gone, after_unload));
        }
    }
}
