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

/// One group of 16 weight rows (`scales`, `qs`: its slice of the wide layout, in `form`) × `r`
/// (1..=TOKENS) tokens of quantized activations `a` (`[r, nb]` blocks): writes `out[t·ldo + n]`
/// for t < r, n < nrows.
///
/// # Safety
/// The CPU must have AVX-512 F, BW, VL and VNNI; `out` must be valid for those writes.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn tile(
    form: WideForm,
    scales: &[f32],
    qs: &[u8],
    a: &[BlockQ8],
    offsets: &[[i32; 2]],
    nb: usize,
    r: usize,
    out: *mut f32,
    ldo: usize,
    nrows: usize,
) {
    debug_assert!((1..=TOKENS).contains(&r) && a.len() >= r * nb && nrows <= NW);
    debug_assert!(scales.len() * 4 == form.scale_bytes(nb) && qs.len() == nb * form.value_bytes());
    // The kernel reads r·nb starting points unchecked: a short slice must never reach it.
    assert!(offsets.len() >= r * nb || offset_shift(form.values, form.scales) == 0);
    let mask: __mmask16 = if nrows == NW { 0xFFFF } else { (1u16 << nrows) - 1 };
    let (s, q, a, moff) = (scales.as_ptr() as *const u8, qs.as_ptr(), a.as_ptr(), form.moff);
    let o = offsets.as_ptr();
    macro_rules! by_tokens {
        ($l:expr, $s:expr) => {
            match r {
                1 => kernel::<1, { $l }, { $s }>(s, q, a, o, nb, out, ldo, mask, moff),
                2 => kernel::<2, { $l }, { $s }>(s, q, a, o, nb, out, ldo, mask, moff),
                3 => kernel::<3, { $l }, { $s }>(s, q, a, o, nb, out, ldo, mask, moff),
                4 => kernel::<4, { $l }, { $s }>(s, q, a, o, nb, out, ldo, mask, moff),
                5 => kernel::<5, { $l }, { $s }>(s, q, a, o, nb, out, ldo, mask, moff),
                6 => kernel::<6, { $l }, { $s }>(s, q, a, o, nb, out, ldo, mask, moff),
                7 => kernel::<7, { $l }, { $s }>(s, q, a, o, nb, out, ldo, mask, moff),
                8 => kernel::<8, { $l }, { $s }>(s, q, a, o, nb, out, ldo, mask, moff),
                9 => kernel::<9, { $l }, { $s }>(s, q, a, o, nb, out, ldo, mask, moff),
                _ => kernel::<10, { $l }, { $s }>(s, q, a, o, nb, out, ldo, mask, moff),
            }
        };
    }
    match (form.values, form.scales) {
        // The compact forms (AVX-512's own).
        (NIBBLES, D16) => by_tokens!(NIBBLES, D16),
        (NIBBLES, DM16) => by_tokens!(NIBBLES, DM16),
        (FIVE, D16) => by_tokens!(FIVE, D16),
        (FIVE, DM16) => by_tokens!(FIVE, DM16),
        (BYTES, D16) => by_tokens!(BYTES, D16),
        (NIBBLES, KSM) => by_tokens!(NIBBLES, KSM),
        (FIVE, KSM) => by_tokens!(FIVE, KSM),
        (NIBBLES, KHALFM) => by_tokens!(NIBBLES, KHALFM),
        (NIBBLES, KHALF) => by_tokens!(NIBBLES, KHALF),
        (SIX, KHALF) => by_tokens!(SIX, KHALF),
        _ => unreachable!("no format has the wide form {form:?}"),
    }
}

/// 16 f16 numbers at `p` as f32.
#[inline(always)]
unsafe fn f16x16(p: *const u8) -> __m512 {
    _mm512_cvtph_ps(_mm256_loadu_si256(p as *const __m256i))
}

/// 16 bytes at `p` (unsigned, or signed with `SIGNED`) as f32.
#[inline(always)]
unsafe fn bytes16<const SIGNED: bool>(p: *const u8) -> __m512 {
    let v = _mm_loadu_si128(p as *const __m128i);
    _mm512_cvtepi32_ps(if SIGNED { _mm512_cvtepi8_epi32(v) } else { _mm512_cvtepu8_epi32(v) })
}

