//! Building blocks the decoders share: RMSNorm (fused with the residual add on CUDA), SiLU·mul,
//! and attention over the paged KV cache (CPU kernels over a host cache, CUDA kernels over a device
//! cache) with what one forward pass's layers share.

use candle_core::{DType, Device, Tensor};

use infer_kernels::{paged_attention, write_kv, KvElem, SeqAttention};

use super::BatchInput;
use crate::error::{Error, Result};
use crate::kv_cache::{LayerKv, PagedKvCache};
use crate::weights::{host_f32, Linear, WeightSource};

#[derive(Debug, Clone)]
pub(crate) struct RmsNorm {
    pub(crate) weight: Tensor,
    eps: f32,
}

impl RmsNorm {
    pub(crate) fn load(w: &WeightSource, name: &str, dim: usize, eps: f64) -> Result<Self> {
        Ok(Self { weight: w.tensor(name, &[dim])?, eps: eps as f32 })
    }
    pub(crate) fn forward(&self, x: &Tensor) -> Result<Tensor> {
        #[cfg(feature = "cuda")]
        if x.device().is_cuda() {
            return Ok(infer_kernels::cuda::rms_norm(&x.contiguous()?, &self.weight, self.eps)?);
        }
        if let (Some(xv), true) = (host_f32(x), self.is_host()) {
            let mut out = vec![0f32; xv.len()];
            self.forward_host(xv.get(), &mut out);
            return Ok(Tensor::from_vec(out, x.shape(), x.device())?);
        }
        Ok(candle_nn::ops::rms_norm(x, &self.weight, self.eps)?)
    }

    /// `(x + a, norm(x + a))`: the residual add and the norm after it (one kernel on CUDA).
    pub(crate) fn add_forward(&self, x: &Tensor, a: &Tensor) -> Result<(Tensor, Tensor)> {
        #[cfg(feature = "cuda")]
        if x.device().is_cuda() {
            return Ok(infer_kernels::cuda::add_rms_norm(&x.contiguous()?, &a.contiguous()?, &self.weight, self.eps)?);
        }
        if let (true, Some(xv), Some(av), true) = (x.shape() == a.shape(), host_f32(x), host_f32(a), self.is_host()) {
            let (mut sum, mut out) = (vec![0f32; xv.len()], vec![0f32; xv.len()]);
            self.add_forward_host(xv.get(), av.get(), &mut sum, &mut out);
            return Ok((Tensor::from_vec(sum, x.shape(), x.device())?, Tensor::from_vec(out, x.shape(), x.device())?));
        }
        let x = (x + a)?;
        let h = self.forward(&x)?;
        Ok((x, h))
    }

    /// Whether the weight is f32 in host memory (for the `_host` methods).
    pub(crate) fn is_host(&self) -> bool {
        host_f32(&self.weight).is_some()
    }

    /// `out = norm(x)` over host rows (`x`, `out`: `[rows, dim]`); the weight must be [`is_host`](Self::is_host).
    pub(crate) fn forward_host(&self, x: &[f32], out: &mut [f32]) {
        let w = host_f32(&self.weight).expect("a host norm weight");
        infer_kernels::fused::rms_norm(x, w.get(), self.eps, out);
    }

    /// `sum = x + a`, `out = norm(sum)` over host rows.
    pub(crate) fn add_forward_host(&self, x: &[f32], a: &[f32], sum: &mut [f32], out: &mut [f32]) {
        let w = host_f32(&self.weight).expect("a host norm weight");
        infer_kernels::fused::add_rms_norm(x, a, w.get(), self.eps, sum, out);
    }
}

/// SiLU(gate) · up (one kernel on CUDA).
pub(crate) fn silu_mul(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if gate.device().is_cuda() {
        return Ok(infer_kernels::cuda::silu_mul(&gate.contiguous()?, &up.contiguous()?)?);
    }
    if let (true, Some(g), Some(u)) = (gate.shape() == up.shape(), host_f32(gate), host_f32(up)) {
        let mut out = vec![0f32; g.len()];
        let n = gate.dims().last().copied().unwrap_or(1).max(1);
        infer_kernels::fused::silu_mul(g.get(), u.get(), n, &mut out);
        return Ok(Tensor::from_vec(out, gate.shape(), gate.device())?);
    }
    Ok((gate.silu()? * up)?)
}

