//! The AVX2 kernels: the narrow register tile (up to three weight rows × four tokens) and the AVX2
//! form of the wide kernel (a column of 16 rows as two registers of 8).

use std::arch::x86_64::*;

use super::*;
use crate::cpu::simd::hsum;

/// Eight 16-bit floats widened to f32.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn load8(kind: HalfKind, p: *const u16) -> __m256 {
    let raw = _mm_loadu_si128(p as *const __m128i);
    match kind {
        HalfKind::F16 => _mm256_cvtph_ps(raw),
        HalfKind::Bf16 => _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(raw), 16)),
    }
}

/// Tokens of one register tile over the wide layout (at most).
pub const WIDE_TOKENS: usize = 6;

/// The AVX2 form of the AVX-512 wide kernel: one group of 16 rows (`w`: `[cols, 16]`) × `n`
/// (1..=6) tokens; each column is two registers of 8 rows, times the token's activation
/// broadcast. Writes `out[t·ldo + r]` for t < n, r < nrows.
///
/// # Safety
/// The CPU must have AVX2, FMA and F16C; `out` must be valid for those writes.
#[target_feature(enable = "avx2,fma,f16c")]
#[allow(clippy::too_many_arguments)]
pub unsafe fn wide_tile(kind: HalfKind, w: &[u16], xs: &[f32], n: usize, cols: usize, out: *mut f32, ldo: usize, nrows: usize) {
    debug_assert!(w.len() == cols * NW && xs.len() >= n * cols && (1..=WIDE_TOKENS).contains(&n));
    let (wp, xp) = (w.as_ptr(), xs.as_ptr());
    // The format is a constant of each kernel, so its inner loop has no branch on it.
    macro_rules! by_tokens {
        ($bf16:expr) => {
            match n {
                1 => wide::<1, { $bf16 }>(wp, xp, cols, out, ldo, nrows),
                2 => wide::<2, { $bf16 }>(wp, xp, cols, out, ldo, nrows),
                3 => wide::<3, { $bf16 }>(wp, xp, cols, out, ldo, nrows),
                4 => wide::<4, { $bf16 }>(wp, xp, cols, out, ldo, nrows),
                5 => wide::<5, { $bf16 }>(wp, xp, cols, out, ldo, nrows),
                _ => wide::<6, { $bf16 }>(wp, xp, cols, out, ldo, nrows),
            }
        };
    }
    match kind {
        HalfKind::F16 => by_tokens!(false),
        HalfKind::Bf16 => by_tokens!(true),
    }
}

#[inline(always)]
unsafe fn wide<const R: usize, const BF16: bool>(w: *const u16, x: *const f32, cols: usize, out: *mut f32, ldo: usize, nrows: usize) {
    let kind = if BF16 { HalfKind::Bf16 } else { HalfKind::F16 };
    // Each token's activations from its own pointer (no address arithmetic per token and column).
    let xs: [*const f32; R] = std::array::from_fn(|t| x.add(t * cols));
    // One token: two sets of accumulators over alternating columns hide the FMA latency.
    let sets = if R == 1 { 2 } else { 1 };
    let mut lo = [[_mm256_setzero_ps(); R]; 2];
    let mut hi = [[_mm256_setzero_ps(); R]; 2];
    let mut k = 0;
    // The weights' line (two columns) `ahead` columns on is prefetched: the hardware prefetcher
    // alone left the first tile over a group stalling on its loads (a 2048 × 8192 F16 matrix at 16
    // tokens: 136-142 → 181-199 GFLOPS on 2 Zen 4 cores; at 64 tokens 134-173 → 186-203).
    let ahead = if R == 1 { 128 } else { 64 };
    while k + sets <= cols {
        if k % 2 == 0 {
            _mm_prefetch::<_MM_HINT_T0>(w.wrapping_add((k + ahead) * NW) as *const i8);
        }
        for s in 0..sets {
            let (wl, wh) = (load8(kind, w.add((k + s) * NW)), load8(kind, w.add((k + s) * NW + 8)));
            for t in 0..R {
                let xv = _mm256_set1_ps(*xs[t].add(k + s));
                lo[s][t] = _mm256_fmadd_ps(wl, xv, lo[s][t]);
                hi[s][t] = _mm256_fmadd_ps(wh, xv, hi[s][t]);
            }
        }
        k += sets;
    }
    if k < cols {
        let (wl, wh) = (load8(kind, w.add(k * NW)), load8(kind, w.add(k * NW + 8)));
        for t in 0..R {
            let xv = _mm256_set1_ps(*xs[t].add(k));
            lo[0][t] = _mm256_fmadd_ps(wl, xv, lo[0][t]);
            hi[0][t] = _mm256_fmadd_ps(wh, xv, hi[0][t]);
        }
    }
    let lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    let mask_lo = _mm256_cmpgt_epi32(_mm256_set1_epi32(nrows.min(8) as i32), lane);
    let mask_hi = _mm256_cmpgt_epi32(_mm256_set1_epi32(nrows.saturating_sub(8) as i32), lane);
    for t in 0..R {
        let (l, h) = if R == 1 { (_mm256_add_ps(lo[0][0], lo[1][0]), _mm256_add_ps(hi[0][0], hi[1][0])) } else { (lo[0][t], hi[0][t]) };
        _mm256_maskstore_ps(out.add(t * ldo), mask_lo, l);
        _mm256_maskstore_ps(out.add(t * ldo + 8), mask_hi, h);
    }
}

