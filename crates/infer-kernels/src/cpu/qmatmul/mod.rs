//! Quantized matrix multiplication on the CPU: `y = x Wᵀ` with `W` in GGUF block formats (Q4_0,
//! Q4_1, Q8_0, Q5_0, Q5_1, Q4_K, Q5_K, Q6_K), `x` in f32.
//!
//! Weights are repacked once at load (see [`QWeight`]) for the instruction set chosen at run time.
//! The activations are quantized once per call to 8-bit blocks of 32 (a scale, `d·Σq`, 32 signed
//! bytes); each output is a sum over blocks of integer dot products scaled in f32. Row groups are
//! split across the kernels' thread pool.
//!
//! - Wide layout (AMX, AVX-512, and AVX2 for all but Q2_K): 16 rows per group with the
//!   values as unsigned bytes in AMX's B-tile order, four values of each row side by side, so one
//!   register holds four values of 16 (AVX2: 8) rows and one byte dot product against four
//!   broadcast activation bytes advances 16 rows' sums at once (no horizontal sums; one scale step
//!   per block for all of them). With AMX, every 16 tokens of the formats with one scale per block
//!   go through tile products instead (`amx.rs`), a group's 4/5-bit values spread to bytes once
//!   per 64 tokens.
//! - Narrow layout (scalar, the AVX2 kernels for Q2_K, `Isa::Avx2Vnni`, and NEON on
//!   aarch64, with `sdot` where the CPU has it): 4 rows per group, a register tile of four rows ×
//!   two or three tokens.

use half::f16;

use crate::cpu::isa::{Isa, Layout};
use crate::cpu::{scratch, OutPtr, NW};

#[cfg(target_arch = "x86_64")]
mod amx;
#[cfg(target_arch = "x86_64")]
mod avx2;
#[cfg(target_arch = "x86_64")]
mod avx512;
#[cfg(target_arch = "aarch64")]
mod neon;
mod pack;
pub mod scalar;
#[cfg(test)]
mod tests;

use pack::*;

/// Values per quantization block (all supported formats).
pub const QK: usize = 32;

/// Weight block formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QType {
    /// `d: f16, qs: [u8; 16]`, value = d · (nibble − 8).
    Q4_0,
    /// `d: f16, m: f16, qs: [u8; 16]`, value = d · nibble + m.
    Q4_1,
    /// `d: f16, qs: [i8; 32]`, value = d · q.
    Q8_0,
    /// `d: f16, qh: u32, qs: [u8; 16]`, value = d · (q5 − 16). Repacked exactly into the 5-bit
    /// form (nibbles as Q4_1, then a 32-bit plane of high bits).
    Q5_0,
    /// `d, m: f16, qh: u32, qs: [u8; 16]`, value = d · q5 + m. Repacked exactly into the 5-bit form.
    Q5_1,
    /// K-quant super-blocks of 256: `d, dmin: f16, scales: [u8; 12]` (6-bit scale and minimum of
    /// each 32-value sub-block), `qs: [u8; 128]`; value = d·sc·q − dmin·m. Repacked exactly into
    /// the Q4_1 form (per-sub-block f32 scale and minimum).
    Q4K,
    /// K-quant super-blocks of 256: `d, dmin: f16, scales: [u8; 12], qh: [u8; 32], qs: [u8; 128]`;
    /// value = d·sc·q5 − dmin·m (q5 = 4 low bits + 1 high bit). Repacked exactly into the 5-bit
    /// form with per-sub-block f32 scale and minimum.
    Q5K,
    /// K-quant super-blocks of 256: `scales: [u8; 16]` (4-bit scale and minimum per 16 values),
    /// `qs: [u8; 64]` (2-bit values), `d, dmin: f16`; value = d·sc·q2 − dmin·m. Repacked exactly into
    /// 8-bit form with two scales and two minimums per 32-value block.
    Q2K,
    /// K-quant super-blocks of 256: `hmask: [u8; 32], qs: [u8; 64], scales: [u8; 12], d: f16`;
    /// value = d·(sc − 32)·q3 with q3 = 2 low bits − (4 unless the high bit is set) and a 6-bit
    /// scale per 16 values. Repacked exactly into 8-bit form with two scales per 32-value block.
    Q3K,
    /// K-quant super-blocks of 256: `ql: [u8; 128], qh: [u8; 64], scales: [i8; 16], d: f16`;
    /// value = d·sc·(q6 − 32) with one scale per 16 values. Repacked exactly into 8-bit form with
    /// two scales per 32-value block.
    Q6K,
}

