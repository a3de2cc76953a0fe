//! AMX-INT8 kernels over the wide layout: for each 32-value block, one tile product multiplies 16
//! tokens' activation bytes (tile A, signed) by 16 weight rows' values (tile B, unsigned, already
//! in the VNNI order the wide layout keeps) into 16×16 int32 sums, which AVX-512 then scales into
//! f32 accumulators. The tile instructions are written as inline assembly (Rust has no stable AMX
//! intrinsics); Linux hands out the tile state only on request (`arch_prctl`, asked by
//! `isa::amx_available`).

use std::arch::asm;
use std::arch::x86_64::*;
use std::ops::Range;

use super::avx512::{block_scales, load_block};
use super::*;

/// Tokens per tile product.
pub(super) const TOKENS: usize = 16;

/// The fewest tokens past the last whole tile that AMX takes as a tile of its own (fewer go to
/// the AVX-512 tiles). A tile costs AMX nearly the same whatever its rows: on the Xeon (Sapphire
/// Rapids, 2 threads, an 8192 × 2048 Q4_K matrix) 1 token took 0.33-0.35 ms on AMX and 0.18 on
/// AVX-512, 9 tokens 0.51-0.54 vs 0.42-0.44, 12 0.60 vs 0.59-0.66, 15 0.68-0.69 vs 0.70-0.78.
pub(super) const MIN_REST: usize = 13;

/// How many of `m` tokens the tiles take for a weight in `form`: the whole tiles, and the rest if
/// it is big enough; none for Q2_K/Q3_K/Q6_K (a scale per 16 values), which stay on the AVX-512
/// tiles: AMX needs two half-depth tile products and twice the scaling per block for them, and a
/// Q6_K prompt ran 22% slower than on AVX-512 (1B shape, pp512 193-196 vs 249-252 t/s).
pub(super) fn tokens_for(form: WideForm, m: usize) -> usize {
    let full = m / TOKENS * TOKENS;
    if !takes(form) {
        0
    } else if m - full >= MIN_REST {
        m
    } else {
        full
    }
}

/// Whether the tiles take weights in `form` (one scale per block).
fn takes(form: WideForm) -> bool {
    matches!(form.scales, D16 | DM16 | KSM)
}

/// The 64-byte tile configuration (palette 1): two blocks per step, A and B of the even block in
/// tmm2/tmm4 (16 tokens × 32 bytes, 8 × 64 bytes), of the odd one in tmm3/tmm5; their 16×16 int32
/// sums alternate between tmm0/tmm1 and tmm6/tmm7 from step to step.
#[repr(C, align(64))]
struct TileConfig([u8; 64]);

impl TileConfig {
    /// For tiles of `r` (1..=16) tokens: A and the sums have `r` rows.
    fn new(r: usize) -> Self {
        debug_assert!((1..=TOKENS).contains(&r));
        let r = r as u8;
        let mut c = [0u8; 64];
        c[0] = 1;
        let mut set = |t: usize, rows: u8, colsb: u16| {
            c[16 + 2 * t..18 + 2 * t].copy_from_slice(&colsb.to_le_bytes());
            c[48 + t] = rows;
        };
        for t in [0, 1, 6, 7] {
            set(t, r, 64);
        }
        set(2, r, 32);
        set(3, r, 32);
        set(4, 8, 64);
        set(5, 8, 64);
        Self(c)
    }
}

/// One 64-byte line (a tile row).
#[derive(Clone, Copy)]
#[repr(C, align(64))]
struct Line([u8; 64]);

#[repr(C, align(64))]
struct Scratch {
    /// The int32 sums of one or two tile products (stored and scaled right after the next pair of
    /// products is issued; a second buffer to scale them a step later measured 5-9% slower).
    c: [i32; 512],
}

