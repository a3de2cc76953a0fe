//! Quantized matmul throughput: weight bytes streamed per second (GB/s; the limit for decode) and
//! GFLOP/s, for SmolLM2-135M's shapes, decode (1 token) and prefill (64 and 256 tokens), each instruction set.
//!
//!   cargo bench --bench qmatmul

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use infer_kernels::{Isa, QType, QWeight};

fn weight(isa: Isa, qt: QType, rows: usize, cols: usize) -> QWeight {
    let mut data = Vec::with_capacity(rows * cols / 32 * qt.block_bytes());
    let mut x = 1u32;
    for _ in 0..rows * cols / 32 {
        data.extend(half::f16::from_f32(0.02).to_le_bytes());
        if qt == QType::Q4_1 {
            data.extend(half::f16::from_f32(-0.1).to_le_bytes());
        }
        for _ in 0..(qt.block_bytes() - data.len() % qt.block_bytes()) % qt.block_bytes() {
            x = x.wrapping_mul(1664525).wrapping_add(1013904223);
            data.push((x >> 24) as u8);
        }
    }
    QWeight::new_for(isa, qt, rows, cols, data).unwrap()
}

fn bench(c: &mut Criterion) {
    for (qt, rows, cols, what) in [
        (QType::Q4_1, 1536, 576, "mlp_up"),
        (QType::Q4_1, 4096, 4096, "big"),
        (QType::Q4_1, 576, 1536, "mlp_down"),
        (QType::Q8_0, 49152, 576, "lm_head"),
        (QType::Q4_0, 1536, 576, "mlp_up"),
    ] {
        for m in [1usize, 64, 256] {
            let mut g = c.benchmark_group(format!("{qt:?}/{what}_{rows}x{cols}/m{m}"));
            let x: Vec<f32> = (0..m * cols).map(|i| ((i * 7919) % 1000) as f32 / 500.0 - 1.0).collect();
            let mut out = vec![0f32; m * rows];
            if m == 1 {
                g.throughput(Throughput::Bytes((rows * cols / 32 * qt.block_bytes()) as u64));
            } else {
                g.throughput(Throughput::Elements((2 * m * rows * cols) as u64));
            }
            for isa in Isa::available() {
                // Each instruction set multiplies its own layout.
                let w = weight(isa, qt, rows, cols);
                g.bench_with_input(BenchmarkId::from_parameter(format!("{isa:?}")), &isa, |b, &isa| {
                    b.iter(|| w.matmul_with(isa, &x, m, &mut out))
                });
            }
            g.finish();
        }
    }
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(20).warm_up_time(std::time::Duration::from_millis(300)).measurement_time(std::time::Duration::from_secs(1));
    targets = bench
}
criterion_main!(benches);
