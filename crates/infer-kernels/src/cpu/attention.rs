//! Attention over a paged KV cache, on the CPU.
//!
//! Cache layout (per layer, for K and for V alike): `[num_blocks, block_size, num_kv_heads, head_dim]`,
//! f32, row-major. A sequence's tokens live in the blocks its block table names, in order: token `t`
//! of a sequence is in block `table[t / block_size]` at offset `t % block_size`.
//!
//! The queries of one forward pass are a ragged batch: all sequences' new tokens stacked in one
//! `[num_tokens, num_heads, head_dim]` array; [`SeqAttention`] says which rows belong to which sequence
//! and where that sequence stands.

use crate::cpu::isa::Isa;
use crate::cpu::pool::Pool;
use crate::cpu::scratch;
use crate::cpu::OutPtr;
use std::cell::RefCell;

/// The tiled units' lanes hold raw pointers into `q` and `out`; the units are shared read-only
/// between the pool's tasks.
#[cfg(target_arch = "x86_64")]
struct SendUnits<T>(T);
// SAFETY: the pointers are only dereferenced by the unit that owns the lane (reads of q, writes of
// its own output slice) while the caller's borrows of q and out are alive.
#[cfg(target_arch = "x86_64")]
unsafe impl<T> Sync for SendUnits<T> {}

#[cfg(target_arch = "x86_64")]
impl<T> SendUnits<T> {
    /// (A method, so closures capture the whole `Sync` wrapper.)
    fn get(&self) -> &T {
        &self.0
    }
}

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

