//! Matrix multiplication with 16-bit float weights (GGUF F16 or BF16) on the CPU: `y = x Wᵀ`, the
//! weights kept in 16 bits (half the memory traffic of f32) and widened in registers. Row chunks are
//! split over the kernels' thread pool; a register tile of three weight rows × four tokens loads and converts
//! each weight vector once per four tokens and each activation vector once per three rows.
//! AVX2+FMA+F16C at run time, scalar otherwise. On AVX-512 CPUs the weights are kept in the wide
//! layout instead (groups of 16 rows, column-major inside a group: one 256-bit load is one column
//! of 16 rows), so one broadcast activation times one widened column feeds 16 rows' sums at once.

use half::{bf16, f16};

#[cfg(target_arch = "x86_64")]
use crate::cpu::half_amx;
#[cfg(target_arch = "x86_64")]
use crate::cpu::isa::amx_bf16_available;
use crate::cpu::isa::{Isa, Layout};
#[cfg(target_arch = "x86_64")]
use crate::cpu::scratch;
use crate::cpu::{OutPtr, NW};

#[cfg(target_arch = "x86_64")]
thread_local! {
    /// AMX-BF16 prompts: the activations split into high and low bf16 halves (the caller's), and
    /// a task's weight tiles (each worker's); reused from call to call.
    static SPLIT_HI: std::cell::RefCell<Vec<u16>> = const { std::cell::RefCell::new(Vec::new()) };
    static SPLIT_LO: std::cell::RefCell<Vec<u16>> = const { std::cell::RefCell::new(Vec::new()) };
    static TILES: std::cell::RefCell<Vec<u32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Shares the split activations between the tasks that fill them (each writes its own rows).
#[derive(Clone, Copy)]
#[cfg(target_arch = "x86_64")]
struct HalfPtr(*mut u16);
// SAFETY: tasks write disjoint rows and the caller waits for all of them.
#[cfg(target_arch = "x86_64")]
unsafe impl Send for HalfPtr {}
#[cfg(target_arch = "x86_64")]
unsafe impl Sync for HalfPtr {}

#[cfg(target_arch = "x86_64")]
impl HalfPtr {
    /// # Safety
    /// Row `t` (of `cols`) must be in bounds and written by one task only.
    #[allow(clippy::mut_from_ref)]
    unsafe fn row(&self, t: usize, cols: usize) -> &mut [u16] {
        std::slice::from_raw_parts_mut(self.0.add(t * cols), cols)
    }
}

/// The 16-bit float format of the weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HalfKind {
    F16,
    Bf16,
}

/// A weight matrix `[rows, cols]` of 16-bit floats, row-major.
#[derive(Clone)]
pub struct HalfWeight {
    kind: HalfKind,
    rows: usize,
    cols: usize,
    /// The instruction set it was laid out for (and that [`matmul`](Self::matmul) uses).
    isa: Isa,
    layout: Layout,
    /// Narrow: row-major `[rows, cols]`. Wide: `[rows / 16 (rounded up), cols, 16]`, padded rows zero.
    bits: Vec<u16>,
}

impl std::fmt::Debug for HalfWeight {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HalfWeight").field("kind", &self.kind).field("rows", &self.rows).field("cols", &self.cols).finish()
    }
}

/// Weight rows per register tile.
const RR: usize = 3;
/// Tokens per register tile (3 × 4 accumulators plus three weight vectors and one activation
/// vector fill the 16 AVX2 registers).
const TR: usize = 4;
/// Tokens whose activations are kept hot while a task's rows pass over them.
const TOKEN_BLOCK: usize = 16;

impl HalfWeight {
    /// Wraps little-endian 16-bit floats `[rows, cols]` for the best instruction set; checks the size.
    pub fn new(kind: HalfKind, rows: usize, cols: usize, bytes: &[u8]) -> Result<Self, String> {
        Self::new_for(Isa::detect(), kind, rows, cols, bytes)
    }

    /// The same in the layout of a chosen instruction set (which [`matmul`](Self::matmul) uses).
    pub fn new_for(isa: Isa, kind: HalfKind, rows: usize, cols: usize, bytes: &[u8]) -> Result<Self, String> {
        if bytes.len() != rows * cols * 2 {
            return Err(format!("{kind:?} weight [{rows}, {cols}] needs {} bytes, got {}", rows * cols * 2, bytes.len()));
        }
        let at = |i: usize| u16::from_le_bytes([bytes[2 * i], bytes[2 * i + 1]]);
        let layout = isa.hlayout();
        let bits = match layout {
            Layout::Narrow => (0..rows * cols).map(at).collect(),
            Layout::Wide => {
                let mut bits = vec![0u16; rows.div_ceil(NW) * NW * cols];
                for r in 0..rows {
                    let (g, n) = (r / NW, r % NW);
                    for k in 0..cols {
                        bits[(g * cols + k) * NW + n] = at(r * cols + k);
                    }
                }
                bits
            }
        };
        Ok(Self { kind, rows, cols, isa, layout, bits })
    }

