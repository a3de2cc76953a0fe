//! The CUDA decode step: a whole forward pass of at most [`MAX_ROWS`] token rows (decode batches,
//! speculative verification) on infer's own kernels (`kernels/decode.cu`), with every buffer made
//! once and one launch per kernel: per layer RMSNorm, one GEMV for q|k|v, RoPE + cache write,
//! attention, o GEMV added into the residual, RMSNorm, gate·up GEMV with SiLU·mul, down GEMV added
//! into the residual (the residual stream stays in f32). The tensor path (candle ops and cuBLAS)
//! spent more host time per op than the GPU needed for it: 283 tokens/s on a Llama-3.2-1B shape on
//! an H200, about a sixth of what its weights' bytes allow.
//!
//! A decoder describes its weights once ([`StepWeights`]); [`CudaStep::new`] says whether the
//! step can run them (dense f32/f16/bf16 weights of the model's dtype, no experts, rows of a
//! multiple of 8 values, head_dim ≤ 256, no LongRoPE), and [`CudaStep::run`] whether it takes a batch
//! (1..=8 rows, logits wanted rather than hidden states, a device cache of the model's dtype).
//! With 1-2 rows (batch-1 decode) the RMSNorms fold into the matmuls that follow them and q|k|v,
//! RoPE and the cache write are one launch: five launches per layer.
//!
//! Each step shape (rows, logits rows, attention partitions, buffer and cache addresses) is captured
//! once as a CUDA graph and replayed: one host call per step instead of one per kernel, and no gaps
//! between the kernels on the GPU. For comparisons ([`KernelChoice`], from the CLI's environment):
//! `tensor_path` turns the step off, `cuda_unfused` keeps separate norm, q|k|v and RoPE kernels,
//! `cuda_no_graph` launches kernel by kernel, `cuda_no_pdl` without programmatic launches.

use std::sync::Mutex;

use candle_core::{DType, Device, Tensor};
use infer_kernels::cuda::decode::{tensor_ptr, AttentionArgs, DecodeKernels, DevPtr, DeviceBuf, Segment, StepGraph, MAX_ROWS, NORM_ROWS};
use infer_kernels::AttentionShape;

use super::BatchInput;
use crate::error::{Error, Result};
use crate::kv_cache::{LayerKv, PagedKvCache};
use crate::weights::KernelChoice;

/// A weight (`[out, in]`) or norm gain the step reads, with its bias if any.
pub(crate) struct StepLinear<'a> {
    pub(crate) weight: &'a Tensor,
    pub(crate) bias: Option<&'a Tensor>,
}

/// The gate and up projections: two matrices, or one `[gate; up]`.
pub(crate) enum StepGateUp<'a> {
    Separate(&'a Tensor, &'a Tensor),
    Fused(&'a Tensor),
}

