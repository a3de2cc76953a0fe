//! Small SIMD helpers shared by the x86-64 kernels.

use std::arch::x86_64::*;

/// Sum of the eight lanes of `v`.
#[inline]
#[target_feature(enable = "avx2")]
pub(crate) unsafe fn hsum(v: __m256) -> f32 {
    let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    let s = _mm_add_ss(s, _mm_movehdup_ps(s));
    _mm_cvtss_f32(s)
}

/// `e^x` on eight lanes (relative error below 2e-7 for x in [-87, 88]; smaller x gives 0): x = n·ln2 + r
/// with |r| ≤ ln2/2, a degree-6 polynomial for e^r, and 2^n put into the exponent bits.
#[inline]
#[target_feature(enable = "avx2,fma")]
pub(crate) unsafe fn exp256(x: __m256) -> __m256 {
    let x = _mm256_max_ps(_mm256_min_ps(x, _mm256_set1_ps(88.0)), _mm256_set1_ps(-87.3));
    let n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(std::f32::consts::LOG2_E)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    // r = x − n·ln2 in two steps (ln2 split into a part exact in f32 and the rest).
    let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693_145_75), x);
    let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(1.428_606_8e-6), r);
    let mut p = _mm256_set1_ps(1.0 / 720.0);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0 / 120.0));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0 / 24.0));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0 / 6.0));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0));
    let pow2n = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23));
    _mm256_mul_ps(p, pow2n)
}

/// [`exp256`] on sixteen lanes (AVX-512), the same polynomial and range.
#[inline]
#[target_feature(enable = "avx512f")]
pub(crate) unsafe fn exp512(x: __m512) -> __m512 {
    let x = _mm512_max_ps(_mm512_min_ps(x, _mm512_set1_ps(88.0)), _mm512_set1_ps(-87.3));
    let n = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(_mm512_mul_ps(
        x,
        _mm512_set1_ps(std::f32::consts::LOG2_E),
    ));
    let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693_145_75), x);
    let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.428_606_8e-6), r);
    let mut p = _mm512_set1_ps(1.0 / 720.0);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0 / 120.0));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0 / 24.0));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0 / 6.0));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0));
    let pow2n = _mm512_castsi512_ps(_mm512_slli_epi32::<23>(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127))));
    _mm512_mul_ps(p, pow2n)
}

#[cfg(test)]
mod tests {
    #[test]
    fn exp256_matches_f64_exp() {
        if !(std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma")) {
            return;
        }
        let mut x = -87.0f32;
        while x < 88.0 {
            let xs: [f32; 8] = std::array::from_fn(|i| x + i as f32 * 0.0137);
            let mut got = [0f32; 8];
            // SAFETY: AVX2 and FMA were detected above.
            unsafe {
                let v = super::exp256(std::arch::x86_64::_mm256_loadu_ps(xs.as_ptr()));
                std::arch::x86_64::_mm256_storeu_ps(got.as_mut_ptr(), v);
            }
            for (g, &xi) in got.iter().zip(&xs) {
                let want = (xi as f64).exp();
                assert!(((*g as f64) - want).abs() <= 4e-7 * want, "exp({xi}) = {g}, want {want}");
            }
            x += 0.37;
        }
    }

    #[test]
    fn exp512_matches_f64_exp() {
        if !std::is_x86_feature_detected!("avx512f") {
            return;
        }
        let mut x = -87.0f32;
        while x < 88.0 {
            let xs: [f32; 16] = std::array::from_fn(|i| x + i as f32 * 0.0137);
            let mut got = [0f32; 16];
            // SAFETY: AVX-512 F was detected above.
            unsafe {
                let v = super::exp512(std::arch::x86_64::_mm512_loadu_ps(xs.as_ptr()));
                std::arch::x86_64::_mm512_storeu_ps(got.as_mut_ptr(), v);
            }
            for (g, &xi) in got.iter().zip(&xs) {
                let want = (xi as f64).exp();
                assert!(((*g as f64) - want).abs() <= 4e-7 * want, "exp({xi}) = {g}, want {want}");
            }
            x += 0.37;
        }
    }
}
