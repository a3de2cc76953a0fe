//! Building blocks the decoders share: RMSNorm (fused with the residual add on CUDA), SiLU·mul,
//! and attention over the paged KV cache (CPU kernels over a host cache, CUDA kernels over a device
//! cache) with what one forward pass's layers share.

use candle_core::{DType, Device, Tensor};

use infer_kernels::{paged_attention, write_kv, KvElem, SeqAttention};

use super::BatchInput;
use crate::error::{Error, Result};
use crate::kv_cache::{LayerKv, PagedKvCache};
use crate::weights::WeightSource;

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
        Ok(candle_nn::ops::rms_norm(x, &self.weight, self.eps)?)
    }

    /// `(x + a, norm(x + a))`: the residual add and the norm after it (one kernel on CUDA).
    pub(crate) fn add_forward(&self, x: &Tensor, a: &Tensor) -> Result<(Tensor, Tensor)> {
        #[cfg(feature = "cuda")]
        if x.device().is_cuda() {
            return Ok(infer_kernels::cuda::add_rms_norm(&x.contiguous()?, &a.contiguous()?, &self.weight, self.eps)?);
        }
        let x = (x + a)?;
        let h = self.forward(&x)?;
        Ok((x, h))
    }
}

/// SiLU(gate) · up (one kernel on CUDA).
pub(crate) fn silu_mul(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if gate.device().is_cuda() {
        return Ok(infer_kernels::cuda::silu_mul(&gate.contiguous()?, &up.contiguous()?)?);
    }
    Ok((gate.silu()? * up)?)
}

/// The batch's token ids and positions on `device`, after checking the ids against the vocabulary.
pub(crate) fn batch_tensors(batch: &BatchInput, vocab_size: usize, device: &Device) -> Result<(Tensor, Tensor)> {
    if batch.tokens.is_empty() {
        return Err(Error::Model("empty batch".into()));
    }
    if let Some(&bad) = batch.tokens.iter().find(|&&t| t as usize >= vocab_size) {
        return Err(Error::Model(format!("token id {bad} is outside the vocabulary (size {vocab_size})")));
    }
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
    batch
        .seqs
        .iter()
        .map(|s| SeqAttention { q_start: s.q_start, q_len: s.q_len, context_len: s.context_len, block_table: &s.block_table })
        .collect()
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
    let to_vec = |x: &Tensor| -> Result<Vec<f32>> { Ok(x.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?) };
    let (qv, kv, vv) = (to_vec(q)?, to_vec(k)?, to_vec(v)?);
    write_kv(&kv, &vv, &step.batch.slots, shape, kc, vc);
    let mut out = vec![0.0f32; t * nh * hd];
    paged_attention(&qv, kc, vc, &seq_attention(step.batch), shape, &mut out);
    Ok(Tensor::from_vec(out, (t, nh * hd), q.device())?)
}
