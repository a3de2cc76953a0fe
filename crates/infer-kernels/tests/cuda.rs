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

/// Block tables for sequences of these `(q_len, context_len)`, each sequence's blocks scattered over
/// the cache in reverse order with `spare` unused blocks; returns the tables and the cache's blocks.
fn scattered_tables(lens: &[(usize, usize)], block_size: usize, spare: usize) -> (Vec<Vec<u32>>, usize) {
    let blocks_per: Vec<usize> = lens.iter().map(|&(_, c)| c.div_ceil(block_size)).collect();
    let num_blocks: usize = blocks_per.iter().sum::<usize>() + spare;
    let ids: Vec<u32> = (0..num_blocks as u32).rev().collect();
    let (mut tables, mut next) = (Vec::new(), 0);
    for &b in &blocks_per {
        tables.push(ids[next..next + b].to_vec());
        next += b;
    }
    (tables, num_blocks)
}

/// Attention geometry with the usual `1 / sqrt(head_dim)` scale.
fn attention_shape(
    num_heads: usize,
    num_kv_heads: usize,
    head_dim: usize,
    block_size: usize,
    sliding_window: Option<usize>,
    softcap: Option<f32>,
) -> AttentionShape {
    AttentionShape { num_heads, num_kv_heads, head_dim, block_size, scale: 1.0 / (head_dim as f32).sqrt(), sliding_window, softcap }
}

/// The kernels' view of a ragged batch of these `(q_len, context_len)` over `tables`.
fn ragged_seqs<'a>(lens: &[(usize, usize)], tables: &'a [Vec<u32>]) -> Vec<SeqAttention<'a>> {
    let mut q_start = 0;
    lens.iter()
        .zip(tables)
        .map(|(&(q_len, context_len), t)| {
            q_start += q_len;
            SeqAttention { q_start: q_start - q_len, q_len, context_len, block_table: t }
        })
        .collect()
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
        let (tables, num_blocks) = scattered_tables(&lens, block_size, 3);
        let row = num_kv_heads * hd;
        let kc = rand_vec(num_blocks * block_size * row, 7);
        let vc = rand_vec(num_blocks * block_size * row, 8);
        let rows: usize = lens.iter().map(|l| l.0).sum();
        let q = rand_vec(rows * num_heads * hd, 9);
        let seqs = ragged_seqs(&lens, &tables);
        let shape = attention_shape(num_heads, num_kv_heads, hd, block_size, window, softcap);
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

// ---------------------------------------------------------------------------------------------
// The decode step's kernels (cuda::decode), on raw addresses of device tensors.

use infer_kernels::cuda::decode::{tensor_ptr, AttentionArgs, DecodeKernels, DevPtr, Segment, NORM_ROWS};

/// `v` on the device as `dt`, and its address.
fn dev_tensor(v: &[f32], dt: DType, dev: &Device) -> (Tensor, DevPtr) {
    let t = Tensor::new(v, dev).unwrap().to_dtype(dt).unwrap();
    let p = tensor_ptr(&t).unwrap();
    (t, p)
}

fn dev_u32(v: &[u32], dev: &Device) -> (Tensor, DevPtr) {
    let t = Tensor::new(v, dev).unwrap();
    let p = tensor_ptr(&t).unwrap();
    (t, p)
}

