//! The tiled kernel on AVX-512: 16 query rows per unit (one per lane), 16 keys per step.

use std::arch::x86_64::*;

use super::{key_range, Args, AttentionShape, KvElem, Lane};
use crate::cpu::simd::exp512;

/// Query rows per unit (one per lane).
pub(crate) const ROWS: usize = 16;
/// Keys per step.
const KEYS: usize = 16;

#[repr(C, align(64))]
struct Scratch<const HD: usize> {
    qt: [[f32; ROWS]; HD],
    ot: [[f32; ROWS]; HD],
    kb: [[f32; HD]; KEYS],
    vb: [[f32; HD]; KEYS],
}

/// The lanes (1 ≤ n ≤ 16) of one unit, all reading KV head `kvh` of the sequence whose blocks
/// `table` lists: writes each lane's `head_dim` outputs.
///
/// # Safety
/// The CPU must have AVX-512 F/BW/VL, FMA and F16C; [`super::supports`] must hold for the head size; the
/// lanes' pointers must be valid (`head_dim` elements each; outputs written by this unit only); the
/// caches and block table must hold the sequence's tokens up to the largest position.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
pub(crate) unsafe fn unit<E: KvElem>(
    lanes: &[Lane],
    k_cache: (&[E], &[half::f16]),
    v_cache: (&[E], &[half::f16]),
    table: &[u32],
    kvh: usize,
    shape: &AttentionShape,
) {
    let a = (lanes, k_cache, v_cache, table, kvh, shape);
    by_head_dim!(shape.head_dim, unit_hd, E, a)
}

/// One cache row of `HD` elements, widened to f32.
#[inline(always)]
unsafe fn copy_row<const HD: usize, E: KvElem>(src: *const E, scales: *const half::f16, dst: *mut f32) {
    for c in (0..HD).step_by(16) {
        let v = if E::Q8 {
            let x = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(src.add(c) as *const __m128i)));
            _mm512_mul_ps(x, _mm512_set1_ps((*scales.add(c / 32)).to_f32()))
        } else if E::HALF {
            _mm512_cvtph_ps(_mm256_loadu_si256(src.add(c) as *const __m256i))
        } else {
            _mm512_loadu_ps(src.add(c) as *const f32)
        };
        _mm512_store_ps(dst.add(c), v);
    }
}

/// `c · tanh(s / c)` lane-wise, as `c · (1 − 2 / (e^{2s/c} + 1))`.
#[inline(always)]
unsafe fn softcap(s: __m512, c: f32) -> __m512 {
    let e = exp512(_mm512_mul_ps(s, _mm512_set1_ps(2.0 / c)));
    let t = _mm512_sub_ps(_mm512_set1_ps(1.0), _mm512_div_ps(_mm512_set1_ps(2.0), _mm512_add_ps(e, _mm512_set1_ps(1.0))));
    _mm512_mul_ps(t, _mm512_set1_ps(c))
}