/// One decoder layer as the step reads it.
pub(crate) struct StepLayer<'a> {
    pub(crate) input_norm: (&'a Tensor, f32),
    /// q, k, v (three segments) or one fused `[q; k; v]`.
    pub(crate) qkv: Vec<StepLinear<'a>>,
    pub(crate) qk_norm: Option<(&'a Tensor, &'a Tensor, f32)>,
    pub(crate) o: StepLinear<'a>,
    pub(crate) post_norm: (&'a Tensor, f32),
    pub(crate) gate_up: StepGateUp<'a>,
    pub(crate) down: StepLinear<'a>,
    pub(crate) window: Option<usize>,
}

/// A whole decoder as the step reads it.
pub(crate) struct StepWeights<'a> {
    pub(crate) embed: &'a Tensor,
    pub(crate) layers: Vec<StepLayer<'a>>,
    pub(crate) norm: (&'a Tensor, f32),
    pub(crate) lm_head: StepLinear<'a>,
    /// RoPE inverse frequencies (f32 on the device, `rot / 2`), rotated dims, interleaved pairs.
    pub(crate) rope: (&'a Tensor, usize, bool),
    pub(crate) dims: StepDims,
}

#[derive(Debug, Clone, Copy)]
pub(crate) struct StepDims {
    pub(crate) hidden: usize,
    pub(crate) heads: usize,
    pub(crate) kv_heads: usize,
    pub(crate) head_dim: usize,
    pub(crate) intermediate: usize,
    pub(crate) vocab: usize,
}

/// Device addresses of one layer's weights.
struct LayerPtrs {
    input_norm: (DevPtr, f32),
    qkv: Vec<Segment>,
    qk_norm: Option<(DevPtr, DevPtr, f32)>,
    o: DevPtr,
    post_norm: (DevPtr, f32),
    gate: DevPtr,
    up: DevPtr,
    down: DevPtr,
    window: Option<usize>,
}

/// The step's scratch on the device (sizes for [`MAX_ROWS`] rows) and the host staging of its
/// per-step metadata.
struct Buffers {
    /// f32 `[rows, hidden]`: the residual stream.
    x: DeviceBuf,
    /// T `[rows, max(hidden, heads·head_dim)]`: a norm's output (the next GEMV's input).
    h: DeviceBuf,
    /// f32 `[rows, (heads + 2·kv_heads)·head_dim]`.
    qkv: DeviceBuf,
    /// T `[rows, heads·head_dim]`: rotated queries, then the attention output.
    q: DeviceBuf,
    attn: DeviceBuf,
    /// T `[rows, intermediate]`.
    act: DeviceBuf,
    /// f32 `[rows, vocab]`.
    logits: DeviceBuf,
    /// u32 metadata: ids, positions, slots, logits rows, row tables, row lengths, block tables.
    meta: DeviceBuf,
    /// f32 attention partitions (grown to the longest context seen).
    scratch: DeviceBuf,
    host_meta: Vec<u32>,
    /// Staging of the block tables and per-row key counts (reused; the row tables go to host_meta).
    host_tables: Vec<u32>,
    host_row_len: Vec<u32>,
    /// This step's (k, v) cache addresses per layer.
    caches: Vec<(DevPtr, DevPtr)>,
    /// Captured steps by what they depend on (at most 64; cleared when full), each with the cache
    /// addresses it was captured with (the key holds only a hash of them).
    graphs: std::collections::HashMap<GraphKey, (Vec<(DevPtr, DevPtr)>, StepGraph)>,
    /// Why capturing failed, if it did (the step then launches directly).
    graph_error: Option<String>,
}

/// The decode step of one model on one CUDA device.
pub(crate) struct CudaStep {
    kernels: DecodeKernels,
    device: Device,
    dims: StepDims,
    embed: DevPtr,
    layers: Vec<LayerPtrs>,
    norm: (DevPtr, f32),
    lm_head: DevPtr,
    inv_freq: DevPtr,
    rot: usize,
    interleaved: bool,
    bufs: Mutex<Buffers>,
    /// Separate norm kernels at every row count ([`KernelChoice::cuda_unfused`], for comparisons).
    unfused: bool,
    /// Whether steps are captured as CUDA graphs and replayed (else launched one kernel at a time).
    graphs: bool,
    /// The weight tensors, kept alive while their addresses are used.
    _keep: Vec<Tensor>,
}

impl std::fmt::Debug for CudaStep {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "CudaStep({:?}, {} layers, {:?})", self.kernels.dtype(), self.layers.len(), self.dims)
    }
}

/// Whether `t` is a contiguous tensor of `dtype` on the CUDA `device`.
fn fits(t: &Tensor, dtype: DType, device: &Device) -> bool {
    t.dtype() == dtype && t.device().same_device(device) && t.is_contiguous()
}

