//! Quantized matrix multiplication on the CPU: `y = x Wᵀ` with `W` in GGUF block formats (Q4_0,
//! Q4_1, Q8_0) kept as loaded, `x` in f32.
//!
//! The activations are quantized once per call to 8-bit blocks of 32 (a scale, the integer sum, 32
//! signed bytes); each output is then a sum over blocks of integer dot products scaled in f32. Rows of
//! `x` are processed four at a time against each weight block, so a weight block is loaded and
//! unpacked once for four tokens (prefill and batched decode), and output rows are split across the
//! rayon pool. The AVX2+FMA path is chosen at run time when the CPU has it; a portable scalar path
//! is the reference and the fallback.

use half::f16;
use rayon::prelude::*;

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
}

impl QType {
    /// Bytes of one block of 32 values.
    pub fn block_bytes(self) -> usize {
        match self {
            QType::Q4_0 => 18,
            QType::Q4_1 => 20,
            QType::Q8_0 => 34,
        }
    }
}

/// Which instruction set a kernel call uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Isa {
    Scalar,
    #[cfg(target_arch = "x86_64")]
    Avx2,
}

impl Isa {
    /// The best the running CPU supports.
    pub fn detect() -> Isa {
        #[cfg(target_arch = "x86_64")]
        if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") && std::is_x86_feature_detected!("f16c") {
            return Isa::Avx2;
        }
        Isa::Scalar
    }

    /// Every path this CPU can run (for tests).
    pub fn available() -> Vec<Isa> {
        let mut v = vec![Isa::Scalar];
        #[cfg(target_arch = "x86_64")]
        if Isa::detect() == Isa::Avx2 {
            v.push(Isa::Avx2);
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
}

/// Quantizes `x` (length a multiple of 32) to 8-bit blocks, appending to `out`.
pub fn quantize_row_q8(x: &[f32], out: &mut Vec<BlockQ8>) {
    debug_assert_eq!(x.len() % QK, 0);
    for chunk in x.chunks_exact(QK) {
        let amax = chunk.iter().fold(0f32, |m, v| m.max(v.abs()));
        let d = amax / 127.0;
        let id = if d > 0.0 { 1.0 / d } else { 0.0 };
        let mut qs = [0i8; QK];
        let mut isum = 0i32;
        for (q, &v) in qs.iter_mut().zip(chunk) {
            *q = (v * id).round() as i8;
            isum += *q as i32;
        }
        out.push(BlockQ8 { qs, d, s: d * isum as f32 });
    }
}

/// A weight matrix `[rows, cols]` in a block format, row-major, as stored in GGUF.
#[derive(Clone)]
pub struct QWeight {
    qtype: QType,
    rows: usize,
    cols: usize,
    data: Vec<u8>,
}

impl std::fmt::Debug for QWeight {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QWeight").field("qtype", &self.qtype).field("rows", &self.rows).field("cols", &self.cols).finish()
    }
}

/// Rows of `x` handled together against each weight block.
const MR: usize = 4;

