//! The per-row attention kernel: all heads of one query row at a time, the softmax over a score
//! buffer; AVX2 for the usual head sizes, a portable loop otherwise (for what the tiled kernels do
//! not take: scalar CPUs, other head sizes, aarch64).

use super::{run_tasks, AttentionShape, Call, KvElem, Q8_BLOCK};
use crate::cpu::isa::Isa;
use crate::cpu::{scratch, OutPtr};
use std::cell::RefCell;

thread_local! {
    /// Reused buffer (see `scratch`): the per-row kernels' scores.
    static SCORES: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// Each row through [`attend_row`], the rows spread over the pool when the work is worth it.
pub(super) fn attend<E: KvElem>(call: &Call<'_, E>, out: &mut [f32]) {
    let Call { isa, q, k_cache, v_cache, k_scales, v_scales, seqs, shape, row_seq } = *call;
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
        let q = &q[r * q_row..(r + 1) * q_row];
        let (kc, vc) = ((k_cache, k_scales), (v_cache, v_scales));
        scratch::with(&SCORES, |scores| attend_row(isa, q, pos, seq.block_table, kc, vc, shape, out_row, scores));
    };
    run_tasks(seqs, q_row, out.len() / q_row, &run_row);
}

/// `c · tanh(s / c)`, or `s` without a cap.
#[inline(always)]
fn capped(s: f32, softcap: Option<f32>) -> f32 {
    match softcap {
        Some(c) => c * (s / c).tanh(),
        None => s,
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

/// Sizes the score buffer to `n`, its memory grown in large steps (powers of two, at least 4096
/// scores) so that a decode step whose context grows by one token almost never allocates.
fn reserve_scores(scores: &mut Vec<f32>, n: usize) {
    if scores.capacity() < n {
        scores.reserve_exact(n.next_power_of_two().max(4096) - scores.len());
    }
    scores.resize(n, 0.0);
}

/// All heads of one query row at position `pos` (`scores`: this thread's score buffer): the AVX2
/// kernel for the usual head sizes and float caches, else the portable loop. The caches come with
/// their q8_0 scales (empty for float caches).
#[allow(clippy::too_many_arguments)]
fn attend_row<E: KvElem>(
    isa: Isa,
    q: &[f32],
    pos: usize,
    table: &[u32],
    (k_cache, k_scales): (&[E], &[half::f16]),
    (v_cache, v_scales): (&[E], &[half::f16]),
    shape: &AttentionShape,
    out: &mut [f32],
    scores: &mut Vec<f32>,
) {
    #[cfg(target_arch = "x86_64")]
    if isa != Isa::Scalar && !E::Q8 {
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
                let qh = &qg[h * hd..(h + 1) * hd];
                let s = if E::Q8 {
                    // Block by block, each dot product times its block's scale.
                    let scales = &k_scales[(o + koff) / Q8_BLOCK..];
                    qh.chunks(Q8_BLOCK).zip(k.chunks(Q8_BLOCK)).zip(scales).map(|((a, b), d)| dot(a, b) * d.to_f32()).sum()
                } else {
                    dot(qh, k)
                };
                scores[h * n + i] = capped(s * shape.scale, shape.softcap);
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
                let oh = &mut og[h * hd..(h + 1) * hd];
                if E::Q8 {
                    let scales = &v_scales[(o + koff) / Q8_BLOCK..];
                    for ((acc, v), d) in oh.chunks_mut(Q8_BLOCK).zip(v.chunks(Q8_BLOCK)).zip(scales) {
                        let w = w * d.to_f32();
                        for (acc, &x) in acc.iter_mut().zip(v) {
                            *acc += w * x.to_f32();
                        }
                    }
                } else {
                    for (acc, &x) in oh.iter_mut().zip(v) {
                        *acc += w * x.to_f32();
                    }
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
