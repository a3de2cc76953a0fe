//! Attention over a paged KV cache, on the CPU.
//!
//! Cache layout (per layer, for K and for V alike): `[num_blocks, block_size, num_kv_heads, head_dim]`,
//! f32, f16 or 8-bit (q8_0: `i8` values and one f16 scale per 32 consecutive values, value i =
//! `scales[i / 32] · q[i]`, so `head_dim` must be a multiple of 32), row-major. A sequence's tokens live in the blocks its block table names, in order: token `t`
//! of a sequence is in block `table[t / block_size]` at offset `t % block_size`.
//!
//! The queries of one forward pass are a ragged batch: all sequences' new tokens stacked in one
//! `[num_tokens, num_heads, head_dim]` array; [`SeqAttention`] says which rows belong to which sequence
//! and where that sequence stands.
//!
//! This file holds the types and the dispatch: prompts and decode steps go through the tiled
//! (flash-attention) kernels of `tiled/` where the CPU and head size allow, else through the
//! per-row kernel (`row.rs`).

use crate::cpu::isa::Isa;
use crate::cpu::pool::Pool;
use crate::cpu::scratch;
use std::cell::RefCell;

mod row;
#[cfg(test)]
mod tests;
#[cfg(target_arch = "x86_64")]
mod tiled;

/// The head geometry of one attention layer.
#[derive(Debug, Clone, Copy)]
pub struct AttentionShape {
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub block_size: usize,
    /// Softmax scale, usually `1 / sqrt(head_dim)`.
    pub scale: f32,
    /// Sliding-window size: a query at position `p` sees keys at positions `> p - window`.
    pub sliding_window: Option<usize>,
    /// Attention-logit soft-capping (Gemma 2): each scaled score `s` becomes `c · tanh(s / c)`.
    pub softcap: Option<f32>,
}

/// One sequence of a ragged batch.
#[derive(Debug, Clone, Copy)]
pub struct SeqAttention<'a> {
    /// First row of this sequence's queries in the batch.
    pub q_start: usize,
    /// Number of new tokens (query rows) of this sequence in the batch.
    pub q_len: usize,
    /// Number of tokens in the cache for this sequence once the new ones are written
    /// (the new tokens are its last `q_len`).
    pub context_len: usize,
    /// Physical block ids holding this sequence's tokens, in order.
    pub block_table: &'a [u32],
}

/// The per-row view of a ragged batch that GPU attention reads, appended to the three vectors:
/// every sequence's block table one after another (`tables`), and per query row where its sequence's
/// table starts there (`row_table`) and how many keys it sees, causally its position + 1 (`row_len`).
pub fn row_metadata<'a>(
    seqs: impl IntoIterator<Item = SeqAttention<'a>>,
    tables: &mut Vec<u32>,
    row_table: &mut Vec<u32>,
    row_len: &mut Vec<u32>,
) {
    for s in seqs {
        let start = tables.len() as u32;
        tables.extend_from_slice(s.block_table);
        row_table.extend(std::iter::repeat_n(start, s.q_len));
        row_len.extend((0..s.q_len).map(|i| (s.context_len - s.q_len + i + 1) as u32));
    }
}

/// Element type of the KV cache: f32, f16 (half the memory; widened to f32 in registers) or i8
/// (q8_0: with a scale per 32 values, see the module doc; written by [`write_kv_q8`]).
pub trait KvElem: Copy + Send + Sync + Default + 'static {
    /// Whether the type is f16 (else f32 or i8).
    const HALF: bool;
    /// Whether the type is q8_0's i8 (its values need their block's scale).
    const Q8: bool = false;
    fn from_f32(v: f32) -> Self;
    fn to_f32(self) -> f32;
}

impl KvElem for f32 {
    const HALF: bool = false;
    #[inline(always)]
    fn from_f32(v: f32) -> Self {
        v
    }
    #[inline(always)]
    fn to_f32(self) -> f32 {
        self
    }
}