impl QType {
    /// Bytes of one block (of [`block_values`](Self::block_values) values).
    pub fn block_bytes(self) -> usize {
        match self {
            QType::Q4_0 => 18,
            QType::Q4_1 => 20,
            QType::Q8_0 => 34,
            QType::Q5_0 => 22,
            QType::Q5_1 => 24,
            QType::Q2K => 84,
            QType::Q3K => 110,
            QType::Q4K => 144,
            QType::Q5K => 176,
            QType::Q6K => 210,
        }
    }

    /// Whether the repacked form holds one signed byte per value (else two 4-bit values per byte).
    fn byte_quants(self) -> bool {
        matches!(self, QType::Q8_0 | QType::Q2K | QType::Q3K | QType::Q6K)
    }

    /// f32 numbers kept per row and 32-value block: a scale and a minimum, two scales (per 16
    /// values), or two scales and two minimums (Q2_K).
    fn scale_slots(self) -> usize {
        if self == QType::Q2K {
            4
        } else {
            2
        }
    }

    /// Whether the repacked form holds 4-bit values plus a plane of fifth bits (values 0..32).
    fn five_bit(self) -> bool {
        matches!(self, QType::Q5_0 | QType::Q5_1 | QType::Q5K)
    }

    /// Whether each 32-value block has two scales (one per 16 values, kept where the minimums
    /// would be; such formats have no minimum).
    fn half_scales(self) -> bool {
        matches!(self, QType::Q2K | QType::Q3K | QType::Q6K)
    }

    /// Values per block: 32, or 256 for K-quants.
    pub fn block_values(self) -> usize {
        match self {
            QType::Q2K | QType::Q3K | QType::Q4K | QType::Q5K | QType::Q6K => 256,
            _ => QK,
        }
    }
}

impl Isa {
    /// The layout this instruction set multiplies `qt` weights in: wide for AVX-512 and AMX, and
    /// for AVX2 except Q2_K (its minimum per 16 values has no AVX2 wide kernel; Q8_0's bytes go
    /// through AVX2's 16-bit byte products as two nibbles).
    #[cfg_attr(not(target_arch = "x86_64"), allow(unused_variables))]
    pub fn qlayout(self, qt: QType) -> Layout {
        match self {
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 if qt != QType::Q2K => Layout::Wide,
            _ => self.layout(),
        }
    }
}

/// One activation block: 32 values as `d · qs`, with `s = d · Σ qs`.
#[derive(Debug, Clone, Copy)]
#[repr(C, align(32))]
pub struct BlockQ8 {
    pub qs: [i8; QK],
    pub d: f32,
    pub s: f32,
    /// `d · Σ qs[0..16]` (for formats with a minimum per 16 values).
    pub s0: f32,
    /// `−Σ qs[0..16]` and `−Σ qs[16..32]`: the AVX-512 kernels start their integer sums at these
    /// times 2^k where a format's values are unsigned with offset −2^k (in the block's padding).
    pub neg_sums: [i32; 2],
}

/// Prefetches the `qb`-byte block `ahead` blocks past block `b` of a wide group's values at `qs`
/// (past the group's end: the next group's, which this thread usually takes next). The AVX-512,
/// AVX2 and AMX tiles call it once per block. Into L2 (T1), not L1: on the Xeon (Sapphire Rapids)
/// that decoded the 1B shape 8-10% faster (Q4_K_M tg64 35.5 → 39.4 t/s; a memory-resident Q4_K
/// matrix at 1 token read 23.7 → 26.1 GB/s; 9 tokens unchanged).
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn prefetch_ahead(qs: *const u8, b: usize, qb: usize, ahead: usize) {
    use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T1};
    let p = qs.wrapping_add((b + ahead) * qb);
    for l in 0..qb / 64 {
        _mm_prefetch::<_MM_HINT_T1>(p.wrapping_add(64 * l) as *const i8);
    }
}

