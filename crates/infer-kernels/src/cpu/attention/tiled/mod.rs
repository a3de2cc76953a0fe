//! The tiled attention kernels, flash-attention-2 style (AVX-512 in `avx512.rs`, AVX2 in `avx2.rs`:
//! the same algorithm at 16 and 8 lanes), over units of up to 16 (AVX2: 8) query vectors that share
//! one KV head, one per register lane: 16 consecutive rows of one head (prompts) or the query heads
//! of one KV head for one row (decode steps). Each lane's arithmetic depends only on its own query
//! and position (key steps are aligned to the sequence), so a row gets bit-identical results
//! whether it is decoded alone, prefilled in any chunking, or batched with other sequences. The unit's queries are transposed once (`qt[d]` = dimension d of
//! all 16 rows), so each step of 16 keys computes its scores as `S_j = Σ_d qt[d] · k_j[d]`, one
//! fused multiply-add per (dimension, key) with the key element broadcast, and no horizontal sums;
//! the running maximum, the exponentials and the rescaling are lane-wise (per query row), and the
//! output accumulates transposed (`ot[d]`) the same way. Keys and values are copied per step into a
//! small f32 buffer (widened from an f16 cache), so the paged block table is walked once per key.

use super::{run_tasks, AttentionShape, Call, KvElem};
use crate::cpu::isa::Isa;
use crate::cpu::scratch;
use std::cell::RefCell;

/// Whether the tiled kernel handles this head size.
pub(crate) fn supports(head_dim: usize) -> bool {
    matches!(head_dim, 32 | 64 | 80 | 96 | 128 | 256)
}

/// `$f::<HD, $e>($args)` for the head sizes [`supports`] lists.
macro_rules! by_head_dim {
    ($hd:expr, $f:ident, $e:ty, $args:expr) => {
        match $hd {
            32 => $f::<32, $e>($args),
            64 => $f::<64, $e>($args),
            80 => $f::<80, $e>($args),
            96 => $f::<96, $e>($args),
            128 => $f::<128, $e>($args),
            256 => $f::<256, $e>($args),
            d => unreachable!("head size {d} is not tiled"),
        }
    };
}

mod avx2;
mod avx512;

thread_local! {
    /// Reused buffers (see `scratch`): the tiled kernel's units and lanes.
    static UNITS: RefCell<Vec<(usize, usize, std::ops::Range<usize>)>> = const { RefCell::new(Vec::new()) };
    static LANES: RefCell<Vec<Lane>> = const { RefCell::new(Vec::new()) };
}

/// The tiled units' lanes hold raw pointers into `q` and `out`; the units are shared read-only
/// between the pool's tasks.
struct SendUnits<T>(T);
// SAFETY: the pointers are only dereferenced by the unit that owns the lane (reads of q, writes of
// its own output slice) while the caller's borrows of q and out are alive.
unsafe impl<T> Sync for SendUnits<T> {}

impl<T> SendUnits<T> {
    /// (A method, so closures capture the whole `Sync` wrapper.)
    fn get(&self) -> &T {
        &self.0
    }
}

/// One lane of a unit: a query vector (one head of one row), where its output goes, its position.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Lane {
    pub(crate) q: *const f32,
    pub(crate) out: *mut f32,
    pub(crate) pos: usize,
}

/// A unit's lanes, the key and value caches with their q8_0 scales (else empty), the sequence's
/// block table, the KV head, the shape.
type Args<'a, E> = (&'a [Lane], (&'a [E], &'a [half::f16]), (&'a [E], &'a [half::f16]), &'a [u32], usize, &'a AttentionShape);

/// First key step (a multiple of `keys`: keys before a lane's window are masked) and last key of
/// a unit's lanes.
fn key_range(lanes: &[Lane], window: Option<usize>, keys: usize) -> (usize, usize) {
    let first = lanes
        .iter()
        .map(|l| match window {
            Some(w) if l.pos + 1 > w => l.pos + 1 - w,
            _ => 0,
        })
        .min()
        .unwrap_or(0);
    (first / keys * keys, lanes.iter().map(|l| l.pos).max().unwrap_or(0))
}

