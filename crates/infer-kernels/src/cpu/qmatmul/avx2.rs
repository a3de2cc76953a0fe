//! AVX2+FMA kernels (optionally with 256-bit VNNI dot products) over the 4-row layout.

use std::arch::x86_64::*;

use super::*;
use crate::cpu::simd::hsum;

/// Σ over 32 lanes of u8 · i8 as 8 i32 lanes converted to f32.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot_u8_i8(u: __m256i, s: __m256i) -> __m256 {
    let p16 = _mm256_maddubs_epi16(u, s);
    _mm256_cvtepi32_ps(_mm256_madd_epi16(p16, _mm256_set1_epi16(1)))
}

/// The same with one VNNI instruction (no 16-bit intermediate).
#[inline]
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512vl,avx512vnni")]
unsafe fn dot_u8_i8_vnni(u: __m256i, s: __m256i) -> __m256 {
    _mm256_cvtepi32_ps(_mm256_dpbusd_epi32(_mm256_setzero_si256(), u, s))
}

/// [`tile`] with VNNI dot products.
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512vl,avx512vnni")]
pub(super) unsafe fn tile_vnni(qt: QType, scales: &[f32], qs: &[u8], a: &[BlockQ8], nb: usize, r: usize, o: &mut [[f32; MR]; NR]) {
    tile_body::<true>(qt, scales, qs, a, nb, r, o)
}

#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn tile(qt: QType, scales: &[f32], qs: &[u8], a: &[BlockQ8], nb: usize, r: usize, o: &mut [[f32; MR]; NR]) {
    tile_body::<false>(qt, scales, qs, a, nb, r, o)
}

#[inline(always)]
unsafe fn tile_body<const VNNI: bool>(qt: QType, scales: &[f32], qs: &[u8], a: &[BlockQ8], nb: usize, r: usize, o: &mut [[f32; MR]; NR]) {
    debug_assert!((1..=MR).contains(&r) && a.len() >= r * nb);
    debug_assert!(scales.len() == nb * qt.scale_slots() * NR && qs.len() == nb * NR * qt.quant_bytes());
    // Two tokens at a time (16 registers hold a 4×2 tile), three for Q8_0, which has no
    // minimum terms to keep.
    let step = if qt == QType::Q8_0 { 3 } else { 2 };
    let mut t0 = 0;
    while t0 < r {
        let a = &a[t0 * nb..];
        let n = step.min(r - t0);
        match (qt.byte_quants(), qt.half_scales(), qt.five_bit(), n) {
            (true, false, _, 1) if qt == QType::Q8_0 => kernel::<1, BYTES, VNNI, SCALE>(scales, qs, a, nb, o, t0),
            (true, false, _, 2) if qt == QType::Q8_0 => kernel::<2, BYTES, VNNI, SCALE>(scales, qs, a, nb, o, t0),
            (true, false, _, _) if qt == QType::Q8_0 => kernel::<3, BYTES, VNNI, SCALE>(scales, qs, a, nb, o, t0),
            (true, false, _, 1) => kernel::<1, BYTES, VNNI, SCALE_MIN>(scales, qs, a, nb, o, t0),
            (true, false, _, _) => kernel::<2, BYTES, VNNI, SCALE_MIN>(scales, qs, a, nb, o, t0),
            (true, true, _, 1) if qt == QType::Q2K => kernel::<1, BYTES, VNNI, HALF_SCALES_MIN>(scales, qs, a, nb, o, t0),
            (true, true, _, _) if qt == QType::Q2K => kernel::<2, BYTES, VNNI, HALF_SCALES_MIN>(scales, qs, a, nb, o, t0),
            (true, true, _, 1) => kernel::<1, BYTES, VNNI, HALF_SCALES>(scales, qs, a, nb, o, t0),
            (true, true, _, _) => kernel::<2, BYTES, VNNI, HALF_SCALES>(scales, qs, a, nb, o, t0),
            (false, _, true, 1) => kernel::<1, FIVE, VNNI, SCALE_MIN>(scales, qs, a, nb, o, t0),
            (false, _, true, _) => kernel::<2, FIVE, VNNI, SCALE_MIN>(scales, qs, a, nb, o, t0),
            (false, _, false, 1) => kernel::<1, NIBBLES, VNNI, SCALE_MIN>(scales, qs, a, nb, o, t0),
            (false, _, false, _) => kernel::<2, NIBBLES, VNNI, SCALE_MIN>(scales, qs, a, nb, o, t0),
        }
        t0 += n;
    }
}