/// Tokens `0..m` (tiles of 16, then one of the rest) of `acts` (`[m, nb]` blocks) × the row
/// groups `groups` (`group(g)` gives a group's scales, values and valid rows, in `form`) into
/// `out` (`[m, ldo]`, the group's rows at g·16).
///
/// # Safety
/// [`amx_available`](crate::cpu::isa::amx_available) must be true and the CPU must have AVX-512 F/BW/VL/VNNI; `out` must be valid for
/// those writes.
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn run<'w>(
    form: WideForm,
    acts: &[BlockQ8],
    nb: usize,
    m: usize,
    groups: Range<usize>,
    group: &dyn Fn(usize) -> (&'w [f32], &'w [u8], usize),
    out: *mut f32,
    ldo: usize,
) {
    // SAFETY: the caller's guarantees, passed on.
    crate::cpu::scratch::with(&SPREAD, |bytes| unsafe { run_in(form, acts, nb, m, groups, group, out, ldo, bytes) })
}

thread_local! {
    /// The weights spread into bytes (reused from call to call).
    static SPREAD: std::cell::RefCell<Vec<Line>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Block `b`'s values (form `values`, `qb` bytes per block, at `qs`) as the 8 lines of a B tile at
/// `dst` (unsigned bytes).
#[inline(always)]
unsafe fn spread_block(values: u8, qs: *const u8, qb: usize, b: usize, dst: *mut u8) {
    let q = qs.add(b * qb);
    let w = match values {
        FIVE => load_block::<FIVE>(q),
        SIX => load_block::<SIX>(q),
        _ => load_block::<NIBBLES>(q),
    };
    for (j, v) in w.iter().enumerate() {
        _mm512_store_si512(dst.add(64 * j) as *mut _, *v);
    }
}

/// [`run`] with this thread's buffer for the spread weights.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
#[allow(clippy::too_many_arguments)]
unsafe fn run_in<'w>(
    form: WideForm,
    acts: &[BlockQ8],
    nb: usize,
    m: usize,
    groups: Range<usize>,
    group: &dyn Fn(usize) -> (&'w [f32], &'w [u8], usize),
    out: *mut f32,
    ldo: usize,
    bytes: &mut Vec<Line>,
) {
    debug_assert!(acts.len() >= m * nb);
    assert!(takes(form), "AMX takes formats with one scale per block, not {form:?}");
    let mut scratch = Scratch { c: [0; 512] };
    let qb = form.value_bytes();
    let moff = _mm512_set1_ps(form.moff);
    // 4-, 5- and 6-bit values are spread into bytes one group at a time, by the first of up to
    // `CHUNK_TILES` token tiles, `LEAD` blocks ahead of its own B-tile loads: a tile load right
    // after the stores of its bytes stalled on them (16 tokens ran at a third of the decode
    // speed), spreading a whole group first left memory idle while it did, and spreading all of a
    // task's groups once per call wrote and read back 4x the weights' bytes (32 tokens took 3x as
    // long as 16). The later tiles of the chunk read the group's bytes from the core's caches.
    let spread = form.values != BYTES;
    if spread {
        bytes.resize(nb * 8, Line([0; 64]));
    }
    let buf = bytes.as_mut_ptr() as *mut u8;
    let values = |qs: &[u8], first: bool| {
        if !spread {
            Values { qs: qs.as_ptr(), qb, src: None }
        } else if first {
            Values { qs: buf, qb: 512, src: Some((form.values, qs.as_ptr(), qb, nb)) }
        } else {
            Values { qs: buf, qb: 512, src: None }
        }
    };
    // Whole tiles of 16 tokens, then the rest as one tile of fewer rows.
    let full = m / TOKENS * TOKENS;
    for (start, end, rows) in [(0, full, TOKENS), (full, m, m - full)] {
        if start == end {
            continue;
        }
        let cfg = TileConfig::new(rows);
        asm!("ldtilecfg [{}]", in(reg) cfg.0.as_ptr(), options(nostack, readonly));
        for tb in (start..end).step_by(CHUNK_TILES * TOKENS) {
            let te = end.min(tb + CHUNK_TILES * TOKENS);
            for g in groups.clone() {
                let (sc, qs, nrows) = group(g);
                let mask: __mmask16 = if nrows == NW { 0xFFFF } else { (1u16 << nrows) - 1 };
                let s = sc.as_ptr() as *const u8;
                for t0 in (tb..te).step_by(TOKENS) {
                    let v = values(qs, t0 == tb);
                    let (a, o) = (acts.as_ptr().add(t0 * nb), out.add(t0 * ldo + g * NW));
                    macro_rules! by_scales {
                        ($r:expr) => {
                            match form.scales {
                                D16 => tile::<D16>(s, v, a, nb, $r, o, ldo, mask, moff, &mut scratch),
                                DM16 => tile::<DM16>(s, v, a, nb, $r, o, ldo, mask, moff, &mut scratch),
                                _ => tile::<KSM>(s, v, a, nb, $r, o, ldo, mask, moff, &mut scratch),
                            }
                        };
                    }
                    // Whole tiles with the row count a constant, so that the scaling loops unroll
                    // (a count known only at run time made 16-128 tokens 8-15% slower).
                    if rows == TOKENS {
                        by_scales!(TOKENS)
                    } else {
                        by_scales!(rows)
                    }
                }
            }
        }
    }
    asm!("tilerelease", options(nostack, nomem));
}

