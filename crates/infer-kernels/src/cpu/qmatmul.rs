//! Quantized matrix multiplication on the CPU: `y = x Wᵀ` with `W` in GGUF block formats (Q4_0,
//! Q4_1, Q8_0, Q5_0, Q5_1, Q4_K, Q5_K, Q6_K), `x` in f32.
//!
//! Weights are repacked once at load (see [`QWeight`]). The activations are quantized once per call
//! to 8-bit blocks of 32 (a scale, `d·Σq`, 32 signed bytes); each output is a sum over blocks of
//! integer dot products scaled in f32. A register tile of four weight rows × up to four tokens
//! streams each weight block once for several tokens (prefill and batched decode); row groups are
//! split across the kernels' thread pool. The instruction set is chosen at run time: AVX2+FMA with VNNI byte
//! dot products (`vpdpbusd`) where AVX-512 VL/VNNI exist, AVX2+FMA (`vpmaddubsw`), or the portable
//! scalar reference.

use half::f16;

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

/// Which instruction set a kernel call uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Isa {
    Scalar,
    #[cfg(target_arch = "x86_64")]
    Avx2,
    /// The AVX2 kernels with VNNI byte dot products (`vpdpbusd` on 256-bit registers, AVX-512 VL).
    #[cfg(target_arch = "x86_64")]
    Avx2Vnni,
}

impl Isa {
    /// The best the running CPU supports.
    pub fn detect() -> Isa {
        static BEST: std::sync::OnceLock<Isa> = std::sync::OnceLock::new();
        *BEST.get_or_init(|| *Isa::available().last().expect("scalar is always available"))
    }

    /// Every path this CPU can run, slowest first (tests force each in turn).
    pub fn available() -> Vec<Isa> {
        #[allow(unused_mut)]
        let mut v = vec![Isa::Scalar];
        #[cfg(target_arch = "x86_64")]
        if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") && std::is_x86_feature_detected!("f16c") {
            v.push(Isa::Avx2);
            if std::env::var_os("INFER_NO_VNNI").is_none()
                && std::is_x86_feature_detected!("avx512f")
                && std::is_x86_feature_detected!("avx512vl")
                && std::is_x86_feature_detected!("avx512vnni")
            {
                v.push(Isa::Avx2Vnni);
            }
        }
        v
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
}

/// Quantizes `x` (length a multiple of 32) to 8-bit blocks, appending to `out`.
pub fn quantize_row_q8(x: &[f32], out: &mut Vec<BlockQ8>) {
    debug_assert_eq!(x.len() % QK, 0);
    out.extend(x.chunks_exact(QK).map(quantize_block));
}

/// One block of 32 values (round to nearest, ties to even: adding and subtracting 1.5·2²³ rounds
/// any |v| ≤ 127 exactly, and vectorizes where `round()` is a library call).
#[inline]
fn quantize_block(chunk: &[f32]) -> BlockQ8 {
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
    BlockQ8 { qs, d, s: d * isum as f32, s0: d * half as f32 }
}

/// Shares the output matrix between the tasks of one matmul; each task writes only its own rows.
#[derive(Clone, Copy)]
pub(crate) struct OutPtr(pub(crate) *mut f32);
// SAFETY: tasks write disjoint elements (their own row groups) and the matmul waits for all of them.
unsafe impl Send for OutPtr {}
unsafe impl Sync for OutPtr {}

impl OutPtr {
    /// The element at `i` (a method, so closures capture the whole `Send` wrapper).
    ///
    /// # Safety
    /// `i` must be in bounds of the output and written by one task only.
    #[inline]
    pub(crate) unsafe fn at(self, i: usize) -> *mut f32 {
        self.0.add(i)
    }
}

