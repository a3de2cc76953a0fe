//! Building blocks the decoders share: RMSNorm (fused with the residual add on CUDA), SiLU·mul,
//! and attention over the paged KV cache (CPU kernels over a host cache, CUDA kernels over a device
//! cache) with what one forward pass's layers share.

use candle_core::{DType, Device, Tensor};

use infer_kernels::SeqAttention;

use super::BatchInput;
use crate::error::{Error, Result};
use crate::kv_cache::{LayerKv, PagedKvCache};
use crate::weights::{host_f32, Linear, WeightSource};

/// The token embedding table `[vocab, hidden]`: a dense tensor, or, for a GGUF model running on the
/// CPU in f32, its block-quantized bytes as stored in the file with each looked-up row dequantized
/// (the f32 table took vocab × hidden × 4 bytes: 108 MiB for SmolLM2, 1 GiB at Llama-3.2-1B shape,
/// against 17 MiB and 140 MiB in 4-bit blocks).
pub(crate) enum Embeddings {
    Dense(Tensor),
    Blocks { dtype: candle_core::quantized::GgmlDType, data: Vec<u8>, vocab: usize, hidden: usize, device: Device },
}

impl std::fmt::Debug for Embeddings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Dense(t) => write!(f, "Embeddings::Dense({t:?})"),
            Self::Blocks { dtype, data, vocab, hidden, .. } => {
                write!(f, "Embeddings::Blocks({dtype:?}, [{vocab}, {hidden}], {} bytes)", data.len())
            }
        }
    }
}

impl Embeddings {
    pub(crate) fn load(w: &WeightSource, name: &str, vocab: usize, hidden: usize) -> Result<Self> {
        Ok(match w.cpu_blocks(name, &[vocab, hidden])? {
            Some((dtype, data)) if blocks_fit(dtype, data.len(), vocab, hidden) => {
                Self::Blocks { dtype, data, vocab, hidden, device: w.device().clone() }
            }
            _ => Self::Dense(w.tensor(name, &[vocab, hidden])?),
        })
    }

    /// Whether the host path can read it (blocks, or a dense f32 host table).
    pub(crate) fn on_host(&self) -> bool {
        match self {
            Self::Dense(t) => host_f32(t).is_some(),
            Self::Blocks { .. } => true,
        }
    }

    /// The rows of `tokens` times `scale` into `out` (`[tokens, hidden]`).
    pub(crate) fn rows_into(&self, tokens: &[u32], scale: f32, out: &mut [f32]) -> Result<()> {
        match self {
            Self::Dense(t) => {
                let table = host_f32(t).ok_or_else(|| Error::Model("the host path needs the embeddings in host memory as f32".into()))?;
                let hidden = t.dim(1)?;
                for (row, &id) in out.chunks_exact_mut(hidden).zip(tokens) {
                    let src = table.get().get(id as usize * hidden..(id as usize + 1) * hidden).ok_or_else(|| bad_token(id))?;
                    row.iter_mut().zip(src).for_each(|(o, &e)| *o = e * scale);
                }
            }
            Self::Blocks { dtype, data, vocab, hidden, .. } => {
                let row_bytes = data.len() / vocab;
                for (row, &id) in out.chunks_exact_mut(*hidden).zip(tokens) {
                    if id as usize >= *vocab {
                        return Err(bad_token(id));
                    }
                    dequantize_row(*dtype, &data[id as usize * row_bytes..(id as usize + 1) * row_bytes], row);
                    if scale != 1.0 {
                        row.iter_mut().for_each(|v| *v *= scale);
                    }
                }
            }
        }
        Ok(())
    }

    /// The rows of the token ids `ids` (`[tokens]`, u32) as a `[tokens, hidden]` tensor.
    pub(crate) fn select(&self, ids: &Tensor) -> Result<Tensor> {
        match self {
            Self::Dense(t) => Ok(t.index_select(ids, 0)?),
            Self::Blocks { hidden, device, .. } => {
                let tokens = ids.to_vec1::<u32>()?;
                let mut out = vec![0f32; tokens.len() * hidden];
                self.rows_into(&tokens, 1.0, &mut out)?;
                Ok(Tensor::from_vec(out, (tokens.len(), *hidden), device)?)
            }
        }
    }
}

fn bad_token(id: u32) -> Error {
    Error::Model(format!("token id {id} is outside the embedding table"))
}

/// Whether `len` bytes of `dtype` blocks hold exactly `vocab` rows of `hidden` values.
fn blocks_fit(dtype: candle_core::quantized::GgmlDType, len: usize, vocab: usize, hidden: usize) -> bool {
    let bs = dtype.block_size();
    hidden.is_multiple_of(bs) && vocab.checked_mul(hidden / bs * dtype.type_size()) == Some(len)
}

