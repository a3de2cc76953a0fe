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

/// Every ISA path's `x · wᵀ` (each with the weight `raw` packed for it) against the f64 product
/// with the dequantized weights `wd`: with 8-bit activations the error stays well under 1% of Σ|x·w|.
fn assert_every_path_matches(qt: QType, rows: usize, cols: usize, raw: &[u8], wd: &[f32], x: &[f32], m: usize) {
    assert_paths_match(qt, rows, cols, raw, x, m, |t, r| {
        let exact: f64 = (0..cols).map(|k| x[t * cols + k] as f64 * wd[r * cols + k] as f64).sum();
        let scale: f64 = (0..cols).map(|k| (x[t * cols + k] as f64 * wd[r * cols + k] as f64).abs()).sum();
        (exact, scale)
    });
}

/// (instruction set a weight is packed for, the one multiplying it): every available one.
fn isa_pairs() -> Vec<(Isa, Isa)> {
    Isa::available().iter().map(|&i| (i, i)).collect()
}

/// Every ISA path's `x · wᵀ` against `reference(t, r)` = (the exact product of token t and row r,
/// its scale Σ|x·w|): within 1% of the scale.
fn assert_paths_match(
    qt: QType,
    rows: usize,
    cols: usize,
    raw: &[u8],
    x: &[f32],
    m: usize,
    reference: impl Fn(usize, usize) -> (f64, f64),
) {
    for (pack, isa) in isa_pairs() {
        let w = QWeight::new_for(pack, qt, rows, cols, raw.to_vec()).unwrap();
        let mut out = vec![0f32; m * rows];
        w.matmul_with(isa, x, m, &mut out);
        for t in 0..m {
            for r in 0..rows {
                let (exact, scale) = reference(t, r);
                let got = out[t * rows + r] as f64;
                assert!(
                    (got - exact).abs() <= 0.01 * scale + 1e-5,
                    "{qt:?} {isa:?} (packed for {pack:?}) [{rows}x{cols}] m={m} t={t} r={r}: {got} vs {exact}"
                );
            }
        }
    }
}

#[test]
fn every_path_matches_the_f32_product_of_dequantized_weights() {
    let mut rng = Lcg(7);
    for qt in [QType::Q4_0, QType::Q4_1, QType::Q8_0] {
        // Odd shapes: rows not a multiple of the chunk, of 4 or of 16; token counts 1..=9, and 16,
        // 19, 35 (tile products of 16 tokens and a rest).
        for (rows, cols, m) in
            [(1, 32, 1), (7, 64, 3), (33, 96, 5), (300, 256, 9), (5, 1024, 4), (17, 32, 2), (40, 128, 35), (17, 64, 16), (70, 96, 19)]
        {
            let (_, raw) = random_weight(qt, rows, cols, &mut rng);
            let x: Vec<f32> = (0..m * cols).map(|_| rng.f() * 3.0).collect();
            // Reference: dequantize W from its GGUF bytes, multiply in f64.
            let mut wd = Vec::new();
            let rb = cols / QK * qt.block_bytes();
            for r in 0..rows {
                scalar::dequantize_row(qt, &raw[r * rb..(r + 1) * rb], &mut wd);
            }
            assert_every_path_matches(qt, rows, cols, &raw, &wd, &x, m);
        }
    }
}

#[test]
fn simd_paths_equal_the_scalar_path() {
    let mut rng = Lcg(11);
    for qt in [QType::Q4_0, QType::Q4_1, QType::Q8_0] {
        let (rows, cols, m) = (70, 320, 23);
        let raw = random_weight(qt, rows, cols, &mut rng).1;
        let w = QWeight::new_for(Isa::Scalar, qt, rows, cols, raw.clone()).unwrap();
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
            QWeight::new_for(isa, qt, rows, cols, raw.clone()).unwrap().matmul_with(isa, &x, m, &mut got);
            for (g, e) in got.iter().zip(&want) {
                assert!((g - e).abs() <= 1e-4 * e.abs().max(1.0), "{qt:?} {isa:?}: {g} vs {e}");
            }
        }
    }
}