/// Blocks to [`prefetch_ahead`] for a tile of `r` tokens: about the same time ahead whatever the
/// tokens (a block takes longer the more tokens it serves); measured best for 1 and 9-10 tokens.
#[cfg(target_arch = "x86_64")]
const fn blocks_ahead(r: usize) -> usize {
    match r {
        1 => 16,
        2 | 3 => 12,
        _ => 8,
    }
}

/// Quantizes `x` (length a multiple of 32) to 8-bit blocks, appending to `out`.
pub fn quantize_row_q8(x: &[f32], out: &mut Vec<BlockQ8>) {
    debug_assert_eq!(x.len() % QK, 0);
    out.extend(x.chunks_exact(QK).map(quantize_block));
}

/// One block of 32 values, with SIMD where the CPU has it (the same result either way).
#[inline]
fn quantize_block(chunk: &[f32]) -> BlockQ8 {
    #[cfg(target_arch = "x86_64")]
    if simd_quantize() {
        // SAFETY: the CPU has AVX2 (checked once); `chunk` holds 32 values.
        return unsafe { avx2::quantize_block(chunk) };
    }
    quantize_block_scalar(chunk)
}

/// Whether activations are quantized with AVX2 (any non-scalar instruction set has it).
#[cfg(target_arch = "x86_64")]
fn simd_quantize() -> bool {
    static SIMD: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *SIMD.get_or_init(|| Isa::detect() != Isa::Scalar)
}

/// One block of 32 values (round to nearest, ties to even: adding and subtracting 1.5·2²³ rounds
/// any |v| ≤ 127 exactly, and vectorizes where `round()` is a library call).
#[inline]
pub(crate) fn quantize_block_scalar(chunk: &[f32]) -> BlockQ8 {
    const MAGIC: f32 = 12_582_912.0;
    let amax = chunk.iter().fold(0f32, |m, v| m.max(v.abs()));
    let d = amax / 127.0;
    let id = if d > 0.0 { 1.0 / d } else { 0.0 };
    let mut qs = [0i8; QK];
    for (q, &v) in qs.iter_mut().zip(chunk) {
        *q = ((v * id + MAGIC) - MAGIC) as i8;
    }
    let half: i32 = qs[..16].iter().map(|&q| q as i32).sum();
    let isum: i32 = half + qs[16..].iter().map(|&q| q as i32).sum::<i32>();
    BlockQ8 { qs, d, s: d * isum as f32, s0: d * half as f32, neg_sums: [-half, half - isum] }
}

/// A weight matrix `[rows, cols]` from GGUF blocks, repacked once at load for the kernels of one
/// instruction set ([`Layout`]). Narrow: rows in groups of four, and for each (group, block) the
/// four rows' scales and minimums as f32 followed by their four blocks of quants, so one pass
/// streams a group's weights in order and one activation block serves four weight rows. Wide: the
/// same for groups of 16 rows, with the values in AMX's B-tile order (see `pack::pack_wide`).
#[derive(Clone)]
pub struct QWeight {
    qtype: QType,
    rows: usize,
    cols: usize,
    /// The instruction set it was packed for (and that [`matmul`](Self::matmul) uses).
    isa: Isa,
    layout: Layout,
    /// Narrow, per (group, block): `d[4]` then `m[4]` (Q4_0: `m = -8·d`; Q8_0: 0; Q3_K/Q6_K: the second
    /// half-block scales), and for Q2_K then the two half-block minimums `m0[4]`, `m1[4]`.
    scales: Vec<f32>,
    /// Narrow, per (group, block): four rows × `quant_bytes()`.
    qs: Vec<u8>,
    /// Wide: how `scales` (then bytes in f32 words) and `qs` hold each group (one form for AMX,
    /// AVX-512 and AVX2: f16 factors and integer sub-scales, values in as few bits as the file's).
    form: WideForm,
}

