//! Fused element-wise steps of a decoder layer on the CPU, each one pass over its rows: RMSNorm
//! (optionally after the residual add, which it writes too), SiLU(gate)·up, and rotary embeddings
//! in place. Rows are spread over the kernels' pool when there are enough of them; AVX2+FMA where
//! the CPU has it (vectorized exp for SiLU), a portable loop otherwise.
//!
//! These kernels are not capped: they choose their path from [`Isa::detect`] (what the CPU has),
//! whatever instruction set the weights were packed for or `paged_attention_with` is given.
//!
//! [`Isa::detect`]: crate::cpu::isa::Isa::detect

use crate::cpu::pool::Pool;
use crate::cpu::OutPtr;

/// Elements below which a call stays on the calling thread.
const PARALLEL_MIN: usize = 1 << 15;

/// Runs `f(row_range)` over `rows` rows of `n` elements, in parallel when large.
fn for_rows(rows: usize, n: usize, f: &(dyn Fn(std::ops::Range<usize>) + Sync)) {
    if rows * n < PARALLEL_MIN || rows < 2 {
        return f(0..rows);
    }
    let pool = Pool::global();
    let per = rows.div_ceil(pool.threads() * 4).max(1);
    pool.run(rows.div_ceil(per), &|c| f(c * per..((c + 1) * per).min(rows)));
}

#[cfg(target_arch = "x86_64")]
fn simd() -> bool {
    crate::cpu::isa::Isa::detect() != crate::cpu::isa::Isa::Scalar
}

/// `out = x / rms(x) · w` per row of `w.len()` elements (`rms = sqrt(mean(x²) + eps)`).
pub fn rms_norm(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
    let n = w.len();
    assert!(n > 0 && x.len() == out.len() && x.len().is_multiple_of(n), "rms_norm: x and out must be [rows, {n}]");
    let dst = OutPtr(out.as_mut_ptr());
    for_rows(x.len() / n, n, &|rows| {
        for r in rows {
            // SAFETY: row r of out is in bounds and written by this range only.
            let o = unsafe { std::slice::from_raw_parts_mut(dst.at(r * n), n) };
            norm_row(&x[r * n..(r + 1) * n], w, eps, o);
        }
    });
}

/// `sum = x + a` and `out = rms_norm(sum)` (the residual add and the norm after it, one pass).
pub fn add_rms_norm(x: &[f32], a: &[f32], w: &[f32], eps: f32, sum: &mut [f32], out: &mut [f32]) {
    let n = w.len();
    assert!(
        n > 0 && x.len() == a.len() && x.len() == sum.len() && x.len() == out.len() && x.len().is_multiple_of(n),
        "add_rms_norm: x, a, sum and out must be [rows, {n}]"
    );
    let (sp, op) = (OutPtr(sum.as_mut_ptr()), OutPtr(out.as_mut_ptr()));
    for_rows(x.len() / n, n, &|rows| {
        for r in rows {
            // SAFETY: row r of sum and out is in bounds and written by this range only.
            let (s, o) = unsafe { (std::slice::from_raw_parts_mut(sp.at(r * n), n), std::slice::from_raw_parts_mut(op.at(r * n), n)) };
            for ((s, &x), &a) in s.iter_mut().zip(&x[r * n..(r + 1) * n]).zip(&a[r * n..(r + 1) * n]) {
                *s = x + a;
            }
            norm_row(s, w, eps, o);
        }
    });
}

fn norm_row(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if simd() {
        // SAFETY: every non-scalar Isa implies AVX2 and FMA; the slices have equal lengths.
        return unsafe { avx2::norm_row(x, w, eps, out) };
    }
    norm_row_scalar(x, w, eps, out)
}

fn norm_row_scalar(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
    // Eight partial sums (the same association as the SIMD path's lanes, and vectorizable).
    let mut acc = [0f32; 8];
    for (i, &v) in x.iter().enumerate() {
        acc[i % 8] += v * v;
    }
    let scale = 1.0 / (acc.iter().sum::<f32>() / x.len() as f32 + eps).sqrt();
    for ((o, &v), &g) in out.iter_mut().zip(x).zip(w) {
        *o = v * scale * g;
    }
}

