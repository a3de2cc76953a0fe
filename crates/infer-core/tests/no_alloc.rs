//! The per-token path allocates nothing: once a decoder on infer's CPU kernels has run a step at
//! least as large, a decode step, a mixed batch or a prompt chunk of a size seen before makes no
//! heap allocation (counted by a global allocator on the threads that run a step: the caller's and
//! the kernel pool's; rayon's threads, which the tensor path's candle ops use and which may still
//! be winding down after one, are not counted), on every instruction set this CPU has
//! (`KernelChoice::max_isa`). Also: the host path gives the tensor path's logits
//! (`KernelChoice::tensor_path`).

mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

use infer_core::kv_cache::{KvDtype, PagedKvCache};
use infer_core::models::{BatchInput, CausalLm, LogitsWanted};
use infer_core::{Device, Isa, KernelChoice, LoadOptions};

struct Counting;

static COUNTING: AtomicBool = AtomicBool::new(false);
static ALLOCATIONS: AtomicUsize = AtomicUsize::new(0);

thread_local! {
    /// Set on the thread that runs the steps.
    static STEPS_THREAD: Cell<bool> = const { Cell::new(false) };
}

/// Counts an allocation of a counted thread while counting is on.
fn note() {
    if COUNTING.load(Ordering::Relaxed) && (STEPS_THREAD.with(Cell::get) || infer_kernels::cpu::pool::is_worker()) {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
    }
}

// SAFETY: forwards every call to the system allocator unchanged; only counts.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        note();
        System.alloc(layout)
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        note();
        System.alloc_zeroed(layout)
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        note();
        System.realloc(ptr, layout, new_size)
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        System.dealloc(ptr, layout)
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// Allocations made by `f`.
fn count(f: impl FnOnce()) -> usize {
    ALLOCATIONS.store(0, Ordering::SeqCst);
    COUNTING.store(true, Ordering::SeqCst);
    f();
    COUNTING.store(false, Ordering::SeqCst);
    ALLOCATIONS.load(Ordering::SeqCst)
}

fn load(path: &std::path::Path, kernels: KernelChoice) -> Arc<dyn CausalLm> {
    infer_core::load(path.to_str().unwrap(), LoadOptions { kernels, ..Default::default() }).unwrap().model
}

struct Seq {
    table: Vec<u32>,
    tokens: Vec<u32>,
    done: usize,
}

/// A batch of the next `n` tokens of each `(sequence, n)`, every sequence's last row wanted.
fn batch(seqs: &mut [Seq], parts: &[(usize, usize)]) -> BatchInput {
    let mut b = BatchInput::default();
    for &(s, n) in parts {
        let seq = &mut seqs[s];
        b.push_sequence(&seq.tokens[seq.done..seq.done + n], seq.done, &seq.table, 16, LogitsWanted::Last);
        seq.done += n;
    }
    b
}

/// Runs a script of batches; returns the allocations of each step after the warm-up ones, and
/// every step's logits.
/// The KV cache types the model can use: f32, f16, and q8_0 for head sizes that are multiples of 32.
fn kv_types(model: &dyn CausalLm) -> Vec<KvDtype> {
    let mut kinds = vec![KvDtype::F32, KvDtype::F16];
    if model.config().head_dim.is_multiple_of(32) {
        kinds.push(KvDtype::Q8_0);
    }
    kinds
}