/// Token tiles that share one spreading of a group's values.
const CHUNK_TILES: usize = 4;

/// Blocks between spreading a block's values and loading them as a B tile.
const LEAD: usize = 2;

/// A group's values as bytes in B-tile order (`qb` bytes per block at `qs`), and where the tile
/// spreads them from first, `LEAD` blocks ahead (value form, packed values, bytes per block,
/// blocks), if it does.
#[derive(Clone, Copy)]
struct Values {
    qs: *const u8,
    qb: usize,
    src: Option<(u8, *const u8, usize, usize)>,
}

/// B tile of block `b` of `v`, called for b = 0, 1, … in turn: spreads block b + LEAD (and
/// at b = 0 the first LEAD) where `v` says so, else prefetches the bytes it reads.
/// (This and [`scale_block`] are functions inlined by force, not closures: a closure the compiler
/// kept out of line ran without the caller's target features, every intrinsic a call: prompts
/// 12x slower.)
#[inline(always)]
unsafe fn b_tile(v: Values, b: usize) -> *const u8 {
    if let Some((form, src, qb, nb)) = v.src {
        let dst = v.qs as *mut u8;
        if b == 0 {
            for k in 0..LEAD.min(nb) {
                spread_block(form, src, qb, k, dst.add(512 * k));
            }
        }
        if b + LEAD < nb {
            prefetch_ahead(src, b + LEAD, qb, blocks_ahead(TOKENS));
            spread_block(form, src, qb, b + LEAD, dst.add(512 * (b + LEAD)));
        }
    } else {
        prefetch_ahead(v.qs, b, v.qb, blocks_ahead(TOKENS));
    }
    v.qs.add(b * v.qb)
}

/// Scales the int32 sums at `c` of block `b` (`r` tokens × 16 rows) into the first `r`
/// accumulators: scales in form `S` at `scales`, decoded once for all the tokens of `a`; the
/// minimum (or the unsigned values' offset) enters as m·d_a·Σx.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn scale_block<const S: u8>(
    acc: &mut [__m512; TOKENS],
    r: usize,
    c: *const i32,
    scales: *const u8,
    a: *const BlockQ8,
    nb: usize,
    b: usize,
    moff: __m512,
) {
    let [d, _, m, _] = block_scales::<S>(scales, b, moff);
    for (i, acc) in acc.iter_mut().enumerate().take(r) {
        let ab = &*a.add(i * nb + b);
        let s = _mm512_cvtepi32_ps(_mm512_load_si512(c.add(16 * i) as *const _));
        *acc = _mm512_fmadd_ps(s, _mm512_mul_ps(d, _mm512_set1_ps(ab.d)), *acc);
        *acc = _mm512_fmadd_ps(m, _mm512_set1_ps(ab.s), *acc);
    }
}