#[test]
fn decode_gemv_and_glu_match_the_reference() {
    let Some(dev) = gpu() else { return };
    // (segment rows, k): three stacked segments with biases on the first and last, one plain
    // matrix; k = 1000 ends mid-unroll (125 bf16 chunks, 250 f32 ones), k = 8 is one chunk.
    // Rows set the warps per row: 4 up to 2048 rows, 2 up to 4096, 1 from 8192 on (the GLU takes the
    // first segment's rows).
    for (segs, k) in
        [(vec![40usize, 8, 24], 64usize), (vec![300], 1000), (vec![3], 8), (vec![130, 2], 2048), (vec![3000], 64), (vec![8192, 8], 16)]
    {
        let n: usize = segs.iter().sum();
        for (dt, tol) in DTYPES {
            let kern = DecodeKernels::new(&dev, dt, true).unwrap();
            let w: Vec<Vec<f32>> = segs.iter().enumerate().map(|(i, &r)| rounded(&rand_vec(r * k, 20 + i as u64), dt)).collect();
            let bias: Vec<Option<Vec<f32>>> =
                segs.iter().enumerate().map(|(i, &r)| (i != 1).then(|| rounded(&rand_vec(r, 30 + i as u64), dt))).collect();
            let wt: Vec<_> = w.iter().map(|v| dev_tensor(v, dt, &dev)).collect();
            let bt: Vec<_> = bias.iter().map(|b| b.as_ref().map(|v| dev_tensor(v, dt, &dev))).collect();
            let segments: Vec<Segment> = segs
                .iter()
                .enumerate()
                .map(|(i, &rows)| Segment { weight: wt[i].1, bias: bt[i].as_ref().map_or(DevPtr::NULL, |b| b.1), rows })
                .collect();
            for m in [1usize, 2, 3, 5, 8] {
                let x = rounded(&rand_vec(m * k, 40 + m as u64), dt);
                let (_xt, xp) = dev_tensor(&x, dt, &dev);
                // Reference: out[i, r] = x[i] · W[r] + b[r], in f64 over the rounded inputs.
                let mut want = vec![0f32; m * n];
                for i in 0..m {
                    let mut r0 = 0;
                    for (s, &rows) in segs.iter().enumerate() {
                        for r in 0..rows {
                            let dot: f64 = (0..k).map(|j| w[s][r * k + j] as f64 * x[i * k + j] as f64).sum();
                            want[i * n + r0 + r] = (dot + bias[s].as_ref().map_or(0.0, |b| b[r] as f64)) as f32;
                        }
                        r0 += rows;
                    }
                }
                let what = format!("gemv {segs:?} k={k} m={m} {dt:?}");
                let (out, op) = dev_tensor(&vec![0f32; m * n], DType::F32, &dev);
                unsafe { kern.gemv(&segments, k, xp, m, op, false) }.unwrap();
                assert_close(&what, &to_host(&out), &want, 1e-4);
                // Added into what the output holds (the residual stream).
                let base = rand_vec(m * n, 50);
                let (out, op) = dev_tensor(&base, DType::F32, &dev);
                unsafe { kern.gemv(&segments, k, xp, m, op, true) }.unwrap();
                let summed: Vec<f32> = want.iter().zip(&base).map(|(a, b)| a + b).collect();
                assert_close(&format!("{what} add"), &to_host(&out), &summed, 1e-4);
                // GLU over the first segment as gate and a second matrix as up.
                let rows = segs[0];
                let up = rounded(&rand_vec(rows * k, 60), dt);
                let (_ut, upp) = dev_tensor(&up, dt, &dev);
                let mut want = vec![0f32; m * rows];
                for i in 0..m {
                    for r in 0..rows {
                        let g: f64 = (0..k).map(|j| w[0][r * k + j] as f64 * x[i * k + j] as f64).sum();
                        let u: f64 = (0..k).map(|j| up[r * k + j] as f64 * x[i * k + j] as f64).sum();
                        want[i * rows + r] = (g / (1.0 + (-g).exp()) * u) as f32;
                    }
                }
                let (act, ap) = dev_tensor(&vec![0f32; m * rows], dt, &dev);
                unsafe { kern.glu(wt[0].1, upp, rows, k, xp, m, ap) }.unwrap();
                assert_close(&format!("glu [{rows}, {k}] m={m} {dt:?}"), &to_host(&act), &want, tol.max(1e-4));
            }
        }
    }
}

#[test]
fn decode_embed_and_rmsnorm_match_the_reference() {
    let Some(dev) = gpu() else { return };
    let (vocab, n) = (50, 200);
    let table = rand_vec(vocab * n, 70);
    let ids = [7u32, 0, 49, 7];
    for (dt, tol) in DTYPES {
        let kern = DecodeKernels::new(&dev, dt, true).unwrap();
        let tr = rounded(&table, dt);
        let (_tt, tp) = dev_tensor(&table, dt, &dev);
        let (_it, ip) = dev_u32(&ids, &dev);
        let (x, xp) = dev_tensor(&vec![0f32; ids.len() * n], DType::F32, &dev);
        unsafe { kern.embed(tp, ip, xp, ids.len(), n) }.unwrap();
        let want: Vec<f32> = ids.iter().flat_map(|&i| tr[i as usize * n..][..n].to_vec()).collect();
        assert_eq!(to_host(&x), want, "embed {dt:?}");
        // RMSNorm of rows 3 and 1 (a gather, as for the logits rows), f32 in, dt out.
        let w = rounded(&rand_vec(n, 71), dt);
        let (_wt, wp) = dev_tensor(&w, dt, &dev);
        let rows = [3u32, 1];
        let (_rt, rp) = dev_u32(&rows, &dev);
        let (y, yp) = dev_tensor(&vec![0f32; rows.len() * n], dt, &dev);
        unsafe { kern.rmsnorm(xp, rp, wp, yp, rows.len(), n, 1e-6) }.unwrap();
        let mut want = Vec::new();
        for &r in &rows {
            let row = &tr[ids[r as usize] as usize * n..][..n];
            let inv = 1.0 / (row.iter().map(|&v| v as f64 * v as f64).sum::<f64>() / n as f64 + 1e-6).sqrt();
            want.extend(row.iter().zip(&w).map(|(&v, &g)| (v as f64 * inv * g as f64) as f32));
        }
        assert_close(&format!("rmsnorm_in {dt:?}"), &to_host(&y), &want, tol);
    }
}