/// A weight matrix `[rows, cols]` from GGUF blocks, repacked once at load for the kernels: rows in
/// groups of four, and for each (group, block) the four rows' scales and minimums as f32 followed by
/// their four blocks of quants, so one pass streams a group's weights in order and one activation
/// block serves four weight rows.
#[derive(Clone)]
pub struct QWeight {
    qtype: QType,
    rows: usize,
    cols: usize,
    /// Per (group, block): `d[4]` then `m[4]` (Q4_0: `m = -8·d`; Q8_0: 0; Q3_K/Q6_K: the second
    /// half-block scales), and for Q2_K then the two half-block minimums `m0[4]`, `m1[4]`.
    scales: Vec<f32>,
    /// Per (group, block): four rows × `quant_bytes()`.
    qs: Vec<u8>,
}

impl std::fmt::Debug for QWeight {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QWeight").field("qtype", &self.qtype).field("rows", &self.rows).field("cols", &self.cols).finish()
    }
}

/// Weight rows per group.
pub const NR: usize = 4;
/// Activation rows handled together against each group (at most).
pub const MR: usize = 6;
/// Tokens whose activations are kept hot while a task's row groups pass over them.
const TOKEN_BLOCK: usize = 32;

impl QType {
    /// Bytes of quants in one block (without its scales).
    fn quant_bytes(self) -> usize {
        match self {
            QType::Q4_0 | QType::Q4_1 | QType::Q4K => 16,
            QType::Q5_0 | QType::Q5_1 | QType::Q5K => 20,
            QType::Q8_0 | QType::Q2K | QType::Q3K | QType::Q6K => 32,
        }
    }
}

impl QWeight {
    /// Repacks GGUF block data `[rows, cols]`; checks the size.
    pub fn new(qtype: QType, rows: usize, cols: usize, data: Vec<u8>) -> Result<Self, String> {
        let bv = qtype.block_values();
        if !cols.is_multiple_of(bv) {
            return Err(format!("{qtype:?} weight with {cols} columns: the row length must be a multiple of {bv}"));
        }
        let bb = qtype.block_bytes();
        let want = rows * cols / bv * bb;
        if data.len() != want {
            return Err(format!("{qtype:?} weight [{rows}, {cols}] needs {want} bytes, got {}", data.len()));
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
                let vals: [f32; 4] = if qtype == QType::Q2K {
                    unpack_q2k_sub_block(&data[(row * cols / 256 + b / 8) * bb..][..bb], b % 8, dst)
                } else {
                    let (d, m) = if qtype == QType::Q4K {
                        unpack_q4k_sub_block(&data[(row * cols / 256 + b / 8) * bb..][..bb], b % 8, dst)
                    } else if qtype == QType::Q5K {
                        unpack_q5k_sub_block(&data[(row * cols / 256 + b / 8) * bb..][..bb], b % 8, dst)
                    } else if qtype == QType::Q3K {
                        unpack_q3k_sub_block(&data[(row * cols / 256 + b / 8) * bb..][..bb], b % 8, dst)
                    } else if qtype == QType::Q6K {
                        unpack_q6k_sub_block(&data[(row * cols / 256 + b / 8) * bb..][..bb], b % 8, dst)
                    } else {
                        let blk = &data[(row * nb + b) * bb..(row * nb + b + 1) * bb];
                        let d = f16_at(blk, 0);
                        match qtype {
                            QType::Q5_0 | QType::Q5_1 => {
                                // GGUF's layout is already the 5-bit form: nibbles (value i low, i + 16
                                // high) and bit j of qh the fifth bit of value j.
                                let off = if qtype == QType::Q5_0 { 2 } else { 4 };
                                dst[..16].copy_from_slice(&blk[off + 4..off + 20]);
                                dst[16..20].copy_from_slice(&blk[off..off + 4]);
                                let m = if qtype == QType::Q5_0 { -16.0 * d } else { f16_at(blk, 2) };
                                (d, m)
                            }
                            _ => {
                                let (m, q) = match qtype {
                                    QType::Q4_0 => (-8.0 * d, &blk[2..18]),
                                    QType::Q4_1 => (f16_at(blk, 2), &blk[4..20]),
                                    _ => (0.0, &blk[2..34]),
                                };
                                dst.copy_from_slice(q);
                                (d, m)
                            }
                        }
                    };
                    [d, m, 0.0, 0.0]
                };
                for (k, &v) in vals[..slots].iter().enumerate() {
                    scales[(gb * slots + k) * NR + r] = v;
                }
            }
        }
        Ok(Self { qtype, rows, cols, scales, qs })
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