/// `out = silu(gate) · up` element-wise over rows of `n` (`silu(g) = g / (1 + e^-g)`).
pub fn silu_mul(gate: &[f32], up: &[f32], n: usize, out: &mut [f32]) {
    assert!(
        n > 0 && gate.len() == up.len() && gate.len() == out.len() && out.len().is_multiple_of(n),
        "silu_mul: gate, up and out must be [rows, {n}]"
    );
    let dst = OutPtr(out.as_mut_ptr());
    for_rows(out.len() / n, n, &|rows| {
        for r in rows {
            // SAFETY: row r of out is in bounds and written by this range only.
            let o = unsafe { std::slice::from_raw_parts_mut(dst.at(r * n), n) };
            silu_mul_row(&gate[r * n..(r + 1) * n], &up[r * n..(r + 1) * n], o);
        }
    });
}

/// `out = gelu(gate) · up` element-wise over rows of `n`, with GELU's tanh approximation
/// (`0.5 g (1 + tanh(√(2/π) (g + 0.044715 g³)))`, as Gemma and candle's `gelu` use).
pub fn gelu_mul(gate: &[f32], up: &[f32], n: usize, out: &mut [f32]) {
    assert!(
        n > 0 && gate.len() == up.len() && gate.len() == out.len() && out.len().is_multiple_of(n),
        "gelu_mul: gate, up and out must be [rows, {n}]"
    );
    let dst = OutPtr(out.as_mut_ptr());
    for_rows(out.len() / n, n, &|rows| {
        for r in rows {
            // SAFETY: row r of out is in bounds and written by this range only.
            let o = unsafe { std::slice::from_raw_parts_mut(dst.at(r * n), n) };
            for ((o, &g), &u) in o.iter_mut().zip(&gate[r * n..(r + 1) * n]).zip(&up[r * n..(r + 1) * n]) {
                const SQRT_2_OVER_PI: f32 = 0.797_884_6;
                *o = 0.5 * g * (1.0 + (SQRT_2_OVER_PI * g * (1.0 + 0.044715 * g * g)).tanh()) * u;
            }
        }
    });
}

/// [`silu_mul`] over fused rows `gate_up` (`[rows, 2n]`: the gate half, then the up half) into
/// `out` (`[rows, n]`).
pub fn silu_mul_fused(gate_up: &[f32], n: usize, out: &mut [f32]) {
    assert!(
        n > 0 && gate_up.len() == 2 * out.len() && out.len().is_multiple_of(n),
        "silu_mul_fused: gate_up must be [rows, {}] and out [rows, {n}]",
        2 * n
    );
    let dst = OutPtr(out.as_mut_ptr());
    for_rows(out.len() / n, n, &|rows| {
        for r in rows {
            let row = &gate_up[2 * r * n..2 * (r + 1) * n];
            // SAFETY: row r of out is in bounds and written by this range only.
            let o = unsafe { std::slice::from_raw_parts_mut(dst.at(r * n), n) };
            silu_mul_row(&row[..n], &row[n..], o);
        }
    });
}

/// `Σ exp(scale · x_i − shift)` (a softmax denominator: `shift` = `scale · max x`), the terms in f32
/// and their sum in f64; elements of −∞ add nothing. Eight lanes at a time with AVX2.
pub fn sum_exp(x: &[f32], scale: f32, shift: f32) -> f64 {
    #[cfg(target_arch = "x86_64")]
    if simd() {
        // SAFETY: every non-scalar Isa implies AVX2 and FMA.
        return unsafe { avx2::sum_exp(x, scale, shift) };
    }
    sum_exp_scalar(x, scale, shift)
}

fn sum_exp_scalar(x: &[f32], scale: f32, shift: f32) -> f64 {
    x.iter().map(|&v| (v * scale - shift).exp() as f64).sum()
}

/// The largest element of `x` that is not NaN (−∞ for none).
pub fn max(x: &[f32]) -> f32 {
    // Eight independent maxima let the compiler vectorize the loop.
    let mut m = [f32::NEG_INFINITY; 8];
    let mut chunks = x.chunks_exact(8);
    for c in &mut chunks {
        for (m, &v) in m.iter_mut().zip(c) {
            *m = if v > *m { v } else { *m };
        }
    }
    chunks.remainder().iter().chain(&m).fold(f32::NEG_INFINITY, |a, &b| if b > a { b } else { a })
}

