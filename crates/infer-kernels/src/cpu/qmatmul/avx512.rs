//! AVX-512 VNNI kernels over the wide layout: one 512-bit register holds four consecutive values
//! of each of 16 weight rows, so `vpdpbusd` against four activation bytes broadcast to every lane
//! accumulates 16 rows' dot products at once: no horizontal sums, and one scale step per block
//! for 16 rows.

use std::arch::x86_64::*;

use super::*;

/// Tokens of one register tile (at most): 10 accumulators, 8 registers of weights, up to 4 of
/// scales and the temporaries fit the 32 vector registers. Ten, not eight: a decode step that
/// checks 8 drafted tokens has 9 rows, which then take one pass over the weights instead of two.
pub(super) const TOKENS: usize = 10;

/// Value layouts of the wide blocks.
pub(super) const NIBBLES: u8 = 0;
pub(super) const FIVE: u8 = 1;
pub(super) const BYTES: u8 = 2;

/// One group of 16 weight rows (`scales`, `qs`: its slice of the wide layout) × `r` (1..=TOKENS)
/// tokens of quantized activations `a` (`[r, nb]` blocks): writes `out[t·ldo + n]` for t < r,
/// n < nrows.
///
/// # Safety
/// The CPU must have AVX-512 F, BW, VL and VNNI; `out` must be valid for those writes.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma")]
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn tile(
    qt: QType,
    scales: &[f32],
    qs: &[u8],
    a: &[BlockQ8],
    nb: usize,
    r: usize,
    out: *mut f32,
    ldo: usize,
    nrows: usize,
) {
    debug_assert!((1..=TOKENS).contains(&r) && a.len() >= r * nb && nrows <= NW);
    debug_assert!(scales.len() == nb * qt.wide_slots() * NW && qs.len() == nb * qt.wide_quant_bytes());
    let mask: __mmask16 = if nrows == NW { 0xFFFF } else { (1u16 << nrows) - 1 };
    let (s, q, a) = (scales.as_ptr(), qs.as_ptr(), a.as_ptr());
    macro_rules! by_tokens {
        ($l:expr, $half:expr) => {
            match r {
                1 => kernel::<1, { $l }, { $half }>(s, q, a, nb, out, ldo, mask),
                2 => kernel::<2, { $l }, { $half }>(s, q, a, nb, out, ldo, mask),
                3 => kernel::<3, { $l }, { $half }>(s, q, a, nb, out, ldo, mask),
                4 => kernel::<4, { $l }, { $half }>(s, q, a, nb, out, ldo, mask),
                5 => kernel::<5, { $l }, { $half }>(s, q, a, nb, out, ldo, mask),
                6 => kernel::<6, { $l }, { $half }>(s, q, a, nb, out, ldo, mask),
                7 => kernel::<7, { $l }, { $half }>(s, q, a, nb, out, ldo, mask),
                8 => kernel::<8, { $l }, { $half }>(s, q, a, nb, out, ldo, mask),
                9 => kernel::<9, { $l }, { $half }>(s, q, a, nb, out, ldo, mask),
                _ => kernel::<10, { $l }, { $half }>(s, q, a, nb, out, ldo, mask),
            }
        };
    }
    match (qt.byte_quants(), qt.half_scales(), qt.five_bit()) {
        (true, true, _) => by_tokens!(BYTES, true),
        (true, false, _) => by_tokens!(BYTES, false),
        (false, _, true) => by_tokens!(FIVE, false),
        (false, _, false) => by_tokens!(NIBBLES, false),
    }
}

/// The 8 registers of one wide block's values (unsigned bytes, register j = values 4j..4j+4 of
/// the 16 rows).
#[inline(always)]
pub(super) unsafe fn load_block<const L: u8>(q: *const u8) -> [__m512i; 8] {
    let mut w = [_mm512_setzero_si512(); 8];
    if L == BYTES {
        for (j, v) in w.iter_mut().enumerate() {
            *v = _mm512_loadu_si512(q.add(64 * j) as *const _);
        }
        return w;
    }
    let low = _mm512_set1_epi8(0x0F);
    for j in 0..4 {
        let p = _mm512_loadu_si512(q.add(64 * j) as *const _);
        w[j] = _mm512_and_si512(p, low);
        w[j + 4] = _mm512_and_si512(_mm512_srli_epi16::<4>(p), low);
    }
    if L == FIVE {
        let sixteen = _mm512_set1_epi8(16);
        for (j, v) in w.iter_mut().enumerate() {
            let bits = (q.add(256 + 8 * j) as *const u64).read_unaligned();
            *v = _mm512_mask_add_epi8(*v, bits, *v, sixteen);
        }
    }
    w
}

/// `R` tokens × 16 rows; `HALF`: two scales and minimums per block (one per 16 values).
#[inline(always)]
unsafe fn kernel<const R: usize, const L: u8, const HALF: bool>(
    scales: *const f32,
    qs: *const u8,
    a: *const BlockQ8,
    nb: usize,
    out: *mut f32,
    ldo: usize,
    mask: __mmask16,
) {
    let qb = match L {
        BYTES => 512,
        FIVE => 320,
        _ => 256,
    };
    let sn = if HALF { 4 * NW } else { 2 * NW };
    let mut acc = [_mm512_setzero_ps(); R];
    for b in 0..nb {
        let sc = scales.add(b * sn);
        let w = load_block::<L>(qs.add(b * qb));
        let d0 = _mm512_loadu_ps(sc);
        let (d1, m0, m1) = if HALF {
            (_mm512_loadu_ps(sc.add(NW)), _mm512_loadu_ps(sc.add(2 * NW)), _mm512_loadu_ps(sc.add(3 * NW)))
        } else {
            (d0, _mm512_loadu_ps(sc.add(NW)), d0)
        };
        for (t, acc) in acc.iter_mut().enumerate() {
            let ab = &*a.add(t * nb + b);
            let x = ab.qs.as_ptr() as *const i32;
            // Two independent chains (values 0..16 and 16..32) keep the dot-product unit busy.
            let mut i0 = _mm512_setzero_si512();
            let mut i1 = _mm512_setzero_si512();
            for j in 0..4 {
                i0 = _mm512_dpbusd_epi32(i0, w[j], _mm512_set1_epi32(x.add(j).read()));
                i1 = _mm512_dpbusd_epi32(i1, w[j + 4], _mm512_set1_epi32(x.add(j + 4).read()));
            }
            let da = _mm512_set1_ps(ab.d);
            if HALF {
                *acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(i0), _mm512_mul_ps(d0, da), *acc);
                *acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(i1), _mm512_mul_ps(d1, da), *acc);
                *acc = _mm512_fmadd_ps(m0, _mm512_set1_ps(ab.s0), *acc);
                *acc = _mm512_fmadd_ps(m1, _mm512_set1_ps(ab.s - ab.s0), *acc);
            } else {
                let i = _mm512_add_epi32(i0, i1);
                *acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(i), _mm512_mul_ps(d0, da), *acc);
                *acc = _mm512_fmadd_ps(m0, _mm512_set1_ps(ab.s), *acc);
            }
        }
    }
    for (t, acc) in acc.iter().enumerate() {
        _mm512_mask_storeu_ps(out.add(t * ldo), mask, *acc);
    }
}
