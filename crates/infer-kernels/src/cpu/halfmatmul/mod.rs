//! Matrix multiplication with 16-bit float weights (GGUF F16 or BF16) on the CPU: `y = x Wᵀ`, the
//! weights kept in 16 bits (half the memory traffic of f32) and widened in registers. Row chunks are
//! split over the kernels' thread pool; a register tile of three weight rows × four tokens loads and converts
//! each weight vector once per four tokens and each activation vector once per three rows.
//! AVX2+FMA+F16C at run time, scalar otherwise. On AVX-512 CPUs the weights are kept in the wide
//! layout instead (groups of 16 rows, column-major inside a group: one 256-bit load is one column
//! of 16 rows), so one broadcast activation times one widened column feeds 16 rows' sums at once.
//!
//! This file holds the weight type and the dispatch; the kernels are one file per instruction set
//! (`avx512.rs`, `avx2.rs`, `neon.rs`; `amx.rs`: AMX-BF16 prompts); the scalar loop is in
//! `HalfWeight::tile`.

use half::{bf16, f16};

#[cfg(target_arch = "x86_64")]
use crate::cpu::isa::amx_bf16_available;
use crate::cpu::isa::{Isa, Layout};
#[cfg(target_arch = "x86_64")]
use crate::cpu::scratch;
use crate::cpu::{OutPtr, NW};

#[cfg(target_arch = "x86_64")]
mod amx;
#[cfg(target_arch = "x86_64")]
mod avx2;
#[cfg(target_arch = "x86_64")]
mod avx512;
#[cfg(target_arch = "aarch64")]
mod neon;
#[cfg(test)]
mod tests;

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
            let amx_tokens = if isa == Isa::Amx && m >= 2 * amx::TOKENS && cols.is_multiple_of(amx::KB) && amx_bf16_available() {
                m / amx::TOKENS * amx::TOKENS
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
                                amx::split_activations(&x[t * cols..(t + 1) * cols], h, l);
                            }
                        });
                    }
                    pool.run(groups.div_ceil(chunk), &|c| {
                        let (g0, g1) = (c * chunk, ((c + 1) * chunk).min(groups));
                        if amx_tokens > 0 {
                            let per = cols / amx::KB * 512;
                            scratch::with(&TILES, |tiles| {
                                tiles.resize((g1 - g0) * per, 0);
                                for (i, t) in tiles.chunks_exact_mut(per).enumerate() {
                                    let g = g0 + i;
                                    // SAFETY: as above; the group's weights are [cols, 16].
                                    unsafe { amx::weight_tiles(self.kind, &self.bits[g * cols * NW..(g + 1) * cols * NW], cols, t) };
                                }
                                let tile_of = |g: usize| tiles[(g - g0) * per..].as_ptr();
                                let nrows = |g: usize| (rows - g * NW).min(NW);
                                // SAFETY: `amx_bf16_available` held; outputs are rows of this task's groups for
                                // tokens below amx_tokens.
                                unsafe {
                                    amx::run(
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
