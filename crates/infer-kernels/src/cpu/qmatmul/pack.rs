//! Unpacking GGUF blocks into the kernels' forms.

use super::*;

#[inline]
pub(super) fn f16_at(b: &[u8], i: usize) -> f32 {
    f16::from_le_bytes([b[i], b[i + 1]]).to_f32()
}

/// Sub-block `j` (0..8) of a Q4_K super-block: writes its 32 quants in the Q4_1 nibble order
/// (byte i: value i low, value i+16 high) and returns its (scale, minimum) as value = d·q + m.
pub(super) fn unpack_q4k_sub_block(blk: &[u8], j: usize, dst: &mut [u8]) -> (f32, f32) {
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
pub(super) fn k_scale_min(sc: &[u8], j: usize) -> (u8, u8) {
    if j < 4 {
        (sc[j] & 63, sc[j + 4] & 63)
    } else {
        ((sc[j + 4] & 0x0F) | ((sc[j - 4] >> 6) << 4), (sc[j + 4] >> 4) | ((sc[j] >> 6) << 4))
    }
}

/// Sub-block `j` (0..8) of a Q5_K super-block: writes its 32 values in the 5-bit form (nibbles in
/// the Q4_1 order, then the fifth bits as a little-endian u32) and returns (scale, minimum) as
/// value = d·q5 + m.
pub(super) fn unpack_q5k_sub_block(blk: &[u8], j: usize, dst: &mut [u8]) -> (f32, f32) {
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
pub(super) fn unpack_q2k_sub_block(blk: &[u8], b: usize, dst: &mut [u8]) -> [f32; 4] {
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
pub(super) fn unpack_q3k_sub_block(blk: &[u8], b: usize, dst: &mut [u8]) -> (f32, f32) {
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
pub(super) fn unpack_q6k_sub_block(blk: &[u8], j: usize, dst: &mut [u8]) -> (f32, f32) {
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

/// Block `b` (32 values) of row `row` of GGUF data `[rows, cols]` in the narrow form: writes its
/// quants to `dst` (`quant_bytes()` bytes) and returns its scale slots (see [`QWeight`]).
pub(super) fn narrow_block(qtype: QType, data: &[u8], cols: usize, row: usize, b: usize, dst: &mut [u8]) -> [f32; 4] {
    let bb = qtype.block_bytes();
    let nb = cols / QK;
    if qtype == QType::Q2K {
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
    }
}

/// Block `b` of row `row` as 32 unsigned values `q` and `[d0, d1, m0, m1]` with value k =
/// d_h·q_k + m_h, h = k / 16 (formats with one scale per block give both halves the same).
/// Signed formats are offset to unsigned (Q8_0 by 128, Q6_K by 32, Q3_K by 4) and the offset moved
/// into the minimums, so every format multiplies as unsigned weights × signed activations.
pub(super) fn unsigned_block(qtype: QType, data: &[u8], cols: usize, row: usize, b: usize) -> ([u8; QK], [f32; 4]) {
    let mut n = [0u8; QK];
    let v = narrow_block(qtype, data, cols, row, b, &mut n[..qtype.quant_bytes()]);
    let mut q = [0u8; QK];
    if qtype.byte_quants() {
        let off: i16 = match qtype {
            QType::Q8_0 => 128,
            QType::Q6K => 32,
            QType::Q3K => 4,
            _ => 0,
        };
        for (u, &s) in q.iter_mut().zip(&n) {
            *u = (s as i8 as i16 + off) as u8;
        }
        let o = off as f32;
        let s = match qtype {
            QType::Q2K => v,
            QType::Q8_0 => [v[0], v[0], -o * v[0], -o * v[0]],
            _ => [v[0], v[1], -o * v[0], -o * v[1]],
        };
        return (q, s);
    }
    for i in 0..16 {
        q[i] = n[i] & 0x0F;
        q[i + 16] = n[i] >> 4;
    }
    if qtype.five_bit() {
        let plane = u32::from_le_bytes([n[16], n[17], n[18], n[19]]);
        for (k, u) in q.iter_mut().enumerate() {
            *u |= (((plane >> k) & 1) << 4) as u8;
        }
    }
    (q, [v[0], v[0], v[1], v[1]])
}

/// Where the fifth and sixth bits of value `i` (0..512, [`wide_index`] order) of a wide block in
/// form `values` are kept: (byte, bit) in the block, for [`FIVE`] the first and for [`SIX`] both
/// (none for [`NIBBLES`] and [`BYTES`]). Value i's low bits are in the nibbles of register
/// `j = i / 64` (64-byte line `j % 4`, high nibbles for j ≥ 4), byte `p = i % 64`; its high bits
/// are byte p of a 64-byte line after the nibbles, at a bit that depends on j only, so one 16-bit
/// shift and a mask move them to their place in all 64 bytes of register j at once:
/// - [`FIVE`]: one line; bit j is the fifth bit of register j.
/// - [`SIX`]: two lines, one for registers 0..4 and one for 4..8; bits 2·(j % 4) and 2·(j % 4) + 1
///   are the fifth and sixth bits of register j.
#[inline]
pub(super) fn high_bits(values: u8, i: usize) -> impl Iterator<Item = (usize, u32)> {
    let (j, p) = (i / 64, i % 64);
    let (at, count) = match values {
        FIVE => ([(256 + p, j as u32), (0, 0)], 1),
        SIX => {
            let line = 256 + 64 * (j / 4) + p;
            let bit = 2 * (j % 4) as u32;
            ([(line, bit), (line, bit + 1)], 2)
        }
        _ => ([(0, 0); 2], 0),
    };
    at.into_iter().take(count)
}

/// Position of value `k` (0..32) of row `n` (0..16) of a wide block: the VNNI order of AMX's B tiles
/// (four consecutive values of a row side by side, the 16 rows across a 64-byte line).
#[inline]
pub(super) fn wide_index(n: usize, k: usize) -> usize {
    (k / 4) * 64 + n * 4 + k % 4
}

/// The integer sub-scales of block `b` (0..nb) of row `row` and its super-block's f16 factors,
/// for the compact scale forms: `([s0, s1, n0, n1], [D, M])` with d_h = D·s_h and m_h = M·n_h
/// (M = −dmin) or `moff`·d_h (see [`WideForm`]). Legacy formats: `D = d`, `M` = the minimum.
fn compact_scales(qtype: QType, data: &[u8], cols: usize, row: usize, b: usize) -> ([i16; 4], [f16; 2]) {
    let bb = qtype.block_bytes();
    if qtype.block_values() == QK {
        let blk = &data[(row * cols / QK + b) * bb..][..bb];
        let m = if matches!(qtype, QType::Q4_1 | QType::Q5_1) { f16::from_le_bytes([blk[2], blk[3]]) } else { f16::ZERO };
        return ([1, 1, 1, 1], [f16::from_le_bytes([blk[0], blk[1]]), m]);
    }
    let blk = &data[(row * cols / 256 + b / 8) * bb..][..bb];
    let f = |i: usize| f16::from_le_bytes([blk[i], blk[i + 1]]);
    let j = b % 8;
    match qtype {
        QType::Q4K | QType::Q5K => {
            let (s, m) = k_scale_min(&blk[4..16], j);
            ([s as i16, s as i16, m as i16, m as i16], [f(0), -f(2)])
        }
        QType::Q6K => {
            let sc = &blk[192 + (j / 4) * 8 + 2 * (j % 4)..];
            ([sc[0] as i8 as i16, sc[1] as i8 as i16, 0, 0], [f(208), f16::ZERO])
        }
        QType::Q3K => {
            let sc = &blk[96..108];
            let scale = |i: usize| -> i16 {
                let low = if i < 8 { sc[i] & 0x0F } else { sc[i - 8] >> 4 };
                let high = (sc[8 + i % 4] >> (2 * (i / 4))) & 3;
                (low | (high << 4)) as i16 - 32
            };
            ([scale(2 * j), scale(2 * j + 1), 0, 0], [f(108), f16::ZERO])
        }
        _ => {
            let (s0, s1) = (blk[2 * j], blk[2 * j + 1]);
            ([(s0 & 0x0F) as i16, (s1 & 0x0F) as i16, (s0 >> 4) as i16, (s1 >> 4) as i16], [f(80), -f(82)])
        }
    }
}

/// Writes row `n`'s scales of block `b` into its group's scales `dst` (bytes) in `form`.
#[allow(clippy::too_many_arguments)]
fn put_scales(form: WideForm, qtype: QType, data: &[u8], cols: usize, row: usize, n: usize, b: usize, dst: &mut [u8]) {
    let (sup, rec) = form.offsets(b);
    let put16 = |dst: &mut [u8], at: usize, v: f16| dst[at + 2 * n..at + 2 * n + 2].copy_from_slice(&v.to_le_bytes());
    let (ints, [d, m]) = compact_scales(qtype, data, cols, row, b);
    match form.scales {
        D16 => put16(dst, rec, d),
        DM16 => {
            put16(dst, rec, d);
            put16(dst, rec + 2 * NW, m);
        }
        KSM => {
            put16(dst, sup, d);
            put16(dst, sup + 2 * NW, m);
            dst[rec + n] = ints[0] as u8;
            dst[rec + NW + n] = ints[2] as u8;
        }
        KHALF => {
            put16(dst, sup, d);
            dst[rec + n] = ints[0] as i8 as u8;
            dst[rec + NW + n] = ints[1] as i8 as u8;
        }
        _ => {
            put16(dst, sup, d);
            put16(dst, sup + 2 * NW, m);
            for (k, &v) in ints.iter().enumerate() {
                dst[rec + k * NW + n] = v as u8;
            }
        }
    }
}

/// Row `n`'s `[d0, d1, m0, m1]` of block `b` read back from a group's scales in `form` (what the
/// kernels compute; tests).
#[cfg(test)]
pub(super) fn read_scales(form: WideForm, sc: &[u8], n: usize, b: usize) -> [f32; 4] {
    let (sup, rec) = form.offsets(b);
    let f16_at = |at: usize| f16::from_le_bytes([sc[at + 2 * n], sc[at + 2 * n + 1]]).to_f32();
    let u = |k: usize| sc[rec + k * NW + n] as f32;
    let i = |k: usize| sc[rec + k * NW + n] as i8 as f32;
    match form.scales {
        D16 => {
            let d = f16_at(rec);
            [d, d, form.moff * d, form.moff * d]
        }
        DM16 => [f16_at(rec), f16_at(rec), f16_at(rec + 2 * NW), f16_at(rec + 2 * NW)],
        KSM => {
            let (d, m) = (f16_at(sup) * u(0), f16_at(sup + 2 * NW) * u(1));
            [d, d, m, m]
        }
        KHALF => {
            let (d0, d1) = (f16_at(sup) * i(0), f16_at(sup) * i(1));
            [d0, d1, form.moff * d0, form.moff * d1]
        }
        _ => {
            let (d, m) = (f16_at(sup), f16_at(sup + 2 * NW));
            [d * u(0), d * u(1), m * u(2), m * u(3)]
        }
    }
}

/// Repacks GGUF data `[rows, cols]` (sizes checked) into the wide layout in `form`: per group of
/// 16 rows, the scales of every block (see [`WideForm`]; as f32 words, read as bytes) and the
/// values, 32 per row and block in [`wide_index`] order (see [`NIBBLES`] etc.).
pub(super) fn pack_wide(qtype: QType, form: WideForm, rows: usize, cols: usize, data: &[u8]) -> (Vec<f32>, Vec<u8>) {
    use rayon::prelude::*;
    let nb = cols / QK;
    let groups = rows.div_ceil(NW);
    let (sn, qb) = (form.scale_bytes(nb), form.value_bytes());
    debug_assert!(sn.is_multiple_of(4));
    let mut words = vec![0f32; groups * sn / 4];
    let mut qs = vec![0u8; groups * nb * qb];
    // SAFETY: any bytes are a valid f32 bit pattern; the slice covers exactly the vector.
    let scales = unsafe { std::slice::from_raw_parts_mut(words.as_mut_ptr() as *mut u8, words.len() * 4) };
    // Groups in parallel (load time): each fills its own slices.
    scales.par_chunks_mut(sn).zip(qs.par_chunks_mut(nb * qb)).enumerate().for_each(|(g, (gsc, gqs))| {
        for n in 0..NW.min(rows - g * NW) {
            for b in 0..nb {
                let (q, _) = unsigned_block(qtype, data, cols, g * NW + n, b);
                put_scales(form, qtype, data, cols, g * NW + n, n, b, gsc);
                let dst = &mut gqs[b * qb..(b + 1) * qb];
                for (k, &v) in q.iter().enumerate() {
                    let i = wide_index(n, k);
                    if form.values == BYTES {
                        dst[i] = v;
                        continue;
                    }
                    dst[i % 256] |= (v & 0x0F) << (4 * (i / 256));
                    for (h, (byte, bit)) in high_bits(form.values, i).enumerate() {
                        dst[byte] |= ((v >> (4 + h)) & 1) << bit;
                    }
                }
            }
        }
    });
    (words, qs)
}