#[test]
fn decode_rope_qkv_matches_the_reference() {
    let Some(dev) = gpu() else { return };
    let (m, nh, nkv, hd) = (3usize, 4usize, 2usize, 64usize);
    let width = (nh + 2 * nkv) * hd;
    let qkv = rand_vec(m * width, 80);
    let positions = [0u32, 9, 3000];
    let slots = [5u32, 0, 11];
    let num_slots = 12;
    for rot in [hd, hd / 2] {
        let inv: Vec<f32> = (0..rot / 2).map(|i| 1.0 / 500000f32.powf(2.0 * i as f32 / rot as f32)).collect();
        for interleaved in [false, true] {
            for norm in [false, true] {
                for (dt, tol) in DTYPES {
                    let kern = DecodeKernels::new(&dev, dt, true).unwrap();
                    let (qn, kn) = (rounded(&rand_vec(hd, 81), dt), rounded(&rand_vec(hd, 82), dt));
                    // Reference: per head, optional RMSNorm (rounded to dt, as the kernel does), then
                    // the rotation in f64.
                    let head = |t: usize, h: usize, gain: Option<&[f32]>| -> Vec<f32> {
                        let src = &qkv[t * width + h * hd..][..hd];
                        match gain {
                            None => src.to_vec(),
                            Some(g) => {
                                let inv = 1.0 / (src.iter().map(|&v| v as f64 * v as f64).sum::<f64>() / hd as f64 + 1e-6).sqrt();
                                rounded(&src.iter().zip(g).map(|(&v, &w)| (v as f64 * inv * w as f64) as f32).collect::<Vec<_>>(), dt)
                            }
                        }
                    };
                    let rotate = |mut row: Vec<f32>, p: u32| -> Vec<f32> {
                        let orig = row.clone();
                        for (i, &f) in inv.iter().enumerate() {
                            let (s, c) = (p as f64 * f as f64).sin_cos();
                            let (a, b) = if interleaved { (2 * i, 2 * i + 1) } else { (i, i + rot / 2) };
                            row[a] = (orig[a] as f64 * c - orig[b] as f64 * s) as f32;
                            row[b] = (orig[b] as f64 * c + orig[a] as f64 * s) as f32;
                        }
                        row
                    };
                    let (mut want_q, mut want_k, mut want_v) =
                        (vec![0f32; m * nh * hd], vec![0f32; num_slots * nkv * hd], vec![0f32; num_slots * nkv * hd]);
                    for t in 0..m {
                        for h in 0..nh {
                            let r = rotate(head(t, h, norm.then_some(&qn[..])), positions[t]);
                            want_q[(t * nh + h) * hd..][..hd].copy_from_slice(&r);
                        }
                        for h in 0..nkv {
                            let r = rotate(head(t, nh + h, norm.then_some(&kn[..])), positions[t]);
                            want_k[(slots[t] as usize * nkv + h) * hd..][..hd].copy_from_slice(&r);
                            want_v[(slots[t] as usize * nkv + h) * hd..][..hd].copy_from_slice(&head(t, nh + nkv + h, None));
                        }
                    }
                    let (_a, qkvp) = dev_tensor(&qkv, DType::F32, &dev);
                    let (_b, pp) = dev_u32(&positions, &dev);
                    let (_c, sp) = dev_u32(&slots, &dev);
                    let (_d, ip) = dev_tensor(&inv, DType::F32, &dev);
                    let (_e, qnp) = dev_tensor(&qn, dt, &dev);
                    let (_f, knp) = dev_tensor(&kn, dt, &dev);
                    let (q, qp) = dev_tensor(&vec![0f32; m * nh * hd], dt, &dev);
                    let (kc, kp) = dev_tensor(&vec![0f32; num_slots * nkv * hd], dt, &dev);
                    let (vc, vp) = dev_tensor(&vec![0f32; num_slots * nkv * hd], dt, &dev);
                    let qk_norm = norm.then_some((qnp, knp, 1e-6));
                    unsafe { kern.rope_qkv(qkvp, pp, sp, ip, qk_norm, qp, kp, vp, m, (nh, nkv, hd), rot, interleaved) }.unwrap();
                    let what = format!("rope_qkv rot={rot} interleaved={interleaved} norm={norm} {dt:?}");
                    // Angles up to 3000 rad: f32 argument reduction costs ~1e-4 absolute.
                    assert_close(&format!("{what} q"), &to_host(&q), &rounded(&want_q, dt), tol.max(1e-3));
                    assert_close(&format!("{what} k"), &to_host(&kc), &rounded(&want_k, dt), tol.max(1e-3));
                    assert_close(&format!("{what} v"), &to_host(&vc), &rounded(&want_v, dt), tol.max(1e-3));
                }
            }
        }
    }
}

