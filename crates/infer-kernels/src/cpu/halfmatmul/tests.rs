//! F16/BF16 matmul against an f64 product, on every instruction-set path.

use super::*;

#[test]
fn every_path_matches_an_f64_product() {
    let mut seed = 3u64;
    let mut rnd = || {
        seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        ((seed >> 33) as f32 / (1u64 << 31) as f32) * 2.0 - 1.0
    };
    for kind in [HalfKind::F16, HalfKind::Bf16] {
        for (rows, cols, m) in
            [(1, 8, 1), (7, 40, 3), (300, 96, 6), (33, 17, 5), (4, 100, 1), (5, 24, 9), (40, 64, 19), (40, 64, 37), (17, 96, 48)]
        {
            let wf: Vec<f32> = (0..rows * cols).map(|_| rnd()).collect();
            let bytes: Vec<u8> = wf
                .iter()
                .flat_map(|&v| match kind {
                    HalfKind::F16 => f16::from_f32(v).to_le_bytes(),
                    HalfKind::Bf16 => bf16::from_f32(v).to_le_bytes(),
                })
                .collect();
            let x: Vec<f32> = (0..m * cols).map(|_| rnd()).collect();
            for isa in Isa::available() {
                let w = HalfWeight::new_for(isa, kind, rows, cols, &bytes).unwrap();
                assert_eq!(w.isa(), isa);
                let mut out = vec![0f32; m * rows];
                // The weight's own instruction set.
                w.matmul(&x, m, &mut out);
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