    pub fn rows(&self) -> usize {
        self.rows
    }
    pub fn cols(&self) -> usize {
        self.cols
    }
    /// The instruction set it was laid out for.
    pub fn isa(&self) -> Isa {
        self.isa
    }

    /// `out[m, rows] = x[m, cols] · Wᵀ` with the instruction set the weight was laid out for.
    pub fn matmul(&self, x: &[f32], m: usize, out: &mut [f32]) {
        self.matmul_with(self.isa, x, m, out)
    }

    /// The same with a chosen instruction set (which the CPU must support).
    pub fn matmul_with(&self, isa: Isa, x: &[f32], m: usize, out: &mut [f32]) {
        assert_eq!(x.len(), m * self.cols, "x must be [m, cols]");
        assert_eq!(out.len(), m * self.rows, "out must be [m, rows]");
        assert_eq!(self.layout, isa.hlayout(), "{:?} weight packed for another instruction set than {isa:?}", self.kind);
        let (rows, cols) = (self.rows, self.cols);
        let pool = crate::cpu::pool::Pool::global();
        #[cfg(target_arch = "x86_64")]
        if self.layout == Layout::Wide {
            let groups = rows.div_ceil(NW);
            let chunk = (groups / (pool.threads() * 4)).clamp(1, 64);
            let dst = OutPtr(out.as_mut_ptr());
            // The register-tile kernel of this instruction set and its most tokens per tile.
            type Tile = unsafe fn(HalfKind, &[u16], &[f32], usize, usize, *mut f32, usize, usize);
            let (tokens, tile): (usize, Tile) =
                if isa == Isa::Avx2 { (avx2::WIDE_TOKENS, avx2::wide_tile) } else { (avx512::TOKENS, avx512::tile) };
            // Prompts on AMX-BF16: every 16 tokens through tile products, the rest below.
            let amx_tokens = if isa == Isa::Amx && m >= 2 * half_amx::TOKENS && cols.is_multiple_of(half_amx::KB) && amx_bf16_available() {
                m / half_amx::TOKENS * half_amx::TOKENS
            } else {
                0
            };
            // The split activations and each task's weight tiles live in reused per-thread buffers.
            scratch::with(&SPLIT_HI, |xh| {
                scratch::with(&SPLIT_LO, |xl| {
                    xh.resize(amx_tokens * cols, 0);
                    xl.resize(amx_tokens * cols, 0);
                    let (xh, xl) = (&mut xh[..], &mut xl[..]);
                    if amx_tokens > 0 {
                        let (hp, lp) = (HalfPtr(xh.as_mut_ptr()), HalfPtr(xl.as_mut_ptr()));
                        pool.run(amx_tokens, &|t| {
                            // SAFETY: AMX-BF16 implies AVX-512 F/BW here; token t's rows are in bounds and
                            // written by this task only; cols is a multiple of 32.
                            unsafe {
                                let (h, l) = (hp.row(t, cols), lp.row(t, cols));
                                half_amx::split_activations(&x[t * cols..(t + 1) * cols], h, l);
                            }
                        });
                    }
                    pool.run(groups.div_ceil(chunk), &|c| {
                        let (g0, g1) = (c * chunk, ((c + 1) * chunk).min(groups));
                        if amx_tokens > 0 {
                            let per = cols / half_amx::KB * 512;
                            scratch::with(&TILES, |tiles| {
                                tiles.resize((g1 - g0) * per, 0);
                                for (i, t) in tiles.chunks_exact_mut(per).enumerate() {
                                    let g = g0 + i;
                                    // SAFETY: as above; the group's weights are [cols, 16].
                                    unsafe { half_amx::weight_tiles(self.kind, &self.bits[g * cols * NW..(g + 1) * cols * NW], cols, t) };
                                }
                                let tile_of = |g: usize| tiles[(g - g0) * per..].as_ptr();
                                let nrows = |g: usize| (rows - g * NW).min(NW);
                                // SAFETY: `amx_bf16_available` held; outputs are rows of this task's groups for
                                // tokens below amx_tokens.
                                unsafe {
                                    half_amx::run(
                                        xh,
                                        xl,
                                        cols,
                                        amx_tokens,
                                        g0..g1,
                                        &tile_of,
                                        &nrows,
                                        self.kind == HalfKind::F16,
                                        dst.at(0),
                                        rows,
                                    )
                                };
                            });
                        }
                        for tb in (amx_tokens..m).step_by(TOKEN_BLOCK) {
                            let tb_end = (tb + TOKEN_BLOCK).min(m);
                            for g in g0..g1 {
                                let w = &self.bits[g * cols * NW..(g + 1) * cols * NW];
                                let mut t = tb;
                                while t < tb_end {
                                    let n = tokens.min(tb_end - t);
                                    // SAFETY: the wide layout is only made for `Isa::Avx2` (AVX2, FMA, F16C)
                                    // and instruction sets with AVX-512 F/BW/VL, whose kernel `tile` is; it
                                    // writes rows g·16.. (valid ones only) of tokens t..t + n.
                                    unsafe {
                                        tile(
                                            self.kind,
                                            w,
                                            &x[t * cols..],
                                            n,
                                            cols,
                                            dst.at(t * rows + g * NW),
                                            rows,
                                            (rows - g * NW).min(NW),
                                        )
                                    };
                                    t += n;
                                }
                            }
                        }
                    });
                })
            });
            return;
        }
        let chunk = (rows / (pool.threads() * 4)).clamp(RR, 255) / RR * RR;
        let dst = OutPtr(out.as_mut_ptr());
        // Each task computes a run of rows for all m tokens, writing its rows of `out` directly.
        pool.run(rows.div_ceil(chunk), &|c| {
            let r0 = c * chunk;
            let r1 = (r0 + chunk).min(rows);
            let mut o = [[0f32; TR]; RR];
            // Token blocks outermost: a block of activations stays in cache while the task's rows
            // pass over it.
            for tb in (0..m).step_by(TOKEN_BLOCK) {
                let tb_end = (tb + TOKEN_BLOCK).min(m);
                for r in (r0..r1).step_by(RR) {
                    let nr = RR.min(r1 - r);
                    let w = &self.bits[r * cols..(r + nr) * cols];
                    let mut t0 = tb;
                    while t0 < tb_end {
                        let n = TR.min(tb_end - t0);
                        self.tile(isa, w, nr, &x[t0 * cols..], n, &mut o);
                        for (i, orow) in o[..nr].iter().enumerate() {
                            for (t, &v) in orow[..n].iter().enumerate() {
                                // SAFETY: in bounds (t0 + t < m, r + i < rows); the row belongs to this task only.
                                unsafe { *dst.at((t0 + t) * rows + r + i) = v };
                            }
                        }
                        t0 += n;
                    }
                }
            }
        });
    }