/// SiLU of the first half of each row of `gate_up` (`[rows, 2n]`) times the second half.
pub(crate) fn silu_mul_fused(gate_up: &Tensor) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if gate_up.device().is_cuda() {
        return Ok(infer_kernels::cuda::silu_mul_fused(&gate_up.contiguous()?)?);
    }
    let (rows, n2) = gate_up.dims2()?;
    let n = n2 / 2;
    if let (true, Some(gu)) = (n > 0, host_f32(gate_up)) {
        let mut out = vec![0f32; rows * n];
        infer_kernels::fused::silu_mul_fused(gu.get(), n, &mut out);
        return Ok(Tensor::from_vec(out, (rows, n), gate_up.device())?);
    }
    silu_mul(&gate_up.narrow(1, 0, n)?, &gate_up.narrow(1, n, n)?)
}

/// Checks that the batch has tokens and that they are in the vocabulary.
pub(crate) fn check_tokens(batch: &BatchInput, vocab_size: usize) -> Result<()> {
    if batch.tokens.is_empty() {
        return Err(Error::Model("empty batch".into()));
    }
    if let Some(&bad) = batch.tokens.iter().find(|&&t| t as usize >= vocab_size) {
        return Err(Error::Model(format!("token id {bad} is outside the vocabulary (size {vocab_size})")));
    }
    Ok(())
}

/// The batch's token ids and positions on `device`, after [`check_tokens`].
pub(crate) fn batch_tensors(batch: &BatchInput, vocab_size: usize, device: &Device) -> Result<(Tensor, Tensor)> {
    check_tokens(batch, vocab_size)?;
    Ok((Tensor::new(batch.tokens.as_slice(), device)?, Tensor::new(batch.positions.as_slice(), device)?))
}

/// The rows of `x` whose logits the batch wants, or `None` when it wants none (prefill chunks that
/// do not reach their sequence's end).
pub(crate) fn wanted_rows(x: &Tensor, batch: &BatchInput) -> Result<Option<Tensor>> {
    if batch.logits_rows.is_empty() {
        return Ok(None);
    }
    let rows = Tensor::new(batch.logits_rows.as_slice(), x.device())?;
    Ok(Some(x.index_select(&rows, 0)?))
}

/// What every layer of one forward pass shares.
pub(crate) struct Step<'a> {
    pub(crate) batch: &'a BatchInput,
    /// With a device cache: the batch's slots and attention metadata, uploaded once.
    #[cfg(feature = "cuda")]
    gpu: Option<(Tensor, infer_kernels::cuda::AttentionMeta)>,
}

impl<'a> Step<'a> {
    pub(crate) fn new(batch: &'a BatchInput, cache: &mut PagedKvCache, device: &Device) -> Result<Self> {
        #[cfg(feature = "cuda")]
        {
            let gpu = if matches!(cache.layer_mut(0), LayerKv::Device { .. }) {
                let slots: Vec<u32> = batch.slots.iter().map(|&s| s as u32).collect();
                let meta = infer_kernels::cuda::AttentionMeta::new(&seq_attention(batch), device)?;
                Some((Tensor::new(slots, device)?, meta))
            } else {
                None
            };
            Ok(Self { batch, gpu })
        }
        #[cfg(not(feature = "cuda"))]
        {
            let _ = (cache, device);
            Ok(Self { batch })
        }
    }
}

fn seq_attention(batch: &BatchInput) -> Vec<SeqAttention<'_>> {
    seq_attention_iter(batch).collect()
}

/// The kernels' view of the batch's sequences.
pub(crate) fn seq_attention_iter(batch: &BatchInput) -> impl Iterator<Item = SeqAttention<'_>> {
    batch.seqs.iter().map(|s| SeqAttention { q_start: s.q_start, q_len: s.q_len, context_len: s.context_len, block_table: &s.block_table })
}