/// `c · tanh(s / c)`, or `s` without a cap.
#[inline(always)]
fn capped(s: f32, softcap: Option<f32>) -> f32 {
    match softcap {
        Some(c) => c * (s / c).tanh(),
        None => s,
    }
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

/// Element type of the KV cache: f32, or f16 (half the memory; widened to f32 in registers).
pub trait KvElem: Copy + Send + Sync + Default + 'static {
    /// Whether the type is f16 (else f32).
    const HALF: bool;
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

/// Writes the new keys and values (`[num_tokens, num_kv_heads, head_dim]`) into their cache slots.
/// `slots[i]` is the flat slot (`block * block_size + offset`) of token row `i`.
pub fn write_kv<E: KvElem>(k: &[f32], v: &[f32], slots: &[usize], shape: &AttentionShape, k_cache: &mut [E], v_cache: &mut [E]) {
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
/// rows are spread over the kernels' thread pool.
pub fn paged_attention<E: KvElem>(
    q: &[f32],
    k_cache: &[E],
    v_cache: &[E],
    seqs: &[SeqAttention<'_>],
    shape: &AttentionShape,
    out: &mut [f32],
) {
    paged_attention_with(Isa::detect(), q, k_cache, v_cache, seqs, shape, out)
}

/// [`paged_attention`] with a chosen instruction set (which the CPU must support).
pub fn paged_attention_with<E: KvElem>(
    isa: Isa,
    q: &[f32],
    k_cache: &[E],
    v_cache: &[E],
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
        if !tiled(isa, q, k_cache, v_cache, seqs, shape, row_seq, out) {
            per_row(isa, q, k_cache, v_cache, seqs, shape, row_seq, out)
        }
    })
}

thread_local! {
    /// Reused buffers (see `scratch`): the sequence of each row, the tiled kernel's units and
    /// lanes, and the per-row kernels' scores.
    static ROW_SEQ: RefCell<Vec<usize>> = const { RefCell::new(Vec::new()) };
    #[cfg(target_arch = "x86_64")]
    static UNITS: RefCell<Vec<(usize, usize, std::ops::Range<usize>)>> = const { RefCell::new(Vec::new()) };
    #[cfg(target_arch = "x86_64")]
    static LANES: RefCell<Vec<crate::cpu::flash_attention::Lane>> = const { RefCell::new(Vec::new()) };
    static SCORES: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// Each row through [`attend_row`], the rows spread over the pool when the work is worth it.
#[allow(clippy::too_many_arguments)]
fn per_row<E: KvElem>(
    isa: Isa,
    q: &[f32],
    k_cache: &[E],
    v_cache: &[E],
    seqs: &[SeqAttention<'_>],
    shape: &AttentionShape,
    row_seq: &[usize],
    out: &mut [f32],
) {
    let q_row = shape.num_heads * shape.head_dim;
    let dst = OutPtr(out.as_mut_ptr());
    let run_row = |r: usize| {
        // SAFETY: row r's slice is in bounds and written by this task only.
        let out_row = unsafe { std::slice::from_raw_parts_mut(dst.at(r * q_row), q_row) };
        let s = row_seq[r];
        if s == usize::MAX {
            out_row.fill(0.0);
            return;
        }
        let seq = &seqs[s];
        let pos = seq.context_len - seq.q_len + (r - seq.q_start);
        attend_row(isa, &q[r * q_row..(r + 1) * q_row], pos, seq.block_table, k_cache, v_cache, shape, out_row);
    };
    run_tasks(seqs, q_row, out.len() / q_row, &run_row);
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

/// Every row through the tiled kernel when there is one for this CPU and head size: prompt chunks as
/// units of consecutive rows of one head, single rows (decode steps) as units of the query heads of
/// one KV head. Returns false (nothing done) otherwise, for the per-row kernel.
#[allow(clippy::too_many_arguments)]
fn tiled<E: KvElem>(
    isa: Isa,
    q: &[f32],
    k_cache: &[E],
    v_cache: &[E],
    seqs: &[SeqAttention<'_>],
    shape: &AttentionShape,
    row_seq: &[usize],
    out: &mut [f32],
) -> bool {
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (isa, q, k_cache, v_cache, seqs, shape, row_seq, out);
        false
    }
    #[cfg(target_arch = "x86_64")]
    {
        let (hd, q_row) = (shape.head_dim, shape.num_heads * shape.head_dim);
        if isa == Isa::Scalar || !crate::cpu::flash_attention::supports(hd) {
            return false;
        }
        use crate::cpu::flash_attention::{self as flash, Lane};
        // 16 lanes a unit with AVX-512, 8 with AVX2.
        let wide = matches!(isa, Isa::Avx512 | Isa::Amx);
        let width = if wide { flash::ROWS } else { flash::avx2::ROWS };
        let group = shape.num_heads / shape.num_kv_heads;
        // Row r, head h (in bounds: r < rows of q and out, h < num_heads); each lane's output is
        // written by one unit only.
        let (qp, op) = (q.as_ptr(), out.as_mut_ptr());
        let lane =
            |r: usize, h: usize, pos: usize| Lane { q: qp.wrapping_add(r * q_row + h * hd), out: op.wrapping_add(r * q_row + h * hd), pos };
        scratch::with(&UNITS, |units| {
            scratch::with(&LANES, |lanes| {
                // Units: (sequence, KV head, its range of lanes), the longest (last rows of prompts) first.
                for (s, seq) in seqs.iter().enumerate() {
                    let p0 = seq.context_len - seq.q_len;
                    if seq.q_len >= 2 {
                        for i0 in (0..seq.q_len).step_by(width).rev() {
                            let rows = i0..(i0 + width).min(seq.q_len);
                            for h in 0..shape.num_heads {
                                let l0 = lanes.len();
                                lanes.extend(rows.clone().map(|i| lane(seq.q_start + i, h, p0 + i)));
                                units.push((s, h / group, l0..lanes.len()));
                            }
                        }
                    } else if seq.q_len == 1 {
                        for kvh in 0..shape.num_kv_heads {
                            for h0 in (kvh * group..(kvh + 1) * group).step_by(width) {
                                let l0 = lanes.len();
                                lanes.extend((h0..(h0 + width).min((kvh + 1) * group)).map(|h| lane(seq.q_start, h, p0)));
                                units.push((s, kvh, l0..lanes.len()));
                            }
                        }
                    }
                }
                let units = SendUnits((&*units, &*lanes));
                let run = |u: usize| {
                    let (units, all_lanes) = *units.get();
                    let (s, kvh, range) = &units[u];
                    let lanes = &all_lanes[range.clone()];
                    let table = seqs[*s].block_table;
                    // SAFETY: `tiled` checked the head size and that the instruction set has AVX2, FMA and
                    // F16C (and AVX-512 F/BW/VL when `wide`); lanes point into q and out, and each output
                    // slice belongs to one lane of one unit.
                    unsafe {
                        if wide {
                            flash::unit(lanes, k_cache, v_cache, table, *kvh, shape)
                        } else {
                            flash::avx2::unit(lanes, k_cache, v_cache, table, *kvh, shape)
                        }
                    }
                };
                run_tasks(seqs, q_row, units.get().0.len(), &run);
            })
        });
        // Rows of no sequence (padding) are zero.
        for (r, o) in out.chunks_mut(q_row).enumerate() {
            if row_seq[r] == usize::MAX {
                o.fill(0.0);
            }
        }
        true
    }
}

/// The visible tokens `first..=pos` of a sequence with their cache row offsets
/// (`slot · num_kv_heads · head_dim`), walking the block table block by block (no division per
/// token). Yields `(i, offset)` with `i = t − first`.
struct Slots<'a> {
    table: &'a [u32],
    block_size: usize,
    kv_row: usize,
    first: usize,
    end: usize,
    t: usize,
    /// Offset of token `t` and where its block ends.
    offset: usize,
    block_end: usize,
}

impl<'a> Slots<'a> {
    #[inline(always)]
    fn new(first: usize, pos: usize, table: &'a [u32], shape: &AttentionShape) -> Self {
        let kv_row = shape.num_kv_heads * shape.head_dim;
        Self { table, block_size: shape.block_size, kv_row, first, end: pos + 1, t: first, offset: 0, block_end: first }
    }
}

impl Iterator for Slots<'_> {
    type Item = (usize, usize);

    #[inline(always)]
    fn next(&mut self) -> Option<(usize, usize)> {
        if self.t >= self.end {
            return None;
        }
        if self.t == self.block_end {
            let bi = self.t / self.block_size;
            self.block_end = ((bi + 1) * self.block_size).min(self.end);
            self.offset = (self.table[bi] as usize * self.block_size + self.t % self.block_size) * self.kv_row;
        }
        let item = (self.t - self.first, self.offset);
        self.t += 1;
        self.offset += self.kv_row;
        Some(item)
    }
}

/// All heads of one query row at position `pos`: the AVX2 kernel for the usual head sizes, else
/// the portable loop.
#[allow(clippy::too_many_arguments)]
fn attend_row<E: KvElem>(
    isa: Isa,
    q: &[f32],
    pos: usize,
    table: &[u32],
    k_cache: &[E],
    v_cache: &[E],
    shape: &AttentionShape,
    out: &mut [f32],
) {
    scratch::with(&SCORES, |scores| attend_row_in(isa, q, pos, table, k_cache, v_cache, shape, out, scores))
}

/// Sizes the score buffer to `n`, its memory grown in large steps (powers of two, at least 4096
/// scores) so that a decode step whose context grows by one token almost never allocates.
fn reserve_scores(scores: &mut Vec<f32>, n: usize) {
    if scores.capacity() < n {
        scores.reserve_exact(n.next_power_of_two().max(4096) - scores.len());
    }
    scores.resize(n, 0.0);
}

/// [`attend_row`] with this thread's score buffer.
#[allow(clippy::too_many_arguments)]
fn attend_row_in<E: KvElem>(
    isa: Isa,
    q: &[f32],
    pos: usize,
    table: &[u32],
    k_cache: &[E],
    v_cache: &[E],
    shape: &AttentionShape,
    out: &mut [f32],
    scores: &mut Vec<f32>,
) {
    #[cfg(target_arch = "x86_64")]
    if isa != Isa::Scalar {
        // SAFETY: every non-scalar Isa implies AVX2, FMA and F16C.
        unsafe {
            let a = (q, pos, table, k_cache, v_cache, shape);
            match shape.head_dim {
                32 => return avx2::attend_row::<4, E>(a.0, a.1, a.2, a.3, a.4, a.5, out, scores),
                64 => return avx2::attend_row::<8, E>(a.0, a.1, a.2, a.3, a.4, a.5, out, scores),
                80 => return avx2::attend_row::<10, E>(a.0, a.1, a.2, a.3, a.4, a.5, out, scores),
                96 => return avx2::attend_row::<12, E>(a.0, a.1, a.2, a.3, a.4, a.5, out, scores),
                128 => return avx2::attend_row::<16, E>(a.0, a.1, a.2, a.3, a.4, a.5, out, scores),
                256 => return avx2::attend_row::<32, E>(a.0, a.1, a.2, a.3, a.4, a.5, out, scores),
                _ => {}
            }
        }
    }
    let _ = isa;
    let hd = shape.head_dim;
    let group = shape.num_heads / shape.num_kv_heads;
    let first = match shape.sliding_window {
        Some(w) if pos + 1 > w => pos + 1 - w,
        _ => 0,
    };
    let n = pos + 1 - first;
    reserve_scores(scores, group * n);
    for g in 0..shape.num_kv_heads {
        let qg = &q[g * group * hd..(g + 1) * group * hd];
        let koff = g * hd;
        for (i, o) in Slots::new(first, pos, table, shape) {
            let k = &k_cache[o + koff..o + koff + hd];
            for h in 0..group {
                scores[h * n + i] = capped(dot(&qg[h * hd..(h + 1) * hd], k) * shape.scale, shape.softcap);
            }
        }
        for h in 0..group {
            let row = &mut scores[h * n..(h + 1) * n];
            let max = row.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
            let mut sum = 0.0f32;
            for s in row.iter_mut() {
                *s = (*s - max).exp();
                sum += *s;
            }
            let inv = 1.0 / sum;
            row.iter_mut().for_each(|s| *s *= inv);
        }
        let og = &mut out[g * group * hd..(g + 1) * group * hd];
        og.fill(0.0);
        for (i, o) in Slots::new(first, pos, table, shape) {
            let v = &v_cache[o + koff..o + koff + hd];
            for h in 0..group {
                let w = scores[h * n + i];
                for (acc, &x) in og[h * hd..(h + 1) * hd].iter_mut().zip(v) {
                    *acc += w * x.to_f32();
                }
            }
        }
    }
}

#[inline]
fn dot<E: KvElem>(a: &[f32], b: &[E]) -> f32 {
    // Eight independent accumulators let the compiler vectorize the loop.
    let mut acc = [0.0f32; 8];
    let chunks = a.len() / 8;
    for c in 0..chunks {
        for j in 0..8 {
            acc[j] += a[c * 8 + j] * b[c * 8 + j].to_f32();
        }
    }
    let mut s: f32 = acc.iter().sum();
    for i in chunks * 8..a.len() {
        s += a[i] * b[i].to_f32();
    }
    s
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use super::*;
    use crate::cpu::simd::{exp256, hsum};

    /// Eight cache elements widened to f32.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn load8<E: KvElem>(p: *const E) -> __m256 {
        if E::HALF {
            _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i))
        } else {
            _mm256_loadu_ps(p as *const f32)
        }
    }

    /// All heads of one query row; `HD8 = head_dim / 8`. Each query head lives in registers (scaled
    /// once) while its keys stream by; the output head accumulates in registers over the values.
    #[target_feature(enable = "avx2,fma,f16c")]
    #[allow(clippy::needless_range_loop, clippy::too_many_arguments)]
    pub unsafe fn attend_row<const HD8: usize, E: KvElem>(
        q: &[f32],
        pos: usize,
        table: &[u32],
        k_cache: &[E],
        v_cache: &[E],
        shape: &AttentionShape,
        out: &mut [f32],
        scores: &mut Vec<f32>,
    ) {
        let hd = HD8 * 8;
        debug_assert_eq!(hd, shape.head_dim);
        let group = shape.num_heads / shape.num_kv_heads;
        let first = match shape.sliding_window {
            Some(w) if pos + 1 > w => pos + 1 - w,
            _ => 0,
        };
        let n = pos + 1 - first;
        reserve_scores(scores, n);
        let kp = k_cache.as_ptr();
        let vp = v_cache.as_ptr();
        for head in 0..shape.num_heads {
            let koff = (head / group) * hd;
            let qh = q.as_ptr().add(head * hd);
            let scale = _mm256_set1_ps(shape.scale);
            let mut qv = [_mm256_setzero_ps(); HD8];
            for c in 0..HD8 {
                qv[c] = _mm256_mul_ps(_mm256_loadu_ps(qh.add(c * 8)), scale);
            }
            let mut max = f32::NEG_INFINITY;
            for (i, o) in Slots::new(first, pos, table, shape) {
                let k = kp.add(o + koff);
                let (mut a0, mut a1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
                let mut c = 0;
                while c + 1 < HD8 {
                    a0 = _mm256_fmadd_ps(qv[c], load8(k.add(c * 8)), a0);
                    a1 = _mm256_fmadd_ps(qv[c + 1], load8(k.add(c * 8 + 8)), a1);
                    c += 2;
                }
                if c < HD8 {
                    a0 = _mm256_fmadd_ps(qv[c], load8(k.add(c * 8)), a0);
                }
                let s = hsum(_mm256_add_ps(a0, a1));
                let s = capped(s, shape.softcap);
                scores[i] = s;
                max = max.max(s);
            }
            let mut sum = 0f32;
            let (mv, mut sv) = (_mm256_set1_ps(max), _mm256_setzero_ps());
            let mut chunks = scores.chunks_exact_mut(8);
            for ch in &mut chunks {
                let e = exp256(_mm256_sub_ps(_mm256_loadu_ps(ch.as_ptr()), mv));
                _mm256_storeu_ps(ch.as_mut_ptr(), e);
                sv = _mm256_add_ps(sv, e);
            }
            for s in chunks.into_remainder() {
                *s = (*s - max).exp();
                sum += *s;
            }
            sum += hsum(sv);
            let mut acc = [_mm256_setzero_ps(); HD8];
            for (i, o) in Slots::new(first, pos, table, shape) {
                let v = vp.add(o + koff);
                let w = _mm256_set1_ps(scores[i]);
                for c in 0..HD8 {
                    acc[c] = _mm256_fmadd_ps(w, load8(v.add(c * 8)), acc[c]);
                }
            }
            let inv = _mm256_set1_ps(1.0 / sum);
            let oh = out.as_mut_ptr().add(head * hd);
            for c in 0..HD8 {
                _mm256_storeu_ps(oh.add(c * 8), _mm256_mul_ps(acc[c], inv));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Dense reference: softmax(q kᵀ · scale + causal/window mask) v for one sequence stored contiguously.
    fn reference(q: &[f32], k: &[f32], v: &[f32], n_new: usize, ctx: usize, sh: &AttentionShape) -> Vec<f32> {
        let hd = sh.head_dim;
        let mut out = vec![0.0; n_new * sh.num_heads * hd];
        for i in 0..n_new {
            let pos = ctx - n_new + i;
            for h in 0..sh.num_heads {
                let kvh = h * sh.num_kv_heads / sh.num_heads;
                let qv = &q[(i * sh.num_heads + h) * hd..][..hd];
                let mut w: Vec<f64> = (0..=pos)
                    .map(|t| {
                        let visible = sh.sliding_window.is_none_or(|win| pos - t < win);
                        if !visible {
                            return f64::NEG_INFINITY;
                        }
                        let kv = &k[(t * sh.num_kv_heads + kvh) * hd..][..hd];
                        let s = qv.iter().zip(kv).map(|(a, b)| (*a as f64) * (*b as f64)).sum::<f64>() * sh.scale as f64;
                        match sh.softcap {
                            Some(c) => c as f64 * (s / c as f64).tanh(),
                            None => s,
                        }
                    })
                    .collect();
                let m = w.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let z: f64 = w
                    .iter_mut()
                    .map(|x| {
                        *x = (*x - m).exp();
                        *x
                    })
                    .sum();
                for d in 0..hd {
                    let acc: f64 = (0..=pos).map(|t| w[t] / z * v[(t * sh.num_kv_heads + kvh) * hd + d] as f64).sum();
                    out[(i * sh.num_heads + h) * hd + d] = acc as f32;
                }
            }
        }
        out
    }

    fn rand_vec(n: usize, seed: &mut u64) -> Vec<f32> {
        (0..n)
            .map(|_| {
                *seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                ((*seed >> 33) as f32 / (1u64 << 31) as f32) * 2.0 - 1.0
            })
            .collect()
    }

    #[test]
    fn paged_matches_dense_ragged_gqa_and_window() {
        for ((window, softcap), head_dim, isa) in [(None, None), (Some(3), None), (Some(20), None), (None, Some(0.8))]
            .into_iter()
            .flat_map(|w| [8, 64, 72].into_iter().flat_map(move |hd| Isa::available().into_iter().map(move |isa| (w, hd, isa))))
        {
            let sh =
                AttentionShape { num_heads: 4, num_kv_heads: 2, head_dim, block_size: 4, scale: 0.35, sliding_window: window, softcap };
            let kv_row = sh.num_kv_heads * sh.head_dim;
            let num_blocks = 16;
            let mut kc = vec![0.0f32; num_blocks * sh.block_size * kv_row];
            let mut vc = kc.clone();
            let mut kh = vec![half::f16::ZERO; num_blocks * sh.block_size * kv_row];
            let mut vh = kh.clone();
            let mut seed = 7u64;
            // Two sequences: one already holds 6 tokens and decodes 1; one prefills 30 tokens (rows see
            // up to 30 keys, past the 8-wide vector steps of the softmax).
            // Blocks are deliberately scattered and interleaved between the sequences.
            let tables: [Vec<u32>; 2] = [vec![9, 2], vec![5, 14, 0, 11, 3, 7, 15, 1]];
            let ctx = [7usize, 30];
            let new = [1usize, 30];
            let full: Vec<(Vec<f32>, Vec<f32>)> =
                ctx.iter().map(|&c| (rand_vec(c * kv_row, &mut seed), rand_vec(c * kv_row, &mut seed))).collect();
            // Pre-fill the old tokens of sequence 0.
            let slot = |s: usize, t: usize| tables[s][t / sh.block_size] as usize * sh.block_size + t % sh.block_size;
            let old: Vec<usize> = (0..6).map(|t| slot(0, t)).collect();
            write_kv(&full[0].0[..6 * kv_row], &full[0].1[..6 * kv_row], &old, &sh, &mut kc, &mut vc);
            write_kv(&full[0].0[..6 * kv_row], &full[0].1[..6 * kv_row], &old, &sh, &mut kh, &mut vh);
            // The batch: seq 0's last token, then seq 1's 30 tokens.
            let mut kb = full[0].0[6 * kv_row..].to_vec();
            kb.extend_from_slice(&full[1].0);
            let mut vb = full[0].1[6 * kv_row..].to_vec();
            vb.extend_from_slice(&full[1].1);
            let slots: Vec<usize> = std::iter::once(slot(0, 6)).chain((0..30).map(|t| slot(1, t))).collect();
            write_kv(&kb, &vb, &slots, &sh, &mut kc, &mut vc);
            write_kv(&kb, &vb, &slots, &sh, &mut kh, &mut vh);
            let q = rand_vec(31 * sh.num_heads * sh.head_dim, &mut seed);
            let seqs = [
                SeqAttention { q_start: 0, q_len: 1, context_len: 7, block_table: &tables[0] },
                SeqAttention { q_start: 1, q_len: 30, context_len: 30, block_table: &tables[1] },
            ];
            let mut out = vec![f32::NAN; q.len()];
            paged_attention_with(isa, &q, &kc, &vc, &seqs, &sh, &mut out);
            let qr = sh.num_heads * sh.head_dim;
            let r0 = reference(&q[..qr], &full[0].0, &full[0].1, new[0], ctx[0], &sh);
            let r1 = reference(&q[qr..], &full[1].0, &full[1].1, new[1], ctx[1], &sh);
            let expect: Vec<f32> = r0.into_iter().chain(r1).collect();
            for (a, b) in out.iter().zip(&expect) {
                assert!((a - b).abs() < 1e-5, "window {window:?} head_dim {head_dim} {isa:?}: {a} vs {b}");
            }
            // An f16 cache gives the reference over f16-rounded keys and values.
            let round = |x: &[f32]| -> Vec<f32> { x.iter().map(|&v| half::f16::from_f32(v).to_f32()).collect() };
            let mut out = vec![f32::NAN; q.len()];
            paged_attention_with(isa, &q, &kh, &vh, &seqs, &sh, &mut out);
            let r0 = reference(&q[..qr], &round(&full[0].0), &round(&full[0].1), new[0], ctx[0], &sh);
            let r1 = reference(&q[qr..], &round(&full[1].0), &round(&full[1].1), new[1], ctx[1], &sh);
            for (a, b) in out.iter().zip(r0.iter().chain(&r1)) {
                assert!((a - b).abs() < 1e-5, "f16 cache, window {window:?} head_dim {head_dim} {isa:?}: {a} vs {b}");
            }
        }
    }

    /// A prompt chunk after earlier context (the tiled kernel's rows start past position 0 and
    /// its key steps cross block boundaries), every path against the dense reference.
    #[test]
    fn chunked_prompt_matches_dense() {
        for (window, softcap, head_dim) in [(None, None, 64), (Some(17), None, 128), (None, Some(1.5), 32), (Some(40), None, 64)] {
            let sh = AttentionShape { num_heads: 6, num_kv_heads: 2, head_dim, block_size: 8, scale: 0.2, sliding_window: window, softcap };
            let kv_row = sh.num_kv_heads * head_dim;
            let (ctx, new) = (53usize, 21usize);
            let mut seed = 11u64;
            let (k, v) = (rand_vec(ctx * kv_row, &mut seed), rand_vec(ctx * kv_row, &mut seed));
            let table: Vec<u32> = (0..ctx.div_ceil(sh.block_size) as u32).rev().collect();
            let slots: Vec<usize> = (0..ctx).map(|t| table[t / sh.block_size] as usize * sh.block_size + t % sh.block_size).collect();
            let mut kc = vec![0f32; table.len() * sh.block_size * kv_row];
            let mut vc = kc.clone();
            write_kv(&k, &v, &slots, &sh, &mut kc, &mut vc);
            let q = rand_vec(new * sh.num_heads * head_dim, &mut seed);
            let seqs = [SeqAttention { q_start: 0, q_len: new, context_len: ctx, block_table: &table }];
            let want = reference(&q, &k, &v, new, ctx, &sh);
            for isa in Isa::available() {
                let mut out = vec![f32::NAN; q.len()];
                paged_attention_with(isa, &q, &kc, &vc, &seqs, &sh, &mut out);
                for (i, (a, b)) in out.iter().zip(&want).enumerate() {
                    assert!((a - b).abs() < 1e-5, "window {window:?} softcap {softcap:?} head_dim {head_dim} {isa:?} [{i}]: {a} vs {b}");
                }
            }
        }
    }

    /// A row's result does not depend on how its sequence is split into forward passes: one
    /// prefill, chunks of 5, or one row at a time give bit-identical outputs (greedy decoding then
    /// does not change with batching, chunked prefill or preemption), with and without a window.
    #[test]
    fn results_do_not_depend_on_chunking() {
        for (window, head_dim) in [(None, 64), (Some(11), 64), (None, 72), (None, 128)] {
            let sh = AttentionShape {
                num_heads: 6,
                num_kv_heads: 2,
                head_dim,
                block_size: 4,
                scale: 0.3,
                sliding_window: window,
                softcap: None,
            };
            let kv_row = sh.num_kv_heads * head_dim;
            let q_row = sh.num_heads * head_dim;
            let ctx = 37;
            let mut seed = 5u64;
            let (k, v, q) = (rand_vec(ctx * kv_row, &mut seed), rand_vec(ctx * kv_row, &mut seed), rand_vec(ctx * q_row, &mut seed));
            let table: Vec<u32> = (0..ctx.div_ceil(sh.block_size) as u32).map(|b| (b * 7) % 10).collect();
            let slots: Vec<usize> = (0..ctx).map(|t| table[t / sh.block_size] as usize * sh.block_size + t % sh.block_size).collect();
            let mut kc = vec![0f32; 10 * sh.block_size * kv_row];
            let mut vc = kc.clone();
            write_kv(&k, &v, &slots, &sh, &mut kc, &mut vc);
            for isa in Isa::available() {
                let run = |chunk: usize| -> Vec<f32> {
                    let mut all = Vec::new();
                    for start in (0..ctx).step_by(chunk) {
                        let n = chunk.min(ctx - start);
                        let seqs = [SeqAttention { q_start: 0, q_len: n, context_len: start + n, block_table: &table }];
                        let mut out = vec![f32::NAN; n * q_row];
                        paged_attention_with(isa, &q[start * q_row..(start + n) * q_row], &kc, &vc, &seqs, &sh, &mut out);
                        all.extend(out);
                    }
                    all
                };
                let whole = run(ctx);
                for chunk in [1, 5] {
                    let got = run(chunk);
                    assert!(
                        got.iter().zip(&whole).all(|(a, b)| a.to_bits() == b.to_bits()),
                        "{isa:?} window {window:?} head_dim {head_dim}: chunks of {chunk} differ"
                    );
                }
            }
        }
    }
}