    /// `nr` (≤ 3) weight rows starting at `w` against `n` (≤ 4) token rows starting at `xs`:
    /// `o[row][token]`.
    fn tile(&self, isa: Isa, w: &[u16], nr: usize, xs: &[f32], n: usize, o: &mut [[f32; TR]; RR]) {
        match isa {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: every non-scalar Isa implies AVX2, FMA and F16C.
            Isa::Avx2 | Isa::Avx2Vnni => unsafe { avx2::tile(self.kind, w, nr, xs, n, self.cols, o) },
            #[cfg(target_arch = "aarch64")]
            // SAFETY: the NEON instruction sets are only produced when the CPU reports NEON.
            Isa::Neon | Isa::NeonDot => unsafe { neon::tile(self.kind, w, nr, xs, n, self.cols, o) },
            _ => {
                let cols = self.cols;
                for (i, orow) in o[..nr].iter_mut().enumerate() {
                    let wr = &w[i * cols..(i + 1) * cols];
                    for (t, ov) in orow[..n].iter_mut().enumerate() {
                        let xr = &xs[t * cols..(t + 1) * cols];
                        *ov = match self.kind {
                            HalfKind::F16 => wr.iter().zip(xr).map(|(&b, &v)| f16::from_bits(b).to_f32() * v).sum(),
                            HalfKind::Bf16 => wr.iter().zip(xr).map(|(&b, &v)| bf16::from_bits(b).to_f32() * v).sum(),
                        };
                    }
                }
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
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
    unsafe fn kernel<const R: usize>(
        kind: HalfKind,
        w: *const u16,
        x: *const f32,
        cols: usize,
        out: *mut f32,
        ldo: usize,
        mask: __mmask16,
    ) {
        let mut acc = [_mm512_setzero_ps(); R];
        for k in 0..cols {
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
}

#[cfg(target_arch = "aarch64")]
mod neon {
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
            HalfKind::Bf16 => {
                [vreinterpretq_f32_u32(vshll_n_u16::<16>(vget_low_u16(raw))), vreinterpretq_f32_u32(vshll_high_n_u16::<16>(raw))]
            }
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
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
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
        match n {
            1 => wide::<1>(kind, wp, xp, cols, out, ldo, nrows),
            2 => wide::<2>(kind, wp, xp, cols, out, ldo, nrows),
            3 => wide::<3>(kind, wp, xp, cols, out, ldo, nrows),
            4 => wide::<4>(kind, wp, xp, cols, out, ldo, nrows),
            5 => wide::<5>(kind, wp, xp, cols, out, ldo, nrows),
            _ => wide::<6>(kind, wp, xp, cols, out, ldo, nrows),
        }
    }

    #[inline(always)]
    unsafe fn wide<const R: usize>(kind: HalfKind, w: *const u16, x: *const f32, cols: usize, out: *mut f32, ldo: usize, nrows: usize) {
        // One token: two sets of accumulators over alternating columns hide the FMA latency.
        let sets = if R == 1 { 2 } else { 1 };
        let mut lo = [[_mm256_setzero_ps(); R]; 2];
        let mut hi = [[_mm256_setzero_ps(); R]; 2];
        let mut k = 0;
        while k + sets <= cols {
            for s in 0..sets {
                let (wl, wh) = (load8(kind, w.add((k + s) * NW)), load8(kind, w.add((k + s) * NW + 8)));
                for t in 0..R {
                    let xv = _mm256_set1_ps(*x.add(t * cols + k + s));
                    lo[s][t] = _mm256_fmadd_ps(wl, xv, lo[s][t]);
                    hi[s][t] = _mm256_fmadd_ps(wh, xv, hi[s][t]);
                }
            }
            k += sets;
        }
        if k < cols {
            let (wl, wh) = (load8(kind, w.add(k * NW)), load8(kind, w.add(k * NW + 8)));
            for t in 0..R {
                let xv = _mm256_set1_ps(*x.add(t * cols + k));
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
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_path_matches_an_f64_product() {
        let mut seed = 3u64;
        let mut rnd = || {
            seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((seed >> 33) as f32 / (1u64 << 31) as f32) * 2.0 - 1.0
        };
        for kind in [HalfKind::F16, HalfKind::Bf16] {
            for (rows, cols, m) in
                [(1, 8, 1), (7, 40, 3), (300, 96, 6), (33, 17, 5), (4, 100, 1), (5, 24, 9), (40, 64, 19), (40, 64, 37), (17, 96, 48)]
            {
                let wf: Vec<f32> = (0..rows * cols).map(|_| rnd()).collect();
                let bytes: Vec<u8> = wf
                    .iter()
                    .flat_map(|&v| match kind {
                        HalfKind::F16 => f16::from_f32(v).to_le_bytes(),
                        HalfKind::Bf16 => bf16::from_f32(v).to_le_bytes(),
                    })
                    .collect();
                let x: Vec<f32> = (0..m * cols).map(|_| rnd()).collect();
                for isa in Isa::available() {
                    let w = HalfWeight::new_for(isa, kind, rows, cols, &bytes).unwrap();
                    assert_eq!(w.isa(), isa);
                    let mut out = vec![0f32; m * rows];
                    // The weight's own instruction set.
                    w.matmul(&x, m, &mut out);
                    for t in 0..m {
                        for r in 0..rows {
                            let exact: f64 = (0..cols)
                                .map(|k| {
                                    let b = u16::from_le_bytes([bytes[2 * (r * cols + k)], bytes[2 * (r * cols + k) + 1]]);
                                    let wv = match kind {
                                        HalfKind::F16 => f16::from_bits(b).to_f64(),
                                        HalfKind::Bf16 => bf16::from_bits(b).to_f64(),
                                    };
                                    wv * x[t * cols + k] as f64
                                })
                                .sum();
                            let got = out[t * rows + r] as f64;
                            assert!(
                                (got - exact).abs() < 1e-4 * (1.0 + exact.abs()),
                                "{kind:?} {isa:?} [{rows}x{cols}] t={t} r={r}: {got} vs {exact}"
                            );
                        }
                    }
                }
            }
        }
        assert!(HalfWeight::new(HalfKind::F16, 2, 3, &[0; 5]).unwrap_err().contains("needs 12 bytes"));
    }
}