#[inline]
fn silu(g: f32) -> f32 {
    g / (1.0 + (-g).exp())
}

fn silu_mul_row(gate: &[f32], up: &[f32], out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if simd() {
        // SAFETY: every non-scalar Isa implies AVX2 and FMA; the slices have equal lengths.
        return unsafe { avx2::silu_mul(gate, up, out) };
    }
    silu_mul_row_scalar(gate, up, out)
}

fn silu_mul_row_scalar(gate: &[f32], up: &[f32], out: &mut [f32]) {
    for ((o, &g), &u) in out.iter_mut().zip(gate).zip(up) {
        *o = silu(g) * u;
    }
}

/// Rotary embedding in place on `x` (`[tokens, heads, head_dim]`) with per-token tables `cos` and
/// `sin` (`[tokens, rot / 2]`) on the first `rot` dimensions of each head: pairs `(i, i + rot/2)`,
/// or `(2i, 2i + 1)` when `interleaved`.
pub fn rope(x: &mut [f32], heads: usize, head_dim: usize, cos: &[f32], sin: &[f32], rot: usize, interleaved: bool) {
    let half = rot / 2;
    let row = heads * head_dim;
    assert!(
        rot <= head_dim && rot.is_multiple_of(2) && row > 0 && x.len().is_multiple_of(row),
        "rope: x must be [tokens, {heads}, {head_dim}] with an even rotary size ≤ {head_dim}"
    );
    let tokens = x.len() / row;
    assert!(cos.len() == tokens * half && sin.len() == tokens * half, "rope: cos and sin must be [{tokens}, {half}]");
    let dst = OutPtr(x.as_mut_ptr());
    for_rows(tokens, row, &|toks| {
        for t in toks {
            let (c, s) = (&cos[t * half..(t + 1) * half], &sin[t * half..(t + 1) * half]);
            for h in 0..heads {
                // SAFETY: token t's head h is in bounds and rotated by this range only.
                let v = unsafe { std::slice::from_raw_parts_mut(dst.at(t * row + h * head_dim), rot) };
                if interleaved {
                    for i in 0..half {
                        let (a, b) = (v[2 * i], v[2 * i + 1]);
                        v[2 * i] = a * c[i] - b * s[i];
                        v[2 * i + 1] = a * s[i] + b * c[i];
                    }
                } else {
                    let (lo, hi) = v.split_at_mut(half);
                    for i in 0..half {
                        let (a, b) = (lo[i], hi[i]);
                        lo[i] = a * c[i] - b * s[i];
                        hi[i] = a * s[i] + b * c[i];
                    }
                }
            }
        }
    });
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use crate::cpu::simd::{exp256, hsum};

    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn norm_row(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
        let n = x.len();
        let (xp, wp, op) = (x.as_ptr(), w.as_ptr(), out.as_mut_ptr());
        let mut acc = _mm256_setzero_ps();
        let mut i = 0;
        while i + 8 <= n {
            let v = _mm256_loadu_ps(xp.add(i));
            acc = _mm256_fmadd_ps(v, v, acc);
            i += 8;
        }
        let ss = hsum(acc) + x[i..].iter().map(|v| v * v).sum::<f32>();
        let scale = 1.0 / (ss / n as f32 + eps).sqrt();
        let sv = _mm256_set1_ps(scale);
        let mut i = 0;
        while i + 8 <= n {
            _mm256_storeu_ps(op.add(i), _mm256_mul_ps(_mm256_mul_ps(_mm256_loadu_ps(xp.add(i)), sv), _mm256_loadu_ps(wp.add(i))));
            i += 8;
        }
        for k in i..n {
            out[k] = x[k] * scale * w[k];
        }
    }

    /// `out[i] = silu(gate[i]) · up[i]`.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn silu_mul(gate: &[f32], up: &[f32], out: &mut [f32]) {
        let n = out.len();
        let (gp, up_, op) = (gate.as_ptr(), up.as_ptr(), out.as_mut_ptr());
        let one = _mm256_set1_ps(1.0);
        let mut i = 0;
        while i + 8 <= n {
            let g = _mm256_loadu_ps(gp.add(i));
            let e = exp256(_mm256_sub_ps(_mm256_setzero_ps(), g));
            let s = _mm256_div_ps(g, _mm256_add_ps(one, e));
            _mm256_storeu_ps(op.add(i), _mm256_mul_ps(s, _mm256_loadu_ps(up_.add(i))));
            i += 8;
        }
        for k in i..n {
            out[k] = super::silu(gate[k]) * up[k];
        }
    }

    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn sum_exp(x: &[f32], scale: f32, shift: f32) -> f64 {
        let n = x.len();
        let (sv, hv) = (_mm256_set1_ps(scale), _mm256_set1_ps(shift));
        let mut acc = _mm256_setzero_pd();
        let mut i = 0;
        while i + 8 <= n {
            let v = _mm256_loadu_ps(x.as_ptr().add(i));
            // (−∞ · scale − shift) is −∞; exp256 clamps it to e^−87.3 ≈ 1e-38, so mask it to 0.
            let e = _mm256_and_ps(exp256(_mm256_fmsub_ps(v, sv, hv)), _mm256_cmp_ps::<_CMP_GT_OQ>(v, _mm256_set1_ps(f32::NEG_INFINITY)));
            acc = _mm256_add_pd(acc, _mm256_cvtps_pd(_mm256_castps256_ps128(e)));
            acc = _mm256_add_pd(acc, _mm256_cvtps_pd(_mm256_extractf128_ps::<1>(e)));
            i += 8;
        }
        let mut lanes = [0f64; 4];
        _mm256_storeu_pd(lanes.as_mut_ptr(), acc);
        lanes.iter().sum::<f64>() + super::sum_exp_scalar(&x[i..], scale, shift)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rand_vec(n: usize, seed: &mut u64) -> Vec<f32> {
        (0..n)
            .map(|_| {
                *seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                ((*seed >> 33) as f32 / (1u64 << 31) as f32) * 6.0 - 3.0
            })
            .collect()
    }

    fn close(got: &[f32], want: &[f64], what: &str) {
        assert_eq!(got.len(), want.len(), "{what}");
        for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
            assert!((g as f64 - w).abs() <= 2e-5 * (1.0 + w.abs()), "{what} [{i}]: {g} vs {w}");
        }
    }

    #[test]
    fn norms_match_f64() {
        let mut seed = 1;
        // Row lengths that are and are not multiples of the vector width; enough rows to go parallel.
        for (rows, n) in [(1, 8), (3, 13), (64, 576), (40, 1000)] {
            let (x, a, w) = (rand_vec(rows * n, &mut seed), rand_vec(rows * n, &mut seed), rand_vec(n, &mut seed));
            let eps = 1e-5;
            let norm = |x: &[f64]| -> Vec<f64> {
                x.chunks(n)
                    .flat_map(|r| {
                        let s = 1.0 / (r.iter().map(|v| v * v).sum::<f64>() / n as f64 + eps as f64).sqrt();
                        r.iter().zip(&w).map(move |(v, &g)| v * s * g as f64).collect::<Vec<_>>()
                    })
                    .collect()
            };
            let xd: Vec<f64> = x.iter().map(|&v| v as f64).collect();
            let mut out = vec![f32::NAN; rows * n];
            rms_norm(&x, &w, eps, &mut out);
            close(&out, &norm(&xd), "rms_norm");
            let sd: Vec<f64> = x.iter().zip(&a).map(|(&x, &a)| (x + a) as f64).collect();
            let (mut sum, mut out) = (vec![f32::NAN; rows * n], vec![f32::NAN; rows * n]);
            add_rms_norm(&x, &a, &w, eps, &mut sum, &mut out);
            close(&sum, &sd, "add_rms_norm sum");
            close(&out, &norm(&sd), "add_rms_norm");
            let mut out = vec![f32::NAN; n];
            norm_row_scalar(&x[..n], &w, eps, &mut out);
            close(&out, &norm(&xd[..n]), "scalar rms_norm");
        }
    }

    #[test]
    fn silu_mul_matches_f64() {
        let mut seed = 2;
        for (rows, n) in [(1, 5), (2, 24), (70, 1536)] {
            let (g, u) = (rand_vec(rows * n, &mut seed), rand_vec(rows * n, &mut seed));
            let want: Vec<f64> = g.iter().zip(&u).map(|(&g, &u)| g as f64 / (1.0 + (-g as f64).exp()) * u as f64).collect();
            let mut out = vec![f32::NAN; rows * n];
            silu_mul(&g, &u, n, &mut out);
            close(&out, &want, "silu_mul");
            let gu: Vec<f32> =
                (0..rows).flat_map(|r| g[r * n..(r + 1) * n].iter().chain(&u[r * n..(r + 1) * n]).copied().collect::<Vec<_>>()).collect();
            let mut out = vec![f32::NAN; rows * n];
            silu_mul_fused(&gu, n, &mut out);
            close(&out, &want, "silu_mul_fused");
            let mut out = vec![f32::NAN; n];
            silu_mul_row_scalar(&g[..n], &u[..n], &mut out);
            close(&out, &want[..n], "scalar silu_mul");
        }
    }

    #[test]
    fn sum_exp_and_max_match_f64() {
        let mut seed = 6;
        for n in [0, 3, 8, 13, 49152] {
            let mut x = rand_vec(n, &mut seed);
            if n > 5 {
                x[2] = f32::NEG_INFINITY;
                x[n - 1] = f32::NEG_INFINITY;
            }
            let m = x.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
            assert_eq!(max(&x), m, "max of {n}");
            for scale in [1.0, 1.25] {
                let shift = m * scale;
                let want: f64 = x.iter().map(|&v| (v as f64 * scale as f64 - shift as f64).exp()).sum();
                let got = sum_exp(&x, scale, shift);
                assert!((got - want).abs() <= 1e-6 * want.max(1.0), "sum_exp of {n} (scale {scale}): {got} vs {want}");
                if n > 0 {
                    assert!((sum_exp_scalar(&x, scale, shift) - want).abs() <= 1e-6 * want, "scalar sum_exp of {n}");
                }
            }
        }
    }

    #[test]
    fn gelu_mul_matches_f64() {
        let mut seed = 4;
        for (rows, n) in [(1, 5), (2, 24), (70, 1536)] {
            let (g, u) = (rand_vec(rows * n, &mut seed), rand_vec(rows * n, &mut seed));
            let want: Vec<f64> = g
                .iter()
                .zip(&u)
                .map(|(&g, &u)| {
                    let g = g as f64;
                    0.5 * g * (1.0 + ((2.0 / std::f64::consts::PI).sqrt() * (g + 0.044715 * g * g * g)).tanh()) * u as f64
                })
                .collect();
            let mut out = vec![f32::NAN; rows * n];
            gelu_mul(&g, &u, n, &mut out);
            close(&out, &want, "gelu_mul");
        }
    }

    #[test]
    fn rope_matches_f64() {
        let mut seed = 3;
        for (tokens, heads, hd, rot, interleaved) in [(3, 2, 8, 8, false), (5, 3, 16, 8, false), (4, 2, 8, 8, true), (70, 9, 64, 64, false)]
        {
            let x = rand_vec(tokens * heads * hd, &mut seed);
            let half = rot / 2;
            let (cos, sin): (Vec<f32>, Vec<f32>) = (0..tokens * half).map(|i| ((i as f32 * 0.37).cos(), (i as f32 * 0.37).sin())).unzip();
            let mut want: Vec<f64> = x.iter().map(|&v| v as f64).collect();
            for t in 0..tokens {
                for h in 0..heads {
                    let b = (t * heads + h) * hd;
                    for i in 0..half {
                        let (p, q) = if interleaved { (b + 2 * i, b + 2 * i + 1) } else { (b + i, b + i + half) };
                        let (c, s) = (cos[t * half + i] as f64, sin[t * half + i] as f64);
                        let (a, bb) = (x[p] as f64, x[q] as f64);
                        want[p] = a * c - bb * s;
                        want[q] = a * s + bb * c;
                    }
                }
            }
            let mut got = x.clone();
            rope(&mut got, heads, hd, &cos, &sin, rot, interleaved);
            close(&got, &want, "rope");
        }
    }
}