#[test]
fn decode_attention_matches_the_cpu_kernel() {
    let Some(dev) = gpu() else { return };
    // Groups of 4, 1 and 8 query heads per KV head (with a window, with soft-capping), head_dim 80 and
    // a group of 9. Up to 128 keys attention.cu's kernel, its partial pass writing the output; past
    // them decode.cu's grouped kernel (not for head_dim 80 or a group of 9), two partitions or many
    // (combine pass).
    let shapes = [
        (8usize, 2usize, 128usize, None, None),
        (4, 4, 64, Some(37), None),
        (16, 2, 64, None, Some(0.9f32)),
        (6, 2, 80, None, None),
        (9, 1, 64, None, None),
    ];
    for ((num_heads, num_kv_heads, hd, window, softcap), lens) in shapes.into_iter().flat_map(|sh| {
        [vec![(1usize, 5usize), (3, 3), (1, 100)], vec![(1, 200), (2, 129)], vec![(1, 700), (2, 40), (1, 257)]]
            .into_iter()
            .map(move |l| (sh, l))
    }) {
        let block_size = 16;
        let (tables, num_blocks) = scattered_tables(&lens, block_size, 2);
        let row = num_kv_heads * hd;
        let (kc, vc) = (rand_vec(num_blocks * block_size * row, 90), rand_vec(num_blocks * block_size * row, 91));
        let rows: usize = lens.iter().map(|l| l.0).sum();
        let q = rand_vec(rows * num_heads * hd, 92);
        let seqs = ragged_seqs(&lens, &tables);
        // The same per-row metadata the tensor path uploads (tables, row table starts, key counts).
        let meta = cuda::AttentionMeta::new(&seqs, &dev).unwrap();
        let max_len = meta.max_len;
        let shape = attention_shape(num_heads, num_kv_heads, hd, block_size, window, softcap);
        for (dt, tol) in DTYPES {
            let kern = DecodeKernels::new(&dev, dt, true).unwrap();
            let (qr, kr, vr) = (rounded(&q, dt), rounded(&kc, dt), rounded(&vc, dt));
            let mut want = vec![0f32; rows * num_heads * hd];
            paged_attention(infer_kernels::Isa::detect(), &qr, &kr, &vr, &seqs, &shape, &mut want);
            let (_q, qp) = dev_tensor(&q, dt, &dev);
            let (_k, kp) = dev_tensor(&kc, dt, &dev);
            let (_v, vp) = dev_tensor(&vc, dt, &dev);
            let (tp, rtp, rlp) =
                (tensor_ptr(&meta.tables).unwrap(), tensor_ptr(&meta.row_table).unwrap(), tensor_ptr(&meta.row_len).unwrap());
            let scratch_len = DecodeKernels::attention_scratch(rows, &shape, max_len).max(1);
            let (_s, sp) = dev_tensor(&vec![0f32; scratch_len], DType::F32, &dev);
            let (out, op) = dev_tensor(&vec![0f32; rows * num_heads * hd], dt, &dev);
            let args = AttentionArgs {
                q: qp,
                k_cache: kp,
                v_cache: vp,
                tables: tp,
                row_table: rtp,
                row_len: rlp,
                scratch: sp,
                out: op,
                rows,
                max_len,
            };
            unsafe { kern.attention(&args, &shape) }.unwrap();
            let what =
                format!("decode attention h={num_heads}/{num_kv_heads} hd={hd} window={window:?} softcap={softcap:?} {lens:?} {dt:?}");
            assert_close(&what, &to_host(&out), &want, tol);
        }
    }
}