/// Quant layouts of [`kernel`]: signed bytes, 4-bit values, 4-bit values plus a fifth-bit plane.
const BYTES: u8 = 0;
const NIBBLES: u8 = 1;
const FIVE: u8 = 2;
/// Scale modes of [`kernel`]: a scale and a minimum per block, a scale only (Q8_0), or two
/// scales per block, one per 16 values (Q6_K).
const SCALE_MIN: u8 = 0;
const SCALE: u8 = 1;
const HALF_SCALES: u8 = 2;
/// Two scales and two minimums per block, one of each per 16 values (Q2_K).
const HALF_SCALES_MIN: u8 = 3;

/// Four weight rows × `R` activation rows for quant layout `L`. Accumulators stay in registers:
/// `NR·R` vectors plus one 4-lane vector of minimum terms per activation row.
#[inline(always)]
#[allow(clippy::needless_range_loop)]
unsafe fn kernel<const R: usize, const L: u8, const VNNI: bool, const S: u8>(
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
    let mut acc = [[_mm256_setzero_ps(); R]; NR];
    let mut macc = [_mm_setzero_ps(); R];
    let sp = scales.as_ptr();
    let qp = qs.as_ptr();
    let ap = a.as_ptr();
    let mask = _mm256_set1_epi8(0x0F);
    let shift = _mm256_setr_epi32(0, 0, 0, 0, 4, 4, 4, 4);
    // Fifth bits: byte j takes byte j/8 of the 32-bit plane, then tests bit j%8.
    let spread = _mm256_setr_epi8(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3);
    let bit = _mm256_set1_epi64x(0x8040_2010_0804_0201u64 as i64);
    let sixteen = _mm256_set1_epi8(16);
    for b in 0..nb {
        let sc = sp.add(b * if S == HALF_SCALES_MIN { 4 } else { 2 } * NR);
        let q = qp.add(b * NR * qb);
        let mut aq = [_mm256_setzero_si256(); R];
        let mut da = [_mm256_setzero_ps(); R];
        for t in 0..R {
            let ab = &*ap.add(t * nb + b);
            aq[t] = _mm256_load_si256(ab.qs.as_ptr() as *const __m256i);
            da[t] = _mm256_set1_ps(ab.d);
            // Minimum terms (the slots hold second scales with HALF_SCALES).
            if S == SCALE_MIN {
                macc[t] = _mm_fmadd_ps(_mm_loadu_ps(sc.add(NR)), _mm_set1_ps(ab.s), macc[t]);
            }
            if S == HALF_SCALES_MIN {
                macc[t] = _mm_fmadd_ps(_mm_loadu_ps(sc.add(2 * NR)), _mm_set1_ps(ab.s0), macc[t]);
                macc[t] = _mm_fmadd_ps(_mm_loadu_ps(sc.add(3 * NR)), _mm_set1_ps(ab.s - ab.s0), macc[t]);
            }
        }
        for wr in 0..NR {
            // With HALF_SCALES, lanes 0..4 (values 0..16) take the first scale, lanes 4..8 the second.
            let d = if S == HALF_SCALES || S == HALF_SCALES_MIN {
                _mm256_set_m128(_mm_set1_ps(*sc.add(NR + wr)), _mm_set1_ps(*sc.add(wr)))
            } else {
                _mm256_broadcast_ss(&*sc.add(wr))
            };
            if L != BYTES {
                // Low nibbles in the low 128 bits (values 0..16), high nibbles above (16..32).
                let raw = _mm256_broadcastsi128_si256(_mm_loadu_si128(q.add(wr * qb) as *const __m128i));
                let mut w = _mm256_and_si256(_mm256_srlv_epi32(raw, shift), mask);
                if L == FIVE {
                    let plane = _mm256_set1_epi32((q.add(wr * qb + 16) as *const i32).read_unaligned());
                    let set = _mm256_cmpeq_epi8(_mm256_and_si256(_mm256_shuffle_epi8(plane, spread), bit), bit);
                    w = _mm256_or_si256(w, _mm256_and_si256(set, sixteen));
                }
                for t in 0..R {
                    let p = if VNNI { dot_u8_i8_vnni(w, aq[t]) } else { dot_u8_i8(w, aq[t]) };
                    acc[wr][t] = _mm256_fmadd_ps(_mm256_mul_ps(d, da[t]), p, acc[wr][t]);
                }
            } else {
                let w = _mm256_loadu_si256(q.add(wr * 32) as *const __m256i);
                let wabs = _mm256_sign_epi8(w, w);
                for t in 0..R {
                    let s = _mm256_sign_epi8(aq[t], w);
                    let p = if VNNI { dot_u8_i8_vnni(wabs, s) } else { dot_u8_i8(wabs, s) };
                    acc[wr][t] = _mm256_fmadd_ps(_mm256_mul_ps(d, da[t]), p, acc[wr][t]);
                }
            }
        }
    }
    for t in 0..R {
        let mut mins = [0f32; NR];
        _mm_storeu_ps(mins.as_mut_ptr(), macc[t]);
        for wr in 0..NR {
            o[wr][col0 + t] = hsum(acc[wr][t]) + mins[wr];
        }
    }
}

