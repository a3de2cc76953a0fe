//! Every CUDA kernel against a CPU reference (plain loops in f64, or the CPU kernels, which have their
//! own tests), in f32, f16 and bf16, on odd shapes. Built only with `--features cuda`; on a machine
//! without a GPU each test says it was skipped.
#![cfg(feature = "cuda")]

use candle_core::{DType, Device, Tensor};
use infer_kernels::cuda;
use infer_kernels::{paged_attention, write_kv, AttentionShape, QType, QWeight, SeqAttention};

fn gpu() -> Option<Device> {
    match Device::new_cuda(0) {
        Ok(d) => Some(d),
        Err(e) => {
            eprintln!("skipped: no CUDA device ({e})");
            None
        }
    }
}

/// Deterministic values in [-1, 1).
fn rand_vec(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E3779B97F4A7C15) | 1;
    (0..n)
        .map(|_| {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            (s >> 40) as f32 / (1u64 << 23) as f32 - 1.0
        })
        .collect()
}

const DTYPES: [(DType, f32); 3] = [(DType::F32, 1e-4), (DType::F16, 2e-2), (DType::BF16, 1e-1)];

fn to_host(t: &Tensor) -> Vec<f32> {
    t.to_dtype(DType::F32).unwrap().flatten_all().unwrap().to_vec1().unwrap()
}

fn assert_close(what: &str, got: &[f32], want: &[f32], tol: f32) {
    assert_eq!(got.len(), want.len(), "{what}: lengths");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!((g - w).abs() <= tol * w.abs().max(1.0), "{what}[{i}]: {g} vs {w}");
    }
}

/// `x` rounded through `dtype`, as the kernels see it.
fn rounded(x: &[f32], dtype: DType) -> Vec<f32> {
    to_host(&Tensor::new(x, &Device::Cpu).unwrap().to_dtype(dtype).unwrap())
}

#[test]
fn rms_norm_and_fused_residual_match_the_reference() {
    let Some(dev) = gpu() else { return };
    for (rows, n) in [(1, 64), (5, 576), (3, 4096), (2, 100)] {
        let (x, r, w) = (rand_vec(rows * n, 1), rand_vec(rows * n, 2), rand_vec(n, 3));
        for (dt, tol) in DTYPES {
            let (xr, rr, wr) = (rounded(&x, dt), rounded(&r, dt), rounded(&w, dt));
            let reference = |src: &[f32]| -> Vec<f32> {
                let mut out = Vec::new();
                for row in src.chunks(n) {
                    let ms = row.iter().map(|&v| v as f64 * v as f64).sum::<f64>() / n as f64;
                    let inv = 1.0 / (ms + 1e-5).sqrt();
                    out.extend(row.iter().zip(&wr).map(|(&v, &g)| (v as f64 * inv * g as f64) as f32));
                }
                out
            };
            let up = |v: &[f32]| Tensor::new(v, &dev).unwrap().to_dtype(dt).unwrap().reshape((rows, n)).unwrap();
            let gain = Tensor::new(w.as_slice(), &dev).unwrap().to_dtype(dt).unwrap();
            let y = cuda::rms_norm(&up(&x), &gain, 1e-5).unwrap();
            assert_close(&format!("rms_norm {dt:?} [{rows}, {n}]"), &to_host(&y), &reference(&xr), tol);
            let sum: Vec<f32> = rounded(&xr.iter().zip(&rr).map(|(a, b)| a + b).collect::<Vec<_>>(), dt);
            let (s, y) = cuda::add_rms_norm(&up(&x), &up(&r), &gain, 1e-5).unwrap();
            assert_close(&format!("add_rms_norm sum {dt:?}"), &to_host(&s), &sum, tol);
            assert_close(&format!("add_rms_norm {dt:?}"), &to_host(&y), &reference(&sum), tol);
        }
    }
}

#[test]
fn silu_mul_matches_the_reference() {
    let Some(dev) = gpu() else { return };
    let (rows, n) = (7, 1536);
    let (g, u) = (rand_vec(rows * n, 4), rand_vec(rows * n, 5));
    for (dt, tol) in DTYPES {
        let (gr, ur) = (rounded(&g, dt), rounded(&u, dt));
        let want: Vec<f32> = gr.iter().zip(&ur).map(|(&a, &b)| (a as f64 / (1.0 + (-a as f64).exp()) * b as f64) as f32).collect();
        let t = |v: &[f32]| Tensor::new(v, &dev).unwrap().to_dtype(dt).unwrap().reshape((rows, n)).unwrap();
        assert_close(&format!("silu_mul {dt:?}"), &to_host(&cuda::silu_mul(&t(&g), &t(&u)).unwrap()), &want, tol);
        let fused = Tensor::cat(&[t(&g), t(&u)], 1).unwrap();
        assert_close(&format!("silu_mul_fused {dt:?}"), &to_host(&cuda::silu_mul_fused(&fused).unwrap()), &want, tol);
    }
}

