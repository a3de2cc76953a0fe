//! The NEON register tile (aarch64): up to three weight rows × four tokens, F16 widened with
//! `fcvtl`/`fcvtl2` and BF16 by a shift.

use std::arch::aarch64::*;
use std::arch::asm;

use super::*;

/// Eight 16-bit floats at `p` widened to f32 (two vectors): `fcvtl`/`fcvtl2` for F16 (exact,
/// every aarch64 CPU), a 16-bit shift for BF16.
#[inline(always)]
unsafe fn load8(kind: HalfKind, p: *const u16) -> [float32x4_t; 2] {
    let raw = vld1q_u16(p);
    match kind {
        HalfKind::F16 => {
            let (lo, hi): (float32x4_t, float32x4_t);
            asm!("fcvtl {lo:v}.4s, {x:v}.4h", "fcvtl2 {hi:v}.4s, {x:v}.8h", x = in(vreg) raw, lo = out(vreg) lo, hi = out(vreg) hi,
                 options(pure, nomem, nostack, preserves_flags));
            [lo, hi]
        }
        HalfKind::Bf16 => [vreinterpretq_f32_u32(vshll_n_u16::<16>(vget_low_u16(raw))), vreinterpretq_f32_u32(vshll_high_n_u16::<16>(raw))],
    }
}

/// `nr` (1..=3) weight rows `w` (row-major, `cols` each) × `n` (1..=4) tokens `xs` → `o`.
///
/// # Safety
/// The CPU must have NEON (every aarch64 CPU); `w` holds `nr` rows and `xs` `n` rows of `cols`.
#[target_feature(enable = "neon")]
pub unsafe fn tile(kind: HalfKind, w: &[u16], nr: usize, xs: &[f32], n: usize, cols: usize, o: &mut [[f32; TR]; RR]) {
    debug_assert!(w.len() >= nr * cols && xs.len() >= n * cols);
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

/// `NRW` weight rows × `R` tokens, 8 columns a step; two accumulators per (row, token) (the
/// low and high four columns), which also hides the FMA latency of single-token tiles.
#[inline(always)]
#[allow(clippy::needless_range_loop)]
unsafe fn kernel<const NRW: usize, const R: usize>(kind: HalfKind, w: &[u16], xs: &[f32], cols: usize, o: &mut [[f32; TR]; RR]) {
    let mut acc = [[[vdupq_n_f32(0.0); 2]; R]; NRW];
    let (wp, xp) = (w.as_ptr(), xs.as_ptr());
    let mut c = 0;
    while c + 8 <= cols {
        let mut wv = [[vdupq_n_f32(0.0); 2]; NRW];
        for i in 0..NRW {
            wv[i] = load8(kind, wp.add(i * cols + c));
        }
        for t in 0..R {
            let x = [vld1q_f32(xp.add(t * cols + c)), vld1q_f32(xp.add(t * cols + c + 4))];
            for i in 0..NRW {
                for h in 0..2 {
                    acc[i][t][h] = vfmaq_f32(acc[i][t][h], wv[i][h], x[h]);
                }
            }
        }
        c += 8;
    }
    for i in 0..NRW {
        for t in 0..R {
            let mut s = vaddvq_f32(vaddq_f32(acc[i][t][0], acc[i][t][1]));
            for k in c..cols {
                let wv = match kind {
                    HalfKind::F16 => f16::from_bits(w[i * cols + k]).to_f32(),
                    HalfKind::Bf16 => bf16::from_bits(w[i * cols + k]).to_f32(),
                };
                s += wv * xs[t * cols + k];
            }
            o[i][t] = s;
        }
    }
}