impl CudaStep {
    /// The step for these weights, or `None` when it cannot run them (or the load options ask for
    /// the tensor path).
    pub(crate) fn new(w: &StepWeights<'_>, device: &Device, dtype: DType, kernels: KernelChoice) -> Result<Option<Self>> {
        if !device.is_cuda() || kernels.tensor_path || !matches!(dtype, DType::F32 | DType::F16 | DType::BF16) {
            return Ok(None);
        }
        let d = w.dims;
        let qkv_width = (d.heads + 2 * d.kv_heads) * d.head_dim;
        let ks = [d.hidden, d.heads * d.head_dim, d.intermediate];
        if !ks.iter().all(|&k| DecodeKernels::gemv_fits(k))
            || d.head_dim == 0
            || d.head_dim > 256
            || d.kv_heads == 0
            || !d.heads.is_multiple_of(d.kv_heads)
            || w.rope.1 > d.head_dim
            || !w.rope.1.is_multiple_of(2)
            || w.rope.0.elem_count() != w.rope.1 / 2
        {
            return Ok(None);
        }
        let mut keep = Vec::new();
        // Every tensor must be the model's dtype on this device; each address is taken once.
        let mut ptr = |t: &Tensor, dt: DType, elems: usize| -> Result<Option<DevPtr>> {
            if !fits(t, dt, device) || t.elem_count() != elems {
                return Ok(None);
            }
            let p = tensor_ptr(t)?;
            // The GEMV reads 16-byte vectors (a view into a larger buffer may start anywhere).
            if p.0 % 16 != 0 {
                return Ok(None);
            }
            keep.push(t.clone());
            Ok(Some(p))
        };
        macro_rules! need {
            ($e:expr) => {
                match $e? {
                    Some(p) => p,
                    None => return Ok(None),
                }
            };
        }
        let embed = need!(ptr(w.embed, dtype, d.vocab * d.hidden));
        let mut layers = Vec::with_capacity(w.layers.len());
        for l in &w.layers {
            let mut qkv = Vec::new();
            let widths: Vec<usize> = if l.qkv.len() == 3 {
                vec![d.heads * d.head_dim, d.kv_heads * d.head_dim, d.kv_heads * d.head_dim]
            } else {
                vec![qkv_width]
            };
            if l.qkv.len() != widths.len() {
                return Ok(None);
            }
            for (lin, &rows) in l.qkv.iter().zip(&widths) {
                let weight = need!(ptr(lin.weight, dtype, rows * d.hidden));
                let bias = match lin.bias {
                    Some(b) => need!(ptr(b, dtype, rows)),
                    None => DevPtr::NULL,
                };
                qkv.push(Segment { weight, bias, rows });
            }
            let qk_norm = match l.qk_norm {
                Some((qn, kn, eps)) => Some((need!(ptr(qn, dtype, d.head_dim)), need!(ptr(kn, dtype, d.head_dim)), eps)),
                None => None,
            };
            if l.o.bias.is_some() || l.down.bias.is_some() {
                return Ok(None);
            }
            let (gate, up) = match l.gate_up {
                StepGateUp::Separate(g, u) => {
                    (need!(ptr(g, dtype, d.intermediate * d.hidden)), need!(ptr(u, dtype, d.intermediate * d.hidden)))
                }
                StepGateUp::Fused(gu) => {
                    let p = need!(ptr(gu, dtype, 2 * d.intermediate * d.hidden));
                    (p, p.offset(d.intermediate * d.hidden * dtype.size_in_bytes()))
                }
            };
            layers.push(LayerPtrs {
                input_norm: (need!(ptr(l.input_norm.0, dtype, d.hidden)), l.input_norm.1),
                qkv,
                qk_norm,
                o: need!(ptr(l.o.weight, dtype, d.hidden * d.heads * d.head_dim)),
                post_norm: (need!(ptr(l.post_norm.0, dtype, d.hidden)), l.post_norm.1),
                gate,
                up,
                down: need!(ptr(l.down.weight, dtype, d.hidden * d.intermediate)),
                window: l.window,
            });
        }
        let norm = (need!(ptr(w.norm.0, dtype, d.hidden)), w.norm.1);
        if w.lm_head.bias.is_some() {
            return Ok(None);
        }
        let lm_head = need!(ptr(w.lm_head.weight, dtype, d.vocab * d.hidden));
        let inv_freq = need!(ptr(w.rope.0, DType::F32, w.rope.1 / 2));
        let es = dtype.size_in_bytes();
        let r = MAX_ROWS;
        let bufs = Buffers {
            x: DeviceBuf::new(device, r * d.hidden * 4)?,
            h: DeviceBuf::new(device, r * d.hidden.max(d.heads * d.head_dim) * es)?,
            qkv: DeviceBuf::new(device, r * qkv_width * 4)?,
            q: DeviceBuf::new(device, r * d.heads * d.head_dim * es)?,
            attn: DeviceBuf::new(device, r * d.heads * d.head_dim * es)?,
            act: DeviceBuf::new(device, r * d.intermediate * es)?,
            logits: DeviceBuf::new(device, r * d.vocab * 4)?,
            meta: DeviceBuf::new(device, 4096)?,
            scratch: DeviceBuf::new(device, 4)?,
            host_meta: Vec::new(),
            host_tables: Vec::new(),
            host_row_len: Vec::new(),
            caches: Vec::new(),
            graphs: Default::default(),
            graph_error: None,
        };
        Ok(Some(Self {
            kernels: DecodeKernels::new(device, dtype, !kernels.cuda_no_pdl)?,
            device: device.clone(),
            dims: d,
            embed,
            layers,
            norm,
            lm_head,
            inv_freq,
            rot: w.rope.1,
            interleaved: w.rope.2,
            bufs: Mutex::new(bufs),
            unfused: kernels.cuda_unfused,
            graphs: !kernels.cuda_no_graph,
            _keep: keep,
        }))
    }