/// `rmsnorm(x[i]) · g` in f64 for the rows of x (`[m, k]`).
fn normed(x: &[f32], g: &[f32], k: usize, eps: f64) -> Vec<f64> {
    x.chunks(k)
        .flat_map(|row| {
            let inv = 1.0 / (row.iter().map(|&v| v as f64 * v as f64).sum::<f64>() / k as f64 + eps).sqrt();
            row.iter().zip(g).map(move |(&v, &w)| v as f64 * inv * w as f64)
        })
        .collect()
}

#[test]
fn decode_kernels_with_the_norm_folded_in_match_the_reference() {
    let Some(dev) = gpu() else { return };
    let eps = 1e-5;
    // (rows, k): 4, 2 and 1 warps per row.
    for (n, k) in [(72usize, 64usize), (3000, 128), (8200, 40)] {
        for (dt, tol) in DTYPES {
            let kern = DecodeKernels::new(&dev, dt, true).unwrap();
            let (w, up) = (rounded(&rand_vec(n * k, 100), dt), rounded(&rand_vec(n * k, 101), dt));
            let bias = rounded(&rand_vec(n, 102), dt);
            let gain = rounded(&rand_vec(k, 103), dt);
            let ((_w, wp), (_u, upp), (_b, bp), (_g, gp)) =
                (dev_tensor(&w, dt, &dev), dev_tensor(&up, dt, &dev), dev_tensor(&bias, dt, &dev), dev_tensor(&gain, dt, &dev));
            for m in 1..=NORM_ROWS {
                // The residual rows in f32, at a scale unlike 1 (the norm must divide it out).
                let x: Vec<f32> = rand_vec(m * k, 104 + m as u64).iter().map(|v| v * 7.0).collect();
                let (_x, xp) = dev_tensor(&x, DType::F32, &dev);
                let h = normed(&x, &gain, k, eps as f64);
                let dot = |wm: &[f32], i: usize, r: usize| -> f64 { (0..k).map(|j| wm[r * k + j] as f64 * h[i * k + j]).sum() };
                let want: Vec<f32> =
                    (0..m).flat_map(|i| (0..n).map(move |r| (i, r))).map(|(i, r)| (dot(&w, i, r) + bias[r] as f64) as f32).collect();
                let seg = [Segment { weight: wp, bias: bp, rows: n }];
                let base = rand_vec(m * n, 105);
                let (out, op) = dev_tensor(&base, DType::F32, &dev);
                unsafe { kern.gemv_norm(&seg, k, xp, gp, eps, m, op, true) }.unwrap();
                let summed: Vec<f32> = want.iter().zip(&base).map(|(a, b)| a + b).collect();
                assert_close(&format!("gemv_norm [{n}, {k}] m={m} {dt:?}"), &to_host(&out), &summed, 1e-4);
                let want: Vec<f32> = (0..m)
                    .flat_map(|i| (0..n).map(move |r| (i, r)))
                    .map(|(i, r)| {
                        let (g, u) = (dot(&w, i, r), dot(&up, i, r));
                        (g / (1.0 + (-g).exp()) * u) as f32
                    })
                    .collect();
                let (act, ap) = dev_tensor(&vec![0f32; m * n], dt, &dev);
                unsafe { kern.glu_norm(wp, upp, n, k, xp, gp, eps, m, ap) }.unwrap();
                assert_close(&format!("glu_norm [{n}, {k}] m={m} {dt:?}"), &to_host(&act), &want, tol.max(1e-4));
            }
        }
    }
}

