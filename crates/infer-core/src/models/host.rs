//! The host path: a decoder's whole step on host slices, over buffers kept from step to step.
//!
//! A decoder has two ways to run a step:
//! - **the host path** (this file, each family's `forward_host`): on the CPU with f32 activations
//!   when every weight is on infer's kernels (GGUF quantized or 16-bit weights, safetensors with
//!   `--quantize`) — the usual CPU case. It runs over [`Workspace`] buffers that grow to the largest
//!   batch and are kept, so a step makes no allocation, and calls the kernels directly.
//! - **the tensor path** (each family's `forward_tensors`, built from layers.rs): candle tensors,
//!   for everything else: CUDA and Metal (with infer's CUDA kernels where there is one), dense
//!   f32/f16/bf16 safetensors weights on the CPU (candle's matmul), and comparisons
//!   (`LoadOptions::tensor_path`). Inside it, the element-wise steps on host f32 tensors still take
//!   infer's fused CPU kernels (layers.rs names the tiers of each op).
//!
//! Both compute the same decoder (tests compare them within 1e-3 on every fixture), and
//! [`Decoder`](super::Decoder)'s blanket `CausalLm` implementation picks one per model at load.

use candle_core::{DType, Tensor};

use infer_kernels::cpu::attention::paged_attention;
use infer_kernels::{paged_attention_q8, write_kv, write_kv_q8, Isa, SeqAttention};

use super::layers::{grow, seq_attention_iter, Embeddings, RmsNorm};
use super::BatchInput;
use crate::error::{Error, Result};
use crate::kv_cache::{LayerKv, PagedKvCache};
use crate::weights::{Linear, WeightSource};

/// Attention on host slices (`q`, `out`: `[tokens, heads · head_dim]`; `k`, `v`: `[tokens, kv_heads ·
/// head_dim]`): writes the batch's keys and values into the host cache layer and attends over it.
#[allow(clippy::too_many_arguments)]
pub(crate) fn host_attention_into(
    isa: Isa,
    layer: &mut LayerKv,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    slots: &[usize],
    seqs: &[SeqAttention<'_>],
    shape: &infer_kernels::AttentionShape,
    out: &mut [f32],
) -> Result<()> {
    match layer {
        LayerKv::Host { k: kc, v: vc } => {
            write_kv(k, v, slots, shape, kc, vc);
            paged_attention(isa, q, kc, vc, seqs, shape, out);
        }
        LayerKv::HostF16 { k: kc, v: vc } => {
            write_kv(k, v, slots, shape, kc, vc);
            paged_attention(isa, q, kc, vc, seqs, shape, out);
        }
        LayerKv::HostQ8 { k: kc, ks, v: vc, vs } => {
            write_kv_q8(k, v, slots, shape, (kc, ks), (vc, vs));
            paged_attention_q8(isa, q, (kc, ks), (vc, vs), seqs, shape, out);
        }
        #[allow(unreachable_patterns)]
        _ => return Err(Error::Model("the host decoder path needs a host KV cache".into())),
    }
    Ok(())
}

/// Buffers the host decoder path reuses from step to step: each grows to the largest batch seen and
/// is never given back, so steps no larger than an earlier one allocate nothing. Shapes for a batch
/// of `t` tokens (row-major), `hs` the hidden size, `nh`/`nkv` the query/KV heads of `hd` values,
/// `inter` the MLP's hidden size, `rot` the rotary dimensions.
pub(crate) struct Workspace {
    /// The instruction set the attention kernels run (the matmuls run their weights' own).
    pub(crate) isa: Isa,
    /// The residual stream, `[t, hs]`.
    pub(crate) x: Vec<f32>,
    /// The next residual stream (`x + sublayer output`), `[t, hs]`; swapped with `x`.
    pub(crate) x1: Vec<f32>,
    /// The normed input of the current sublayer, `[t, hs]`.
    pub(crate) h: Vec<f32>,
    /// Queries `[t, nh · hd]`, keys and values `[t, nkv · hd]`.
    pub(crate) q: Vec<f32>,
    pub(crate) k: Vec<f32>,
    pub(crate) v: Vec<f32>,
    /// Attention output before the output projection, `[t, nh · hd]`.
    pub(crate) attn: Vec<f32>,
    /// Attention sublayer output, `[t, hs]`.
    pub(crate) a: Vec<f32>,
    /// MLP gate and up projections `[t, inter]`, and `act(gate) · up`, `[t, inter]`.
    pub(crate) gate: Vec<f32>,
    pub(crate) up: Vec<f32>,
    pub(crate) act: Vec<f32>,
    /// MLP (or experts) sublayer output, `[t, hs]`.
    pub(crate) m: Vec<f32>,
    /// Scratch: a fused projection's output (`[t, nh·hd + 2·nkv·hd]` or `[t, 2 · inter]`), a
    /// normed copy of q or k, or a normed sublayer output `[t, hs]`.
    pub(crate) tmp: Vec<f32>,
    /// Rotary tables of the batch's positions, `[t, rot / 2]`.
    pub(crate) cos: Vec<f32>,
    pub(crate) sin: Vec<f32>,
    /// A second rotary embedding's tables (Gemma 3's local layers), `[t, rot / 2]`.
    pub(crate) cos2: Vec<f32>,
    pub(crate) sin2: Vec<f32>,
    /// The routed experts' buffers (moe.rs).
    pub(crate) moe: super::moe::MoeScratch,
    /// The kernels' view of the batch, one entry per sequence (empty between steps; its memory is kept).
    seqs: Vec<SeqAttention<'static>>,
}

impl std::fmt::Debug for Workspace {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Workspace").field("x", &self.x.capacity()).finish_non_exhaustive()
    }
}

