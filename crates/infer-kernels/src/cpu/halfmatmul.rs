//! Matrix multiplication with 16-bit float weights (GGUF F16 or BF16) on the CPU: `y = x Wᵀ`, the
//! weights kept in 16 bits (half the memory traffic of f32) and widened in registers. Row chunks are
//! split over the rayon pool; each row is multiplied with up to four tokens at once so a weight
//! vector is loaded and converted once per four tokens. AVX2+FMA+F16C at run time, scalar otherwise.

use half::{bf16, f16};
use rayon::prelude::*;

use crate::cpu::qmatmul::{Isa, OutPtr};

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
    bits: Vec<u16>,
}

impl std::fmt::Debug for HalfWeight {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HalfWeight").field("kind", &self.kind).field("rows", &self.rows).field("cols", &self.cols).finish()
    }
}

/// Tokens per pass over a weight row.
const TR: usize = 4;
/// Tokens whose activations are kept hot while a task's rows pass over them.
const TOKEN_BLOCK: usize = 16;

impl HalfWeight {
    /// Wraps little-endian 16-bit floats `[rows, cols]`; checks the size.
    pub fn new(kind: HalfKind, rows: usize, cols: usize, bytes: &[u8]) -> Result<Self, String> {
        if bytes.len() != rows * cols * 2 {
            return Err(format!("{kind:?} weight [{rows}, {cols}] needs {} bytes, got {}", rows * cols * 2, bytes.len()));
        }
        let bits = bytes.chunks_exact(2).map(|b| u16::from_le_bytes([b[0], b[1]])).collect();
        Ok(Self { kind, rows, cols, bits })
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

    /// The same with a chosen instruction set (which the CPU must support).
    pub fn matmul_with(&self, isa: Isa, x: &[f32], m: usize, out: &mut [f32]) {
        assert_eq!(x.len(), m * self.cols, "x must be [m, cols]");
        assert_eq!(out.len(), m * self.rows, "out must be [m, rows]");
        let (rows, cols) = (self.rows, self.cols);
        let chunk = (rows / (rayon::current_num_threads() * 4)).clamp(4, 256);
        let dst = OutPtr(out.as_mut_ptr());
        // Each task computes a run of rows for all m tokens, writing its rows of `out` directly.
        (0..rows.div_ceil(chunk)).into_par_iter().for_each(|c| {
            let r0 = c * chunk;
            let r1 = (r0 + chunk).min(rows);
            let mut o = [0f32; TR];
            // Token blocks outermost: a block of activations stays in cache while the task's rows
            // pass over it.
            for tb in (0..m).step_by(TOKEN_BLOCK) {
                let tb_end = (tb + TOKEN_BLOCK).min(m);
                for r in r0..r1 {
                    let w = &self.bits[r * cols..(r + 1) * cols];
                    let mut t0 = tb;
                    while t0 < tb_end {
                        let n = TR.min(tb_end - t0);
                        self.dot_rows(isa, w, &x[t0 * cols..], &mut o[..n]);
                        for (t, &v) in o[..n].iter().enumerate() {
                            // SAFETY: in bounds (t0 + t < m, r < rows); row r belongs to this task only.
                            unsafe { *dst.at((t0 + t) * rows + r) = v };
                        }
                        t0 += n;
                    }
                }
            }
        });
    }

    /// One weight row against `out.len()` (≤ 4) token rows starting at `xs`.
    fn dot_rows(&self, isa: Isa, w: &[u16], xs: &[f32], out: &mut [f32]) {
        match isa {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: every non-scalar Isa implies AVX2, FMA and F16C.
            Isa::Avx2 | Isa::Avx2Vnni => unsafe { avx2::dot_rows(self.kind, w, xs, self.cols, out) },
            _ => {
                let cols = self.cols;
                for (t, o) in out.iter_mut().enumerate() {
                    let xr = &xs[t * cols..(t + 1) * cols];
                    *o = match self.kind {
                        HalfKind::F16 => w.iter().zip(xr).map(|(&b, &v)| f16::from_bits(b).to_f32() * v).sum(),
                        HalfKind::Bf16 => w.iter().zip(xr).map(|(&b, &v)| bf16::from_bits(b).to_f32() * v).sum(),
                    };
                }
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

    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn dot_rows(kind: HalfKind, w: &[u16], xs: &[f32], cols: usize, out: &mut [f32]) {
        match out.len() {
            1 => kernel::<1>(kind, w, xs, cols, out),
            2 => kernel::<2>(kind, w, xs, cols, out),
            3 => kernel::<3>(kind, w, xs, cols, out),
            _ => kernel::<4>(kind, w, xs, cols, out),
        }
    }

    #[inline(always)]
    #[allow(clippy::needless_range_loop)]
    unsafe fn kernel<const R: usize>(kind: HalfKind, w: &[u16], xs: &[f32], cols: usize, out: &mut [f32]) {
        // Two accumulators per token hide the FMA latency.
        let mut acc = [[_mm256_setzero_ps(); 2]; R];
        let wp = w.as_ptr();
        let xp = xs.as_ptr();
        let full = cols / 16 * 16;
        let mut c = 0;
        while c < full {
            let w0 = load8(kind, wp.add(c));
            let w1 = load8(kind, wp.add(c + 8));
            for t in 0..R {
                let x = xp.add(t * cols + c);
                acc[t][0] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(x), acc[t][0]);
                acc[t][1] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(x.add(8)), acc[t][1]);
            }
            c += 16;
        }
        for t in 0..R {
            let mut s = hsum(_mm256_add_ps(acc[t][0], acc[t][1]));
            for k in full..cols {
                let wv = match kind {
                    HalfKind::F16 => half::f16::from_bits(w[k]).to_f32(),
                    HalfKind::Bf16 => half::bf16::from_bits(w[k]).to_f32(),
                };
                s += wv * xs[t * cols + k];
            }
            out[t] = s;
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
            for (rows, cols, m) in [(1, 8, 1), (7, 40, 3), (300, 96, 6), (33, 17, 5)] {
                let wf: Vec<f32> = (0..rows * cols).map(|_| rnd()).collect();
                let bytes: Vec<u8> = wf
                    .iter()
                    .flat_map(|&v| match kind {
                        HalfKind::F16 => f16::from_f32(v).to_le_bytes(),
                        HalfKind::Bf16 => bf16::from_f32(v).to_le_bytes(),
                    })
                    .collect();
                let w = HalfWeight::new(kind, rows, cols, &bytes).unwrap();
                let x: Vec<f32> = (0..m * cols).map(|_| rnd()).collect();
                for isa in Isa::available() {
                    let mut out = vec![0f32; m * rows];
                    w.matmul_with(isa, &x, m, &mut out);
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