#[test]
fn rope_matches_the_reference_in_both_layouts() {
    let Some(dev) = gpu() else { return };
    let (tokens, heads, hd) = (5, 3, 64);
    let x = rand_vec(tokens * heads * hd, 6);
    let positions: Vec<u32> = vec![0, 1, 7, 300, 4095];
    for rot in [hd, hd / 2] {
        let inv: Vec<f32> = (0..rot / 2).map(|i| 1.0 / 10000f32.powf(2.0 * i as f32 / rot as f32)).collect();
        for interleaved in [false, true] {
            for (dt, tol) in DTYPES {
                let xr = rounded(&x, dt);
                let mut want = xr.clone();
                for t in 0..tokens {
                    for h in 0..heads {
                        let row = &mut want[(t * heads + h) * hd..][..hd];
                        for (i, &f) in inv.iter().enumerate() {
                            let (s, c) = (positions[t] as f64 * f as f64).sin_cos();
                            let (a, b) = if interleaved { (2 * i, 2 * i + 1) } else { (i, i + rot / 2) };
                            let (x0, x1) = (row[a] as f64, row[b] as f64);
                            row[a] = (x0 * c - x1 * s) as f32;
                            row[b] = (x1 * c + x0 * s) as f32;
                        }
                    }
                }
                let xt = Tensor::new(x.as_slice(), &dev).unwrap().to_dtype(dt).unwrap().reshape((tokens, heads, hd)).unwrap();
                let y = cuda::rope(
                    &xt,
                    &Tensor::new(positions.as_slice(), &dev).unwrap(),
                    &Tensor::new(inv.as_slice(), &dev).unwrap(),
                    interleaved,
                )
                .unwrap();
                // Angles up to 4095 rad: f32 argument reduction costs ~1e-4 absolute.
                assert_close(&format!("rope rot={rot} interleaved={interleaved} {dt:?}"), &to_host(&y), &want, tol.max(1e-3));
            }
        }
    }
}

#[test]
fn paged_attention_matches_the_cpu_kernel() {
    let Some(dev) = gpu() else { return };
    // A ragged batch: a long prefill chunk, two decode rows (one past several partitions), a short one.
    for (num_heads, num_kv_heads, hd, window, softcap) in
        [(8, 2, 64, None, None), (9, 3, 80, None, None), (4, 4, 128, Some(37), None), (2, 1, 256, None, Some(0.9))]
    {
        let block_size = 16;
        let lens = [(40usize, 300usize), (1, 700), (1, 5), (3, 3)]; // (q_len, context_len)
        let blocks_per: Vec<usize> = lens.iter().map(|&(_, c)| c.div_ceil(block_size)).collect();
        let num_blocks: usize = blocks_per.iter().sum::<usize>() + 3;
        // Scatter each sequence's blocks over the cache in a shuffled order.
        let mut ids: Vec<u32> = (0..num_blocks as u32).collect();
        ids.reverse();
        let mut tables = Vec::new();
        let mut next = 0;
        for &b in &blocks_per {
            tables.push(ids[next..next + b].to_vec());
            next += b;
        }
        let row = num_kv_heads * hd;
        let kc = rand_vec(num_blocks * block_size * row, 7);
        let vc = rand_vec(num_blocks * block_size * row, 8);
        let rows: usize = lens.iter().map(|l| l.0).sum();
        let q = rand_vec(rows * num_heads * hd, 9);
        let mut seqs = Vec::new();
        let mut q_start = 0;
        for (i, &(q_len, context_len)) in lens.iter().enumerate() {
            seqs.push(SeqAttention { q_start, q_len, context_len, block_table: &tables[i] });
            q_start += q_len;
        }
        let shape = AttentionShape {
            num_heads,
            num_kv_heads,
            head_dim: hd,
            block_size,
            scale: 1.0 / (hd as f32).sqrt(),
            sliding_window: window,
            softcap,
        };
        for (dt, tol) in DTYPES {
            let (qr, kr, vr) = (rounded(&q, dt), rounded(&kc, dt), rounded(&vc, dt));
            let mut want = vec![0f32; rows * num_heads * hd];
            paged_attention(infer_kernels::Isa::detect(), &qr, &kr, &vr, &seqs, &shape, &mut want);
            let up = |v: &[f32]| Tensor::new(v, &dev).unwrap().to_dtype(dt).unwrap();
            let meta = cuda::AttentionMeta::new(&seqs, &dev).unwrap();
            let out = cuda::paged_attention(&up(&q).reshape((rows, num_heads, hd)).unwrap(), &up(&kc), &up(&vc), &meta, &shape).unwrap();
            assert_close(&format!("paged_attention h={num_heads}/{num_kv_heads} hd={hd} {dt:?}"), &to_host(&out), &want, tol);
        }
    }
}