impl KvElem for half::f16 {
    const HALF: bool = true;
    #[inline(always)]
    fn from_f32(v: f32) -> Self {
        half::f16::from_f32(v)
    }
    #[inline(always)]
    fn to_f32(self) -> f32 {
        half::f16::to_f32(self)
    }
}

impl KvElem for i8 {
    const HALF: bool = false;
    const Q8: bool = true;
    /// (Unscaled: [`write_kv_q8`] quantizes whole blocks.)
    #[inline(always)]
    fn from_f32(v: f32) -> Self {
        v as i8
    }
    /// The integer value, without its block's scale.
    #[inline(always)]
    fn to_f32(self) -> f32 {
        self as f32
    }
}

/// Values per scale of a q8_0 cache.
pub const Q8_BLOCK: usize = 32;

/// The new keys and values (`[num_tokens, num_kv_heads, head_dim]`) quantized into a q8_0 cache
/// (`(values, scales)` for keys and for values; see the module doc): each 32 values of a row get
/// the scale max|x| / 127 (stored as f16) and round to the nearest integer, as llama.cpp's q8_0.
pub fn write_kv_q8(
    k: &[f32],
    v: &[f32],
    slots: &[usize],
    shape: &AttentionShape,
    k_cache: (&mut [i8], &mut [half::f16]),
    v_cache: (&mut [i8], &mut [half::f16]),
) {
    let row = shape.num_kv_heads * shape.head_dim;
    debug_assert!(row.is_multiple_of(Q8_BLOCK) && k.len() == slots.len() * row);
    let (kq, kd) = k_cache;
    let (vq, vd) = v_cache;
    for (i, &slot) in slots.iter().enumerate() {
        for (src, q, d) in [(&k[i * row..(i + 1) * row], &mut *kq, &mut *kd), (&v[i * row..(i + 1) * row], &mut *vq, &mut *vd)] {
            let (q, d) = (&mut q[slot * row..(slot + 1) * row], &mut d[slot * row / Q8_BLOCK..(slot + 1) * row / Q8_BLOCK]);
            for ((x, q), d) in src.chunks_exact(Q8_BLOCK).zip(q.chunks_exact_mut(Q8_BLOCK)).zip(d.iter_mut()) {
                let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
                let scale = amax / 127.0;
                let inv = if scale > 0.0 { 1.0 / scale } else { 0.0 };
                for (q, &x) in q.iter_mut().zip(x) {
                    *q = (x * inv).round() as i8;
                }
                *d = half::f16::from_f32(scale);
            }
        }
    }
}

