//! Prompts over 16-bit float weights with AMX-BF16 tile products, at f32-like accuracy: each f16
//! weight is exactly the sum of two bf16 numbers (`hi` = its rounding to bf16, `lo` = the rest, at
//! most four significant bits), and each f32 activation is `xh + xl` up to 2⁻¹⁶ of its size; three
//! products `xh·hi + xl·hi + xh·lo` (BF16 weights are exact in `hi` alone: two products) accumulate
//! in f32 inside the tile unit over the whole row, so there is no per-block scaling step at all.
//! The weights of a call's row groups are converted once into the tiles' pair layout and reused
//! by every 16 tokens.

use std::arch::asm;
use std::arch::x86_64::*;

use super::HalfKind;
use crate::cpu::NW;

/// Tokens per tile product.
pub(crate) const TOKENS: usize = 16;
/// Values of a row per tile product (32 bf16 = 64 bytes).
pub(crate) const KB: usize = 32;

/// bf16 bits of each f32 lane, rounded to nearest even (as u32 lanes holding the 16 bits).
#[inline(always)]
unsafe fn bf16_bits(v: __m512) -> __m512i {
    let b = _mm512_castps_si512(v);
    let bias = _mm512_add_epi32(_mm512_set1_epi32(0x7FFF), _mm512_and_si512(_mm512_srli_epi32::<16>(b), _mm512_set1_epi32(1)));
    _mm512_srli_epi32::<16>(_mm512_add_epi32(b, bias))
}

/// `v − bf16(v)` given the bf16 bits of `v`.
#[inline(always)]
unsafe fn rest(v: __m512, bits: __m512i) -> __m512 {
    _mm512_sub_ps(v, _mm512_castsi512_ps(_mm512_slli_epi32::<16>(bits)))
}

/// 16 lanes of 16-bit floats widened to f32.
#[inline(always)]
unsafe fn widen(kind: HalfKind, p: *const u16) -> __m512 {
    let raw = _mm256_loadu_si256(p as *const __m256i);
    match kind {
        HalfKind::F16 => _mm512_cvtph_ps(raw),
        HalfKind::Bf16 => _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(raw))),
    }
}

/// Activations `x` (`[m, cols]`, f32) as bf16 `hi` and `lo` halves, row-major (tile A rows).
///
/// # Safety
/// The CPU must have AVX-512 F/BW; `cols` must be a multiple of 16.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
pub(crate) unsafe fn split_activations(x: &[f32], hi: &mut [u16], lo: &mut [u16]) {
    debug_assert!(x.len() == hi.len() && x.len() == lo.len() && x.len().is_multiple_of(16));
    for i in (0..x.len()).step_by(16) {
        let v = _mm512_loadu_ps(x.as_ptr().add(i));
        let h = bf16_bits(v);
        let l = bf16_bits(rest(v, h));
        _mm256_storeu_si256(hi.as_mut_ptr().add(i) as *mut __m256i, _mm512_cvtepi32_epi16(h));
        _mm256_storeu_si256(lo.as_mut_ptr().add(i) as *mut __m256i, _mm512_cvtepi32_epi16(l));
    }
}

/// One row group of the wide layout (`w`: `[cols, 16]`) as B tiles: per 32-value block, `hi` then
/// `lo`, each 16 rows of (value 2p, value 2p + 1) pairs for the 16 weight rows (1 KiB).
///
/// # Safety
/// The CPU must have AVX-512 F/BW; `cols` must be a multiple of 32 and `dst` hold `cols / 32 · 1024` u32.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
pub(crate) unsafe fn weight_tiles(kind: HalfKind, w: &[u16], cols: usize, dst: &mut [u32]) {
    debug_assert!(cols.is_multiple_of(KB) && w.len() == cols * NW && dst.len() == cols / KB * 2 * 256);
    let wp = w.as_ptr();
    for kb in 0..cols / KB {
        let (hi, lo) = dst[kb * 512..(kb + 1) * 512].split_at_mut(256);
        for p in 0..KB / 2 {
            let k = kb * KB + 2 * p;
            let (a, b) = (widen(kind, wp.add(k * NW)), widen(kind, wp.add((k + 1) * NW)));
            let (ha, hb) = (bf16_bits(a), bf16_bits(b));
            let pair = |x: __m512i, y: __m512i| _mm512_or_si512(x, _mm512_slli_epi32::<16>(y));
            _mm512_storeu_si512(hi.as_mut_ptr().add(16 * p) as *mut _, pair(ha, hb));
            _mm512_storeu_si512(lo.as_mut_ptr().add(16 * p) as *mut _, pair(bf16_bits(rest(a, ha)), bf16_bits(rest(b, hb))));
        }
    }
}

#[repr(C, align(64))]
struct TileConfig([u8; 64]);