impl std::fmt::Debug for QWeight {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QWeight").field("qtype", &self.qtype).field("rows", &self.rows).field("cols", &self.cols).finish()
    }
}

/// Weight rows per group (narrow layout).
pub const NR: usize = 4;
/// Activation rows handled together against each group (at most).
pub const MR: usize = 6;
/// Tokens whose activations are kept hot while a task's row groups pass over them.
const TOKEN_BLOCK: usize = 40;

impl QType {
    /// Bytes of quants in one block (without its scales).
    fn quant_bytes(self) -> usize {
        match self {
            QType::Q4_0 | QType::Q4_1 | QType::Q4K => 16,
            QType::Q5_0 | QType::Q5_1 | QType::Q5K => 20,
            QType::Q8_0 | QType::Q2K | QType::Q3K | QType::Q6K => 32,
        }
    }

    /// How the wide layout holds this format (every kernel that reads it: AMX, AVX-512, AVX2).
    fn wide_form(self) -> WideForm {
        let (values, scales, moff) = match self {
            QType::Q4_0 => (NIBBLES, D16, -8.0),
            QType::Q4_1 => (NIBBLES, DM16, 0.0),
            QType::Q5_0 => (FIVE, D16, -16.0),
            QType::Q5_1 => (FIVE, DM16, 0.0),
            QType::Q8_0 => (BYTES, D16, -128.0),
            QType::Q4K => (NIBBLES, KSM, 0.0),
            QType::Q5K => (FIVE, KSM, 0.0),
            QType::Q2K => (NIBBLES, KHALFM, 0.0),
            QType::Q3K => (NIBBLES, KHALF, -4.0),
            QType::Q6K => (SIX, KHALF, -32.0),
        };
        WideForm { values, scales, moff }
    }
}

/// Value forms of a wide block (16 rows × 32 values in [`wide_index`](pack::wide_index) order).
/// Nibbles: byte i holds value i (low) and i + 256 (high).
pub(super) const NIBBLES: u8 = 0;
/// Nibbles, then a 64-byte line of fifth bits (see [`high_bits`](pack::high_bits)).
pub(super) const FIVE: u8 = 1;
/// Unsigned bytes.
pub(super) const BYTES: u8 = 2;
/// Nibbles, then two 64-byte lines of fifth and sixth bits (see [`high_bits`](pack::high_bits)).
pub(super) const SIX: u8 = 3;

/// Scale forms of a wide block (for each of the 16 rows; K-quant forms keep the f16 super-block
/// factors once per 8 blocks, followed by the 8 blocks' integer sub-scales).
/// `d[16]` as f16; the minimum is `moff · d` (Q4_0, Q5_0, Q8_0).
pub(super) const D16: u8 = 0;
/// `d[16], m[16]` as f16 (Q4_1, Q5_1).
pub(super) const DM16: u8 = 1;
/// Super-block `D[16], M[16]` (f16, M = −dmin), then per block `sc[16], mn[16]` (u8):
/// d = D·sc, m = M·mn (Q4_K, Q5_K).
pub(super) const KSM: u8 = 2;
/// Super-block `D[16]` (f16), then per block `s0[16], s1[16]` (i8): d_h = D·s_h, m_h = moff·d_h
/// (Q3_K, Q6_K).
pub(super) const KHALF: u8 = 3;
/// Super-block `D[16], M[16]` (f16, M = −dmin), then per block `s0, s1, n0, n1` (u8 × 16 each):
/// d_h = D·s_h, m_h = M·n_h (Q2_K).
pub(super) const KHALFM: u8 = 4;

/// How a weight's wide layout stores values and scales.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) struct WideForm {
    /// [`NIBBLES`], [`FIVE`], [`SIX`] or [`BYTES`].
    pub values: u8,
    /// [`D16`], [`DM16`], [`KSM`], [`KHALF`] or [`KHALFM`].
    pub scales: u8,
    /// The minimum as a multiple of the scale ([`D16`], [`KHALF`]): the unsigned offset, negated.
    pub moff: f32,
}

impl WideForm {
    /// Bytes of one block's values (16 rows × 32 values).
    pub fn value_bytes(self) -> usize {
        match self.values {
            BYTES => 512,
            FIVE => 320,
            SIX => 384,
            _ => 256,
        }
    }