/// [`paged_attention`] over a q8_0 cache (`(values, scales)` for keys and for values, written by
/// [`write_kv_q8`]); `head_dim` must be a multiple of 32.
#[allow(clippy::too_many_arguments)]
pub fn paged_attention_q8(
    isa: Isa,
    q: &[f32],
    k_cache: (&[i8], &[half::f16]),
    v_cache: (&[i8], &[half::f16]),
    seqs: &[SeqAttention<'_>],
    shape: &AttentionShape,
    out: &mut [f32],
) {
    assert!(shape.head_dim.is_multiple_of(Q8_BLOCK), "a q8_0 KV cache needs a head size that is a multiple of 32");
    attend(isa, q, k_cache, v_cache, seqs, shape, out)
}

/// Writes the new keys and values (`[num_tokens, num_kv_heads, head_dim]`) into their cache slots.
/// `slots[i]` is the flat slot (`block * block_size + offset`) of token row `i`.
pub fn write_kv<E: KvElem>(k: &[f32], v: &[f32], slots: &[usize], shape: &AttentionShape, k_cache: &mut [E], v_cache: &mut [E]) {
    debug_assert!(!E::Q8, "a q8_0 cache is written by write_kv_q8");
    let row = shape.num_kv_heads * shape.head_dim;
    debug_assert_eq!(k.len(), slots.len() * row);
    for (i, &slot) in slots.iter().enumerate() {
        let dst = slot * row..(slot + 1) * row;
        for (c, &x) in k_cache[dst.clone()].iter_mut().zip(&k[i * row..(i + 1) * row]) {
            *c = E::from_f32(x);
        }
        for (c, &x) in v_cache[dst].iter_mut().zip(&v[i * row..(i + 1) * row]) {
            *c = E::from_f32(x);
        }
    }
}

/// Causal attention of the batch's queries over the paged cache (which must already hold the new
/// tokens' keys and values, see [`write_kv`]). `q` and `out` are `[num_tokens, num_heads, head_dim]`.
/// Grouped-query attention: query head `h` reads KV head `h / (num_heads / num_kv_heads)`; the query
/// heads of a group are processed together so each key and value row is read once per group. Token
/// rows are spread over the kernels' thread pool. `isa` picks the kernels (the CPU must support it:
/// [`Isa::detect`] gives the best it has).
pub fn paged_attention<E: KvElem>(
    isa: Isa,
    q: &[f32],
    k_cache: &[E],
    v_cache: &[E],
    seqs: &[SeqAttention<'_>],
    shape: &AttentionShape,
    out: &mut [f32],
) {
    debug_assert!(!E::Q8, "a q8_0 cache is read by paged_attention_q8");
    attend(isa, q, (k_cache, &[]), (v_cache, &[]), seqs, shape, out)
}

/// [`paged_attention`] for any cache type: `(elements, scales)` (scales only for q8_0).
fn attend<E: KvElem>(
    isa: Isa,
    q: &[f32],
    (k_cache, k_scales): (&[E], &[half::f16]),
    (v_cache, v_scales): (&[E], &[half::f16]),
    seqs: &[SeqAttention<'_>],
    shape: &AttentionShape,
    out: &mut [f32],
) {
    let hd = shape.head_dim;
    let q_row = shape.num_heads * hd;
    scratch::with(&ROW_SEQ, |row_seq| {
        // Which sequence each token row belongs to.
        row_seq.resize(out.len() / q_row, usize::MAX);
        for (s, seq) in seqs.iter().enumerate() {
            row_seq[seq.q_start..seq.q_start + seq.q_len].fill(s);
        }
        let call = Call { isa, q, k_cache, v_cache, k_scales, v_scales, seqs, shape, row_seq };
        #[cfg(target_arch = "x86_64")]
        if tiled::attend(&call, out) {
            return;
        }
        row::attend(&call, out)
    })
}

/// One attention call's inputs, as the per-row and tiled kernels take them: `q` is `[rows,
/// num_heads, head_dim]`, `row_seq[r]` the sequence of row `r` (`usize::MAX`: padding).
pub(super) struct Call<'a, E> {
    pub isa: Isa,
    pub q: &'a [f32],
    pub k_cache: &'a [E],
    pub v_cache: &'a [E],
    /// q8_0 caches: one scale per 32 elements of `k_cache` / `v_cache` (else empty).
    pub k_scales: &'a [half::f16],
    pub v_scales: &'a [half::f16],
    pub seqs: &'a [SeqAttention<'a>],
    pub shape: &'a AttentionShape,
    pub row_seq: &'a [usize],
}

impl<E> Clone for Call<'_, E> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<E> Copy for Call<'_, E> {}

thread_local! {
    /// Reused buffer (see `scratch`): the sequence of each row.
    static ROW_SEQ: RefCell<Vec<usize>> = const { RefCell::new(Vec::new()) };
}

/// Runs tasks `0..n` of an attention call: inline when the batch's work (query rows × context ×
/// row width) is too small to be worth the thread hand-off, else on the kernels' pool.
fn run_tasks(seqs: &[SeqAttention<'_>], q_row: usize, n: usize, task: &(dyn Fn(usize) + Sync)) {
    let work: usize = seqs.iter().map(|s| s.q_len * s.context_len).sum::<usize>() * q_row;
    if work < 1 << 16 {
        (0..n).for_each(task);
    } else {
        Pool::global().run(n, task);
    }
}