/// Writes this batch's keys/values into the cache and attends over it: the CPU kernels over a host
/// cache, the CUDA kernels over a device cache.
pub(crate) fn paged_attention_op(
    layer: usize,
    shape: &infer_kernels::AttentionShape,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    step: &Step<'_>,
    cache: &mut PagedKvCache,
) -> Result<Tensor> {
    match cache.layer_mut(layer) {
        LayerKv::Host { k: kc, v: vc } => host_attention(q, k, v, kc, vc, step, shape),
        LayerKv::HostF16 { k: kc, v: vc } => host_attention(q, k, v, kc, vc, step, shape),
        #[cfg(feature = "cuda")]
        LayerKv::Device { k: kc, v: vc } => {
            use infer_kernels::cuda;
            let (slots, meta) = step.gpu.as_ref().ok_or_else(|| Error::Model("device KV cache without step metadata".into()))?;
            let dt = kc.dtype();
            cuda::write_cache(kc, &k.to_dtype(dt)?, slots)?;
            cuda::write_cache(vc, &v.to_dtype(dt)?, slots)?;
            let out = cuda::paged_attention(&q.to_dtype(dt)?, kc, vc, meta, shape)?;
            let (t, nh, hd) = q.dims3()?;
            Ok(out.reshape((t, nh * hd))?)
        }
        #[cfg(not(feature = "cuda"))]
        LayerKv::Device { .. } => Err(Error::Model("a device KV cache needs a build with the cuda feature".into())),
    }
}

/// The CPU kernels over a host cache of f32 or f16.
fn host_attention<E: KvElem>(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    kc: &mut [E],
    vc: &mut [E],
    step: &Step<'_>,
    shape: &infer_kernels::AttentionShape,
) -> Result<Tensor> {
    let (t, nh, hd) = q.dims3()?;
    let (q, k, v) = (q.to_dtype(DType::F32)?.contiguous()?, k.to_dtype(DType::F32)?.contiguous()?, v.to_dtype(DType::F32)?.contiguous()?);
    let (Some(qv), Some(kv), Some(vv)) = (host_f32(&q), host_f32(&k), host_f32(&v)) else {
        return Err(Error::Model("attention inputs must be in host memory with a host KV cache".into()));
    };
    let mut out = vec![0.0f32; t * nh * hd];
    write_kv(kv.get(), vv.get(), &step.batch.slots, shape, kc, vc);
    paged_attention(qv.get(), kc, vc, &seq_attention(step.batch), shape, &mut out);
    Ok(Tensor::from_vec(out, (t, nh * hd), q.device())?)
}

/// Attention on host slices (`q`, `out`: `[tokens, heads · head_dim]`; `k`, `v`: `[tokens, kv_heads ·
/// head_dim]`): writes the batch's keys and values into the host cache layer and attends over it.
#[allow(clippy::too_many_arguments)]
pub(crate) fn host_attention_into(
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
            paged_attention(q, kc, vc, seqs, shape, out);
        }
        LayerKv::HostF16 { k: kc, v: vc } => {
            write_kv(k, v, slots, shape, kc, vc);
            paged_attention(q, kc, vc, seqs, shape, out);
        }
        #[allow(unreachable_patterns)]
        _ => return Err(Error::Model("the host decoder path needs a host KV cache".into())),
    }
    Ok(())
}

