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
