//! NEON kernels (aarch64) over the 4-row narrow layout: byte dot products with `sdot` where the
//! CPU has the dot-product extension ([`Isa::NeonDot`]), widening multiplies and pairwise adds
//! otherwise ([`Isa::Neon`], every aarch64 CPU).
//!
//! A block of four weight rows is loaded once per call and each token's activation block once;
//! per token, the four rows' 32-value integer sums are folded into one vector by pairwise adds
//! (lane = weight row), so one conversion and one FMA with the four rows' scales times the
//! activation scale finish the block for all four rows (no horizontal sums until the end).

use std::arch::aarch64::*;
use std::arch::asm;

use super::*;

/// Tokens per register tile (at most): the four rows' 8 weight vectors, a token's two activation
/// vectors and four partial sums, and the tile's accumulators stay in the 32 registers.
const TOKENS: usize = 3;

/// Quant layouts of [`kernel`]: signed bytes, 4-bit values, 4-bit values plus a fifth-bit plane.
const BYTES: u8 = 0;
const NIBBLES: u8 = 1;
const FIVE: u8 = 2;
/// Scale modes of [`kernel`]: a scale and a minimum per block, a scale only (Q8_0), two scales
/// per block (one per 16 values: Q3_K, Q6_K), two scales and two minimums (Q2_K).
const SCALE_MIN: u8 = 0;
const SCALE: u8 = 1;
const HALF_SCALES: u8 = 2;
const HALF_SCALES_MIN: u8 = 3;

/// `acc` plus the byte products of `w` and `a`, four consecutive products summed into each lane
/// (`sdot`), or, without the extension, the same total over the lanes from widening multiplies
/// (i8 · i8 fits 16 bits; pairs are summed into 32-bit lanes).
#[inline(always)]
unsafe fn dot<const SDOT: bool>(acc: int32x4_t, w: int8x16_t, a: int8x16_t) -> int32x4_t {
    if SDOT {
        let mut r = acc;
        // Only reached from `tile_dot`, which runs where the CPU has dotprod. Inline assembly is
        // assembled with the crate's baseline features, hence the directive.
        asm!(".arch_extension dotprod", "sdot {r:v}.4s, {w:v}.16b, {a:v}.16b", r = inout(vreg) r, w = in(vreg) w, a = in(vreg) a,
             options(pure, nomem, nostack, preserves_flags));
        r
    } else {
        let lo = vmull_s8(vget_low_s8(w), vget_low_s8(a));
        vpadalq_s16(vpadalq_s16(acc, lo), vmull_high_s8(w, a))
    }
}

/// Four rows' sums (one vector each) folded into one vector, lane i = row i.
#[inline(always)]
unsafe fn fold(s: [int32x4_t; NR]) -> float32x4_t {
    vcvtq_f32_s32(vpaddq_s32(vpaddq_s32(s[0], s[1]), vpaddq_s32(s[2], s[3])))
}

/// Four weight rows × `r` (1..=MR) activation rows, with `sdot`.
///
/// # Safety
/// The CPU must have the dot-product extension; the slices must be a row group of the narrow layout
/// (`scales`, `qs`) and `r` tokens of `nb` blocks (`a`).
#[target_feature(enable = "neon,dotprod")]
pub(super) unsafe fn tile_dot(qt: QType, scales: &[f32], qs: &[u8], a: &[BlockQ8], nb: usize, r: usize, o: &mut [[f32; MR]; NR]) {
    tile_body::<true>(qt, scales, qs, a, nb, r, o)
}

/// The same without the dot-product extension.
///
/// # Safety
/// As [`tile_dot`], on any aarch64 CPU.
#[target_feature(enable = "neon")]
pub(super) unsafe fn tile(qt: QType, scales: &[f32], qs: &[u8], a: &[BlockQ8], nb: usize, r: usize, o: &mut [[f32; MR]; NR]) {
    tile_body::<false>(qt, scales, qs, a, nb, r, o)
}

#[inline(always)]
unsafe fn tile_body<const SDOT: bool>(qt: QType, scales: &[f32], qs: &[u8], a: &[BlockQ8], nb: usize, r: usize, o: &mut [[f32; MR]; NR]) {
    debug_assert!((1..=MR).contains(&r) && a.len() >= r * nb);
    debug_assert!(scales.len() == nb * qt.scale_slots() * NR && qs.len() == nb * NR * qt.quant_bytes());
    let mut t0 = 0;
    while t0 < r {
        let n = TOKENS.min(r - t0);
        let a = &a[t0 * nb..];
        match qt {
            QType::Q8_0 => tokens::<BYTES, SCALE, SDOT>(n, scales, qs, a, nb, o, t0),
            QType::Q2K => tokens::<BYTES, HALF_SCALES_MIN, SDOT>(n, scales, qs, a, nb, o, t0),
            QType::Q3K | QType::Q6K => tokens::<BYTES, HALF_SCALES, SDOT>(n, scales, qs, a, nb, o, t0),
            QType::Q5_0 | QType::Q5_1 | QType::Q5K => tokens::<FIVE, SCALE_MIN, SDOT>(n, scales, qs, a, nb, o, t0),
            QType::Q4_0 | QType::Q4_1 | QType::Q4K => tokens::<NIBBLES, SCALE_MIN, SDOT>(n, scales, qs, a, nb, o, t0),
        }
        t0 += n;
    }
}