impl Workspace {
    pub(crate) fn new(isa: Isa) -> Self {
        let v = Vec::new;
        #[rustfmt::skip]
        let ws = Self {
            isa, x: v(), x1: v(), h: v(), q: v(), k: v(), v: v(), attn: v(), a: v(), gate: v(), up: v(), act: v(), m: v(),
            tmp: v(), cos: v(), sin: v(), cos2: v(), sin2: v(), moe: Default::default(), seqs: Vec::new(),
        };
        ws
    }

    /// The batch's sequences as the kernels see them, in the workspace's memory; hand the vector
    /// back with [`give_back`](Self::give_back).
    pub(crate) fn seqs<'b>(&mut self, batch: &'b BatchInput) -> Vec<SeqAttention<'b>> {
        let mut v = recycle(std::mem::take(&mut self.seqs));
        v.extend(seq_attention_iter(batch));
        v
    }

    pub(crate) fn give_back(&mut self, seqs: Vec<SeqAttention<'_>>) {
        self.seqs = recycle(seqs);
    }
}

/// An empty vector of `SeqAttention`s of another lifetime in `v`'s memory: collecting an emptied
/// vector's own iterator into a vector of a same-sized type reuses its buffer (no allocation).
fn recycle<'b>(mut v: Vec<SeqAttention<'_>>) -> Vec<SeqAttention<'b>> {
    v.clear();
    v.into_iter().map(|_| unreachable!("emptied")).collect()
}

/// The embedding rows of `tokens` times `scale`, into `x` (`[tokens, hidden]`).
pub(crate) fn embed_host(embed: &Embeddings, tokens: &[u32], hidden: usize, scale: f32, x: &mut Vec<f32>) -> Result<()> {
    embed.rows_into(tokens, scale, grow(x, tokens.len() * hidden))
}

/// The rows `rows` of `x` (`[tokens, hidden]`), normed, through the output head into `logits`
/// (`[rows, vocab]`); `picked` and `normed` are scratch.
#[allow(clippy::too_many_arguments)]
pub(crate) fn head_host(
    x: &[f32],
    hidden: usize,
    rows: &[u32],
    norm: &RmsNorm,
    head: &Linear,
    vocab: usize,
    (picked, normed): (&mut Vec<f32>, &mut Vec<f32>),
    hidden_only: bool,
    logits: &mut Vec<f32>,
) -> Result<()> {
    let picked = grow(picked, rows.len() * hidden);
    for (dst, &r) in picked.chunks_exact_mut(hidden).zip(rows) {
        dst.copy_from_slice(&x[r as usize * hidden..(r as usize + 1) * hidden]);
    }
    if hidden_only {
        logits.resize(rows.len() * hidden, 0.0);
        norm.forward_host(picked, logits);
        return Ok(());
    }
    let normed = grow(normed, rows.len() * hidden);
    norm.forward_host(picked, normed);
    logits.resize(rows.len() * vocab, 0.0);
    head.forward_host(normed, rows.len(), logits)
}

/// [`CausalLm::forward`](super::CausalLm::forward) of a model whose host path writes the logits:
/// them, as a `[logits_rows, vocab]` tensor.
pub(crate) fn logits_tensor(m: &dyn super::CausalLm, batch: &BatchInput, cache: &mut PagedKvCache) -> Result<Tensor> {
    let mut logits = Vec::new();
    m.forward_into(batch, cache, &mut logits)?;
    let width = if batch.hidden { m.config().hidden_size } else { m.config().vocab_size };
    Ok(Tensor::from_vec(logits, (batch.logits_rows.len(), width), &m.device())?)
}

/// Logits from the tensor path into `logits`.
pub(crate) fn tensor_into(t: Tensor, logits: &mut Vec<f32>) -> Result<()> {
    let t = t.to_dtype(DType::F32)?.flatten_all()?;
    logits.clear();
    logits.extend_from_slice(&t.to_vec1::<f32>()?);
    Ok(())
}

/// A decoder's host path: its workspace when the whole model can run on host slices, unless the
/// load options ask for the tensor path ([`KernelChoice::tensor_path`](crate::weights::KernelChoice)).
#[derive(Debug, Default)]
pub(crate) struct HostPath(Option<std::sync::Mutex<Workspace>>);

impl HostPath {
    /// For a model whose layers can (`layers_ok`): on the CPU with f32 activations, host f32
    /// embeddings and final norm, and the output head on infer's kernels.
    pub(crate) fn new(w: &WeightSource, embed: &Embeddings, norm: &RmsNorm, head: &Linear, layers_ok: bool) -> Self {
        let kernels = w.kernels();
        let capable = w.device().is_cpu()
            && w.dtype() == DType::F32
            && embed.on_host()
            && norm.has_host_weight()
            && head.on_infer_kernels()
            && layers_ok;
        Self((capable && !kernels.tensor_path).then(|| std::sync::Mutex::new(Workspace::new(kernels.isa()))))
    }

    pub(crate) fn is_on(&self) -> bool {
        self.0.is_some()
    }

    /// `f` with the workspace, or `None` when the model takes the tensor path.
    pub(crate) fn run(&self, f: impl FnOnce(&mut Workspace) -> Result<()>) -> Option<Result<()>> {
        self.0.as_ref().map(|ws| f(&mut ws.lock().unwrap_or_else(|p| p.into_inner())))
    }
}