/// [`quantize_block_scalar`](super::quantize_block_scalar) with AVX2: the same blocks (the
/// conversion rounds to nearest, ties to even, as the scalar code does).
///
/// # Safety
/// The CPU must have AVX2; `chunk` must hold 32 values.
#[target_feature(enable = "avx2,fma")]
pub(super) unsafe fn quantize_block(chunk: &[f32]) -> BlockQ8 {
    debug_assert_eq!(chunk.len(), QK);
    let p = chunk.as_ptr();
    let v = [_mm256_loadu_ps(p), _mm256_loadu_ps(p.add(8)), _mm256_loadu_ps(p.add(16)), _mm256_loadu_ps(p.add(24))];
    let sign = _mm256_set1_ps(-0.0);
    let mut amax = _mm256_andnot_ps(sign, v[0]);
    for x in &v[1..] {
        amax = _mm256_max_ps(amax, _mm256_andnot_ps(sign, *x));
    }
    let m4 = _mm_max_ps(_mm256_castps256_ps128(amax), _mm256_extractf128_ps(amax, 1));
    let m2 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
    let amax = _mm_cvtss_f32(_mm_max_ss(m2, _mm_movehdup_ps(m2)));
    let d = amax / 127.0;
    let id = _mm256_set1_ps(if d > 0.0 { 1.0 / d } else { 0.0 });
    let q = v.map(|x| _mm256_cvtps_epi32(_mm256_mul_ps(x, id)));
    // Sums of values 0..16 and 16..32.
    let lo = _mm256_add_epi32(q[0], q[1]);
    let hi = _mm256_add_epi32(q[2], q[3]);
    let hsum = |s: __m256i| {
        let s = _mm_add_epi32(_mm256_castsi256_si128(s), _mm256_extracti128_si256(s, 1));
        let s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0b01_00_11_10));
        _mm_cvtsi128_si32(_mm_add_epi32(s, _mm_shuffle_epi32(s, 0b10_11_00_01)))
    };
    let (half, rest) = (hsum(lo), hsum(hi));
    // i32 → i16 → i8 packs work within 128-bit lanes; a final permute restores the order.
    let w01 = _mm256_packs_epi32(q[0], q[1]);
    let w23 = _mm256_packs_epi32(q[2], q[3]);
    let b = _mm256_packs_epi16(w01, w23);
    let b = _mm256_permutevar8x32_epi32(b, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
    let mut out = BlockQ8 { qs: [0; QK], d, s: d * (half + rest) as f32, s0: d * half as f32, neg_sums: [-half, -rest] };
    _mm256_store_si256(out.qs.as_mut_ptr() as *mut __m256i, b);
    out
}

/// Tokens of one register tile over the wide layout (at most).
pub(super) const WIDE_TOKENS: usize = 4;