/// The 5-bit and K-quant formats on every path against llama.cpp's own dequantization: the products
/// come from gguf-py (tests/fixtures/kernels/ggml_products.bin, written by
/// scripts/make_kernel_fixtures.py, which makes the same weights and activations from the same
/// sequence). The weights are random block bytes (every bit pattern of values, scales and minimums)
/// with sane f16 scale fields.
#[test]
fn repacked_formats_match_ggml_dequantization() {
    // (format, block bytes, byte offsets of the f16 fields): the fixture's format order.
    const FORMATS: [(QType, usize, &[usize]); 7] = [
        (QType::Q5_0, 22, &[0]),
        (QType::Q5_1, 24, &[0, 2]),
        (QType::Q2K, 84, &[80, 82]),
        (QType::Q3K, 110, &[108]),
        (QType::Q4K, 144, &[0, 2]),
        (QType::Q5K, 176, &[0, 2]),
        (QType::Q6K, 210, &[208]),
    ];
    let fixture = include_bytes!("../../../../../tests/fixtures/kernels/ggml_products.bin");
    let mut words = fixture.chunks_exact(4).map(|b| <[u8; 4]>::try_from(b).unwrap());
    let mut u32_at = || u32::from_le_bytes(words.next().expect("fixture too short")) as usize;
    let mut rng = Lcg(5);
    let cases = u32_at();
    let mut n = 0;
    for (rows, cols, m) in [(6, 256, 3), (33, 512, 5), (20, 256, 37)] {
        for (f, &(qt, block_bytes, f16_at)) in FORMATS.iter().enumerate() {
            assert_eq!([u32_at(), u32_at(), u32_at(), u32_at()], [f, rows, cols, m], "fixture case {n} out of order");
            assert_eq!(qt.block_bytes(), block_bytes);
            let mut raw = Vec::new();
            for _ in 0..rows * cols / qt.block_values() {
                let mut block: Vec<u8> = (0..block_bytes).map(|_| rng.next() as u8).collect();
                for &at in f16_at {
                    let d = f16::from_f32((1 + rng.next() % 64) as f32 / 1024.0);
                    block[at..at + 2].copy_from_slice(&d.to_le_bytes());
                }
                raw.extend(block);
            }
            let x: Vec<f32> = (0..m * cols).map(|_| ((rng.next() % 2001) as f32 - 1000.0) / 500.0).collect();
            let want: Vec<(f64, f64)> =
                (0..m * rows).map(|_| (f32::from_bits(u32_at() as u32) as f64, f32::from_bits(u32_at() as u32) as f64)).collect();
            assert_paths_match(qt, rows, cols, &raw, &x, m, |t, r| want[t * rows + r]);
            n += 1;
        }
    }
    assert_eq!((n, words.next()), (cases, None), "fixture has other cases than the test");
}

#[test]
fn grouped_matmul_equals_separate_matmuls() {
    let mut rng = Lcg(13);
    let (cols, m) = (256, 21);
    let parts = [(QType::Q4_1, 36), (QType::Q8_0, 9), (QType::Q4_0, 70)];
    let raws: Vec<Vec<u8>> = parts.iter().map(|&(qt, rows)| random_weight(qt, rows, cols, &mut rng).1).collect();
    let x: Vec<f32> = (0..m * cols).map(|_| rng.f()).collect();
    for isa in Isa::available() {
        let ws: Vec<QWeight> =
            parts.iter().zip(&raws).map(|(&(qt, rows), raw)| QWeight::new_for(isa, qt, rows, cols, raw.clone()).unwrap()).collect();
        let mut outs: Vec<Vec<f32>> = ws.iter().map(|w| vec![f32::NAN; m * w.rows()]).collect();
        let mut refs: Vec<&mut [f32]> = outs.iter_mut().map(|o| o.as_mut_slice()).collect();
        // Without an instruction set: the one the weights were packed for.
        matmul_many(&ws.iter().collect::<Vec<_>>(), &x, m, &mut refs);
        for (w, got) in ws.iter().zip(&outs) {
            assert_eq!(w.isa(), isa);
            let mut want = vec![0f32; m * w.rows()];
            w.matmul_with(isa, &x, m, &mut want);
            assert_eq!(got, &want, "{:?} {isa:?}", w.qtype());
            w.matmul(&x, m, &mut want);
            assert_eq!(got, &want, "{:?} {isa:?}, the weight's own instruction set", w.qtype());
        }
    }
}