    /// Bytes of a super-block's f16 factors (K-quant forms) and of one block's scales.
    pub fn record_bytes(self) -> (usize, usize) {
        record_bytes(self.scales)
    }

    /// Bytes of scales of one group of 16 rows over `nb` blocks (K-quant forms: `nb` a multiple of 8).
    pub fn scale_bytes(self, nb: usize) -> usize {
        let (sup, rec) = self.record_bytes();
        nb * rec + nb.div_ceil(8) * sup
    }

    /// Byte offsets of block `b`'s super-block factors and of its own scales in its group's scales.
    pub fn offsets(self, b: usize) -> (usize, usize) {
        scale_offsets(self.scales, b)
    }
}

/// Bytes of a super-block's f16 factors and of one block's scales in scale form `scales`.
#[inline(always)]
pub(super) const fn record_bytes(scales: u8) -> (usize, usize) {
    match scales {
        D16 => (0, 2 * NW),
        DM16 => (0, 4 * NW),
        KSM => (4 * NW, 2 * NW),
        KHALF => (2 * NW, 2 * NW),
        _ => (4 * NW, 4 * NW),
    }
}

/// Byte offsets of block `b`'s super-block factors and of its own scales in a group's scales.
#[inline(always)]
pub(super) const fn scale_offsets(scales: u8, b: usize) -> (usize, usize) {
    let (sup, rec) = record_bytes(scales);
    if sup == 0 {
        return (0, b * rec);
    }
    let base = (b / 8) * (sup + 8 * rec);
    (base, base + sup + (b % 8) * rec)
}

impl QWeight {
    /// Repacks GGUF block data `[rows, cols]` for the best instruction set; checks the size.
    pub fn new(qtype: QType, rows: usize, cols: usize, data: Vec<u8>) -> Result<Self, String> {
        Self::new_for(Isa::detect(), qtype, rows, cols, data)
    }

    /// The same for a chosen instruction set (whose [`Layout`] it takes, and which
    /// [`matmul`](Self::matmul) uses).
    pub fn new_for(isa: Isa, qtype: QType, rows: usize, cols: usize, data: Vec<u8>) -> Result<Self, String> {
        let bv = qtype.block_values();
        if !cols.is_multiple_of(bv) {
            return Err(format!("{qtype:?} weight with {cols} columns: the row length must be a multiple of {bv}"));
        }
        let bb = qtype.block_bytes();
        let want = rows * cols / bv * bb;
        if data.len() != want {
            return Err(format!("{qtype:?} weight [{rows}, {cols}] needs {want} bytes, got {}", data.len()));
        }
        let form = qtype.wide_form();
        if isa.qlayout(qtype) == Layout::Wide {
            let (scales, qs) = pack_wide(qtype, form, rows, cols, &data);
            return Ok(Self { qtype, rows, cols, isa, layout: Layout::Wide, scales, qs, form });
        }
        let nb = cols / QK;
        let groups = rows.div_ceil(NR);
        let qb = qtype.quant_bytes();
        let slots = qtype.scale_slots();
        let mut scales = vec![0f32; groups * nb * slots * NR];
        let mut qs = vec![0u8; groups * nb * NR * qb];
        for row in 0..rows {
            let (g, r) = (row / NR, row % NR);
            for b in 0..nb {
                let gb = g * nb + b;
                let dst = &mut qs[(gb * NR + r) * qb..(gb * NR + r + 1) * qb];
                let vals = narrow_block(qtype, &data, cols, row, b, dst);
                for (k, &v) in vals[..slots].iter().enumerate() {
                    scales[(gb * slots + k) * NR + r] = v;
                }
            }
        }
        Ok(Self { qtype, rows, cols, isa, layout: Layout::Narrow, scales, qs, form })
    }

    pub fn qtype(&self) -> QType {
        self.qtype
    }
    pub fn rows(&self) -> usize {
        self.rows
    }
    pub fn cols(&self) -> usize {
        self.cols
    }
    pub fn layout(&self) -> Layout {
        self.layout
    }
    /// The instruction set it was packed for.
    pub fn isa(&self) -> Isa {
        self.isa
    }