/// One group of 16 rows of the wide layout (all formats but Q2_K) × `r` (1..=4) tokens with AVX2:
/// each half of a value line (8 rows × 4 values, 32 bytes) multiplies four activation bytes
/// broadcast to every lane with `vpmaddubsw`; the 16-bit sums of a block add up without overflow
/// (4-bit values: 8 lines × 2 × 15 × 127; 5-bit: two groups of 4 lines; 6-bit: pairs of lines), so
/// one to four `vpmaddwd`s a block give 8 rows' dot products at once. Both halves of each block are
/// taken in turn, so the group's weights stream from memory once. Writes `out[t·ldo + n]` for
/// t < r, n < nrows.
///
/// # Safety
/// The CPU must have AVX2, FMA and F16C; `out` must be valid for those writes.
#[target_feature(enable = "avx2,fma,f16c")]
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn wide_tile(
    form: WideForm,
    scales: &[f32],
    qs: &[u8],
    a: &[BlockQ8],
    nb: usize,
    r: usize,
    out: *mut f32,
    ldo: usize,
    nrows: usize,
) {
    debug_assert!((1..=WIDE_TOKENS).contains(&r) && a.len() >= r * nb && nrows <= NW);
    debug_assert!(scales.len() * 4 == form.scale_bytes(nb) && qs.len() == nb * form.value_bytes());
    let (s, q, a, moff) = (scales.as_ptr() as *const u8, qs.as_ptr(), a.as_ptr(), form.moff);
    // `kernel::<R, extra const args>` for the call's number of tokens.
    macro_rules! by_tokens {
        ($f:ident $(, $c:expr)*) => {
            match r {
                1 => $f::<1 $(, { $c })*>(s, q, a, nb, out, ldo, nrows, moff),
                2 => $f::<2 $(, { $c })*>(s, q, a, nb, out, ldo, nrows, moff),
                3 => $f::<3 $(, { $c })*>(s, q, a, nb, out, ldo, nrows, moff),
                _ => $f::<4 $(, { $c })*>(s, q, a, nb, out, ldo, nrows, moff),
            }
        };
    }
    // (The wide forms' value constants; this file's own name the narrow layout's.)
    match (form.values, form.scales) {
        (super::NIBBLES, D16) => by_tokens!(wide, false, D16),
        (super::NIBBLES, DM16) => by_tokens!(wide, false, DM16),
        (super::NIBBLES, KSM) => by_tokens!(wide, false, KSM),
        (super::FIVE, D16) => by_tokens!(wide, true, D16),
        (super::FIVE, DM16) => by_tokens!(wide, true, DM16),
        (super::FIVE, KSM) => by_tokens!(wide, true, KSM),
        (super::BYTES, D16) => by_tokens!(wide_bytes),
        (super::SIX, KHALF) => by_tokens!(wide_half, true),
        (super::NIBBLES, KHALF) => by_tokens!(wide_half, false),
        _ => unreachable!("AVX2's wide layout holds Q8_0 and 3- to 6-bit formats in compact form, not {form:?}"),
    }
}

/// 8 f16 numbers at `p` as f32.
#[inline(always)]
unsafe fn f16x8(p: *const u8) -> __m256 {
    _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i))
}

/// The 8 value lines of half `h` (rows 8h..8h + 8) of a wide block's nibbles at `q`: line j holds
/// values 4j..4j + 4 of each row (low nibbles for j < 4, high nibbles above).
#[inline(always)]
unsafe fn nibble_lines(q: *const u8, h: usize) -> [__m256i; 8] {
    let low = _mm256_set1_epi8(0x0F);
    let mut w = [_mm256_setzero_si256(); 8];
    for j in 0..4 {
        let p = _mm256_loadu_si256(q.add(64 * j + 32 * h) as *const __m256i);
        w[j] = _mm256_and_si256(p, low);
        w[j + 4] = _mm256_and_si256(_mm256_srli_epi16(p, 4), low);
    }
    w
}

