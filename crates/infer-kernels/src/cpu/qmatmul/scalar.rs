//! The portable reference kernels.

use super::*;

/// One weight row (in `qt` blocks, GGUF layout) · one quantized activation row (test reference).
#[cfg(test)]
#[allow(clippy::needless_range_loop)]
pub fn dot(qt: QType, w: &[u8], a: &[BlockQ8]) -> f32 {
    let bb = qt.block_bytes();
    let mut sum = 0f32;
    for (blk, ab) in w.chunks_exact(bb).zip(a) {
        let d = f16_at(blk, 0);
        match qt {
            QType::Q4_0 | QType::Q4_1 => {
                let qs = if qt == QType::Q4_0 { &blk[2..18] } else { &blk[4..20] };
                let mut isum = 0i32;
                for j in 0..16 {
                    isum += (qs[j] & 0x0F) as i32 * ab.qs[j] as i32 + (qs[j] >> 4) as i32 * ab.qs[j + 16] as i32;
                }
                let m = if qt == QType::Q4_0 { -8.0 * d } else { f16_at(blk, 2) };
                sum += d * ab.d * isum as f32 + m * ab.s;
            }
            QType::Q8_0 => {
                let isum: i32 = blk[2..34].iter().zip(&ab.qs).map(|(&q, &x)| q as i8 as i32 * x as i32).sum();
                sum += d * ab.d * isum as f32;
            }
            _ => unreachable!("the GGUF-layout reference covers Q4_0, Q4_1, Q8_0"),
        }
    }
    sum
}

/// The packed-layout tile (see [`QWeight`]): four weight rows × `r` activation rows.
pub fn tile(qt: QType, scales: &[f32], qs: &[u8], a: &[BlockQ8], nb: usize, r: usize, o: &mut [[f32; MR]; NR]) {
    let qb = qt.quant_bytes();
    let sn = qt.scale_slots() * NR;
    for b in 0..nb {
        let sc = &scales[b * sn..(b + 1) * sn];
        for (wr, orow) in o.iter_mut().enumerate() {
            let q = &qs[(b * NR + wr) * qb..(b * NR + wr + 1) * qb];
            for (t, ov) in orow.iter_mut().enumerate().take(r) {
                let ab = &a[t * nb + b];
                if qt.half_scales() {
                    let half = |h: usize| -> i32 { (16 * h..16 * h + 16).map(|i| q[i] as i8 as i32 * ab.qs[i] as i32).sum() };
                    *ov += sc[wr] * ab.d * half(0) as f32 + sc[NR + wr] * ab.d * half(1) as f32;
                    if sn == 4 * NR {
                        *ov += sc[2 * NR + wr] * ab.s0 + sc[3 * NR + wr] * (ab.s - ab.s0);
                    }
                    continue;
                }
                let isum: i32 = if qt.byte_quants() {
                    q.iter().zip(&ab.qs).map(|(&w, &x)| w as i8 as i32 * x as i32).sum()
                } else if qt.five_bit() {
                    let qh = u32::from_le_bytes([q[16], q[17], q[18], q[19]]);
                    let v = |i: usize| {
                        let nib = if i < 16 { q[i] & 0x0F } else { q[i - 16] >> 4 };
                        (nib as u32 | ((qh >> i) & 1) << 4) as i32
                    };
                    (0..32).map(|i| v(i) * ab.qs[i] as i32).sum()
                } else {
                    (0..16).map(|j| (q[j] & 0x0F) as i32 * ab.qs[j] as i32 + (q[j] >> 4) as i32 * ab.qs[j + 16] as i32).sum()
                };
                *ov += sc[wr] * ab.d * isum as f32 + sc[NR + wr] * ab.s;
            }
        }
    }
}

/// Dequantizes a whole row (test reference).
#[cfg(test)]
pub fn dequantize_row(qt: QType, w: &[u8], out: &mut Vec<f32>) {
    for blk in w.chunks_exact(qt.block_bytes()) {
        let d = f16_at(blk, 0);
        match qt {
            QType::Q4_0 | QType::Q4_1 => {
                let (qs, m) = if qt == QType::Q4_0 { (&blk[2..18], -8.0 * d) } else { (&blk[4..20], f16_at(blk, 2)) };
                out.extend(qs.iter().map(|&q| d * (q & 0x0F) as f32 + m));
                out.extend(qs.iter().map(|&q| d * (q >> 4) as f32 + m));
            }
            QType::Q8_0 => out.extend(blk[2..34].iter().map(|&q| d * q as i8 as f32)),
            _ => unreachable!("the GGUF-layout reference covers Q4_0, Q4_1, Q8_0"),
        }
    }
}