    /// Runs `batch` when the step takes it, its logits (`[logits_rows · vocab]`) into `logits`;
    /// `None` when it does not (the caller runs the tensor path).
    pub(crate) fn run(&self, batch: &BatchInput, cache: &mut PagedKvCache, logits: &mut Vec<f32>) -> Option<Result<()>> {
        let m = batch.num_tokens();
        if m == 0 || m > MAX_ROWS || batch.hidden || batch.logits_rows.len() > m {
            return None;
        }
        let dt = self.kernels.dtype();
        let sh = cache.shape(self.dims.heads, None);
        if sh.num_kv_heads != self.dims.kv_heads || sh.head_dim != self.dims.head_dim {
            return None;
        }
        for l in 0..self.layers.len() {
            match cache.layer_mut(l) {
                LayerKv::Device { k, .. } if k.dtype() == dt && k.device().same_device(&self.device) => {}
                _ => return None,
            }
        }
        Some(self.step(batch, cache, logits))
    }

    fn step(&self, batch: &BatchInput, cache: &mut PagedKvCache, logits: &mut Vec<f32>) -> Result<()> {
        let d = self.dims;
        let m = batch.num_tokens();
        if let Some(&bad) = batch.tokens.iter().find(|&&t| t as usize >= d.vocab) {
            return Err(Error::Model(format!("token id {bad} is outside the vocabulary (size {})", d.vocab)));
        }
        let kv_row = d.kv_heads * d.head_dim;
        let block_size = cache.block_size();
        let (slots_total, blocks_total) = match cache.layer_mut(0) {
            LayerKv::Device { k, .. } => (k.elem_count() / kv_row, k.elem_count() / kv_row / block_size),
            _ => unreachable!("checked by run"),
        };
        let mut guard = self.bufs.lock().map_err(|_| Error::Model("a previous CUDA step panicked".into()))?;
        let b = &mut *guard;
        // Metadata, one upload: ids, positions, slots, logits rows, row tables, row lengths, tables.
        let meta = &mut b.host_meta;
        meta.clear();
        meta.extend_from_slice(&batch.tokens);
        meta.extend_from_slice(&batch.positions);
        for &s in &batch.slots {
            if s >= slots_total {
                return Err(Error::Model(format!("KV slot {s} is outside the cache ({slots_total} slots)")));
            }
            meta.push(s as u32);
        }
        if batch.positions.len() != m || batch.slots.len() != m || batch.logits_rows.iter().any(|&r| r as usize >= m) {
            return Err(Error::Model("malformed batch: positions, slots or logits rows do not match its tokens".into()));
        }
        meta.extend_from_slice(&batch.logits_rows);
        for s in &batch.seqs {
            if s.q_len > s.context_len
                || s.context_len > s.block_table.len() * block_size
                || s.block_table.iter().any(|&blk| blk as usize >= blocks_total)
            {
                return Err(Error::Model("malformed batch: a block table does not cover its context".into()));
            }
        }
        if batch.seqs.iter().map(|s| s.q_len).sum::<usize>() != m {
            return Err(Error::Model("malformed batch: its sequences do not cover its tokens".into()));
        }
        // The row tables go straight into the metadata after the logits rows; key counts and block
        // tables follow them.
        let (tables, row_len) = (&mut b.host_tables, &mut b.host_row_len);
        tables.clear();
        row_len.clear();
        infer_kernels::row_metadata(super::layers::seq_attention_iter(batch), tables, meta, row_len);
        let plan = Plan {
            m,
            r: batch.logits_rows.len(),
            rows_in_order: batch.logits_rows.iter().enumerate().all(|(i, &row)| row as usize == i),
            max_len: row_len.iter().copied().max().unwrap_or(1) as usize,
            shape: cache.shape(d.heads, None),
        };
        meta.extend_from_slice(row_len);
        meta.extend_from_slice(tables);
        if meta.len() * 4 > b.meta.bytes() {
            b.meta = DeviceBuf::new(&self.device, (meta.len() * 4).next_power_of_two())?;
        }
        let scratch = DecodeKernels::attention_scratch(m, &plan.shape, plan.max_len) * 4;
        if scratch > b.scratch.bytes() {
            b.scratch = DeviceBuf::new(&self.device, scratch.next_power_of_two())?;
        }
        b.caches.clear();
        let mut cache_sum = 0u64;
        for i in 0..self.layers.len() {
            let (kc, vc) = match cache.layer_mut(i) {
                LayerKv::Device { k, v } => (tensor_ptr(k)?, tensor_ptr(v)?),
                _ => unreachable!("checked by run"),
            };
            cache_sum = cache_sum.rotate_left(7) ^ kc.0 ^ vc.0.rotate_left(32);
            b.caches.push((kc, vc));
        }
        b.meta.upload_u32(&b.host_meta)?;
        let r = plan.r;
        if r == 0 {
            logits.clear();
        }
        // Replay the step's graph when one was captured for this shape, else capture it (or, with
        // graphs off or unavailable, launch directly).
        let key = GraphKey {
            m,
            r,
            rows_in_order: plan.rows_in_order,
            parts: DecodeKernels::attention_parts(&plan.shape, plan.max_len),
            meta: b.meta.ptr().0,
            scratch: b.scratch.ptr().0,
            caches: cache_sum,
        };
        if !self.graphs || b.graph_error.is_some() {
            self.launch(b, &plan)?;
        } else if let Some((_, g)) = b.graphs.get(&key).filter(|(caches, _)| *caches == b.caches) {
            g.launch()?;
        } else {
            if b.graphs.len() >= 64 {
                b.graphs.clear();
            }
            match StepGraph::capture(&self.device, || self.launch(b, &plan)) {
                Ok(g) => {
                    g.launch()?;
                    b.graphs.insert(key, (b.caches.clone(), g));
                }
                Err(e) => {
                    // Launch directly; if that works, graphs are what failed: off from now on.
                    self.launch(b, &plan)?;
                    b.graph_error = Some(e.to_string());
                }
            }
        }
        if r > 0 {
            logits.resize(r * d.vocab, 0.0);
            b.logits.download_f32(logits)?;
        }
        Ok(())
    }