/// Dequantizes one row of GGUF blocks of `dtype` into `out`, a block at a time through an aligned
/// copy (no allocation).
fn dequantize_row(dtype: candle_core::quantized::GgmlDType, bytes: &[u8], out: &mut [f32]) {
    use candle_core::quantized::k_quants::*;
    use candle_core::quantized::GgmlDType as D;
    fn rows<T: GgmlType>(bytes: &[u8], out: &mut [f32]) {
        let size = std::mem::size_of::<T>();
        for (b, o) in bytes.chunks_exact(size).zip(out.chunks_exact_mut(T::BLCK_SIZE)) {
            let mut blk = T::zeros();
            // SAFETY: GGML blocks are plain `repr(C)` data of exactly `size` bytes (checked against
            // the dtype's type size when the table was loaded); any bit pattern is a valid block.
            unsafe { std::ptr::copy_nonoverlapping(b.as_ptr(), (&mut blk as *mut T).cast::<u8>(), size) };
            T::to_float(std::slice::from_ref(&blk), o);
        }
    }
    match dtype {
        D::Q4_0 => rows::<BlockQ4_0>(bytes, out),
        D::Q4_1 => rows::<BlockQ4_1>(bytes, out),
        D::Q5_0 => rows::<BlockQ5_0>(bytes, out),
        D::Q5_1 => rows::<BlockQ5_1>(bytes, out),
        D::Q8_0 => rows::<BlockQ8_0>(bytes, out),
        D::Q8_1 => rows::<BlockQ8_1>(bytes, out),
        D::Q2K => rows::<BlockQ2K>(bytes, out),
        D::Q3K => rows::<BlockQ3K>(bytes, out),
        D::Q4K => rows::<BlockQ4K>(bytes, out),
        D::Q5K => rows::<BlockQ5K>(bytes, out),
        D::Q6K => rows::<BlockQ6K>(bytes, out),
        D::Q8K => rows::<BlockQ8K>(bytes, out),
        other => unreachable!("{other:?} tables are kept dense"),
    }
}

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
        if let (Some(xv), true) = (host_f32(x), self.has_host_weight()) {
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
        if let (true, Some(xv), Some(av), true) = (x.shape() == a.shape(), host_f32(x), host_f32(a), self.has_host_weight()) {
            let (mut sum, mut out) = (vec![0f32; xv.len()], vec![0f32; xv.len()]);
            self.add_forward_host(xv.get(), av.get(), &mut sum, &mut out);
            return Ok((Tensor::from_vec(sum, x.shape(), x.device())?, Tensor::from_vec(out, x.shape(), x.device())?));
        }
        let x = (x + a)?;
        let h = self.forward(&x)?;
        Ok((x, h))
    }

    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    pub(crate) fn eps(&self) -> f32 {
        self.eps
    }

    /// Whether the weight is f32 in host memory (for the `_host` methods).
    pub(crate) fn has_host_weight(&self) -> bool {
        host_f32(&self.weight).is_some()
    }

    /// `out = norm(x)` over host rows (`x`, `out`: `[rows, dim]`); the weight must be [`has_host_weight`](Self::has_host_weight).
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

/// What every layer of one tensor-path forward pass shares: the batch and, with a device cache,
/// its slots and attention metadata uploaded once.
pub(crate) struct TensorPass<'a> {
    pub(crate) batch: &'a BatchInput,
    /// With a device cache: the batch's slots and attention metadata, uploaded once.
    #[cfg(feature = "cuda")]
    gpu: Option<(Tensor, infer_kernels::cuda::AttentionMeta)>,
}

impl<'a> TensorPass<'a> {
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
    pass: &TensorPass<'_>,
    cache: &mut PagedKvCache,
) -> Result<Tensor> {
    match cache.layer_mut(layer) {
        LayerKv::Device { .. } => {}
        host => return host_attention(q, k, v, host, pass, shape),
    }
    match cache.layer_mut(layer) {
        #[cfg(feature = "cuda")]
        LayerKv::Device { k: kc, v: vc } => {
            use infer_kernels::cuda;
            let (slots, meta) = pass.gpu.as_ref().ok_or_else(|| Error::Model("device KV cache without pass metadata".into()))?;
            let dt = kc.dtype();
            cuda::write_cache(kc, &k.to_dtype(dt)?, slots)?;
            cuda::write_cache(vc, &v.to_dtype(dt)?, slots)?;
            let out = cuda::paged_attention(&q.to_dtype(dt)?, kc, vc, meta, shape)?;
            let (t, nh, hd) = q.dims3()?;
            Ok(out.reshape((t, nh * hd))?)
        }
        #[cfg(not(feature = "cuda"))]
        LayerKv::Device { .. } => Err(Error::Model("a device KV cache needs a build with the cuda feature".into())),
        _ => unreachable!("host caches are handled above"),
    }
}

/// The CPU kernels over a host cache (f32, f16 or q8_0).
fn host_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    layer: &mut LayerKv,
    pass: &TensorPass<'_>,
    shape: &infer_kernels::AttentionShape,
) -> Result<Tensor> {
    let (t, nh, hd) = q.dims3()?;
    let (q, k, v) = (q.to_dtype(DType::F32)?.contiguous()?, k.to_dtype(DType::F32)?.contiguous()?, v.to_dtype(DType::F32)?.contiguous()?);
    let (Some(qv), Some(kv), Some(vv)) = (host_f32(&q), host_f32(&k), host_f32(&v)) else {
        return Err(Error::Model("attention inputs must be in host memory with a host KV cache".into()));
    };
    let mut out = vec![0.0f32; t * nh * hd];
    let isa = infer_kernels::Isa::detect();
    super::host::host_attention_into(
        isa,
        layer,
        qv.get(),
        kv.get(),
        vv.get(),
        &pass.batch.slots,
        &seq_attention(pass.batch),
        shape,
        &mut out,
    )?;
    Ok(Tensor::from_vec(out, (t, nh * hd), q.device())?)
}

/// The output head: `lm_head`, or with tied embeddings the embedding matrix (kept quantized for GGUF).
pub(crate) fn output_head(cfg: &crate::config::ModelConfig, w: &WeightSource) -> Result<Linear> {
    if !cfg.tie_word_embeddings && w.contains("lm_head.weight") {
        w.linear("lm_head", cfg.vocab_size, cfg.hidden_size, false)
    } else {
        w.linear("model.embed_tokens", cfg.vocab_size, cfg.hidden_size, false)
    }
}

/// `v` as a slice of `n` elements, grown (never shrunk in memory) as needed.
pub(crate) fn grow(v: &mut Vec<f32>, n: usize) -> &mut [f32] {
    v.resize(n, 0.0);
    v
}
