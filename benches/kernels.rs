//! The other CPU kernels, each instruction set: F16 matmul (GB/s of weights for decode, GFLOP/s for
//! prompts), paged attention (a 512-token prompt and a decode step over 512 keys, GFLOP/s) and the
//! fused element-wise steps (GB/s), at SmolLM2-135M's shapes.
//!
//!   cargo bench --bench kernels

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use infer_kernels::cpu::attention::paged_attention;
use infer_kernels::{fused, write_kv, AttentionShape, HalfKind, HalfWeight, Isa, SeqAttention};

fn values(n: usize, seed: u32) -> Vec<f32> {
    let mut x = seed;
    (0..n)
        .map(|_| {
            x = x.wrapping_mul(1664525).wrapping_add(1013904223);
            (x >> 8) as f32 / (1u32 << 24) as f32 * 2.0 - 1.0
        })
        .collect()
}

fn half_matmul(c: &mut Criterion) {
    let (rows, cols) = (1536, 576);
    let bytes: Vec<u8> = values(rows * cols, 1).iter().flat_map(|&v| half::f16::from_f32(v * 0.05).to_le_bytes()).collect();
    for m in [1usize, 64, 256] {
        let mut g = c.benchmark_group(format!("F16/mlp_up_{rows}x{cols}/m{m}"));
        g.throughput(if m == 1 { Throughput::Bytes((rows * cols * 2) as u64) } else { Throughput::Elements((2 * m * rows * cols) as u64) });
        let x = values(m * cols, 2);
        let mut out = vec![0f32; m * rows];
        for isa in Isa::available() {
            let w = HalfWeight::new_for(isa, HalfKind::F16, rows, cols, &bytes).unwrap();
            g.bench_with_input(BenchmarkId::from_parameter(format!("{isa:?}")), &isa, |b, &isa| {
                b.iter(|| w.matmul_with(isa, &x, m, &mut out))
            });
        }
        g.finish();
    }
}

fn attention(c: &mut Criterion) {
    let sh =
        AttentionShape { num_heads: 9, num_kv_heads: 3, head_dim: 64, block_size: 16, scale: 0.125, sliding_window: None, softcap: None };
    let kv_row = sh.num_kv_heads * sh.head_dim;
    let ctx = 512;
    let table: Vec<u32> = (0..(ctx / sh.block_size) as u32).collect();
    let slots: Vec<usize> = (0..ctx).collect();
    let (mut kc, mut vc) = (vec![0f32; ctx * kv_row], vec![0f32; ctx * kv_row]);
    write_kv(&values(ctx * kv_row, 3), &values(ctx * kv_row, 4), &slots, &sh, &mut kc, &mut vc);
    for (what, q_len) in [("prompt512", ctx), ("decode_ctx512", 1)] {
        let mut g = c.benchmark_group(format!("attention/{what}"));
        // Q·Kᵀ and P·V over the visible keys: 4·head_dim flops per (query head, key).
        let pairs: usize = (ctx - q_len..ctx).map(|p| p + 1).sum();
        g.throughput(Throughput::Elements((4 * sh.head_dim * sh.num_heads * pairs) as u64));
        let q = values(q_len * sh.num_heads * sh.head_dim, 5);
        let seqs = [SeqAttention { q_start: 0, q_len, context_len: ctx, block_table: &table }];
        let mut out = vec![0f32; q.len()];
        for isa in Isa::available() {
            g.bench_with_input(BenchmarkId::from_parameter(format!("{isa:?}")), &isa, |b, &isa| {
                b.iter(|| paged_attention(isa, &q, &kc, &vc, &seqs, &sh, &mut out))
            });
        }
        g.finish();
    }
}

fn elementwise(c: &mut Criterion) {
    let (rows, n) = (128, 576);
    let (x, a, w) = (values(rows * n, 6), values(rows * n, 7), values(n, 8));
    let (mut sum, mut out) = (vec![0f32; rows * n], vec![0f32; rows * n]);
    let mut g = c.benchmark_group(format!("fused/{rows}x{n}"));
    // Bytes read and written.
    g.throughput(Throughput::Bytes((4 * rows * n * 4) as u64));
    g.bench_function("add_rms_norm", |b| b.iter(|| fused::add_rms_norm(&x, &a, &w, 1e-5, &mut sum, &mut out)));
    g.throughput(Throughput::Bytes((3 * rows * n * 4) as u64));
    g.bench_function("silu_mul", |b| b.iter(|| fused::silu_mul(&x, &a, n, &mut out)));
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(20).warm_up_time(std::time::Duration::from_millis(300)).measurement_time(std::time::Duration::from_secs(1));
    targets = half_matmul, attention, elementwise
}
criterion_main!(benches);