    /// Bytes it holds in memory (what a pass over it reads).
    pub fn bytes(&self) -> usize {
        self.scales.len() * 4 + self.qs.len()
    }

    /// Rows per group of the layout.
    fn group_rows(&self) -> usize {
        match self.layout {
            Layout::Narrow => NR,
            Layout::Wide => NW,
        }
    }

    /// `out[m, rows] = x[m, cols] · Wᵀ` with the instruction set the weight was packed for.
    pub fn matmul(&self, x: &[f32], m: usize, out: &mut [f32]) {
        self.matmul_with(self.isa, x, m, out)
    }

    /// The same, with a chosen instruction set (which the CPU must support, and whose layout the
    /// weight has).
    pub fn matmul_with(&self, isa: Isa, x: &[f32], m: usize, out: &mut [f32]) {
        matmul_many_with(isa, &[self], x, m, &mut [out]);
    }

    /// Row groups `g0..g1` for all `m` tokens of the quantized activations `acts`, written to
    /// `dst` (`[m, rows]`).
    fn run_groups(&self, isa: Isa, acts: &[BlockQ8], m: usize, g0: usize, g1: usize, dst: OutPtr) {
        if self.layout == Layout::Wide {
            #[cfg(target_arch = "x86_64")]
            return self.run_groups_wide(isa, acts, m, g0, g1, dst);
        }
        let nb = self.cols / QK;
        let rows = self.rows;
        // Token blocks outermost: a block's activations stay in cache while every row group of
        // this task passes over them.
        for tb in (0..m).step_by(TOKEN_BLOCK) {
            let tb_end = (tb + TOKEN_BLOCK).min(m);
            for g in g0..g1 {
                let mut t0 = tb;
                while t0 < tb_end {
                    let r = MR.min(tb_end - t0);
                    let mut o = [[0f32; MR]; NR];
                    self.tile(isa, g, &acts[t0 * nb..], nb, r, &mut o);
                    for (wr, orow) in o.iter().enumerate() {
                        let row = g * NR + wr;
                        if row < rows {
                            for (t, &v) in orow[..r].iter().enumerate() {
                                // SAFETY: in bounds (t0 + t < m, row < rows); the row belongs to this task only.
                                unsafe { *dst.at((t0 + t) * rows + row) = v };
                            }
                        }
                    }
                    t0 += r;
                }
            }
        }
    }

    /// [`run_groups`](Self::run_groups) over the wide layout: AMX for each 16 tokens where the
    /// instruction set has it (formats with one scale per block), AVX-512 (or AVX2) register tiles
    /// of up to 10 (4) tokens for the rest.
    #[cfg(target_arch = "x86_64")]
    fn run_groups_wide(&self, isa: Isa, acts: &[BlockQ8], m: usize, g0: usize, g1: usize, dst: OutPtr) {
        let nb = self.cols / QK;
        let (sn, qb) = (self.form.scale_bytes(nb) / 4, self.form.value_bytes() * nb);
        let group = |g: usize| (&self.scales[g * sn..(g + 1) * sn], &self.qs[g * qb..(g + 1) * qb], (self.rows - g * NW).min(NW));
        // AMX's tiles take the tokens they are faster for (`amx::tokens_for`); the register tiles
        // the rest.
        let t0 = if isa == Isa::Amx { amx::tokens_for(self.form, m) } else { 0 };
        if t0 > 0 {
            // SAFETY: `Isa::Amx` is only produced when the CPU has AMX-INT8 (and AVX-512 F/BW/VL/
            // VNNI) and the OS granted the tile state; outputs are in bounds (t < m, rows of g).
            unsafe { amx::run(self.form, acts, nb, t0, g0..g1, &group, dst.at(0), self.rows) };
        }
        // The most tokens of a register tile of this instruction set: AVX2 or AVX-512 (Avx512/Amx).
        let tokens = if isa == Isa::Avx2 { avx2::WIDE_TOKENS } else { avx512::TOKENS };
        scratch::with(&OFFSETS, |offsets| {
            // AVX-512's tiles start the integer sums of weights offset by −2^k at −2^k·Σ x.
            let k = avx512::offset_shift(self.form.values, self.form.scales);
            if isa != Isa::Avx2 && k > 0 {
                avx512::offsets(&acts[t0 * nb..m * nb], k, offsets);
            }
            for tb in (t0..m).step_by(TOKEN_BLOCK) {
                let tb_end = (tb + TOKEN_BLOCK).min(m);
                for g in g0..g1 {
                    let (sc, qs, nrows) = group(g);
                    let mut t = tb;
                    while t < tb_end {
                        let r = tokens.min(tb_end - t);
                        let a = &acts[t * nb..];
                        // SAFETY: the wide layout is only made for `Isa::Avx2` (AVX2, FMA, F16C)
                        // and `Isa::Avx512`/`Isa::Amx` (AVX-512 F/BW/VL/VNNI), whose kernels these
                        // are; they write rows g·16.. (nrows of them) of tokens t..t + r.
                        unsafe {
                            let out = dst.at(t * self.rows + g * NW);
                            if isa == Isa::Avx2 {
                                avx2::wide_tile(self.form, sc, qs, a, nb, r, out, self.rows, nrows)
                            } else {
                                let o = offsets.get((t - t0) * nb..).unwrap_or(&[]);
                                avx512::tile(self.form, sc, qs, a, o, nb, r, out, self.rows, nrows)
                            }
                        };
                        t += r;
                    }
                }
            }
        })
    }