#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn tile(kind: HalfKind, w: &[u16], nr: usize, xs: &[f32], n: usize, cols: usize, o: &mut [[f32; TR]; RR]) {
    macro_rules! go {
        ($($r:literal, $t:literal);*) => {
            match (nr, n) {
                $(($r, $t) => kernel::<$r, $t>(kind, w, xs, cols, o),)*
                _ => unreachable!("tile of {nr} rows x {n} tokens"),
            }
        };
    }
    go!(1, 1; 1, 2; 1, 3; 1, 4; 2, 1; 2, 2; 2, 3; 2, 4; 3, 1; 3, 2; 3, 3; 3, 4)
}

/// `NRW` weight rows × `R` tokens, 8 columns a step; one accumulator per (row, token), and for
/// single-token tiles a second set to hide the FMA latency.
#[inline(always)]
#[allow(clippy::needless_range_loop)]
unsafe fn kernel<const NRW: usize, const R: usize>(kind: HalfKind, w: &[u16], xs: &[f32], cols: usize, o: &mut [[f32; TR]; RR]) {
    let mut acc = [[_mm256_setzero_ps(); R]; NRW];
    let mut acc2 = [_mm256_setzero_ps(); NRW];
    let wp = w.as_ptr();
    let xp = xs.as_ptr();
    let mut c = 0;
    if R == 1 {
        // Decode: two column steps per iteration into two accumulator sets.
        while c + 16 <= cols {
            let x0 = _mm256_loadu_ps(xp.add(c));
            let x1 = _mm256_loadu_ps(xp.add(c + 8));
            for i in 0..NRW {
                acc[i][0] = _mm256_fmadd_ps(load8(kind, wp.add(i * cols + c)), x0, acc[i][0]);
                acc2[i] = _mm256_fmadd_ps(load8(kind, wp.add(i * cols + c + 8)), x1, acc2[i]);
            }
            c += 16;
        }
    }
    while c + 8 <= cols {
        let mut wv = [_mm256_setzero_ps(); NRW];
        for i in 0..NRW {
            wv[i] = load8(kind, wp.add(i * cols + c));
        }
        for t in 0..R {
            let x = _mm256_loadu_ps(xp.add(t * cols + c));
            for i in 0..NRW {
                acc[i][t] = _mm256_fmadd_ps(wv[i], x, acc[i][t]);
            }
        }
        c += 8;
    }
    for i in 0..NRW {
        for t in 0..R {
            let v = if R == 1 { _mm256_add_ps(acc[i][0], acc2[i]) } else { acc[i][t] };
            let mut s = hsum(v);
            for k in c..cols {
                let wv = match kind {
                    HalfKind::F16 => half::f16::from_bits(w[i * cols + k]).to_f32(),
                    HalfKind::Bf16 => half::bf16::from_bits(w[i * cols + k]).to_f32(),
                };
                s += wv * xs[t * cols + k];
            }
            o[i][t] = s;
        }
    }
}