/// Half `h` of the high-bit lines at `q + 256` (see `pack::high_bits`: `LINES` of them, one per
/// 8 / `LINES` registers) ORed into the 8 value lines `w` of that half: for line j, its bits
/// (`LINES` wide) at bit `LINES · (j % (8 / LINES))` of each byte shifted to bit 4 and masked.
#[inline(always)]
unsafe fn or_high_bits<const LINES: usize>(w: &mut [__m256i; 8], q: *const u8, h: usize) {
    let mask = _mm256_set1_epi8(if LINES == 1 { 0x10 } else { 0x30 });
    let mut lines = [_mm256_setzero_si256(); LINES];
    for (l, line) in lines.iter_mut().enumerate() {
        *line = _mm256_loadu_si256(q.add(256 + 64 * l + 32 * h) as *const __m256i);
    }
    let per = 8 / LINES;
    for (j, v) in w.iter_mut().enumerate() {
        let bits = move_bits(lines[j / per], (LINES * (j % per)) as i32, 4);
        *v = _mm256_or_si256(*v, _mm256_and_si256(bits, mask));
    }
}

/// `v` shifted so that bit `from` of each byte lands at bit `to` (|to − from| < 8; 16-bit lanes, so
/// bits also cross into the neighbouring byte: the caller masks them off).
#[inline(always)]
unsafe fn move_bits(v: __m256i, from: i32, to: i32) -> __m256i {
    match to - from {
        0 => v,
        1 => _mm256_slli_epi16::<1>(v),
        2 => _mm256_slli_epi16::<2>(v),
        3 => _mm256_slli_epi16::<3>(v),
        4 => _mm256_slli_epi16::<4>(v),
        -1 => _mm256_srli_epi16::<1>(v),
        -2 => _mm256_srli_epi16::<2>(v),
        -3 => _mm256_srli_epi16::<3>(v),
        _ => unreachable!("bits move by at most 4 places"),
    }
}

/// Writes the sums of both halves (rows 8h..8h + 8, at most `nrows`) for each token t at
/// `out[t·ldo + row]`.
#[inline(always)]
unsafe fn store_halves<const R: usize>(accs: &[[__m256; R]; 2], out: *mut f32, ldo: usize, nrows: usize) {
    for (h, acc) in accs.iter().enumerate().take(nrows.div_ceil(8)) {
        let valid = (nrows - 8 * h).min(8);
        let mask = _mm256_cmpgt_epi32(_mm256_set1_epi32(valid as i32), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
        for (t, acc) in acc.iter().enumerate() {
            _mm256_maskstore_ps(out.add(t * ldo + 8 * h), mask, *acc);
        }
    }
}

/// 8 signed bytes at `p` as f32.
#[inline(always)]
unsafe fn ibytes8(p: *const u8) -> __m256 {
    _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(p as *const __m128i)))
}

/// 8 unsigned bytes at `p` as f32.
#[inline(always)]
unsafe fn bytes8(p: *const u8) -> __m256 {
    _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64(p as *const __m128i)))
}

/// `(d, m)` of block `b` for rows 8h..8h + 8 of a group whose scales (form `S`: [`D16`], [`DM16`]
/// or [`KSM`]) start at `sc`; `moff` as in [`WideForm`].
#[inline(always)]
unsafe fn half_scales<const S: u8>(sc: *const u8, b: usize, h: usize, moff: __m256) -> (__m256, __m256) {
    let (sup, rec) = scale_offsets(S, b);
    let (sup, rec) = (sc.add(sup + 16 * h), sc.add(rec));
    match S {
        D16 => {
            let d = f16x8(rec.add(16 * h));
            (d, _mm256_mul_ps(d, moff))
        }
        DM16 => (f16x8(rec.add(16 * h)), f16x8(rec.add(32 + 16 * h))),
        _ => (_mm256_mul_ps(f16x8(sup), bytes8(rec.add(8 * h))), _mm256_mul_ps(f16x8(sup.add(32)), bytes8(rec.add(16 + 8 * h)))),
    }
}