fn run(model: &dyn CausalLm, kv: KvDtype) -> (Vec<(String, usize)>, Vec<Vec<f32>>) {
    let cfg = model.config();
    let mut cache = PagedKvCache::new_on(cfg, 16, 40, &Device::Cpu, kv).unwrap();
    let vocab = cfg.vocab_size as u32;
    let mut seqs: Vec<Seq> = (0..3)
        .map(|s| {
            let mut table = Vec::new();
            cache.reserve(&mut table, 160).unwrap();
            let tokens = (0..160u32).map(|i| (i * 7919 + s * 104_729 + 13) % vocab).collect();
            Seq { table, tokens, done: 0 }
        })
        .collect();
    // Warm-up: the largest steps of the script first (a 32-token chunk, a 3-sequence batch, the
    // longest context), so every later step is no larger than one already run.
    let warm: &[&[(usize, usize)]] = &[&[(2, 32)], &[(2, 32)], &[(2, 32)], &[(2, 32)], &[(2, 1)], &[(2, 1)], &[(0, 1), (1, 1), (2, 1)]];
    let script: &[(&str, &[(usize, usize)])] = &[
        ("prompt chunk of 16", &[(0, 16)]),
        ("prompt chunk of 16 of another sequence", &[(1, 16)]),
        ("decode step", &[(0, 1)]),
        ("decode step", &[(0, 1)]),
        ("decode step", &[(0, 1)]),
        ("batch of 2 decode steps", &[(0, 1), (1, 1)]),
        ("decode step and a prompt chunk", &[(0, 1), (1, 8)]),
        ("batch of 3 decode steps", &[(0, 1), (1, 1), (2, 1)]),
        // (AMX machines run 16-bit weights' prompts of 32+ tokens through tile products.)
        ("prompt chunk of 32", &[(1, 32)]),
        ("decode step", &[(1, 1)]),
    ];
    let mut logits = Vec::new();
    let mut all = Vec::new();
    for parts in warm {
        let b = batch(&mut seqs, parts);
        model.forward_into(&b, &mut cache, &mut logits).unwrap();
    }
    let mut counts = Vec::new();
    for (name, parts) in script {
        let b = batch(&mut seqs, parts);
        let n = count(|| model.forward_into(&b, &mut cache, &mut logits).unwrap());
        assert_eq!(logits.len(), parts.len() * vocab as usize, "{name}: one row of logits per sequence");
        assert!(logits.iter().all(|v| v.is_finite()), "{name}: finite logits");
        counts.push((name.to_string(), n));
        all.push(logits.clone());
    }
    (counts, all)
}

#[test]
fn per_token_path_allocates_nothing() {
    STEPS_THREAD.with(|t| t.set(true));
    let mut models: Vec<(String, std::path::PathBuf)> = vec![
        // F16 weights (infer's half matmul), per-head q/k norms.
        ("tiny-qwen3 F16".into(), common::fixture("tiny-qwen3/model-f16.gguf")),
        // Fused qkv and gate/up projections.
        ("tiny-phi3 F16".into(), common::fixture("tiny-phi3/model-f16.gguf")),
        // Routed experts (softmax over all, renormalized top-k in Qwen3-MoE).
        ("tiny-mixtral F16".into(), common::fixture("tiny-mixtral/model-f16.gguf")),
        ("tiny-qwen3-moe F16".into(), common::fixture("tiny-qwen3-moe/model-f16.gguf")),
        // Gemma: soft-capping (2), per-head norms and a local rotary embedding (3), GELU MLP.
        ("tiny-gemma2 F16".into(), common::fixture("tiny-gemma2/model-f16.gguf")),
        ("tiny-gemma3 F16".into(), common::fixture("tiny-gemma3/model-f16.gguf")),
    ];
    if let Some(p) = common::smollm2() {
        // Q4_1 weights (infer's quantized matmul).
        models.push(("SmolLM2-135M Q4_1".into(), p));
    }
    for (name, path) in &models {
        // The tensor path of the same model, for its logits.
        let tensor = load(path, KernelChoice { tensor_path: true, ..Default::default() });
        // Every instruction set's host path allocates nothing (the SIMD ones against the tensor path's logits below).
        for isa in Isa::available().into_iter().filter(|&i| i != Isa::detect()) {
            let capped = load(path, KernelChoice { max_isa: Some(isa), ..Default::default() });
            for kv in kv_types(capped.as_ref()) {
                for (step, n) in run(capped.as_ref(), kv).0 {
                    assert_eq!(n, 0, "{name}, {isa:?}, {kv:?} KV cache: {step} made {n} allocations");
                }
            }
        }
        let host = load(path, KernelChoice::default());
        for kv in kv_types(host.as_ref()) {
            let (counts, host_logits) = run(host.as_ref(), kv);
            for (step, n) in &counts {
                assert_eq!(*n, 0, "{name}, {kv:?} KV cache: {step} made {n} allocations");
            }
            let (tensor_counts, tensor_logits) = run(tensor.as_ref(), kv);
            let tensor_total: usize = tensor_counts.iter().map(|c| c.1).sum();
            assert!(tensor_total > 0, "{name}: the tensor path allocates (so the counter counts)");
            for ((h, t), (step, _)) in host_logits.iter().zip(&tensor_logits).zip(&counts) {
                let diff = h.iter().zip(t).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
                assert!(diff < 1e-3, "{name}, {kv:?}: {step}: host and tensor paths differ by {diff}");
            }
            eprintln!("{name}, {kv:?} KV: {} steps, 0 allocations (tensor path: {tensor_total})", counts.len());
        }
    }
}