/// `[d0, d1, m0, m1]` of block `b` for the 16 rows of a group whose scales (form `S`, see
/// [`WideForm`]) start at `sc`: value k of a row = d_h·q_k + m_h, h = k / 16 (d1 = d0 and m1 = m0
/// for the forms with one scale per block). `moff`: the form's minimum factor, broadcast.
#[inline(always)]
pub(super) unsafe fn block_scales<const S: u8>(sc: *const u8, b: usize, moff: __m512) -> [__m512; 4] {
    let (sup, rec) = scale_offsets(S, b);
    let (sup, rec) = (sc.add(sup), sc.add(rec));
    match S {
        D16 => {
            let d = f16x16(rec);
            let m = _mm512_mul_ps(d, moff);
            [d, d, m, m]
        }
        DM16 => {
            let (d, m) = (f16x16(rec), f16x16(rec.add(32)));
            [d, d, m, m]
        }
        KSM => {
            let d = _mm512_mul_ps(f16x16(sup), bytes16::<false>(rec));
            let m = _mm512_mul_ps(f16x16(sup.add(32)), bytes16::<false>(rec.add(16)));
            [d, d, m, m]
        }
        KHALF => {
            let big = f16x16(sup);
            let (d0, d1) = (_mm512_mul_ps(big, bytes16::<true>(rec)), _mm512_mul_ps(big, bytes16::<true>(rec.add(16))));
            [d0, d1, _mm512_mul_ps(d0, moff), _mm512_mul_ps(d1, moff)]
        }
        _ => {
            let (d, m) = (f16x16(sup), f16x16(sup.add(32)));
            [
                _mm512_mul_ps(d, bytes16::<false>(rec)),
                _mm512_mul_ps(d, bytes16::<false>(rec.add(16))),
                _mm512_mul_ps(m, bytes16::<false>(rec.add(32))),
                _mm512_mul_ps(m, bytes16::<false>(rec.add(48))),
            ]
        }
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
    // The high bits (see `pack::high_bits`): for register j, a 16-bit shift brings its bits of each
    // byte to bits 4 (and 5), and one ternary-logic step ORs them in under the mask. (Masked adds
    // from a 64-bit plane word per register took twice the instructions, the mask loads among them:
    // a 9-token Q6_K tile ran 15-28% slower.)
    if L == FIVE {
        let (line, bit) = (_mm512_loadu_si512(q.add(256) as *const _), _mm512_set1_epi8(0x10));
        for (j, v) in w.iter_mut().enumerate() {
            *v = or_masked(*v, move_bits(line, j as i32, 4), bit);
        }
    }
    if L == SIX {
        let bits = _mm512_set1_epi8(0x30);
        let lines = [_mm512_loadu_si512(q.add(256) as *const _), _mm512_loadu_si512(q.add(320) as *const _)];
        for (j, v) in w.iter_mut().enumerate() {
            *v = or_masked(*v, move_bits(lines[j / 4], 2 * (j % 4) as i32, 4), bits);
        }
    }
    w
}

/// `a | (b & mask)`, one instruction.
#[inline(always)]
unsafe fn or_masked(a: __m512i, b: __m512i, mask: __m512i) -> __m512i {
    // Truth table over (a, b, mask) = (0xF0, 0xCC, 0xAA): 0xF0 | (0xCC & 0xAA).
    _mm512_ternarylogic_epi32::<0xF8>(a, b, mask)
}

/// `v` shifted so that bit `from` of each byte lands at bit `to` (|to − from| < 8; 16-bit lanes, so
/// bits also cross into the neighbouring byte: the caller masks them off).
#[inline(always)]
unsafe fn move_bits(v: __m512i, from: i32, to: i32) -> __m512i {
    match to - from {
        0 => v,
        1 => _mm512_slli_epi16::<1>(v),
        2 => _mm512_slli_epi16::<2>(v),
        3 => _mm512_slli_epi16::<3>(v),
        4 => _mm512_slli_epi16::<4>(v),
        -1 => _mm512_srli_epi16::<1>(v),
        -2 => _mm512_srli_epi16::<2>(v),
        -3 => _mm512_srli_epi16::<3>(v),
        _ => unreachable!("bits move by at most 4 places"),
    }
}

/// `body` once for each token `t` < `r` (at most [`TOKENS`]), `t` a constant in each copy: the
/// copies are written out rather than left to a loop the compiler may keep.
macro_rules! each_token {
    ($r:expr, $t:ident => $body:block) => {
        each_token!(@ $r, $t, $body, 0 1 2 3 4 5 6 7 8 9)
    };
    (@ $r:expr, $t:ident, $body:block, $($n:literal)*) => {
        $({
            const $t: usize = $n;
            if $t < $r $body
        })*
    };
}

/// k where the minimum of values in form `L` with scales in form `S` is −2^k times the scale
/// (`WideForm::moff`: Q4_0, Q5_0, Q8_0, Q3_K, Q6_K), else 0.
pub(super) const fn offset_shift(l: u8, s: u8) -> u32 {
    match (l, s) {
        (NIBBLES, D16) => 3,
        (FIVE, D16) => 4,
        (BYTES, D16) => 7,
        (NIBBLES, KHALF) => 2,
        (SIX, KHALF) => 5,
        _ => 0,
    }
}

/// The integer sums' starting points for a weight whose values are offset by −2^`k`
/// ([`offset_shift`], k > 0): `−2^k·Σ x` of each half of each activation block, into `out`
/// (one entry per block of `a`), read by [`tile`] with one broadcast load each (shifting and
/// broadcasting them in the kernel took 5-7% of a 9-token Q6_K tile's time).
pub(super) fn offsets(a: &[BlockQ8], k: u32, out: &mut Vec<[i32; 2]>) {
    out.extend(a.iter().map(|b| b.neg_sums.map(|n| n << k)));
}

/// `R` tokens × 16 rows, values in form `L`, scales in form `S`.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn kernel<const R: usize, const L: u8, const S: u8>(
    scales: *const u8,
    qs: *const u8,
    a: *const BlockQ8,
    offsets: *const [i32; 2],
    nb: usize,
    out: *mut f32,
    ldo: usize,
    mask: __mmask16,
    moff: f32,
) {
    let qb = match L {
        BYTES => 512,
        FIVE => 320,
        SIX => 384,
        _ => 256,
    };
    let half = matches!(S, KHALF | KHALFM);
    // Forms whose minimum is the scale times −2^k: the offset goes into the integer sums instead
    // (Σ (q − 2^k)·x = Σ q·x − 2^k·Σ x, started from `offsets`), a broadcast load rather than a
    // multiply-add per token and block (the unit the products use).
    let k = offset_shift(L, S);
    debug_assert!(k == 0 || moff == -((1u32 << k) as f32));
    let moff = _mm512_set1_ps(moff);
    // [TOKENS] accumulators (the first R used), each indexed by a constant below so that they stay
    // in registers: a loop over the tokens kept them on the stack (a load and a store per token and
    // block).
    let mut acc = [_mm512_setzero_ps(); TOKENS];
    for b in 0..nb {
        // The hardware prefetcher alone left the loads stalling: a 1B-shaped Q4_K matrix from
        // memory took 15.6 cycles per 16 rows × 32 values × token at 9 tokens, 11.8 with this, and
        // decoding read 10-25% faster.
        prefetch_ahead(qs, b, qb, blocks_ahead(R));
        let w = load_block::<L>(qs.add(b * qb));
        let [d0, d1, m0, m1] = block_scales::<S>(scales, b, moff);
        each_token!(R, T => {
            let ab = &*a.add(T * nb + b);
            let x = ab.qs.as_ptr() as *const i32;
            // Two independent chains (values 0..16 and 16..32) keep the dot-product unit busy.
            let (mut i0, mut i1) = if k > 0 {
                let n = offsets.add(T * nb + b) as *const i32;
                (_mm512_set1_epi32(n.read()), _mm512_set1_epi32(n.add(1).read()))
            } else {
                (_mm512_setzero_si512(), _mm512_setzero_si512())
            };
            for j in 0..4 {
                i0 = _mm512_dpbusd_epi32(i0, w[j], _mm512_set1_epi32(x.add(j).read()));
                i1 = _mm512_dpbusd_epi32(i1, w[j + 4], _mm512_set1_epi32(x.add(j + 4).read()));
            }
            let da = _mm512_set1_ps(ab.d);
            let acc = &mut acc[T];
            if half && k > 0 {
                // d_h·(Σ q·x − 2^k·Σ x) per half, then the activation scale once.
                let u = _mm512_mul_ps(_mm512_cvtepi32_ps(i0), d0);
                let u = _mm512_fmadd_ps(_mm512_cvtepi32_ps(i1), d1, u);
                *acc = _mm512_fmadd_ps(u, da, *acc);
            } else if half {
                *acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(i0), _mm512_mul_ps(d0, da), *acc);
                *acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(i1), _mm512_mul_ps(d1, da), *acc);
                *acc = _mm512_fmadd_ps(m0, _mm512_set1_ps(ab.s0), *acc);
                *acc = _mm512_fmadd_ps(m1, _mm512_set1_ps(ab.s - ab.s0), *acc);
            } else {
                let i = _mm512_add_epi32(i0, i1);
                *acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(i), _mm512_mul_ps(d0, da), *acc);
                if k == 0 {
                    *acc = _mm512_fmadd_ps(m0, _mm512_set1_ps(ab.s), *acc);
                }
            }
        });
    }
    for (t, acc) in acc.iter().enumerate().take(R) {
        _mm512_mask_storeu_ps(out.add(t * ldo), mask, *acc);
    }
}