#[test]
fn decode_qkv_rope_with_the_norm_folded_in_matches_the_reference() {
    let Some(dev) = gpu() else { return };
    let (nh, nkv, hd, k) = (4usize, 2usize, 32usize, 96usize);
    let (nq, nk) = (nh * hd, nkv * hd);
    let rows = nq + 2 * nk;
    let positions = [3u32, 1700];
    let slots = [6u32, 1];
    let num_slots = 8;
    let eps = 1e-6;
    for rot in [hd, hd / 2] {
        let inv: Vec<f32> = (0..rot / 2).map(|i| 1.0 / 10000f32.powf(2.0 * i as f32 / rot as f32)).collect();
        for interleaved in [false, true] {
            for fused in [false, true] {
                for (dt, tol) in DTYPES {
                    let kern = DecodeKernels::new(&dev, dt, true).unwrap();
                    let w = rounded(&rand_vec(rows * k, 110), dt);
                    let bias = rounded(&rand_vec(rows, 111), dt);
                    let gain = rounded(&rand_vec(k, 112), dt);
                    let (_w, wp) = dev_tensor(&w, dt, &dev);
                    let (_b, bp) = dev_tensor(&bias, dt, &dev);
                    let (_g, gp) = dev_tensor(&gain, dt, &dev);
                    let (_i, ip) = dev_tensor(&inv, DType::F32, &dev);
                    let (_p, pp) = dev_u32(&positions, &dev);
                    let (_s, sp) = dev_u32(&slots, &dev);
                    let es = dt.size_in_bytes();
                    let segs: Vec<Segment> = if fused {
                        vec![Segment { weight: wp, bias: bp, rows }]
                    } else {
                        // Three matrices (here views of one buffer) with biases.
                        [(0, nq), (nq, nk), (nq + nk, nk)]
                            .iter()
                            .map(|&(r0, r)| Segment { weight: wp.offset(r0 * k * es), bias: bp.offset(r0 * es), rows: r })
                            .collect()
                    };
                    for m in 1..=NORM_ROWS {
                        let x: Vec<f32> = rand_vec(m * k, 113 + m as u64).iter().map(|v| v * 3.0).collect();
                        let (_x, xp) = dev_tensor(&x, DType::F32, &dev);
                        let h = normed(&x, &gain, k, eps as f64);
                        let (mut want_q, mut want_k, mut want_v) =
                            (vec![0f32; m * nq], vec![0f32; num_slots * nk], vec![0f32; num_slots * nk]);
                        for t in 0..m {
                            let y: Vec<f64> = (0..rows)
                                .map(|r| (0..k).map(|j| w[r * k + j] as f64 * h[t * k + j]).sum::<f64>() + bias[r] as f64)
                                .collect();
                            for head in 0..nh + 2 * nkv {
                                let mut v: Vec<f64> = y[head * hd..][..hd].to_vec();
                                if head < nh + nkv {
                                    let orig = v.clone();
                                    for (i, &f) in inv.iter().enumerate() {
                                        let (s, c) = (positions[t] as f64 * f as f64).sin_cos();
                                        let (a, b) = if interleaved { (2 * i, 2 * i + 1) } else { (i, i + rot / 2) };
                                        v[a] = orig[a] * c - orig[b] * s;
                                        v[b] = orig[b] * c + orig[a] * s;
                                    }
                                }
                                let v: Vec<f32> = v.iter().map(|&e| e as f32).collect();
                                let slot = slots[t] as usize;
                                if head < nh {
                                    want_q[(t * nh + head) * hd..][..hd].copy_from_slice(&v);
                                } else if head < nh + nkv {
                                    want_k[(slot * nkv + head - nh) * hd..][..hd].copy_from_slice(&v);
                                } else {
                                    want_v[(slot * nkv + head - nh - nkv) * hd..][..hd].copy_from_slice(&v);
                                }
                            }
                        }
                        let (q, qp) = dev_tensor(&vec![0f32; m * nq], dt, &dev);
                        let (kc, kp) = dev_tensor(&vec![0f32; num_slots * nk], dt, &dev);
                        let (vc, vp) = dev_tensor(&vec![0f32; num_slots * nk], dt, &dev);
                        unsafe {
                            kern.qkv_rope_norm(&segs, k, (xp, gp, eps), m, (pp, sp, ip), (qp, kp, vp), (nh, nkv, hd), rot, interleaved)
                        }
                        .unwrap();
                        let what = format!("qkv_rope_norm rot={rot} interleaved={interleaved} fused={fused} m={m} {dt:?}");
                        // Angles up to 1700 rad: f32 argument reduction costs ~1e-4 absolute.
                        assert_close(&format!("{what} q"), &to_host(&q), &rounded(&want_q, dt), tol.max(1e-3));
                        assert_close(&format!("{what} k"), &to_host(&kc), &rounded(&want_k, dt), tol.max(1e-3));
                        assert_close(&format!("{what} v"), &to_host(&vc), &rounded(&want_v, dt), tol.max(1e-3));
                    }
                }
            }
        }
    }
}
