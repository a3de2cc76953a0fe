//! The same kernel on AVX2: 8 query rows per unit (one per lane), 8 keys per step.

use std::arch::x86_64::*;

use super::{key_range, AttentionShape, KvElem, Lane};
use crate::cpu::simd::exp256;

/// Query rows per unit.
pub(crate) const ROWS: usize = 8;
const KEYS: usize = 8;

#[repr(C, align(32))]
struct Scratch<const HD: usize> {
    qt: [[f32; ROWS]; HD],
    ot: [[f32; ROWS]; HD],
    kb: [[f32; HD]; KEYS],
    vb: [[f32; HD]; KEYS],
}

/// [`super::avx512::unit`] for 1 ≤ n ≤ 8 lanes.
///
/// # Safety
/// The CPU must have AVX2, FMA and F16C; otherwise as [`super::avx512::unit`].
#[target_feature(enable = "avx2,fma,f16c")]
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

#[inline(always)]
unsafe fn copy_row<const HD: usize, E: KvElem>(src: *const E, scales: *const half::f16, dst: *mut f32) {
    for c in (0..HD).step_by(8) {
        let v = if E::Q8 {
            let x = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(src.add(c) as *const __m128i)));
            _mm256_mul_ps(x, _mm256_set1_ps((*scales.add(c / 32)).to_f32()))
        } else if E::HALF {
            _mm256_cvtph_ps(_mm_loadu_si128(src.add(c) as *const __m128i))
        } else {
            _mm256_loadu_ps(src.add(c) as *const f32)
        };
        _mm256_store_ps(dst.add(c), v);
    }
}

#[inline(always)]
unsafe fn softcap(s: __m256, c: f32) -> __m256 {
    let e = exp256(_mm256_mul_ps(s, _mm256_set1_ps(2.0 / c)));
    let t = _mm256_sub_ps(_mm256_set1_ps(1.0), _mm256_div_ps(_mm256_set1_ps(2.0), _mm256_add_ps(e, _mm256_set1_ps(1.0))));
    _mm256_mul_ps(t, _mm256_set1_ps(c))
}

#[inline(always)]
#[allow(clippy::needless_range_loop)]
unsafe fn unit_hd<const HD: usize, E: KvElem>((lanes, k_cache, v_cache, table, kvh, shape): super::Args<'_, E>) {
    let n = lanes.len();
    debug_assert!((1..=ROWS).contains(&n));
    let (kv_row, bs, koff) = (shape.num_kv_heads * HD, shape.block_size, kvh * HD);
    let (first, last) = key_range(lanes, shape.sliding_window, KEYS);
    let mut pos = [0i32; ROWS];
    for (p, l) in pos.iter_mut().zip(lanes) {
        *p = l.pos as i32;
    }
    let lane_pos = _mm256_loadu_si256(pos.as_ptr() as *const __m256i);
    // Lanes in use (all ones) and not (zero).
    let rows = _mm256_cmpgt_epi32(_mm256_set1_epi32(n as i32), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
    // On the stack (at most 64 KiB, for head size 256): no allocation per unit.
    let mut sc: Scratch<HD> = std::mem::zeroed();
    for (i, l) in lanes.iter().enumerate() {
        for d in 0..HD {
            sc.qt[d][i] = *l.q.add(d) * shape.scale;
        }
    }
    let neg_inf = _mm256_set1_ps(f32::NEG_INFINITY);
    let mut m = neg_inf;
    let mut l = _mm256_setzero_ps();
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
        let mut s = [_mm256_setzero_ps(); KEYS];
        for d in 0..HD {
            let qd = _mm256_load_ps(sc.qt[d].as_ptr());
            for j in 0..KEYS {
                s[j] = _mm256_fmadd_ps(qd, _mm256_set1_ps(sc.kb[j][d]), s[j]);
            }
        }
        let mut vis = [_mm256_setzero_ps(); KEYS];
        let mut mx = m;
        for j in 0..nk {
            let t = (t0 + j) as i32;
            // Visible: t ≤ p (not t > p), inside the window (p < t + w), a real row.
            let mut k = _mm256_andnot_si256(_mm256_cmpgt_epi32(_mm256_set1_epi32(t), lane_pos), rows);
            if let Some(w) = shape.sliding_window {
                k = _mm256_and_si256(k, _mm256_cmpgt_epi32(_mm256_set1_epi32(t + w as i32), lane_pos));
            }
            if let Some(c) = shape.softcap {
                s[j] = softcap(s[j], c);
            }
            vis[j] = _mm256_castsi256_ps(k);
            s[j] = _mm256_blendv_ps(neg_inf, s[j], vis[j]);
            mx = _mm256_max_ps(mx, s[j]);
        }
        let ms = _mm256_max_ps(mx, _mm256_set1_ps(-1e30));
        let alpha = exp256(_mm256_sub_ps(m, ms));
        let mut psum = _mm256_setzero_ps();
        for j in 0..KEYS {
            s[j] = if j < nk { _mm256_and_ps(vis[j], exp256(_mm256_sub_ps(s[j], ms))) } else { _mm256_setzero_ps() };
            psum = _mm256_add_ps(psum, s[j]);
        }
        l = _mm256_fmadd_ps(l, alpha, psum);
        for d0 in (0..HD).step_by(4) {
            let mut o = [_mm256_setzero_ps(); 4];
            for c in 0..4 {
                o[c] = _mm256_mul_ps(_mm256_load_ps(sc.ot[d0 + c].as_ptr()), alpha);
            }
            for j in 0..nk {
                for c in 0..4 {
                    o[c] = _mm256_fmadd_ps(s[j], _mm256_set1_ps(sc.vb[j][d0 + c]), o[c]);
                }
            }
            for c in 0..4 {
                _mm256_store_ps(sc.ot[d0 + c].as_mut_ptr(), o[c]);
            }
        }
        m = mx;
        t0 += nk;
    }
    let mut inv = [0f32; ROWS];
    _mm256_storeu_ps(inv.as_mut_ptr(), _mm256_div_ps(_mm256_set1_ps(1.0), l));
    for (i, lane) in lanes.iter().enumerate() {
        for d in 0..HD {
            *lane.out.add(d) = sc.ot[d][i] * inv[i];
        }
    }
}