#[test]
fn bad_sizes_are_refused() {
    assert!(QWeight::new(QType::Q4_1, 2, 30, vec![0; 40]).unwrap_err().contains("multiple of 32"));
    assert!(QWeight::new(QType::Q8_0, 2, 32, vec![0; 10]).unwrap_err().contains("needs 68 bytes"));
}

#[test]
fn simd_activation_quantization_equals_the_scalar_one() {
    let mut rng = Lcg(17);
    for k in 0..200 {
        // Random rows, rows with exact ties (halves of the step), an all-zero row.
        let x: Vec<f32> = match k % 3 {
            0 => (0..QK).map(|_| rng.f() * 10.0).collect(),
            1 => (0..QK).map(|i| if i == 0 { 127.0 } else { (rng.next() % 255) as f32 * 0.5 - 63.5 }).collect(),
            _ => vec![0.0; QK],
        };
        let (want, got) = (quantize_block_scalar(&x), quantize_block(&x));
        assert_eq!((want.qs, want.d, want.s, want.s0, want.neg_sums), (got.qs, got.d, got.s, got.s0, got.neg_sums), "row {k}");
        assert_eq!(want.neg_sums.iter().sum::<i32>(), -want.qs.iter().map(|&q| q as i32).sum::<i32>(), "row {k}");
    }
}

/// Random GGUF blocks of `qt` (every bit pattern of values and sub-scales, sane f16 factors).
fn random_blocks(qt: QType, blocks: usize, rng: &mut Lcg) -> Vec<u8> {
    let f16_at: &[usize] = match qt {
        QType::Q4_0 | QType::Q5_0 | QType::Q8_0 => &[0],
        QType::Q4_1 | QType::Q5_1 | QType::Q4K | QType::Q5K => &[0, 2],
        QType::Q2K => &[80, 82],
        QType::Q3K => &[108],
        QType::Q6K => &[208],
    };
    let mut raw = Vec::new();
    for _ in 0..blocks {
        let mut block: Vec<u8> = (0..qt.block_bytes()).map(|_| rng.next() as u8).collect();
        for &at in f16_at {
            let d = f16::from_f32((1 + rng.next() % 64) as f32 / 1024.0 * if rng.next().is_multiple_of(2) { 1.0 } else { -1.0 });
            block[at..at + 2].copy_from_slice(&d.to_le_bytes());
        }
        raw.extend(block);
    }
    raw
}

const ALL_FORMATS: [QType; 10] =
    [QType::Q4_0, QType::Q4_1, QType::Q5_0, QType::Q5_1, QType::Q8_0, QType::Q2K, QType::Q3K, QType::Q4K, QType::Q5K, QType::Q6K];