#[inline(always)]
#[allow(clippy::needless_range_loop, clippy::too_many_arguments)]
unsafe fn wide<const R: usize, const FIVE_BIT: bool, const S: u8>(
    scales: *const u8,
    qs: *const u8,
    a: *const BlockQ8,
    nb: usize,
    out: *mut f32,
    ldo: usize,
    nrows: usize,
    moff: f32,
) {
    let qb = if FIVE_BIT { 320 } else { 256 };
    let ones = _mm256_set1_epi16(1);
    let moff = _mm256_set1_ps(moff);
    // Rows 0..8 and 8..16 (the halves of each 64-byte line) of one block after the other, so the
    // weights stream from memory once (a pass per half re-read them from cache while memory idled).
    let halves = if nrows > 8 { 2 } else { 1 };
    let mut accs = [[_mm256_setzero_ps(); R]; 2];
    for b in 0..nb {
        prefetch_ahead(qs, b, qb, blocks_ahead(R));
        for (h, acc) in accs.iter_mut().enumerate().take(halves) {
            let q = qs.add(b * qb);
            let (d, m) = half_scales::<S>(scales, b, h, moff);
            let mut w = nibble_lines(q, h);
            if FIVE_BIT {
                or_high_bits::<1>(&mut w, q, h);
            }
            for (t, acc) in acc.iter_mut().enumerate() {
                let ab = &*a.add(t * nb + b);
                let x = ab.qs.as_ptr() as *const i32;
                let dot = |j: usize| _mm256_maddubs_epi16(w[j], _mm256_set1_epi32(x.add(j).read()));
                let isum = if FIVE_BIT {
                    let s0 = _mm256_add_epi16(_mm256_add_epi16(dot(0), dot(1)), _mm256_add_epi16(dot(2), dot(3)));
                    let s1 = _mm256_add_epi16(_mm256_add_epi16(dot(4), dot(5)), _mm256_add_epi16(dot(6), dot(7)));
                    _mm256_add_epi32(_mm256_madd_epi16(s0, ones), _mm256_madd_epi16(s1, ones))
                } else {
                    let s0 = _mm256_add_epi16(_mm256_add_epi16(dot(0), dot(1)), _mm256_add_epi16(dot(2), dot(3)));
                    let s1 = _mm256_add_epi16(_mm256_add_epi16(dot(4), dot(5)), _mm256_add_epi16(dot(6), dot(7)));
                    _mm256_madd_epi16(_mm256_add_epi16(s0, s1), ones)
                };
                *acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum), _mm256_mul_ps(d, _mm256_set1_ps(ab.d)), *acc);
                *acc = _mm256_fmadd_ps(m, _mm256_set1_ps(ab.s), *acc);
            }
        }
    }
    store_halves(&accs, out, ldo, nrows);
}

/// [`wide`] for the forms with a scale per 16 values ([`KHALF`]: Q6_K's 6-bit values as nibbles plus
/// two bit planes, Q3_K's 3-bit values as nibbles), the minimum `moff · d` of each half. 6-bit
/// values keep `vpmaddubsw`'s 16-bit sums in range two lines at a time (2 · 2 · 63 · 128 < 2¹⁵), so
/// each half of a block takes two `vpmaddwd`s.
#[inline(always)]
#[allow(clippy::needless_range_loop, clippy::too_many_arguments)]
unsafe fn wide_half<const R: usize, const SIX_BIT: bool>(
    scales: *const u8,
    qs: *const u8,
    a: *const BlockQ8,
    nb: usize,
    out: *mut f32,
    ldo: usize,
    nrows: usize,
    moff: f32,
) {
    let qb = if SIX_BIT { 384 } else { 256 };
    let ones = _mm256_set1_epi16(1);
    let moff = _mm256_set1_ps(moff);
    // Both halves of each block in turn, as in `wide`.
    let halves = if nrows > 8 { 2 } else { 1 };
    let mut accs = [[_mm256_setzero_ps(); R]; 2];
    for b in 0..nb {
        prefetch_ahead(qs, b, qb, blocks_ahead(R));
        for (h, acc) in accs.iter_mut().enumerate().take(halves) {
            let q = qs.add(b * qb);
            let (sup, rec) = scale_offsets(KHALF, b);
            let big = f16x8(scales.add(sup + 16 * h));
            // Values 0..16 and 16..32 of each row: s0 and s1 (signed) under the super-block factor.
            let d0 = _mm256_mul_ps(big, ibytes8(scales.add(rec + 8 * h)));
            let d1 = _mm256_mul_ps(big, ibytes8(scales.add(rec + 16 + 8 * h)));
            let (m0, m1) = (_mm256_mul_ps(d0, moff), _mm256_mul_ps(d1, moff));
            let mut w = nibble_lines(q, h);
            if SIX_BIT {
                or_high_bits::<2>(&mut w, q, h);
            }
            for (t, acc) in acc.iter_mut().enumerate() {
                let ab = &*a.add(t * nb + b);
                let x = ab.qs.as_ptr() as *const i32;
                let dot = |j: usize| _mm256_maddubs_epi16(w[j], _mm256_set1_epi32(x.add(j).read()));
                let pair = |j: usize| _mm256_madd_epi16(_mm256_add_epi16(dot(j), dot(j + 1)), ones);
                let i0 = _mm256_add_epi32(pair(0), pair(2));
                let i1 = _mm256_add_epi32(pair(4), pair(6));
                let da = _mm256_set1_ps(ab.d);
                *acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(i0), _mm256_mul_ps(d0, da), *acc);
                *acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(i1), _mm256_mul_ps(d1, da), *acc);
                *acc = _mm256_fmadd_ps(m0, _mm256_set1_ps(ab.s0), *acc);
                *acc = _mm256_fmadd_ps(m1, _mm256_set1_ps(ab.s - ab.s0), *acc);
            }
        }
    }
    store_halves(&accs, out, ldo, nrows);
}