impl QWeight {
    /// Wraps GGUF block data; checks the size.
    pub fn new(qtype: QType, rows: usize, cols: usize, data: Vec<u8>) -> Result<Self, String> {
        if cols % QK != 0 {
            return Err(format!("{qtype:?} weight with {cols} columns: the row length must be a multiple of {QK}"));
        }
        let want = rows * cols / QK * qtype.block_bytes();
        if data.len() != want {
            return Err(format!("{qtype:?} weight [{rows}, {cols}] needs {want} bytes, got {}", data.len()));
        }
        Ok(Self { qtype, rows, cols, data })
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

    fn row_bytes(&self) -> usize {
        self.cols / QK * self.qtype.block_bytes()
    }

    /// `out[m, rows] = x[m, cols] · Wᵀ` with the best instruction set.
    pub fn matmul(&self, x: &[f32], m: usize, out: &mut [f32]) {
        self.matmul_with(Isa::detect(), x, m, out)
    }

    /// The same, with a chosen instruction set (which the CPU must support).
    pub fn matmul_with(&self, isa: Isa, x: &[f32], m: usize, out: &mut [f32]) {
        assert_eq!(x.len(), m * self.cols, "x must be [m, cols]");
        assert_eq!(out.len(), m * self.rows, "out must be [m, rows]");
        let nb = self.cols / QK;
        let mut acts = Vec::with_capacity(m * nb);
        for r in x.chunks_exact(self.cols) {
            quantize_row_q8(r, &mut acts);
        }
        // Each task computes a run of output rows for all m tokens into a [rows_chunk, m] buffer.
        let chunk = (self.rows / (rayon::current_num_threads() * 4)).clamp(16, 256);
        let row_bytes = self.row_bytes();
        let parts: Vec<(usize, Vec<f32>)> = (0..self.rows.div_ceil(chunk))
            .into_par_iter()
            .map(|c| {
                let r0 = c * chunk;
                let r1 = (r0 + chunk).min(self.rows);
                let mut buf = vec![0f32; (r1 - r0) * m];
                for r in r0..r1 {
                    let w = &self.data[r * row_bytes..(r + 1) * row_bytes];
                    let dst = &mut buf[(r - r0) * m..(r - r0 + 1) * m];
                    for (g, d) in dst.chunks_mut(MR).enumerate() {
                        let a = &acts[g * MR * nb..];
                        dot_rows(isa, self.qtype, w, a, nb, d);
                    }
                }
                (r0, buf)
            })
            .collect();
        for (r0, buf) in parts {
            let n = buf.len() / m;
            for i in 0..n {
                for t in 0..m {
                    out[t * self.rows + r0 + i] = buf[i * m + t];
                }
            }
        }
    }
}

/// Dots one weight row with `out.len()` (≤ MR) activation rows laid out one after another (`nb`
/// blocks each) from the start of `a`.
fn dot_rows(isa: Isa, qt: QType, w: &[u8], a: &[BlockQ8], nb: usize, out: &mut [f32]) {
    match isa {
        Isa::Scalar => {
            for (t, o) in out.iter_mut().enumerate() {
                *o = scalar::dot(qt, w, &a[t * nb..(t + 1) * nb]);
            }
        }
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `Isa::Avx2` is only produced when the CPU reports AVX2, FMA and F16C.
        Isa::Avx2 => unsafe { avx2::dot_rows(qt, w, a, nb, out) },
    }
}

#[inline]
fn f16_at(b: &[u8], i: usize) -> f32 {
    f16::from_le_bytes([b[i], b[i + 1]]).to_f32()
}

/// The portable reference kernels.
pub mod scalar {
    use super::*;