#[test]
fn write_cache_matches_the_cpu_kernel() {
    let Some(dev) = gpu() else { return };
    let (blocks, block_size, kvh, hd) = (6, 16, 2, 64);
    let row = kvh * hd;
    let slots: Vec<usize> = vec![17, 3, 95, 40];
    let (k, v) = (rand_vec(slots.len() * row, 10), rand_vec(slots.len() * row, 11));
    let shape =
        AttentionShape { num_heads: kvh, num_kv_heads: kvh, head_dim: hd, block_size, scale: 1.0, sliding_window: None, softcap: None };
    let (mut kw, mut vw) = (vec![0f32; blocks * block_size * row], vec![0f32; blocks * block_size * row]);
    write_kv(&k, &v, &slots, &shape, &mut kw, &mut vw);
    let kc = Tensor::zeros(blocks * block_size * row, DType::F32, &dev).unwrap();
    let vc = Tensor::zeros(blocks * block_size * row, DType::F32, &dev).unwrap();
    let s: Vec<u32> = slots.iter().map(|&s| s as u32).collect();
    let st = Tensor::new(s.as_slice(), &dev).unwrap();
    cuda::write_cache(&kc, &Tensor::new(k.as_slice(), &dev).unwrap(), &st).unwrap();
    cuda::write_cache(&vc, &Tensor::new(v.as_slice(), &dev).unwrap(), &st).unwrap();
    assert_eq!(to_host(&kc), kw);
    assert_eq!(to_host(&vc), vw);
}

#[test]
fn quantized_gemv_matches_the_cpu_kernel() {
    let Some(dev) = gpu() else { return };
    for qt in [QType::Q8_0, QType::Q4_0] {
        for (rows, cols, m) in [(1, 32, 1), (33, 576, 3), (1536, 576, 8), (576, 1536, 1)] {
            // Random blocks: an f16 scale, then random quants.
            let bb = qt.block_bytes();
            let mut data = Vec::with_capacity(rows * cols / 32 * bb);
            let noise = rand_vec(rows * cols / 32 * bb, 12);
            for (b, chunk) in noise.chunks(bb).enumerate() {
                data.extend(half::f16::from_f32(0.01 + 0.02 * (b % 7) as f32).to_le_bytes());
                data.extend(chunk[2..].iter().map(|v| ((v + 1.0) * 127.5) as u8));
            }
            let w = QWeight::new_for(infer_kernels::Isa::Scalar, qt, rows, cols, data.clone()).unwrap();
            let x = rand_vec(m * cols, 13);
            let wt = Tensor::new(data.as_slice(), &dev).unwrap();
            for (dt, tol) in DTYPES {
                // Same 8-bit activation scheme as the CPU kernel, fed the same inputs: x rounded through
                // `dt` (rounding x to f16 moves some values across an 8-bit level, about 0.04 of the
                // output each here, so the f32 x is no reference for f16/bf16).
                let xr = rounded(&x, dt);
                let mut want = vec![0f32; m * rows];
                w.matmul_with(infer_kernels::Isa::Scalar, &xr, m, &mut want);
                let xt = Tensor::new(x.as_slice(), &dev).unwrap().to_dtype(dt).unwrap().reshape((m, cols)).unwrap();
                let y = cuda::qgemv(&xt, &wt, qt, rows, cols).unwrap();
                assert_close(&format!("qgemv {qt:?} [{rows}, {cols}] m={m} {dt:?}"), &to_host(&y), &want, tol.max(2e-3) * 4.0);
            }
        }
    }
}