    /// One row group × `r` (≤ MR) activation rows starting at `a` → `o[weight row][token]`.
    fn tile(&self, isa: Isa, g: usize, a: &[BlockQ8], nb: usize, r: usize, o: &mut [[f32; MR]; NR]) {
        let qb = self.qtype.quant_bytes();
        let sn = self.qtype.scale_slots() * NR;
        let scales = &self.scales[g * nb * sn..(g + 1) * nb * sn];
        let qs = &self.qs[g * nb * NR * qb..(g + 1) * nb * NR * qb];
        match isa {
            Isa::Scalar => scalar::tile(self.qtype, scales, qs, a, nb, r, o),
            #[cfg(target_arch = "x86_64")]
            // SAFETY: `Isa::Avx2` is only produced when the CPU reports AVX2, FMA and F16C.
            Isa::Avx2 => unsafe { avx2::tile(self.qtype, scales, qs, a, nb, r, o) },
            #[cfg(target_arch = "x86_64")]
            // SAFETY: `Isa::Avx2Vnni` is only produced when the CPU reports AVX-512 VL and VNNI
            // besides AVX2, FMA and F16C.
            Isa::Avx2Vnni => unsafe { avx2::tile_vnni(self.qtype, scales, qs, a, nb, r, o) },
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 | Isa::Amx => unreachable!("the wide layout has its own kernels"),
            #[cfg(target_arch = "aarch64")]
            // SAFETY: `Isa::Neon` is only produced when the CPU reports NEON.
            Isa::Neon => unsafe { neon::tile(self.qtype, scales, qs, a, nb, r, o) },
            #[cfg(target_arch = "aarch64")]
            // SAFETY: `Isa::NeonDot` is only produced when the CPU reports NEON and dotprod.
            Isa::NeonDot => unsafe { neon::tile_dot(self.qtype, scales, qs, a, nb, r, o) },
        }
    }
}

/// [`quantize_row_q8`] of a whole activation matrix into `out`, rows of blocks spread over the
/// kernels' pool.
fn quantize_parallel(x: &[f32], out: &mut Vec<BlockQ8>) {
    let n = x.len() / QK;
    out.resize(n, BlockQ8 { qs: [0; QK], d: 0.0, s: 0.0, s0: 0.0, neg_sums: [0; 2] });
    let per = 64;
    let dst = BlockPtr(out.as_mut_ptr());
    crate::cpu::pool::Pool::global().run(n.div_ceil(per), &|c| {
        for i in c * per..((c + 1) * per).min(n) {
            // SAFETY: block i is in bounds and written by this task only.
            unsafe { *dst.at(i) = quantize_block(&x[i * QK..(i + 1) * QK]) };
        }
    });
}

