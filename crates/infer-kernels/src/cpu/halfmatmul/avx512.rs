//! The AVX-512 kernel over the wide layout: one group of 16 rows × up to 8 tokens, one column of
//! 16 rows widened per load and multiplied by each token's broadcast activation.

use std::arch::x86_64::*;

use super::*;

/// Tokens of one register tile (at most).
pub const TOKENS: usize = 8;

/// One group of 16 rows (`w`: `[cols, 16]`) × `n` (1..=8) tokens `xs` (`[n, cols]`): writes
/// `out[t·ldo + r]` for t < n, r < nrows.
///
/// # Safety
/// The CPU must have AVX-512 F/BW/VL; `out` must be valid for those writes.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
#[allow(clippy::too_many_arguments)]
pub unsafe fn tile(kind: HalfKind, w: &[u16], xs: &[f32], n: usize, cols: usize, out: *mut f32, ldo: usize, nrows: usize) {
    debug_assert!(w.len() == cols * NW && xs.len() >= n * cols && (1..=TOKENS).contains(&n));
    let mask: __mmask16 = if nrows == NW { 0xFFFF } else { (1u16 << nrows) - 1 };
    let (wp, xp) = (w.as_ptr(), xs.as_ptr());
    match n {
        1 => single(kind, wp, xp, cols, out, mask),
        2 => kernel::<2>(kind, wp, xp, cols, out, ldo, mask),
        3 => kernel::<3>(kind, wp, xp, cols, out, ldo, mask),
        4 => kernel::<4>(kind, wp, xp, cols, out, ldo, mask),
        5 => kernel::<5>(kind, wp, xp, cols, out, ldo, mask),
        6 => kernel::<6>(kind, wp, xp, cols, out, ldo, mask),
        7 => kernel::<7>(kind, wp, xp, cols, out, ldo, mask),
        _ => kernel::<8>(kind, wp, xp, cols, out, ldo, mask),
    }
}

/// Column `k` of the group: 16 rows widened to f32.
#[inline(always)]
unsafe fn column(kind: HalfKind, w: *const u16, k: usize) -> __m512 {
    let raw = _mm256_loadu_si256(w.add(k * NW) as *const __m256i);
    match kind {
        HalfKind::F16 => _mm512_cvtph_ps(raw),
        HalfKind::Bf16 => _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(raw))),
    }
}

#[inline(always)]
unsafe fn kernel<const R: usize>(kind: HalfKind, w: *const u16, x: *const f32, cols: usize, out: *mut f32, ldo: usize, mask: __mmask16) {
    let mut acc = [_mm512_setzero_ps(); R];
    for k in 0..cols {
        // The weights' line (two columns) 64 columns on, as in the AVX2 kernel.
        if k % 2 == 0 {
            _mm_prefetch::<_MM_HINT_T0>(w.wrapping_add((k + 64) * NW) as *const i8);
        }
        let wk = column(kind, w, k);
        for (t, acc) in acc.iter_mut().enumerate() {
            *acc = _mm512_fmadd_ps(wk, _mm512_set1_ps(*x.add(t * cols + k)), *acc);
        }
    }
    for (t, acc) in acc.iter().enumerate() {
        _mm512_mask_storeu_ps(out.add(t * ldo), mask, *acc);
    }
}

/// One token (decode): four accumulators over alternating columns hide the FMA latency.
#[inline(always)]
unsafe fn single(kind: HalfKind, w: *const u16, x: *const f32, cols: usize, out: *mut f32, mask: __mmask16) {
    let mut acc = [_mm512_setzero_ps(); 4];
    let mut k = 0;
    while k + 4 <= cols {
        for l in [128, 130] {
            _mm_prefetch::<_MM_HINT_T0>(w.wrapping_add((k + l) * NW) as *const i8);
        }
        for (j, acc) in acc.iter_mut().enumerate() {
            *acc = _mm512_fmadd_ps(column(kind, w, k + j), _mm512_set1_ps(*x.add(k + j)), *acc);
        }
        k += 4;
    }
    while k < cols {
        acc[0] = _mm512_fmadd_ps(column(kind, w, k), _mm512_set1_ps(*x.add(k)), acc[0]);
        k += 1;
    }
    let s = _mm512_add_ps(_mm512_add_ps(acc[0], acc[1]), _mm512_add_ps(acc[2], acc[3]));
    _mm512_mask_storeu_ps(out, mask, s);
}