#[inline(always)]
unsafe fn tokens<const L: u8, const S: u8, const SDOT: bool>(
    n: usize,
    scales: &[f32],
    qs: &[u8],
    a: &[BlockQ8],
    nb: usize,
    o: &mut [[f32; MR]; NR],
    col0: usize,
) {
    match n {
        1 => kernel::<1, L, S, SDOT>(scales, qs, a, nb, o, col0),
        2 => kernel::<2, L, S, SDOT>(scales, qs, a, nb, o, col0),
        _ => kernel::<3, L, S, SDOT>(scales, qs, a, nb, o, col0),
    }
}

/// Four weight rows × `R` activation rows for quant layout `L` and scale mode `S`; one vector of
/// accumulators (lane = weight row) per activation row.
#[inline(always)]
unsafe fn kernel<const R: usize, const L: u8, const S: u8, const SDOT: bool>(
    scales: &[f32],
    qs: &[u8],
    a: &[BlockQ8],
    nb: usize,
    o: &mut [[f32; MR]; NR],
    col0: usize,
) {
    let qb = match L {
        NIBBLES => 16,
        FIVE => 20,
        _ => 32,
    };
    let slots = if S == HALF_SCALES_MIN { 4 } else { 2 };
    let mut acc = [vdupq_n_f32(0.0); R];
    let (sp, qp, ap) = (scales.as_ptr(), qs.as_ptr(), a.as_ptr());
    let mask = vdupq_n_u8(0x0F);
    // Fifth bits: byte i of the low (high) half takes byte i/8 (2 + i/8) of the 32-bit plane and
    // tests bit i%8 of it.
    let bits = vld1q_u8([1u8, 2, 4, 8, 16, 32, 64, 128, 1, 2, 4, 8, 16, 32, 64, 128].as_ptr());
    let spread_lo = vld1q_u8([0u8, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1].as_ptr());
    let spread_hi = vld1q_u8([2u8, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3].as_ptr());
    let sixteen = vdupq_n_u8(16);
    let zero = vdupq_n_s32(0);
    for b in 0..nb {
        let sc = sp.add(b * slots * NR);
        let q = qp.add(b * NR * qb);
        // Each row's values 0..16 and 16..32 as signed bytes.
        let mut w = [[vdupq_n_s8(0); 2]; NR];
        for (wr, wv) in w.iter_mut().enumerate() {
            let p = q.add(wr * qb);
            if L == BYTES {
                *wv = [vld1q_s8(p as *const i8), vld1q_s8(p.add(16) as *const i8)];
            } else {
                let raw = vld1q_u8(p);
                let (mut lo, mut hi) = (vandq_u8(raw, mask), vshrq_n_u8::<4>(raw));
                if L == FIVE {
                    let plane = vreinterpretq_u8_u32(vdupq_n_u32((p.add(16) as *const u32).read_unaligned()));
                    lo = vorrq_u8(lo, vandq_u8(vtstq_u8(vqtbl1q_u8(plane, spread_lo), bits), sixteen));
                    hi = vorrq_u8(hi, vandq_u8(vtstq_u8(vqtbl1q_u8(plane, spread_hi), bits), sixteen));
                }
                *wv = [vreinterpretq_s8_u8(lo), vreinterpretq_s8_u8(hi)];
            }
        }
        let d = vld1q_f32(sc);
        for (t, acc) in acc.iter_mut().enumerate() {
            let ab = &*ap.add(t * nb + b);
            let (a0, a1) = (vld1q_s8(ab.qs.as_ptr()), vld1q_s8(ab.qs.as_ptr().add(16)));
            if S == HALF_SCALES || S == HALF_SCALES_MIN {
                let h0 = fold([0, 1, 2, 3].map(|wr| dot::<SDOT>(zero, w[wr][0], a0)));
                let h1 = fold([0, 1, 2, 3].map(|wr| dot::<SDOT>(zero, w[wr][1], a1)));
                *acc = vfmaq_f32(*acc, h0, vmulq_n_f32(d, ab.d));
                *acc = vfmaq_f32(*acc, h1, vmulq_n_f32(vld1q_f32(sc.add(NR)), ab.d));
                if S == HALF_SCALES_MIN {
                    *acc = vfmaq_n_f32(*acc, vld1q_f32(sc.add(2 * NR)), ab.s0);
                    *acc = vfmaq_n_f32(*acc, vld1q_f32(sc.add(3 * NR)), ab.s - ab.s0);
                }
            } else {
                let s = fold([0, 1, 2, 3].map(|wr| dot::<SDOT>(dot::<SDOT>(zero, w[wr][0], a0), w[wr][1], a1)));
                *acc = vfmaq_f32(*acc, s, vmulq_n_f32(d, ab.d));
                if S == SCALE_MIN {
                    *acc = vfmaq_n_f32(*acc, vld1q_f32(sc.add(NR)), ab.s);
                }
            }
        }
    }
    for (t, acc) in acc.iter().enumerate() {
        let mut v = [0f32; NR];
        vst1q_f32(v.as_mut_ptr(), *acc);
        for (orow, &v) in o.iter_mut().zip(&v) {
            orow[col0 + t] = v;
        }
    }
}