/// Tokens `0..m` (a multiple of 16) of the split activations (`[m, cols]` bf16 each) × the row
/// groups whose B tiles `tiles(g)` gives (from [`weight_tiles`]) into `out` (`[m, ldo]`, group g's
/// rows at g·16, `nrows(g)` of them valid). `lo_weights`: whether the weights need their `lo`
/// part (F16; BF16 weights are exact in `hi`).
///
/// # Safety
/// [`amx_bf16_available`](crate::cpu::isa::amx_bf16_available) must hold; `out` must be valid for those writes.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn run(
    xh: &[u16],
    xl: &[u16],
    cols: usize,
    m: usize,
    groups: std::ops::Range<usize>,
    tiles: &dyn Fn(usize) -> *const u32,
    nrows: &dyn Fn(usize) -> usize,
    lo_weights: bool,
    out: *mut f32,
    ldo: usize,
) {
    debug_assert!(m.is_multiple_of(TOKENS) && cols.is_multiple_of(KB) && xh.len() >= m * cols && xl.len() >= m * cols);
    // tmm0..tmm3: partial sums (16 tokens × 16 rows f32), taken in turn so consecutive tile
    // products do not wait for each other's results; tmm4/tmm5: xh/xl (16 tokens × 32 bf16);
    // tmm6/tmm7: the weights' hi/lo tiles.
    let mut c = [0u8; 64];
    c[0] = 1;
    for t in 0..8 {
        c[16 + 2 * t..18 + 2 * t].copy_from_slice(&64u16.to_le_bytes());
        c[48 + t] = 16;
    }
    let cfg = TileConfig(c);
    asm!("ldtilecfg [{}]", in(reg) cfg.0.as_ptr(), options(nostack, readonly));
    let mut sums = [[[0f32; NW]; TOKENS]; 4];
    let stride = cols * 2;
    let nkb = cols / KB;
    for t0 in (0..m).step_by(TOKENS) {
        for g in groups.clone() {
            let b = tiles(g);
            asm!("tilezero tmm0", "tilezero tmm1", "tilezero tmm2", "tilezero tmm3", options(nostack, nomem));
            // One block's products into the given sum tiles.
            macro_rules! block {
                ($kb:expr, $c0:literal, $c1:literal, $c2:literal) => {{
                    let kb = $kb;
                    let (ah, al) = (xh.as_ptr().add(t0 * cols + kb * KB), xl.as_ptr().add(t0 * cols + kb * KB));
                    let (bh, bl) = (b.add(kb * 512), b.add(kb * 512 + 256));
                    if lo_weights {
                        asm!(
                            "tileloadd tmm4, [{ah} + {s}*1]",
                            "tileloadd tmm6, [{bh} + {s64}*1]",
                            concat!("tdpbf16ps ", $c0, ", tmm4, tmm6"),
                            "tileloadd tmm5, [{al} + {s}*1]",
                            concat!("tdpbf16ps ", $c1, ", tmm5, tmm6"),
                            "tileloadd tmm7, [{bl} + {s64}*1]",
                            concat!("tdpbf16ps ", $c2, ", tmm4, tmm7"),
                            ah = in(reg) ah, al = in(reg) al, bh = in(reg) bh, bl = in(reg) bl,
                            s = in(reg) stride, s64 = in(reg) 64usize,
                            options(nostack),
                        );
                    } else {
                        asm!(
                            "tileloadd tmm4, [{ah} + {s}*1]",
                            "tileloadd tmm6, [{bh} + {s64}*1]",
                            concat!("tdpbf16ps ", $c0, ", tmm4, tmm6"),
                            "tileloadd tmm5, [{al} + {s}*1]",
                            concat!("tdpbf16ps ", $c1, ", tmm5, tmm6"),
                            ah = in(reg) ah, al = in(reg) al, bh = in(reg) bh,
                            s = in(reg) stride, s64 = in(reg) 64usize,
                            options(nostack),
                        );
                    }
                }};
            }
            // Blocks in fours: three products each (two without lo) rotate over the four sums.
            let mut kb = 0;
            while kb < nkb {
                block!(kb, "tmm0", "tmm1", "tmm2");
                if kb + 1 < nkb {
                    block!(kb + 1, "tmm3", "tmm0", "tmm1");
                }
                if kb + 2 < nkb {
                    block!(kb + 2, "tmm2", "tmm3", "tmm0");
                }
                if kb + 3 < nkb {
                    block!(kb + 3, "tmm1", "tmm2", "tmm3");
                }
                kb += 4;
            }
            asm!(
                "tilestored [{c0} + {s64}*1], tmm0",
                "tilestored [{c1} + {s64}*1], tmm1",
                "tilestored [{c2} + {s64}*1], tmm2",
                "tilestored [{c3} + {s64}*1], tmm3",
                c0 = in(reg) sums[0].as_mut_ptr(),
                c1 = in(reg) sums[1].as_mut_ptr(),
                c2 = in(reg) sums[2].as_mut_ptr(),
                c3 = in(reg) sums[3].as_mut_ptr(),
                s64 = in(reg) 64usize,
                options(nostack),
            );
            let n = nrows(g);
            let mask: __mmask16 = if n == NW { 0xFFFF } else { (1u16 << n) - 1 };
            #[allow(clippy::needless_range_loop)]
            for i in 0..TOKENS {
                let v = _mm512_add_ps(
                    _mm512_add_ps(_mm512_loadu_ps(sums[0][i].as_ptr()), _mm512_loadu_ps(sums[1][i].as_ptr())),
                    _mm512_add_ps(_mm512_loadu_ps(sums[2][i].as_ptr()), _mm512_loadu_ps(sums[3][i].as_ptr())),
                );
                _mm512_mask_storeu_ps(out.add((t0 + i) * ldo + g * NW), mask, v);
            }
        }
    }
    asm!("tilerelease", options(nostack, nomem));
}