thread_local! {
    /// The calling thread's quantized activations, tasks and output pointers (reused, see `scratch`).
    static ACTS: std::cell::RefCell<Vec<BlockQ8>> = const { std::cell::RefCell::new(Vec::new()) };
    static TASKS: std::cell::RefCell<Vec<(usize, usize, usize)>> = const { std::cell::RefCell::new(Vec::new()) };
    static DSTS: std::cell::RefCell<Vec<OutPtr>> = const { std::cell::RefCell::new(Vec::new()) };
    /// A task's starting points of the integer sums (`avx512::offsets`).
    static OFFSETS: std::cell::RefCell<Vec<[i32; 2]>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Shares the activation blocks between the tasks that fill them (each writes its own range).
#[derive(Clone, Copy)]
struct BlockPtr(*mut BlockQ8);
// SAFETY: tasks write disjoint blocks and the caller waits for all of them.
unsafe impl Send for BlockPtr {}
unsafe impl Sync for BlockPtr {}

impl BlockPtr {
    /// # Safety
    /// `i` must be in bounds and written by one task only.
    unsafe fn at(self, i: usize) -> *mut BlockQ8 {
        self.0.add(i)
    }
}

/// Several weights with the same input size against the same activations (e.g. a layer's q, k
/// and v projections): `outs[i] = x · wsᵢᵀ`. The activations are quantized once and all row groups
/// of all weights are spread over one parallel region (one wake-up of the pool instead of one
/// per weight). With the instruction set the weights were packed for, which they must share.
pub fn matmul_many(ws: &[&QWeight], x: &[f32], m: usize, outs: &mut [&mut [f32]]) {
    let Some(isa) = ws.first().map(|w| w.isa) else { return };
    debug_assert!(ws.iter().all(|w| w.isa == isa), "weights packed for different instruction sets");
    matmul_many_with(isa, ws, x, m, outs)
}

/// [`matmul_many`] with a chosen instruction set (which the CPU must support).
pub fn matmul_many_with(isa: Isa, ws: &[&QWeight], x: &[f32], m: usize, outs: &mut [&mut [f32]]) {
    assert_eq!(ws.len(), outs.len(), "one output per weight");
    let Some(cols) = ws.first().map(|w| w.cols) else { return };
    assert!(ws.iter().all(|w| w.cols == cols), "weights must share the input size");
    assert_eq!(x.len(), m * cols, "x must be [m, cols]");
    for (w, o) in ws.iter().zip(outs.iter()) {
        assert_eq!(o.len(), m * w.rows, "out must be [m, rows]");
        assert_eq!(w.layout, isa.qlayout(w.qtype), "{:?} weight packed for another instruction set than {isa:?}", w.qtype);
    }
    // The buffers are this thread's, reused: no allocation once a call this large has been seen.
    scratch::with(&ACTS, |acts| {
        scratch::with(&TASKS, |tasks| {
            scratch::with(&DSTS, |dsts| {
                if m >= 16 {
                    quantize_parallel(x, acts)
                } else {
                    acts.extend(x.chunks_exact(QK).map(quantize_block))
                }
                let total: usize = ws.iter().map(|w| w.rows.div_ceil(w.group_rows())).sum();
                let pool = crate::cpu::pool::Pool::global();
                let chunk = (total / (pool.threads() * 4)).clamp(1, 64);
                // Tasks: (weight, first group, end group); each writes only its own rows of its output.
                for (i, w) in ws.iter().enumerate() {
                    let groups = w.rows.div_ceil(w.group_rows());
                    tasks.extend((0..groups).step_by(chunk).map(|g0| (i, g0, (g0 + chunk).min(groups))));
                }
                dsts.extend(outs.iter_mut().map(|o| OutPtr(o.as_mut_ptr())));
                let (acts, tasks, dsts) = (&*acts, &*tasks, &*dsts);
                pool.run(tasks.len(), &|k| {
                    let (i, g0, g1) = tasks[k];
                    ws[i].run_groups(isa, acts, m, g0, g1, dsts[i]);
                });
            })
        })
    })
}