/// Buffers the host decoder path reuses from step to step: each grows to the largest batch seen and
/// is never given back, so steps no larger than an earlier one allocate nothing.
#[derive(Default)]
pub(crate) struct Workspace {
    pub(crate) x: Vec<f32>,
    pub(crate) x1: Vec<f32>,
    pub(crate) h: Vec<f32>,
    pub(crate) q: Vec<f32>,
    pub(crate) k: Vec<f32>,
    pub(crate) v: Vec<f32>,
    pub(crate) attn: Vec<f32>,
    pub(crate) a: Vec<f32>,
    pub(crate) gate: Vec<f32>,
    pub(crate) up: Vec<f32>,
    pub(crate) act: Vec<f32>,
    pub(crate) m: Vec<f32>,
    pub(crate) tmp: Vec<f32>,
    pub(crate) cos: Vec<f32>,
    pub(crate) sin: Vec<f32>,
    /// A second rotary embedding's tables (Gemma 3's local layers).
    pub(crate) cos2: Vec<f32>,
    pub(crate) sin2: Vec<f32>,
    pub(crate) moe: super::moe::MoeScratch,
    /// The kernels' view of the batch (empty between steps; its memory is kept).
    seqs: Vec<SeqAttention<'static>>,
}

impl std::fmt::Debug for Workspace {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Workspace").field("x", &self.x.capacity()).finish_non_exhaustive()
    }
}

impl Workspace {
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

/// The embedding rows of `tokens` (a host f32 table `[vocab, hidden]`) times `scale`, into `x`.
pub(crate) fn embed_host(embed: &Tensor, tokens: &[u32], hidden: usize, scale: f32, x: &mut Vec<f32>) -> Result<()> {
    let table = host_f32(embed).ok_or_else(|| Error::Model("the host path needs the embeddings in host memory as f32".into()))?;
    for (row, &id) in grow(x, tokens.len() * hidden).chunks_exact_mut(hidden).zip(tokens) {
        let src = &table.get()[id as usize * hidden..(id as usize + 1) * hidden];
        row.iter_mut().zip(src).for_each(|(o, &e)| *o = e * scale);
    }
    Ok(())
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
    logits: &mut Vec<f32>,
) -> Result<()> {
    let picked = grow(picked, rows.len() * hidden);
    for (dst, &r) in picked.chunks_exact_mut(hidden).zip(rows) {
        dst.copy_from_slice(&x[r as usize * hidden..(r as usize + 1) * hidden]);
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
    Ok(Tensor::from_vec(logits, (batch.logits_rows.len(), m.config().vocab_size), &m.device())?)
}

/// Logits from the tensor path into `logits`.
pub(crate) fn tensor_into(t: Tensor, logits: &mut Vec<f32>) -> Result<()> {
    let t = t.to_dtype(DType::F32)?.flatten_all()?;
    logits.clear();
    logits.extend_from_slice(&t.to_vec1::<f32>()?);
    Ok(())
}

/// A decoder's host path: its workspace when the whole model can run on host slices, unless
/// `INFER_TENSOR_PATH` is set (for comparisons).
#[derive(Debug, Default)]
pub(crate) struct HostPath(Option<std::sync::Mutex<Workspace>>);

impl HostPath {
    /// For a model whose layers can (`layers_ok`): on the CPU with f32 activations, host f32
    /// embeddings and final norm, and the output head on infer's kernels.
    pub(crate) fn new(device: &Device, dtype: DType, embed: &Tensor, norm: &RmsNorm, head: &Linear, layers_ok: bool) -> Self {
        let wanted = std::env::var_os("INFER_TENSOR_PATH").is_none_or(|v| v.is_empty() || v == "0");
        let capable = device.is_cpu() && dtype == DType::F32 && host_f32(embed).is_some() && norm.is_host() && head.is_host() && layers_ok;
        Self((capable && wanted).then(|| std::sync::Mutex::new(Workspace::default())))
    }

    pub(crate) fn is_on(&self) -> bool {
        self.0.is_some()
    }

    /// `f` with the workspace, or `None` when the model takes the tensor path.
    pub(crate) fn run(&self, f: impl FnOnce(&mut Workspace) -> Result<()>) -> Option<Result<()>> {
        self.0.as_ref().map(|ws| f(&mut ws.lock().unwrap_or_else(|p| p.into_inner())))
    }
}

/// `v` as a slice of `n` elements, grown (never shrunk in memory) as needed.
pub(crate) fn grow(v: &mut Vec<f32>, n: usize) -> &mut [f32] {
    v.resize(n, 0.0);
    v
}