/// Every row through the tiled kernel when there is one for this CPU and head size: prompt chunks as
/// units of consecutive rows of one head, single rows (decode steps) as units of the query heads of
/// one KV head. Returns false (nothing done) otherwise, for the per-row kernel.
pub(super) fn attend<E: KvElem>(call: &Call<'_, E>, out: &mut [f32]) -> bool {
    let Call { isa, q, k_cache, v_cache, k_scales, v_scales, seqs, shape, row_seq } = *call;
    let (k_cache, v_cache) = ((k_cache, k_scales), (v_cache, v_scales));
    let (hd, q_row) = (shape.head_dim, shape.num_heads * shape.head_dim);
    if isa == Isa::Scalar || !supports(hd) {
        return false;
    }
    // 16 lanes a unit with AVX-512, 8 with AVX2.
    let wide = matches!(isa, Isa::Avx512 | Isa::Amx);
    let width = if wide { avx512::ROWS } else { avx2::ROWS };
    let group = shape.num_heads / shape.num_kv_heads;
    // Row r, head h (in bounds: r < rows of q and out, h < num_heads); each lane's output is
    // written by one unit only.
    let (qp, op) = (q.as_ptr(), out.as_mut_ptr());
    let lane =
        |r: usize, h: usize, pos: usize| Lane { q: qp.wrapping_add(r * q_row + h * hd), out: op.wrapping_add(r * q_row + h * hd), pos };
    scratch::with(&UNITS, |units| {
        scratch::with(&LANES, |lanes| {
            // Units: (sequence, KV head, its range of lanes), the longest (last rows of prompts) first.
            for (s, seq) in seqs.iter().enumerate() {
                let p0 = seq.context_len - seq.q_len;
                if seq.q_len >= 2 {
                    for i0 in (0..seq.q_len).step_by(width).rev() {
                        let rows = i0..(i0 + width).min(seq.q_len);
                        for h in 0..shape.num_heads {
                            let l0 = lanes.len();
                            lanes.extend(rows.clone().map(|i| lane(seq.q_start + i, h, p0 + i)));
                            units.push((s, h / group, l0..lanes.len()));
                        }
                    }
                } else if seq.q_len == 1 {
                    for kvh in 0..shape.num_kv_heads {
                        for h0 in (kvh * group..(kvh + 1) * group).step_by(width) {
                            let l0 = lanes.len();
                            lanes.extend((h0..(h0 + width).min((kvh + 1) * group)).map(|h| lane(seq.q_start, h, p0)));
                            units.push((s, kvh, l0..lanes.len()));
                        }
                    }
                }
            }
            let units = SendUnits((&*units, &*lanes));
            let run = |u: usize| {
                let (units, all_lanes) = *units.get();
                let (s, kvh, range) = &units[u];
                let lanes = &all_lanes[range.clone()];
                let table = seqs[*s].block_table;
                // SAFETY: `attend` checked the head size and that the instruction set has AVX2, FMA and
                // F16C (and AVX-512 F/BW/VL when `wide`); lanes point into q and out, and each output
                // slice belongs to one lane of one unit.
                unsafe {
                    if wide {
                        avx512::unit(lanes, k_cache, v_cache, table, *kvh, shape)
                    } else {
                        avx2::unit(lanes, k_cache, v_cache, table, *kvh, shape)
                    }
                }
            };
            run_tasks(seqs, q_row, units.get().0.len(), &run);
        })
    });
    // Rows of no sequence (padding) are zero.
    for (r, o) in out.chunks_mut(q_row).enumerate() {
        if row_seq[r] == usize::MAX {
            o.fill(0.0);
        }
    }
    true
}