    /// One weight row (in `qt` blocks) · one quantized activation row.
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
            }
        }
        sum
    }

    /// Dequantizes a whole row (for references).
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
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use super::*;

    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn hsum(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_movehdup_ps(s));
        _mm_cvtss_f32(s)
    }

    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn f16_to_f32(p: *const u8) -> f32 {
        let bits = u16::from_le_bytes([*p, *p.add(1)]);
        _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(bits as i32)))
    }

    /// 16 bytes of packed nibbles → 32 unsigned bytes (low nibbles first, then high), GGUF order.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn unpack_nibbles(p: *const u8) -> __m256i {
        let q = _mm_loadu_si128(p as *const __m128i);
        let mask = _mm_set1_epi8(0x0F);
        let lo = _mm_and_si128(q, mask);
        let hi = _mm_and_si128(_mm_srli_epi16(q, 4), mask);
        _mm256_set_m128i(hi, lo)
    }

    /// Σ over 32 lanes of u8 · i8 as 8 i32 lanes converted to f32.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn dot_u8_i8(u: __m256i, s: __m256i) -> __m256 {
        let p16 = _mm256_maddubs_epi16(u, s);
        _mm256_cvtepi32_ps(_mm256_madd_epi16(p16, _mm256_set1_epi16(1)))
    }

    pub unsafe fn dot_rows(qt: QType, w: &[u8], a: &[BlockQ8], nb: usize, out: &mut [f32]) {
        debug_assert!(out.len() <= MR && a.len() >= out.len() * nb && w.len() == nb * qt.block_bytes());
        match (qt, out.len()) {
            (QType::Q4_0, 1) => kernel::<1, 0>(w, a, nb, out),
            (QType::Q4_0, 2) => kernel::<2, 0>(w, a, nb, out),
            (QType::Q4_0, 3) => kernel::<3, 0>(w, a, nb, out),
            (QType::Q4_0, _) => kernel::<4, 0>(w, a, nb, out),
            (QType::Q4_1, 1) => kernel::<1, 1>(w, a, nb, out),
            (QType::Q4_1, 2) => kernel::<2, 1>(w, a, nb, out),
            (QType::Q4_1, 3) => kernel::<3, 1>(w, a, nb, out),
            (QType::Q4_1, _) => kernel::<4, 1>(w, a, nb, out),
            (QType::Q8_0, 1) => kernel::<1, 2>(w, a, nb, out),
            (QType::Q8_0, 2) => kernel::<2, 2>(w, a, nb, out),
            (QType::Q8_0, 3) => kernel::<3, 2>(w, a, nb, out),
            (QType::Q8_0, _) => kernel::<4, 2>(w, a, nb, out),
        }
    }

    /// `R` activation rows against one weight row of format `Q` (0: Q4_0, 1: Q4_1, 2: Q8_0); the
    /// accumulators stay in registers (R and Q are constants).
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn kernel<const R: usize, const Q: u8>(w: &[u8], a: &[BlockQ8], nb: usize, out: &mut [f32]) {
        let bb = match Q {
            0 => 18,
            1 => 20,
            _ => 34,
        };
        let mut acc = [_mm256_setzero_ps(); R];
        let mut extra = [0f32; R];
        let wp = w.as_ptr();
        let ap = a.as_ptr();
        for b in 0..nb {
            let blk = wp.add(b * bb);
            let d = f16_to_f32(blk);
            if Q == 2 {
                let wq = _mm256_loadu_si256(blk.add(2) as *const __m256i);
                let wabs = _mm256_sign_epi8(wq, wq);
                for t in 0..R {
                    let ab = &*ap.add(t * nb + b);
                    let aq = _mm256_load_si256(ab.qs.as_ptr() as *const __m256i);
                    let s = _mm256_sign_epi8(aq, wq);
                    acc[t] = _mm256_fmadd_ps(_mm256_set1_ps(d * ab.d), dot_u8_i8(wabs, s), acc[t]);
                }
            } else {
                let wq = unpack_nibbles(blk.add(if Q == 0 { 2 } else { 4 }));
                let m = if Q == 0 { -8.0 * d } else { f16_to_f32(blk.add(2)) };
                for t in 0..R {
                    let ab = &*ap.add(t * nb + b);
                    let aq = _mm256_load_si256(ab.qs.as_ptr() as *const __m256i);
                    acc[t] = _mm256_fmadd_ps(_mm256_set1_ps(d * ab.d), dot_u8_i8(wq, aq), acc[t]);
                    extra[t] += m * ab.s;
                }
            }
        }
        for t in 0..R {
            out[t] = hsum(acc[t]) + extra[t];
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

    fn random_weight(qt: QType, rows: usize, cols: usize, rng: &mut Lcg) -> QWeight {
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
        QWeight::new(qt, rows, cols, data).unwrap()
    }

    #[test]
    fn every_path_matches_the_f32_product_of_dequantized_weights() {
        let mut rng = Lcg(7);
        for qt in [QType::Q4_0, QType::Q4_1, QType::Q8_0] {
            // Odd shapes: rows not a multiple of the chunk or of 4, token counts 1..=9.
            for (rows, cols, m) in [(1, 32, 1), (7, 64, 3), (33, 96, 5), (300, 256, 9), (5, 1024, 4), (17, 32, 2)] {
                let w = random_weight(qt, rows, cols, &mut rng);
                let x: Vec<f32> = (0..m * cols).map(|_| rng.f() * 3.0).collect();
                // Reference: dequantize W, multiply in f64.
                let mut wd = Vec::new();
                for r in 0..rows {
                    scalar::dequantize_row(qt, &w.data[r * w.row_bytes()..(r + 1) * w.row_bytes()], &mut wd);
                }
                for isa in Isa::available() {
                    let mut out = vec![0f32; m * rows];
                    w.matmul_with(isa, &x, m, &mut out);
                    for t in 0..m {
                        for r in 0..rows {
                            let exact: f64 = (0..cols).map(|k| x[t * cols + k] as f64 * wd[r * cols + k] as f64).sum();
                            let scale: f64 = (0..cols).map(|k| (x[t * cols + k] as f64 * wd[r * cols + k] as f64).abs()).sum();
                            let got = out[t * rows + r] as f64;
                            // 8-bit activations: error well under 1% of Σ|x·w|.
                            assert!((got - exact).abs() <= 0.01 * scale + 1e-5, "{qt:?} {isa:?} [{rows}x{cols}] m={m} t={t} r={r}: {got} vs {exact}");
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn simd_paths_equal_the_scalar_path() {
        let mut rng = Lcg(11);
        for qt in [QType::Q4_0, QType::Q4_1, QType::Q8_0] {
            let (rows, cols, m) = (70, 320, 7);
            let w = random_weight(qt, rows, cols, &mut rng);
            let x: Vec<f32> = (0..m * cols).map(|_| rng.f()).collect();
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
    fn bad_sizes_are_refused() {
        assert!(QWeight::new(QType::Q4_1, 2, 30, vec![0; 40]).unwrap_err().contains("multiple of 32"));
        assert!(QWeight::new(QType::Q8_0, 2, 32, vec![0; 10]).unwrap_err().contains("needs 68 bytes"));
    }
}