/// Every format on every path at token counts around AMX's 16-token tiles: a tile of fewer rows
/// (14), one whole tile (16), a tile and a rest for the AVX-512 tiles (21), a tile and a tile of
/// fewer rows (29), and tiles sharing the values spread by the first (32, 37).
#[test]
fn every_format_matches_around_the_tile_sizes() {
    let mut rng = Lcg(31);
    let (rows, cols) = (37, 512);
    for qt in ALL_FORMATS {
        let raw = random_blocks(qt, rows * cols / qt.block_values(), &mut rng);
        // The unpacked blocks (checked against ggml's dequantization by the test below) as f32.
        let mut wd = Vec::new();
        for r in 0..rows {
            for b in 0..cols / QK {
                let (q, [d0, d1, m0, m1]) = unsigned_block(qt, &raw, cols, r, b);
                wd.extend(q.iter().enumerate().map(|(k, &v)| if k < 16 { d0 * v as f32 + m0 } else { d1 * v as f32 + m1 }));
            }
        }
        for m in [14, 16, 21, 29, 32, 37] {
            let x: Vec<f32> = (0..m * cols).map(|_| rng.f() * 2.0).collect();
            assert_every_path_matches(qt, rows, cols, &raw, &wd, &x, m);
        }
    }
}

/// The wide form's scales (f16 factors, integer sub-scales) give exactly the f32 scales and
/// minimums of the unpacked blocks, and its values are the same.
#[test]
fn wide_form_holds_the_same_numbers() {
    let mut rng = Lcg(23);
    let (rows, cols) = (21, 512);
    for qt in ALL_FORMATS {
        let raw = random_blocks(qt, rows * cols / qt.block_values(), &mut rng);
        let nb = cols / QK;
        let form = qt.wide_form();
        let (words, qs) = pack_wide(qt, form, rows, cols, &raw);
        // SAFETY: reading the f32 words' bytes.
        let sc = unsafe { std::slice::from_raw_parts(words.as_ptr() as *const u8, words.len() * 4) };
        let (sn, qb) = (form.scale_bytes(nb), form.value_bytes());
        assert_eq!((sc.len(), qs.len()), (rows.div_ceil(NW) * sn, rows.div_ceil(NW) * nb * qb), "{qt:?}");
        for row in 0..rows {
            let (g, n) = (row / NW, row % NW);
            for b in 0..nb {
                let (q, want) = unsigned_block(qt, &raw, cols, row, b);
                let got = read_scales(form, &sc[g * sn..(g + 1) * sn], n, b);
                assert_eq!(got.map(f32::to_bits), want.map(f32::to_bits), "{qt:?} row {row} block {b}: {got:?} vs {want:?}");
                let blk = &qs[(g * nb + b) * qb..(g * nb + b + 1) * qb];
                for (k, &v) in q.iter().enumerate() {
                    let i = wide_index(n, k);
                    let got = if form.values == BYTES {
                        blk[i]
                    } else {
                        let mut u = (blk[i % 256] >> (4 * (i / 256))) & 0x0F;
                        for (h, (byte, bit)) in high_bits(form.values, i).enumerate() {
                            u |= ((blk[byte] >> bit) & 1) << (4 + h);
                        }
                        u
                    };
                    assert_eq!(got, v, "{qt:?} row {row} block {b} value {k}");
                }
            }
        }
    }
}

/// What AMX, AVX-512 and AVX2 keep in memory per weight is (nearly) what the file holds: decode reads
/// every byte of it once per token.
#[test]
fn wide_form_is_as_small_as_the_file() {
    let mut rng = Lcg(29);
    let (rows, cols) = (64, 1024);
    for qt in ALL_FORMATS {
        let raw = random_blocks(qt, rows * cols / qt.block_values(), &mut rng);
        let (words, qs) = pack_wide(qt, qt.wide_form(), rows, cols, &raw);
        let ratio = (words.len() * 4 + qs.len()) as f64 / raw.len() as f64;
        // Q2_K and Q3_K keep their 2- and 3-bit values as nibbles.
        let bound = match qt {
            QType::Q2K => 2.1,
            QType::Q3K => 1.4,
            _ => 1.03,
        };
        assert!(ratio <= bound, "{qt:?}: {ratio:.3} × the file's bytes");
    }
}