    /// Launches the step's kernels (the metadata already uploaded): what a graph captures.
    fn launch(&self, b: &Buffers, p: &Plan) -> Result<()> {
        let (d, k, m) = (self.dims, &self.kernels, p.m);
        let mp = b.meta.ptr();
        let at = |i: usize| mp.offset(4 * i);
        let (ids, pos, slots) = (at(0), at(m), at(2 * m));
        let hd_all = d.heads * d.head_dim;
        // 1-2 rows: the RMSNorms fold into the matmuls after them (x² summed as x is read).
        let fused_norm = m <= NORM_ROWS && !self.unfused;
        // SAFETY: every address below is a weight checked at construction (dtype, element count),
        // a scratch buffer sized for MAX_ROWS rows (m ≤ MAX_ROWS) or for this step's attention, the
        // metadata uploaded by `step` (ids < vocab, slots and block ids inside the cache, checked
        // there), or a device cache of this dtype and shape (checked by `run`).
        unsafe {
            k.embed(self.embed, ids, b.x.ptr(), m, d.hidden)?;
            for (l, &(kc, vc)) in self.layers.iter().zip(&b.caches) {
                let heads = (d.heads, d.kv_heads, d.head_dim);
                let (x, (gain, eps)) = (b.x.ptr(), l.input_norm);
                if fused_norm && l.qk_norm.is_none() {
                    // Norm, q|k|v, RoPE and the cache write in one launch.
                    let tables = (pos, slots, self.inv_freq);
                    k.qkv_rope_norm(&l.qkv, d.hidden, (x, gain, eps), m, tables, (b.q.ptr(), kc, vc), heads, self.rot, self.interleaved)?;
                } else {
                    if fused_norm {
                        k.gemv_norm(&l.qkv, d.hidden, x, gain, eps, m, b.qkv.ptr(), false)?;
                    } else {
                        k.rmsnorm(x, DevPtr::NULL, gain, b.h.ptr(), m, d.hidden, eps)?;
                        k.gemv(&l.qkv, d.hidden, b.h.ptr(), m, b.qkv.ptr(), false)?;
                    }
                    let q_out = b.q.ptr();
                    k.rope_qkv(b.qkv.ptr(), pos, slots, self.inv_freq, l.qk_norm, q_out, kc, vc, m, heads, self.rot, self.interleaved)?;
                }
                let shape = AttentionShape { sliding_window: l.window, ..p.shape };
                let args = AttentionArgs {
                    q: b.q.ptr(),
                    k_cache: kc,
                    v_cache: vc,
                    tables: at(p.off_tables()),
                    row_table: at(p.off_row_table()),
                    row_len: at(p.off_row_len()),
                    scratch: b.scratch.ptr(),
                    out: b.attn.ptr(),
                    rows: m,
                    max_len: p.max_len,
                };
                k.attention(&args, &shape)?;
                let o = [Segment { weight: l.o, bias: DevPtr::NULL, rows: d.hidden }];
                k.gemv(&o, hd_all, b.attn.ptr(), m, b.x.ptr(), true)?;
                if fused_norm {
                    k.glu_norm(l.gate, l.up, d.intermediate, d.hidden, b.x.ptr(), l.post_norm.0, l.post_norm.1, m, b.act.ptr())?;
                } else {
                    k.rmsnorm(b.x.ptr(), DevPtr::NULL, l.post_norm.0, b.h.ptr(), m, d.hidden, l.post_norm.1)?;
                    k.glu(l.gate, l.up, d.intermediate, d.hidden, b.h.ptr(), m, b.act.ptr())?;
                }
                let down = [Segment { weight: l.down, bias: DevPtr::NULL, rows: d.hidden }];
                k.gemv(&down, d.intermediate, b.act.ptr(), m, b.x.ptr(), true)?;
            }
            if p.r == 0 {
                return Ok(());
            }
            let head = [Segment { weight: self.lm_head, bias: DevPtr::NULL, rows: d.vocab }];
            if p.r <= NORM_ROWS && p.rows_in_order && !self.unfused {
                k.gemv_norm(&head, d.hidden, b.x.ptr(), self.norm.0, self.norm.1, p.r, b.logits.ptr(), false)?;
            } else {
                k.rmsnorm(b.x.ptr(), at(p.off_rows()), self.norm.0, b.h.ptr(), p.r, d.hidden, self.norm.1)?;
                k.gemv(&head, d.hidden, b.h.ptr(), p.r, b.logits.ptr(), false)?;
            }
        }
        Ok(())
    }
}

/// What one step launches, past its metadata: row counts and attention extent.
struct Plan {
    m: usize,
    /// Rows whose logits are wanted, and whether they are rows 0..r.
    r: usize,
    rows_in_order: bool,
    max_len: usize,
    shape: AttentionShape,
}

impl Plan {
    /// Where each part of the metadata starts (u32 index): ids, positions and slots (m each), the
    /// logits rows (r), the row tables and key counts (m each), the block tables.
    fn off_rows(&self) -> usize {
        3 * self.m
    }
    fn off_row_table(&self) -> usize {
        3 * self.m + self.r
    }
    fn off_row_len(&self) -> usize {
        4 * self.m + self.r
    }
    fn off_tables(&self) -> usize {
        5 * self.m + self.r
    }
}

/// What a captured step depends on beyond its weights: row counts, attention partitions (the grid),
/// and the addresses of the metadata, scratch and caches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct GraphKey {
    m: usize,
    r: usize,
    rows_in_order: bool,
    parts: usize,
    meta: u64,
    scratch: u64,
    caches: u64,
}