/// [`wide`] for 8-bit values (Q8_0: unsigned bytes `q + 128`, minimum `moff · d`): a byte's products
/// with `vpmaddubsw` could overflow its 16-bit sums, so each byte is taken as its two nibbles, whose
/// sums over a block stay in 16 bits (8 lines × 2 × 15 × 128), and the high one counts 16 times.
/// The lines of the block four ahead are prefetched (a 512-byte block is 8 lines; without it
/// decoding read memory at a quarter of its bandwidth).
#[inline(always)]
#[allow(clippy::needless_range_loop, clippy::too_many_arguments)]
unsafe fn wide_bytes<const R: usize>(
    scales: *const u8,
    qs: *const u8,
    a: *const BlockQ8,
    nb: usize,
    out: *mut f32,
    ldo: usize,
    nrows: usize,
    moff: f32,
) {
    let ones = _mm256_set1_epi16(1);
    let low = _mm256_set1_epi8(0x0F);
    let moff = _mm256_set1_ps(moff);
    let halves = if nrows > 8 { 2 } else { 1 };
    let mut accs = [[_mm256_setzero_ps(); R]; 2];
    for b in 0..nb {
        let q = qs.add(b * 512);
        prefetch_ahead(qs, b, 512, 4);
        for (h, acc) in accs.iter_mut().enumerate().take(halves) {
            let (d, m) = half_scales::<D16>(scales, b, h, moff);
            // 16-bit sums of low and high nibbles' products, per token.
            let mut lo = [_mm256_setzero_si256(); R];
            let mut hi = [_mm256_setzero_si256(); R];
            for j in 0..8 {
                let p = _mm256_loadu_si256(q.add(64 * j + 32 * h) as *const __m256i);
                let wl = _mm256_and_si256(p, low);
                let wh = _mm256_and_si256(_mm256_srli_epi16(p, 4), low);
                for t in 0..R {
                    let x = _mm256_set1_epi32(((*a.add(t * nb + b)).qs.as_ptr() as *const i32).add(j).read());
                    lo[t] = _mm256_add_epi16(lo[t], _mm256_maddubs_epi16(wl, x));
                    hi[t] = _mm256_add_epi16(hi[t], _mm256_maddubs_epi16(wh, x));
                }
            }
            for (t, acc) in acc.iter_mut().enumerate() {
                let ab = &*a.add(t * nb + b);
                let isum = _mm256_add_epi32(_mm256_madd_epi16(lo[t], ones), _mm256_slli_epi32(_mm256_madd_epi16(hi[t], ones), 4));
                *acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum), _mm256_mul_ps(d, _mm256_set1_ps(ab.d)), *acc);
                *acc = _mm256_fmadd_ps(m, _mm256_set1_ps(ab.s), *acc);
            }
        }
    }
    store_halves(&accs, out, ldo, nrows);
}