#[inline(always)]
#[allow(clippy::needless_range_loop)]
unsafe fn unit_hd<const HD: usize, E: KvElem>((lanes, k_cache, v_cache, table, kvh, shape): Args<'_, E>) {
    let n = lanes.len();
    debug_assert!((1..=ROWS).contains(&n));
    let (kv_row, bs, koff) = (shape.num_kv_heads * HD, shape.block_size, kvh * HD);
    let (first, last) = key_range(lanes, shape.sliding_window, KEYS);
    let mut pos = [0i32; ROWS];
    for (p, l) in pos.iter_mut().zip(lanes) {
        *p = l.pos as i32;
    }
    let lane_pos = _mm512_loadu_si512(pos.as_ptr() as *const _);
    let lanes_mask: __mmask16 = if n == ROWS { 0xFFFF } else { (1u16 << n) - 1 };
    // On the stack (at most 64 KiB, for head size 256): no allocation per unit.
    let mut sc: Scratch<HD> = std::mem::zeroed();
    for (i, l) in lanes.iter().enumerate() {
        for d in 0..HD {
            sc.qt[d][i] = *l.q.add(d) * shape.scale;
        }
    }
    let neg_inf = _mm512_set1_ps(f32::NEG_INFINITY);
    let mut m = neg_inf;
    let mut l = _mm512_setzero_ps();
    let mut t0 = first;
    while t0 <= last {
        let nk = KEYS.min(last + 1 - t0);
        for j in 0..nk {
            let t = t0 + j;
            let off = (table[t / bs] as usize * bs + t % bs) * kv_row + koff;
            // (q8_0: the row's first scale; `off` is a multiple of 32 then.)
            let so = off / 32;
            copy_row::<HD, E>(k_cache.0.as_ptr().add(off), k_cache.1.as_ptr().wrapping_add(so), sc.kb[j].as_mut_ptr());
            copy_row::<HD, E>(v_cache.0.as_ptr().add(off), v_cache.1.as_ptr().wrapping_add(so), sc.vb[j].as_mut_ptr());
        }
        // Scores: s[j] lane i = q_i · k_j.
        let mut s = [_mm512_setzero_ps(); KEYS];
        for d in 0..HD {
            let qd = _mm512_load_ps(sc.qt[d].as_ptr());
            for j in 0..KEYS {
                s[j] = _mm512_fmadd_ps(qd, _mm512_set1_ps(sc.kb[j][d]), s[j]);
            }
        }
        // Visibility (causal, window, real keys and rows), soft-cap, running maximum.
        let mut vis = [0 as __mmask16; KEYS];
        let mut mx = m;
        for j in 0..nk {
            let t = (t0 + j) as i32;
            let mut k = _mm512_cmp_epi32_mask::<_MM_CMPINT_LE>(_mm512_set1_epi32(t), lane_pos) & lanes_mask;
            if let Some(w) = shape.sliding_window {
                k &= _mm512_cmp_epi32_mask::<_MM_CMPINT_LT>(lane_pos, _mm512_set1_epi32(t + w as i32));
            }
            if let Some(c) = shape.softcap {
                s[j] = softcap(s[j], c);
            }
            s[j] = _mm512_mask_mov_ps(neg_inf, k, s[j]);
            vis[j] = k;
            mx = _mm512_max_ps(mx, s[j]);
        }
        // A row with no visible key yet keeps a finite reference, so nothing becomes NaN.
        let ms = _mm512_max_ps(mx, _mm512_set1_ps(-1e30));
        let alpha = exp512(_mm512_sub_ps(m, ms));
        let mut psum = _mm512_setzero_ps();
        for j in 0..KEYS {
            s[j] = if j < nk { _mm512_maskz_mov_ps(vis[j], exp512(_mm512_sub_ps(s[j], ms))) } else { _mm512_setzero_ps() };
            psum = _mm512_add_ps(psum, s[j]);
        }
        l = _mm512_fmadd_ps(l, alpha, psum);
        // Output: ot[d] = ot[d]·alpha + Σ_j p_j · v_j[d], eight dimensions at a time (independent chains).
        for d0 in (0..HD).step_by(8) {
            let mut o = [_mm512_setzero_ps(); 8];
            for c in 0..8 {
                o[c] = _mm512_mul_ps(_mm512_load_ps(sc.ot[d0 + c].as_ptr()), alpha);
            }
            for j in 0..nk {
                for c in 0..8 {
                    o[c] = _mm512_fmadd_ps(s[j], _mm512_set1_ps(sc.vb[j][d0 + c]), o[c]);
                }
            }
            for c in 0..8 {
                _mm512_store_ps(sc.ot[d0 + c].as_mut_ptr(), o[c]);
            }
        }
        m = mx;
        t0 += nk;
    }
    let mut inv = [0f32; ROWS];
    _mm512_storeu_ps(inv.as_mut_ptr(), _mm512_div_ps(_mm512_set1_ps(1.0), l));
    for (i, lane) in lanes.iter().enumerate() {
        for d in 0..HD {
            *lane.out.add(d) = sc.ot[d][i] * inv[i];
        }
    }
}