    /// `out[m, rows] = x[m, cols] · Wᵀ` with the best instruction set.
    pub fn matmul(&self, x: &[f32], m: usize, out: &mut [f32]) {
        self.matmul_with(Isa::detect(), x, m, out)
    }

    /// The same, with a chosen instruction set (which the CPU must support).
    pub fn matmul_with(&self, isa: Isa, x: &[f32], m: usize, out: &mut [f32]) {
        matmul_many_with(isa, &[self], x, m, &mut [out]);
    }

    /// Row groups `g0..g1` for all `m` tokens of the quantized activations `acts`, written to
    /// `dst` (`[m, rows]`).
    fn run_groups(&self, isa: Isa, acts: &[BlockQ8], m: usize, g0: usize, g1: usize, dst: OutPtr) {
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
        }
    }
}

/// [`quantize_row_q8`] of a whole activation matrix, rows of blocks spread over the kernels' pool.
fn quantize_parallel(x: &[f32]) -> Vec<BlockQ8> {
    let n = x.len() / QK;
    let mut out = vec![BlockQ8 { qs: [0; QK], d: 0.0, s: 0.0, s0: 0.0 }; n];
    let per = 64;
    let dst = BlockPtr(out.as_mut_ptr());
    crate::cpu::pool::Pool::global().run(n.div_ceil(per), &|c| {
        for i in c * per..((c + 1) * per).min(n) {
            // SAFETY: block i is in bounds and written by this task only.
            unsafe { *dst.at(i) = quantize_block(&x[i * QK..(i + 1) * QK]) };
        }
    });
    out
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
/// per weight).
pub fn matmul_many(ws: &[&QWeight], x: &[f32], m: usize, outs: &mut [&mut [f32]]) {
    matmul_many_with(Isa::detect(), ws, x, m, outs)
}

/// [`matmul_many`] with a chosen instruction set (which the CPU must support).
pub fn matmul_many_with(isa: Isa, ws: &[&QWeight], x: &[f32], m: usize, outs: &mut [&mut [f32]]) {
    assert_eq!(ws.len(), outs.len(), "one output per weight");
    let Some(cols) = ws.first().map(|w| w.cols) else { return };
    assert!(ws.iter().all(|w| w.cols == cols), "weights must share the input size");
    assert_eq!(x.len(), m * cols, "x must be [m, cols]");
    for (w, o) in ws.iter().zip(outs.iter()) {
        assert_eq!(o.len(), m * w.rows, "out must be [m, rows]");
    }
    let acts: Vec<BlockQ8> = if m >= 16 { quantize_parallel(x) } else { x.chunks_exact(QK).map(quantize_block).collect() };
    let total: usize = ws.iter().map(|w| w.rows.div_ceil(NR)).sum();
    let pool = crate::cpu::pool::Pool::global();
    let chunk = (total / (pool.threads() * 4)).clamp(1, 64);
    // Tasks: (weight, first group, end group); each writes only its own rows of its output.
    let mut tasks = Vec::new();
    for (i, w) in ws.iter().enumerate() {
        let groups = w.rows.div_ceil(NR);
        tasks.extend((0..groups).step_by(chunk).map(|g0| (i, g0, (g0 + chunk).min(groups))));
    }
    let dsts: Vec<OutPtr> = outs.iter_mut().map(|o| OutPtr(o.as_mut_ptr())).collect();
    pool.run(tasks.len(), &|k| {
        let (i, g0, g1) = tasks[k];
        ws[i].run_groups(isa, &acts, m, g0, g1, dsts[i]);
    });
}

#[inline]
fn f16_at(b: &[u8], i: usize) -> f32 {
    f16::from_le_bytes([b[i], b[i + 1]]).to_f32()
}

/// Sub-block `j` (0..8) of a Q4_K super-block: writes its 32 quants in the Q4_1 nibble order
/// (byte i: value i low, value i+16 high) and returns its (scale, minimum) as value = d·q + m.
fn unpack_q4k_sub_block(blk: &[u8], j: usize, dst: &mut [u8]) -> (f32, f32) {
    let (d, dmin) = (f16_at(blk, 0), f16_at(blk, 2));
    let (s, m) = k_scale_min(&blk[4..16], j);
    let q = &blk[16 + 32 * (j / 2)..16 + 32 * (j / 2) + 32];
    let v = |l: usize| if j.is_multiple_of(2) { q[l] & 0x0F } else { q[l] >> 4 };
    for (i, byte) in dst.iter_mut().enumerate() {
        *byte = v(i) | (v(i + 16) << 4);
    }
    (d * s as f32, -dmin * m as f32)
}

/// The 6-bit scale and minimum of sub-block `j` (0..8) from the 12 packed bytes of Q4_K / Q5_K.
fn k_scale_min(sc: &[u8], j: usize) -> (u8, u8) {
    if j < 4 {
        (sc[j] & 63, sc[j + 4] & 63)
    } else {
        ((sc[j + 4] & 0x0F) | ((sc[j - 4] >> 6) << 4), (sc[j + 4] >> 4) | ((sc[j] >> 6) << 4))
    }
}

/// Sub-block `j` (0..8) of a Q5_K super-block: writes its 32 values in the 5-bit form (nibbles in
/// the Q4_1 order, then the fifth bits as a little-endian u32) and returns (scale, minimum) as
/// value = d·q5 + m.
fn unpack_q5k_sub_block(blk: &[u8], j: usize, dst: &mut [u8]) -> (f32, f32) {
    let (d, dmin) = (f16_at(blk, 0), f16_at(blk, 2));
    let (s, m) = k_scale_min(&blk[4..16], j);
    let qh = &blk[16..48];
    let ql = &blk[48 + 32 * (j / 2)..48 + 32 * (j / 2) + 32];
    let low = |l: usize| if j.is_multiple_of(2) { ql[l] & 0x0F } else { ql[l] >> 4 };
    let high = qh.iter().enumerate().fold(0u32, |h, (l, &b)| h | (((b >> j) & 1) as u32) << l);
    for (i, byte) in dst[..16].iter_mut().enumerate() {
        *byte = low(i) | (low(i + 16) << 4);
    }
    dst[16..20].copy_from_slice(&high.to_le_bytes());
    (d * s as f32, -dmin * m as f32)
}

/// Sub-block `b` (0..8) of a Q2_K super-block: writes its 32 values (0..=3) as bytes and returns
/// `[scale, scale, minimum, minimum]` of its two halves, as value = scale·q + minimum.
fn unpack_q2k_sub_block(blk: &[u8], b: usize, dst: &mut [u8]) -> [f32; 4] {
    let (sc, qs) = (&blk[0..16], &blk[16..80]);
    let (d, dmin) = (f16_at(blk, 80), f16_at(blk, 82));
    let (n, j) = (b / 4, b % 4);
    for (l, out) in dst.iter_mut().enumerate() {
        *out = (qs[32 * n + l] >> (2 * j)) & 3;
    }
    let (s0, s1) = (sc[2 * b], sc[2 * b + 1]);
    [d * (s0 & 0x0F) as f32, d * (s1 & 0x0F) as f32, -dmin * (s0 >> 4) as f32, -dmin * (s1 >> 4) as f32]
}

/// Sub-block `b` (0..8) of a Q3_K super-block: writes its 32 values as signed bytes (−4..=3) and
/// returns the scales of its two halves (values 0..16 and 16..32).
fn unpack_q3k_sub_block(blk: &[u8], b: usize, dst: &mut [u8]) -> (f32, f32) {
    let (hmask, qs, sc) = (&blk[0..32], &blk[32..96], &blk[96..108]);
    let d = f16_at(blk, 108);
    // 16 six-bit scales: low 4 bits from bytes 0..8 (low nibble for 0..8, high for 8..16), high
    // 2 bits from bytes 8..12.
    let scale = |i: usize| -> f32 {
        let low = if i < 8 { sc[i] & 0x0F } else { sc[i - 8] >> 4 };
        let high = (sc[8 + i % 4] >> (2 * (i / 4))) & 3;
        ((low | (high << 4)) as i32 - 32) as f32
    };
    let (n, j) = (b / 4, b % 4);
    let q = &qs[32 * n..32 * n + 32];
    let bit = 1u8 << (4 * n + j);
    for (l, out) in dst.iter_mut().enumerate() {
        let low = ((q[l] >> (2 * j)) & 3) as i8;
        *out = (low - if hmask[l] & bit != 0 { 0 } else { 4 }) as u8;
    }
    (d * scale(2 * b), d * scale(2 * b + 1))
}

/// Sub-block `j` (0..8) of a Q6_K super-block: writes its 32 values as signed bytes (q6 − 32) and
/// returns the scales of its two halves (values 0..16 and 16..32).
fn unpack_q6k_sub_block(blk: &[u8], j: usize, dst: &mut [u8]) -> (f32, f32) {
    let (n, k) = (j / 4, j % 4);
    let ql = &blk[n * 64..n * 64 + 64];
    let qh = &blk[128 + n * 32..128 + n * 32 + 32];
    let sc = &blk[192 + n * 8..192 + n * 8 + 8];
    let d = f16_at(blk, 208);
    for (l, out) in dst.iter_mut().enumerate() {
        let low = match k {
            0 => ql[l] & 0x0F,
            1 => ql[l + 32] & 0x0F,
            2 => ql[l] >> 4,
            _ => ql[l + 32] >> 4,
        };
        let high = (qh[l] >> (2 * k)) & 3;
        *out = ((low | (high << 4)) as i8 - 32) as u8;
    }
    (d * sc[2 * k] as i8 as f32, d * sc[2 * k + 1] as i8 as f32)
}

/// The portable reference kernels.
pub mod scalar {
    use super::*;

    /// One weight row (in `qt` blocks, GGUF layout) · one quantized activation row (test reference).
    #[cfg(test)]
    #[allow(clippy::needless_range_loop)]
    pub fn dot(qt: QType, w: &[u8], a: &[BlockQ8]) -> f32 {
        let bb = qt.block_bytes();
        let mut sum = 0f32;
        for (blk, ab) in w.chunks_exact(bb).zip(a) {
            let d = f16_at(blk, 0);
            match qt {
                QType::Q4_0 | QType::Q4_1 => {
                    let qs = if qt == QType::Q4_0 { &blk[2..18] } else { &blk[4..20] };
                    let mut isum = 0i32;
                    for j in 0..16 {
                        isum += (qs[j] & 0x0F) as i32 * ab.qs[j] as i32 + (qs[j] >> 4) as i32 * ab.qs[j + 16] as i32;
                    }
                    let m = if qt == QType::Q4_0 { -8.0 * d } else { f16_at(blk, 2) };
                    sum += d * ab.d * isum as f32 + m * ab.s;
                }
                QType::Q8_0 => {
                    let isum: i32 = blk[2..34].iter().zip(&ab.qs).map(|(&q, &x)| q as i8 as i32 * x as i32).sum();
                    sum += d * ab.d * isum as f32;
                }
                _ => unreachable!("the GGUF-layout reference covers Q4_0, Q4_1, Q8_0"),
            }
        }
        sum
    }

    /// The packed-layout tile (see [`QWeight`]): four weight rows × `r` activation rows.
    pub fn tile(qt: QType, scales: &[f32], qs: &[u8], a: &[BlockQ8], nb: usize, r: usize, o: &mut [[f32; MR]; NR]) {
        let qb = qt.quant_bytes();
        let sn = qt.scale_slots() * NR;
        for b in 0..nb {
            let sc = &scales[b * sn..(b + 1) * sn];
            for (wr, orow) in o.iter_mut().enumerate() {
                let q = &qs[(b * NR + wr) * qb..(b * NR + wr + 1) * qb];
                for (t, ov) in orow.iter_mut().enumerate().take(r) {
                    let ab = &a[t * nb + b];
                    if qt.half_scales() {
                        let half = |h: usize| -> i32 { (16 * h..16 * h + 16).map(|i| q[i] as i8 as i32 * ab.qs[i] as i32).sum() };
                        *ov += sc[wr] * ab.d * half(0) as f32 + sc[NR + wr] * ab.d * half(1) as f32;
                        if sn == 4 * NR {
                            *ov += sc[2 * NR + wr] * ab.s0 + sc[3 * NR + wr] * (ab.s - ab.s0);
                        }
                        continue;
                    }
                    let isum: i32 = if qt.byte_quants() {
                        q.iter().zip(&ab.qs).map(|(&w, &x)| w as i8 as i32 * x as i32).sum()
                    } else if qt.five_bit() {
                        let qh = u32::from_le_bytes([q[16], q[17], q[18], q[19]]);
                        let v = |i: usize| {
                            let nib = if i < 16 { q[i] & 0x0F } else { q[i - 16] >> 4 };
                            (nib as u32 | ((qh >> i) & 1) << 4) as i32
                        };
                        (0..32).map(|i| v(i) * ab.qs[i] as i32).sum()
                    } else {
                        (0..16).map(|j| (q[j] & 0x0F) as i32 * ab.qs[j] as i32 + (q[j] >> 4) as i32 * ab.qs[j + 16] as i32).sum()
                    };
                    *ov += sc[wr] * ab.d * isum as f32 + sc[NR + wr] * ab.s;
                }
            }
        }
    }

    /// Dequantizes a whole row (test reference).
    #[cfg(test)]
    pub fn dequantize_row(qt: QType, w: &[u8], out: &mut Vec<f32>) {
        for blk in w.chunks_exact(qt.block_bytes()) {
            let d = f16_at(blk, 0);
            match qt {
                QType::Q4_0 | QType::Q4_1 => {
                    let (qs, m) = if qt == QType::Q4_0 { (&blk[2..18], -8.0 * d) } else { (&blk[4..20], f16_at(blk, 2)) };
                    out.extend(qs.iter().map(|&q| d * (q & 0x0F) as f32 + m));
                    out.extend(qs.iter().map(|&q| d * (q >> 4) as f32 + m));
                }
                QType::Q8_0 => out.extend(blk[2..34].iter().map(|&q| d * q as i8 as f32)),
                _ => unreachable!("the GGUF-layout reference covers Q4_0, Q4_1, Q8_0"),
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
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
    pub unsafe fn tile_vnni(qt: QType, scales: &[f32], qs: &[u8], a: &[BlockQ8], nb: usize, r: usize, o: &mut [[f32; MR]; NR]) {
        tile_body::<true>(qt, scales, qs, a, nb, r, o)
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn tile(qt: QType, scales: &[f32], qs: &[u8], a: &[BlockQ8], nb: usize, r: usize, o: &mut [[f32; MR]; NR]) {
        tile_body::<false>(qt, scales, qs, a, nb, r, o)
    }

    #[inline(always)]
    unsafe fn tile_body<const VNNI: bool>(
        qt: QType,
        scales: &[f32],
        qs: &[u8],
        a: &[BlockQ8],
        nb: usize,
        r: usize,
        o: &mut [[f32; MR]; NR],
    ) {
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
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A deterministic pseudo-random generator (no dependency needed).
    struct Lcg(u64);
    impl Lcg {
        fn next(&mut self) -> u32 {
            self.0 = self.0.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            (self.0 >> 33) as u32
        }
        fn f(&mut self) -> f32 {
            self.next() as f32 / (1u64 << 31) as f32 * 2.0 - 1.0
        }
    }

    fn random_weight(qt: QType, rows: usize, cols: usize, rng: &mut Lcg) -> (QWeight, Vec<u8>) {
        let mut data = Vec::new();
        for _ in 0..rows * cols / QK {
            let d = f16::from_f32(0.01 + 0.05 * rng.f().abs());
            data.extend(d.to_le_bytes());
            if qt == QType::Q4_1 {
                data.extend(f16::from_f32(0.1 * rng.f()).to_le_bytes());
            }
            let n = if qt == QType::Q8_0 { 32 } else { 16 };
            data.extend((0..n).map(|_| rng.next() as u8));
        }
        (QWeight::new(qt, rows, cols, data.clone()).unwrap(), data)
    }

    /// Every ISA path's `x · wᵀ` against the f64 product with the dequantized weights `wd`: with
    /// 8-bit activations the error stays well under 1% of Σ|x·w|.
    fn assert_every_path_matches(w: &QWeight, wd: &[f32], x: &[f32], m: usize) {
        let (qt, rows, cols) = (w.qtype(), w.rows(), w.cols());
        for isa in Isa::available() {
            let mut out = vec![0f32; m * rows];
            w.matmul_with(isa, x, m, &mut out);
            for t in 0..m {
                for r in 0..rows {
                    let exact: f64 = (0..cols).map(|k| x[t * cols + k] as f64 * wd[r * cols + k] as f64).sum();
                    let scale: f64 = (0..cols).map(|k| (x[t * cols + k] as f64 * wd[r * cols + k] as f64).abs()).sum();
                    let got = out[t * rows + r] as f64;
                    assert!(
                        (got - exact).abs() <= 0.01 * scale + 1e-5,
                        "{qt:?} {isa:?} [{rows}x{cols}] m={m} t={t} r={r}: {got} vs {exact}"
                    );
                }
            }
        }
    }

    #[test]
    fn every_path_matches_the_f32_product_of_dequantized_weights() {
        let mut rng = Lcg(7);
        for qt in [QType::Q4_0, QType::Q4_1, QType::Q8_0] {
            // Odd shapes: rows not a multiple of the chunk or of 4, token counts 1..=9.
            for (rows, cols, m) in [(1, 32, 1), (7, 64, 3), (33, 96, 5), (300, 256, 9), (5, 1024, 4), (17, 32, 2)] {
                let (w, raw) = random_weight(qt, rows, cols, &mut rng);
                let x: Vec<f32> = (0..m * cols).map(|_| rng.f() * 3.0).collect();
                // Reference: dequantize W from its GGUF bytes, multiply in f64.
                let mut wd = Vec::new();
                let rb = cols / QK * qt.block_bytes();
                for r in 0..rows {
                    scalar::dequantize_row(qt, &raw[r * rb..(r + 1) * rb], &mut wd);
                }
                assert_every_path_matches(&w, &wd, &x, m);
            }
        }
    }

    #[test]
    fn simd_paths_equal_the_scalar_path() {
        let mut rng = Lcg(11);
        for qt in [QType::Q4_0, QType::Q4_1, QType::Q8_0] {
            let (rows, cols, m) = (70, 320, 7);
            let (w, raw) = random_weight(qt, rows, cols, &mut rng);
            let x: Vec<f32> = (0..m * cols).map(|_| rng.f()).collect();
            // The GGUF-layout scalar dot product agrees with the packed kernels.
            let nb = cols / QK;
            let mut acts = Vec::new();
            quantize_row_q8(&x[..cols], &mut acts);
            let rb = nb * qt.block_bytes();
            let mut first = vec![0f32; m * rows];
            w.matmul_with(Isa::Scalar, &x, m, &mut first);
            for r in 0..rows {
                let d = scalar::dot(qt, &raw[r * rb..(r + 1) * rb], &acts);
                assert!((d - first[r]).abs() <= 1e-4 * d.abs().max(1.0), "{qt:?} row {r}: {d} vs {}", first[r]);
            }
            let mut want = vec![0f32; m * rows];
            w.matmul_with(Isa::Scalar, &x, m, &mut want);
            for isa in Isa::available() {
                let mut got = vec![0f32; m * rows];
                w.matmul_with(isa, &x, m, &mut got);
                for (g, e) in got.iter().zip(&want) {
                    assert!((g - e).abs() <= 1e-4 * e.abs().max(1.0), "{qt:?} {isa:?}: {g} vs {e}");
                }
            }
        }
    }

    #[test]
    fn repacked_formats_match_candles_dequantization() {
        use candle_core::quantized::{GgmlDType, QTensor};
        use candle_core::{Device, Tensor};
        let mut rng = Lcg(5);
        for ((rows, cols, m), (gt, qt)) in [(6, 256, 3), (33, 512, 5)].into_iter().flat_map(|s| {
            [
                (GgmlDType::Q4K, QType::Q4K),
                (GgmlDType::Q5K, QType::Q5K),
                (GgmlDType::Q6K, QType::Q6K),
                (GgmlDType::Q3K, QType::Q3K),
                (GgmlDType::Q2K, QType::Q2K),
                (GgmlDType::Q5_0, QType::Q5_0),
                (GgmlDType::Q5_1, QType::Q5_1),
            ]
            .map(|t| (s, t))
        }) {
            // Magnitudes that change every 16 values, so each (sub-)block scale matters.
            let w: Vec<f32> = (0..rows * cols).map(|i| (rng.f() + 0.3) * [0.2, 1.0, 4.0][(i / 16) % 3]).collect();
            let q = QTensor::quantize(&Tensor::from_vec(w, (rows, cols), &Device::Cpu).unwrap(), gt).unwrap();
            let wd: Vec<f32> = q.dequantize(&Device::Cpu).unwrap().flatten_all().unwrap().to_vec1().unwrap();
            let kw = QWeight::new(qt, rows, cols, q.data().unwrap().into_owned()).unwrap();
            let x: Vec<f32> = (0..m * cols).map(|_| rng.f() * 2.0).collect();
            assert_every_path_matches(&kw, &wd, &x, m);
        }
    }

    #[test]
    fn grouped_matmul_equals_separate_matmuls() {
        let mut rng = Lcg(13);
        let (cols, m) = (256, 5);
        let parts = [(QType::Q4_1, 36), (QType::Q8_0, 9), (QType::Q4_0, 70)];
        let ws: Vec<QWeight> = parts.iter().map(|&(qt, rows)| random_weight(qt, rows, cols, &mut rng).0).collect();
        let x: Vec<f32> = (0..m * cols).map(|_| rng.f()).collect();
        for isa in Isa::available() {
            let mut outs: Vec<Vec<f32>> = ws.iter().map(|w| vec![f32::NAN; m * w.rows()]).collect();
            let mut refs: Vec<&mut [f32]> = outs.iter_mut().map(|o| o.as_mut_slice()).collect();
            matmul_many_with(isa, &ws.iter().collect::<Vec<_>>(), &x, m, &mut refs);
            for (w, got) in ws.iter().zip(&outs) {
                let mut want = vec![0f32; m * w.rows()];
                w.matmul_with(isa, &x, m, &mut want);
                assert_eq!(got, &want, "{:?} {isa:?}", w.qtype());
            }
        }
    }

    #[test]
    fn bad_sizes_are_refused() {
        assert!(QWeight::new(QType::Q4_1, 2, 30, vec![0; 40]).unwrap_err().contains("multiple of 32"));
        assert!(QWeight::new(QType::Q8_0, 2, 32, vec![0; 10]).unwrap_err().contains("needs 68 bytes"));
    }
}