/// `r` (≤ 16, the rows the tile configuration gives A and the sums) tokens × one group of 16
/// rows, over all `nb` blocks; scales in form `S` (decoded once per block for all the tokens,
/// so the compact forms cost AMX little).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn tile<const S: u8>(
    scales: *const u8,
    v: Values,
    a: *const BlockQ8,
    nb: usize,
    r: usize,
    out: *mut f32,
    ldo: usize,
    mask: __mmask16,
    moff: __m512,
    scratch: &mut Scratch,
) {
    let astride = nb * std::mem::size_of::<BlockQ8>();
    let c = scratch.c.as_mut_ptr();
    let mut acc = [_mm512_setzero_ps(); TOKENS];
    let mut b = 0;
    // Two blocks per step, software-pipelined: the products of step p go to one pair of sum
    // tiles while the sums of step p − 1 (long finished) are stored from the other pair and
    // scaled, so the tile unit works while the vector unit scales.
    macro_rules! issue {
        ($p:expr, $c0:literal, $c1:literal) => {{
            let b = 2 * $p;
            let (bp0, bp1) = (b_tile(v, b), b_tile(v, b + 1));
            let ap = (*a.add(b)).qs.as_ptr();
            asm!(
                "tileloadd tmm2, [{a} + {sa}*1]",
                "tileloadd tmm4, [{b0} + {s64}*1]",
                "tileloadd tmm3, [{a1} + {sa}*1]",
                "tileloadd tmm5, [{b1} + {s64}*1]",
                concat!("tilezero ", $c0),
                concat!("tilezero ", $c1),
                concat!("tdpbsud ", $c0, ", tmm2, tmm4"),
                concat!("tdpbsud ", $c1, ", tmm3, tmm5"),
                a = in(reg) ap,
                a1 = in(reg) ap.add(std::mem::size_of::<BlockQ8>()),
                sa = in(reg) astride,
                b0 = in(reg) bp0,
                b1 = in(reg) bp1,
                s64 = in(reg) 64usize,
                options(nostack),
            );
        }};
    }
    macro_rules! finish {
        ($p:expr, $c0:literal, $c1:literal) => {{
            asm!(
                concat!("tilestored [{c} + {s64}*1], ", $c0),
                concat!("tilestored [{c1} + {s64}*1], ", $c1),
                c = in(reg) c,
                c1 = in(reg) c.add(256),
                s64 = in(reg) 64usize,
                options(nostack),
            );
            scale_block::<S>(&mut acc, r, c, scales, a, nb, 2 * $p, moff);
            scale_block::<S>(&mut acc, r, c.add(256), scales, a, nb, 2 * $p + 1, moff);
        }};
    }
    let pairs = nb / 2;
    if pairs > 0 {
        issue!(0, "tmm0", "tmm1");
        for p in 1..pairs {
            if p % 2 == 1 {
                issue!(p, "tmm6", "tmm7");
                finish!(p - 1, "tmm0", "tmm1");
            } else {
                issue!(p, "tmm0", "tmm1");
                finish!(p - 1, "tmm6", "tmm7");
            }
        }
        if (pairs - 1).is_multiple_of(2) {
            finish!(pairs - 1, "tmm0", "tmm1");
        } else {
            finish!(pairs - 1, "tmm6", "tmm7");
        }
        b = 2 * pairs;
    }
    if b < nb {
        let bp = b_tile(v, b);
        let ap = (*a.add(b)).qs.as_ptr();
        asm!(
            "tileloadd tmm2, [{a} + {sa}*1]",
            "tileloadd tmm4, [{b} + {s64}*1]",
            "tilezero tmm0",
            "tdpbsud tmm0, tmm2, tmm4",
            "tilestored [{c} + {s64}*1], tmm0",
            a = in(reg) ap,
            sa = in(reg) astride,
            b = in(reg) bp,
            s64 = in(reg) 64usize,
            c = in(reg) c,
            options(nostack),
        );
        scale_block::<S>(&mut acc, r, c, scales, a, nb, b, moff);
    }
    for (i, acc) in acc.iter().enumerate().take(r) {
        _mm512_mask_storeu_ps(out.add(i * ldo), mask, *acc);
    }
}
